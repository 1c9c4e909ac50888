//! `[audit]`: when checkpoints are signed, and which records are archived and where,
//! checked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::section::{ConfigError, resolve, within};

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

impl AuditConfig {
    /// The retention policy, if any; the archive directory is resolved against `base` and
    /// created (0700) when missing.
    pub(crate) fn retention(
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

    pub(crate) fn validate(&self) -> Result<crate::audit::CheckpointPolicy, ConfigError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn retention_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        // The table alone, as `Config::load` checks it (config.rs tests the whole file).
        let load = |audit: &str| {
            toml::from_str::<AuditConfig>(audit)
                .map_err(|e| e.to_string())?
                .retention(dir.path())
                .map_err(|e| e.to_string())
        };
        let c = load(
            "retain_days = 90\narchive_dir = \"archive\"\narchive_command = [\"/bin/true\"]\n",
        )
        .unwrap();
        let policy = c.unwrap();
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
}
