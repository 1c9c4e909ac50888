//! The keyring as an engine (`crate::engine::Engine`): opened by the seal at unseal, fed
//! the changes to its tables, maintained by the server's maintenance task.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Keyring;
use crate::store::{Change, Table};

/// How often the first answers kept for retries are swept for expired ones.
const FORGET_REQUESTS_EVERY: Duration = Duration::from_secs(3600);

impl crate::engine::Engine for Keyring {
    fn name(&self) -> &'static str {
        "keyring"
    }

    fn tables(&self) -> &'static [Table] {
        super::TABLES
    }

    fn heard(&self, changes: &[Change]) {
        Keyring::heard(self, changes);
    }

    fn follow(&self, changes: &[Change]) -> Vec<Change> {
        Keyring::follow(self, changes)
    }

    /// Due rotations and destructions, then (at most hourly, the first time at once) the
    /// removal of retries' expired first answers: the sweep waits for the rotations, not
    /// the reverse.
    fn maintain(&self, now: u64) {
        let forget = {
            let mut forgot = self.forgot.lock().unwrap_or_else(|p| p.into_inner());
            let due = forgot.is_none_or(|at| at.elapsed() >= FORGET_REQUESTS_EVERY);
            if due {
                *forgot = Some(Instant::now());
            }
            due
        };
        let (rotated, destroyed) = Keyring::maintain(self, now);
        if rotated + destroyed > 0 {
            tracing::info!(rotated, destroyed, "keyring maintenance");
        }
        if forget {
            match self.forget_requests(super::now().saturating_mul(1000)) {
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "could not remove expired retry answers");
                }
                Ok(n) if n > 0 => tracing::debug!(removed = n, "expired retry answers removed"),
                Ok(_) => {}
            }
        }
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}
