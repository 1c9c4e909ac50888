//! The report's database credentials: what each principal did under each role of each
//! connection (logins issued, renewed, revoked, refused), what the server did to their
//! leases by itself, and the logins the reconcile pass found that no lease named.
//!
//! Counted per row key only, never per lease: a period of a million issuances costs what
//! its distinct (connection, role, principal) triples cost. The server's own revocations
//! (`RevokeExpiredLease`, `MarkLeaseIrrevocable`, and `RevokeLease` while a role or
//! connection is removed with force) are counted under the lease's holder, which their
//! records name (`holder`); a record that names none is counted under `kms`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Span;
use crate::audit::AuditEvent;

/// The service name of what the server does by itself.
const INTERNAL_SERVICE: &str = "kms.internal";

/// How a lease id (and a lease prefix) starts: `database/creds/ROLE/...`. (The databases
/// engine's `LEASE_PREFIX`, repeated: the audit log imports no engine.)
const LEASE_PREFIX: &str = "database/creds/";

/// The most characters of an error text a row keeps.
const MAX_ERROR_CHARS: usize = 200;

/// One principal's database logins under one role of one connection in the period, and
/// what became of their leases: the row an auditor reads ("which principal got logins for
/// which role, how many, were any left behind").
///
/// What the server did by itself (`expired`, `irrevocable`) is on the lease holder's row
/// (on the principal `kms`'s for records that do not name the holder). A lease it could
/// not revoke (`irrevocable`), or whose record an administrator dropped without its login
/// (`forced`), may have left a login behind in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseRow {
    /// The connection (empty when the record names none: an issuance refused before its
    /// role was read, a revocation by prefix).
    pub connection: String,
    /// The role, as the caller named it (empty: a prefix naming no whole role).
    pub role: String,
    /// Who called (`kms` for the server's own revocations).
    pub principal: String,
    /// Logins made (`GetDatabaseCredentials` answered).
    pub issued: u64,
    /// Leases extended (`RenewLease` answered).
    pub renewed: u64,
    /// Logins dropped at the holder's or an administrator's request (`RevokeLease`), or,
    /// under `kms`, while a role or connection was removed with force.
    pub revoked: u64,
    /// Logins the server dropped when their lease was due (expired, or scheduled by a
    /// revocation by prefix).
    pub expired: u64,
    /// Leases an administrator dropped with force although the database refused to drop
    /// their login: the login may remain.
    pub forced: u64,
    /// Leases marked irrevocable after the database refused every try: the login may
    /// remain until someone drops it by hand.
    pub irrevocable: u64,
    /// Leases a revocation by prefix (`RevokeLeasePrefix`) scheduled for revocation now;
    /// their logins' drops then count as `expired` under `kms`.
    pub scheduled: u64,
    /// Issuances refused or failed, by outcome (e.g. `PERMISSION_DENIED`).
    pub refused: Vec<OutcomeCount>,
    /// The error of the last forced revocation or irrevocable mark (the database's words,
    /// bounded; empty: none).
    pub last_error: String,
    /// The row's records, the first and the last.
    #[serde(flatten)]
    pub span: Span,
}

impl DatabaseRow {
    /// Issuances refused or failed, whatever the outcome.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|r| r.count).sum()
    }
}

/// How many calls had one outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCount {
    /// The gRPC code name, e.g. `PERMISSION_DENIED`.
    pub outcome: String,
    /// How many.
    pub count: u64,
}

/// Logins of one role on one connection that the reconcile pass dropped because no lease
/// named them (`DropOrphanLogin`): logins left behind, found and removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanLoginRow {
    /// The connection.
    pub connection: String,
    /// The role whose username template the login's name fits.
    pub role: String,
    /// How many were dropped, the first and the last.
    #[serde(flatten)]
    pub span: Span,
}

/// A row's counts while the report is built.
#[derive(Debug, Default)]
struct Counts {
    issued: u64,
    renewed: u64,
    revoked: u64,
    expired: u64,
    forced: u64,
    irrevocable: u64,
    scheduled: u64,
    /// Outcome -> refusals (gRPC code names: a handful at most).
    refused: BTreeMap<String, u64>,
    last_error: String,
    span: Span,
}

/// (connection, role, principal).
type RowKey = (String, String, String);

/// The database rows of a report, counted one record at a time.
#[derive(Debug, Default)]
pub(super) struct DatabaseTally {
    rows: BTreeMap<RowKey, Counts>,
    /// (connection, role) -> logins dropped.
    orphans: BTreeMap<(String, String), Span>,
}

/// What one record counts for.
enum Counted {
    Issued,
    Refused,
    Renewed,
    Revoked,
    Forced,
    Expired,
    Irrevocable,
    Scheduled(u64),
    Orphan,
}

/// What `e` counts for, if anything (lookups, lists and administration count for nothing
/// here).
fn counted(e: &AuditEvent, forced: bool, leases: u64) -> Option<Counted> {
    let ok = e.outcome == "OK";
    if e.service == INTERNAL_SERVICE {
        if !ok {
            return None;
        }
        return match e.operation.as_str() {
            "RevokeExpiredLease" => Some(Counted::Expired),
            "MarkLeaseIrrevocable" => Some(Counted::Irrevocable),
            "RevokeLease" if forced => Some(Counted::Forced),
            "RevokeLease" => Some(Counted::Revoked),
            "DropOrphanLogin" => Some(Counted::Orphan),
            _ => None,
        };
    }
    match (e.operation.as_str(), ok) {
        ("GetDatabaseCredentials", true) => Some(Counted::Issued),
        ("GetDatabaseCredentials", false) => Some(Counted::Refused),
        ("RenewLease", true) => Some(Counted::Renewed),
        ("RevokeLease", true) if forced => Some(Counted::Forced),
        ("RevokeLease", true) => Some(Counted::Revoked),
        ("RevokeLeasePrefix", true) => Some(Counted::Scheduled(leases)),
        _ => None,
    }
}

/// The role a lease id or prefix names whole (`database/creds/ROLE/...`), if any.
fn role_of_prefix(prefix: &str) -> Option<&str> {
    let (role, _) = prefix.strip_prefix(LEASE_PREFIX)?.split_once('/')?;
    Some(role).filter(|r| !r.is_empty())
}

/// At most [`MAX_ERROR_CHARS`] of `text`.
fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((end, _)) => format!("{}...", text.get(..end).unwrap_or_default()),
        None => text.to_owned(),
    }
}

impl DatabaseTally {
    /// Counts `e` if it is a databases engine's record that the section shows.
    pub(super) fn add(&mut self, e: &AuditEvent) {
        let Some(d) = &e.database else {
            return;
        };
        let Some(what) = counted(e, d.forced, d.leases) else {
            return;
        };
        let t = e.time_ms;
        if let Counted::Orphan = what {
            self.orphans
                .entry((d.connection.clone(), d.role.clone()))
                .or_default()
                .add(1, t);
            return;
        }
        // A revocation by prefix names no role but in its prefix.
        let role = if d.role.is_empty() {
            role_of_prefix(&d.lease_id).unwrap_or_default()
        } else {
            d.role.as_str()
        };
        // What the server did to a lease by itself goes on its holder's row when the record
        // names the holder (records of before did not: they stay on kms's row).
        let principal = if e.principal == crate::audit::SYSTEM_PRINCIPAL && !d.holder.is_empty() {
            d.holder.clone()
        } else {
            e.principal.clone()
        };
        let row = self
            .rows
            .entry((d.connection.clone(), role.to_owned(), principal))
            .or_default();
        row.span.add(1, t);
        match what {
            Counted::Issued => row.issued += 1,
            Counted::Refused => *row.refused.entry(e.outcome.clone()).or_default() += 1,
            Counted::Renewed => row.renewed += 1,
            Counted::Revoked => row.revoked += 1,
            Counted::Expired => row.expired += 1,
            Counted::Scheduled(n) => row.scheduled += n,
            Counted::Forced => row.forced += 1,
            Counted::Irrevocable => row.irrevocable += 1,
            Counted::Orphan => {}
        }
        if d.forced && !d.error.is_empty() {
            row.last_error = bounded(&d.error);
        }
    }

    /// How many rows it holds (what its memory grows with).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.rows.len() + self.orphans.len()
    }

    /// The rows, by connection, role and principal; the orphan logins, by connection and
    /// role.
    pub(super) fn finish(self) -> (Vec<DatabaseRow>, Vec<OrphanLoginRow>) {
        let rows = self
            .rows
            .into_iter()
            .map(|((connection, role, principal), c)| DatabaseRow {
                connection,
                role,
                principal,
                issued: c.issued,
                renewed: c.renewed,
                revoked: c.revoked,
                expired: c.expired,
                forced: c.forced,
                irrevocable: c.irrevocable,
                scheduled: c.scheduled,
                refused: c
                    .refused
                    .into_iter()
                    .map(|(outcome, count)| OutcomeCount { outcome, count })
                    .collect(),
                last_error: c.last_error,
                span: c.span,
            })
            .collect();
        let orphans = self
            .orphans
            .into_iter()
            .map(|((connection, role), span)| OrphanLoginRow {
                connection,
                role,
                span,
            })
            .collect();
        (rows, orphans)
    }
}
