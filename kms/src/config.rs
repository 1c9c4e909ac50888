//! The server's configuration file (TOML), documented key by key in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_pkcs11_conf::{HsmConfig, ValidHsmConfig};
use serde::Deserialize;

use crate::access::limiter::{LimitsConfig, UnsealConfig};
use crate::audit::config::AuditConfig;
use crate::keyring::config::KeyringConfig;
use crate::section::{resolve, within};
use crate::store::{StorageConfig, StorageSettings};

pub use crate::section::ConfigError;

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
    /// The `[secrets]` table.
    #[serde(default)]
    pub secrets: crate::secrets::config::SecretsConfig,
    /// The `[databases]` table.
    #[serde(default)]
    pub databases: crate::databases::config::DatabasesConfig,
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
    /// The `[kubernetes_kms]` table (`crate::kubernetes::config`).
    #[serde(default)]
    pub kubernetes_kms: crate::kubernetes::config::KubernetesConfig,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsConfig {
    /// Where `GET /metrics` is served (plaintext HTTP), e.g. `127.0.0.1:9464`; off when
    /// absent.
    pub listen: Option<String>,
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
    /// The engines' settings (`[keyring]`, `[secrets]`).
    pub engines: crate::engines::Settings,
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
    /// `[kubernetes_kms]`: the Kubernetes KMS v2 plugin's socket, if on.
    pub kubernetes: Option<crate::kubernetes::KubernetesSettings>,
}

impl Config {
    /// Reads, parses and checks a configuration file. Relative paths in it are relative to
    /// the file's directory.
    ///
    /// The file must be private (docs/configuration.md, "The file is private"): no bit
    /// for others, no write for its group, owned by root or the server's user, in a
    /// directory only they can write; else [`ConfigError::TooOpen`],
    /// [`ConfigError::NotOwned`] or [`ConfigError::DirTooOpen`]. Every command that loads a
    /// configuration (`kms server`, `kms dev`, `kms backup restore`, `kms pkcs11 probe
    /// --config`) acts on the server's store or HSM, so none of them takes an open one.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_private(path)?;
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
        let kubernetes = file.kubernetes_kms.validate(base)?;
        Ok(Self {
            listen,
            storage: file.storage.validate(base)?,
            hsm,
            log,
            metrics_listen,
            engines: crate::engines::Settings {
                keyring,
                secrets: file.secrets.validate()?,
                databases: file.databases.validate()?,
            },
            maintenance_interval,
            checkpoints: file.audit.validate()?,
            retention: file.audit.retention(base)?,
            tls,
            tls_reload_check,
            roles,
            unseal_limit,
            limits,
            http,
            kubernetes,
        })
    }
}

/// Opens the config file, checks that it is private (on the opened file, so what is checked
/// is what is read) and reads it.
fn read_private(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    // The directory of the file itself, past any symbolic link to it.
    let real = std::fs::canonicalize(path).map_err(read_err)?;
    let dir = match real.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("/"),
    };
    let mut dir_mode = std::fs::metadata(dir).map_err(read_err)?.mode();
    // No one writes a directory on a read-only mount (a Kubernetes Secret or ConfigMap
    // volume: a 1777 tmpfs root, mounted read-only).
    if rustix::fs::statvfs(dir)
        .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    {
        dir_mode &= !CONFIG_DIR_FORBIDDEN;
    }
    check_private(
        path,
        meta.mode(),
        meta.uid(),
        rustix::process::geteuid().as_raw(),
        (dir, dir_mode),
    )?;
    if !crate::section::group_is_servers(meta.mode(), meta.gid()) {
        return Err(ConfigError::NotServersGroup {
            path: path.to_owned(),
            group: meta.gid(),
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_err)?;
    Ok(text)
}

/// The permission bits a config file must not have: any for others (it names where the
/// PIN is and the HSM module the server loads), and write for its group (whoever can
/// write it names the admins). Group read stays allowed: packages install the file as
/// `0640 root:kms`, readable by the server through its group.
const CONFIG_FORBIDDEN: u32 = 0o027;

/// The permission bits the config file's directory must not have: write for its group or
/// for others (they could put a file of their own in its place).
const CONFIG_DIR_FORBIDDEN: u32 = 0o022;

/// The rule for a config file, given its mode and owner, the server's effective uid, and
/// its directory with that directory's mode: private to root or the server's user, in a
/// directory only they can write. As OpenSSH's `StrictModes` checks `authorized_keys`.
fn check_private(
    path: &Path,
    mode: u32,
    owner: u32,
    server: u32,
    (dir, dir_mode): (&Path, u32),
) -> Result<(), ConfigError> {
    if mode & CONFIG_FORBIDDEN != 0 {
        return Err(ConfigError::TooOpen {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    if owner != 0 && owner != server {
        return Err(ConfigError::NotOwned {
            path: path.to_owned(),
            owner,
            server,
        });
    }
    if dir_mode & CONFIG_DIR_FORBIDDEN != 0 {
        return Err(ConfigError::DirTooOpen {
            path: dir.to_owned(),
            mode: dir_mode & 0o7777,
        });
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join("kms.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        p
    }

    #[test]
    fn a_config_read_by_its_group_is_the_servers_group() {
        // 0640 root:kms for a server running as kms (egid 999), or in kms's groups.
        assert!(crate::section::group_may_read(0o100640, 999, 999, &[]));
        assert!(crate::section::group_may_read(0o100640, 50, 999, &[50]));
        // No group bit: whatever the group.
        assert!(crate::section::group_may_read(0o100600, 100, 999, &[]));
        // 0640 root:users: every member of users would read it.
        assert!(!crate::section::group_may_read(0o100640, 100, 999, &[50]));
    }

    #[test]
    fn a_config_must_be_private() {
        let (file, dir) = (Path::new("/etc/kms/kms.toml"), Path::new("/etc/kms"));
        let check = |mode, owner, server, dir_mode| {
            check_private(file, mode, owner, server, (dir, dir_mode))
        };
        // As packages install it (0640 root:kms in a 0750 or 0755 directory), or the
        // server's own 0600/0400 file: taken.
        for (mode, owner) in [
            (0o100640, 0),
            (0o100600, 0),
            (0o100600, 999),
            (0o100400, 999),
        ] {
            for dir_mode in [0o40750, 0o40755, 0o40700] {
                check(mode, owner, 999, dir_mode).unwrap();
            }
        }
        // Readable, writable or executable by others, or writable by the group: refused,
        // with the file, its mode and the fix in the message.
        for mode in [
            0o100644, 0o100604, 0o100602, 0o100601, 0o100660, 0o100620, 0o100666,
        ] {
            let e = check(mode, 0, 999, 0o40750).unwrap_err();
            assert!(
                matches!(e, ConfigError::TooOpen { mode: m, .. } if m == mode & 0o777),
                "{mode:o}: {e}"
            );
            let text = e.to_string();
            assert!(
                text.contains("/etc/kms/kms.toml")
                    && text.contains(&format!("{:03o}", mode & 0o777))
                    && text.contains("chmod 640"),
                "{text}"
            );
        }
        // Owned by another user, who could change it at will.
        let e = check(0o100600, 1000, 999, 0o40750).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::NotOwned {
                    owner: 1000,
                    server: 999,
                    ..
                }
            ),
            "{e}"
        );
        // In a directory others, or its group, can write (even a sticky one, as /tmp).
        for dir_mode in [0o40775, 0o40757, 0o41777, 0o40770] {
            let e = check(0o100600, 0, 999, dir_mode).unwrap_err();
            assert!(
                matches!(e, ConfigError::DirTooOpen { .. }),
                "{dir_mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod go-w /etc/kms"), "{e}");
        }
    }

    #[test]
    fn load_refuses_an_open_file_before_reading_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        // Not even valid TOML: the mode is checked first, so the error is about the mode.
        let p = write(dir.path(), "not toml");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(&p).unwrap_err();
        assert!(matches!(e, ConfigError::TooOpen { mode: 0o644, .. }), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::Parse { .. }
        ));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Config::load(&p).unwrap_err();
        assert!(
            matches!(e, ConfigError::DirTooOpen { mode: 0o777, .. }),
            "{e}"
        );
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
