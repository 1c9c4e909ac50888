//! `[keyring]`: the nonce budget, the cache's size and the maintenance interval, checked.

use std::time::Duration;

use serde::Deserialize;

use crate::section::{ConfigError, within};

/// `[keyring]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyringConfig {
    /// AES-GCM messages per key version (default 2^32, the random-nonce limit; auto-rotation
    /// at three quarters of it). Lower it to rotate sooner.
    pub max_messages_per_version: Option<u64>,
    /// Seconds between checks for due rotations and destructions (default 60).
    pub maintenance_interval_seconds: Option<u64>,
    /// The most keys kept read and prepared in memory (default 10,000; the same number of
    /// keys' grant lists apart). A key not among them is read from the store and checked at
    /// its next use (about one store read and one MAC).
    pub cache_keys: Option<u64>,
    /// Testing only: the length of a "day" of the destruction window, in seconds (default
    /// 86400).
    pub testing_day_seconds: Option<u64>,
}

impl KeyringConfig {
    /// The keyring's settings and the maintenance interval.
    pub(crate) fn validate(&self) -> Result<(crate::keyring::Settings, Duration), ConfigError> {
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
        let cache_keys = within(
            self.cache_keys,
            u64::try_from(d.cache_keys).unwrap_or(u64::MAX),
            16..=10_000_000,
            ConfigError::BadKeyring("cache_keys (16..=10000000)"),
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
                cache_keys: usize::try_from(cache_keys).unwrap_or(usize::MAX),
            },
            Duration::from_secs(interval),
        ))
    }
}
