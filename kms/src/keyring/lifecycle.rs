//! The rules of a key's life, as pure functions: which version may be used for what, how a
//! version's state may change, and how the nonce budget is spent. No store, no HSM, no
//! locks: the keyring applies these rules under its locks, and the tests below check them
//! without a server.

use super::KeyringError;
use super::model::{KeyMeta, VersionState};

/// What a version is used for: making new data (encrypt, sign, MAC: any enabled version,
/// in practice the primary) or reading existing data (decrypt, verify: also at or above
/// the key's minimum decryption version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VersionUse {
    Make,
    Read,
}

impl KeyMeta {
    /// Whether `version` may be used for `purpose`: it exists, it is enabled and, to read
    /// existing data, it is at or above the minimum decryption version.
    pub(super) fn check_use(&self, version: u32, purpose: VersionUse) -> Result<(), KeyringError> {
        let name = &self.name;
        let vm = self
            .version(version)
            .ok_or_else(|| KeyringError::VersionNotFound {
                name: name.clone(),
                version,
            })?;
        if purpose == VersionUse::Read && version < self.min_decryption_version {
            return Err(KeyringError::BelowMinimum {
                name: name.clone(),
                version,
                min: self.min_decryption_version,
            });
        }
        if vm.state != VersionState::Enabled {
            return Err(KeyringError::VersionNotEnabled {
                name: name.clone(),
                version,
                state: vm.state.name(),
            });
        }
        Ok(())
    }
}

impl VersionState {
    /// Enables a disabled (or enabled) version.
    pub(super) fn enable(&mut self) -> Result<(), KeyringError> {
        match self {
            Self::Enabled | Self::Disabled => {
                *self = Self::Enabled;
                Ok(())
            }
            Self::ScheduledForDestruction { .. } => Err(KeyringError::NotAllowed(
                "the version is scheduled for destruction: cancel the destruction first",
            )),
            Self::Destroyed { .. } => Err(KeyringError::NotAllowed("the version is destroyed")),
        }
    }

    /// Disables an enabled (or disabled) version.
    pub(super) fn disable(&mut self) -> Result<(), KeyringError> {
        match self {
            Self::Enabled | Self::Disabled => {
                *self = Self::Disabled;
                Ok(())
            }
            _ => Err(KeyringError::NotAllowed(
                "only an enabled version can be disabled",
            )),
        }
    }

    /// Schedules destruction at `destroy_at`. The primary version is never destroyed.
    pub(super) fn schedule_destruction(
        &mut self,
        is_primary: bool,
        destroy_at: u64,
    ) -> Result<(), KeyringError> {
        if is_primary {
            return Err(KeyringError::NotAllowed(
                "the primary version cannot be destroyed: rotate the key first",
            ));
        }
        match self {
            Self::Enabled | Self::Disabled => {
                *self = Self::ScheduledForDestruction { destroy_at };
                Ok(())
            }
            _ => Err(KeyringError::NotAllowed(
                "the version is already scheduled for destruction or destroyed",
            )),
        }
    }

    /// Cancels a scheduled destruction at time `now`; the version comes back disabled.
    pub(super) fn cancel_destruction(&mut self, now: u64) -> Result<(), KeyringError> {
        match self {
            // Once due, the HSM object may be gone already (destruction is retried until
            // the token confirms it): too late to cancel.
            Self::ScheduledForDestruction { destroy_at } if *destroy_at <= now => {
                Err(KeyringError::NotAllowed(
                    "the version's destruction is due: it can no longer be cancelled",
                ))
            }
            Self::ScheduledForDestruction { .. } => {
                *self = Self::Disabled;
                Ok(())
            }
            _ => Err(KeyringError::NotAllowed(
                "the version is not scheduled for destruction",
            )),
        }
    }
}

/// What spending one message of a version's nonce budget requires, given `n` (the count
/// before this message), `reserved` (the count durably reserved in the store) and `max`
/// (the budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BudgetStep {
    /// Store this new reservation before the message may be sent (a crash never lets a
    /// version exceed its budget).
    pub reserve: Option<u64>,
    /// The version has used three quarters of its budget: rotate the key.
    pub rotate: bool,
}

/// The nonce budget's rule: refuse at `max`, reserve in blocks of `max / 64` (at least 1,
/// at most 65,536) never past `max`, rotate from three quarters of `max`.
pub(super) fn budget_step(n: u64, reserved: u64, max: u64) -> Result<BudgetStep, Exhausted> {
    if n >= max {
        return Err(Exhausted);
    }
    let reserve = (n >= reserved).then(|| {
        let block = (max / 64).clamp(1, 1 << 16);
        n.saturating_add(block).min(max)
    });
    Ok(BudgetStep {
        reserve,
        rotate: n >= max - max / 4,
    })
}

/// A version at its nonce budget: it refuses to encrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Exhausted;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::keyring::model::{Algorithm, Protection, VersionMeta};
    use std::collections::BTreeMap;

    fn key(states: &[VersionState], primary: u32, min: u32) -> KeyMeta {
        KeyMeta {
            schema: 1,
            name: "k".into(),
            key_id: "00".repeat(16),
            purpose: Algorithm::Aes256Gcm.purpose(),
            algorithm: Algorithm::Aes256Gcm,
            protection: Protection::Software,
            created_at: 0,
            primary,
            min_decryption_version: min,
            rotation_period: None,
            next_rotation_at: None,
            labels: BTreeMap::new(),
            versions: states
                .iter()
                .enumerate()
                .map(|(i, s)| VersionMeta {
                    version: u32::try_from(i).unwrap() + 1,
                    state: *s,
                    created_at: 0,
                    salt: None,
                    hsm_label: None,
                    hsm_id: None,
                    public_key: None,
                    material: None,
                    origin: Default::default(),
                })
                .collect(),
            origin: Default::default(),
            import_job: None,
        }
    }

    #[test]
    fn only_enabled_versions_at_or_above_the_minimum_read() {
        let scheduled = VersionState::ScheduledForDestruction { destroy_at: 9 };
        let destroyed = VersionState::Destroyed { destroyed_at: 9 };
        let k = key(
            &[
                VersionState::Enabled,
                VersionState::Enabled,
                VersionState::Disabled,
                scheduled,
                destroyed,
                VersionState::Enabled,
            ],
            6,
            2,
        );
        use VersionUse::{Make, Read};
        // Below the minimum a version never reads; the rule for making does not look at
        // the minimum (only the primary makes, and the minimum never passes it).
        assert!(k.check_use(1, Make).is_ok());
        assert!(matches!(
            k.check_use(1, Read),
            Err(KeyringError::BelowMinimum {
                version: 1,
                min: 2,
                ..
            })
        ));
        assert!(k.check_use(2, Read).is_ok());
        assert!(k.check_use(6, Make).is_ok());
        for (v, state) in [
            (3, "DISABLED"),
            (4, "SCHEDULED_FOR_DESTRUCTION"),
            (5, "DESTROYED"),
        ] {
            for purpose in [Make, Read] {
                match k.check_use(v, purpose) {
                    Err(KeyringError::VersionNotEnabled { state: s, .. }) => assert_eq!(s, state),
                    other => panic!("version {v} {purpose:?}: {other:?}"),
                }
            }
        }
        assert!(matches!(
            k.check_use(7, Read),
            Err(KeyringError::VersionNotFound { version: 7, .. })
        ));
        assert!(matches!(
            k.check_use(0, Make),
            Err(KeyringError::VersionNotFound { version: 0, .. })
        ));
    }

    #[test]
    fn version_states_change_only_along_the_lifecycle() {
        use VersionState::*;
        let mut s = Enabled;
        s.disable().unwrap();
        assert_eq!(s, Disabled);
        s.disable().unwrap();
        assert_eq!(s, Disabled, "disabling twice is idempotent");
        s.enable().unwrap();
        assert_eq!(s, Enabled);
        s.enable().unwrap();
        assert_eq!(s, Enabled, "enabling twice is idempotent");

        assert!(
            s.schedule_destruction(true, 100).is_err(),
            "the primary is never destroyed"
        );
        assert_eq!(s, Enabled, "a refused change changes nothing");
        s.schedule_destruction(false, 100).unwrap();
        assert_eq!(s, ScheduledForDestruction { destroy_at: 100 });
        assert!(s.schedule_destruction(false, 200).is_err());
        assert!(s.enable().is_err(), "cancel first");
        assert!(s.disable().is_err());
        assert_eq!(s, ScheduledForDestruction { destroy_at: 100 });

        assert!(s.cancel_destruction(100).is_err(), "due: too late");
        assert!(s.cancel_destruction(150).is_err());
        s.cancel_destruction(99).unwrap();
        assert_eq!(
            s, Disabled,
            "a cancelled destruction leaves the version disabled"
        );
        assert!(s.cancel_destruction(0).is_err(), "nothing to cancel");

        let mut gone = Destroyed { destroyed_at: 1 };
        assert!(gone.enable().is_err());
        assert!(gone.disable().is_err());
        assert!(gone.schedule_destruction(false, 5).is_err());
        assert!(gone.cancel_destruction(0).is_err());
        assert_eq!(gone, Destroyed { destroyed_at: 1 });
    }

    /// Spends a whole budget the way the keyring does and returns what happened.
    fn spend(max: u64) -> (Vec<u64>, Option<u64>, u64) {
        let mut reserved = 0;
        let mut reservations = Vec::new();
        let mut first_rotation = None;
        let mut sent = 0;
        for n in 0.. {
            let Ok(step) = budget_step(n, reserved, max) else {
                assert_eq!(n, max, "refused before the budget was spent");
                break;
            };
            if let Some(r) = step.reserve {
                assert!(r > n && r <= max, "reservation {r} at {n} of {max}");
                reservations.push(r);
                reserved = r;
            }
            assert!(
                n < reserved,
                "message {n} sent without a durable reservation"
            );
            if step.rotate {
                first_rotation.get_or_insert(n);
            }
            sent += 1;
        }
        (reservations, first_rotation, sent)
    }

    #[test]
    fn the_nonce_budget_is_never_exceeded_and_rotates_at_three_quarters() {
        let (res, rot, sent) = spend(4096);
        assert_eq!(sent, 4096);
        assert_eq!(res.len(), 64, "blocks of max/64");
        assert_eq!(res[0], 64);
        assert_eq!(*res.last().unwrap(), 4096);
        assert_eq!(rot, Some(3072));

        // The smallest budgets the configuration allows (4): blocks of one message, and
        // rotation still before the end.
        let (res, rot, sent) = spend(4);
        assert_eq!((res, rot, sent), (vec![1, 2, 3, 4], Some(3), 4));
        let (res, rot, sent) = spend(7);
        assert_eq!((res.len(), rot, sent), (7, Some(6), 7));
        assert_eq!(budget_step(0, 0, 0), Err(Exhausted));
    }

    #[test]
    fn the_default_budget_reserves_in_blocks_of_65536() {
        let max = crate::keyring::DEFAULT_MAX_MESSAGES;
        assert_eq!(
            budget_step(0, 0, max).unwrap(),
            BudgetStep {
                reserve: Some(1 << 16),
                rotate: false
            }
        );
        assert_eq!(
            budget_step(5, 1 << 16, max).unwrap(),
            BudgetStep {
                reserve: None,
                rotate: false
            }
        );
        let three_quarters = max - max / 4;
        assert!(!budget_step(three_quarters - 1, max, max).unwrap().rotate);
        assert!(budget_step(three_quarters, max, max).unwrap().rotate);
        assert_eq!(
            budget_step(max - 1, max - 10, max).unwrap().reserve,
            Some(max)
        );
        assert_eq!(budget_step(max, max, max), Err(Exhausted));
    }
}
