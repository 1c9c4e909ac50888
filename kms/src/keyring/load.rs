//! Opening the keyring at unseal: nothing is read per key (a key is read, authenticated and
//! prepared at its first use, `Keyring::entry`); the index is completed if the store
//! predates it, and orphan HSM objects are swept. The verification walk (`keyring::walk`)
//! starts once the keyring is published.

use std::collections::BTreeMap;

use crate::barrier::Barrier;

use super::{
    Arc, AtomicU64, HSM_LABEL_PREFIX, HashMap, Hsm, HsmError, KeyEntry, KeyMeta, Keyring,
    KeyringError, Mutex, Origin, Protection, Public, Secret, Settings, Store, SystemRecorder,
    Table, VersionMaterial, VersionMeta, VersionState, cache, counter_key, follow, hsm_kind,
    material, model, pending_label, unhex,
};

/// Key records read from the store at a time by a walk of a table.
const LOAD_PAGE: usize = 1024;

/// Calls `f` with every entry of `table`, read page by page: the records of a big keyring
/// are never all in memory at once.
pub(super) fn each_page(
    store: &dyn Store,
    table: Table,
    mut f: impl FnMut(String, Vec<u8>) -> Result<(), KeyringError>,
) -> Result<(), KeyringError> {
    let mut from = String::new();
    loop {
        let page = store.range(table, &from, LOAD_PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        // Names and ids have no NUL: this is the next possible key.
        from = format!("{last}\0");
        for (k, v) in page {
            f(k, v)?;
        }
    }
}

impl Keyring {
    /// Opens the keyring: no key is read (each is at its first use), the index is built
    /// if the store predates it, and orphan HSM objects are swept. Call
    /// `Keyring::start_walk` once it is shared.
    pub fn load(
        barrier: Arc<Barrier>,
        hsm: Arc<Hsm>,
        store: Arc<dyn Store>,
        recorder: Arc<dyn SystemRecorder>,
        settings: Settings,
    ) -> Result<Self, KeyringError> {
        let keyring = Self {
            mac_key: material::metadata_mac_key(&barrier)?,
            barrier,
            hsm,
            store,
            recorder,
            keys: cache::Cache::new(settings.cache_keys),
            admin: Mutex::new(()),
            settings,
            grants: cache::Cache::new(settings.cache_keys),
            walk: super::walk::Walk::default(),
            reservations: super::reserve::Reservations::default(),
            lag: follow::Lag::default(),
            forgot: Mutex::new(None),
        };
        keyring.complete_index()?;
        tracing::info!(
            cache_keys = keyring.settings.cache_keys,
            "keyring loaded: no key read yet (each is read and checked at its first use; the verification walk checks every record in the background)"
        );
        keyring.sweep_orphans();
        Ok(keyring)
    }

    /// Reads `name`'s record from the store, authenticates it and prepares its entry, and
    /// caches what it found (unless a change was published meanwhile: `keyring::cache`).
    pub(super) fn load_key(
        &self,
        name: &str,
    ) -> Result<cache::Cached<Arc<KeyEntry>>, KeyringError> {
        let epoch = self.keys.epoch();
        let found = match self.store.get(crate::keyring::KEYS, name)? {
            None => cache::Cached::Absent(std::time::Instant::now()),
            Some(bytes) => match model::decode(name, &bytes, &self.mac_key) {
                Ok(meta) => cache::Cached::Found(Arc::new(self.build_entry(meta, None)?)),
                Err(KeyringError::Tampered(_)) => {
                    tracing::error!(key = %name, "key metadata failed authentication: the store was altered; key refused");
                    cache::Cached::Tampered
                }
                Err(e) => return Err(e),
            },
        };
        // On a shared store another server may make the key at any moment: an absence is
        // not remembered there (a name met and not known is read again each time).
        if !(self.store.shared() && matches!(found, cache::Cached::Absent(_))) {
            self.keys.insert_loaded(name, found.clone(), epoch);
        }
        Ok(found)
    }

    /// Destroys the token objects kms made for versions that no record names: left by a
    /// crash (or a failed clean-up) between making a version's object and committing the
    /// version, once that version number has been taken by a committed version with
    /// another object. Only objects of this instance that the HSM marks pending
    /// (`pending_label`: made for a version never committed) are destroyed; one that was
    /// committed once is kept whatever the record says (a rolled-back record must not get
    /// a real version's object swept). An object for a version number not yet committed is left alone (it
    /// may be another server's rotation in flight) and reported; an object of a key this
    /// keyring does not know is reported too. Each object's key is found through the index
    /// (`keyring::index`) and its record authenticated: the cost follows the token's objects,
    /// not the number of keys. Failures are logged, never fatal.
    fn sweep_orphans(&self) {
        let objects = match self.hsm.objects_labelled(HSM_LABEL_PREFIX) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "could not list the token's objects to sweep orphans");
                return;
            }
        };
        let ownership = self.hsm.ownership();
        let mut by_id: BTreeMap<String, Option<KeyMeta>> = BTreeMap::new();
        for object in &objects {
            let Some((key_id, _)) = object
                .label
                .strip_prefix(HSM_LABEL_PREFIX)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            if by_id.contains_key(key_id) || !ownership.owns(&object.id) {
                continue;
            }
            match self.hsm_key_by_id(key_id) {
                Ok(meta) => {
                    by_id.insert(key_id.to_owned(), meta);
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "could not read the store to sweep orphan HSM objects: nothing swept");
                    return;
                }
            }
        }
        let (mut swept, mut pending, mut unknown, mut others) = (0usize, 0usize, 0usize, 0usize);
        let mut unmarked = 0usize;
        for object in objects {
            // Another instance's objects (production's, seen from a restored copy on the
            // same token) are never this one's to sweep, whatever its records say.
            if !ownership.owns(&object.id) {
                others += 1;
                continue;
            }
            let Some((key_id, version)) = object
                .label
                .strip_prefix(HSM_LABEL_PREFIX)
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(k, v)| Some((k, v.parse::<u32>().ok()?)))
            else {
                continue;
            };
            let Some(Some(meta)) = by_id.get(key_id) else {
                unknown += 1;
                continue;
            };
            let recorded = meta.version(version);
            // A destroyed version names no object (its own was confirmed gone).
            let named = recorded.is_some_and(|v| {
                !matches!(v.state, VersionState::Destroyed { .. })
                    && match &v.hsm_id {
                        Some(id) => unhex(id).is_some_and(|id| id == object.id),
                        // Made before CKA_IDs: the label alone names it.
                        None => true,
                    }
            });
            if named {
                continue;
            }
            let committed_max = meta.versions.iter().map(|v| v.version).max().unwrap_or(0);
            if version > committed_max {
                pending += 1;
                continue;
            }
            // Only an object the HSM says was made for a version never committed: a
            // committed version's object (its mark removed at the commit) is never swept,
            // whatever a rolled-back record says.
            match self.hsm.has_marker(&pending_label(&object.id)) {
                Ok(true) => {}
                Ok(false) => {
                    unmarked += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "could not read the HSM's pending marks: nothing swept");
                    return;
                }
            }
            match self.hsm.destroy(object.handle) {
                Ok(()) => {
                    let _ = self.hsm.remove_markers(&pending_label(&object.id));
                    swept += 1;
                    tracing::warn!(key = %meta.name, version, "destroyed an orphan HSM object that no key version names");
                }
                Err(e) => {
                    tracing::error!(key = %meta.name, version, error = %crate::error_chain(&e), "could not destroy an orphan HSM object");
                }
            }
        }
        if pending + unknown > 0 {
            tracing::warn!(
                pending,
                unknown,
                "HSM objects that no committed key version names yet: left by a crash during a rotation or key creation, or made by another server just now; kept"
            );
        }
        if swept > 0 {
            tracing::info!(swept, "orphan HSM objects swept");
        }
        if unmarked > 0 {
            tracing::warn!(
                unmarked,
                "keyring objects in the token that no committed version names, but that were committed once (or made before pending marks): kept; the key's record may have been rolled back"
            );
        }
        if others > 0 {
            tracing::info!(
                others,
                "keyring objects in the token made by another kms instance (or before this one took an identity): never swept by this one"
            );
        }
    }

    /// Builds an entry's material, reusing `old`'s where the version is unchanged; counter
    /// reservations are read from the store.
    pub(super) fn build_entry(
        &self,
        meta: KeyMeta,
        old: Option<&KeyEntry>,
    ) -> Result<KeyEntry, KeyringError> {
        // The key id goes into every software version's derivation: checked now.
        unhex(&meta.key_id).ok_or_else(|| KeyringError::Tampered(meta.name.clone()))?;
        let mut versions = HashMap::new();
        for v in &meta.versions {
            let material = match old.and_then(|o| unchanged(o, v)) {
                Some(existing) => existing,
                None => self.version_material(&meta, v)?,
            };
            versions.insert(v.version, material);
        }
        Ok(KeyEntry { meta, versions })
    }

    /// One version's material: its secret (derived, or found in the token), its public
    /// key, and its nonce counter from the store.
    fn version_material(
        &self,
        meta: &KeyMeta,
        v: &VersionMeta,
    ) -> Result<Arc<VersionMaterial>, KeyringError> {
        let tampered = || KeyringError::Tampered(meta.name.clone());
        let ready = std::sync::OnceLock::new();
        let derived = match (&v.state, meta.protection) {
            (VersionState::Destroyed { .. }, _) => false,
            (_, Protection::Software) => {
                // Derived at first use (`VersionMaterial::secret`); its salt is checked now.
                v.salt.as_deref().and_then(unhex).ok_or_else(tampered)?;
                if meta.algorithm.rsa().is_some() {
                    v.material.as_deref().and_then(unhex).ok_or_else(tampered)?;
                }
                true
            }
            (_, Protection::Hsm) => {
                let _ = ready.set(self.hsm_secret(meta, v)?);
                false
            }
        };
        let public = match &v.public_key {
            Some(h) => Some(Box::new(
                unhex(h)
                    .and_then(|b| Public::from_bytes(meta.algorithm, &b))
                    .ok_or_else(tampered)?,
            )),
            None => None,
        };
        let at = counter_key(&meta.name, v.version);
        let reserved = self
            .store
            .get(crate::keyring::COUNTERS, &at)?
            .map_or(0, |b| crate::store::count_of(&b));
        Ok(Arc::new(VersionMaterial {
            ready,
            derived,
            public,
            counter: AtomicU64::new(reserved),
            reserved: AtomicU64::new(reserved),
            reserving: Mutex::new(()),
        }))
    }

    /// Finds an HSM version's object by its label and CKA_ID. Missing or ambiguous makes the
    /// version unusable (its operations fail DATA_LOSS) rather than the keyring unloadable.
    fn hsm_secret(&self, meta: &KeyMeta, v: &VersionMeta) -> Result<Secret, KeyringError> {
        let tampered = || KeyringError::Tampered(meta.name.clone());
        let label = v.hsm_label.as_deref().ok_or_else(tampered)?;
        let id = match &v.hsm_id {
            Some(id) => Some(unhex(id).ok_or_else(tampered)?),
            None => None,
        };
        let kind = hsm_kind(meta.algorithm);
        match self.hsm.find_key(
            kind,
            match v.origin {
                Origin::Generated => crate::hsm::Provenance::Generated,
                Origin::External => crate::hsm::Provenance::Either,
            },
            label,
            id.as_deref(),
        ) {
            Ok(Some(h)) => Ok(Secret::Hsm(kind, h)),
            Ok(None) => {
                tracing::error!(key = %meta.name, version = v.version, "HSM object missing from the token");
                Ok(Secret::HsmMissing)
            }
            // Never a guess between objects: the version is unusable until an operator
            // looks.
            Err(e @ (HsmError::KeyAmbiguous { .. } | HsmError::UnexpectedObject { .. })) => {
                tracing::error!(key = %meta.name, version = v.version, error = %e, "HSM object refused");
                Ok(Secret::HsmMissing)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `old`'s material for version `v`, if the version is unchanged (destroyed then as now,
/// or live then as now).
fn unchanged(old: &KeyEntry, v: &VersionMeta) -> Option<Arc<VersionMaterial>> {
    let destroyed = |s: &VersionState| matches!(s, VersionState::Destroyed { .. });
    old.meta
        .version(v.version)
        .is_some_and(|m| destroyed(&m.state) == destroyed(&v.state))
        .then(|| old.versions.get(&v.version).cloned())
        .flatten()
}
