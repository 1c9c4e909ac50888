//! The secrets engine: versioned static secrets with the semantics of Vault's KV version 2
//! (docs/secrets.md): versions, check-and-set, soft delete, undelete, destroy, metadata,
//! and grants on path patterns.
//!
//! Nothing is loaded at unseal but the grants and the engine's configuration: a secret is
//! read from the store at each call (its metadata, then the version's values), so a write
//! on one server is read on the next call on any other, and a million secrets cost no
//! memory. Every record is sealed by the barrier under this engine's purposes and named by
//! where it lives (`model`), so a version copied to another path or version in the store
//! does not open, and nothing in the store is acted on that kms did not write.
//!
//! A change reads the secret's metadata, decides, and commits the new metadata, the new
//! values and the removal of the values it drops (pruned past `max_versions`, destroyed)
//! in one transaction with its audit record (`Journal`). Changes to one path are
//! serialised by a lock of this server's (one of `LOCKS`, by the path's hash) and, on a
//! store several servers share, by the store's change lock: check-and-set is atomic across
//! servers.

pub(crate) mod config;
mod error;
mod grants;
pub(crate) mod list;
pub(crate) mod model;
pub(crate) mod path;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub(crate) use error::SecretsError;
pub(crate) use grants::{NewSecretGrant, SecretGrant};
use model::{EngineConfig, Metadata, State, Values, Version};

use crate::barrier::Barrier;
use crate::policy::SecretOperation;
use crate::store::{Change, ChangeLock, Follow, Removal, Store, Table, Write};

/// Secrets' metadata, by path.
pub(crate) const METADATA: Table = Table::new("secret_metadata", Follow::Never);
/// Versions' values, by path and version ([`path::value_key`]).
pub(crate) const VALUES: Table = Table::new("secret_values", Follow::Never);
/// Grants on path patterns, by id.
pub(crate) const GRANTS: Table = Table::new("secret_grants", Follow::Changes);
/// The engine's configuration (one entry, [`CONFIG_KEY`]).
pub(crate) const CONFIG: Table = Table::new("secret_config", Follow::Changes);

/// The engine's tables, in the order a backup writes them.
pub(crate) const TABLES: &[Table] = &[CONFIG, GRANTS, METADATA, VALUES];

const CONFIG_KEY: &str = "config";

/// The grants' announcement in [`CONFIG`] (`grants::Secrets::announcement`): after
/// [`CONFIG_KEY`] in key order, so that one read of the table's first entries returns both.
const ANNOUNCE_KEY: &str = "grants-changed";

/// How many entries of [`CONFIG`] are read at each decision on a shared store: the two
/// the engine writes, and room to see one that it does not.
const CONFIG_ENTRIES: usize = 4;

/// How many locks serialise this server's changes, a path taking the one of its hash.
pub(crate) const LOCKS: usize = 64;

/// `[secrets]`: the engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The largest version, in bytes of names and values.
    pub max_secret_bytes: usize,
}

/// `[secrets] max_secret_bytes` by default: 512 KiB.
pub(crate) const DEFAULT_MAX_SECRET_BYTES: usize = 512 * 1024;

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_secret_bytes: DEFAULT_MAX_SECRET_BYTES,
        }
    }
}

/// What a change of the engine tells its audit record: the path (or a grant's pattern),
/// the versions it concerned, the grant it made or revoked.
pub(crate) struct Committed<'a> {
    /// The path.
    pub path: &'a str,
    /// The versions written, deleted, undeleted or destroyed.
    pub versions: &'a [u64],
    /// The versions dropped past `max_versions` (their values removed with the change).
    pub dropped: &'a [u64],
    /// The grant made or revoked.
    pub grant: Option<&'a SecretGrant>,
}

/// How a change commits: its writes and removals in one transaction with its audit record
/// (the service layer's call implements it; tests write to the store).
pub(crate) trait Journal {
    /// Commits `writes` and `removals` with the record of `what`: all or nothing.
    fn commit(
        &self,
        what: Committed<'_>,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<(), SecretsError>;
}

/// What the engine keeps in memory: the grants and the configuration, read at open and
/// again after a change to them.
struct Kept {
    grants: Vec<SecretGrant>,
    /// `None` when the stored configuration does not open (the store was altered): every
    /// call that needs it is refused until an administrator sets it again.
    config: Option<EngineConfig>,
    /// The entries of [`CONFIG`] as stored when these were read: the configuration's
    /// record and the grants' announcement, which every change of the grants writes, so on
    /// a shared store entries that differ at a decision mean another server changed them
    /// ([`Secrets::kept`]).
    config_records: Vec<(String, Vec<u8>)>,
}

impl Kept {
    fn config(&self) -> Result<EngineConfig, SecretsError> {
        self.config
            .ok_or_else(|| SecretsError::Tampered("secrets/config record config".to_owned()))
    }
}

/// The open engine.
pub(crate) struct Secrets {
    barrier: Arc<Barrier>,
    store: Arc<dyn Store>,
    settings: Settings,
    /// Serialise this server's changes to a path (by its hash).
    locks: [Mutex<()>; LOCKS],
    /// Serialises changes to the grants and the configuration.
    admin: Mutex<()>,
    kept: RwLock<Arc<Kept>>,
    /// Another server changed the grants or the configuration: read them again before
    /// the next decision.
    stale: AtomicBool,
    /// Serialises reloads, so that a copy read before a change is never installed after
    /// one read after it.
    reloading: Mutex<()>,
}

/// A version read: its number, what the metadata says of it, the secret's custom metadata,
/// and its values when it is live.
pub(crate) struct Read {
    /// The version's number.
    pub version: u64,
    /// What the metadata says of it.
    pub info: Version,
    /// The secret's custom metadata.
    pub custom: BTreeMap<String, String>,
    /// Its values; `None` when it is deleted or destroyed (`info` says which).
    pub values: Option<Values>,
}

impl Read {
    /// The values, or why there are none.
    pub(crate) fn into_values(mut self) -> Result<(u64, Values), SecretsError> {
        match self.values.take() {
            Some(v) => Ok((self.version, v)),
            None if self.info.destroyed => Err(SecretsError::VersionDestroyed(self.version)),
            None => Err(SecretsError::VersionDeleted(self.version)),
        }
    }
}

/// A version written: its number and what the metadata says of it, with the secret's
/// custom metadata (Vault's answer to a write).
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// The new version.
    pub version: u64,
    /// What the metadata says of it.
    pub info: Version,
    /// The secret's custom metadata.
    pub custom: BTreeMap<String, String>,
}

/// What a patch does to the current version's values.
#[derive(Default)]
pub(crate) struct Patch {
    /// Values set (added or replaced).
    pub set: Values,
    /// Names removed.
    pub remove: Vec<String>,
}

/// A change of a secret's metadata (`None`: left as it is).
#[derive(Debug, Clone, Default)]
pub(crate) struct MetadataUpdate {
    /// Versions kept (0: the engine's).
    pub max_versions: Option<u32>,
    /// Whether writes must give check-and-set.
    pub cas_required: Option<bool>,
    /// Seconds after which a new version is deleted (0: the engine's).
    pub delete_version_after: Option<u64>,
    /// The custom metadata: replaced whole.
    pub custom: Option<BTreeMap<String, String>>,
    /// The custom metadata: merged (`None` removes a name), as a JSON merge patch does.
    pub custom_patch: Option<BTreeMap<String, Option<String>>>,
    /// The caller may destroy versions of this secret (`secret-destroy`): without it, a
    /// change that would drop versions (a lower `max_versions`) is refused.
    pub may_drop: bool,
}

/// A change of the engine's configuration (`None`: left as it is).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConfigUpdate {
    /// Versions kept by a secret that does not say (0: the default, 10).
    pub max_versions: Option<u32>,
    /// Whether every write must give check-and-set.
    pub cas_required: Option<bool>,
    /// Seconds after which a new version is deleted (0: never).
    pub delete_version_after: Option<u64>,
}

/// The engine's configuration as callers see it.
pub(crate) type Config = EngineConfig;

/// The time in Unix milliseconds (the audit log's clock).
pub(crate) use crate::audit::now_ms;

impl Secrets {
    /// Opens the engine: reads the grants and the configuration (nothing per secret).
    pub(crate) fn open(
        barrier: Arc<Barrier>,
        store: Arc<dyn Store>,
        settings: Settings,
    ) -> Result<Self, SecretsError> {
        let engine = Self {
            barrier,
            store,
            settings,
            locks: std::array::from_fn(|_| Mutex::new(())),
            admin: Mutex::new(()),
            kept: RwLock::new(Arc::new(Kept {
                grants: Vec::new(),
                config: None,
                config_records: Vec::new(),
            })),
            stale: AtomicBool::new(false),
            reloading: Mutex::new(()),
        };
        engine.ensure_config()?;
        engine.reload()?;
        Ok(engine)
    }

    /// Writes the default configuration when the store has none and nothing else of the
    /// engine's: the first open of an engine stores it, so that from then on a missing
    /// record means the store was altered ([`Secrets::open_config`]) rather than "the
    /// defaults" (a record removed from the store would otherwise bring back the default
    /// `max_versions`, and the next writes would drop versions an administrator kept).
    fn ensure_config(&self) -> Result<(), SecretsError> {
        if self.store.get(CONFIG, CONFIG_KEY)?.is_some() {
            return Ok(());
        }
        for table in [METADATA, GRANTS] {
            if !self.store.range(table, "", 1)?.is_empty() {
                tracing::error!(
                    "the secrets engine's configuration is missing from a store holding its secrets or grants (the store was altered): writes are refused until it is set again"
                );
                return Ok(());
            }
        }
        let sealed = seal_json(
            &self.barrier,
            model::CONFIG,
            CONFIG_KEY,
            &EngineConfig::default(),
        )?;
        // Another server opening the engine at once may store its own first: either does.
        self.store.insert_new(CONFIG, CONFIG_KEY, &sealed)?;
        Ok(())
    }

    /// Reads the grants and the configuration again.
    fn reload(&self) -> Result<Arc<Kept>, SecretsError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        // Cleared first: a change heard while reading marks it stale again; a read that
        // fails leaves it stale, so the next decision reads again.
        self.stale.store(false, Ordering::SeqCst);
        let read = self.read_kept();
        if read.is_err() {
            self.stale.store(true, Ordering::SeqCst);
        }
        read
    }

    /// After a change of the grants or the settings committed: read them again, or leave
    /// them stale for the next decision (the change is made; its caller is not told of a
    /// failure to read it back).
    fn reload_after_commit(&self) {
        if let Err(e) = self.reload() {
            tracing::warn!(error = %crate::error_chain(&e), "secrets engine: grants and settings not read again yet; the next decision reads them");
        }
    }

    fn read_kept(&self) -> Result<Arc<Kept>, SecretsError> {
        // The configuration's entries before the grants: a change of the grants committed
        // between the two reads leaves the entries kept older than the store's, and the
        // next decision reads them again.
        let config_records = self.store.range(CONFIG, "", CONFIG_ENTRIES)?;
        let config_record = config_records
            .iter()
            .find(|(k, _)| k == CONFIG_KEY)
            .map(|(_, v)| v.as_slice());
        let config = match self.open_config(config_record) {
            Ok(c) => Some(c),
            Err(SecretsError::Tampered(what)) => {
                tracing::error!(record = %what, "the secrets engine's configuration is not authentic (the store was altered): writes are refused until it is set again");
                None
            }
            Err(e) => return Err(e),
        };
        let grants = grants::load(&self.barrier, self.store.as_ref())?;
        let kept = Arc::new(Kept {
            grants,
            config,
            config_records,
        });
        *self.kept.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&kept);
        Ok(kept)
    }

    /// The grants and configuration in force (read again first if another server changed
    /// them).
    ///
    /// On a store other servers write, their change may not be heard yet (a notification
    /// takes milliseconds): every change of the grants or the configuration writes an entry
    /// of [`CONFIG`] (the grants' announcement, the configuration's record), which are read
    /// here at each decision in one read, so that a grant revoked on one server is refused
    /// on every other from its commit on, as a secret written on one is read on the others.
    fn kept(&self) -> Result<Arc<Kept>, SecretsError> {
        if self.stale.load(Ordering::SeqCst) {
            return self.reload();
        }
        let kept = Arc::clone(&self.kept.read().unwrap_or_else(|p| p.into_inner()));
        if self.store.shared()
            && self.store.range(CONFIG, "", CONFIG_ENTRIES)? != kept.config_records
        {
            return self.reload();
        }
        Ok(kept)
    }

    fn read_config(&self) -> Result<EngineConfig, SecretsError> {
        self.open_config(self.store.get(CONFIG, CONFIG_KEY)?.as_deref())
    }

    /// The configuration a stored record holds. The first open stored one
    /// ([`Secrets::ensure_config`]): a missing record was removed from the store.
    fn open_config(&self, record: Option<&[u8]>) -> Result<EngineConfig, SecretsError> {
        match record {
            None => Err(SecretsError::Tampered(
                "secrets/config record config is missing".to_owned(),
            )),
            Some(sealed) => open_json(&self.barrier, model::CONFIG, CONFIG_KEY, sealed),
        }
    }

    /// Whether other servers write the engine's store too.
    pub(crate) fn shared(&self) -> bool {
        self.store.shared()
    }

    /// Whether `principal` may do `operation` on `path` (a path, or a prefix being listed).
    pub(crate) fn permits(
        &self,
        principal: &str,
        path: &str,
        operation: SecretOperation,
    ) -> Result<bool, SecretsError> {
        Ok(self
            .kept()?
            .grants
            .iter()
            .any(|g| g.allows(principal, path, operation)))
    }

    /// This server's lock for changes to `path` (`None`: the grants and settings), and the
    /// store's change lock when the store is shared.
    ///
    /// On a store only this server writes, paths take one of [`LOCKS`] locks by their hash,
    /// so changes to different paths commit together (one audit group, one fsync). On a
    /// shared store every change takes the same local lock first: the store's change lock
    /// serialises them across servers anyway, and a caller waiting for it holds a pooled
    /// connection, so at most one waiter per server keeps the connections the holder needs
    /// (to read, and to commit with its audit record) free.
    fn lock(
        &self,
        path: Option<&str>,
    ) -> Result<(MutexGuard<'_, ()>, Option<ChangeLock>), SecretsError> {
        let local = match path {
            _ if self.store.shared() => self.locks.first(),
            None => Some(&self.admin),
            Some(path) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                path.hash(&mut h);
                self.locks
                    .get(usize::try_from(h.finish() % LOCKS as u64).unwrap_or(0))
            }
        }
        .ok_or(SecretsError::Internal("lock index"))?
        .lock()
        .unwrap_or_else(|p| p.into_inner());
        let shared = self.store.lock_changes()?;
        Ok((local, shared))
    }

    /// The metadata of `path`, if it has any.
    fn metadata(&self, path: &str) -> Result<Option<Metadata>, SecretsError> {
        self.store
            .get(METADATA, path)?
            .map(|sealed| open_json(&self.barrier, model::METADATA, path, &sealed))
            .transpose()
    }

    fn metadata_write(&self, path: &str, meta: &Metadata) -> Result<Write, SecretsError> {
        Ok(Write {
            table: METADATA,
            key: path.to_owned(),
            value: seal_json(&self.barrier, model::METADATA, path, meta)?,
        })
    }

    /// Reads version `version` of `path` (0: the current one).
    pub(crate) fn read(&self, path: &str, version: u64) -> Result<Read, SecretsError> {
        path::check(path)?;
        let meta = self.metadata(path)?.ok_or(SecretsError::NotFound)?;
        let (version, info) = pick(&meta, version)?;
        if info.state(now_ms()) != State::Live {
            return Ok(Read {
                version,
                info,
                custom: meta.custom,
                values: None,
            });
        }
        match self.values(path, version) {
            Ok(values) => Ok(Read {
                version,
                info,
                custom: meta.custom,
                values: Some(values),
            }),
            // Reads take no lock: a change may have dropped, destroyed or deleted the
            // version between the two reads. Only values missing for a version the
            // metadata still lists as live are the store's fault.
            Err(SecretsError::Tampered(what)) => {
                let now = self.metadata(path)?.ok_or(SecretsError::NotFound)?;
                match now.versions.get(&version) {
                    None => Err(SecretsError::VersionNotFound(version)),
                    Some(v) if v.state(now_ms()) != State::Live => Ok(Read {
                        version,
                        info: *v,
                        custom: now.custom,
                        values: None,
                    }),
                    Some(_) => Err(SecretsError::Tampered(what)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a read of `path` costs little enough to run on an async worker rather than
    /// a thread of its own: on a store of this server's (a read of its cache, no network),
    /// when its metadata and every version of the secret are each at most `max_bytes` in
    /// the store (or the path holds none; a path that is not one, or whose metadata does not
    /// open, is answered on a thread, where the call reports it). Reads nothing but the
    /// metadata, and opens it only when it is that small.
    pub(crate) fn reads_quickly(&self, path: &str, max_bytes: u64) -> bool {
        if self.store.shared() || path::check(path).is_err() {
            return false;
        }
        let sealed = match self.store.get(METADATA, path) {
            Ok(Some(sealed)) => sealed,
            Ok(None) => return true,
            Err(_) => return false,
        };
        if u64::try_from(sealed.len()).map_or(true, |n| n > max_bytes) {
            return false;
        }
        match open_json::<Metadata>(&self.barrier, model::METADATA, path, &sealed) {
            Ok(meta) => meta
                .versions
                .values()
                .all(|v| v.destroyed || v.stored_bytes.is_some_and(|b| b <= max_bytes)),
            Err(_) => false,
        }
    }

    /// The values of a version the metadata lists as live.
    fn values(&self, path: &str, version: u64) -> Result<Values, SecretsError> {
        let key = path::value_key(path, version);
        let sealed = self.store.get(VALUES, &key)?.ok_or_else(|| {
            SecretsError::Tampered(format!(
                "the values of {path} version {version} are missing"
            ))
        })?;
        open_json(&self.barrier, model::VALUES, &key, &sealed)
    }

    /// The metadata of `path`.
    pub(crate) fn read_metadata(&self, path: &str) -> Result<Metadata, SecretsError> {
        path::check(path)?;
        self.metadata(path)?.ok_or(SecretsError::NotFound)
    }

    /// Writes a new version of `path` with `values`; with `cas`, only if the current
    /// version is `cas` (0: only if no version can be read: absent, or every one deleted
    /// or destroyed).
    pub(crate) fn write(
        &self,
        journal: &dyn Journal,
        path: &str,
        values: Values,
        cas: Option<u64>,
    ) -> Result<Written, SecretsError> {
        path::check(path)?;
        values.check(self.settings.max_secret_bytes)?;
        let _locks = self.lock(Some(path))?;
        let config = self.kept()?.config()?;
        let meta = self.metadata(path)?;
        let now = now_ms();
        check_cas(&config, meta.as_ref(), cas, now)?;
        self.commit_version(journal, path, meta, values, &config, now)
    }

    /// Applies `patch` to the current version of `path`, as a new version; `cas` as for
    /// [`Secrets::write`], but 0 is refused (a patch needs a version to apply to).
    pub(crate) fn patch(
        &self,
        journal: &dyn Journal,
        path: &str,
        patch: Patch,
        cas: Option<u64>,
    ) -> Result<Written, SecretsError> {
        path::check(path)?;
        if cas == Some(0) {
            return Err(SecretsError::BadRequest(
                "a patch applies to a version: its check-and-set is the current version, never 0"
                    .to_owned(),
            ));
        }
        let _locks = self.lock(Some(path))?;
        let config = self.kept()?.config()?;
        let meta = self.metadata(path)?.ok_or(SecretsError::NotFound)?;
        let now = now_ms();
        check_cas(&config, Some(&meta), cas, now)?;
        let current = meta
            .versions
            .get(&meta.current)
            .filter(|v| v.state(now) == State::Live)
            .ok_or(SecretsError::NothingToPatch)?;
        let _ = current;
        let mut values = self.values(path, meta.current)?;
        let Patch { mut set, remove } = patch;
        for name in &remove {
            if let Some(mut old) = values.0.remove(name) {
                zeroize::Zeroize::zeroize(&mut old);
            }
        }
        for (k, v) in std::mem::take(&mut set.0) {
            if let Some(mut old) = values.0.insert(k, v) {
                zeroize::Zeroize::zeroize(&mut old);
            }
        }
        values
            .check(self.settings.max_secret_bytes)
            .map_err(|e| match e {
                SecretsError::TooLarge { max, .. } => SecretsError::PatchTooLarge { max },
                e => e,
            })?;
        self.commit_version(journal, path, Some(meta), values, &config, now)
    }

    /// Commits version `current + 1` of `path` with `values`, dropping the oldest versions
    /// past the number kept.
    fn commit_version(
        &self,
        journal: &dyn Journal,
        path: &str,
        meta: Option<Metadata>,
        values: Values,
        config: &EngineConfig,
        now: u64,
    ) -> Result<Written, SecretsError> {
        let mut meta = meta.unwrap_or_else(|| Metadata::new(now));
        let version = meta
            .current
            .checked_add(1)
            .ok_or(SecretsError::Internal("version overflow"))?;
        let key = path::value_key(path, version);
        let sealed = seal_json(&self.barrier, model::VALUES, &key, &values)?;
        drop(values);
        let delete_after = config.delete_after(&meta);
        let info = Version {
            created_ms: now,
            deletion_ms: (delete_after > 0)
                .then(|| now.saturating_add(delete_after.saturating_mul(1000))),
            destroyed: false,
            stored_bytes: u64::try_from(sealed.len()).ok(),
        };
        meta.current = version;
        meta.updated_ms = now;
        meta.versions.insert(version, info);
        let keep = config.max_versions(&meta);
        let removals = prune(path, &mut meta, keep);
        let dropped: Vec<u64> = removals
            .iter()
            .filter_map(|r| version_of(&r.from))
            .collect();
        // A new version's values are never stored yet: values there mean the metadata was
        // rolled back (an older record put back), and writing would destroy a newer
        // version's values.
        if self.store.get(VALUES, &key)?.is_some() {
            return Err(SecretsError::Tampered(format!(
                "values are stored for {path} version {version}, which its metadata says was never written"
            )));
        }
        let writes = vec![
            self.metadata_write(path, &meta)?,
            Write {
                table: VALUES,
                value: sealed,
                key,
            },
        ];
        journal.commit(
            Committed {
                path,
                versions: &[version],
                dropped: &dropped,
                grant: None,
            },
            writes,
            removals,
        )?;
        Ok(Written {
            version,
            info,
            custom: meta.custom,
        })
    }

    /// Deletes `versions` of `path` softly (none: the current one). A version deleted or
    /// destroyed already stays as it is; one that does not exist is refused, and nothing
    /// is changed.
    pub(crate) fn delete(
        &self,
        journal: &dyn Journal,
        path: &str,
        versions: &[u64],
    ) -> Result<Metadata, SecretsError> {
        self.change_versions(journal, path, versions, None, |v, now| {
            if v.state(now) == State::Live {
                v.deletion_ms = Some(now);
            }
            false
        })
    }

    /// Undeletes `versions` of `path`: readable again (a destroyed one stays destroyed).
    pub(crate) fn undelete(
        &self,
        journal: &dyn Journal,
        path: &str,
        versions: &[u64],
    ) -> Result<Metadata, SecretsError> {
        self.change_versions(journal, path, versions, Some("undelete"), |v, _| {
            if !v.destroyed {
                v.deletion_ms = None;
            }
            false
        })
    }

    /// Destroys `versions` of `path`: their values are removed from the store; the
    /// metadata keeps that they were.
    pub(crate) fn destroy(
        &self,
        journal: &dyn Journal,
        path: &str,
        versions: &[u64],
    ) -> Result<Metadata, SecretsError> {
        self.change_versions(journal, path, versions, Some("destroy"), |v, _| {
            let was = v.destroyed;
            v.destroyed = true;
            !was
        })
    }

    /// Applies `f` to each of `versions`; `f` says whether the version's values are to be
    /// removed. No versions named means the current one, or, for a call that must name
    /// them (`must_name`: what it does), a refusal.
    fn change_versions(
        &self,
        journal: &dyn Journal,
        path: &str,
        versions: &[u64],
        must_name: Option<&str>,
        f: impl Fn(&mut Version, u64) -> bool,
    ) -> Result<Metadata, SecretsError> {
        path::check(path)?;
        if let Some(what) = must_name
            && versions.is_empty()
        {
            return Err(SecretsError::BadRequest(format!(
                "name the versions to {what}"
            )));
        }
        if versions.len() > model::MAX_VERSIONS_LIMIT as usize {
            return Err(SecretsError::BadRequest(format!(
                "at most {} versions at once",
                model::MAX_VERSIONS_LIMIT
            )));
        }
        let _locks = self.lock(Some(path))?;
        let mut meta = self.metadata(path)?.ok_or(SecretsError::NotFound)?;
        let mut chosen: Vec<u64> = if versions.is_empty() {
            if meta.current == 0 {
                return Err(SecretsError::NotFound);
            }
            vec![meta.current]
        } else {
            versions.to_vec()
        };
        chosen.sort_unstable();
        chosen.dedup();
        if let Some(missing) = chosen.iter().find(|v| !meta.versions.contains_key(v)) {
            return Err(SecretsError::VersionNotFound(*missing));
        }
        let now = now_ms();
        let mut removals = Vec::new();
        for v in &chosen {
            let info = meta
                .versions
                .get_mut(v)
                .ok_or(SecretsError::Internal("version"))?;
            if f(info, now) {
                let key = path::value_key(path, *v);
                removals.push(Removal {
                    table: VALUES,
                    from: key.clone(),
                    to: key,
                });
            }
        }
        meta.updated_ms = now;
        let writes = vec![self.metadata_write(path, &meta)?];
        journal.commit(
            Committed {
                path,
                versions: &chosen,
                dropped: &[],
                grant: None,
            },
            writes,
            removals,
        )?;
        Ok(meta)
    }

    /// Sets a secret's metadata (made, with no version, when absent), and drops at once the
    /// versions past a lower `max_versions`.
    pub(crate) fn update_metadata(
        &self,
        journal: &dyn Journal,
        path: &str,
        update: MetadataUpdate,
        create: bool,
    ) -> Result<Metadata, SecretsError> {
        path::check(path)?;
        if let Some(m) = update.max_versions
            && m > model::MAX_VERSIONS_LIMIT
        {
            return Err(SecretsError::BadRequest(format!(
                "max_versions is at most {} (0: the engine's)",
                model::MAX_VERSIONS_LIMIT
            )));
        }
        if update
            .delete_version_after
            .is_some_and(|d| d > model::MAX_DELETE_AFTER)
        {
            return Err(SecretsError::BadRequest(
                "delete_version_after is at most 100 years".to_owned(),
            ));
        }
        if let Some(c) = &update.custom {
            model::check_custom(c)?;
        }
        let _locks = self.lock(Some(path))?;
        let config = self.kept()?.config()?;
        let now = now_ms();
        let mut meta = match self.metadata(path)? {
            Some(m) => m,
            None if create => Metadata::new(now),
            None => return Err(SecretsError::NotFound),
        };
        if let Some(m) = update.max_versions {
            meta.max_versions = m;
        }
        if let Some(c) = update.cas_required {
            meta.cas_required = c;
        }
        if let Some(d) = update.delete_version_after {
            meta.delete_version_after = d;
        }
        if let Some(c) = update.custom {
            meta.custom = c;
        }
        if let Some(patch) = update.custom_patch {
            for (k, v) in patch {
                match v {
                    Some(v) => meta.custom.insert(k, v),
                    None => meta.custom.remove(&k),
                };
            }
            model::check_custom(&meta.custom)?;
        }
        meta.updated_ms = now;
        let keep = config.max_versions(&meta);
        let removals = prune(path, &mut meta, keep);
        if !removals.is_empty() && !update.may_drop {
            return Err(SecretsError::DropNeedsDestroy(removals.len()));
        }
        let versions: Vec<u64> = removals
            .iter()
            .filter_map(|r| version_of(&r.from))
            .collect();
        let writes = vec![self.metadata_write(path, &meta)?];
        journal.commit(
            Committed {
                path,
                versions: &[],
                dropped: &versions,
                grant: None,
            },
            writes,
            removals,
        )?;
        Ok(meta)
    }

    /// Deletes `path`'s metadata and every version's values.
    pub(crate) fn delete_all(&self, journal: &dyn Journal, path: &str) -> Result<(), SecretsError> {
        path::check(path)?;
        let _locks = self.lock(Some(path))?;
        let meta = self.metadata(path)?.ok_or(SecretsError::NotFound)?;
        let (from, to) = path::value_range(path);
        let removals = vec![
            Removal {
                table: METADATA,
                from: path.to_owned(),
                to: path.to_owned(),
            },
            Removal {
                table: VALUES,
                from,
                to,
            },
        ];
        let versions: Vec<u64> = meta.versions.keys().copied().collect();
        journal.commit(
            Committed {
                path,
                versions: &versions,
                dropped: &[],
                grant: None,
            },
            Vec::new(),
            removals,
        )
    }

    /// The engine's configuration.
    pub(crate) fn config(&self) -> Result<Config, SecretsError> {
        self.kept()?.config()
    }

    /// Changes the engine's configuration.
    pub(crate) fn update_config(
        &self,
        journal: &dyn Journal,
        update: ConfigUpdate,
    ) -> Result<Config, SecretsError> {
        if update
            .max_versions
            .is_some_and(|m| m > model::MAX_VERSIONS_LIMIT)
        {
            return Err(SecretsError::BadRequest(format!(
                "max_versions is at most {} (0: the default, {})",
                model::MAX_VERSIONS_LIMIT,
                model::DEFAULT_MAX_VERSIONS
            )));
        }
        if update
            .delete_version_after
            .is_some_and(|d| d > model::MAX_DELETE_AFTER)
        {
            return Err(SecretsError::BadRequest(
                "delete_version_after is at most 100 years".to_owned(),
            ));
        }
        let _locks = self.lock(None)?;
        // A configuration missing from the store or that does not open is replaced whole by
        // what the administrator sets now, never read; the defaults do not fill what is not
        // given (a default max_versions lower than the lost one would drop versions).
        let mut config = match self.read_config() {
            Ok(c) => c,
            Err(SecretsError::Tampered(_))
                if update.max_versions.is_some()
                    && update.cas_required.is_some()
                    && update.delete_version_after.is_some() =>
            {
                EngineConfig::default()
            }
            Err(SecretsError::Tampered(_)) => return Err(SecretsError::SettingsLost),
            Err(e) => return Err(e),
        };
        if let Some(m) = update.max_versions {
            config.max_versions = if m == 0 {
                model::DEFAULT_MAX_VERSIONS
            } else {
                m
            };
        }
        if let Some(c) = update.cas_required {
            config.cas_required = c;
        }
        if let Some(d) = update.delete_version_after {
            config.delete_version_after = d;
        }
        let write = Write {
            table: CONFIG,
            key: CONFIG_KEY.to_owned(),
            value: seal_json(&self.barrier, model::CONFIG, CONFIG_KEY, &config)?,
        };
        journal.commit(
            Committed {
                path: "",
                versions: &[],
                dropped: &[],
                grant: None,
            },
            vec![write],
            Vec::new(),
        )?;
        self.reload_after_commit();
        Ok(config)
    }
}

/// The version `asked` of `meta` (0: the current one) and what the metadata says of it.
fn pick(meta: &Metadata, asked: u64) -> Result<(u64, Version), SecretsError> {
    let version = if asked == 0 { meta.current } else { asked };
    if version == 0 {
        return Err(SecretsError::NotFound);
    }
    meta.versions
        .get(&version)
        .map(|v| (version, *v))
        .ok_or(SecretsError::VersionNotFound(version))
}

/// Checks a write's check-and-set against the secret's metadata.
fn check_cas(
    config: &EngineConfig,
    meta: Option<&Metadata>,
    cas: Option<u64>,
    now: u64,
) -> Result<(), SecretsError> {
    let current = meta.map_or(0, |m| m.current);
    match cas {
        None if config.cas_required(meta) => Err(SecretsError::CasRequired),
        None => Ok(()),
        Some(0) if meta.is_some_and(|m| m.any_live(now)) => {
            Err(SecretsError::CasMismatch { current })
        }
        Some(0) => Ok(()),
        Some(n) if n != current => Err(SecretsError::CasMismatch { current }),
        Some(_) => Ok(()),
    }
}

/// Drops the oldest versions of `meta` past `keep`; the removals of their values.
fn prune(path: &str, meta: &mut Metadata, keep: u32) -> Vec<Removal> {
    let mut removals = Vec::new();
    while meta.versions.len() > keep as usize {
        let Some((v, info)) = meta.versions.pop_first() else {
            break;
        };
        if !info.destroyed {
            let key = path::value_key(path, v);
            removals.push(Removal {
                table: VALUES,
                from: key.clone(),
                to: key,
            });
        }
    }
    removals
}

/// The version in a value's store key.
fn version_of(key: &str) -> Option<u64> {
    key.rsplit_once('@').and_then(|(_, v)| v.parse().ok())
}

/// Seals `value` as JSON: the record `name` of `purpose`.
fn seal_json<T: serde::Serialize>(
    barrier: &Barrier,
    purpose: crate::barrier::Purpose,
    name: &str,
    value: &T,
) -> Result<Vec<u8>, SecretsError> {
    let json = zeroize::Zeroizing::new(
        serde_json::to_vec(value).map_err(|_| SecretsError::Internal("record encoding"))?,
    );
    barrier.seal(purpose, name, &json).map_err(|e| match e {
        crate::barrier::BarrierError::Randomness => SecretsError::Randomness,
        _ => SecretsError::Internal("barrier"),
    })
}

/// Opens what [`seal_json`] sealed; anything else is [`SecretsError::Tampered`].
fn open_json<T: serde::de::DeserializeOwned>(
    barrier: &Barrier,
    purpose: crate::barrier::Purpose,
    name: &str,
    sealed: &[u8],
) -> Result<T, SecretsError> {
    let tampered = || SecretsError::Tampered(format!("{} record {name}", purpose.name()));
    let json = barrier
        .open(purpose, name, sealed)
        .map_err(|_| tampered())?;
    serde_json::from_slice(&json).map_err(|_| tampered())
}

impl crate::engine::Engine for Secrets {
    fn name(&self) -> &'static str {
        "secrets"
    }

    fn tables(&self) -> &'static [Table] {
        TABLES
    }

    fn heard(&self, changes: &[Change]) {
        if !changes.is_empty() {
            self.stale.store(true, Ordering::SeqCst);
        }
    }

    fn follow(&self, changes: &[Change]) -> Vec<Change> {
        if changes.is_empty() && !self.stale.load(Ordering::SeqCst) {
            return Vec::new();
        }
        match self.reload() {
            Ok(_) => Vec::new(),
            Err(e) => {
                self.stale.store(true, Ordering::SeqCst);
                tracing::warn!(error = %crate::error_chain(&e), "secrets engine: grants and configuration not read again yet");
                changes.to_vec()
            }
        }
    }

    fn maintain(&self, _now: u64) {
        // Nothing is due by itself: a version's `delete_version_after` is its deletion
        // time, written with it and compared at each read.
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

#[cfg(test)]
mod tests;
