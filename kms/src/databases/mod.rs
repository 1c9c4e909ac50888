//! The databases engine: dynamic PostgreSQL credentials under leases (docs/databases.md),
//! with Vault's database-engine semantics.
//!
//! Connections and roles are an administrator's definitions, sealed by the barrier in the
//! store (a connection holds the root password). Nothing is kept in memory but the pools
//! (`target`): each call reads what it names, so a change made on one server is in force
//! on every other from its commit on.
//!
//! A lease is sealed too (its login's name and the statements that drop it: data an
//! attacker who can write the store must not choose, since revoking runs them). It is
//! stored *before* the login is made, so a server that dies in between leaves a lease
//! whose revocation finds nothing to drop, never a login no lease names. Its entry in the
//! due table (`DUE`, keyed `due/connection/lease id`: in order of when it is due) is what
//! the revoker (`revoker`) reads, a page at a time: memory is bounded by what is due
//! now, not by how many leases there are. Servers sharing a store claim the entries they
//! revoke under the store's change lock; a claim lasts `CLAIM_TTL` (60 s), so an entry of a
//! server killed mid-revocation goes to another.

pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod model;
mod reconcile;
mod revoker;
pub(crate) mod statics;
pub(crate) mod target;

use std::sync::{Arc, Mutex};

pub(crate) use error::DatabasesError;
use model::{Connection, Lease, Role};
use zeroize::Zeroizing;

use crate::audit::{AuditLog, DatabaseSummary};
use crate::barrier::{Barrier, Purpose};
use crate::keyring::now;
use crate::store::{Follow, Removal, Store, Table, Write};

/// Connections, by name.
pub(crate) const CONNECTIONS: Table = Table::new("database_connections", Follow::Never);
/// Roles, by name.
pub(crate) const ROLES: Table = Table::new("database_roles", Follow::Never);
/// Leases, by id.
pub(crate) const LEASES: Table = Table::new("database_leases", Follow::Never);
/// When each live lease is due for revocation: `DUE/CONNECTION/LEASE ID` (due as 12
/// digits), valued with the claim of the server revoking it (empty: none).
pub(crate) const DUE: Table = Table::new("database_due", Follow::Never);
/// Leases marked irrevocable, by id (empty values): listed and counted without reading
/// every lease.
pub(crate) const IRREVOCABLE: Table = Table::new("database_irrevocable", Follow::Never);

/// The login each lease made, by `CONNECTION/USERNAME` (valued with the lease id): the
/// reconcile pass ([`reconcile`]) drops only logins no lease names.
pub(crate) const LOGINS: Table = Table::new("database_logins", Follow::Never);

/// The engine's tables, in the order a backup writes them.
pub(crate) const TABLES: &[Table] = &[
    CONNECTIONS,
    ROLES,
    LEASES,
    DUE,
    IRREVOCABLE,
    LOGINS,
    statics::STATIC_ROLES,
];

/// How long a server's claim on a due lease lasts: longer than a revocation may take
/// (its statements, each bounded by [`target::TIMEOUT`]).
pub(crate) const CLAIM_TTL: u64 = 60;

/// The most leases a call lists, and revokes itself (removing a role or connection).
pub(crate) const MAX_PAGE: usize = 1000;

/// `[databases]`, checked.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The most revocations a server makes per second.
    pub revocations_per_second: u64,
    /// The tries of a revocation the database refuses before its lease is marked
    /// irrevocable (a database that cannot be reached is waited for, not counted).
    pub max_attempts: u32,
    /// The wait after a revocation's first refusal, doubled after each.
    pub retry_seconds: u64,
    /// How often the reconcile pass runs.
    pub reconcile_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            revocations_per_second: 50,
            max_attempts: 10,
            retry_seconds: 5,
            reconcile_seconds: 600,
        }
    }
}

/// How a change commits: its writes in one transaction with its audit record.
pub(crate) trait Journal {
    /// Commits `writes` and `removals` with the record of the call: all or nothing.
    fn commit(
        &self,
        what: DatabaseSummary,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<(), DatabasesError>;
}

/// Who is asking: leases are their holder's, or an administrator's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who<'a> {
    /// The caller's principal.
    pub principal: &'a str,
    /// Whether the caller has the admin role.
    pub admin: bool,
}

/// A login made for a caller.
pub(crate) struct Issued {
    /// Its lease.
    pub lease: Lease,
    /// Its password: shown once, kept nowhere.
    pub password: Zeroizing<String>,
}

/// The databases engine.
pub(crate) struct Databases {
    barrier: Arc<Barrier>,
    store: Arc<dyn Store>,
    audit: AuditLog,
    targets: target::Targets,
    settings: Settings,
    /// This server's name in its claims.
    node: String,
    /// Serialises claims between this server's threads (the store's change lock does
    /// between servers).
    claims: Mutex<()>,
    /// The revoker's wake-up and stop signal.
    revoker: Arc<revoker::Signal>,
    /// Leases marked irrevocable, as the revoker last counted them.
    irrevocable: std::sync::atomic::AtomicUsize,
    /// The key of the mark kms leaves on each login it makes ([`Databases::login_mark`]).
    mark_key: Zeroizing<[u8; 32]>,
}

impl Drop for Databases {
    fn drop(&mut self) {
        self.revoker.stop();
    }
}

/// The key of a lease's entry in the due table.
pub(crate) fn due_key(due: u64, connection: &str, id: &str) -> String {
    format!("{due:012}/{connection}/{id}")
}

/// What a summary of `lease` says.
fn summary_of(lease: &Lease) -> DatabaseSummary {
    DatabaseSummary {
        connection: lease.connection.clone(),
        role: lease.role.clone(),
        lease_id: lease.id.clone(),
        username: lease.username.clone(),
        holder: lease.principal.clone(),
        expires: lease.expires,
        ..DatabaseSummary::default()
    }
}

/// A removal of exactly `key`.
fn removal(table: Table, key: &str) -> Removal {
    Removal {
        table,
        from: key.to_owned(),
        to: key.to_owned(),
    }
}

impl Databases {
    /// Opens the engine and starts its revoker.
    pub(crate) fn open(
        barrier: Arc<Barrier>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        settings: Settings,
    ) -> Result<Arc<Self>, DatabasesError> {
        let node = model::random_text(b"0123456789abcdef", 16)?.to_string();
        let mark_key = barrier
            .derive_key::<32>(None, &[b"kms/v1/databases/login-mark"])
            .map_err(|_| DatabasesError::Internal("derive the login mark key"))?;
        let engine = Arc::new(Self {
            barrier,
            store,
            audit,
            targets: target::Targets::new()?,
            settings,
            node,
            claims: Mutex::new(()),
            revoker: Arc::new(revoker::Signal::default()),
            irrevocable: std::sync::atomic::AtomicUsize::new(0),
            mark_key,
        });
        revoker::start(&engine);
        Ok(engine)
    }

    /// The comment kms sets on a login it makes on `connection`: `kms-lease:` and a MAC of
    /// the connection's and the login's names under a key of the root. The reconcile pass
    /// drops only logins that carry it: never one kms did not make (a mark copied to
    /// another name, or by someone without the root key, is not one).
    pub(crate) fn login_mark(&self, connection: &str, username: &str) -> String {
        use hmac::{Hmac, KeyInit, Mac};
        let Ok(mut mac) = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(self.mark_key.as_slice())
        else {
            return String::new();
        };
        mac.update(&(connection.len() as u64).to_be_bytes());
        mac.update(connection.as_bytes());
        mac.update(username.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "kms-lease:{}",
            data_encoding::HEXLOWER.encode(tag.get(..16).unwrap_or_default())
        )
    }

    /// Leases marked irrevocable, as the revoker last counted them (for the metrics).
    pub(crate) fn irrevocable(&self) -> usize {
        self.irrevocable.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn seal<T: serde::Serialize>(
        &self,
        purpose: Purpose,
        name: &str,
        record: &T,
    ) -> Result<Vec<u8>, DatabasesError> {
        let json = model::encode(record)?;
        self.barrier
            .seal(purpose, name, &json)
            .map_err(|_| DatabasesError::Internal("seal a record"))
    }

    fn read<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        purpose: Purpose,
        name: &str,
    ) -> Result<Option<T>, DatabasesError> {
        let Some(sealed) = self.store.get(table, name)? else {
            return Ok(None);
        };
        self.parse(purpose, name, &sealed).map(Some)
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        purpose: Purpose,
        name: &str,
        sealed: &[u8],
    ) -> Result<T, DatabasesError> {
        let json = self
            .barrier
            .open(purpose, name, sealed)
            .map_err(|_| DatabasesError::Tampered(format!("{} {name}", purpose.name())))?;
        serde_json::from_slice(&json)
            .map_err(|_| DatabasesError::Tampered(format!("{} {name}", purpose.name())))
    }

    fn write<T: serde::Serialize>(
        &self,
        table: Table,
        purpose: Purpose,
        name: &str,
        record: &T,
    ) -> Result<Write, DatabasesError> {
        Ok(Write {
            table,
            key: name.to_owned(),
            value: self.seal(purpose, name, record)?,
        })
    }

    // ---- connections ----

    /// The connection `name`.
    pub(crate) fn connection(&self, name: &str) -> Result<Connection, DatabasesError> {
        model::check_name("connection", name)?;
        self.read(CONNECTIONS, model::CONNECTION, name)?
            .ok_or_else(|| DatabasesError::ConnectionNotFound(name.to_owned()))
    }

    /// Every connection, by name.
    pub(crate) fn connections(&self) -> Result<Vec<Connection>, DatabasesError> {
        self.store
            .scan(CONNECTIONS)?
            .iter()
            .map(|(k, v)| self.parse(model::CONNECTION, k, v))
            .collect()
    }

    /// Creates or replaces a connection; an empty password keeps the stored one. Tried
    /// first unless `skip_verify`.
    pub(crate) fn put_connection(
        &self,
        journal: &dyn Journal,
        mut conn: Connection,
        skip_verify: bool,
        by: &str,
    ) -> Result<Connection, DatabasesError> {
        model::check_name("connection", &conn.name)?;
        let old = self.read::<Connection>(CONNECTIONS, model::CONNECTION, &conn.name)?;
        if conn.plugin.is_empty() {
            conn.plugin = model::POSTGRESQL.to_owned();
        }
        if conn.max_open == 0 {
            conn.max_open = model::DEFAULT_OPEN_CONNECTIONS;
        }
        conn.schema = model::SCHEMA;
        conn.pending_password = None;
        match &old {
            Some(o) => {
                if conn.password.is_empty() {
                    // The stored password goes only where it was given for: a change of
                    // where kms logs in (or of whom it trusts there) needs it again, or an
                    // administrator could point the connection at a server of theirs and
                    // read it.
                    if conn.url != o.url || conn.username != o.username || conn.ca_pem != o.ca_pem {
                        return Err(DatabasesError::BadRequest(
                            "connection_url, username or ca_pem changed: give the root password again (kms sends the stored one only to where it was given for)".to_owned(),
                        ));
                    }
                    conn.password = o.password.clone();
                    // A rotation cut short is still to be finished with its password.
                    conn.pending_password = o.pending_password.clone();
                }
                conn.created_ms = o.created_ms;
                conn.created_by = o.created_by.clone();
                conn.root_rotated = if conn.password.expose() == o.password.expose() {
                    o.root_rotated
                } else {
                    0
                };
            }
            None => {
                conn.created_ms = now().saturating_mul(1000);
                conn.created_by = by.to_owned();
                conn.root_rotated = 0;
            }
        }
        conn.check()?;
        if !skip_verify {
            self.targets.verify(&conn)?;
        }
        let write = self.write(CONNECTIONS, model::CONNECTION, &conn.name, &conn)?;
        journal.commit(
            DatabaseSummary {
                connection: conn.name.clone(),
                ..DatabaseSummary::default()
            },
            vec![write],
            Vec::new(),
        )?;
        Ok(conn)
    }

    /// Sets a new root password that only kms knows. It is stored as pending before the
    /// database is changed, so a server that dies in between still has it.
    pub(crate) fn rotate_root(
        &self,
        journal: &dyn Journal,
        name: &str,
    ) -> Result<Connection, DatabasesError> {
        let conn = self.connection(name)?;
        // A rotation cut short is finished with its own password (the database may have
        // it already), never replaced by another, which would lose it.
        let new = match &conn.pending_password {
            Some(p) => Zeroizing::new(p.expose().to_owned()),
            None => model::new_password(model::DEFAULT_PASSWORD_LENGTH)?,
        };
        let mut pending = conn.clone();
        pending.pending_password = Some(model::Secret::new(new.to_string()));
        self.store.put(
            CONNECTIONS,
            name,
            &self.seal(model::CONNECTION, name, &pending)?,
        )?;
        let statement = Zeroizing::new(format!(
            "ALTER ROLE CURRENT_USER WITH PASSWORD '{}';",
            new.as_str()
        ));
        // Logged in with the current password, or the pending one if the database has it
        // already. On an error the password was not changed (or is not known to be): the
        // pending one stays, tried if the current one is refused, and finished next time.
        self.targets.execute(
            &pending,
            &[statement],
            target::Mode::Transaction,
            &[new.as_str()],
        )?;
        // What an administrator changed meanwhile stays; a connection removed meanwhile is
        // not brought back.
        let mut conn = self.connection(name)?;
        conn.password = model::Secret::new(new.to_string());
        conn.pending_password = None;
        conn.root_rotated = now();
        let write = self.write(CONNECTIONS, model::CONNECTION, name, &conn)?;
        journal.commit(
            DatabaseSummary {
                connection: name.to_owned(),
                ..DatabaseSummary::default()
            },
            vec![write],
            Vec::new(),
        )?;
        self.targets.forget(name);
        Ok(conn)
    }

    /// Removes a connection: refused while leases of it are live, unless `force` (they
    /// are revoked first; the connection stays if one cannot be). Returns the leases
    /// revoked.
    pub(crate) fn delete_connection(
        &self,
        journal: &dyn Journal,
        name: &str,
        force: bool,
    ) -> Result<u64, DatabasesError> {
        let conn = self.connection(name)?;
        let revoked = self.revoke_all(|l| l.connection == conn.name, force, "connection", name)?;
        journal.commit(
            DatabaseSummary {
                connection: name.to_owned(),
                leases: revoked,
                ..DatabaseSummary::default()
            },
            Vec::new(),
            vec![removal(CONNECTIONS, name)],
        )?;
        self.targets.forget(name);
        Ok(revoked)
    }

    // ---- roles ----

    /// The role `name`.
    pub(crate) fn role(&self, name: &str) -> Result<Role, DatabasesError> {
        model::check_name("role", name)?;
        self.read(ROLES, model::ROLE, name)?
            .ok_or_else(|| DatabasesError::RoleNotFound(name.to_owned()))
    }

    /// Every role, by name.
    pub(crate) fn roles(&self) -> Result<Vec<Role>, DatabasesError> {
        self.store
            .scan(ROLES)?
            .iter()
            .map(|(k, v)| self.parse(model::ROLE, k, v))
            .collect()
    }

    /// Creates or replaces a role (its connection must exist and allow it).
    pub(crate) fn put_role(
        &self,
        journal: &dyn Journal,
        mut role: Role,
        by: &str,
    ) -> Result<Role, DatabasesError> {
        model::check_name("role", &role.name)?;
        let old = self.read::<Role>(ROLES, model::ROLE, &role.name)?;
        role.schema = model::SCHEMA;
        if role.max_ttl == 0 {
            role.max_ttl = model::DEFAULT_MAX_TTL;
        }
        if role.default_ttl == 0 {
            role.default_ttl = model::DEFAULT_TTL.min(role.max_ttl);
        }
        if role.username_template.is_empty() {
            role.username_template = model::DEFAULT_USERNAME_TEMPLATE.to_owned();
        }
        if role.password_length == 0 {
            role.password_length = model::DEFAULT_PASSWORD_LENGTH;
        }
        (role.created_ms, role.created_by) = match old {
            Some(o) => (o.created_ms, o.created_by),
            None => (now().saturating_mul(1000), by.to_owned()),
        };
        role.check()?;
        let conn = self.connection(&role.connection)?;
        if !model::role_allowed(&conn.allowed_roles, &role.name) {
            return Err(not_allowed(&conn.name, &role.name));
        }
        let write = self.write(ROLES, model::ROLE, &role.name, &role)?;
        journal.commit(
            DatabaseSummary {
                connection: role.connection.clone(),
                role: role.name.clone(),
                ..DatabaseSummary::default()
            },
            vec![write],
            Vec::new(),
        )?;
        Ok(role)
    }

    /// Removes a role; its live leases as [`Databases::delete_connection`]'s.
    pub(crate) fn delete_role(
        &self,
        journal: &dyn Journal,
        name: &str,
        force: bool,
    ) -> Result<u64, DatabasesError> {
        let role = self.role(name)?;
        let revoked = self.revoke_all(|l| l.role == role.name, force, "role", name)?;
        journal.commit(
            DatabaseSummary {
                connection: role.connection.clone(),
                role: name.to_owned(),
                leases: revoked,
                ..DatabaseSummary::default()
            },
            Vec::new(),
            vec![removal(ROLES, name)],
        )?;
        Ok(revoked)
    }

    // ---- credentials and leases ----

    /// A new login under `role_name` for `principal`, for `ttl` seconds (0: the role's
    /// default). The lease is stored first, then the login made; the call's record is
    /// written last, before the password is returned.
    pub(crate) fn issue(
        &self,
        journal: &dyn Journal,
        principal: &str,
        role_name: &str,
        ttl: u64,
    ) -> Result<Issued, DatabasesError> {
        let role = self.role(role_name)?;
        if !role.principals.iter().any(|p| p.matches(principal)) {
            return Err(DatabasesError::Denied(format!(
                "role {role_name:?} does not name this caller among its principals"
            )));
        }
        let conn = self.connection(&role.connection)?;
        if !model::role_allowed(&conn.allowed_roles, &role.name) {
            return Err(not_allowed(&conn.name, &role.name));
        }
        let ttl = if ttl == 0 { role.default_ttl } else { ttl };
        if ttl > role.max_ttl {
            return Err(DatabasesError::BadRequest(format!(
                "ttl_seconds {ttl} is over role {role_name:?}'s max_ttl_seconds {}",
                role.max_ttl
            )));
        }
        let issued = now();
        let expires = issued.saturating_add(ttl);
        let username = model::username(&role.username_template, &role.name, principal, issued)?;
        let password = model::new_password(role.password_length)?;
        let lease = Lease {
            schema: model::SCHEMA,
            id: model::lease_id(&role.name)?,
            role: role.name.clone(),
            connection: conn.name.clone(),
            username,
            principal: principal.to_owned(),
            issued,
            expires,
            max_expires: issued.saturating_add(role.max_ttl),
            renewed: 0,
            ttl,
            revocation: role.revocation.clone(),
            renew: role.renew.clone(),
            due: expires,
            attempts: 0,
            last_error: String::new(),
            irrevocable: false,
        };
        self.store.write_all(&[
            self.write(LEASES, model::LEASE, &lease.id, &lease)?,
            // Claimed by this server until the login is made: a lease of a second could
            // otherwise be revoked (nothing to drop yet) before its login exists.
            Write {
                table: DUE,
                key: due_key(lease.due, &lease.connection, &lease.id),
                value: revoker::claim_value(&self.node, issued).into_bytes(),
            },
            Write {
                table: LOGINS,
                key: login_key(&lease.connection, &lease.username),
                value: lease.id.clone().into_bytes(),
            },
        ])?;
        let when = model::expiration(expires);
        let mut statements: Vec<Zeroizing<String>> = role
            .creation
            .iter()
            .map(|s| model::render(s, &lease.username, &password, &when))
            .collect();
        // Marked as kms's, in the same transaction (the reconcile pass's proof).
        statements.push(Zeroizing::new(format!(
            "COMMENT ON ROLE \"{}\" IS '{}';",
            lease.username,
            self.login_mark(&conn.name, &lease.username)
        )));
        let made = self.targets.execute(
            &conn,
            &statements,
            target::Mode::Transaction,
            &[password.as_str()],
        );
        if let Err(e) = made {
            // Refused (the transaction rolled back) or unreachable (nothing sent): nothing
            // was made; the lease goes. Lost mid-way: the login may exist; the lease is due
            // now, and its revocation drops it when the database is back.
            self.abandon(
                &lease,
                matches!(
                    e,
                    DatabasesError::Refused(_) | DatabasesError::Unreachable { .. }
                ),
            );
            return Err(e);
        }
        // The record, and the due entry the revoker's from now on, in one commit.
        let released = Write {
            table: DUE,
            key: due_key(lease.due, &lease.connection, &lease.id),
            value: Vec::new(),
        };
        if let Err(e) = journal.commit(summary_of(&lease), vec![released], Vec::new()) {
            self.abandon(&lease, false);
            return Err(e);
        }
        Ok(Issued { lease, password })
    }

    /// Undoes an issuance that failed: the lease removed (`made` false: nothing was made)
    /// or due now (the login may exist).
    fn abandon(&self, lease: &Lease, nothing_made: bool) {
        let done = if nothing_made {
            self.store
                .write_all_removing(&[], &lease_removals(lease))
                .map_err(DatabasesError::from)
        } else {
            self.reschedule(lease, now())
        };
        if let Err(e) = done {
            tracing::warn!(lease = %lease.id, error = %crate::error_chain(&e), "a failed issuance's lease was not undone: it is revoked when it expires");
        }
    }

    /// Moves `lease`'s due entry to `at` (a revocation wanted sooner, or retried later).
    fn reschedule(&self, lease: &Lease, at: u64) -> Result<(), DatabasesError> {
        let old = due_key(lease.due, &lease.connection, &lease.id);
        let mut moved = lease.clone();
        moved.due = at;
        let new = due_key(at, &lease.connection, &lease.id);
        self.store.write_all_removing(
            &[
                self.write(LEASES, model::LEASE, &moved.id, &moved)?,
                Write {
                    table: DUE,
                    key: new.clone(),
                    value: Vec::new(),
                },
            ],
            &if old == new {
                Vec::new()
            } else {
                vec![removal(DUE, &old)]
            },
        )?;
        Ok(())
    }

    /// The lease `id`.
    pub(crate) fn lease(&self, id: &str) -> Result<Lease, DatabasesError> {
        model::check_lease_id(id)?;
        self.read(LEASES, model::LEASE, id)?
            .ok_or_else(|| DatabasesError::LeaseNotFound(id.to_owned()))
    }

    /// The lease `id`, if `who` holds it or administers.
    pub(crate) fn lookup(&self, who: Who<'_>, id: &str) -> Result<Lease, DatabasesError> {
        let lease = self.lease(id)?;
        holder(who, &lease)?;
        Ok(lease)
    }

    /// Extends a lease by `increment` seconds from now (0: its own duration), never past
    /// its `max_expires`.
    pub(crate) fn renew(
        &self,
        journal: &dyn Journal,
        who: Who<'_>,
        id: &str,
        increment: u64,
    ) -> Result<Lease, DatabasesError> {
        let lease = self.lease(id)?;
        holder(who, &lease)?;
        let t = now();
        if lease.irrevocable || lease.expires <= t || lease.due <= t {
            return Err(DatabasesError::Precondition(format!(
                "lease {id:?} has expired: ask for new credentials"
            )));
        }
        let increment = if increment == 0 { lease.ttl } else { increment };
        let expires = t.saturating_add(increment).min(lease.max_expires);
        if expires == lease.expires {
            return Ok(lease);
        }
        let old = due_key(lease.due, &lease.connection, &lease.id);
        if !self.claim(&old, t)? {
            return Err(DatabasesError::Busy(id.to_owned()));
        }
        let conn = self.connection(&lease.connection);
        let when = model::expiration(expires);
        let statements =
            model::rendered(&lease.renew, model::DEFAULT_RENEW, &lease.username, &when);
        let done = conn.and_then(|c| {
            self.targets
                .execute(&c, &statements, target::Mode::Transaction, &[])
        });
        if let Err(e) = done {
            self.release(&old);
            return Err(e);
        }
        let mut renewed = lease.clone();
        renewed.expires = expires;
        renewed.due = expires;
        renewed.renewed = t;
        let new = due_key(expires, &renewed.connection, &renewed.id);
        let committed = journal.commit(
            summary_of(&renewed),
            vec![
                self.write(LEASES, model::LEASE, id, &renewed)?,
                Write {
                    table: DUE,
                    key: new,
                    value: Vec::new(),
                },
            ],
            vec![removal(DUE, &old)],
        );
        if let Err(e) = committed {
            self.release(&old);
            return Err(e);
        }
        Ok(renewed)
    }

    /// Drops a lease's login now. `force` (administrators) drops the record even when the
    /// database refuses: returns whether the login was dropped.
    pub(crate) fn revoke(
        &self,
        journal: &dyn Journal,
        who: Who<'_>,
        id: &str,
        force: bool,
    ) -> Result<bool, DatabasesError> {
        let lease = self.lease(id)?;
        holder(who, &lease)?;
        if force && !who.admin {
            return Err(DatabasesError::Denied(
                "only an administrator may force a revocation".to_owned(),
            ));
        }
        let due = due_key(lease.due, &lease.connection, &lease.id);
        if !lease.irrevocable && !self.claim(&due, now())? {
            return Err(DatabasesError::Busy(id.to_owned()));
        }
        let mut what = summary_of(&lease);
        let dropped = self.drop_login(&lease);
        if let Err(e) = &dropped {
            if !force {
                if !lease.irrevocable {
                    self.release(&due);
                }
                return Err(clone_error(e));
            }
            what.forced = true;
            what.error = e.to_string();
        }
        journal.commit(what, Vec::new(), lease_removals(&lease))?;
        if lease.irrevocable {
            // The metric follows at once (the revoker counts again later).
            let _ = self.irrevocable.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            );
        }
        Ok(dropped.is_ok())
    }

    /// Schedules every live lease whose id starts with `prefix` for revocation now.
    /// Returns how many.
    pub(crate) fn revoke_prefix(
        &self,
        journal: &dyn Journal,
        prefix: &str,
    ) -> Result<u64, DatabasesError> {
        if !prefix.starts_with(model::LEASE_PREFIX)
            || prefix.len() > 200
            || prefix.chars().any(char::is_control)
        {
            return Err(DatabasesError::BadRequest(format!(
                "a lease prefix starts with {} (e.g. database/creds/ROLE/)",
                model::LEASE_PREFIX
            )));
        }
        let t = now();
        let mut scheduled = 0u64;
        self.each_lease(prefix, |lease| {
            if lease.irrevocable || lease.due <= t {
                return Ok(());
            }
            let key = due_key(lease.due, &lease.connection, &lease.id);
            if self.claim(&key, t)? {
                self.reschedule(&lease, t)?;
                scheduled += 1;
            }
            Ok(())
        })?;
        journal.commit(
            DatabaseSummary {
                lease_id: prefix.to_owned(),
                leases: scheduled,
                ..DatabaseSummary::default()
            },
            Vec::new(),
            Vec::new(),
        )?;
        self.revoker.wake();
        Ok(scheduled)
    }

    /// A page of leases whose id starts with `prefix`, from `start` on (or the irrevocable
    /// ones only); and where the next page starts.
    pub(crate) fn list(
        &self,
        prefix: &str,
        start: &str,
        size: usize,
        irrevocable_only: bool,
    ) -> Result<(Vec<Lease>, Option<String>), DatabasesError> {
        if prefix.len() > 256
            || start.len() > 256
            || format!("{prefix}{start}").chars().any(char::is_control)
        {
            return Err(DatabasesError::BadRequest(
                "a lease prefix and a page token are at most 256 printable characters".to_owned(),
            ));
        }
        let size = size.clamp(1, MAX_PAGE);
        let from = if start > prefix { start } else { prefix };
        let table = if irrevocable_only {
            IRREVOCABLE
        } else {
            LEASES
        };
        let page = self.store.range(table, from, size + 1)?;
        let mut out = Vec::with_capacity(size.min(page.len()));
        let mut next = None;
        for (key, value) in page {
            if !key.starts_with(prefix) {
                break;
            }
            if out.len() == size {
                next = Some(key);
                break;
            }
            out.push(if irrevocable_only {
                self.lease(&key)?
            } else {
                self.parse(model::LEASE, &key, &value)?
            });
        }
        Ok((out, next))
    }

    /// How many leases are marked irrevocable (at most `cap` counted).
    fn irrevocable_count(&self, cap: usize) -> Result<usize, DatabasesError> {
        let mut n = 0usize;
        let mut from = String::new();
        loop {
            let page = self.store.range(IRREVOCABLE, &from, MAX_PAGE)?;
            let Some((last, _)) = page.last() else {
                return Ok(n);
            };
            from = format!("{last}\u{0}");
            n += page.len();
            if page.len() < MAX_PAGE || n >= cap {
                return Ok(n.min(cap));
            }
        }
    }

    /// Calls `f` with every lease whose id starts with `prefix`, a page at a time.
    fn each_lease(
        &self,
        prefix: &str,
        mut f: impl FnMut(Lease) -> Result<(), DatabasesError>,
    ) -> Result<(), DatabasesError> {
        let mut from = prefix.to_owned();
        loop {
            let page = self.store.range(LEASES, &from, MAX_PAGE)?;
            let full = page.len() == MAX_PAGE;
            for (key, value) in page {
                if !key.starts_with(prefix) {
                    return Ok(());
                }
                from = format!("{key}\u{0}");
                f(self.parse(model::LEASE, &key, &value)?)?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Revokes every lease `which` selects (removing a role or connection named `name`),
    /// or, without `force`, refuses with their count. Stops at the first that cannot be.
    fn revoke_all(
        &self,
        which: impl Fn(&Lease) -> bool,
        force: bool,
        what: &str,
        name: &str,
    ) -> Result<u64, DatabasesError> {
        // At most MAX_PAGE kept: more are counted only (memory bounded, and the call too).
        let mut live = Vec::new();
        let mut count = 0usize;
        self.each_lease(model::LEASE_PREFIX, |l| {
            if which(&l) {
                count += 1;
                if live.len() < MAX_PAGE {
                    live.push(l);
                }
            }
            Ok(())
        })?;
        if count == 0 {
            return Ok(0);
        }
        if !force {
            return Err(DatabasesError::Precondition(format!(
                "{what} {name:?} has {count} live lease(s): revoke them first, or remove it with force (which revokes them)"
            )));
        }
        if count > MAX_PAGE {
            return Err(DatabasesError::Precondition(format!(
                "{what} {name:?} has {count} live leases, more than a removal revokes itself ({MAX_PAGE}): revoke them by prefix first (kms lease revoke-prefix), then remove it"
            )));
        }
        let mut revoked = 0;
        for lease in live {
            let due = due_key(lease.due, &lease.connection, &lease.id);
            if !lease.irrevocable && !self.claim(&due, now())? {
                return Err(DatabasesError::Busy(lease.id));
            }
            if let Err(e) = self.drop_login(&lease) {
                if !lease.irrevocable {
                    self.release(&due);
                }
                return Err(DatabasesError::Precondition(format!(
                    "{what} {name:?} kept: lease {} could not be revoked ({e}); {revoked} revoked before it",
                    lease.id
                )));
            }
            self.audit_system(
                "RevokeLease",
                summary_of(&lease),
                Vec::new(),
                lease_removals(&lease),
            )?;
            revoked += 1;
        }
        Ok(revoked)
    }

    /// Runs `lease`'s revocation statements (or the default) on its connection.
    fn drop_login(&self, lease: &Lease) -> Result<(), DatabasesError> {
        let conn = self.connection(&lease.connection)?;
        let statements = model::rendered(
            &lease.revocation,
            model::DEFAULT_REVOCATION,
            &lease.username,
            "",
        );
        self.targets
            .execute(&conn, &statements, target::Mode::Each, &[])
    }

    /// Holds the claims still, until the guards drop: against this server's other threads
    /// (a mutex) and every server sharing the store (its change lock).
    fn lock_claims(
        &self,
    ) -> Result<
        (
            std::sync::MutexGuard<'_, ()>,
            Option<crate::store::ChangeLock>,
        ),
        DatabasesError,
    > {
        let local = self
            .claims
            .lock()
            .map_err(|_| DatabasesError::Internal("claims"))?;
        Ok((local, self.store.lock_changes()?))
    }

    /// Claims the due entry `key` for this server: false when another holds it (or it is
    /// gone). A claim that is stale, or further ahead than a claim may be (written by
    /// someone other than a server), is taken over.
    fn claim(&self, key: &str, t: u64) -> Result<bool, DatabasesError> {
        let _held = self.lock_claims()?;
        match self.store.get(DUE, key)? {
            None => Ok(false),
            Some(v) if revoker::held_by_other(&v, &self.node, t) => Ok(false),
            Some(_) => {
                self.store
                    .put(DUE, key, revoker::claim_value(&self.node, t).as_bytes())?;
                Ok(true)
            }
        }
    }

    /// Releases this server's claim on `key` (best effort: a claim lapses by itself).
    fn release(&self, key: &str) {
        if let Ok(Some(v)) = self.store.get(DUE, key)
            && revoker::held_by(&v, &self.node)
        {
            let _ = self.store.put(DUE, key, &[]);
        }
    }

    /// Writes a record of what the server did by itself, with its writes.
    fn audit_system(
        &self,
        operation: &str,
        what: DatabaseSummary,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<(), DatabasesError> {
        let event = crate::audit::AuditEvent {
            database: Some(what),
            ..crate::audit::AuditEvent::internal(
                crate::audit::SYSTEM_PRINCIPAL,
                "kms.internal",
                operation,
            )
        };
        self.audit
            .append_removing(event, writes, removals)
            .map(|_| ())
            .map_err(|_| DatabasesError::AuditUnavailable)
    }
}

/// What removing `lease` removes: its record, its due entry, its irrevocable mark, its
/// login's entry.
fn lease_removals(lease: &Lease) -> Vec<Removal> {
    vec![
        removal(LEASES, &lease.id),
        removal(DUE, &due_key(lease.due, &lease.connection, &lease.id)),
        removal(IRREVOCABLE, &lease.id),
        removal(LOGINS, &login_key(&lease.connection, &lease.username)),
    ]
}

/// The key of a login's entry in [`LOGINS`].
fn login_key(connection: &str, username: &str) -> String {
    format!("{connection}/{username}")
}

/// Refuses `who` unless it holds `lease` or administers.
fn holder(who: Who<'_>, lease: &Lease) -> Result<(), DatabasesError> {
    if who.admin || who.principal == lease.principal {
        Ok(())
    } else {
        // As if it did not exist: a lease id is not a secret, but whose it is is.
        Err(DatabasesError::LeaseNotFound(lease.id.clone()))
    }
}

fn not_allowed(connection: &str, role: &str) -> DatabasesError {
    DatabasesError::Precondition(format!(
        "connection {connection:?} does not allow role {role:?}: add it to the connection's allowed_roles"
    ))
}

/// A copy of an error the database gave (its text is all a caller sees).
fn clone_error(e: &DatabasesError) -> DatabasesError {
    match e {
        DatabasesError::Unavailable { connection, why } => DatabasesError::Unavailable {
            connection: connection.clone(),
            why: why.clone(),
        },
        DatabasesError::Unreachable { connection, why } => DatabasesError::Unreachable {
            connection: connection.clone(),
            why: why.clone(),
        },
        DatabasesError::ConnectionNotFound(c) => DatabasesError::ConnectionNotFound(c.clone()),
        // Its own text, not its `Display`, which would say "the database refused" twice.
        DatabasesError::Refused(why) => DatabasesError::Refused(why.clone()),
        other => DatabasesError::Refused(other.to_string()),
    }
}

impl crate::engine::Engine for Databases {
    fn name(&self) -> &'static str {
        "databases"
    }

    fn tables(&self) -> &'static [Table] {
        TABLES
    }

    // Nothing is kept but pools, made again when their record changes.
    fn heard(&self, _: &[crate::store::Change]) {}

    fn follow(&self, _: &[crate::store::Change]) -> Vec<crate::store::Change> {
        Vec::new()
    }

    // The revoker runs on its own thread, at its own pace.
    fn maintain(&self, _: u64) {}

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the database's refusal reads as the refusal did, once.
    #[test]
    fn a_refusal_copied_says_it_once() {
        let e = DatabasesError::Refused("42501 permission denied".to_owned());
        assert_eq!(
            clone_error(&e).to_string(),
            "the database refused: 42501 permission denied"
        );
        let gone = DatabasesError::ConnectionNotFound("pg".to_owned());
        assert_eq!(clone_error(&gone).to_string(), gone.to_string());
    }
}
