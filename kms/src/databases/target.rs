//! The databases kms makes logins on: a bounded pool per connection, statements run with a
//! time limit, errors that never carry a password.
//!
//! The engine's calls block (they run on blocking threads and the revoker's thread), and
//! the PostgreSQL client is async: it runs on a runtime of its own (one thread,
//! `kms-databases`), as the store's does, and a call waits for its answer at most the
//! connection's timeout. A pool is made the first time a connection is used and made
//! again when its record changes (another server's update, a root rotation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::DatabasesError;
use super::model::{Connection, Secret};

/// How long a call waits for a connection, and a statement for its answer.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// A pool, and the fingerprint of the record (and password) it was made from.
struct Pooled {
    fingerprint: [u8; 32],
    pool: deadpool_postgres::Pool,
}

/// The engine's database client.
pub(crate) struct Targets {
    /// Shut down in the background on drop (the last reference may go on an async worker).
    runtime: Option<tokio::runtime::Runtime>,
    pools: Mutex<HashMap<String, Pooled>>,
    timeout: Duration,
}

impl Drop for Targets {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How statements run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// All in one transaction: all or nothing (creation, renewal).
    Transaction,
    /// Each committed on its own, in order (revocation: `NOLOGIN` is in force before the
    /// sessions are ended, so none can start in between).
    Each,
}

/// Which password a connection is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    Pending,
}

impl Targets {
    /// A client with its runtime.
    pub(crate) fn new() -> Result<Self, DatabasesError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kms-databases")
            .enable_all()
            .build()
            .map_err(|_| DatabasesError::Internal("start the database client"))?;
        Ok(Self {
            runtime: Some(runtime),
            pools: Mutex::new(HashMap::new()),
            timeout: TIMEOUT,
        })
    }

    /// Runs `statements` on `conn`'s database as its root login (with the pending
    /// password, when a rotation was cut short and the current one is refused). An
    /// error's text has every string of `hide` replaced.
    pub(crate) fn execute(
        &self,
        conn: &Connection,
        statements: &[Zeroizing<String>],
        mode: Mode,
        hide: &[&str],
    ) -> Result<(), DatabasesError> {
        match self.execute_as(conn, Which::Current, statements, mode, hide) {
            Err(DatabasesError::Refused(why))
                if conn.pending_password.is_some() && why.starts_with("28P01") =>
            {
                self.execute_as(conn, Which::Pending, statements, mode, hide)
            }
            other => other,
        }
    }

    fn execute_as(
        &self,
        conn: &Connection,
        which: Which,
        statements: &[Zeroizing<String>],
        mode: Mode,
        hide: &[&str],
    ) -> Result<(), DatabasesError> {
        let pool = self.pool(conn, which)?;
        let statements: Vec<Zeroizing<String>> = statements.to_vec();
        // Twice the pool's own limits: a connection that cannot be made fails as such first.
        let limit = self.timeout.saturating_mul(2);
        let name = conn.name.clone();
        let mut hidden: Vec<Zeroizing<String>> = hide
            .iter()
            .map(|h| Zeroizing::new((*h).to_owned()))
            .collect();
        hidden.push(Zeroizing::new(conn.password.expose().to_owned()));
        if let Some(p) = &conn.pending_password {
            hidden.push(Zeroizing::new(p.expose().to_owned()));
        }
        self.block(async move {
            let run = async {
                let mut client = pool.get().await.map_err(|e| pool_error(&name, &e))?;
                match mode {
                    Mode::Transaction => {
                        // A transaction that lost a race with another (two GRANTs on one
                        // table: "tuple concurrently updated"; a serialization failure, a
                        // deadlock) rolled back whole: it is run again, a few times.
                        let mut tries = 0u32;
                        loop {
                            let tx = client
                                .transaction()
                                .await
                                .map_err(|e| sql_error(&name, &e))?;
                            let mut done = Ok(());
                            for s in &statements {
                                done = tx.batch_execute(s).await;
                                if done.is_err() {
                                    break;
                                }
                            }
                            let done = match done {
                                Ok(()) => tx.commit().await,
                                Err(e) => Err(e),
                            };
                            match done {
                                Err(e) if tries < RACE_RETRIES && lost_race(&e) => {
                                    tries += 1;
                                    tokio::time::sleep(Duration::from_millis(
                                        5 * u64::from(tries) + jitter(),
                                    ))
                                    .await;
                                }
                                other => break other.map_err(|e| sql_error(&name, &e)),
                            }
                        }
                    }
                    Mode::Each => {
                        for s in &statements {
                            client
                                .batch_execute(s)
                                .await
                                .map_err(|e| sql_error(&name, &e))?;
                        }
                        Ok(())
                    }
                }
            };
            match tokio::time::timeout(limit, run).await {
                Ok(r) => r,
                Err(_) => Err(DatabasesError::Unavailable {
                    connection: name.clone(),
                    why: format!("no answer within {} s", limit.as_secs()),
                }),
            }
        })
        .map_err(|e| scrub(e, &hidden))
    }

    /// Tries the connection: a connection made and `SELECT 1` answered.
    pub(crate) fn verify(&self, conn: &Connection) -> Result<(), DatabasesError> {
        self.execute(
            conn,
            &[Zeroizing::new("SELECT 1".to_owned())],
            Mode::Each,
            &[],
        )
    }

    /// The logins of `conn`'s database whose name starts with `prefix` and whose validity
    /// ended more than `ago` seconds ago (the reconcile pass), at most `limit`, each with
    /// its comment (empty: none).
    pub(crate) fn expired_logins(
        &self,
        conn: &Connection,
        prefix: &str,
        ago: i64,
        limit: i64,
    ) -> Result<Vec<(String, String)>, DatabasesError> {
        let pool = self.pool(conn, Which::Current)?;
        let name = conn.name.clone();
        let hidden = [Zeroizing::new(conn.password.expose().to_owned())];
        let timeout = self.timeout;
        let pattern = format!(
            "{}%",
            prefix
                .replace('\\', "\\\\")
                .replace('_', "\\_")
                .replace('%', "\\%")
        );
        self.block(async move {
            let run = async {
                let client = pool.get().await.map_err(|e| pool_error(&name, &e))?;
                let rows = client
                    .query(
                        "SELECT rolname::text, \
                         coalesce(pg_catalog.shobj_description(oid, 'pg_authid'), '') \
                         FROM pg_catalog.pg_roles WHERE rolname LIKE $1 \
                         AND rolvaliduntil IS NOT NULL \
                         AND rolvaliduntil < now() - ($2::bigint * interval '1 second') \
                         ORDER BY rolname LIMIT $3",
                        &[&pattern, &ago, &limit],
                    )
                    .await
                    .map_err(|e| sql_error(&name, &e))?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect())
            };
            tokio::time::timeout(timeout, run)
                .await
                .unwrap_or_else(|_| {
                    Err(DatabasesError::Unavailable {
                        connection: name.clone(),
                        why: "no answer in time".to_owned(),
                    })
                })
        })
        .map_err(|e| scrub(e, &hidden))
    }

    /// Forgets `name`'s pool (the connection was removed).
    pub(crate) fn forget(&self, name: &str) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.remove(name);
            pools.remove(&format!("{name}\u{0}pending"));
        }
    }

    /// Runs `fut` on the client's runtime and waits for it.
    fn block<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, DatabasesError>> + Send + 'static,
    ) -> Result<T, DatabasesError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or(DatabasesError::Internal("the database client is stopped"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| DatabasesError::Internal("the database client stopped"))?
    }

    /// `conn`'s pool for `which` password: the one made before if its record is the same.
    fn pool(
        &self,
        conn: &Connection,
        which: Which,
    ) -> Result<deadpool_postgres::Pool, DatabasesError> {
        let password = match which {
            Which::Current => &conn.password,
            Which::Pending => conn
                .pending_password
                .as_ref()
                .ok_or(DatabasesError::Internal("no pending password"))?,
        };
        let fingerprint = fingerprint(conn, password);
        let key = match which {
            Which::Current => conn.name.clone(),
            Which::Pending => format!("{}\u{0}pending", conn.name),
        };
        let mut pools = self
            .pools
            .lock()
            .map_err(|_| DatabasesError::Internal("pools"))?;
        if let Some(p) = pools.get(&key).filter(|p| p.fingerprint == fingerprint) {
            return Ok(p.pool.clone());
        }
        let pool = self.make_pool(conn, password)?;
        pools.insert(
            key,
            Pooled {
                fingerprint,
                pool: pool.clone(),
            },
        );
        Ok(pool)
    }

    fn make_pool(
        &self,
        conn: &Connection,
        password: &Secret,
    ) -> Result<deadpool_postgres::Pool, DatabasesError> {
        let config = client_config(conn, password, self.timeout)?;
        let tls = tls(conn)?;
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match tls {
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
        };
        let runtime = self
            .runtime
            .as_ref()
            .ok_or(DatabasesError::Internal("the database client is stopped"))?;
        let _enter = runtime.enter();
        deadpool_postgres::Pool::builder(manager)
            .max_size(usize::try_from(conn.max_open).unwrap_or(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.timeout))
            .recycle_timeout(Some(self.timeout))
            .build()
            .map_err(|_| DatabasesError::Internal("make the connection pool"))
    }
}

/// What a pool is made from: the record's connection settings and `password`.
fn fingerprint(conn: &Connection, password: &Secret) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        conn.url.as_bytes(),
        conn.username.as_bytes(),
        password.expose().as_bytes(),
        conn.ca_pem.as_bytes(),
        &conn.max_open.to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The client configuration: the URL with the root credentials in place, TLS as the
/// connection says. An error never shows the URL (it holds the password).
fn client_config(
    conn: &Connection,
    password: &Secret,
    timeout: Duration,
) -> Result<tokio_postgres::Config, DatabasesError> {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let bad = |why: &str| DatabasesError::BadRequest(format!("connection_url: {why}"));
    let url = Zeroizing::new(
        conn.url
            .replace(
                "{{username}}",
                &utf8_percent_encode(&conn.username, NON_ALPHANUMERIC).to_string(),
            )
            .replace(
                "{{password}}",
                &utf8_percent_encode(password.expose(), NON_ALPHANUMERIC).to_string(),
            ),
    );
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| bad("not a PostgreSQL connection URL once the credentials are in place"))?;
    match (conn.ca_pem.is_empty(), config.get_ssl_mode()) {
        (true, tokio_postgres::config::SslMode::Disable) => {}
        (true, _) => {
            return Err(bad(
                "the connection is not verified: give ca_pem (TLS, the database's certificate checked) or say sslmode=disable (a trusted local network)",
            ));
        }
        (false, tokio_postgres::config::SslMode::Disable) => {
            return Err(bad("ca_pem is given but the URL says sslmode=disable"));
        }
        (false, _) => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
    }
    config.application_name("kms-databases");
    config.connect_timeout(timeout);
    config.keepalives(true);
    config.tcp_user_timeout(timeout);
    Ok(config)
}

/// rustls trusting the connection's CA bundle only, or none (`sslmode=disable`).
fn tls(conn: &Connection) -> Result<Option<tokio_rustls::rustls::ClientConfig>, DatabasesError> {
    if conn.ca_pem.is_empty() {
        return Ok(None);
    }
    use rustls_pki_types::pem::PemObject;
    let bad = |why: &str| DatabasesError::BadRequest(format!("ca_pem: {why}"));
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(conn.ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("not PEM certificates"))?;
    if certs.is_empty() {
        return Err(bad("no certificate"));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|_| bad("a certificate is not a usable CA"))?;
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|_| DatabasesError::Internal("TLS protocol versions"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(config))
}

/// How many times a transaction that lost a race with another is run again.
const RACE_RETRIES: u32 = 10;

/// Whether `e` says the transaction lost a race with another and rolled back: a
/// serialization failure, a deadlock, or PostgreSQL's "tuple concurrently updated" (two
/// transactions changing one catalog row, as concurrent GRANTs on one table do).
fn lost_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        matches!(d.code().code(), "40001" | "40P01")
            || (d.code().code() == "XX000" && d.message().contains("concurrently updated"))
    })
}

/// 0 to 31 ms, so that racing retries spread out.
fn jitter() -> u64 {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    u64::from(b[0] % 32)
}

/// Whether a SQLSTATE says the database is not there for now (connection exceptions,
/// insufficient resources, starting up or shutting down), not that it refused.
fn transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        // A serialization failure or deadlock retried enough, a lock not granted, a
        // read-only server (a standby after a failover).
        || matches!(code, "40001" | "40P01" | "55P03" | "25006")
}

/// A statement's error (its text whole: [`scrub`] bounds it once any password is out): the
/// database's code and message (a transient one, or no code:
/// the connection failed, and what was sent is not known).
fn sql_error(connection: &str, e: &tokio_postgres::Error) -> DatabasesError {
    match e.as_db_error() {
        Some(db) if !transient(db.code().code()) => {
            DatabasesError::Refused(format!("{} {}", db.code().code(), db.message()))
        }
        _ => DatabasesError::Unavailable {
            connection: connection.to_owned(),
            why: e.to_string(),
        },
    }
}

/// A pool's error: the database unreachable (nothing was sent), or refusing the root login
/// (its code says).
fn pool_error(connection: &str, e: &deadpool_postgres::PoolError) -> DatabasesError {
    match e {
        deadpool_postgres::PoolError::Backend(e)
            if e.as_db_error().is_some_and(|d| !transient(d.code().code())) =>
        {
            sql_error(connection, e)
        }
        deadpool_postgres::PoolError::Backend(e) => DatabasesError::Unreachable {
            connection: connection.to_owned(),
            why: match e.as_db_error() {
                Some(d) => format!("{} {}", d.code().code(), d.message()),
                None => e.to_string(),
            },
        },
        deadpool_postgres::PoolError::Timeout(_) => DatabasesError::Unreachable {
            connection: connection.to_owned(),
            why: "no connection within the time limit".to_owned(),
        },
        other => DatabasesError::Unreachable {
            connection: connection.to_owned(),
            why: bounded(&other.to_string()),
        },
    }
}

/// At most 300 characters of `s`, one line.
fn bounded(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect()
}

/// `e` with every string of `hidden` replaced by `<redacted>` (a syntax error quotes the
/// text near it, which may be a password).
fn scrub(e: DatabasesError, hidden: &[Zeroizing<String>]) -> DatabasesError {
    // Every password out first, then bounded (a cut first could leave a password's start).
    let clean = |s: String| {
        bounded(
            &hidden
                .iter()
                .filter(|h| !h.is_empty())
                .fold(s, |s, h| s.replace(h.as_str(), "<redacted>")),
        )
    };
    match e {
        DatabasesError::Refused(s) => DatabasesError::Refused(clean(s)),
        DatabasesError::Unavailable { connection, why } => DatabasesError::Unavailable {
            connection,
            why: clean(why),
        },
        DatabasesError::Unreachable { connection, why } => DatabasesError::Unreachable {
            connection,
            why: clean(why),
        },
        other => other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn conn(url: &str, ca: &str) -> Connection {
        Connection {
            schema: 1,
            name: "db".into(),
            plugin: "postgresql".into(),
            url: url.into(),
            username: "root user".into(),
            password: Secret::new("p@ss:w/rd".into()),
            pending_password: None,
            allowed_roles: vec![],
            ca_pem: ca.into(),
            max_open: 2,
            root_rotated: 0,
            created_ms: 0,
            created_by: String::new(),
        }
    }

    #[test]
    fn the_credentials_go_in_encoded_and_no_error_shows_the_url() {
        let c = conn(
            "postgresql://{{username}}:{{password}}@127.0.0.1:5432/app?sslmode=disable",
            "",
        );
        let config = client_config(&c, &c.password, TIMEOUT).unwrap();
        assert_eq!(config.get_user(), Some("root user"));
        assert_eq!(config.get_password(), Some("p@ss:w/rd".as_bytes()));
        let unverified = conn("postgresql://{{username}}:{{password}}@h/app", "");
        let e = client_config(&unverified, &unverified.password, TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=disable") && !e.contains("p@ss"), "{e}");
        let garbage = conn(
            "postgresql://{{username}}:{{password}}@h:notaport/x?sslmode=disable",
            "",
        );
        let e = client_config(&garbage, &garbage.password, TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("p@ss") && !e.contains("w/rd"), "{e}");
    }

    #[test]
    fn a_database_starting_or_stopping_is_not_a_refusal() {
        for code in ["57P03", "57P01", "08006", "53300"] {
            assert!(transient(code), "{code}");
        }
        for code in ["42501", "28P01", "22012", "42P01"] {
            assert!(!transient(code), "{code}");
        }
    }

    #[test]
    fn errors_lose_every_hidden_string() {
        let e = scrub(
            DatabasesError::Refused("42601 syntax error at or near \"Secret123\"".into()),
            &[Zeroizing::new("Secret123".to_owned())],
        );
        assert_eq!(
            e.to_string(),
            "the database refused: 42601 syntax error at or near \"<redacted>\""
        );
    }
}
