//! `/v1/sys/leases/...`: Vault's lease paths over the leases of the databases engine (the
//! only engine of kms that hands out leased secrets), each the engine's operation of the
//! same rule and record as its gRPC twin: a lease is its holder's to renew, look up and
//! revoke (or an administrator's); revoking by prefix and listing are an administrator's
//! (Vault's `sudo`). docs/vault-database.md has the table.

use http::Method;
use serde_json::{Value, json};

use super::Answer;
use super::call::{LeaseInfo, OnDatabase, Refused, Reply};
use super::database::{self, Handled, MAX_LISTED, Request, no_content};
use super::vault::{self, Params};
use crate::databases::model::{LEASE_PREFIX, Lease};
use crate::databases::{Databases, DatabasesError, MAX_PAGE};
use crate::keyring::now;
use crate::service::{Call, ErrorKind, Op, ServiceError};

/// What a path of `sys/leases` and its method ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// `PUT renew[/:lease_id]`.
    Renew,
    /// `PUT revoke[/:lease_id]`.
    Revoke,
    /// `PUT revoke-prefix/:prefix`.
    RevokePrefix,
    /// `PUT revoke-force/:prefix`: as `revoke-prefix`, dropping the leases the database
    /// refuses to revoke.
    RevokeForce,
    /// `PUT lookup`.
    Lookup,
    /// `LIST lookup/:prefix`.
    List,
}

impl Path {
    /// The service layer's operation.
    pub(crate) fn op(self) -> Op {
        match self {
            Self::Renew => Op::RenewLease,
            Self::Revoke => Op::RevokeLease,
            Self::RevokePrefix | Self::RevokeForce => Op::RevokeLeasePrefix,
            Self::Lookup => Op::LookupLease,
            Self::List => Op::ListLeases,
        }
    }

    /// The call's operation and the lease (or prefix) its record names: the body's
    /// `lease_id` first, as Vault reads it, else the path's.
    pub(crate) fn on(self, given: &str, params: &mut Params) -> OnDatabase {
        let lease = match self {
            Self::Renew | Self::Revoke | Self::Lookup => params
                .str("lease_id")
                .ok()
                .flatten()
                .unwrap_or_else(|| given.to_owned()),
            Self::RevokePrefix | Self::RevokeForce => given.to_owned(),
            Self::List => String::new(),
        };
        OnDatabase {
            op: self.op(),
            connection: String::new(),
            role: String::new(),
            lease,
        }
    }
}

/// What a request on `sys/leases/` asks (`segments`: its path after it), and the lease id
/// or prefix its path names (`""`: none).
pub(crate) fn route(
    method: &Method,
    segments: &[&str],
    list: bool,
) -> Result<(Path, String), Refused> {
    let write = *method == Method::POST || *method == Method::PUT;
    let list = *method == Method::GET && list;
    let (path, rest): (Option<Path>, &[&str]) = match segments {
        ["renew", rest @ ..] => (write.then_some(Path::Renew), rest),
        ["revoke", rest @ ..] => (write.then_some(Path::Revoke), rest),
        ["revoke-prefix", rest @ ..] if !rest.is_empty() => {
            (write.then_some(Path::RevokePrefix), rest)
        }
        ["revoke-force", rest @ ..] if !rest.is_empty() => {
            (write.then_some(Path::RevokeForce), rest)
        }
        ["lookup"] if write => (Some(Path::Lookup), &[]),
        ["lookup", rest @ ..] => (list.then_some(Path::List), rest),
        ["tidy"] | ["count"] | [] => {
            return Err(Refused::bad(
                "this lease path is not offered by kms: list leases with LIST sys/leases/lookup/:prefix; irrevocable ones with kms.v1.Databases/ListLeases (irrevocable_only)",
            ));
        }
        _ => return Err(super::not_found()),
    };
    match path {
        Some(p) => Ok((p, rest.join("/"))),
        None => Err(super::method_not_allowed()),
    }
}

/// Serves a request that [`route`] read.
pub(crate) async fn serve(req: Request<'_>, path: Path, given: String) -> Result<Answer, Refused> {
    let mut req = req;
    let on = path.on(&given, &mut req.params);
    let lease = on.lease.clone();
    database::run(req, &on, path == Path::List, move |db, c, p| match path {
        Path::Renew => renew(db, c, &lease, p),
        Path::Revoke => {
            // Vault queues a revocation unless `sync`; kms revokes at once, which answers
            // both.
            let _sync = p.bool("sync")?;
            let id = required(&lease)?;
            match db.revoke(c, c.database_who(), id, false) {
                Ok(_) => Ok((no_content(), None)),
                // Vault's answer to a lease it does not know: nothing to revoke.
                Err(DatabasesError::LeaseNotFound(_)) => {
                    Ok((no_content(), Some(ErrorKind::NotFound)))
                }
                Err(e) => Err(e.into()),
            }
        }
        Path::RevokePrefix | Path::RevokeForce => {
            let force = path == Path::RevokeForce;
            if let Some(named) = p.str("prefix")?
                && named.trim_end_matches('/') != lease.trim_end_matches('/')
            {
                return Err(bad("prefix: the body names another prefix than the path"));
            }
            let sync = p.bool("sync")?.unwrap_or(true);
            let prefix = prefix_of(db, &lease);
            if sync || force {
                revoke_each(db, c, &prefix, force)?;
            } else {
                db.revoke_prefix(c, &prefix)?;
            }
            Ok((no_content(), None))
        }
        Path::Lookup => {
            let id = required(&lease)?;
            let l = db.lookup(c.database_who(), id)?;
            Ok((Reply::ok(&lookup_json(&l, now())), None))
        }
        Path::List => {
            let mut prefix = given.clone();
            if !prefix.is_empty() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            let keys = list_keys(db, &prefix)?;
            if keys.is_empty() {
                return Err(DatabasesError::LeaseNotFound(String::new()).into());
            }
            Ok((Reply::ok(&json!({ "keys": keys })), None))
        }
    })
    .await
}

fn bad(message: &str) -> ServiceError {
    DatabasesError::BadRequest(message.to_owned()).into()
}

/// The lease id, which Vault requires.
fn required(id: &str) -> Result<&str, ServiceError> {
    if id.is_empty() {
        return Err(bad("lease_id: required"));
    }
    Ok(id)
}

/// `PUT renew`: the lease extended by `increment` (seconds or a duration; none: its own
/// duration) from now, never past its role's max_ttl; Vault's envelope with the lease and
/// no data.
fn renew(db: &Databases, c: &Call, id: &str, p: &mut Params) -> Handled {
    let id = required(id)?;
    let increment = p.seconds("increment")?.unwrap_or(0);
    let l = db.renew(c, c.database_who(), id, increment)?;
    let reply = Reply::ok(&Value::Null).leased(LeaseInfo {
        id: l.id.clone(),
        duration: l.expires.saturating_sub(now()),
        renewable: renewable(&l),
    });
    Ok((reply, None))
}

fn renewable(l: &Lease) -> bool {
    !l.irrevocable && l.expires < l.max_expires
}

/// Vault's lease lookup: `id`, `issue_time`, `expire_time`, `last_renewal` (`null` before
/// the first), `renewable`, `ttl` (seconds left), times in RFC 3339 (UTC).
fn lookup_json(l: &Lease, t: u64) -> Value {
    let time = |secs: u64| vault::rfc3339(secs.saturating_mul(1000), false);
    json!({
        "id": l.id,
        "issue_time": time(l.issued),
        "expire_time": time(l.expires),
        "last_renewal": if l.renewed == 0 { Value::Null } else { json!(time(l.renewed)) },
        "renewable": renewable(l),
        "ttl": l.expires.saturating_sub(t),
    })
}

/// The prefix a revocation by prefix means, as Vault reads it: a lease id names that lease
/// (ids have one length, so no other starts with it); anything else is a path, a `/` added
/// (`database/creds/r` is `database/creds/r/`, never `database/creds/reader/`); a path
/// above every lease's (`database/`) is every lease's.
fn prefix_of(db: &Databases, given: &str) -> String {
    if given.is_empty() {
        return String::new();
    }
    if !given.ends_with('/') && db.lease(given).is_ok() {
        return given.to_owned();
    }
    let mut path = given.to_owned();
    if !path.ends_with('/') {
        path.push('/');
    }
    if LEASE_PREFIX.starts_with(&path) {
        return LEASE_PREFIX.to_owned();
    }
    path
}

/// The most leases a synchronous revocation by prefix revokes in its call.
const SYNC_MOST: usize = 1000;

/// Revokes every lease under `prefix` now, in this call (each revocation its own record),
/// up to [`SYNC_MOST`] (the rest are scheduled for the revokers, or, forced, refused):
/// Vault's synchronous revocation by prefix. `force` (`revoke-force`) drops the leases the
/// database refuses to revoke too. Stops at the first that cannot be revoked otherwise.
fn revoke_each(db: &Databases, c: &Call, prefix: &str, force: bool) -> Result<(), ServiceError> {
    if !prefix.starts_with(LEASE_PREFIX) {
        // The engine's own refusal, which says what a prefix is.
        db.revoke_prefix(c, prefix)?;
        return Ok(());
    }
    let who = c.database_who();
    let mut start = String::new();
    let mut done = 0usize;
    loop {
        let (page, next) = db.list(prefix, &start, MAX_PAGE, false)?;
        if done >= SYNC_MOST && !page.is_empty() {
            // Bounded: the rest go to the servers' revokers (at their rate), or, forced,
            // to the caller's next call.
            if force {
                return Err(super::database::bad(format!(
                    "revoke-force drops at most {SYNC_MOST} leases a call: {SYNC_MOST} were dropped, call again for the rest"
                )));
            }
            db.revoke_prefix(c, prefix)?;
            return Ok(());
        }
        done += page.len();
        for lease in &page {
            match db.revoke(c, who, &lease.id, force) {
                Ok(_) | Err(DatabasesError::LeaseNotFound(_)) => {}
                // The revoker holds it: it is being dropped now.
                Err(DatabasesError::Busy(_)) if force => {}
                Err(e) => return Err(e.into()),
            }
        }
        match next {
            Some(n) => start = n,
            None => return Ok(()),
        }
    }
}

/// The keys of `LIST lookup/:prefix`, one level down as Vault lists them: the lease ids'
/// next segment, with a `/` for a folder (`database/` at the top, then `creds/`, then each
/// role's name, then its leases' ids). A folder is listed once and skipped over, so a
/// listing reads as many pages as it has keys, not as there are leases below.
fn list_keys(db: &Databases, prefix: &str) -> Result<Vec<String>, DatabasesError> {
    let mut keys: Vec<String> = Vec::new();
    let mut start = String::new();
    while keys.len() < MAX_LISTED {
        let (page, next) = db.list(prefix, &start, MAX_PAGE, false)?;
        let mut skip = None;
        for lease in &page {
            let rest = lease.id.strip_prefix(prefix).unwrap_or(&lease.id);
            match rest.split_once('/') {
                Some((folder, _)) => {
                    keys.push(format!("{folder}/"));
                    // `0` follows `/`: the first id past the folder's.
                    skip = Some(format!("{prefix}{folder}0"));
                    break;
                }
                None => keys.push(rest.to_owned()),
            }
        }
        match (skip, next) {
            (Some(s), _) => start = s,
            (None, Some(n)) => start = n,
            (None, None) => break,
        }
    }
    keys.truncate(MAX_LISTED);
    Ok(keys)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_their_operations() {
        let r = |m: &str, segs: &[&str], list: bool| {
            route(&Method::from_bytes(m.as_bytes()).unwrap(), segs, list)
                .map(|(p, n)| (p.op(), n))
                .map_err(|r| r.status.as_u16())
        };
        assert_eq!(
            r("PUT", &["renew"], false),
            Ok((Op::RenewLease, String::new()))
        );
        assert_eq!(
            r("PUT", &["revoke", "database", "creds", "r", "abc"], false),
            Ok((Op::RevokeLease, "database/creds/r/abc".into()))
        );
        assert_eq!(
            r("POST", &["revoke-prefix", "database", "creds"], false),
            Ok((Op::RevokeLeasePrefix, "database/creds".into()))
        );
        assert_eq!(
            r("PUT", &["revoke-force", "database"], false),
            Ok((Op::RevokeLeasePrefix, "database".into()))
        );
        assert_eq!(
            r("PUT", &["lookup"], false),
            Ok((Op::LookupLease, String::new()))
        );
        assert_eq!(
            r("GET", &["lookup", "database", "creds"], true),
            Ok((Op::ListLeases, "database/creds".into()))
        );
        assert_eq!(
            r("GET", &["lookup"], true),
            Ok((Op::ListLeases, String::new()))
        );
        assert_eq!(r("GET", &["lookup"], false), Err(405));
        assert_eq!(r("GET", &["renew"], false), Err(405));
        assert_eq!(r("PUT", &["revoke-prefix"], false), Err(404));
        assert_eq!(r("PUT", &["tidy"], false), Err(400));
        assert_eq!(r("PUT", &["nothing"], false), Err(404));
    }

    #[test]
    fn a_lookup_reads_as_vaults() {
        let lease = Lease {
            schema: 1,
            id: "database/creds/r/abc".into(),
            role: "r".into(),
            connection: "pg".into(),
            username: "u".into(),
            principal: "p".into(),
            issued: 1_700_000_000,
            expires: 1_700_003_600,
            max_expires: 1_700_086_400,
            renewed: 0,
            ttl: 3600,
            revocation: vec![],
            renew: vec![],
            due: 1_700_003_600,
            attempts: 0,
            last_error: String::new(),
            irrevocable: false,
        };
        let v = lookup_json(&lease, 1_700_000_600);
        assert_eq!(v["issue_time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["expire_time"], "2023-11-14T23:13:20Z");
        assert_eq!(v["last_renewal"], Value::Null);
        assert_eq!(v["ttl"], 3000);
        assert_eq!(v["renewable"], true);
        let renewed = Lease {
            renewed: 1_700_000_060,
            expires: 1_700_086_400,
            ..lease
        };
        let v = lookup_json(&renewed, 1_700_000_600);
        assert_eq!(v["last_renewal"], "2023-11-14T22:14:20Z");
        assert_eq!(v["renewable"], false);
    }
}
