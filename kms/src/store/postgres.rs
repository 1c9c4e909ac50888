//! The shared store: PostgreSQL, so that several servers use one keyring (docs/operations.md).
//!
//! One table per [`Table`] (`kms_` + its name: `key text COLLATE "C"` primary key, so keys
//! order by their bytes as in redb, and `value bytea`). The schema is created and migrated
//! at start-up under an advisory lock, and refused when the database is newer than the
//! binary. Every session runs with `synchronous_commit = on`, whatever the server's default:
//! a commit is durable (on the primary, and on the synchronous standbys the operator names)
//! before the call that made it is answered.
//!
//! The [`Store`] trait is blocking and is called from blocking threads, the audit writer's
//! thread and, rarely, an async worker (a nonce reservation). So the client runs on a
//! runtime of its own (one thread, `kms-postgres`) and a call waits for its answer on a
//! channel: it works from any thread, and a database that does not answer costs a bounded
//! wait (`timeout`), never a hang.
//!
//! A timeout never leaves anything behind. Every session runs with `lock_timeout` set to
//! `timeout`, so a statement that waits for a lock (another server's, or a lock someone
//! holds on kms's tables or advisory locks) is ended by the server itself, with its
//! transaction; the cross-server locks are transaction-level, so they end with their
//! transaction or their connection, whatever happens to the client. A call the client
//! gives up on (its own bound, twice `timeout`) has its statement cancelled and its
//! connection closed ([`Conn`]): no connection goes back to the pool with a statement still
//! running, a transaction open or a lock held. (No `statement_timeout`: cancelling a
//! commit that waits for a synchronous standby makes PostgreSQL report it committed, an
//! acknowledgement the standby never gave.)
//!
//! Notifications are hints, never data: anyone who can connect may send one. They are
//! parsed strictly, coalesced and bounded ([`super::ChangeFeed`]).

use super::feed::{ChangeFeed, Hints};
use super::{Change, ChangeLock, DatabaseRefusal, Removal, Store, StoreError, Table, Write};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Where a secret (the database password) comes from: never the URL, never an argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the server process.
    Env(String),
    /// A file readable by the server's user only (mode 0600).
    File(PathBuf),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

impl SecretSource {
    /// Reads the secret; errors name the source, never the value.
    fn read(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
        let bad = |why: &str| StoreError::Settings(format!("the database password's {self} {why}"));
        let mut bytes = match self {
            Self::Env(var) => match std::env::var_os(var) {
                Some(v) => zeroize::Zeroizing::new(v.into_encoded_bytes()),
                None => return Err(bad("is not set")),
            },
            Self::File(path) => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(path).map_err(|_| bad("cannot be read"))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(bad("is readable by group or others: chmod 600 it"));
                }
                zeroize::Zeroizing::new(std::fs::read(path).map_err(|_| bad("cannot be read"))?)
            }
        };
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(bad("is empty"));
        }
        Ok(bytes)
    }
}

/// `[storage]` with `backend = "postgres"`, checked by the configuration loader.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgresql://user@host:port/db?sslmode=...`, without a password.
    pub url: String,
    /// Where the password comes from, if the server asks for one.
    pub password: Option<SecretSource>,
    /// The CA bundle (PEM) that the database's certificate must chain to: TLS is then
    /// required. Without it the URL must say `sslmode=disable`.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool.
    pub connections: usize,
    /// How long a call waits for a connection or an answer before it fails (`UNAVAILABLE`).
    pub timeout: Duration,
}

/// The schema migrations, in order; a database records which it has. A table is no
/// migration: every registered table is created at open if missing ([`create_tables`]);
/// these stay so that a database of before reads as it always did.
const MIGRATIONS: &[&str] = &[
    // 1: one key-value table per store table.
    "CREATE TABLE kms_system (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE kms_keys (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE kms_grants (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE kms_counters (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE kms_audit (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE kms_audit_checkpoints (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);",
    // 2: the first answers to changes made with a caller's request id (retries).
    "CREATE TABLE kms_requests (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);",
];

/// The newest schema version this binary knows.
pub(crate) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The advisory lock that serialises migrations between servers starting together.
const MIGRATION_LOCK: i64 = 0x6b6d_735f_6d69_6772; // "kms_migr"

/// The notification channel of changes (`TABLE:KEY` payloads).
const CHANNEL: &str = "kms_changes";

/// The longest entry key a notification may name (a key name has at most 128 characters,
/// a grant id 32).
const MAX_HINT_KEY: usize = 128;

/// The advisory lock that serialises keyring changes between servers.
const CHANGE_LOCK: i64 = 0x6b6d_735f_6368_6e67; // "kms_chng"

/// The advisory lock that serialises appends to the audit chain between servers.
const APPEND_LOCK: i64 = 0x6b6d_735f_6175_6474; // "kms_audt"

/// The PostgreSQL store.
pub struct PgStore {
    /// The client's own runtime; shut down in the background on drop (the last reference
    /// may be dropped on an async worker, where blocking is not allowed).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Db,
    timeout: Duration,
    /// The change feed, until the server takes it.
    changes: std::sync::Mutex<Option<ChangeFeed>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn db(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| database_error(op, e)
}

/// `e` as a [`StoreError`]: a refusal of kms's role (credentials, `pg_hba.conf`, a
/// privilege, a missing database) says so and what to do; anything else is the database
/// being unavailable.
fn database_error(op: &'static str, e: tokio_postgres::Error) -> StoreError {
    match refusal(&e) {
        Some(refusal) => StoreError::DatabaseRefused {
            op,
            refusal,
            source: Box::new(e),
        },
        None => StoreError::Database {
            op,
            source: Box::new(e),
        },
    }
}

/// The refusal an error's SQLSTATE names, if it is one.
fn refusal(e: &tokio_postgres::Error) -> Option<DatabaseRefusal> {
    use tokio_postgres::error::SqlState;
    let code = e.code()?;
    if *code == SqlState::INVALID_PASSWORD {
        Some(DatabaseRefusal::Authentication)
    } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        Some(DatabaseRefusal::NotAllowed)
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        Some(DatabaseRefusal::PermissionDenied)
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        Some(DatabaseRefusal::NoDatabase)
    } else {
        None
    }
}

fn table_name(table: Table) -> String {
    format!("kms_{}", table.name())
}

impl PgSettings {
    /// The client configuration: the URL, the password, the session settings kms needs.
    fn client_config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|_| StoreError::Settings("url is not a PostgreSQL connection URL".into()))?;
        if config.get_password().is_some() {
            return Err(StoreError::Settings(
                "url holds a password: name its source with password_env or password_file instead"
                    .into(),
            ));
        }
        match (&self.ca_file, config.get_ssl_mode()) {
            (None, tokio_postgres::config::SslMode::Disable) => {}
            (None, _) => {
                return Err(StoreError::Settings(
                    "the database connection is not verified: set ca_file (TLS, the server's certificate checked) or say sslmode=disable in the url (a trusted local network)".into(),
                ));
            }
            (Some(_), tokio_postgres::config::SslMode::Disable) => {
                return Err(StoreError::Settings(
                    "ca_file is set but the url says sslmode=disable".into(),
                ));
            }
            (Some(_), _) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
            }
        }
        if let Some(source) = &self.password {
            config.password(source.read()?.as_slice());
        }
        // Durable commits whatever the server's default; lock waits ended by the server
        // after `timeout` (see the module's documentation); never a session ended for
        // idling in a transaction (the change lock's transaction idles while the change is
        // made: ending it would let another server's change interleave); a name in
        // pg_stat_activity.
        let lock_timeout = self.timeout.as_millis().clamp(1, i32::MAX as u128);
        let ours = format!(
            "-c synchronous_commit=on -c lock_timeout={lock_timeout} -c idle_in_transaction_session_timeout=0"
        );
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {ours}"),
            _ => ours,
        };
        config.options(options);
        config.application_name("kms");
        config.connect_timeout(self.timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.tcp_user_timeout(self.timeout);
        Ok(config)
    }

    /// The TLS client configuration: rustls trusting the configured CA only, or none.
    fn tls(&self) -> Result<Option<tokio_rustls::rustls::ClientConfig>, StoreError> {
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        use rustls_pki_types::pem::PemObject;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|_| {
                StoreError::Settings(format!(
                    "ca_file {} holds no readable PEM certificate",
                    ca.display()
                ))
            })?;
        for cert in certs {
            roots.add(cert).map_err(|_| {
                StoreError::Settings(format!(
                    "ca_file {}: a certificate is not a usable CA",
                    ca.display()
                ))
            })?;
        }
        let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|_| StoreError::Settings("TLS protocol versions".into()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Some(tls))
    }

    /// The pool's connection manager, with `tls` when a CA is configured.
    fn manager(
        &self,
        config: tokio_postgres::Config,
        tls: Option<tokio_rustls::rustls::ClientConfig>,
    ) -> deadpool_postgres::Manager {
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        match tls {
            None => deadpool_postgres::Manager::from_config(
                config,
                tokio_postgres::NoTls,
                manager_config,
            ),
            Some(tls) => deadpool_postgres::Manager::from_config(
                config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config,
            ),
        }
    }
}

/// Listens on [`CHANNEL`] over a connection of its own and adds each notification to the
/// feed as a hint, forever (until the feed's reader is gone). When the connection is lost,
/// it reconnects every second, and then hints [`Change::Resync`]: what was committed
/// meanwhile was not heard.
async fn follow<T>(config: tokio_postgres::Config, tls: T, hints: Hints, tables: &'static [Table])
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let hints = Arc::new(hints);
    let mut heard_before = false;
    let mut warned = false;
    while !hints.is_closed() {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                // Drives the connection and hands each notification over at once: nothing
                // queues here, whatever the rate (the feed coalesces and bounds).
                let driver = tokio::spawn({
                    let hints = Arc::clone(&hints);
                    async move {
                        while let Some(Ok(message)) =
                            std::future::poll_fn(|cx| connection.poll_message(cx)).await
                        {
                            if let tokio_postgres::AsyncMessage::Notification(n) = message
                                && n.channel() == CHANNEL
                                && let Some(change) = parse_change(tables, n.payload())
                            {
                                hints.hint(change);
                            }
                            if hints.is_closed() {
                                break;
                            }
                        }
                    }
                });
                if client.batch_execute("LISTEN kms_changes").await.is_ok() {
                    if heard_before || warned {
                        tracing::info!("following the database's changes again");
                        hints.hint(Change::Resync);
                    }
                    heard_before = true;
                    warned = false;
                    // Until the connection is lost.
                    let _ = driver.await;
                } else {
                    driver.abort();
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot follow the database's changes: retrying every second; other servers' changes reach this one when it returns");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `TABLE:KEY` -> the entry to read again, for a table of `tables` servers follow; anything
/// else (another table, an empty, long or non-ASCII key) is ignored. A hint, never data.
fn parse_change(tables: &[Table], payload: &str) -> Option<Change> {
    let (table, key) = payload.split_once(':')?;
    let table = tables
        .iter()
        .copied()
        .find(|t| t.followed() && t.name() == table)?;
    let fits = (1..=MAX_HINT_KEY).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    fits.then(|| Change::Entry(table, key.to_owned()))
}

impl PgStore {
    /// Connects, and creates or migrates the schema, with a `kms_<name>` table for each of
    /// `tables` (`crate::engines::tables`). Fails when the database cannot be reached,
    /// refuses the credentials, or is newer than this binary.
    pub fn connect(settings: &PgSettings, tables: &'static [Table]) -> Result<Self, StoreError> {
        let config = settings.client_config()?;
        let tls = settings.tls()?;
        let manager = settings.manager(config.clone(), tls.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kms-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database {
                op: "start the database client",
                source: Box::new(e),
            })?;
        let pool = {
            let _enter = runtime.enter();
            deadpool_postgres::Pool::builder(manager)
                .max_size(settings.connections)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(settings.timeout))
                .create_timeout(Some(settings.timeout))
                .recycle_timeout(Some(settings.timeout))
                .build()
                .map_err(|e| StoreError::Database {
                    op: "make the connection pool",
                    source: Box::new(e),
                })?
        };
        let (hints, changes) = super::feed::feed();
        let limit = settings.timeout;
        let cancel: Cancel = match tls {
            None => {
                runtime.spawn(follow(config, tokio_postgres::NoTls, hints, tables));
                Arc::new(move |token| {
                    Box::pin(async move {
                        let _ =
                            tokio::time::timeout(limit, token.cancel_query(tokio_postgres::NoTls))
                                .await;
                    })
                })
            }
            Some(tls) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
                runtime.spawn(follow(config, make.clone(), hints, tables));
                Arc::new(move |token| {
                    let make = make.clone();
                    Box::pin(async move {
                        let _ = tokio::time::timeout(limit, token.cancel_query(make)).await;
                    })
                })
            }
        };
        let store = Self {
            runtime: Some(runtime),
            pool: Db { pool, cancel },
            timeout: settings.timeout,
            changes: std::sync::Mutex::new(Some(changes)),
        };
        store.block("migrate the schema", move |pool| async move {
            let mut conn = get(&pool, "migrate the schema").await?;
            let client = conn.client("migrate the schema")?;
            migrate(client, tables).await
        })?;
        Ok(store)
    }

    /// The client's runtime (gone only while the store is dropped).
    fn runtime(&self) -> Result<&tokio::runtime::Runtime, StoreError> {
        self.runtime
            .as_ref()
            .ok_or_else(|| StoreError::Settings("the database client is stopped".into()))
    }

    /// Runs `work` on the client's runtime and waits for it, at most `timeout` (plus the
    /// time to get a connection, itself bounded).
    fn block<T, F, Fut>(&self, op: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Db) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let runtime = self.runtime()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = work(self.pool.clone());
        // The pool waits `timeout` for a connection; the statement gets as long again.
        let limit = self.timeout.saturating_mul(2);
        runtime.spawn(async move {
            let _ = tx.send(bounded(limit, op, fut).await);
        });
        rx.recv().map_err(|_| StoreError::Database {
            op,
            source: "the database client stopped".into(),
        })?
    }

    /// One transaction of `writes` and `removals`.
    fn commit(
        &self,
        op: &'static str,
        writes: &[Write],
        removals: &[Removal],
    ) -> Result<(), StoreError> {
        let rows = Rows::of(writes, removals);
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let tx = client.transaction().await.map_err(db(op))?;
            rows.write(&tx, op).await?;
            tx.commit().await.map_err(db(op))
        })
    }
}

/// What one transaction writes, by table (one statement each; the last write of a key wins,
/// since an upsert may not touch a row twice), what it removes, and what it announces.
struct Rows {
    by_table: BTreeMap<&'static str, (Table, BTreeMap<String, Vec<u8>>)>,
    removals: Vec<Removal>,
    /// What the other servers follow: keys, grants, the seal record (not the audit log or
    /// the counters, which they read when they need them).
    followed: Vec<String>,
}

impl Rows {
    fn of(writes: &[Write], removals: &[Removal]) -> Self {
        let mut by_table: BTreeMap<&'static str, (Table, BTreeMap<String, Vec<u8>>)> =
            BTreeMap::new();
        for w in writes {
            by_table
                .entry(w.table.name())
                .or_insert_with(|| (w.table, BTreeMap::new()))
                .1
                .insert(w.key.clone(), w.value.clone());
        }
        let followed = writes
            .iter()
            .filter(|w| w.table.followed())
            .map(|w| format!("{}:{}", w.table.name(), w.key))
            .collect();
        Self {
            by_table,
            removals: removals.to_vec(),
            followed,
        }
    }

    async fn write(
        self,
        tx: &deadpool_postgres::Transaction<'_>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        for (table, entries) in self.by_table.into_values() {
            let (keys, values): (Vec<String>, Vec<Vec<u8>>) = entries.into_iter().unzip();
            let sql = format!(
                "INSERT INTO {} (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                table_name(table)
            );
            let stmt = tx.prepare_cached(&sql).await.map_err(db(op))?;
            tx.execute(&stmt, &[&keys, &values]).await.map_err(db(op))?;
        }
        if !self.followed.is_empty() {
            // Delivered to every listening server when (and only if) this commits.
            let stmt = tx
                .prepare_cached("SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x")
                .await
                .map_err(db(op))?;
            tx.execute(&stmt, &[&CHANNEL, &self.followed])
                .await
                .map_err(db(op))?;
        }
        for r in self.removals {
            let sql = format!(
                "DELETE FROM {} WHERE key >= $1 AND key <= $2",
                table_name(r.table)
            );
            let stmt = tx.prepare_cached(&sql).await.map_err(db(op))?;
            tx.execute(&stmt, &[&r.from, &r.to]).await.map_err(db(op))?;
        }
        Ok(())
    }
}

/// Asks the server to stop what a connection runs (`CancelToken::cancel_query` with the
/// store's TLS), within the store's timeout.
type Cancel = Arc<
    dyn Fn(tokio_postgres::CancelToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

/// The pool, and how to cancel a statement on one of its connections.
#[derive(Clone)]
struct Db {
    pool: deadpool_postgres::Pool,
    cancel: Cancel,
}

thread_local! {
    /// Set while [`bounded`] drops a call it gave up on: a [`Conn`] dropped then is
    /// closed, not returned to the pool.
    static ABANDONING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A connection of the pool, returned to it when dropped, except when dropped with a call
/// given up on ([`bounded`]) or [`Conn::discard`]ed: then the server is asked to cancel
/// what it runs, and the connection is closed. Another call never gets a connection with a
/// statement still running, a transaction open or a lock taken.
struct Conn {
    object: Option<deadpool_postgres::Object>,
    cancel: Cancel,
}

impl Conn {
    /// The client (present until the connection is closed).
    fn client(&mut self, op: &'static str) -> Result<&mut deadpool_postgres::Object, StoreError> {
        self.object.as_mut().ok_or_else(|| StoreError::Database {
            op,
            source: "the connection was closed".into(),
        })
    }

    /// Closes the connection (its statement cancelled) instead of pooling it.
    fn discard(mut self) {
        if let Some(object) = self.object.take() {
            close(object, &self.cancel);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if ABANDONING.with(std::cell::Cell::get)
            && let Some(object) = self.object.take()
        {
            close(object, &self.cancel);
        }
    }
}

/// Takes `object` out of the pool and closes it; the server is asked to cancel what it
/// still runs (it would notice the closed socket only when it next writes to it, e.g.
/// after a lock it waits for is granted).
fn close(object: deadpool_postgres::Object, cancel: &Cancel) {
    let token = object.cancel_token();
    // Dropping the client ends the connection's task, which closes the socket.
    drop(deadpool_postgres::Object::take(object));
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(cancel(token));
    }
}

/// A connection in a transaction holding [`CHANGE_LOCK`] (transaction-level); the
/// transaction is ended (without waiting) when dropped, which releases the lock; a
/// connection that cannot end it is closed, which releases it too.
struct HeldLock {
    conn: Option<Conn>,
    limit: Duration,
    handle: tokio::runtime::Handle,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let limit = self.limit;
            self.handle.spawn(async move {
                let op = "release the change lock";
                let ended = match conn.client(op) {
                    Ok(client) => matches!(
                        tokio::time::timeout(limit, client.batch_execute("ROLLBACK")).await,
                        Ok(Ok(()))
                    ),
                    Err(_) => false,
                };
                if !ended {
                    conn.discard();
                }
            });
        }
    }
}

/// `work`, or a `Database` error when it has not finished within `limit`; then `work` is
/// dropped with every [`Conn`] it holds closed (see [`Conn`]).
async fn bounded<T>(
    limit: Duration,
    op: &'static str,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut work = Box::pin(work);
    match tokio::time::timeout(limit, work.as_mut()).await {
        Ok(done) => done,
        Err(_) => {
            ABANDONING.with(|a| a.set(true));
            drop(work);
            ABANDONING.with(|a| a.set(false));
            Err(StoreError::Database {
                op,
                source: "no answer in time".into(),
            })
        }
    }
}

/// A pooled connection; or why not: the database refused kms's role (the connection's
/// own error, its SQLSTATE kept), or is unavailable.
async fn get(db: &Db, op: &'static str) -> Result<Conn, StoreError> {
    let object = db.pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => database_error(op, e),
        e => StoreError::Database {
            op,
            source: Box::new(e),
        },
    })?;
    Ok(Conn {
        object: Some(object),
        cancel: Arc::clone(&db.cancel),
    })
}

/// Brings the schema to [`SCHEMA_VERSION`] under an advisory lock; refuses a newer one;
/// then, under the same lock, creates every table of `tables` that is missing.
async fn migrate(
    client: &mut deadpool_postgres::Object,
    tables: &[Table],
) -> Result<(), StoreError> {
    let op = "migrate the schema";
    let tx = client.transaction().await.map_err(db(op))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db(op))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kms_schema (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now(),
            applied_by text NOT NULL)",
    )
    .await
    .map_err(db(op))?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM kms_schema", &[])
        .await
        .map_err(db(op))?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let by = concat!("kms ", env!("CARGO_PKG_VERSION"));
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.batch_execute(sql).await.map_err(db(op))?;
        tx.execute(
            "INSERT INTO kms_schema (version, applied_by) VALUES ($1, $2)",
            &[&version, &by],
        )
        .await
        .map_err(db(op))?;
        tracing::info!(version, "database schema migrated");
    }
    tx.batch_execute(&create_tables(tables))
        .await
        .map_err(db(op))?;
    tx.commit().await.map_err(db(op))
}

/// `CREATE TABLE IF NOT EXISTS` for every table of `tables`: an engine's tables appear
/// without a migration of their own (the names are `[a-z_]{1,40}`, checked when declared,
/// so they need no quoting). Tables of before exist already and are left as they are.
fn create_tables(tables: &[Table]) -> String {
    tables
        .iter()
        .map(|t| {
            format!(
                "CREATE TABLE IF NOT EXISTS {} (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);",
                table_name(*t)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rows of `(key, value)` from a query.
fn pairs(rows: Vec<tokio_postgres::Row>) -> Vec<(String, Vec<u8>)> {
    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
}

impl Store for PgStore {
    fn shared(&self) -> bool {
        true
    }

    fn location(&self) -> Result<String, StoreError> {
        let op = "read the cluster's identity";
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let row = client
                .query_one(
                    "SELECT system_identifier::pg_catalog.text, pg_catalog.current_database()::pg_catalog.text FROM pg_catalog.pg_control_system()",
                    &[],
                )
                .await
                .map_err(db(op))?;
            let (cluster, database): (String, String) = (row.get(0), row.get(1));
            Ok(format!("postgres:{cluster}/{database}"))
        })
    }

    fn lock_changes(&self) -> Result<Option<ChangeLock>, StoreError> {
        let op = "take the change lock";
        // A transaction-level lock, in a transaction kept open on a connection of the pool
        // until the guard is dropped: the lock ends with the transaction or the connection,
        // never outlives a failure. The wait is ended by the server after `lock_timeout`
        // (the transaction rolled back, the connection clean again); a call the client
        // gives up on first closes its connection (`bounded`).
        let held = self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            client.batch_execute("BEGIN").await.map_err(db(op))?;
            match client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
                .await
            {
                Ok(_) => Ok(conn),
                Err(e) => {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        conn.discard();
                    }
                    Err(db(op)(e))
                }
            }
        })?;
        let handle = self.runtime()?.handle().clone();
        Ok(Some(ChangeLock(Box::new(HeldLock {
            conn: Some(held),
            limit: self.timeout,
            handle,
        }))))
    }

    fn changes(&self) -> Option<ChangeFeed> {
        self.changes.lock().ok()?.take()
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let op = "read";
        let key = key.to_owned();
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let sql = format!("SELECT value FROM {} WHERE key = $1", table_name(table));
            let stmt = client.prepare_cached(&sql).await.map_err(db(op))?;
            let row = client.query_opt(&stmt, &[&key]).await.map_err(db(op))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn insert_new(&self, table: Table, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let op = "insert";
        let (key, value) = (key.to_owned(), value.to_vec());
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let sql = format!(
                "INSERT INTO {} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                table_name(table)
            );
            let stmt = client.prepare_cached(&sql).await.map_err(db(op))?;
            Ok(client
                .execute(&stmt, &[&key, &value])
                .await
                .map_err(db(op))?
                == 1)
        })
    }

    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write_all(&[Write {
            table,
            key: key.to_owned(),
            value: value.to_vec(),
        }])
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let op = "scan";
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let sql = format!("SELECT key, value FROM {} ORDER BY key", table_name(table));
            Ok(pairs(client.query(&sql, &[]).await.map_err(db(op))?))
        })
    }

    fn write_all_removing(&self, writes: &[Write], removals: &[Removal]) -> Result<(), StoreError> {
        self.commit("batch write", writes, removals)
    }

    fn reserve(
        &self,
        table: Table,
        key: &str,
        want: u64,
        max: u64,
    ) -> Result<(u64, u64), StoreError> {
        let op = "reserve";
        let key = key.to_owned();
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let tx = client.transaction().await.map_err(db(op))?;
            let t = table_name(table);
            let zero = 0u64.to_be_bytes().to_vec();
            let create = format!(
                "INSERT INTO {t} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
            );
            tx.execute(&create, &[&key, &zero]).await.map_err(db(op))?;
            // The row lock serialises every server's reservations of this counter.
            let read = format!("SELECT value FROM {t} WHERE key = $1 FOR UPDATE");
            let stored: Vec<u8> = tx.query_one(&read, &[&key]).await.map_err(db(op))?.get(0);
            let start = super::count_of(&stored);
            let end = start.saturating_add(want).min(max).max(start);
            let update = format!("UPDATE {t} SET value = $2 WHERE key = $1");
            tx.execute(&update, &[&key, &end.to_be_bytes().to_vec()])
                .await
                .map_err(db(op))?;
            tx.commit().await.map_err(db(op))?;
            Ok((start, end))
        })
    }

    fn snapshot(
        &self,
        tables: &[Table],
        each: &mut super::EachEntry<'_>,
    ) -> Result<(), StoreError> {
        let op = "snapshot";
        let runtime = self.runtime()?;
        let tables = tables.to_vec();
        type Row = Option<(Table, String, Vec<u8>)>;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Row, StoreError>>(1024);
        let pool = self.pool.clone();
        runtime.spawn(async move {
            let read = async {
                let mut conn = get(&pool, op).await?;
                let client = conn.client(op)?;
                // One repeatable-read transaction: every table as of one moment, while
                // the other servers and this one go on committing.
                let snapshot = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(db(op))?;
                for table in tables {
                    let sql = format!(
                        "SELECT key, value FROM {} WHERE key > $1 OR $2 ORDER BY key LIMIT 1000",
                        table_name(table)
                    );
                    let (mut after, mut first) = (String::new(), true);
                    loop {
                        let rows = snapshot
                            .query(&sql, &[&after, &first])
                            .await
                            .map_err(db(op))?;
                        let Some(last) = rows.last() else { break };
                        after = last.get(0);
                        first = false;
                        for (k, v) in pairs(rows) {
                            if tx.send(Ok(Some((table, k, v)))).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                snapshot.commit().await.map_err(db(op))?;
                // The end, said explicitly: a reader that stops without it was cut short.
                let _ = tx.send(Ok(None)).await;
                Ok(())
            };
            if let Err(e) = read.await {
                let _ = tx.send(Err(e)).await;
            }
        });
        while let Some(item) = rx.blocking_recv() {
            let Some((table, key, value)) = item? else {
                return Ok(());
            };
            each(table, &key, &value)?;
        }
        Err(StoreError::Database {
            op,
            source: "the snapshot was cut short".into(),
        })
    }

    fn append_with(
        &self,
        table: Table,
        build: &mut super::AppendBuild<'_>,
        removals: &[Removal],
    ) -> Result<(), StoreError> {
        let op = "append";
        let runtime = self.runtime()?;
        type Last = Option<(String, Vec<u8>)>;
        // Two steps in one transaction, the caller's thread building in between: the task
        // takes the append lock and reads the table's last entry; the caller builds its
        // writes after that entry; the task writes them and commits. The runtime's thread
        // never waits on the caller (it awaits).
        let (last_tx, last_rx) = std::sync::mpsc::sync_channel::<Result<Last, StoreError>>(1);
        let (writes_tx, writes_rx) = tokio::sync::oneshot::channel::<Rows>();
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Result<(), StoreError>>(1);
        let pool = self.pool.clone();
        let limit = self.timeout.saturating_mul(2);
        runtime.spawn(async move {
            let work = async {
                let mut conn = get(&pool, op).await?;
                let client = conn.client(op)?;
                // READ COMMITTED whatever the database's default: the read below must
                // take its snapshot after the lock is granted.
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
                    .start()
                    .await
                    .map_err(db(op))?;
                let lock = tx
                    .prepare_cached("SELECT pg_advisory_xact_lock($1)")
                    .await
                    .map_err(db(op))?;
                let sql = format!(
                    "SELECT key, value FROM {} ORDER BY key DESC LIMIT 1",
                    table_name(table)
                );
                let stmt = tx.prepare_cached(&sql).await.map_err(db(op))?;
                // The lock and the read of the last entry, sent together (tokio-postgres
                // pipelines concurrent requests; `biased`: the lock is polled, and so sent,
                // first): one round trip less while the lock is held. The database runs
                // them in order, and the read, a statement of its own, takes its snapshot
                // once the lock is granted (READ COMMITTED), so it sees every append
                // committed before.
                let (locked, last) = tokio::join!(
                    biased;
                    tx.execute(&lock, &[&APPEND_LOCK]),
                    tx.query_opt(&stmt, &[])
                );
                locked.map_err(db(op))?;
                let last = last.map_err(db(op))?.map(|r| (r.get(0), r.get(1)));
                if last_tx.send(Ok(last)).is_err() {
                    return Ok(());
                }
                // The caller gave up (its build failed): roll back.
                let Ok(rows) = writes_rx.await else {
                    return Ok(());
                };
                rows.write(&tx, op).await?;
                tx.commit().await.map_err(db(op))
            };
            let outcome = bounded(limit, op, work).await;
            if let Err(e) = outcome {
                // Before the caller has the last entry, it waits on `last_rx`; after, on
                // `done_rx`: tell both.
                let _ = last_tx.send(Err(StoreError::Database {
                    op,
                    source: e.to_string().into(),
                }));
                let _ = done_tx.send(Err(e));
            } else {
                let _ = done_tx.send(Ok(()));
            }
        });
        let stopped = || StoreError::Database {
            op,
            source: "the database client stopped".into(),
        };
        let last = last_rx.recv().map_err(|_| stopped())??;
        let writes = build(last)?;
        writes_tx
            .send(Rows::of(&writes, removals))
            .map_err(|_| stopped())?;
        done_rx.recv().map_err(|_| stopped())?
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let op = "read last";
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let sql = format!(
                "SELECT key, value FROM {} ORDER BY key DESC LIMIT 1",
                table_name(table)
            );
            let stmt = client.prepare_cached(&sql).await.map_err(db(op))?;
            Ok(pairs(client.query(&stmt, &[]).await.map_err(db(op))?).pop())
        })
    }

    fn range(
        &self,
        table: Table,
        start: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let op = "range";
        // PostgreSQL text holds no NUL, so no key does: `start` cut at its first NUL
        // (`last + "\0"`, how a pager asks for what follows `last`) becomes "after the cut".
        let (start, after) = match start.split_once('\0') {
            Some((cut, _)) => (cut.to_owned(), ">"),
            None => (start.to_owned(), ">="),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.block(op, |pool| async move {
            let mut conn = get(&pool, op).await?;
            let client = conn.client(op)?;
            let sql = format!(
                "SELECT key, value FROM {} WHERE key {after} $1 ORDER BY key LIMIT $2",
                table_name(table)
            );
            let stmt = client.prepare_cached(&sql).await.map_err(db(op))?;
            Ok(pairs(
                client
                    .query(&stmt, &[&start, &limit])
                    .await
                    .map_err(db(op))?,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSTEM: Table = crate::store::SYSTEM;
    const KEYS: Table = Table::new("keys", crate::store::Follow::Changes);
    const GRANTS: Table = Table::new("grants", crate::store::Follow::Changes);
    const AUDIT: Table = Table::new("audit", crate::store::Follow::Never);
    const COUNTERS: Table = Table::new("counters", crate::store::Follow::Never);
    const TABLES: &[Table] = &[SYSTEM, KEYS, GRANTS, AUDIT, COUNTERS];

    fn parse_change(payload: &str) -> Option<Change> {
        super::parse_change(TABLES, payload)
    }

    #[test]
    fn every_table_is_created_if_missing() {
        assert_eq!(
            create_tables(&[SYSTEM, AUDIT]),
            "CREATE TABLE IF NOT EXISTS kms_system (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);\n\
             CREATE TABLE IF NOT EXISTS kms_audit (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);"
        );
    }

    #[test]
    fn a_notification_is_only_a_hint_of_an_entry_of_a_followed_table() {
        assert_eq!(
            parse_change("keys:payments"),
            Some(Change::Entry(KEYS, "payments".into()))
        );
        assert_eq!(
            parse_change("grants:00112233445566778899aabbccddeeff"),
            Some(Change::Entry(
                GRANTS,
                "00112233445566778899aabbccddeeff".into()
            ))
        );
        assert_eq!(
            parse_change("system:seal"),
            Some(Change::Entry(SYSTEM, "seal".into()))
        );
        let long = format!("keys:{}", "a".repeat(MAX_HINT_KEY + 1));
        for ignored in [
            "",
            "keys",
            "keys:",
            "audit:00000000000000000001",
            "counters:payments/1",
            "nonsense:x",
            "keys:two words",
            "keys:caf\u{e9}",
            "keys:a\nb",
            long.as_str(),
        ] {
            assert_eq!(parse_change(ignored), None, "{ignored:?}");
        }
    }
}
