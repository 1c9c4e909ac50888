//! `[secrets]`: the largest version a secret may have, checked.

use serde::Deserialize;

use crate::section::{ConfigError, within};

/// `[secrets]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretsConfig {
    /// The largest version of a secret, in bytes of its values' names and values (default
    /// 524288, 512 KiB; 1 to 16 MiB less room for the request around it).
    pub max_secret_bytes: Option<u64>,
}

/// The most `max_secret_bytes` may be: a version travels whole in one request of at most
/// 16 MiB (gRPC's largest message), with room for its framing.
const MAX_MAX_SECRET_BYTES: u64 = 15 * 1024 * 1024;

impl SecretsConfig {
    /// The engine's settings.
    pub(crate) fn validate(&self) -> Result<super::Settings, ConfigError> {
        let d = super::Settings::default();
        let max = within(
            self.max_secret_bytes,
            d.max_secret_bytes as u64,
            1..=MAX_MAX_SECRET_BYTES,
            ConfigError::BadSecrets("max_secret_bytes (1..=15728640)"),
        )?;
        Ok(super::Settings {
            max_secret_bytes: usize::try_from(max).unwrap_or(d.max_secret_bytes),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_has_a_default_and_bounds() {
        let none = SecretsConfig::default().validate().unwrap();
        assert_eq!(none.max_secret_bytes, 512 * 1024);
        let set = SecretsConfig {
            max_secret_bytes: Some(1024),
        };
        assert_eq!(set.validate().unwrap().max_secret_bytes, 1024);
        for bad in [0, MAX_MAX_SECRET_BYTES + 1] {
            let c = SecretsConfig {
                max_secret_bytes: Some(bad),
            };
            assert!(c.validate().is_err(), "{bad}");
        }
    }
}
