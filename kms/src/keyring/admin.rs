//! Key administration: create, get, list, rotate, update, version states and scheduled
//! destruction. Every change is written with its audit record (the [`Journal`]).

use super::{
    HsmObject, Journal, KeyEntry, KeyHandle, KeyMeta, KeyUpdate, Keyring, KeyringError, NewKey,
    Origin, Pregenerated, Protection, VersionMeta, VersionState, hex, hsm_label, maintenance,
    material, model, now, pending_label, random, unhex,
};

impl Keyring {
    /// A new version's metadata (software: a fresh salt; HSM: a fresh token object, whose
    /// handle is returned too, so that a refused commit destroys that object and no other).
    /// Uses what `pre` made in advance if it was made for this version, else makes it now.
    fn new_version(
        &self,
        meta: &KeyMeta,
        version: u32,
        pre: Pregenerated<'_>,
    ) -> Result<(VersionMeta, Option<KeyHandle>), KeyringError> {
        let mut v = VersionMeta::new(version, now(), Origin::Generated);
        let mut handle = None;
        match meta.protection {
            Protection::Software => {
                let salt = random::<32>()?;
                v.salt = Some(hex(&salt));
                let key_id = unhex(&meta.key_id).ok_or(KeyringError::Internal("key id"))?;
                if meta.algorithm.rsa().is_some() {
                    // RSA keys cannot be derived: generated, then stored sealed under a key
                    // derived from the root key and this salt.
                    let (der, public) = match pre {
                        Pregenerated::SoftwareRsa(algorithm, der, public)
                            if algorithm == meta.algorithm =>
                        {
                            (der, public)
                        }
                        _ => material::generate_rsa(meta.algorithm)?,
                    };
                    let sealed = material::seal_material(
                        &self.barrier,
                        &salt,
                        &key_id,
                        version,
                        meta.algorithm,
                        &der,
                    )?;
                    v.material = Some(hex(&sealed));
                    v.public_key = Some(hex(&public.to_bytes()));
                } else if meta.algorithm.is_asymmetric() {
                    let secret = material::derive_secret(
                        &self.barrier,
                        &salt,
                        &key_id,
                        version,
                        meta.algorithm,
                    )?;
                    v.public_key = secret.public().map(|p| hex(&p.to_bytes()));
                }
            }
            Protection::Hsm => {
                let label = hsm_label(&meta.key_id, version);
                let object = match pre {
                    Pregenerated::Hsm(o) if o.label() == label => o,
                    // Made for another version (the key moved on meanwhile): dropped here,
                    // so destroyed, and made again for this one.
                    _ => HsmObject::generate(&self.hsm, meta.algorithm, label)?,
                };
                v.hsm_label = Some(object.label().to_owned());
                v.hsm_id = Some(hex(object.id()));
                v.public_key = object.public().map(hex);
                handle = Some(object.take()?);
            }
        }
        Ok((v, handle))
    }

    /// Commits a key with a new version; if that fails, the new version's HSM object (if
    /// any) is destroyed, so that a refused change leaves nothing behind in the token.
    pub(super) fn commit_new_version(
        &self,
        meta: KeyMeta,
        old: Option<&KeyEntry>,
        object: Option<KeyHandle>,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let id = match object {
            Some(h) => Some(self.hsm.key_id(h)?),
            None => None,
        };
        let committed = self.commit(meta, old, journal).inspect_err(|_| {
            if let Some(h) = object {
                match self.hsm.destroy(h) {
                    Ok(()) => {
                        if let Some(id) = &id {
                            let _ = self.hsm.remove_markers(&pending_label(id));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::error_chain(&e), "could not destroy the HSM object of a refused key version: it is swept at the next unseal");
                    }
                }
            }
        })?;
        // Committed: no longer pending, never an orphan to sweep.
        if let Some(id) = &id
            && let Err(e) = self.hsm.remove_markers(&pending_label(id))
        {
            tracing::warn!(error = %crate::error_chain(&e), "a committed version's object is still marked pending in the HSM: a rollback of its key's record could get it swept");
        }
        Ok(committed)
    }

    fn check_rotation_period(p: Option<u64>) -> Result<(), KeyringError> {
        match p {
            Some(0) => Err(KeyringError::BadRequest(
                "rotation_period must be at least 1 second",
            )),
            Some(s) if s > 100 * 365 * 86_400 => Err(KeyringError::BadRequest(
                "rotation_period is over 100 years",
            )),
            _ => Ok(()),
        }
    }

    /// Creates a key with its first version.
    pub fn create_key(&self, req: NewKey, journal: &dyn Journal) -> Result<KeyMeta, KeyringError> {
        model::check_name(&req.name)?;
        model::check_labels(&req.labels)?;
        Self::check_rotation_period(req.rotation_period)?;
        if req.origin == Origin::External && req.rotation_period.is_some() {
            return Err(KeyringError::BadRequest(
                "an EXTERNAL key cannot rotate by itself: new versions come from imports",
            ));
        }
        // A retry of a create that was made answers as the first attempt did (checked again
        // under the lock), not ALREADY_EXISTS.
        journal.admit()?;
        // Refused at once, before a key is generated for nothing (checked again under the
        // lock).
        if self.fetch(&req.name).is_ok() {
            return Err(KeyringError::AlreadyExists(req.name));
        }
        let key_id = hex(&random::<16>()?);
        let pre = match req.origin {
            Origin::Generated => {
                Pregenerated::make(&self.hsm, req.algorithm, req.protection, &key_id, 1)?
            }
            Origin::External => Pregenerated::Nothing,
        };
        let _g = self.admin()?;
        journal.admit()?;
        // The store decides (a key made a moment ago by another server sharing it, or one
        // whose record fails authentication: the name stays taken).
        if self.store.get(crate::keyring::KEYS, &req.name)?.is_some() {
            return Err(KeyringError::AlreadyExists(req.name));
        }
        let created = now();
        let mut meta = KeyMeta {
            schema: model::KEY_SCHEMA,
            name: req.name,
            key_id,
            purpose: req.algorithm.purpose(),
            algorithm: req.algorithm,
            protection: req.protection,
            created_at: created,
            primary: 1,
            min_decryption_version: 1,
            rotation_period: req.rotation_period,
            next_rotation_at: req.rotation_period.map(|p| created.saturating_add(p)),
            labels: req.labels,
            versions: Vec::new(),
            origin: req.origin,
            import_job: None,
        };
        if req.origin == Origin::External {
            // No version until the customer's material is imported.
            meta.primary = 0;
            let created = self.commit_new_version(meta, None, None, journal)?;
            self.walk.created();
            return Ok(created);
        }
        let (v1, object) = self.new_version(&meta, 1, pre)?;
        meta.versions.push(v1);
        let created = self.commit_new_version(meta, None, object, journal)?;
        self.walk.created();
        Ok(created)
    }

    /// The key's metadata.
    pub fn get_key(&self, name: &str) -> Result<KeyMeta, KeyringError> {
        Ok(self.fetch(name)?.meta.clone())
    }

    /// Keys in name order, after `page_token` (the last name of the previous page), read
    /// from the store's key order and authenticated (a record that fails is left out, as a
    /// refused key; its first use and the verification walk report it).
    pub fn list_keys(
        &self,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<KeyMeta>, Option<String>), KeyringError> {
        let size = match page_size {
            0 => 100,
            n => n.min(1000),
        };
        // Names have no NUL: this is the next possible name.
        let from = if page_token.is_empty() {
            String::new()
        } else {
            format!("{page_token}\0")
        };
        let mut records = self.store.range(crate::keyring::KEYS, &from, size + 1)?;
        let next = if records.len() > size {
            records.truncate(size);
            records.last().map(|(name, _)| name.clone())
        } else {
            None
        };
        let mut page = Vec::with_capacity(records.len());
        for (name, bytes) in records {
            match model::decode(&name, &bytes, &self.mac_key) {
                Ok(meta) => page.push(meta),
                Err(KeyringError::Tampered(_)) => {
                    tracing::debug!(key = %name, "key record failed authentication: left out of the list");
                }
                Err(e) => return Err(e),
            }
        }
        Ok((page, next))
    }

    /// Adds a version and makes it primary.
    pub fn rotate_key(&self, name: &str, journal: &dyn Journal) -> Result<KeyMeta, KeyringError> {
        // A retry of a rotation that was made is answered before a key is generated for
        // nothing (checked again under the lock).
        journal.admit()?;
        let pre = self.pregenerate(name)?;
        let _g = self.admin()?;
        journal.admit()?;
        self.rotate_locked(name, None, pre, journal)
    }

    /// Rotates unless `only_if_primary` names a version that is no longer primary.
    pub(super) fn rotate_locked(
        &self,
        name: &str,
        only_if_primary: Option<u32>,
        pre: Pregenerated,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let entry = self.entry_locked(name)?;
        if only_if_primary.is_some_and(|v| entry.meta.primary != v) {
            return Ok(entry.meta.clone());
        }
        if entry.meta.origin == Origin::External {
            return Err(KeyringError::NotAllowed(
                "this key's material is EXTERNAL: it gets new versions by import (kms key import), not by rotation",
            ));
        }
        let mut meta = entry.meta.clone();
        let next = meta.next_version()?;
        let (v, object) = self.new_version(&meta, next, pre)?;
        meta.versions.push(v);
        meta.primary = next;
        let t = now();
        meta.next_rotation_at = meta.rotation_period.map(|p| t.saturating_add(p));
        let rotated = self.commit_new_version(meta, Some(&entry), object, journal)?;
        tracing::info!(key = %name, version = next, "key rotated");
        Ok(rotated)
    }

    /// Changes the rotation period, minimum decryption version, or labels.
    pub fn update_key(
        &self,
        name: &str,
        update: KeyUpdate,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let _g = self.admin()?;
        journal.admit()?;
        let entry = self.entry_locked(name)?;
        let mut meta = entry.meta.clone();
        if let Some(p) = update.rotation_period {
            Self::check_rotation_period(p)?;
            if p.is_some() && meta.origin == Origin::External {
                return Err(KeyringError::BadRequest(
                    "an EXTERNAL key cannot rotate by itself: new versions come from imports",
                ));
            }
            meta.rotation_period = p;
            meta.next_rotation_at = p.map(|p| now().saturating_add(p));
        }
        if let Some(min) = update.min_decryption_version {
            if min == 0 || min > meta.primary {
                return Err(KeyringError::BadRequest(
                    "min_decryption_version must be between 1 and the primary version",
                ));
            }
            meta.min_decryption_version = min;
        }
        if let Some(labels) = update.labels {
            model::check_labels(&labels)?;
            meta.labels = labels;
        }
        self.commit(meta, Some(&entry), journal)
    }

    /// Changes one version's state through `f`.
    fn change_version(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
        f: impl FnOnce(&KeyMeta, &mut VersionMeta) -> Result<(), KeyringError>,
    ) -> Result<KeyMeta, KeyringError> {
        let _g = self.admin()?;
        journal.admit()?;
        let entry = self.entry_locked(name)?;
        let mut meta = entry.meta.clone();
        let snapshot = meta.clone();
        let v = meta
            .version_mut(version)
            .ok_or_else(|| KeyringError::VersionNotFound {
                name: name.to_owned(),
                version,
            })?;
        f(&snapshot, v)?;
        self.commit(meta, Some(&entry), journal)
    }

    /// Enables a disabled version.
    pub(crate) fn enable_version(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        self.change_version(name, version, journal, |_, v| v.state.enable())
    }

    /// Disables an enabled version.
    pub(crate) fn disable_version(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        self.change_version(name, version, journal, |_, v| v.state.disable())
    }

    /// Schedules a version's destruction in `days` (1..=30) days. The primary version
    /// cannot be destroyed: rotate first.
    pub(crate) fn schedule_destruction(
        &self,
        name: &str,
        version: u32,
        days: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        if !(1..=30).contains(&days) {
            return Err(KeyringError::BadRequest(
                "the destruction window is 1 to 30 days",
            ));
        }
        let day = self.settings.day_seconds;
        let destroy_at = now().saturating_add(u64::from(days).saturating_mul(day));
        self.change_version(name, version, journal, |meta, v| {
            v.state
                .schedule_destruction(meta.primary == version, destroy_at)
        })
    }

    /// Cancels a scheduled destruction; the version comes back disabled.
    pub(crate) fn cancel_destruction(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let at = now();
        self.change_version(name, version, journal, |m, v| {
            // The HSM remembers the cancellation, where a store writer cannot undo it, before
            // it is committed: a key record rolled back to its schedule is then never
            // destroyed on its word. (If the commit then fails, the marker only keeps that
            // one schedule from ever destroying the version: a new schedule has its own.)
            if let (VersionState::ScheduledForDestruction { destroy_at }, Protection::Hsm) =
                (&v.state, m.protection)
                && *destroy_at > at
            {
                self.hsm.create_marker(&maintenance::cancel_label(
                    &m.key_id,
                    version,
                    *destroy_at,
                ))?;
            }
            v.state.cancel_destruction(at)
        })
    }

    /// Every key's metadata, by name, read from the store page by page and authenticated
    /// (a record that fails is left out).
    pub(crate) fn all_keys(&self) -> Result<Vec<KeyMeta>, KeyringError> {
        let mut all = Vec::new();
        super::load::each_page(self.store.as_ref(), crate::keyring::KEYS, |name, bytes| {
            match model::decode(&name, &bytes, &self.mac_key) {
                Ok(meta) => all.push(meta),
                Err(KeyringError::Tampered(_)) => {}
                Err(e) => return Err(e),
            }
            Ok(())
        })?;
        Ok(all)
    }
}
