//! The server's configuration file (TOML), documented key by key in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kms_pkcs11_conf::{HsmConfig, ValidHsmConfig};
use serde::Deserialize;

/// The configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
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
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Sign a checkpoint after this many records (default 1000).
    pub checkpoint_every_records: Option<u64>,
    /// Or after this many seconds with new records (default 60).
    pub checkpoint_interval_seconds: Option<u64>,
}

/// `[keyring]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyringConfig {
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
pub struct StorageConfig {
    /// The redb file.
    pub path: PathBuf,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info` (default), `debug` or `trace`.
    pub level: Option<String>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listen address.
    pub listen: SocketAddr,
    /// The redb file.
    pub storage_path: PathBuf,
    /// The HSM.
    pub hsm: ValidHsmConfig,
    /// The log level.
    pub log_level: tracing::Level,
    /// Keyring settings.
    pub keyring: crate::keyring::Settings,
    /// Seconds between maintenance runs.
    pub maintenance_interval: std::time::Duration,
    /// When to sign audit checkpoints.
    pub checkpoints: crate::audit::CheckpointPolicy,
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
    /// `listen` is not a loopback address; TLS does not exist yet.
    #[error(
        "listen: {0} is not a loopback address; without TLS (not yet available) kms serves on loopback only"
    )]
    NotLoopback(SocketAddr),
    /// A `[keyring]` value is out of range.
    #[error("keyring.{0}: out of range")]
    BadKeyring(&'static str),
    /// An `[audit]` value is out of range.
    #[error("audit.{0}: out of range")]
    BadAudit(&'static str),
    /// `[log] level` is unknown.
    #[error("log.level: {0:?} is not one of error, warn, info, debug, trace")]
    BadLogLevel(String),
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

    /// Checks a parsed file; relative paths are resolved against `base`.
    pub fn from_file(mut file: ConfigFile, base: &Path) -> Result<Self, ConfigError> {
        let listen: SocketAddr = file
            .listen
            .parse()
            .map_err(|_| ConfigError::BadListen(file.listen.clone()))?;
        if !listen.ip().is_loopback() {
            return Err(ConfigError::NotLoopback(listen));
        }
        file.hsm.resolve_paths(base);
        let hsm = file.hsm.validate()?;
        let storage_path = if file.storage.path.is_relative() {
            base.join(&file.storage.path)
        } else {
            file.storage.path
        };
        let log_level = match file.log.level.as_deref() {
            None => tracing::Level::INFO,
            Some(l) => l
                .parse()
                .map_err(|_| ConfigError::BadLogLevel(l.to_owned()))?,
        };
        let defaults = crate::keyring::Settings::default();
        let max = file
            .keyring
            .max_messages_per_version
            .unwrap_or(defaults.max_messages_per_version);
        if !(4..=defaults.max_messages_per_version).contains(&max) {
            return Err(ConfigError::BadKeyring(
                "max_messages_per_version (4..=2^32)",
            ));
        }
        let day = file
            .keyring
            .testing_day_seconds
            .unwrap_or(defaults.day_seconds);
        if day == 0 {
            return Err(ConfigError::BadKeyring("testing_day_seconds"));
        }
        let interval = file.keyring.maintenance_interval_seconds.unwrap_or(60);
        if !(1..=86_400).contains(&interval) {
            return Err(ConfigError::BadKeyring(
                "maintenance_interval_seconds (1..=86400)",
            ));
        }
        let every = file.audit.checkpoint_every_records.unwrap_or(1000);
        if !(1..=1_000_000).contains(&every) {
            return Err(ConfigError::BadAudit(
                "checkpoint_every_records (1..=1000000)",
            ));
        }
        let seconds = file.audit.checkpoint_interval_seconds.unwrap_or(60);
        if !(1..=86_400).contains(&seconds) {
            return Err(ConfigError::BadAudit(
                "checkpoint_interval_seconds (1..=86400)",
            ));
        }
        Ok(Self {
            checkpoints: crate::audit::CheckpointPolicy {
                every_records: every,
                interval: std::time::Duration::from_secs(seconds),
            },
            listen,
            storage_path,
            hsm,
            log_level,
            keyring: crate::keyring::Settings {
                max_messages_per_version: max,
                day_seconds: day,
            },
            maintenance_interval: std::time::Duration::from_secs(interval),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
            "listen = \"127.0.0.1:8200\"\n[storage]\npath = \"data/kms.redb\"\n[hsm]\nmodule = \"mod.so\"\ntoken_label = \"kms\"\npin_file = \"pin\"\n[log]\nlevel = \"debug\"\n",
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(c.storage_path, dir.path().join("data/kms.redb"));
        assert_eq!(c.hsm.module, dir.path().join("mod.so"));
        assert_eq!(c.log_level, tracing::Level::DEBUG);
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "listen = \"0.0.0.0:8200\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"/nonexistent.so\"\ntoken_label = \"kms\"\npin_env = \"P\"\n",
        );
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::NotLoopback(_)
        ));
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
            "listen = \"127.0.0.1:1\"\n[storage]\npath = \"x\"\n[hsm]\nmodule = \"/nonexistent.so\"\ntoken_label = \"kms\"\npin_env = \"P\"\n",
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
