//! What every section of the configuration file shares: [`ConfigError`], and the checks of
//! a value's range and a path's base. A leaf: the sections live beside the modules they
//! configure (`store::config`, `keyring::config`, `audit::config`, `access::limiter`), the
//! file and the checks across sections in `config`, and all of them name their errors here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// The file can be read or written by others, or written by its group: it names the
    /// admins, the HSM module the server loads and the PIN's source, so whoever can write
    /// it runs code in the server, and whoever can read it learns where the secrets are.
    #[error(
        "the config file {path} is open to others (mode {mode:03o}): it must not be readable or writable by others nor writable by its group; make it private with `chmod 640` (owner root, group the server's) or `chmod 600`"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's owner is neither root nor the user the server runs as: that user could
    /// change the file, or its mode, at will.
    #[error(
        "the config file {path} is owned by uid {owner}, neither root nor the server's user (uid {server}): `chown root {path}`"
    )]
    NotOwned {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The server's effective uid.
        server: u32,
    },
    /// The file is readable by a group that is not the server's: that group's members
    /// read it too.
    #[error(
        "the config file {path} is readable by its group (gid {group}), which is not the server's: `chgrp` it to the server's group, or `chmod 600`"
    )]
    NotServersGroup {
        /// The file.
        path: PathBuf,
        /// Its group.
        group: u32,
    },
    /// The config file's directory can be written by its group or by others: they could
    /// replace the file with one of their own.
    #[error(
        "the directory {path} of the config file is writable by others or by its group (mode {mode:03o}): they could replace the file; `chmod go-w {path}`"
    )]
    DirTooOpen {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
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
    /// A `[secrets]` value is out of range.
    #[error("secrets.{0}: out of range")]
    BadSecrets(&'static str),
    /// A `[databases]` value is out of range.
    #[error("databases.{0}: out of range")]
    BadDatabases(&'static str),
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
    /// `[metrics] listen` is not an address.
    #[error("metrics.listen: {0:?} is not an address and port (e.g. 127.0.0.1:9464)")]
    BadMetricsListen(String),
    /// The `[hsm]` table.
    #[error(transparent)]
    Hsm(#[from] kms_pkcs11_conf::ConfigError),
    /// `[http] listen` is not an address.
    #[error("http.listen: {0:?} is not an address and port (e.g. 127.0.0.1:8201)")]
    BadHttpListen(String),
    /// `[http]` without the `[tls]` files: the front serves HTTPS with client certificates
    /// only.
    #[error(
        "[http] listen needs the [tls] files (cert, key, client_ca): the Vault-compatible front serves HTTPS with client certificates only"
    )]
    HttpNeedsTls,
    /// An `[http]` value is out of range or not one of its choices.
    #[error("http.{0}")]
    BadHttp(&'static str),
    /// A `[kubernetes_kms]` value is missing or not one.
    #[error("kubernetes_kms.{0}")]
    BadKubernetes(String),
}

/// `path`, or `base/path` when it is relative.
pub(crate) fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_relative() {
        base.join(path)
    } else {
        path
    }
}

/// `v` (or `default`) when it is in `range`, else `err`.
pub(crate) fn within<T: PartialOrd + Copy>(
    v: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
    err: ConfigError,
) -> Result<T, ConfigError> {
    let v = v.unwrap_or(default);
    if range.contains(&v) { Ok(v) } else { Err(err) }
}

/// Whether a file of `mode` and group `gid` is read through its group bits only by the
/// server's own group (its effective group or one of its `groups`): a `0640` file of
/// another group would be read by that group's members too.
pub(crate) fn group_may_read(mode: u32, gid: u32, egid: u32, groups: &[u32]) -> bool {
    mode & 0o070 == 0 || gid == egid || groups.contains(&gid)
}

/// [`group_may_read`] for this process: its effective group and supplementary groups.
pub(crate) fn group_is_servers(mode: u32, gid: u32) -> bool {
    let groups: Vec<u32> = rustix::process::getgroups()
        .map(|g| g.into_iter().map(rustix::process::Gid::as_raw).collect())
        .unwrap_or_default();
    group_may_read(mode, gid, rustix::process::getegid().as_raw(), &groups)
}
