//! The change feed of a shared store: what servers sharing it committed, as hints of what
//! to read again.
//!
//! Any database role that may connect can send a notification on kms's channel, so a
//! notification is never trusted: it names, at most, an entry to read again, and what is
//! read is authenticated by its owner (the keyring's MACs, the seal record's checks). The
//! feed is bounded whatever arrives: hints wait coalesced, one per entry, until the reader
//! takes them all at once; past [`MAX_HINTS`] distinct entries they collapse into one
//! [`Change::Resync`] (read everything again), so a flood costs a fixed amount of memory
//! and at most one reload per batch the reader takes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Change;

/// Distinct entries that wait at most; past it, they collapse into one resync.
pub(crate) const MAX_HINTS: usize = 1024;

/// How often, at most, an overflow is logged.
const OVERFLOW_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What waits for the reader.
#[derive(Default)]
struct State {
    entries: BTreeSet<Change>,
    resync: bool,
    /// The writer (the store's listening task) is gone: nothing more will come.
    writer_gone: bool,
    /// The reader is gone: the writer may stop.
    reader_gone: bool,
    /// When an overflow was last logged.
    logged_overflow: Option<Instant>,
}

impl State {
    fn take(&mut self) -> Vec<Change> {
        if std::mem::take(&mut self.resync) {
            // Everything is read again: the entries add nothing.
            self.entries.clear();
            return vec![Change::Resync];
        }
        std::mem::take(&mut self.entries).into_iter().collect()
    }
}

struct Shared {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few assignments that cannot panic halfway: a poisoned lock
        // still holds a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reading end: [`ChangeFeed::next`] waits for hints and takes every one that waits.
pub struct ChangeFeed {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed").finish_non_exhaustive()
    }
}

/// The writing end, held by the store's listening task (shared with its connection's
/// driver).
pub(crate) struct Hints {
    shared: Arc<Shared>,
}

/// A feed and its writing end.
pub(crate) fn feed() -> (Hints, ChangeFeed) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: tokio::sync::Notify::new(),
    });
    (
        Hints {
            shared: Arc::clone(&shared),
        },
        ChangeFeed { shared },
    )
}

impl Hints {
    /// Adds a hint (coalesced with what waits; past [`MAX_HINTS`] entries, a resync) and
    /// wakes the reader. Never blocks, never grows past the bound.
    pub(crate) fn hint(&self, change: Change) {
        {
            let mut state = self.shared.lock();
            match change {
                Change::Resync => state.resync = true,
                entry if !state.resync => {
                    if state.entries.len() < MAX_HINTS || state.entries.contains(&entry) {
                        state.entries.insert(entry);
                    } else {
                        state.entries.clear();
                        state.resync = true;
                        crate::metrics::metrics().change_feed_overflows.inc();
                        let now = Instant::now();
                        if state
                            .logged_overflow
                            .is_none_or(|t| now.duration_since(t) >= OVERFLOW_LOG_INTERVAL)
                        {
                            state.logged_overflow = Some(now);
                            tracing::warn!(
                                max = MAX_HINTS,
                                "more change notifications wait than the feed holds: reloading everything instead (a flood of NOTIFY kms_changes from some database role?)"
                            );
                        }
                    }
                }
                // A resync waits: it covers this entry.
                _ => {}
            }
        }
        self.shared.wake.notify_one();
    }

    /// Whether the reader is gone (the listening task may stop).
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().reader_gone
    }
}

impl Drop for Hints {
    fn drop(&mut self) {
        self.shared.lock().writer_gone = true;
        self.shared.wake.notify_one();
    }
}

impl ChangeFeed {
    /// Waits until hints wait, and takes them all (a [`Change::Resync`] alone when one
    /// waits); `None` once the writer is gone and nothing waits. Cancel-safe: a hint is
    /// taken only by a call that returns it.
    pub async fn next(&mut self) -> Option<Vec<Change>> {
        loop {
            let woken = self.shared.wake.notified();
            tokio::pin!(woken);
            // Registered before the state is read, so a hint added after the read wakes it.
            woken.as_mut().enable();
            {
                let mut state = self.shared.lock();
                let taken = state.take();
                if !taken.is_empty() {
                    return Some(taken);
                }
                if state.writer_gone {
                    return None;
                }
            }
            woken.await;
        }
    }

    /// The hints waiting now, without waiting (empty when none).
    pub fn try_next(&mut self) -> Vec<Change> {
        self.shared.lock().take()
    }
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::Table;

    fn key(name: &str) -> Change {
        Change::Entry(
            Table::new("keys", crate::store::Follow::Changes),
            name.to_owned(),
        )
    }

    #[test]
    fn hints_are_coalesced_and_a_flood_becomes_one_resync() {
        let (hints, mut feed) = feed();
        assert!(feed.try_next().is_empty());
        for _ in 0..3 {
            hints.hint(key("a"));
            hints.hint(key("b"));
        }
        assert_eq!(feed.try_next(), [key("a"), key("b")]);
        assert!(feed.try_next().is_empty());
        // Up to the bound, every entry waits; one more, and a resync stands for all.
        for i in 0..MAX_HINTS {
            hints.hint(key(&format!("k{i}")));
        }
        hints.hint(key("k0"));
        assert_eq!(feed.try_next().len(), MAX_HINTS);
        for i in 0..=MAX_HINTS {
            hints.hint(key(&format!("k{i}")));
        }
        for i in 0..100_000 {
            hints.hint(key(&format!("flood{i}")));
        }
        assert_eq!(feed.try_next(), [Change::Resync]);
        assert!(feed.shared.lock().entries.is_empty());
        // A resync that waits swallows later entries.
        hints.hint(Change::Resync);
        hints.hint(key("a"));
        assert_eq!(feed.try_next(), [Change::Resync]);
    }

    #[tokio::test]
    async fn the_reader_wakes_for_hints_and_ends_with_the_writer() {
        let (hints, mut feed) = feed();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(batch) = feed.next().await {
                got.extend(batch);
            }
            got
        });
        tokio::task::yield_now().await;
        hints.hint(key("a"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        hints.hint(key("b"));
        assert!(!hints.is_closed());
        drop(hints);
        let got = reader.await.unwrap();
        assert_eq!(got, [key("a"), key("b")]);
        // The writer learns that the reader is gone.
        let (hints, feed) = super::feed();
        drop(feed);
        assert!(hints.is_closed());
    }
}
