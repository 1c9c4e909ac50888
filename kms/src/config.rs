//! The server's configuration file (TOML), documented key by key in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_pkcs11_conf::{HsmConfig, ValidHsmConfig};
use serde::Deserialize;

/// The configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    /// The gRPC listen address, e.g. `127.0.0.1:8200`.
    pub listen: String,
    /// The `[storage]` table.
    pub storage: StorageConfig,
    /// The `[hsm]` table.
    pub hsm: HsmConfig,
    /// The `[log]` table.
    #[serde(default)]
    pub log: LogConfig,
    /// The `[keyring]` table.
    #[serde(default)]
    pub keyring: KeyringConfig,
    /// The `[audit]` table.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The `[tls]` table.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The `[roles]` table.
    #[serde(default)]
    pub roles: RolesConfig,
    /// The `[unseal]` table.
    #[serde(default)]
    pub unseal: UnsealConfig,
    /// The `[limits]` table.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The `[metrics]` table.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The `[http]` table (`crate::http::config`).
    #[serde(default)]
    pub http: crate::http::config::HttpConfig,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsConfig {
    /// Where `GET /metrics` is served (plaintext HTTP), e.g. `127.0.0.1:9464`; off when
    /// absent.
    pub listen: Option<String>,
}

/// `[limits]`: what any one caller can make the server hold, read or record.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsConfig {
    /// Seconds a client has to finish its TLS handshake (default 5).
    pub handshake_timeout_seconds: Option<u64>,
    /// Handshakes in progress at once, from all addresses (default 256).
    pub max_handshakes: Option<usize>,
    /// Handshakes in progress at once from one address (default 16).
    pub max_handshakes_per_address: Option<usize>,
    /// Seconds after which a connection is asked to close (HTTP/2 GOAWAY; default 600): a
    /// removed CA or an expired certificate loses its open connections within this time.
    pub max_connection_age_seconds: Option<u64>,
    /// Concurrent calls (HTTP/2 streams) per connection (default 128).
    pub max_concurrent_streams: Option<u32>,
    /// The largest request from a caller without a client certificate, in bytes (default
    /// 65536).
    pub anonymous_max_request_bytes: Option<usize>,
    /// Refused calls (UNAUTHENTICATED, PERMISSION_DENIED, malformed) allowed per source
    /// address per minute before its calls are refused unread (default 120).
    pub refused_calls_per_minute: Option<u32>,
    /// Client connections open at once, handshakes included (default: the open-file limit
    /// less 128, at most 4096).
    pub max_connections: Option<usize>,
    /// Client connections open at once from one source address (default 256).
    pub max_connections_per_address: Option<usize>,
    /// Connections without a client certificate open at once (default 128).
    pub max_anonymous_connections: Option<usize>,
    /// Connections without a client certificate open at once from one source address
    /// (default 8).
    pub max_anonymous_connections_per_address: Option<usize>,
    /// Seconds a connection without a client certificate may go without a call in flight
    /// before it is closed, and a call of one may take to be answered (default 10).
    pub anonymous_idle_timeout_seconds: Option<u64>,
    /// Calls without a client certificate (Status, WhoAmI, health) per source address per
    /// minute (default 600).
    pub anonymous_calls_per_minute: Option<u32>,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// The server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The server's private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA bundle that client certificates must chain to (PEM).
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC instead (loopback `listen` only; callers are `loopback`).
    pub plaintext_loopback: Option<bool>,
    /// Seconds between checks of the files for changes (default 5).
    pub reload_check_seconds: Option<u64>,
}

/// `[roles]`: principal patterns (exact, or a prefix ending in `*`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolesConfig {
    /// Key administration, grants, init and seal.
    #[serde(default)]
    pub admin: Vec<String>,
    /// The audit service.
    #[serde(default)]
    pub auditor: Vec<String>,
    /// Unseal shares (submit, reset): the key custodians' certificates.
    #[serde(default)]
    pub custodian: Vec<String>,
}

/// `[unseal]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnsealConfig {
    /// Failed shares allowed per source address per window (default 5).
    pub max_failed_shares: Option<u32>,
    /// The window, in seconds (default 60).
    pub failure_window_seconds: Option<u64>,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditConfig {
    /// Sign a checkpoint after this many records (default 1000).
    pub checkpoint_every_records: Option<u64>,
    /// Or after this many seconds with new records (default 60).
    pub checkpoint_interval_seconds: Option<u64>,
    /// Archive (then remove from the store) records older than this many days.
    pub retain_days: Option<u64>,
    /// Archive the oldest records beyond this many.
    pub retain_records: Option<u64>,
    /// Where archive segments are written (needed with either retain setting).
    pub archive_dir: Option<PathBuf>,
    /// A program and its arguments, run with each segment's path appended; it must exit 0
    /// before the segment's records leave the store.
    pub archive_command: Option<Vec<String>>,
    /// Records per archive segment (default 100000).
    pub segment_records: Option<u64>,
    /// Seconds between retention runs (default 300).
    pub retain_check_seconds: Option<u64>,
}

/// `[keyring]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyringConfig {
    /// AES-GCM messages per key version (default 2^32, the random-nonce limit; auto-rotation
    /// at three quarters of it). Lower it to rotate sooner.
    pub max_messages_per_version: Option<u64>,
    /// Seconds between checks for due rotations and destructions (default 60).
    pub maintenance_interval_seconds: Option<u64>,
    /// Testing only: the length of a "day" of the destruction window, in seconds (default
    /// 86400).
    pub testing_day_seconds: Option<u64>,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageConfig {
    /// `redb` (default: one file, one server) or `postgres` (several servers).
    pub backend: Option<String>,
    /// redb: the file.
    pub path: Option<PathBuf>,
    /// redb: the page cache, in MiB (default 64).
    pub cache_mib: Option<u64>,
    /// postgres: the connection URL, without a password.
    pub url: Option<String>,
    /// postgres: the environment variable that holds the password.
    pub password_env: Option<String>,
    /// postgres: the file (0600) that holds the password.
    pub password_file: Option<PathBuf>,
    /// postgres: the CA bundle the database's certificate must chain to (TLS required).
    pub ca_file: Option<PathBuf>,
    /// postgres: connections in the pool (default 8).
    pub connections: Option<usize>,
    /// postgres: seconds a call waits for the database before it fails (default 5).
    pub timeout_seconds: Option<u64>,
}

/// Where the server keeps its state: `[storage]`, checked.
#[derive(Debug, Clone)]
pub enum StorageSettings {
    /// One redb file.
    Redb {
        /// The file.
        path: PathBuf,
        /// The page cache, in bytes.
        cache_bytes: usize,
    },
    /// A PostgreSQL database that several servers share.
    Postgres(crate::store::PgSettings),
}

impl StorageSettings {
    /// Opens the store these settings name (creating or migrating it).
    pub fn open(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::store::Store>, crate::store::StoreError> {
        Ok(match self {
            Self::Redb { path, cache_bytes } => std::sync::Arc::new(
                crate::store::RedbStore::open_with_cache(path, *cache_bytes)?,
            ),
            Self::Postgres(settings) => {
                std::sync::Arc::new(crate::store::PgStore::connect(settings)?)
            }
        })
    }

    /// The store, named for an operator: the redb file, or the PostgreSQL URL (which holds
    /// no password: a password in it is refused).
    pub fn describe(&self) -> String {
        match self {
            Self::Redb { path, .. } => format!("the redb file {}", path.display()),
            Self::Postgres(s) => format!("the PostgreSQL database {}", s.url),
        }
    }

    /// The redb file, if the store is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::Redb { path, .. } => Some(path),
            Self::Postgres(_) => None,
        }
    }
}

impl StorageConfig {
    /// Checks the table: exactly the keys of its backend, values in range.
    fn validate(self, base: &Path) -> Result<StorageSettings, ConfigError> {
        let pg_keys = self.url.is_some()
            || self.password_env.is_some()
            || self.password_file.is_some()
            || self.ca_file.is_some()
            || self.connections.is_some()
            || self.timeout_seconds.is_some();
        match self.backend.as_deref().unwrap_or("redb") {
            "redb" => {
                if pg_keys {
                    return Err(ConfigError::BadStorageKeys(
                        "url, password_env, password_file, ca_file, connections and timeout_seconds are for backend = \"postgres\"",
                    ));
                }
                let path = self.path.ok_or(ConfigError::BadStorageKeys(
                    "path (the redb file) is required",
                ))?;
                let mib = within(
                    self.cache_mib,
                    (crate::store::DEFAULT_CACHE_BYTES >> 20) as u64,
                    1..=65_536,
                    ConfigError::BadStorage("cache_mib (1..=65536)"),
                )?;
                Ok(StorageSettings::Redb {
                    path: resolve(base, path),
                    cache_bytes: usize::try_from(mib * 1024 * 1024)
                        .map_err(|_| ConfigError::BadStorage("cache_mib (1..=65536)"))?,
                })
            }
            "postgres" => {
                if self.path.is_some() || self.cache_mib.is_some() {
                    return Err(ConfigError::BadStorageKeys(
                        "path and cache_mib are for backend = \"redb\"",
                    ));
                }
                let url = self.url.ok_or(ConfigError::BadStorageKeys(
                    "url (postgresql://user@host:port/database?sslmode=...) is required",
                ))?;
                let password = match (self.password_env, self.password_file) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::BadStorageKeys(
                            "set only one of password_env and password_file",
                        ));
                    }
                    (Some(var), None) => {
                        if !kms_pkcs11_conf::is_env_name(&var) {
                            return Err(ConfigError::BadStorageKeys(
                                "password_env: not a valid environment variable name",
                            ));
                        }
                        Some(crate::store::SecretSource::Env(var))
                    }
                    (None, Some(file)) => {
                        Some(crate::store::SecretSource::File(resolve(base, file)))
                    }
                    (None, None) => None,
                };
                let connections = within(
                    self.connections,
                    8,
                    1..=256,
                    ConfigError::BadStorage("connections (1..=256)"),
                )?;
                let timeout = within(
                    self.timeout_seconds,
                    5,
                    1..=300,
                    ConfigError::BadStorage("timeout_seconds (1..=300)"),
                )?;
                Ok(StorageSettings::Postgres(crate::store::PgSettings {
                    url,
                    password,
                    ca_file: self.ca_file.map(|f| resolve(base, f)),
                    connections,
                    timeout: std::time::Duration::from_secs(timeout),
                }))
            }
            other => Err(ConfigError::BadBackend(other.to_owned())),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// `error`, `warn`, `info` (default), `debug` or `trace`.
    pub level: Option<String>,
    /// `text` (default) or `json` (one object a line, for log shippers).
    pub format: Option<String>,
    /// The level of the line each served call writes: `debug` (default: a busy server
    /// writes no line per call) or `info`.
    pub requests: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// `[log]`, checked.
#[derive(Debug, Clone, Copy)]
pub struct LogSettings {
    /// The most detailed level written to standard error.
    pub level: tracing::Level,
    /// Text or JSON.
    pub format: LogFormat,
    /// The level of the line each served call writes (`DEBUG` or `INFO`).
    pub requests: tracing::Level,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listen address.
    pub listen: SocketAddr,
    /// `[storage]`: the backend and its settings.
    pub storage: StorageSettings,
    /// The `[hsm]` table, checked: module, token, PIN source, master key label.
    pub hsm: ValidHsmConfig,
    /// `[log]`: level, format, and the level of the per-call line.
    pub log: LogSettings,
    /// `[metrics] listen`: where the Prometheus endpoint is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Keyring settings.
    pub keyring: crate::keyring::Settings,
    /// Seconds between maintenance runs.
    pub maintenance_interval: std::time::Duration,
    /// When to sign audit checkpoints.
    pub checkpoints: crate::audit::CheckpointPolicy,
    /// `[audit]` retention: which records are archived and removed, and where they go.
    pub retention: Option<crate::audit::archive::RetentionPolicy>,
    /// The TLS files; `None` only for an explicit plaintext loopback listener.
    pub tls: Option<crate::access::tls::TlsFiles>,
    /// How often the TLS files are checked for changes.
    pub tls_reload_check: std::time::Duration,
    /// Who holds which role.
    pub roles: crate::access::Roles,
    /// The limit on failed unseal shares.
    pub unseal_limit: crate::access::limiter::UnsealLimit,
    /// `[limits]`.
    pub limits: crate::access::limiter::Limits,
    /// `[http]`: the Vault-compatible HTTPS front, if on.
    pub http: Option<crate::http::config::HttpSettings>,
}

/// What is wrong with the configuration file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or missing keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message (line, column, key).
        message: String,
    },
    /// `listen` is not an address.
    #[error("listen: {0:?} is not an address such as \"127.0.0.1:8200\"")]
    BadListen(String),
    /// `plaintext_loopback` with a `listen` that is not a loopback address.
    #[error(
        "tls.plaintext_loopback: listen {0} is not a loopback address; plaintext is allowed on loopback only"
    )]
    NotLoopback(SocketAddr),
    /// Neither TLS files nor the plaintext opt-out.
    #[error(
        "[tls]: give cert, key and client_ca (PEM files), or plaintext_loopback = true on a loopback listen address (development only)"
    )]
    NoTls,
    /// Both TLS files and the plaintext opt-out, or only some of the files.
    #[error("[tls]: {0}")]
    BadTls(&'static str),
    /// A `[roles]` pattern is not one.
    #[error("roles.{role}: {source}")]
    BadRole {
        /// `admin`, `auditor` or `custodian`.
        role: &'static str,
        /// What is wrong.
        #[source]
        source: crate::policy::PatternError,
    },
    /// A `[limits]` value is out of range.
    #[error("limits.{0}: out of range")]
    BadLimit(&'static str),
    /// An `[unseal]` value is out of range.
    #[error("unseal.{0}: out of range")]
    BadUnseal(&'static str),
    /// A `[keyring]` value is out of range.
    #[error("keyring.{0}: out of range")]
    BadKeyring(&'static str),
    /// A `[storage]` value is out of range.
    #[error("storage.{0}: out of range")]
    BadStorage(&'static str),
    /// `[storage]` names keys of the other backend, or lacks one its backend needs.
    #[error("storage: {0}")]
    BadStorageKeys(&'static str),
    /// `[storage] backend` is unknown.
    #[error("storage.backend: {0:?} is not one of redb, postgres")]
    BadBackend(String),
    /// `[audit]` keys that do not go together.
    #[error("audit: {0}")]
    BadAuditKeys(&'static str),
    /// An `[audit]` value is out of range.
    #[error("audit.{0}: out of range")]
    BadAudit(&'static str),
    /// `[log] level` is unknown.
    #[error("log.level: {0:?} is not one of error, warn, info, debug, trace")]
    BadLogLevel(String),
    /// `[log] format` is unknown.
    #[error("log.format: {0:?} is not one of text, json")]
    BadLogFormat(String),
    /// `[log] requests` is unknown.
    #[error("log.requests: {0:?} is not one of debug, info")]
    BadRequestLog(String),
    /// `[http]` is wrong.
    #[error(transparent)]
    Http(#[from] crate::http::config::HttpConfigError),
    /// `[metrics] listen` is not an address.
    #[error("metrics.listen: {0:?} is not an address and port (e.g. 127.0.0.1:9464)")]
    BadMetricsListen(String),
    /// The `[hsm]` table.
    #[error(transparent)]
    Hsm(#[from] kms_pkcs11_conf::ConfigError),
}

impl Config {
    /// Reads, parses and checks a configuration file. Relative paths in it are relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, base)
    }

    /// Checks a parsed file, one section at a time; relative paths are resolved against
    /// `base`.
    pub(crate) fn from_file(mut file: ConfigFile, base: &Path) -> Result<Self, ConfigError> {
        let listen: SocketAddr = file
            .listen
            .parse()
            .map_err(|_| ConfigError::BadListen(file.listen.clone()))?;
        // In the order errors are reported: access first, then the HSM, then the rest.
        let (tls, tls_reload_check) = file.tls.validate(listen, base)?;
        let roles = file.roles.validate()?;
        let limits = file.limits.validate()?;
        let unseal_limit = file.unseal.validate()?;
        file.hsm.resolve_paths(base);
        let hsm = file.hsm.validate()?;
        let log = file.log.validate()?;
        let metrics_listen = file
            .metrics
            .listen
            .as_deref()
            .map(|l| {
                l.parse::<SocketAddr>()
                    .map_err(|_| ConfigError::BadMetricsListen(l.to_owned()))
            })
            .transpose()?;
        let (keyring, maintenance_interval) = file.keyring.validate()?;
        let http = file.http.validate(tls.is_some())?;
        Ok(Self {
            listen,
            storage: file.storage.validate(base)?,
            hsm,
            log,
            metrics_listen,
            keyring,
            maintenance_interval,
            checkpoints: file.audit.validate()?,
            retention: file.audit.retention(base)?,
            tls,
            tls_reload_check,
            roles,
            unseal_limit,
            limits,
            http,
        })
    }
}

/// `path`, or `base/path` when it is relative.
fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_relative() {
        base.join(path)
    } else {
        path
    }
}

/// `v` (or `default`) when it is in `range`, else `err`.
fn within<T: PartialOrd + Copy>(
    v: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
    err: ConfigError,
) -> Result<T, ConfigError> {
    let v = v.unwrap_or(default);
    if range.contains(&v) { Ok(v) } else { Err(err) }
}

impl TlsConfig {
    /// The TLS files (or `None`: plaintext on a loopback `listen`) and the reload check
    /// interval.
    fn validate(
        self,
        listen: SocketAddr,
        base: &Path,
    ) -> Result<(Option<crate::access::tls::TlsFiles>, Duration), ConfigError> {
        let files = match (
            self.plaintext_loopback.unwrap_or(false),
            self.cert,
            self.key,
            self.client_ca,
        ) {
            (true, None, None, None) if listen.ip().is_loopback() => None,
            (true, None, None, None) => return Err(ConfigError::NotLoopback(listen)),
            (true, ..) => {
                return Err(ConfigError::BadTls(
                    "plaintext_loopback = true and TLS files exclude each other",
                ));
            }
            (false, Some(cert), Some(key), Some(client_ca)) => Some(crate::access::tls::TlsFiles {
                cert: resolve(base, cert),
                key: resolve(base, key),
                client_ca: resolve(base, client_ca),
            }),
            (false, None, None, None) => return Err(ConfigError::NoTls),
            (false, ..) => {
                return Err(ConfigError::BadTls(
                    "cert, key and client_ca are all needed",
                ));
            }
        };
        let reload = within(
            self.reload_check_seconds,
            5,
            1..=3600,
            ConfigError::BadTls("reload_check_seconds: out of range (1..=3600)"),
        )?;
        Ok((files, Duration::from_secs(reload)))
    }
}

impl RolesConfig {
    fn validate(&self) -> Result<crate::access::Roles, ConfigError> {
        let patterns = |role: &'static str, list: &[String]| {
            list.iter()
                .map(|p| crate::policy::Pattern::new(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| ConfigError::BadRole { role, source })
        };
        Ok(crate::access::Roles {
            admin: patterns("admin", &self.admin)?,
            auditor: patterns("auditor", &self.auditor)?,
            custodian: patterns("custodian", &self.custodian)?,
        })
    }
}

impl UnsealConfig {
    fn validate(&self) -> Result<crate::access::limiter::UnsealLimit, ConfigError> {
        let d = crate::access::limiter::UnsealLimit::default();
        Ok(crate::access::limiter::UnsealLimit {
            max_failures: within(
                self.max_failed_shares,
                d.max_failures,
                1..=1000,
                ConfigError::BadUnseal("max_failed_shares (1..=1000)"),
            )?,
            window: Duration::from_secs(within(
                self.failure_window_seconds,
                d.window.as_secs(),
                1..=86_400,
                ConfigError::BadUnseal("failure_window_seconds (1..=86400)"),
            )?),
        })
    }
}

impl LogConfig {
    fn validate(&self) -> Result<LogSettings, ConfigError> {
        let level = match self.level.as_deref() {
            None => tracing::Level::INFO,
            Some(l) => l
                .parse()
                .map_err(|_| ConfigError::BadLogLevel(l.to_owned()))?,
        };
        let format = match self.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(ConfigError::BadLogFormat(other.to_owned())),
        };
        let requests = match self.requests.as_deref() {
            None | Some("debug") => tracing::Level::DEBUG,
            Some("info") => tracing::Level::INFO,
            Some(other) => return Err(ConfigError::BadRequestLog(other.to_owned())),
        };
        Ok(LogSettings {
            level,
            format,
            requests,
        })
    }
}

impl KeyringConfig {
    /// The keyring's settings and the maintenance interval.
    fn validate(&self) -> Result<(crate::keyring::Settings, Duration), ConfigError> {
        let d = crate::keyring::Settings::default();
        let max_messages_per_version = within(
            self.max_messages_per_version,
            d.max_messages_per_version,
            4..=d.max_messages_per_version,
            ConfigError::BadKeyring("max_messages_per_version (4..=2^32)"),
        )?;
        let day_seconds = within(
            self.testing_day_seconds,
            d.day_seconds,
            1..=u64::MAX,
            ConfigError::BadKeyring("testing_day_seconds"),
        )?;
        let interval = within(
            self.maintenance_interval_seconds,
            60,
            1..=86_400,
            ConfigError::BadKeyring("maintenance_interval_seconds (1..=86400)"),
        )?;
        Ok((
            crate::keyring::Settings {
                max_messages_per_version,
                day_seconds,
            },
            Duration::from_secs(interval),
        ))
    }
}

impl AuditConfig {
    /// The retention policy, if any; the archive directory is resolved against `base` and
    /// created (0700) when missing.
    fn retention(
        &self,
        base: &Path,
    ) -> Result<Option<crate::audit::archive::RetentionPolicy>, ConfigError> {
        if self.retain_days.is_none() && self.retain_records.is_none() {
            if self.archive_dir.is_some() || self.archive_command.is_some() {
                return Err(ConfigError::BadAuditKeys(
                    "archive_dir and archive_command need retain_days or retain_records",
                ));
            }
            return Ok(None);
        }
        let dir = self.archive_dir.clone().ok_or(ConfigError::BadAuditKeys(
            "retain_days and retain_records need archive_dir: records leave the store only for an archive",
        ))?;
        let archive_dir = resolve(base, dir);
        if !archive_dir.is_dir() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&archive_dir)
                .map_err(|_| ConfigError::BadAuditKeys("archive_dir cannot be created"))?;
        }
        if self
            .archive_command
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(String::is_empty))
        {
            return Err(ConfigError::BadAuditKeys(
                "archive_command names no program (a list: program, then its arguments)",
            ));
        }
        let days = self
            .retain_days
            .map(|d| {
                if (1..=36_500).contains(&d) {
                    Ok(Duration::from_secs(d * 86_400))
                } else {
                    Err(ConfigError::BadAudit("retain_days (1..=36500)"))
                }
            })
            .transpose()?;
        if self.retain_records.is_some_and(|r| r < 1) {
            return Err(ConfigError::BadAudit("retain_records (1 or more)"));
        }
        Ok(Some(crate::audit::archive::RetentionPolicy {
            max_age: days,
            max_records: self.retain_records,
            segment_records: within(
                self.segment_records,
                100_000,
                1..=10_000_000,
                ConfigError::BadAudit("segment_records (1..=10000000)"),
            )?,
            archive_dir,
            command: self.archive_command.clone(),
            check_every: Duration::from_secs(within(
                self.retain_check_seconds,
                300,
                1..=86_400,
                ConfigError::BadAudit("retain_check_seconds (1..=86400)"),
            )?),
        }))
    }

    fn validate(&self) -> Result<crate::audit::CheckpointPolicy, ConfigError> {
        Ok(crate::audit::CheckpointPolicy {
            every_records: within(
                self.checkpoint_every_records,
                1000,
                1..=1_000_000,
                ConfigError::BadAudit("checkpoint_every_records (1..=1000000)"),
            )?,
            interval: Duration::from_secs(within(
                self.checkpoint_interval_seconds,
                60,
                1..=86_400,
                ConfigError::BadAudit("checkpoint_interval_seconds (1..=86400)"),
            )?),
        })
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<crate::access::limiter::Limits, ConfigError> {
        let d = crate::access::limiter::Limits::default();
        let bad = ConfigError::BadLimit;
        Ok(crate::access::limiter::Limits {
            handshake_timeout: Duration::from_secs(within(
                self.handshake_timeout_seconds,
                d.handshake_timeout.as_secs(),
                1..=60,
                bad("handshake_timeout_seconds (1..=60)"),
            )?),
            max_handshakes: within(
                self.max_handshakes,
                d.max_handshakes,
                1..=100_000,
                bad("max_handshakes (1..=100000)"),
            )?,
            max_handshakes_per_address: within(
                self.max_handshakes_per_address,
                d.max_handshakes_per_address,
                1..=100_000,
                bad("max_handshakes_per_address (1..=100000)"),
            )?,
            max_connection_age: Duration::from_secs(within(
                self.max_connection_age_seconds,
                d.max_connection_age.as_secs(),
                1..=30 * 86_400,
                bad("max_connection_age_seconds (1..=2592000)"),
            )?),
            max_concurrent_streams: within(
                self.max_concurrent_streams,
                d.max_concurrent_streams,
                1..=10_000,
                bad("max_concurrent_streams (1..=10000)"),
            )?,
            anonymous_max_request_bytes: within(
                self.anonymous_max_request_bytes,
                d.anonymous_max_request_bytes,
                1024..=16 * 1024 * 1024,
                bad("anonymous_max_request_bytes (1024..=16777216)"),
            )?,
            refused_calls_per_minute: within(
                self.refused_calls_per_minute,
                d.refused_calls_per_minute,
                1..=1_000_000,
                bad("refused_calls_per_minute (1..=1000000)"),
            )?,
            max_connections: self
                .max_connections
                .map(|n| {
                    within(
                        Some(n),
                        n,
                        16..=1_000_000,
                        bad("max_connections (16..=1000000)"),
                    )
                })
                .transpose()?,
            max_connections_per_address: within(
                self.max_connections_per_address,
                d.max_connections_per_address,
                1..=1_000_000,
                bad("max_connections_per_address (1..=1000000)"),
            )?,
            max_anonymous_connections: within(
                self.max_anonymous_connections,
                d.max_anonymous_connections,
                1..=1_000_000,
                bad("max_anonymous_connections (1..=1000000)"),
            )?,
            max_anonymous_connections_per_address: within(
                self.max_anonymous_connections_per_address,
                d.max_anonymous_connections_per_address,
                1..=1_000_000,
                bad("max_anonymous_connections_per_address (1..=1000000)"),
            )?,
            anonymous_idle_timeout: Duration::from_secs(within(
                self.anonymous_idle_timeout_seconds,
                d.anonymous_idle_timeout.as_secs(),
                1..=3600,
                bad("anonymous_idle_timeout_seconds (1..=3600)"),
            )?),
            anonymous_calls_per_minute: within(
                self.anonymous_calls_per_minute,
                d.anonymous_calls_per_minute,
                1..=1_000_000,
                bad("anonymous_calls_per_minute (1..=1000000)"),
            )?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("kms.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mod.so"), b"").unwrap();
        let p = write(
            dir.path(),
            "listen = \"0.0.0.0:8200\"\n[storage]\npath = \"data/kms.redb\"\n[hsm]\nmodule = \"mod.so\"\ntoken_label = \"kms\"\npin_file = \"pin\"\n[log]\nlevel = \"debug\"\n[tls]\ncert = \"tls/server.pem\"\nkey = \"/etc/kms/server-key.pem\"\nclient_ca = \"tls/ca.pem\"\n[roles]\nadmin = [\"spiffe://corp/ops/*\"]\nauditor = [\"audit-team\"]\n",
        );
        let c = Config::load(&p).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, dir.path().join("tls/server.pem"));
        assert_eq!(tls.key, Path::new("/etc/kms/server-key.pem"));
        assert_eq!(c.roles.admin.len(), 1);
        assert_eq!(
            c.roles.auditor.first().map(|p| p.as_str()),
            Some("audit-team")
        );
        assert_eq!(
            c.storage.file(),
            Some(dir.path().join("data/kms.redb").as_path())
        );
        assert_eq!(c.hsm.module, dir.path().join("mod.so"));
        assert_eq!(c.log.level, tracing::Level::DEBUG);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.requests, tracing::Level::DEBUG);
        assert_eq!(c.metrics_listen, None);
        assert!(
            matches!(c.storage, StorageSettings::Redb { cache_bytes, .. } if cache_bytes == 64 << 20)
        );
        // The page cache: configurable, bounded.
        let text = std::fs::read_to_string(&p).unwrap();
        for (mib, want) in [("16", Some(16 << 20)), ("0", None), ("70000", None)] {
            let p = write(
                dir.path(),
                &text.replace(
                    "path = \"data/kms.redb\"\n",
                    &format!("path = \"data/kms.redb\"\ncache_mib = {mib}\n"),
                ),
            );
            match (Config::load(&p), want) {
                (Ok(c), Some(bytes)) => assert!(
                    matches!(c.storage, StorageSettings::Redb { cache_bytes, .. } if cache_bytes == bytes)
                ),
                (Err(e), None) => {
                    assert_eq!(e.to_string(), "storage.cache_mib (1..=65536): out of range")
                }
                (other, _) => panic!("cache_mib = {mib}: {other:?}"),
            }
        }
    }

    #[test]
    fn retention_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mod.so"), b"").unwrap();
        let head = "listen = \"127.0.0.1:1\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"mod.so\"\ntoken_label = \"kms\"\npin_env = \"P\"\n[tls]\nplaintext_loopback = true\n[audit]\n";
        let load = |audit: &str| Config::load(&write(dir.path(), &format!("{head}{audit}")));
        let c = load(
            "retain_days = 90\narchive_dir = \"archive\"\narchive_command = [\"/bin/true\"]\n",
        )
        .unwrap();
        let policy = c.retention.unwrap();
        assert_eq!(policy.max_age, Some(Duration::from_secs(90 * 86_400)));
        assert!(dir.path().join("archive").is_dir());
        for (audit, want) in [
            (
                "retain_days = 0\narchive_dir = \"a\"\n",
                "audit.retain_days (1..=36500): out of range",
            ),
            (
                "retain_days = 36501\narchive_dir = \"a\"\n",
                "audit.retain_days (1..=36500): out of range",
            ),
            (
                "retain_records = 0\narchive_dir = \"a\"\n",
                "audit.retain_records (1 or more): out of range",
            ),
            (
                "retain_days = 1\narchive_dir = \"a\"\narchive_command = []\n",
                "audit: archive_command names no program (a list: program, then its arguments)",
            ),
            (
                "retain_days = 1\narchive_dir = \"a\"\narchive_command = [\"\"]\n",
                "audit: archive_command names no program (a list: program, then its arguments)",
            ),
            (
                "retain_days = 1\n",
                "audit: retain_days and retain_records need archive_dir: records leave the store only for an archive",
            ),
            (
                "archive_dir = \"a\"\n",
                "audit: archive_dir and archive_command need retain_days or retain_records",
            ),
        ] {
            assert_eq!(load(audit).unwrap_err().to_string(), want, "{audit}");
        }
    }

    #[test]
    fn storage_backends_take_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mod.so"), b"").unwrap();
        let head = "listen = \"127.0.0.1:1\"\n[hsm]\nmodule = \"mod.so\"\ntoken_label = \"kms\"\npin_env = \"P\"\n[tls]\nplaintext_loopback = true\n[storage]\n";
        let load = |storage: &str| Config::load(&write(dir.path(), &format!("{head}{storage}")));
        let pg = "backend = \"postgres\"\nurl = \"postgresql://kms@127.0.0.1:5432/kms?sslmode=disable\"\n";
        let c = load(&format!(
            "{pg}password_file = \"pg.pass\"\nconnections = 4\ntimeout_seconds = 2\n"
        ))
        .unwrap();
        match c.storage {
            StorageSettings::Postgres(s) => {
                assert_eq!(s.url, "postgresql://kms@127.0.0.1:5432/kms?sslmode=disable");
                assert_eq!(
                    s.password,
                    Some(crate::store::SecretSource::File(dir.path().join("pg.pass")))
                );
                assert_eq!((s.connections, s.timeout.as_secs()), (4, 2));
                assert_eq!(s.ca_file, None);
            }
            other => panic!("{other:?}"),
        }
        for (storage, want) in [
            ("", "storage: path (the redb file) is required"),
            (
                "backend = \"etcd\"\n",
                "storage.backend: \"etcd\" is not one of redb, postgres",
            ),
            (
                "path = \"x\"\nurl = \"postgresql://a@b/c\"\n",
                "storage: url, password_env, password_file, ca_file, connections and timeout_seconds are for backend = \"postgres\"",
            ),
            (
                "backend = \"postgres\"\n",
                "storage: url (postgresql://user@host:port/database?sslmode=...) is required",
            ),
            (
                &format!("{pg}path = \"x\"\n"),
                "storage: path and cache_mib are for backend = \"redb\"",
            ),
            (
                &format!("{pg}password_env = \"A\"\npassword_file = \"f\"\n"),
                "storage: set only one of password_env and password_file",
            ),
            (
                &format!("{pg}password_env = \"1A-\"\n"),
                "storage: password_env: not a valid environment variable name",
            ),
            (
                &format!("{pg}connections = 0\n"),
                "storage.connections (1..=256): out of range",
            ),
            (
                &format!("{pg}timeout_seconds = 301\n"),
                "storage.timeout_seconds (1..=300): out of range",
            ),
        ] {
            assert_eq!(load(storage).unwrap_err().to_string(), want, "{storage}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "listen = \"0.0.0.0:8200\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"/nonexistent.so\"\ntoken_label = \"kms\"\npin_env = \"P\"\n[tls]\nplaintext_loopback = true\n",
        );
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::NotLoopback(_)
        ));
        let base = "listen = \"127.0.0.1:1\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"/x\"\ntoken_label = \"kms\"\npin_env = \"P\"\n";
        let p = write(dir.path(), base);
        assert!(matches!(Config::load(&p).unwrap_err(), ConfigError::NoTls));
        let p = write(
            dir.path(),
            &format!("{base}[tls]\ncert = \"a\"\nkey = \"b\"\n"),
        );
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::BadTls(_)
        ));
        let p = write(
            dir.path(),
            &format!("{base}[tls]\nplaintext_loopback = true\ncert = \"a\"\n"),
        );
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::BadTls(_)
        ));
        let p = write(
            dir.path(),
            &format!("{base}[tls]\nplaintext_loopback = true\n[roles]\nadmin = [\"*\"]\n"),
        );
        let e = Config::load(&p).unwrap_err();
        assert!(e.to_string().starts_with("roles.admin: "), "{e}");
        let p = write(
            dir.path(),
            &format!("{base}[tls]\nplaintext_loopback = true\n[unseal]\nmax_failed_shares = 0\n"),
        );
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::BadUnseal(_)
        ));
        for (line, want) in [
            ("handshake_timeout_seconds = 0", "handshake_timeout_seconds"),
            (
                "max_handshakes_per_address = 0",
                "max_handshakes_per_address",
            ),
            (
                "anonymous_max_request_bytes = 17000000",
                "anonymous_max_request_bytes",
            ),
            ("refused_calls_per_minute = 0", "refused_calls_per_minute"),
            ("max_connections = 15", "max_connections"),
            (
                "max_connections_per_address = 0",
                "max_connections_per_address",
            ),
            ("max_anonymous_connections = 0", "max_anonymous_connections"),
            (
                "max_anonymous_connections_per_address = 0",
                "max_anonymous_connections_per_address",
            ),
            (
                "anonymous_idle_timeout_seconds = 3601",
                "anonymous_idle_timeout_seconds",
            ),
            (
                "anonymous_calls_per_minute = 0",
                "anonymous_calls_per_minute",
            ),
        ] {
            let p = write(
                dir.path(),
                &format!("{base}[tls]\nplaintext_loopback = true\n[limits]\n{line}\n"),
            );
            let e = Config::load(&p).unwrap_err();
            assert!(
                matches!(e, ConfigError::BadLimit(_)) && e.to_string().contains(want),
                "{e}"
            );
        }
        let p = write(
            dir.path(),
            &format!("{base}[tls]\nplaintext_loopback = true\n[roles]\ncustodian = [\"a*b\"]\n"),
        );
        let e = Config::load(&p).unwrap_err();
        assert!(e.to_string().starts_with("roles.custodian: "), "{e}");
        let p = write(
            dir.path(),
            "listen = \"nope\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"/x\"\ntoken_label = \"kms\"\npin_env = \"P\"\n",
        );
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::BadListen(_)
        ));
        let p = write(
            dir.path(),
            "listen = \"127.0.0.1:1\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"/nonexistent.so\"\ntoken_label = \"kms\"\npin_env = \"P\"\n[tls]\nplaintext_loopback = true\n",
        );
        let e = Config::load(&p).unwrap_err();
        assert!(e.to_string().contains("/nonexistent.so"), "{e}");
        let p = write(dir.path(), "listen = \"127.0.0.1:1\"\nlisten_tls = true\n");
        let e = Config::load(&p).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        let e = Config::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }
}
