//! What the server does by itself: due rotations and destructions, and the removal of
//! expired import parameters (`Keyring::maintain`).

use super::{
    Keyring, KeyringError, Protection, SystemJournal, SystemRecorder, VersionState, hsm_kind,
    import, unhex,
};

/// A key's name, when it next rotates, and its versions due for destruction.
type Due = (String, Option<u64>, Vec<u32>);

impl Keyring {
    /// Rotates keys whose rotation is due and destroys versions whose time has come, as
    /// the schedule says (`keyring::walk`: filled by the verification walk, kept up to date
    /// by every change); each key is read again before anything is done to it. Returns how
    /// many of each it did. Each change is audited (principal `kms`).
    pub(crate) fn maintain(&self, at: u64) -> (usize, usize) {
        let recorder = &*self.recorder;
        let mut names: Vec<Due> = Vec::new();
        let mut expired: Vec<String> = Vec::new();
        for name in self.walk.due(at) {
            let entry = match self.admin().and_then(|_g| self.entry_locked(&name)) {
                Ok(e) => e,
                Err(e @ (KeyringError::NotFound(_) | KeyringError::Tampered(_))) => {
                    tracing::warn!(key = %name, error = %e, "a key due for maintenance cannot be read: left out");
                    self.walk.unschedule(&name);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(key = %name, error = %crate::error_chain(&e), "a key due for maintenance cannot be read now: the next maintenance run tries again");
                    continue;
                }
            };
            let meta = &entry.meta;
            // A due time the key no longer has (a stale schedule) is put right here.
            self.walk.schedule(meta);
            let due: Vec<u32> = meta
                .versions
                .iter()
                .filter(|v| matches!(v.state, VersionState::ScheduledForDestruction { destroy_at } if destroy_at <= at))
                .map(|v| v.version)
                .collect();
            if meta.import_job.as_ref().is_some_and(|j| j.expires_at <= at) {
                expired.push(meta.name.clone());
            }
            names.push((meta.name.clone(), meta.next_rotation_at, due));
        }
        for name in expired {
            if let Err(e) = self.expire_import_parameters(&name, at) {
                tracing::warn!(key = %name, error = %crate::error_chain(&e), "could not remove expired import parameters: the next maintenance run tries again");
            }
        }
        let (mut rotated, mut destroyed) = (0, 0);
        for (name, next_rotation, due) in names {
            if next_rotation.is_some_and(|t| t <= at) {
                match self.pregenerate(&name).and_then(|pre| {
                    let _g = self.admin()?;
                    // Re-check under the lock: another call may have rotated it.
                    let e = self.entry_locked(&name)?;
                    if e.meta.next_rotation_at.is_some_and(|t| t <= at) {
                        let journal = SystemJournal {
                            recorder,
                            operation: "AutoRotateKey",
                            version: None,
                        };
                        self.rotate_locked(&name, None, pre, &journal).map(|_| true)
                    } else {
                        Ok(false)
                    }
                }) {
                    Ok(true) => rotated += 1,
                    Ok(false) => {}
                    Err(e) => tracing::error!(key = %name, error = %e, "automatic rotation failed"),
                }
            }
            for version in due {
                match self.destroy(&name, version, at, recorder) {
                    Ok(true) => destroyed += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(key = %name, version, error = %crate::error_chain(&e), "destruction failed: the version stays due, and the next maintenance run tries again")
                    }
                }
            }
        }
        (rotated, destroyed)
    }

    /// Removes a key's expired import parameters: their wrapping key is destroyed in the
    /// token first, then the key's record forgets them (audited as
    /// `ExpireImportParameters`), so no expired wrapping key outlives a maintenance run.
    fn expire_import_parameters(&self, name: &str, at: u64) -> Result<(), KeyringError> {
        let _g = self.admin()?;
        let entry = self.entry_locked(name)?;
        let Some(job) = entry
            .meta
            .import_job
            .as_ref()
            .filter(|j| j.expires_at <= at)
        else {
            return Ok(());
        };
        let id = unhex(&job.wrapping_id);
        self.hsm
            .destroy_key(import::WRAPPING_KIND, &job.wrapping_label, id.as_deref())?;
        let mut meta = entry.meta.clone();
        meta.import_job = None;
        let journal = SystemJournal {
            recorder: &*self.recorder,
            operation: "ExpireImportParameters",
            version: None,
        };
        self.commit(meta, Some(&entry), &journal)?;
        tracing::info!(key = %name, "expired import parameters removed");
        Ok(())
    }

    /// Destroys a version whose scheduled time has come: the salt is erased (software) or
    /// the HSM object destroyed. Crypto-shredding: the material cannot be made again.
    /// `Ok(false)`: not destroyed (no longer due, or its cancellation recorded in the HSM).
    ///
    /// An HSM object is destroyed only if the HSM holds no record that this very schedule
    /// was cancelled (`cancel_label`): a store writer who rolls a key record back to its
    /// schedule cannot make kms destroy it. Such a version is disabled again, as the
    /// cancellation left it, and the change audited.
    fn destroy(
        &self,
        name: &str,
        version: u32,
        at: u64,
        recorder: &dyn SystemRecorder,
    ) -> Result<bool, KeyringError> {
        let _g = self.admin()?;
        let entry = self.entry_locked(name)?;
        let mut meta = entry.meta.clone();
        let (protection, algorithm, key_id) =
            (meta.protection, meta.algorithm, meta.key_id.clone());
        let v = meta
            .version_mut(version)
            .ok_or(KeyringError::Internal("version"))?;
        let VersionState::ScheduledForDestruction { destroy_at } = v.state else {
            return Ok(false);
        };
        if destroy_at > at {
            return Ok(false);
        }
        let cancelled = cancel_label(&key_id, version, destroy_at);
        if protection == Protection::Hsm && self.hsm.has_marker(&cancelled)? {
            v.state = VersionState::Disabled;
            let journal = SystemJournal {
                recorder,
                operation: "RestoreCancelledDestruction",
                version: Some(version),
            };
            self.commit(meta, Some(&entry), &journal)?;
            tracing::warn!(key = %name, version, "the stored record says this version is due for destruction, but the HSM records that this destruction was cancelled: the record was rolled back; the version is kept, disabled");
            return Ok(false);
        }
        // The HSM object first, until the token confirms it is gone: if that fails nothing
        // is recorded, the version stays due, and the next run tries again (the version
        // can no longer be cancelled once due). Then the record, salt erased, with its
        // audit record; if that fails the next run finds the object gone and records it.
        if protection == Protection::Hsm
            && let Some(label) = v.hsm_label.clone()
        {
            let id = v.hsm_id.as_deref().and_then(unhex);
            self.hsm
                .destroy_key(hsm_kind(algorithm), &label, id.as_deref())?;
        }
        v.state = VersionState::Destroyed { destroyed_at: at };
        v.salt = None;
        v.material = None;
        let journal = SystemJournal {
            recorder,
            operation: "DestroyKeyVersion",
            version: Some(version),
        };
        self.commit(meta, Some(&entry), &journal)?;
        tracing::info!(key = %name, version, "key version destroyed");
        if protection == Protection::Hsm
            && let Err(e) = self.hsm.remove_markers(&cancel_prefix(&key_id, version))
        {
            tracing::warn!(key = %name, version, error = %crate::error_chain(&e), "the HSM's records of this version's cancelled destructions could not be removed (they hold no key material)");
        }
        Ok(true)
    }
}

/// The label of the HSM marker that says the destruction of version `version` of the key
/// `key_id`, scheduled for `destroy_at`, was cancelled.
pub(super) fn cancel_label(key_id: &str, version: u32, destroy_at: u64) -> String {
    format!("{}{destroy_at}", cancel_prefix(key_id, version))
}

/// What the labels of every cancellation marker of one version start with.
fn cancel_prefix(key_id: &str, version: u32) -> String {
    format!("kms-cancelled/{key_id}/{version}/")
}
