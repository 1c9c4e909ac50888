//! `[databases]`: how the servers revoke expired leases, checked.

use serde::Deserialize;

use crate::section::{ConfigError, within};

/// `[databases]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct DatabasesConfig {
    /// The most revocations a server makes per second (default 50, 1 to 10000): a backlog
    /// after an outage is revoked at this rate, beside the calls.
    pub revocations_per_second: Option<u64>,
    /// The tries of a revocation before its lease is marked irrevocable (default 10, 1 to
    /// 100).
    pub max_attempts: Option<u64>,
    /// The wait after a revocation's first failure, doubled after each (default 5 s, 1 to
    /// 3600; at most 15 minutes between two tries).
    pub retry_seconds: Option<u64>,
    /// How often the reconcile pass looks for logins no lease names (default 600 s, 1 to
    /// 86400).
    pub reconcile_seconds: Option<u64>,
}

impl DatabasesConfig {
    /// The engine's settings.
    pub(crate) fn validate(&self) -> Result<super::Settings, ConfigError> {
        let d = super::Settings::default();
        Ok(super::Settings {
            revocations_per_second: within(
                self.revocations_per_second,
                d.revocations_per_second,
                1..=10_000,
                ConfigError::BadDatabases("revocations_per_second (1..=10000)"),
            )?,
            max_attempts: u32::try_from(within(
                self.max_attempts,
                u64::from(d.max_attempts),
                1..=100,
                ConfigError::BadDatabases("max_attempts (1..=100)"),
            )?)
            .unwrap_or(d.max_attempts),
            retry_seconds: within(
                self.retry_seconds,
                d.retry_seconds,
                1..=3600,
                ConfigError::BadDatabases("retry_seconds (1..=3600)"),
            )?,
            reconcile_seconds: within(
                self.reconcile_seconds,
                d.reconcile_seconds,
                1..=86_400,
                ConfigError::BadDatabases("reconcile_seconds (1..=86400)"),
            )?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_have_defaults_and_bounds() {
        let d = DatabasesConfig::default().validate().unwrap();
        assert_eq!(
            (
                d.revocations_per_second,
                d.max_attempts,
                d.retry_seconds,
                d.reconcile_seconds
            ),
            (50, 10, 5, 600)
        );
        for bad in [
            DatabasesConfig {
                revocations_per_second: Some(0),
                ..Default::default()
            },
            DatabasesConfig {
                max_attempts: Some(101),
                ..Default::default()
            },
            DatabasesConfig {
                retry_seconds: Some(0),
                ..Default::default()
            },
            DatabasesConfig {
                reconcile_seconds: Some(86_401),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
