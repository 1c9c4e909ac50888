//! The engines' side of the seal: publishing the engines opened at unseal, and routing
//! the changes other servers commit to each engine by the tables they name (kept while no
//! engine is published, for the next ones).

use super::{Opened, SealManager};

impl SealManager {
    /// Publishes the engines (or their absence) to [`SealManager::keyring`] and
    /// [`SealManager::engines`]. New engines first hear every change heard while none was
    /// published (see [`SealManager::heard`]): the keys they concern are refused until the
    /// follow task, which holds them as unapplied, has applied them.
    pub(super) fn publish(&self, engines: Option<Opened>) {
        let mut heard = self
            .heard_unpublished
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(opened) = &engines
            && !heard.is_empty()
        {
            let heard = std::mem::take(&mut *heard);
            for engine in &opened.all {
                engine.heard(&crate::engine::routed(engine.tables(), &heard));
            }
        }
        *self.published.write().unwrap_or_else(|p| p.into_inner()) = engines;
    }

    /// Notes changes other servers made as heard, at once: by each published engine, the
    /// changes to its tables (see `keyring::follow`), or, while none is, kept for the next
    /// ones (a change to the keyring committed while an unseal loads it must not be lost).
    pub(crate) fn heard(&self, changes: &[crate::store::Change]) {
        use crate::store::Change;
        let mut heard = self
            .heard_unpublished
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match self.published() {
            Some(opened) => {
                for engine in &opened.all {
                    engine.heard(&crate::engine::routed(engine.tables(), changes));
                }
            }
            None => {
                for change in changes {
                    if matches!(change, Change::Entry(crate::store::SYSTEM, _))
                        || heard.contains(change)
                    {
                        continue;
                    }
                    if heard.len() >= crate::store::MAX_HINTS || *change == Change::Resync {
                        *heard = vec![Change::Resync];
                    } else if heard.first() != Some(&Change::Resync) {
                        heard.push(change.clone());
                    }
                }
            }
        }
    }

    /// Applies what servers sharing the store committed: the seal record, keys, grants
    /// (with every change the keyring still has unapplied). Returns the changes still
    /// unapplied, for the caller to try again later; the keyring refuses the keys they
    /// concern meanwhile (`keyring::follow`). Changes to the keyring heard while no keyring
    /// is published are kept for the next one and returned as unapplied.
    pub(crate) fn follow(&self, changes: &[crate::store::Change]) -> Vec<crate::store::Change> {
        use crate::store::Change;
        let seal_changes: Vec<Change> = changes
            .iter()
            .filter(|c| matches!(c, Change::Resync | Change::Entry(crate::store::SYSTEM, _)))
            .cloned()
            .collect();
        let mut left = Vec::new();
        if !seal_changes.is_empty()
            && let Err(e) = self.adopt_record()
        {
            tracing::error!(error = %crate::error_chain(&e), "cannot take up the seal record another server committed: retrying");
            left = seal_changes;
        }
        match self.published() {
            Some(opened) => {
                for engine in &opened.all {
                    left.extend(engine.follow(&crate::engine::routed(engine.tables(), changes)));
                }
            }
            None => {
                // No keyring to apply them to: kept for the next one (it hears them before
                // it is published) and left unapplied, for the follow task to apply once
                // one is.
                self.heard(changes);
                left.extend(
                    changes
                        .iter()
                        .filter(|c| !matches!(c, Change::Entry(crate::store::SYSTEM, _)))
                        .cloned(),
                );
            }
        }
        left
    }
}
