//! The verification walk: after the unseal, a background thread reads every key and grant
//! record page by page, checks its MAC, and reports the ones that fail (an error in the log
//! for each, and the `keyring_tampered_records` metric), without holding up the unseal or
//! any call. A key whose record fails is refused by name at its first use in any case
//! (`Keyring::entry`): the walk is how an operator hears of it before a caller does.
//!
//! The walk also finds what maintenance must do and when (the schedule: a key's next
//! rotation, its versions' destructions, its import parameters' expiry), which changes
//! keep up to date from then on; maintenance acts on the schedule, never on every key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::{KeyMeta, Keyring, KeyringError, VersionState, grants, model};

/// Records read per page of the walk.
const PAGE: usize = 512;
/// The pause between two pages: the walk yields the core to calls.
const PAUSE: Duration = Duration::from_millis(1);

/// When something is next due on a key (`None`: nothing ever, until it changes).
fn next_due(meta: &KeyMeta) -> Option<u64> {
    let destroy = meta.versions.iter().filter_map(|v| match v.state {
        VersionState::ScheduledForDestruction { destroy_at } => Some(destroy_at),
        _ => None,
    });
    meta.next_rotation_at
        .into_iter()
        .chain(destroy)
        .chain(meta.import_job.as_ref().map(|j| j.expires_at))
        .min()
}

#[derive(Debug, Default)]
struct Schedule {
    /// Key name -> when something is next due on it.
    by_name: BTreeMap<String, u64>,
    /// (due, name), in the order they come due.
    by_time: BTreeSet<(u64, String)>,
}

impl Schedule {
    fn set(&mut self, name: &str, due: Option<u64>) {
        if let Some(old) = self.by_name.remove(name) {
            self.by_time.remove(&(old, name.to_owned()));
        }
        if let Some(at) = due {
            self.by_name.insert(name.to_owned(), at);
            self.by_time.insert((at, name.to_owned()));
        }
    }
}

/// What the walk found, and the maintenance schedule.
#[derive(Debug, Default)]
pub(super) struct Walk {
    schedule: Mutex<Schedule>,
    /// Keys in the store: as the last walk counted them, plus those created since.
    keys: AtomicUsize,
    /// Records (keys and grants) that failed authentication in the last walk.
    tampered: AtomicUsize,
}

impl Walk {
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        // Every update is a few map operations that complete or leave the maps whole.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes `meta` as it now is (committed, or read from the store).
    pub(super) fn schedule(&self, meta: &KeyMeta) {
        self.lock().set(&meta.name, next_due(meta));
    }

    /// Forgets `name` (gone, or refused).
    pub(super) fn unschedule(&self, name: &str) {
        self.lock().set(name, None);
    }

    /// As [`Walk::schedule`] for a record the walk read, which a change committed since
    /// may have superseded: it may only bring a due time forward (a time too early is
    /// checked against the key as it then is, and put right).
    fn walked(&self, meta: &KeyMeta) {
        let Some(due) = next_due(meta) else {
            return;
        };
        let mut s = self.lock();
        if s.by_name.get(&meta.name).is_none_or(|&old| due < old) {
            s.set(&meta.name, Some(due));
        }
    }

    /// The keys something is due on at `at`, in the order they came due.
    pub(super) fn due(&self, at: u64) -> Vec<String> {
        self.lock()
            .by_time
            .iter()
            .take_while(|(t, _)| *t <= at)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// A key was created.
    pub(super) fn created(&self) {
        self.keys.fetch_add(1, Ordering::Relaxed);
    }

    /// How many keys there are (see `keys`).
    pub(super) fn key_count(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// Records that failed authentication in the last walk.
    pub(super) fn tampered(&self) -> usize {
        self.tampered.load(Ordering::Relaxed)
    }
}

/// What one walk counted.
#[derive(Debug, Default)]
struct Counts {
    keys: usize,
    tampered_keys: usize,
    grants: usize,
    tampered_grants: usize,
}

impl Keyring {
    /// Starts the verification walk on its own thread. It holds the keyring only while it
    /// reads a page: a seal drops the keyring (and its secrets) at once, and the walk stops.
    pub(crate) fn start_walk(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("kms-keyring-walk".into())
            .spawn(move || {
                // A walk that fails (the store unreachable for a moment) is made again, or
                // keys not walked would wait for the next unseal to be scheduled.
                let mut wait = RETRY_FIRST;
                while !walk(&weak) {
                    std::thread::sleep(wait);
                    if weak.strong_count() == 0 {
                        return;
                    }
                    wait = (wait * 2).min(RETRY_MOST);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the keyring's verification walk: altered records are refused at their first use only");
        }
    }

    /// How many keys there are: as the verification walk counted them, plus those created
    /// since (for the metrics; no key is read).
    pub(crate) fn key_count(&self) -> usize {
        self.walk.key_count()
    }

    /// Records that failed authentication in the last verification walk.
    pub(crate) fn tampered_records(&self) -> usize {
        self.walk.tampered()
    }

    /// Reads every key record once, authenticated, for the schedule (after a resync of a
    /// shared store: another server's changes were missed). Returns the keys read.
    pub(super) fn reschedule_all(&self) -> Result<usize, KeyringError> {
        let mut n = 0;
        super::load::each_page(self.store.as_ref(), super::KEYS, |name, bytes| {
            match model::decode(&name, &bytes, &self.mac_key) {
                Ok(meta) => {
                    self.walk.walked(&meta);
                    n += 1;
                }
                Err(KeyringError::Tampered(_)) => self.walk.unschedule(&name),
                Err(e) => return Err(e),
            }
            Ok(())
        })?;
        Ok(n)
    }
}

/// One table's walk, page by page from `from`: calls `f` with each entry of the page read.
/// Stops (returning `None`) when the keyring is gone (sealed).
fn walk_table(
    weak: &Weak<Keyring>,
    table: crate::store::Table,
    mut f: impl FnMut(&Keyring, &str, &[u8]) -> Result<(), KeyringError>,
) -> Option<Result<(), KeyringError>> {
    let mut from = String::new();
    loop {
        let keyring = weak.upgrade()?;
        let page = match keyring.store.range(table, &from, PAGE) {
            Ok(p) => p,
            Err(e) => return Some(Err(e.into())),
        };
        let Some((last, _)) = page.last() else {
            return Some(Ok(()));
        };
        // Names and ids have no NUL: this is the next possible key.
        from = format!("{last}\0");
        let full = page.len() == PAGE;
        for (k, v) in &page {
            if let Err(e) = f(&keyring, k, v) {
                return Some(Err(e));
            }
        }
        drop(keyring);
        if !full {
            return Some(Ok(()));
        }
        std::thread::sleep(PAUSE);
    }
}

/// How long after a failed walk the next one starts, at first and at most.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(10);
const RETRY_MOST: std::time::Duration = std::time::Duration::from_secs(600);

/// One walk; whether it is over (done, or the keyring sealed): false when it failed.
fn walk(weak: &Weak<Keyring>) -> bool {
    let started = Instant::now();
    let mut n = Counts::default();
    let keys = walk_table(weak, super::KEYS, |k, name, bytes| {
        match model::decode(name, bytes, &k.mac_key) {
            Ok(meta) => {
                k.walk.walked(&meta);
                n.keys += 1;
            }
            Err(KeyringError::Tampered(_)) => {
                tracing::error!(key = %name, "key metadata failed authentication: the store was altered; key refused (found by the keyring's verification walk)");
                n.tampered_keys += 1;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    });
    let grants = match keys {
        Some(Ok(())) => walk_table(weak, super::GRANTS, |k, id, bytes| {
            if grants::decode(id, bytes, &k.mac_key)?.is_some() {
                n.grants += 1;
            } else {
                tracing::error!(grant = %id, "grant record failed authentication: the store was altered; grant refused (found by the keyring's verification walk)");
                n.tampered_grants += 1;
            }
            Ok(())
        }),
        other => other,
    };
    let Some(keyring) = weak.upgrade() else {
        return true;
    };
    match grants {
        Some(Ok(())) => {
            let w = &keyring.walk;
            w.keys.store(n.keys, Ordering::Relaxed);
            w.tampered
                .store(n.tampered_keys + n.tampered_grants, Ordering::Relaxed);
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if n.tampered_keys + n.tampered_grants > 0 {
                tracing::error!(
                    keys = n.keys,
                    grants = n.grants,
                    tampered_keys = n.tampered_keys,
                    tampered_grants = n.tampered_grants,
                    ms,
                    "keyring verification walk done: records failed authentication (the store was altered); they are refused"
                );
            } else {
                tracing::info!(
                    keys = n.keys,
                    grants = n.grants,
                    ms,
                    "keyring verification walk done: every record authenticated"
                );
            }
        }
        Some(Err(e)) => {
            tracing::error!(error = %crate::error_chain(&e), "the keyring's verification walk failed: it is made again shortly; until it is done, altered records are refused at their first use only and keys not walked are not scheduled");
            return false;
        }
        None => {}
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_keeps_one_time_per_key_and_a_walk_only_brings_it_forward() {
        let w = Walk::default();
        let mut s = w.lock();
        s.set("a", Some(10));
        s.set("b", Some(5));
        s.set("a", Some(20));
        drop(s);
        assert_eq!(w.due(10), vec!["b".to_owned()]);
        assert_eq!(w.due(25), vec!["b".to_owned(), "a".to_owned()]);
        w.unschedule("b");
        assert_eq!(w.due(25), vec!["a".to_owned()]);
        assert_eq!(w.lock().by_time.len(), 1);
    }
}
