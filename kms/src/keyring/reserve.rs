//! Nonce-budget reservations in groups, on a store only this server writes.
//!
//! An AES-GCM version reserves its message count in the store in blocks before it uses
//! them (`Keyring::take_nonce_budget`), one durable write each. A version prepared at its
//! first use since the unseal reserves at its first encryption, so many keys used for the
//! first time at once meant one fsync after another. Here the reservations that wait
//! together are committed together: the first caller becomes the leader, takes every
//! reservation queued, reads each counter, and writes all their new ends in one durable
//! transaction (`Store::write_all`); the others wait for its answer. Each range is still
//! durable before it is used, and two ranges of one counter never overlap: reservations are
//! read and written by one leader at a time, and this process is the store's only writer.
//! On a shared store every reservation is `Store::reserve`, atomic across servers.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{KeyringError, Store, Write};

/// One reservation: its counter, how many more, the most the counter may reach.
struct Ask {
    id: u64,
    key: String,
    want: u64,
    max: u64,
}

#[derive(Default)]
struct State {
    next_id: u64,
    queue: Vec<Ask>,
    /// Whether a leader is committing a group now.
    busy: bool,
    /// Answers for waiting callers, by id: the range, or `None` if their group failed (the
    /// caller then reserves alone, and gets the store's own error).
    answers: HashMap<u64, Option<(u64, u64)>>,
}

/// The group committer of reservations (see the module).
#[derive(Default)]
pub(super) struct Reservations {
    state: Mutex<State>,
    done: Condvar,
}

impl Reservations {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a few assignments that cannot panic halfway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves up to `want` more of counter `key` (table `COUNTERS`), never past `max`:
    /// the range `[start, end)`, durable, as `Store::reserve` answers.
    pub(super) fn reserve(
        &self,
        store: &dyn Store,
        key: &str,
        want: u64,
        max: u64,
    ) -> Result<(u64, u64), KeyringError> {
        if store.shared() {
            return Ok(store.reserve(super::COUNTERS, key, want, max)?);
        }
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.queue.push(Ask {
            id,
            key: key.to_owned(),
            want,
            max,
        });
        loop {
            if let Some(answer) = st.answers.remove(&id) {
                drop(st);
                match answer {
                    Some(range) => return Ok(range),
                    // Its group failed: ask again, through the committer (never beside
                    // it: a reservation made outside it could overlap one it makes).
                    None => {
                        st = self.lock();
                        st.queue.push(Ask {
                            id,
                            key: key.to_owned(),
                            want,
                            max,
                        });
                        continue;
                    }
                }
            }
            if !st.busy {
                st.busy = true;
                let group = std::mem::take(&mut st.queue);
                drop(st);
                // A leader that panics must not leave every later reservation waiting.
                let leading = Leading(
                    self,
                    group.iter().map(|a| a.id).filter(|&a| a != id).collect(),
                );
                let committed = commit(store, &group);
                std::mem::forget(leading);
                st = self.lock();
                st.busy = false;
                let mut mine = None;
                match committed {
                    Ok(ranges) => {
                        for (ask, range) in group.iter().zip(ranges) {
                            if ask.id == id {
                                mine = Some(range);
                            } else {
                                st.answers.insert(ask.id, Some(range));
                            }
                        }
                    }
                    Err(e) => {
                        for ask in group.iter().filter(|a| a.id != id) {
                            st.answers.insert(ask.id, None);
                        }
                        self.done.notify_all();
                        return Err(e);
                    }
                }
                self.done.notify_all();
                if let Some(range) = mine {
                    return Ok(range);
                }
                // This caller's ask was queued after the group was taken: lead again.
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Held by a leader while it commits: if it unwinds, the committer is free again and the
/// waiters are told to ask again.
struct Leading<'a>(&'a Reservations, Vec<u64>);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.busy = false;
        for id in self.1.drain(..) {
            st.answers.insert(id, None);
        }
        self.0.done.notify_all();
    }
}

/// Reads each counter of `group`, gives each ask its range in order, and writes every
/// counter's new end in one durable transaction.
fn commit(store: &dyn Store, group: &[Ask]) -> Result<Vec<(u64, u64)>, KeyringError> {
    let mut ends: HashMap<&str, u64> = HashMap::new();
    let mut ranges = Vec::with_capacity(group.len());
    for ask in group {
        let start = match ends.get(ask.key.as_str()) {
            Some(&end) => end,
            None => store
                .get(super::COUNTERS, &ask.key)?
                .map_or(0, |b| crate::store::count_of(&b)),
        };
        let end = start.saturating_add(ask.want).min(ask.max).max(start);
        ends.insert(&ask.key, end);
        ranges.push((start, end));
    }
    let writes: Vec<Write> = ends
        .into_iter()
        .map(|(key, end)| Write {
            table: super::COUNTERS,
            key: key.to_owned(),
            value: end.to_be_bytes().to_vec(),
        })
        .collect();
    store.write_all(&writes)?;
    Ok(ranges)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Many threads reserving from a few counters at once: every range is what
    /// `Store::reserve` would have given, no two of one counter overlap, nothing exceeds
    /// the bound, and the stored ends are the sums.
    #[test]
    fn grouped_reservations_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(&dir.path().join("kms.redb")).unwrap();
        let r = Reservations::default();
        let ranges: Vec<(usize, (u64, u64))> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|t| {
                    let (r, store) = (&r, &store);
                    s.spawn(move || {
                        (0..20)
                            .map(|_| {
                                (
                                    t % 3,
                                    r.reserve(store, &format!("k{}/1", t % 3), 5, 200).unwrap(),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        for k in 0..3 {
            let mut mine: Vec<(u64, u64)> = ranges
                .iter()
                .filter(|(c, _)| *c == k)
                .map(|(_, r)| *r)
                .collect();
            mine.sort_unstable();
            let mut at = 0;
            for (start, end) in &mine {
                assert_eq!(*start, at);
                assert!(*end <= 200 && *end >= *start);
                at = *end;
            }
            let stored = store
                .get(crate::keyring::COUNTERS, &format!("k{k}/1"))
                .unwrap();
            assert_eq!(stored.map(|b| crate::store::count_of(&b)), Some(at));
        }
    }
}
