//! What the secrets engine stores, and the rules on what a caller may store.
//!
//! Every record is sealed by the barrier under a purpose of its own and named by where it
//! is stored ([`crate::barrier::Barrier::seal`]): a secret's metadata by its path, a
//! version's values by path and version, a grant by its id, the engine's configuration by
//! its key. A record copied to another path, version or id does not open.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::SecretsError;
use crate::barrier::Purpose;

/// The purpose of secrets' metadata records.
pub(crate) const METADATA: Purpose = purpose("secrets/metadata");
/// The purpose of versions' values.
pub(crate) const VALUES: Purpose = purpose("secrets/values");
/// The purpose of grants.
pub(crate) const GRANT: Purpose = purpose("secrets/grant");
/// The purpose of the engine's configuration.
pub(crate) const CONFIG: Purpose = purpose("secrets/config");

#[allow(
    clippy::panic,
    reason = "evaluated when the consts are: a bad name fails the build"
)]
const fn purpose(name: &'static str) -> Purpose {
    match Purpose::new(name) {
        Some(p) => p,
        None => panic!("a purpose is [a-z0-9_/-]{{1,64}}"),
    }
}

/// The schema of every record of the engine.
pub(crate) const SCHEMA: u32 = 1;

/// How many versions a secret keeps when neither it nor the engine says (Vault's 10).
pub(crate) const DEFAULT_MAX_VERSIONS: u32 = 10;

/// The most versions a secret may keep: its metadata lists each, and every write rewrites
/// the metadata.
pub(crate) const MAX_VERSIONS_LIMIT: u32 = 1000;

/// The most values in one version.
pub(crate) const MAX_VALUES: usize = 1024;

/// The longest name of a value.
pub(crate) const MAX_VALUE_NAME: usize = 256;

/// Custom metadata: at most 64 entries, names up to 128 bytes, values up to 512 (Vault's).
pub(crate) const MAX_CUSTOM: usize = 64;
const MAX_CUSTOM_NAME: usize = 128;
const MAX_CUSTOM_VALUE: usize = 512;

/// The longest `delete_version_after`: 100 years, in seconds.
pub(crate) const MAX_DELETE_AFTER: u64 = 100 * 366 * 86_400;

/// One version, as the metadata lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Version {
    /// Unix milliseconds.
    pub created_ms: u64,
    /// When it was (or, with `delete_version_after`, will be) deleted, Unix milliseconds.
    pub deletion_ms: Option<u64>,
    /// Its values are destroyed (gone from the store).
    pub destroyed: bool,
    /// The size of its values' record in the store, in bytes (absent in records written
    /// before it was kept): whether a read of it may run on an async worker
    /// ([`super::Secrets::reads_quickly`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
}

/// What a version is at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Readable.
    Live,
    /// Deleted: unreadable until undeleted.
    Deleted,
    /// Destroyed: gone.
    Destroyed,
}

impl Version {
    /// What the version is at `now_ms`.
    pub(crate) fn state(&self, now_ms: u64) -> State {
        if self.destroyed {
            State::Destroyed
        } else if self.deletion_ms.is_some_and(|t| t <= now_ms) {
            State::Deleted
        } else {
            State::Live
        }
    }
}

/// A secret's metadata. Not secret itself (no value is in it), but sealed all the same,
/// so that only kms can have written it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Metadata {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
    /// The highest version ever written (0: none). Never goes down while the metadata lives.
    pub current: u64,
    /// Versions kept: 0 means the engine's.
    pub max_versions: u32,
    /// Every write must give check-and-set.
    pub cas_required: bool,
    /// Seconds after which a new version is deleted: 0 means the engine's.
    pub delete_version_after: u64,
    /// The caller's description of the secret (not secret).
    pub custom: BTreeMap<String, String>,
    /// The versions kept, by number.
    pub versions: BTreeMap<u64, Version>,
}

impl Metadata {
    /// The metadata of a secret made at `now_ms`, with no version yet.
    pub(crate) fn new(now_ms: u64) -> Self {
        Self {
            schema: SCHEMA,
            created_ms: now_ms,
            updated_ms: now_ms,
            current: 0,
            max_versions: 0,
            cas_required: false,
            delete_version_after: 0,
            custom: BTreeMap::new(),
            versions: BTreeMap::new(),
        }
    }

    /// The oldest version kept (0: none).
    pub(crate) fn oldest(&self) -> u64 {
        self.versions.keys().next().copied().unwrap_or(0)
    }

    /// Whether a version can be read at `now_ms`.
    pub(crate) fn any_live(&self, now_ms: u64) -> bool {
        self.versions
            .values()
            .any(|v| v.state(now_ms) == State::Live)
    }
}

/// The engine's configuration (Vault's `config`), as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EngineConfig {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Versions kept by a secret that does not say: never 0 ([`DEFAULT_MAX_VERSIONS`] when
    /// not set, or set to 0).
    pub max_versions: u32,
    /// Every write of every secret must give check-and-set.
    pub cas_required: bool,
    /// Seconds after which a new version is deleted (0: never), for a secret that does not
    /// say (or says more).
    pub delete_version_after: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            schema: SCHEMA,
            max_versions: DEFAULT_MAX_VERSIONS,
            cas_required: false,
            delete_version_after: 0,
        }
    }
}

impl EngineConfig {
    /// The versions `meta` keeps: its own setting, else the engine's.
    pub(crate) fn max_versions(&self, meta: &Metadata) -> u32 {
        if meta.max_versions != 0 {
            meta.max_versions
        } else {
            self.max_versions
        }
    }

    /// The seconds after which a new version of `meta` is deleted (0: never): the smaller of
    /// the secret's and the engine's where both are set, as Vault's.
    pub(crate) fn delete_after(&self, meta: &Metadata) -> u64 {
        match (meta.delete_version_after, self.delete_version_after) {
            (0, e) => e,
            (m, 0) => m,
            (m, e) => m.min(e),
        }
    }

    /// Whether a write of `meta` must give check-and-set.
    pub(crate) fn cas_required(&self, meta: Option<&Metadata>) -> bool {
        self.cas_required || meta.is_some_and(|m| m.cas_required)
    }
}

/// A version's values: names to strings. The values zeroize on drop; no `Debug` shows
/// them, no `Clone` or `PartialEq` exists.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Values(pub BTreeMap<String, String>);

impl Drop for Values {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Values(<{} values redacted>)", self.0.len())
    }
}

impl Values {
    /// Their size as the limit counts it: every name and value, in bytes.
    pub(crate) fn size(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// Checks the values against the limits: at most `max_bytes`, [`MAX_VALUES`] values,
    /// names of 1 to [`MAX_VALUE_NAME`] bytes without control or invisible characters.
    pub(crate) fn check(&self, max_bytes: usize) -> Result<(), SecretsError> {
        if self.0.is_empty() {
            return Err(SecretsError::BadRequest(
                "a secret's version holds at least one value".to_owned(),
            ));
        }
        if self.0.len() > MAX_VALUES {
            return Err(SecretsError::BadRequest(format!(
                "a secret's version holds at most {MAX_VALUES} values"
            )));
        }
        for name in self.0.keys() {
            check_label(name, MAX_VALUE_NAME, "a value's name")?;
        }
        let size = self.size();
        if size > max_bytes {
            return Err(SecretsError::TooLarge {
                size,
                max: max_bytes,
            });
        }
        Ok(())
    }
}

/// Checks custom metadata: at most [`MAX_CUSTOM`] entries, names of 1 to 128 bytes and
/// values of up to 512, without control or invisible characters (they end up in reports).
pub(crate) fn check_custom(custom: &BTreeMap<String, String>) -> Result<(), SecretsError> {
    if custom.len() > MAX_CUSTOM {
        return Err(SecretsError::BadRequest(format!(
            "custom_metadata holds at most {MAX_CUSTOM} entries"
        )));
    }
    for (k, v) in custom {
        check_label(k, MAX_CUSTOM_NAME, "a custom_metadata name")?;
        if v.len() > MAX_CUSTOM_VALUE || v.chars().any(crate::policy::is_invisible) {
            return Err(SecretsError::BadRequest(format!(
                "a custom_metadata value is at most {MAX_CUSTOM_VALUE} bytes, without control or invisible characters"
            )));
        }
    }
    Ok(())
}

fn check_label(name: &str, max: usize, what: &str) -> Result<(), SecretsError> {
    if !crate::policy::is_label(name, max) {
        return Err(SecretsError::BadRequest(format!(
            "{what} is 1 to {max} bytes, without control or invisible characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> Values {
        Values(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn values_are_bounded_and_never_shown() {
        let v = values(&[("password", "hunter2")]);
        assert!(v.check(1024).is_ok());
        assert_eq!(format!("{v:?}"), "Values(<1 values redacted>)");
        assert!(matches!(
            values(&[("a", &"x".repeat(100))]).check(100),
            Err(SecretsError::TooLarge {
                size: 101,
                max: 100
            })
        ));
        assert!(values(&[]).check(100).is_err());
        assert!(values(&[("", "x")]).check(100).is_err());
        assert!(values(&[("a\u{200b}", "x")]).check(100).is_err());
        let many: Vec<(String, String)> = (0..=MAX_VALUES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(Values(many.into_iter().collect()).check(1 << 20).is_err());
    }

    #[test]
    fn the_engine_and_the_secret_settings_combine_as_documented() {
        let config = EngineConfig::default();
        let mut meta = Metadata::new(0);
        assert_eq!(config.max_versions(&meta), DEFAULT_MAX_VERSIONS);
        meta.max_versions = 3;
        assert_eq!(config.max_versions(&meta), 3);
        assert_eq!(config.delete_after(&meta), 0);
        meta.delete_version_after = 60;
        assert_eq!(config.delete_after(&meta), 60);
        let strict = EngineConfig {
            delete_version_after: 30,
            cas_required: true,
            ..config
        };
        assert_eq!(strict.delete_after(&meta), 30);
        assert!(strict.cas_required(None));
        assert!(!config.cas_required(Some(&meta)));
        meta.cas_required = true;
        assert!(config.cas_required(Some(&meta)));
    }

    #[test]
    fn a_version_is_live_deleted_or_destroyed() {
        let mut v = Version {
            created_ms: 0,
            deletion_ms: Some(100),
            destroyed: false,
            stored_bytes: None,
        };
        assert_eq!(v.state(99), State::Live);
        assert_eq!(v.state(100), State::Deleted);
        v.destroyed = true;
        assert_eq!(v.state(0), State::Destroyed);
    }
}
