//! Following a shared store: what other servers committed (keys, versions, grants) is
//! reloaded from the store, checked as at a first use, and published, so that every server
//! uses it within the time a notification takes; and what a call meets that this server
//! does not know yet (a key, a newer version) is looked up at once.
//!
//! A change is heard as a hint (`store::Change`: read this entry again, or everything) and
//! stays *unapplied* until a read of the store has been applied. A change that fails (the
//! store times out, the HSM cannot find a new version's object during an outage) stays
//! unapplied and is tried again by the server's follow task until it is applied, whatever
//! else arrives meanwhile.
//!
//! **Invariant:** this server never serves what an unapplied change may have made stale.
//! A live grant named by a change is suspended the moment the change is heard (the only
//! change a live grant can undergo is its revocation), and, from the moment a change has
//! failed or has taken longer than [`APPLY_GRACE`], every call on the key it concerns is
//! refused `UNAVAILABLE` ([`KeyringError::KeyBehind`]); when it cannot be tied to one key
//! (a resync), every key is ([`KeyringError::Behind`]). The grant checks and every key
//! lookup of a call consult this state.

use super::{
    Arc, BTreeMap, Keyring, KeyringError, LOCK, Ordering, RwLock, RwLockReadGuard,
    RwLockWriteGuard, cache, grants, model,
};
use crate::store::Change as StoreChange;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

/// How long a change heard may take to be applied before the keys it concerns are refused:
/// far more than a healthy database takes to answer one read.
pub(crate) const APPLY_GRACE: Duration = Duration::from_millis(200);

/// What an unapplied change may have made stale here.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// One key: its record, or a grant live on it.
    Key(String),
    /// Every key (a resync: anything may have changed).
    Everything,
    /// Nothing served here: a grant that is not live here can only add a permission.
    Nothing,
}

/// One change heard and not applied yet.
#[derive(Debug)]
struct Unapplied {
    scope: Scope,
    /// When it was first heard.
    heard: Instant,
    /// The last time it was heard, as a sequence number: an application that started
    /// before it does not apply it.
    seq: u64,
    /// An application of it failed (the keys it concerns are refused at once).
    failed: bool,
}

#[derive(Debug, Default)]
struct LagState {
    unapplied: BTreeMap<StoreChange, Unapplied>,
    next_seq: u64,
    /// Since when this server has been behind (a change failed), for the log.
    behind_since: Option<Instant>,
}

/// The changes heard and not applied yet (see the module's invariant).
#[derive(Debug, Default)]
pub(super) struct Lag {
    /// How many changes are unapplied: a call on a keyring that is up to date reads only
    /// this.
    count: AtomicUsize,
    state: RwLock<LagState>,
}

impl Lag {
    fn lock(&self) -> RwLockWriteGuard<'_, LagState> {
        // Every update is a few assignments that cannot panic halfway.
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, LagState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_count(&self, state: &LagState) {
        self.count.store(state.unapplied.len(), Ordering::Release);
    }

    /// The next sequence number: changes heard from now on are newer than an application
    /// that starts now.
    fn seq(&self) -> u64 {
        self.read().next_seq
    }

    /// `change` was applied by a read that started at `started`: it is no longer
    /// unapplied, unless it was heard again since.
    fn applied(&self, change: &StoreChange, started: u64) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = self.lock();
        if state.unapplied.get(change).is_some_and(|u| u.seq < started) {
            state.unapplied.remove(change);
            self.publish_count(&state);
        }
    }

    /// Whether an unapplied change refuses `key` now (`None`: whether one refuses every
    /// key), and which error says so.
    fn refusal(&self, key: Option<&str>) -> Option<KeyringError> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let state = self.read();
        let now = Instant::now();
        let mut refused = None;
        for u in state.unapplied.values() {
            if !u.failed && now.duration_since(u.heard) <= APPLY_GRACE {
                continue;
            }
            match (&u.scope, key) {
                (Scope::Everything, _) => return Some(KeyringError::Behind),
                (Scope::Key(k), Some(key)) if k == key => {
                    refused = Some(KeyringError::KeyBehind(k.clone()));
                }
                (Scope::Key(k), None) => refused = Some(KeyringError::KeyBehind(k.clone())),
                _ => {}
            }
        }
        refused
    }
}

/// How far this server's keyring is behind the shared store, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Following {
    /// Changes heard and not applied yet.
    pub(crate) unapplied: usize,
    /// Whether a change failed or has waited past [`APPLY_GRACE`]: keys are refused.
    pub(crate) behind: bool,
}

impl Keyring {
    /// Refuses `name` (`UNAVAILABLE`) while a change that concerns it is unapplied past
    /// [`APPLY_GRACE`] or failed (see the module's invariant).
    pub(super) fn refuse_if_behind(&self, name: &str) -> Result<(), KeyringError> {
        self.lag.refusal(Some(name)).map_or(Ok(()), Err)
    }

    /// Refuses while any change that concerns a key is unapplied past [`APPLY_GRACE`] or
    /// failed (for answers about every key, such as the list of every grant).
    pub(super) fn refuse_if_any_behind(&self) -> Result<(), KeyringError> {
        self.lag.refusal(None).map_or(Ok(()), Err)
    }

    /// How far behind the shared store this keyring is.
    pub(crate) fn following(&self) -> Following {
        if self.lag.count.load(Ordering::Acquire) == 0 {
            return Following {
                unapplied: 0,
                behind: false,
            };
        }
        let state = self.lag.read();
        let now = Instant::now();
        Following {
            unapplied: state.unapplied.len(),
            behind: state
                .unapplied
                .values()
                .any(|u| u.failed || now.duration_since(u.heard) > APPLY_GRACE),
        }
    }

    /// Notes changes as heard, at once (before they are applied): each is unapplied from
    /// now on, and a live grant one names is suspended. Cheap and never waits on the store: the server's follow
    /// task calls it as changes arrive, even while an application is under way.
    pub(crate) fn heard(&self, changes: &[StoreChange]) {
        let mut state = self.lag.lock();
        let now = Instant::now();
        for change in changes {
            let seq = state.next_seq;
            state.next_seq += 1;
            if let Some(u) = state.unapplied.get_mut(change) {
                u.seq = seq;
                continue;
            }
            // Past the bound (a flood of notifications from any role with CONNECT), one
            // resync stands for every change: each call then checks one entry, not millions.
            let resync_waits = state.unapplied.contains_key(&StoreChange::Resync);
            if !resync_waits && state.unapplied.len() >= crate::store::MAX_HINTS {
                // The resync inherits what the entries it replaces had come to: the earliest
                // hearing, and a failure (a key refused stays refused, not served for
                // another grace period).
                let failed = state.unapplied.values().any(|u| u.failed);
                let heard = state
                    .unapplied
                    .values()
                    .map(|u| u.heard)
                    .min()
                    .unwrap_or(now);
                state.unapplied.clear();
                state.unapplied.insert(
                    StoreChange::Resync,
                    Unapplied {
                        scope: Scope::Everything,
                        heard,
                        seq,
                        failed,
                    },
                );
                // Grants named from here on are still suspended below; their entries are
                // the resync's.
            }
            let scope = match change {
                StoreChange::Resync => {
                    // Changes were missed: nothing cached is trusted from now on (the
                    // reload then reads everything again).
                    self.keys.clear();
                    self.grants.clear();
                    Scope::Everything
                }
                StoreChange::Entry(crate::keyring::KEYS, name) => {
                    // The key's cached state stops serving at once (a peer disabled it,
                    // raised its minimum version, scheduled a destruction): its next use
                    // reads the store, where the change is committed.
                    self.keys.evict(name);
                    Scope::Key(name.clone())
                }
                StoreChange::Entry(crate::keyring::GRANTS, id) => {
                    // This server's own grant changes come back as hints too, and are
                    // treated alike: evicting its key's grants again costs one read, and
                    // a revocation by a peer is never taken for such an echo.
                    // The key whose cached grants hold it (a scan of the cache: grant
                    // changes are rare). Suspended by evicting them: the next call reads
                    // the key's grants from the store, where the change is committed, and
                    // a read begun before now is not cached (`keyring::cache`).
                    let key = self.grants.find(|list| list.iter().any(|g| g.id == *id));
                    match &key {
                        Some(k) => self.grants.evict(k),
                        None => self.grants.refuse_loads_begun(),
                    }
                    key.map_or(Scope::Nothing, Scope::Key)
                }
                // The seal record is the seal's; other tables are not followed.
                StoreChange::Entry(..) => continue,
            };
            if let Some(resync) = state.unapplied.get_mut(&StoreChange::Resync) {
                // A reload that started before this change does not apply it.
                resync.seq = seq;
                continue;
            }
            state.unapplied.insert(
                change.clone(),
                Unapplied {
                    scope,
                    heard: now,
                    seq,
                    failed: false,
                },
            );
        }
        self.lag.publish_count(&state);
    }

    /// Applies `changes` another server (or this one) committed, and every change still
    /// unapplied from before; `Resync` reloads everything. Returns the changes that failed
    /// and are still unapplied (to try again later; a change heard again while this ran is
    /// the caller's to try anyway). Stops at the first failure of the store (the rest
    /// would fail alike); a failure tied to one key (its HSM object not found) leaves that
    /// key unapplied and goes on. Logs when this server falls behind and when it has caught
    /// up.
    pub(crate) fn follow(&self, changes: &[StoreChange]) -> Vec<StoreChange> {
        self.heard(changes);
        let started = self.lag.seq();
        let todo: Vec<StoreChange> = self.lag.read().unapplied.keys().cloned().collect();
        let mut failures: Vec<(StoreChange, KeyringError)> = Vec::new();
        if todo.contains(&StoreChange::Resync) {
            match self.reload_all() {
                Ok(keys) => {
                    let mut state = self.lag.lock();
                    state.unapplied.retain(|_, u| u.seq >= started);
                    self.lag.publish_count(&state);
                    drop(state);
                    failures = keys;
                }
                Err(e) => failures.push((StoreChange::Resync, e)),
            }
        } else {
            for change in todo {
                let applied = match &change {
                    StoreChange::Entry(crate::keyring::KEYS, name) => {
                        self.reload_key(name).map(|_| ())
                    }
                    StoreChange::Entry(crate::keyring::GRANTS, id) => self.reload_grant(id),
                    _ => Ok(()),
                };
                match applied {
                    Ok(()) => self.lag.applied(&change, started),
                    Err(e @ KeyringError::Store(_)) => {
                        failures.push((change, e));
                        break;
                    }
                    Err(e) => failures.push((change, e)),
                }
            }
        }
        self.settle(failures)
    }

    /// After an application: marks the failures (and, the store failing, everything still
    /// unapplied) as failed, logs the start or the end of a period behind, and returns
    /// the changes that failed and are still unapplied.
    fn settle(&self, failures: Vec<(StoreChange, KeyringError)>) -> Vec<StoreChange> {
        let mut state = self.lag.lock();
        let now = Instant::now();
        let store_failed = failures
            .iter()
            .any(|(_, e)| matches!(e, KeyringError::Store(_)));
        for (change, _) in &failures {
            if let Some(u) = state.unapplied.get_mut(change) {
                u.failed = true;
            } else if let StoreChange::Entry(crate::keyring::KEYS, name) = change {
                // A key a resync could not load.
                let seq = state.next_seq;
                state.next_seq += 1;
                state.unapplied.insert(
                    change.clone(),
                    Unapplied {
                        scope: Scope::Key(name.clone()),
                        heard: now,
                        seq,
                        failed: true,
                    },
                );
            }
        }
        if store_failed {
            for u in state.unapplied.values_mut() {
                u.failed = true;
            }
        }
        self.lag.publish_count(&state);
        let left: Vec<StoreChange> = state
            .unapplied
            .iter()
            .filter(|(_, u)| u.failed)
            .map(|(c, _)| c.clone())
            .collect();
        match (state.behind_since, failures.first()) {
            (None, Some((change, e))) => {
                state.behind_since = Some(now);
                let every = state
                    .unapplied
                    .values()
                    .any(|u| u.scope == Scope::Everything);
                let keys: Vec<&str> = state
                    .unapplied
                    .values()
                    .filter_map(|u| match &u.scope {
                        Scope::Key(k) => Some(k.as_str()),
                        _ => None,
                    })
                    .take(10)
                    .collect();
                tracing::error!(
                    change = ?change,
                    error = %crate::error_chain(e),
                    unapplied = left.len(),
                    refused = if every { "every key" } else { "the keys named" },
                    keys = ?keys,
                    "this server cannot apply another server's change: calls on the keys it concerns are refused (UNAVAILABLE) until it has; retrying"
                );
            }
            (Some(_), Some((change, e))) => {
                tracing::debug!(change = ?change, error = %crate::error_chain(e), unapplied = left.len(), "another server's change still cannot be applied");
            }
            (Some(since), None) if left.is_empty() => {
                state.behind_since = None;
                tracing::info!(
                    behind_ms =
                        u64::try_from(now.duration_since(since).as_millis()).unwrap_or(u64::MAX),
                    "caught up with the shared store: every change other servers made is applied"
                );
            }
            _ => {}
        }
        left
    }

    /// Reads `name`'s record from the store and publishes it (reusing the material of
    /// unchanged versions, their nonce counters included). Returns whether the store has
    /// the key. Serialised with this server's own changes (the admin lock).
    pub(super) fn reload_key(&self, name: &str) -> Result<bool, KeyringError> {
        // This process's lock only: reading what is committed needs no lock across servers.
        let _g = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        self.reload_key_locked(name)
    }

    /// As [`Keyring::reload_key`], the admin lock held by the caller. A change heard of
    /// the key before this read is applied by it.
    pub(super) fn reload_key_locked(&self, name: &str) -> Result<bool, KeyringError> {
        let started = self.lag.seq();
        let Some(bytes) = self.store.get(crate::keyring::KEYS, name)? else {
            self.walk.unschedule(name);
            // Not remembered as absent: on a shared store it may be made at any moment.
            self.keys.evict(name);
            self.lag.applied(
                &StoreChange::Entry(crate::keyring::KEYS, name.to_owned()),
                started,
            );
            return Ok(false);
        };
        self.apply_key_record(name, &bytes)?;
        self.lag.applied(
            &StoreChange::Entry(crate::keyring::KEYS, name.to_owned()),
            started,
        );
        Ok(true)
    }

    /// Checks a stored key record and publishes it (or refuses the key by name when the
    /// record fails authentication). The admin lock is held by the caller.
    fn apply_key_record(&self, name: &str, bytes: &[u8]) -> Result<(), KeyringError> {
        match model::decode(name, bytes, &self.mac_key) {
            Ok(meta) => {
                self.walk.schedule(&meta);
                let old = match self.keys.peek(name) {
                    Some(cache::Cached::Found(e)) => Some(e),
                    _ => None,
                };
                match self.build_entry(meta, old.as_deref()) {
                    Ok(entry) => self
                        .keys
                        .replace(name, cache::Cached::Found(Arc::new(entry))),
                    Err(e) => {
                        self.keys.evict(name);
                        return Err(e);
                    }
                }
                Ok(())
            }
            Err(KeyringError::Tampered(_)) => {
                tracing::error!(key = %name, "key metadata failed authentication: the store was altered; key refused");
                self.walk.unschedule(name);
                self.keys.replace(name, cache::Cached::Tampered);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads grant `id` from the store: its key's cached grants are evicted (read again
    /// at the next call). Missing or failing authentication, it allows nothing here.
    fn reload_grant(&self, id: &str) -> Result<(), KeyringError> {
        let _g = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        let started = self.lag.seq();
        let stored = match self.store.get(crate::keyring::GRANTS, id)? {
            Some(bytes) => grants::decode(id, &bytes, &self.mac_key)?,
            None => None,
        };
        match stored {
            Some(g) => self.grants.evict(&g.key),
            None => {
                // Nothing cached can hold it any more than the store does: a list that
                // does is evicted all the same.
                if let Some(k) = self.grants.find(|list| list.iter().any(|g| g.id == id)) {
                    self.grants.evict(&k);
                }
                tracing::error!(grant = %id, "grant record missing or failed authentication: grant refused");
            }
        }
        self.lag.applied(
            &StoreChange::Entry(crate::keyring::GRANTS, id.to_owned()),
            started,
        );
        Ok(())
    }

    /// Applies everything (after the change feed was interrupted, or overflowed): every
    /// cached key and grant list is forgotten, so each is read again from the store at its
    /// next use, and every key record is read once (authenticated) for the maintenance
    /// schedule. Holds this process's admin lock while it forgets, not while it reads.
    fn reload_all(&self) -> Result<Vec<(StoreChange, KeyringError)>, KeyringError> {
        {
            let _g = self
                .admin
                .lock()
                .map_err(|_| KeyringError::Internal(LOCK))?;
            self.keys.clear();
            self.grants.clear();
        }
        let keys = self.reschedule_all()?;
        tracing::info!(
            keys,
            "keyring reloaded from the shared store: cached keys and grants forgotten"
        );
        Ok(Vec::new())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn key(name: &str) -> StoreChange {
        StoreChange::Entry(crate::keyring::KEYS, name.to_owned())
    }

    fn unapplied(lag: &Lag, change: StoreChange, scope: Scope, failed: bool) {
        let mut state = lag.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.unapplied.insert(
            change,
            Unapplied {
                scope,
                heard: Instant::now(),
                seq,
                failed,
            },
        );
        lag.publish_count(&state);
    }

    #[test]
    fn an_unapplied_change_refuses_its_key_once_failed_or_past_the_grace() {
        let lag = Lag::default();
        assert!(lag.refusal(Some("a")).is_none());
        // Heard a moment ago: within the grace, served.
        unapplied(&lag, key("a"), Scope::Key("a".into()), false);
        assert!(lag.refusal(Some("a")).is_none());
        // Failed: refused at once, that key only.
        lag.lock().unapplied.get_mut(&key("a")).unwrap().failed = true;
        assert!(matches!(lag.refusal(Some("a")), Some(KeyringError::KeyBehind(k)) if k == "a"));
        assert!(lag.refusal(Some("b")).is_none());
        assert!(matches!(
            lag.refusal(None),
            Some(KeyringError::KeyBehind(_))
        ));
        // Past the grace without failing: refused too.
        unapplied(&lag, key("b"), Scope::Key("b".into()), false);
        lag.lock().unapplied.get_mut(&key("b")).unwrap().heard -= APPLY_GRACE * 2;
        assert!(lag.refusal(Some("b")).is_some());
        // A grant not live here refuses nothing; a resync refuses everything.
        let grant = StoreChange::Entry(crate::keyring::GRANTS, "g".into());
        unapplied(&lag, grant, Scope::Nothing, true);
        assert!(lag.refusal(Some("c")).is_none());
        unapplied(&lag, StoreChange::Resync, Scope::Everything, true);
        assert!(matches!(lag.refusal(Some("c")), Some(KeyringError::Behind)));
    }

    #[test]
    fn a_change_heard_again_is_not_applied_by_an_older_read() {
        let lag = Lag::default();
        unapplied(&lag, key("a"), Scope::Key("a".into()), true);
        let started = lag.seq();
        // Heard again while the read that started at `started` runs.
        unapplied(&lag, key("a"), Scope::Key("a".into()), true);
        lag.applied(&key("a"), started);
        assert_eq!(lag.count.load(Ordering::Acquire), 1);
        lag.applied(&key("a"), lag.seq());
        assert_eq!(lag.count.load(Ordering::Acquire), 0);
        assert!(lag.refusal(Some("a")).is_none());
    }
}
