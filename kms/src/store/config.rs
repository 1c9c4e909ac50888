//! `[storage]`: which store the server keeps its state in, checked, and how it is opened.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::section::{ConfigError, resolve, within};

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
    pub(crate) fn validate(self, base: &Path) -> Result<StorageSettings, ConfigError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::SecretSource;

    #[test]
    fn storage_backends_take_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        // The table alone, as `Config::load` checks it (config.rs tests the whole file).
        let load = |storage: &str| {
            toml::from_str::<StorageConfig>(storage)
                .map_err(|e| e.to_string())?
                .validate(dir.path())
                .map_err(|e| e.to_string())
        };
        let pg = "backend = \"postgres\"\nurl = \"postgresql://kms@127.0.0.1:5432/kms?sslmode=disable\"\n";
        let c = load(&format!(
            "{pg}password_file = \"pg.pass\"\nconnections = 4\ntimeout_seconds = 2\n"
        ))
        .unwrap();
        match c {
            StorageSettings::Postgres(s) => {
                assert_eq!(s.url, "postgresql://kms@127.0.0.1:5432/kms?sslmode=disable");
                assert_eq!(
                    s.password,
                    Some(SecretSource::File(dir.path().join("pg.pass")))
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
}
