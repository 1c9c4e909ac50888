//! The revoker: a thread per server that revokes what is due, at a bounded rate.
//!
//! Each pass reads the due table from its start (the earliest due first), a page at a
//! time, and claims up to [`BATCH`] entries that are due and not claimed by another
//! server, under the store's change lock. Then, for each: its lease read (authenticated),
//! its revocation run, and on success the lease removed with its record; on a refusal the
//! lease retried after a backoff, and after `max_attempts` refusals marked irrevocable
//! (recorded, logged as an error, counted in a metric). A database that cannot be reached
//! is not a refusal: its connection is left alone for a while (doubling, at most
//! [`DOWN_MOST`]) and its leases wait, unclaimed, however long it takes.
//!
//! The thread holds the engine only while a pass runs: sealing drops the engine, and the
//! thread ends at its next wake-up.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::model::Lease;
use super::{CLAIM_TTL, DUE, Databases, DatabasesError, IRREVOCABLE, LEASES, Write, due_key};
use crate::keyring::now;

/// The most entries a pass claims.
pub(super) const BATCH: usize = 32;
/// The most due-table entries a pass reads looking for ones to claim.
const SCAN_MOST: usize = 4096;
/// How often the revoker looks when nothing was due.
const TICK: Duration = Duration::from_secs(1);
/// The longest wait before a connection that could not be reached is tried again.
const DOWN_MOST: Duration = Duration::from_secs(30);
/// The longest wait between two tries of a refused revocation.
const RETRY_MOST: u64 = 3600;

/// The revoker's wake-up call and stop signal, shared with the engine.
#[derive(Default)]
pub(super) struct Signal {
    state: Mutex<(bool, bool)>,
    bell: Condvar,
}

impl Signal {
    /// Wakes the revoker now (leases were scheduled).
    pub(super) fn wake(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = true;
            self.bell.notify_all();
        }
    }

    /// Ends the revoker (the engine is dropped).
    pub(super) fn stop(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
            self.bell.notify_all();
        }
    }

    /// Waits `at_most`, or until woken; returns false once stopped.
    fn sleep(&self, at_most: Duration) -> bool {
        let Ok(guard) = self.state.lock() else {
            return false;
        };
        let Ok((mut guard, _)) = self
            .bell
            .wait_timeout_while(guard, at_most, |s| !s.0 && !s.1)
        else {
            return false;
        };
        guard.0 = false;
        !guard.1
    }
}

/// A claim's value: `node until`.
pub(super) fn claim_value(node: &str, t: u64) -> String {
    format!("{node} {}", t.saturating_add(CLAIM_TTL))
}

/// Whether `value` is a live claim of a server other than `node` at `t`. A claim that
/// lasts longer than a server would claim, with room for the servers' clocks to differ by
/// up to [`CLAIM_TTL`], is no claim (someone else wrote it).
pub(super) fn held_by_other(value: &[u8], node: &str, t: u64) -> bool {
    let Some((owner, until)) = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.split_once(' '))
    else {
        return false;
    };
    claimed_by_other(owner, until.parse().unwrap_or(0), node, t)
}

/// Whether a claim of `owner` until `until` is a live claim of a server other than `node`
/// at `t` (as [`held_by_other`] reads one).
pub(super) fn claimed_by_other(owner: &str, until: u64, node: &str, t: u64) -> bool {
    owner != node && until > t && until <= t.saturating_add(2 * CLAIM_TTL)
}

/// Whether `value` is `node`'s claim.
pub(super) fn held_by(value: &[u8], node: &str) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.split_once(' '))
        .is_some_and(|(owner, _)| owner == node)
}

/// The due time and connection an entry's key names.
fn parse_key(key: &str) -> Option<(u64, &str)> {
    let (due, rest) = key.split_once('/')?;
    let (connection, _) = rest.split_once('/')?;
    Some((due.parse().ok()?, connection))
}

/// Starts `engine`'s revoker thread.
pub(super) fn start(engine: &Arc<Databases>) {
    let weak = Arc::downgrade(engine);
    let signal = Arc::clone(&engine.revoker);
    let spawned = std::thread::Builder::new()
        .name("kms-db-revoker".into())
        .spawn(move || run(&weak, &signal));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the database lease revoker: expired leases are not revoked until the next unseal");
    }
}

/// Connections that could not be reached: until when they are left alone, and the next
/// wait.
type Down = HashMap<String, (Instant, Duration)>;

/// How many passes between two counts of the irrevocable leases (for the metric).
const COUNT_EVERY: u32 = 15;
/// How many passes between two looks for static roles due for rotation.
const ROTATE_EVERY: u32 = 5;

fn run(weak: &Weak<Databases>, signal: &Signal) {
    let mut down = Down::new();
    let mut passes = 0u32;
    let mut reconciled = Instant::now();
    loop {
        let busy = match weak.upgrade() {
            Some(engine) => match engine.pass(&mut down) {
                Ok(n) => n == BATCH,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "the lease revoker could not read what is due: it tries again");
                    false
                }
            },
            None => return,
        };
        if passes.is_multiple_of(COUNT_EVERY)
            && let Some(engine) = weak.upgrade()
        {
            engine.count_irrevocable();
        }
        if passes.is_multiple_of(ROTATE_EVERY)
            && let Some(engine) = weak.upgrade()
            && let Err(e) = engine.rotate_due()
        {
            tracing::warn!(error = %crate::error_chain(&e), "static roles were not read for their rotations: tried again");
        }
        passes = passes.wrapping_add(1);
        if let Some(engine) = weak.upgrade()
            && reconciled.elapsed() >= Duration::from_secs(engine.settings.reconcile_seconds)
        {
            reconciled = Instant::now();
            match engine.reconcile() {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(dropped = n, "reconcile pass: logins no lease names dropped")
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "the reconcile pass failed: it tries again");
                }
            }
        }
        let wait = if busy { Duration::ZERO } else { TICK };
        if !signal.sleep(wait) {
            return;
        }
    }
}

impl Databases {
    /// Counts the irrevocable leases again (bounded), for the metric.
    fn count_irrevocable(&self) {
        match self.irrevocable_count(1_000_000) {
            Ok(n) => self
                .irrevocable
                .store(n, std::sync::atomic::Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(&e), "irrevocable leases not counted")
            }
        }
    }

    /// One pass: claims what is due and revokes it, paced. Returns how many it claimed.
    fn pass(&self, down: &mut Down) -> Result<usize, DatabasesError> {
        let t = now();
        let clock = Instant::now();
        down.retain(|_, (until, _)| *until > clock);
        let claimed = self.claim_due(t, down)?;
        let pace = Duration::from_secs(1)
            .checked_div(u32::try_from(self.settings.revocations_per_second).unwrap_or(u32::MAX))
            .unwrap_or(Duration::ZERO);
        let n = claimed.len();
        for (key, connection) in claimed {
            let started = Instant::now();
            if down.contains_key(&connection) {
                // Its connection failed earlier in this pass: left for later, unclaimed.
                self.release(&key);
                continue;
            }
            if let Err(e) = self.expire(&key, t) {
                if let DatabasesError::Unavailable { .. } | DatabasesError::Unreachable { .. } = e {
                    let wait = down
                        .get(&connection)
                        .map_or(Duration::from_secs(1), |(_, w)| (*w * 2).min(DOWN_MOST));
                    tracing::warn!(connection = %connection, retry_in_s = wait.as_secs(), error = %e, "expired leases wait: their database cannot be reached");
                    down.insert(connection, (Instant::now() + wait, wait));
                } else {
                    tracing::warn!(entry = %key, error = %crate::error_chain(&e), "an expired lease was not revoked: it is tried again");
                }
                self.release(&key);
            }
            if let Some(rest) = pace.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        Ok(n)
    }

    /// Claims up to [`BATCH`] due entries not claimed by another server, of connections
    /// not `down`: their keys and connections.
    fn claim_due(&self, t: u64, down: &Down) -> Result<Vec<(String, String)>, DatabasesError> {
        let _held = self.lock_claims()?;
        let mut claimed = Vec::new();
        let mut writes = Vec::new();
        let mut from = String::new();
        let mut scanned = 0;
        'pages: while scanned < SCAN_MOST {
            let page = self.store.range(DUE, &from, 256)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            from = format!("{last}\0");
            let full = page.len() == 256;
            for (key, value) in page {
                scanned += 1;
                let Some((due, connection)) = parse_key(&key) else {
                    continue;
                };
                if due > t {
                    break 'pages;
                }
                if down.contains_key(connection) || held_by_other(&value, &self.node, t) {
                    continue;
                }
                claimed.push((key.clone(), connection.to_owned()));
                writes.push(Write {
                    table: DUE,
                    key,
                    value: claim_value(&self.node, t).into_bytes(),
                });
                if claimed.len() == BATCH {
                    break 'pages;
                }
            }
            if !full {
                break;
            }
        }
        if !writes.is_empty() {
            self.store.write_all(&writes)?;
        }
        Ok(claimed)
    }

    /// Revokes the lease of the due entry `key` (claimed by this server).
    fn expire(&self, key: &str, t: u64) -> Result<(), DatabasesError> {
        let id = key.splitn(3, '/').nth(2).unwrap_or_default();
        let lease: Lease = match self.read(LEASES, super::model::LEASE, id) {
            Ok(Some(l)) => l,
            Ok(None) => {
                // An entry whose lease is gone (revoked meanwhile): nothing to do.
                self.store
                    .write_all_removing(&[], &[super::removal(DUE, key)])?;
                return Ok(());
            }
            // Not authentic: nothing is run on its word. The claim lapses; logged again.
            Err(e) => return Err(e),
        };
        if due_key(lease.due, &lease.connection, &lease.id) != key || lease.irrevocable {
            // A stale entry (the lease was renewed or marked since): its own entry stays.
            self.store
                .write_all_removing(&[], &[super::removal(DUE, key)])?;
            return Ok(());
        }
        // The batch's claim may be old by now: made fresh, if still this server's.
        if !self.reclaim(key)? {
            return Ok(());
        }
        match self.drop_login(&lease) {
            Ok(()) => {
                // Still ours? (A claim lasts longer than a revocation may take.)
                let ours = self
                    .store
                    .get(DUE, key)?
                    .is_some_and(|v| super::revoker::held_by(&v, &self.node));
                if ours {
                    self.audit_system(
                        "RevokeExpiredLease",
                        super::summary_of(&lease),
                        Vec::new(),
                        super::lease_removals(&lease),
                    )?;
                }
                Ok(())
            }
            Err(e @ (DatabasesError::Unavailable { .. } | DatabasesError::Unreachable { .. })) => {
                Err(e)
            }
            Err(e) => self.refused(lease, key, t, &e),
        }
    }

    /// Renews this server's claim on `key` for another [`CLAIM_TTL`]: false when it is no
    /// longer this server's (it lapsed and another took it, or the entry is gone).
    fn reclaim(&self, key: &str) -> Result<bool, DatabasesError> {
        let _held = self.lock_claims()?;
        match self.store.get(DUE, key)? {
            Some(v) if held_by(&v, &self.node) => {
                self.store
                    .put(DUE, key, claim_value(&self.node, now()).as_bytes())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A revocation the database refused: tried again after a backoff, or, after
    /// `max_attempts`, the lease marked irrevocable.
    fn refused(
        &self,
        mut lease: Lease,
        key: &str,
        t: u64,
        e: &DatabasesError,
    ) -> Result<(), DatabasesError> {
        lease.attempts = lease.attempts.saturating_add(1);
        lease.last_error = e.to_string();
        if lease.attempts >= self.settings.max_attempts {
            lease.irrevocable = true;
            tracing::error!(lease = %lease.id, username = %lease.username, attempts = lease.attempts, error = %e, "a lease is irrevocable: its login may still exist; drop it by hand, then `kms lease revoke --force`");
            let what = crate::audit::DatabaseSummary {
                forced: true,
                error: lease.last_error.clone(),
                ..super::summary_of(&lease)
            };
            self.irrevocable
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.audit_system(
                "MarkLeaseIrrevocable",
                what,
                vec![
                    self.write(LEASES, super::model::LEASE, &lease.id, &lease)?,
                    Write {
                        table: IRREVOCABLE,
                        key: lease.id.clone(),
                        value: Vec::new(),
                    },
                ],
                vec![super::removal(DUE, key)],
            );
        }
        let shift = lease.attempts.saturating_sub(1).min(20);
        let wait = self
            .settings
            .retry_seconds
            .saturating_mul(1u64 << shift)
            .min(RETRY_MOST);
        tracing::warn!(lease = %lease.id, attempts = lease.attempts, retry_in_s = wait, error = %e, "the database refused a lease's revocation: it is tried again");
        self.reschedule(&lease, t.saturating_add(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_lapse_and_forged_ones_count_for_nothing() {
        let t = 1_000;
        let mine = claim_value("a", t);
        assert!(held_by(mine.as_bytes(), "a"));
        assert!(!held_by_other(mine.as_bytes(), "a", t));
        assert!(held_by_other(mine.as_bytes(), "b", t));
        // Lapsed.
        assert!(!held_by_other(mine.as_bytes(), "b", t + CLAIM_TTL));
        // Another server's clock a little ahead: still its claim.
        let ahead = format!("x {}", t + CLAIM_TTL + 30);
        assert!(held_by_other(ahead.as_bytes(), "b", t));
        // Further ahead than any server claims: written by someone else.
        let forged = format!("x {}", t + 2 * CLAIM_TTL + 1);
        assert!(!held_by_other(forged.as_bytes(), "b", t));
        for junk in [&b""[..], b"x", b"x y", &[0xff, 0x20, 0x31]] {
            assert!(!held_by_other(junk, "b", t));
        }
    }

    #[test]
    fn entries_order_by_when_they_are_due() {
        let a = due_key(99, "db", "database/creds/r/x");
        let b = due_key(100, "db", "database/creds/r/a");
        assert!(a < b);
        assert_eq!(parse_key(&a), Some((99, "db")));
        assert_eq!(parse_key("junk"), None);
    }
}
