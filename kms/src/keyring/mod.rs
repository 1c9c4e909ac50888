//! The keyring: named, versioned keys beneath the root key, and the crypto operations.
//!
//! A [`Keyring`] exists only while the server is unsealed: it is built at unseal from the
//! store (every record authenticated with a MAC under a key derived from the root key) and
//! dropped at seal, which zeroizes every derived key.
//!
//! Reads take a snapshot (`Arc<KeyEntry>`) under a read lock and run without locks. Writes
//! (administration, rotation, destruction) are serialised by one mutex, written durably to
//! the store first, and then swapped into the map: a write the caller saw acknowledged is
//! on disk.
//!
//! Nonce budget: AES-GCM with random 96-bit nonces is safe for 2^32 messages per key
//! (NIST SP 800-38D, 8.3). Each version counts its encryptions; the count is reserved in the
//! store in blocks before use (so a crash never lets a version exceed its budget), the key
//! is rotated automatically at three quarters of the budget, and a version at its budget
//! refuses to encrypt.

pub mod ciphertext;
pub mod grants;
pub mod material;
pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use zeroize::Zeroizing;

use crate::audit::AuditLog;
use crate::hsm::{Hsm, HsmError, HsmKeyKind, KeyHandle};
use crate::store::{Store, StoreError, Table, Write};
use grants::{Grant, NewGrant};
use material::{Public, Secret, SignInput, VersionMaterial};
use model::{Algorithm, KeyMeta, Protection, Purpose, VersionMeta, VersionState};

/// Largest plaintext `Encrypt` takes (use `GenerateDataKey` and encrypt locally above it).
pub const MAX_PLAINTEXT: usize = 64 * 1024;
/// Largest associated data.
pub const MAX_AAD: usize = 64 * 1024;
/// Largest message `Sign` or `Mac` takes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest data key.
pub const MAX_DATA_KEY: usize = 64;
/// AES-GCM random-nonce budget per version (NIST SP 800-38D).
pub const DEFAULT_MAX_MESSAGES: u64 = 1 << 32;

/// Why a keyring operation failed. Never carries key material, plaintext or associated
/// data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The key name is not `[a-zA-Z0-9_.-]{1,128}`.
    #[error("invalid key name: use 1 to 128 of the characters a-z A-Z 0-9 _ . -")]
    BadName,
    /// Bad labels.
    #[error(
        "invalid labels: at most 64, keys of 1..=63 characters a-z A-Z 0-9 _ . -, values up to 256 characters"
    )]
    BadLabels,
    /// A malformed or out-of-range request field.
    #[error("{0}")]
    BadRequest(&'static str),
    /// Input larger than allowed.
    #[error("{what} is {size} bytes, more than the {max} allowed{hint}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
        /// What to do instead.
        hint: &'static str,
    },
    /// Too many items in a batch.
    #[error("the batch has {count} items, more than the {max} allowed")]
    TooManyItems {
        /// Items given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A key of that name exists.
    #[error("a key named {0:?} already exists")]
    AlreadyExists(String),
    /// No key of that name.
    #[error("no key named {0:?}")]
    NotFound(String),
    /// No such version.
    #[error("key {name:?} has no version {version}")]
    VersionNotFound {
        /// The key.
        name: String,
        /// The version.
        version: u32,
    },
    /// The operation does not fit the key's purpose.
    #[error("key {name:?} is for {purpose}, not for {operation}")]
    WrongPurpose {
        /// The key.
        name: String,
        /// Its purpose.
        purpose: &'static str,
        /// What was asked.
        operation: &'static str,
    },
    /// The version is not enabled.
    #[error("version {version} of key {name:?} is {state}")]
    VersionNotEnabled {
        /// The key.
        name: String,
        /// The version.
        version: u32,
        /// Its state.
        state: &'static str,
    },
    /// The version is below the key's minimum decryption version.
    #[error("version {version} of key {name:?} is below its min_decryption_version {min}")]
    BelowMinimum {
        /// The key.
        name: String,
        /// The version.
        version: u32,
        /// The minimum.
        min: u32,
    },
    /// A state change that is not allowed.
    #[error("{0}")]
    NotAllowed(&'static str),
    /// Decryption failed: tampering, wrong key, or wrong associated data. Deliberately
    /// says nothing more.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The version's nonce budget is spent (rotation did not happen).
    #[error(
        "version {version} of key {name:?} has encrypted its maximum number of messages: rotate the key"
    )]
    Exhausted {
        /// The key.
        name: String,
        /// The version.
        version: u32,
    },
    /// The key's stored metadata failed authentication: the store was edited.
    #[error(
        "the stored metadata of key {0:?} failed authentication (the store was altered): the key is refused"
    )]
    Tampered(String),
    /// An HSM key's object is not in the token.
    #[error("the HSM object of this key version is missing from the token")]
    HsmKeyMissing,
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The OS random source failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The request's audit record could not be written: nothing was done.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// No live grant with that id.
    #[error("no grant with id {0:?} (it may have been revoked already)")]
    GrantNotFound(String),
    /// A grant's principal pattern is not one.
    #[error(transparent)]
    BadPattern(#[from] crate::access::PatternError),
}

/// Keyring settings (`[keyring]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// AES-GCM messages per version before it refuses (auto-rotation at 3/4 of it).
    pub max_messages_per_version: u64,
    /// The length of a "day" for destruction windows, in seconds (86400; tests shorten it).
    pub day_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_messages_per_version: DEFAULT_MAX_MESSAGES,
            day_seconds: 86_400,
        }
    }
}

/// What `CreateKey` asks for.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Name.
    pub name: String,
    /// Algorithm (the purpose follows from it).
    pub algorithm: Algorithm,
    /// Protection level.
    pub protection: Protection,
    /// Automatic rotation period in seconds.
    pub rotation_period: Option<u64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// What `UpdateKey` changes (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    /// `Some(None)` turns automatic rotation off.
    pub rotation_period: Option<Option<u64>>,
    /// New minimum decryption version.
    pub min_decryption_version: Option<u32>,
    /// New labels (replacing all).
    pub labels: Option<BTreeMap<String, String>>,
}

/// A data key, its ciphertext, and the version that encrypted it.
pub type DataKey = (Zeroizing<Vec<u8>>, Vec<u8>, u32);

/// Makes a key change durable together with the audit record of the request that made
/// it, in one transaction (see [`crate::audit`]): a change whose record cannot be written
/// is not made, and a record is never written for a change that was not.
pub trait Journal {
    /// Writes `writes` (the new record of `change`) with the audit record, or fails with
    /// [`KeyringError::AuditUnavailable`] having written neither.
    fn commit(&self, change: Change<'_>, writes: Vec<Write>) -> Result<(), KeyringError>;
}

/// What a [`Journal`] commit stores.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A key's new metadata.
    Key(&'a KeyMeta),
    /// A grant, made or revoked.
    Grant(&'a Grant),
}

/// The journal of what the server does by itself: records under principal
/// [`crate::audit::SYSTEM_PRINCIPAL`], service `kms.internal`.
pub struct SystemJournal<'a> {
    /// The log.
    pub log: &'a AuditLog,
    /// The operation, e.g. `AutoRotateKey`.
    pub operation: &'static str,
    /// The version it concerns (the new primary when `None`).
    pub version: Option<u32>,
}

impl Journal for SystemJournal<'_> {
    fn commit(&self, change: Change<'_>, writes: Vec<Write>) -> Result<(), KeyringError> {
        let Change::Key(meta) = change else {
            return Err(KeyringError::Internal(
                "the server changes no grant by itself",
            ));
        };
        let event = crate::audit::AuditEvent {
            key: Some(meta.name.clone()),
            key_version: Some(self.version.unwrap_or(meta.primary)),
            ..crate::audit::AuditEvent::internal(
                crate::audit::SYSTEM_PRINCIPAL,
                "kms.internal",
                self.operation,
            )
        };
        self.log
            .append_with(event, writes)
            .map(|_| ())
            .map_err(|_| KeyringError::AuditUnavailable)
    }
}

/// One key's metadata and its versions' material.
struct KeyEntry {
    meta: KeyMeta,
    versions: HashMap<u32, Arc<VersionMaterial>>,
}

/// The keyring. No `Debug`: it holds key material.
pub struct Keyring {
    root: Zeroizing<[u8; 32]>,
    mac_key: Zeroizing<[u8; 32]>,
    hsm: Arc<Hsm>,
    store: Arc<dyn Store>,
    audit: AuditLog,
    keys: RwLock<BTreeMap<String, Arc<KeyEntry>>>,
    tampered: RwLock<BTreeMap<String, ()>>,
    admin: Mutex<()>,
    settings: Settings,
    /// Live grants, by id.
    grants: RwLock<BTreeMap<String, Grant>>,
}

/// The current Unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random<const N: usize>() -> Result<[u8; N], KeyringError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| KeyringError::Randomness)?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER.decode(s.as_bytes()).ok()
}

fn purpose_name(p: Purpose) -> &'static str {
    match p {
        Purpose::EncryptDecrypt => "ENCRYPT_DECRYPT",
        Purpose::SignVerify => "SIGN_VERIFY",
        Purpose::Mac => "MAC",
    }
}

fn hsm_kind(a: Algorithm) -> HsmKeyKind {
    match a {
        Algorithm::Aes256Gcm => HsmKeyKind::Aes256,
        Algorithm::Ed25519 => HsmKeyKind::Ed25519,
        Algorithm::EcdsaP256Sha256 => HsmKeyKind::EcdsaP256,
        Algorithm::HmacSha256 => HsmKeyKind::HmacSha256,
    }
}

/// The prefix of the label of every keyring object kms makes in the token.
const HSM_LABEL_PREFIX: &str = "kms/";

/// The token label of an HSM key's version: `kms/KEY_ID/VERSION`.
fn hsm_label(key_id: &str, version: u32) -> String {
    format!("{HSM_LABEL_PREFIX}{key_id}/{version}")
}

fn counter_key(name: &str, version: u32) -> String {
    format!("{name}/{version}")
}

fn check_size(
    what: &'static str,
    size: usize,
    max: usize,
    hint: &'static str,
) -> Result<(), KeyringError> {
    if size > max {
        return Err(KeyringError::TooLarge {
            what,
            size,
            max,
            hint,
        });
    }
    Ok(())
}

impl Keyring {
    /// Loads every key from the store, authenticating each record and deriving (or finding
    /// in the HSM) each live version's material. A record that fails authentication is
    /// kept out and refused by name.
    pub fn load(
        root: &[u8; 32],
        hsm: Arc<Hsm>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        settings: Settings,
    ) -> Result<Self, KeyringError> {
        let mut root_copy = Zeroizing::new([0u8; 32]);
        root_copy.copy_from_slice(root);
        let keyring = Self {
            mac_key: material::metadata_mac_key(root)?,
            root: root_copy,
            hsm,
            store,
            audit,
            keys: RwLock::new(BTreeMap::new()),
            tampered: RwLock::new(BTreeMap::new()),
            admin: Mutex::new(()),
            settings,
            grants: RwLock::new(BTreeMap::new()),
        };
        let mut keys = BTreeMap::new();
        let mut tampered = BTreeMap::new();
        for (name, bytes) in keyring.store.scan(Table::Keys)? {
            match model::decode(&name, &bytes, &keyring.mac_key) {
                Ok(meta) => {
                    let entry = keyring.build_entry(meta, None)?;
                    keys.insert(name, Arc::new(entry));
                }
                Err(KeyringError::Tampered(_)) => {
                    tracing::error!(key = %name, "key metadata failed authentication: the store was altered; key refused");
                    tampered.insert(name, ());
                }
                Err(e) => return Err(e),
            }
        }
        let mut live = BTreeMap::new();
        let mut refused_grants = 0usize;
        for (id, bytes) in keyring.store.scan(Table::Grants)? {
            match grants::decode(&id, &bytes, &keyring.mac_key)? {
                Some(g) if g.revoked_at.is_none() => {
                    live.insert(id, g);
                }
                Some(_) => {}
                None => {
                    tracing::error!(grant = %id, "grant record failed authentication: the store was altered; grant refused");
                    refused_grants += 1;
                }
            }
        }
        tracing::info!(
            keys = keys.len(),
            refused = tampered.len(),
            grants = live.len(),
            refused_grants,
            "keyring loaded"
        );
        *keyring
            .grants
            .write()
            .map_err(|_| KeyringError::Internal("lock"))? = live;
        *keyring
            .keys
            .write()
            .map_err(|_| KeyringError::Internal("lock"))? = keys;
        *keyring
            .tampered
            .write()
            .map_err(|_| KeyringError::Internal("lock"))? = tampered;
        keyring.sweep_orphans();
        Ok(keyring)
    }

    /// Destroys the token objects kms made for versions that no record names: left by a
    /// crash (or a failed clean-up) between making a version's object and committing the
    /// version, once that version number has been taken by a committed version with
    /// another object. An object for a version number not yet committed is left alone (it
    /// may be another server's rotation in flight) and reported; an object of a key this
    /// keyring does not know is reported too. Failures are logged, never fatal.
    fn sweep_orphans(&self) {
        let objects = match self.hsm.objects_labelled(HSM_LABEL_PREFIX) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "could not list the token's objects to sweep orphans");
                return;
            }
        };
        let Ok(keys) = self.keys.read() else {
            return;
        };
        let by_id: HashMap<&str, &KeyMeta> = keys
            .values()
            .map(|e| (e.meta.key_id.as_str(), &e.meta))
            .collect();
        let (mut swept, mut pending, mut unknown) = (0usize, 0usize, 0usize);
        for object in objects {
            let Some((key_id, version)) = object
                .label
                .strip_prefix(HSM_LABEL_PREFIX)
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(k, v)| Some((k, v.parse::<u32>().ok()?)))
            else {
                continue;
            };
            let Some(meta) = by_id.get(key_id) else {
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
            match self.hsm.destroy(object.handle) {
                Ok(()) => {
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
    }

    /// Builds an entry's material, reusing `old`'s where the version is unchanged.
    fn build_entry(&self, meta: KeyMeta, old: Option<&KeyEntry>) -> Result<KeyEntry, KeyringError> {
        let key_id =
            unhex(&meta.key_id).ok_or_else(|| KeyringError::Tampered(meta.name.clone()))?;
        let mut versions = HashMap::new();
        for v in &meta.versions {
            if let Some(existing) = old.and_then(|o| {
                let same = o.meta.version(v.version).is_some_and(|m| {
                    matches!(m.state, VersionState::Destroyed { .. })
                        == matches!(v.state, VersionState::Destroyed { .. })
                });
                if same {
                    o.versions.get(&v.version).cloned()
                } else {
                    None
                }
            }) {
                versions.insert(v.version, existing);
                continue;
            }
            let secret = match (&v.state, meta.protection) {
                (VersionState::Destroyed { .. }, _) => None,
                (_, Protection::Software) => {
                    let salt = v
                        .salt
                        .as_deref()
                        .and_then(unhex)
                        .ok_or_else(|| KeyringError::Tampered(meta.name.clone()))?;
                    Some(material::derive_secret(
                        &self.root,
                        &salt,
                        &key_id,
                        v.version,
                        meta.algorithm,
                    )?)
                }
                (_, Protection::Hsm) => {
                    let label = v
                        .hsm_label
                        .as_deref()
                        .ok_or_else(|| KeyringError::Tampered(meta.name.clone()))?;
                    let id = match &v.hsm_id {
                        Some(id) => Some(
                            unhex(id).ok_or_else(|| KeyringError::Tampered(meta.name.clone()))?,
                        ),
                        None => None,
                    };
                    let kind = hsm_kind(meta.algorithm);
                    match self.hsm.find_key(kind, label, id.as_deref()) {
                        Ok(Some(h)) => Some(Secret::Hsm(kind, h)),
                        Ok(None) => {
                            tracing::error!(key = %meta.name, version = v.version, "HSM object missing from the token");
                            Some(Secret::HsmMissing)
                        }
                        // Never a guess between objects: the version is unusable until an
                        // operator looks (its operations fail DATA_LOSS).
                        Err(
                            e @ (HsmError::KeyAmbiguous { .. } | HsmError::UnexpectedObject { .. }),
                        ) => {
                            tracing::error!(key = %meta.name, version = v.version, error = %e, "HSM object refused");
                            Some(Secret::HsmMissing)
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let public = match &v.public_key {
                Some(h) => Some(
                    unhex(h)
                        .and_then(|b| Public::from_bytes(meta.algorithm, &b))
                        .ok_or_else(|| KeyringError::Tampered(meta.name.clone()))?,
                ),
                None => None,
            };
            let reserved = match self
                .store
                .get(Table::Counters, &counter_key(&meta.name, v.version))?
            {
                Some(b) => u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0xff; 8])),
                None => 0,
            };
            versions.insert(
                v.version,
                Arc::new(VersionMaterial {
                    secret,
                    public,
                    counter: AtomicU64::new(reserved),
                    reserved: AtomicU64::new(reserved),
                }),
            );
        }
        Ok(KeyEntry { meta, versions })
    }

    fn entry(&self, name: &str) -> Result<Arc<KeyEntry>, KeyringError> {
        model::check_name(name)?;
        let found = self
            .keys
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?
            .get(name)
            .cloned();
        match found {
            Some(e) => Ok(e),
            // A refused (tampered) key is never in `keys`: look only on a miss.
            None if self
                .tampered
                .read()
                .map_err(|_| KeyringError::Internal("lock"))?
                .contains_key(name) =>
            {
                Err(KeyringError::Tampered(name.to_owned()))
            }
            None => Err(KeyringError::NotFound(name.to_owned())),
        }
    }

    fn admin(&self) -> Result<MutexGuard<'_, ()>, KeyringError> {
        self.admin
            .lock()
            .map_err(|_| KeyringError::Internal("lock"))
    }

    /// Persists `meta` durably with its audit record, then publishes it. Call with the
    /// admin lock held (which is what makes a new name's write safe without a check in the
    /// transaction: every stored key is in `keys` or `tampered`).
    fn commit(
        &self,
        meta: KeyMeta,
        old: Option<&KeyEntry>,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let bytes = model::encode(&meta, &self.mac_key)?;
        journal.commit(
            Change::Key(&meta),
            vec![Write {
                table: Table::Keys,
                key: meta.name.clone(),
                value: bytes,
            }],
        )?;
        let entry = self.build_entry(meta.clone(), old)?;
        self.keys
            .write()
            .map_err(|_| KeyringError::Internal("lock"))?
            .insert(meta.name.clone(), Arc::new(entry));
        Ok(meta)
    }

    /// A new version's metadata (software: a fresh salt; HSM: a fresh token object, whose
    /// handle is returned too, so that a refused commit destroys that object and no other).
    fn new_version(
        &self,
        meta: &KeyMeta,
        version: u32,
    ) -> Result<(VersionMeta, Option<KeyHandle>), KeyringError> {
        let mut v = VersionMeta {
            version,
            state: VersionState::Enabled,
            created_at: now(),
            salt: None,
            hsm_label: None,
            hsm_id: None,
            public_key: None,
        };
        let mut handle = None;
        match meta.protection {
            Protection::Software => {
                let salt = random::<32>()?;
                v.salt = Some(hex(&salt));
                if matches!(
                    meta.algorithm,
                    Algorithm::Ed25519 | Algorithm::EcdsaP256Sha256
                ) {
                    let key_id = unhex(&meta.key_id).ok_or(KeyringError::Internal("key id"))?;
                    let secret = material::derive_secret(
                        &self.root,
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
                let id = random::<16>()?;
                let (h, public) = self
                    .hsm
                    .generate_key(hsm_kind(meta.algorithm), &label, &id)?;
                handle = Some(h);
                v.hsm_label = Some(label);
                v.hsm_id = Some(hex(&id));
                if let Some(p) = public {
                    // Check the token's bytes parse as a public key before we rely on them.
                    if Public::from_bytes(meta.algorithm, &p).is_none() {
                        let _ = self.hsm.destroy(h);
                        return Err(KeyringError::Internal("HSM public key"));
                    }
                    v.public_key = Some(hex(&p));
                }
            }
        }
        Ok((v, handle))
    }

    /// Commits a key with a new version; if that fails, the new version's HSM object (if
    /// any) is destroyed, so that a refused change leaves nothing behind in the token.
    fn commit_new_version(
        &self,
        meta: KeyMeta,
        old: Option<&KeyEntry>,
        object: Option<KeyHandle>,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        self.commit(meta, old, journal).inspect_err(|_| {
            if let Some(h) = object
                && let Err(e) = self.hsm.destroy(h)
            {
                tracing::error!(error = %crate::error_chain(&e), "could not destroy the HSM object of a refused key version: it is swept at the next unseal");
            }
        })
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
        let _g = self.admin()?;
        if self
            .keys
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?
            .contains_key(&req.name)
            || self
                .tampered
                .read()
                .map_err(|_| KeyringError::Internal("lock"))?
                .contains_key(&req.name)
        {
            return Err(KeyringError::AlreadyExists(req.name));
        }
        let created = now();
        let mut meta = KeyMeta {
            schema: model::KEY_SCHEMA,
            name: req.name,
            key_id: hex(&random::<16>()?),
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
        };
        let (v1, object) = self.new_version(&meta, 1)?;
        meta.versions.push(v1);
        self.commit_new_version(meta, None, object, journal)
    }

    /// The key's metadata.
    pub fn get_key(&self, name: &str) -> Result<KeyMeta, KeyringError> {
        Ok(self.entry(name)?.meta.clone())
    }

    /// Keys in name order, after `page_token` (the last name of the previous page).
    pub fn list_keys(
        &self,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<KeyMeta>, Option<String>), KeyringError> {
        let size = match page_size {
            0 => 100,
            n => n.min(1000),
        };
        let keys = self
            .keys
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?;
        let start = if page_token.is_empty() {
            std::ops::Bound::Unbounded
        } else {
            std::ops::Bound::Excluded(page_token.to_owned())
        };
        let mut page: Vec<KeyMeta> = keys
            .range((start, std::ops::Bound::Unbounded))
            .take(size + 1)
            .map(|(_, e)| e.meta.clone())
            .collect();
        let next = if page.len() > size {
            page.truncate(size);
            page.last().map(|m| m.name.clone())
        } else {
            None
        };
        Ok((page, next))
    }

    /// Adds a version and makes it primary.
    pub fn rotate_key(&self, name: &str, journal: &dyn Journal) -> Result<KeyMeta, KeyringError> {
        let _g = self.admin()?;
        self.rotate_locked(name, None, journal)
    }

    /// Rotates unless `only_if_primary` names a version that is no longer primary.
    fn rotate_locked(
        &self,
        name: &str,
        only_if_primary: Option<u32>,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let entry = self.entry(name)?;
        if only_if_primary.is_some_and(|v| entry.meta.primary != v) {
            return Ok(entry.meta.clone());
        }
        let mut meta = entry.meta.clone();
        let next = meta
            .versions
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(KeyringError::NotAllowed(
                "the key has the maximum number of versions",
            ))?;
        let (v, object) = self.new_version(&meta, next)?;
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
        let entry = self.entry(name)?;
        let mut meta = entry.meta.clone();
        if let Some(p) = update.rotation_period {
            Self::check_rotation_period(p)?;
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
        let entry = self.entry(name)?;
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
    pub fn enable_version(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        self.change_version(name, version, journal, |_, v| match v.state {
            VersionState::Enabled | VersionState::Disabled => {
                v.state = VersionState::Enabled;
                Ok(())
            }
            VersionState::ScheduledForDestruction { .. } => Err(KeyringError::NotAllowed(
                "the version is scheduled for destruction: cancel the destruction first",
            )),
            VersionState::Destroyed { .. } => {
                Err(KeyringError::NotAllowed("the version is destroyed"))
            }
        })
    }

    /// Disables an enabled version.
    pub fn disable_version(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        self.change_version(name, version, journal, |_, v| match v.state {
            VersionState::Enabled | VersionState::Disabled => {
                v.state = VersionState::Disabled;
                Ok(())
            }
            _ => Err(KeyringError::NotAllowed(
                "only an enabled version can be disabled",
            )),
        })
    }

    /// Schedules a version's destruction in `days` (1..=30) days. The primary version
    /// cannot be destroyed: rotate first.
    pub fn schedule_destruction(
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
        self.change_version(name, version, journal, |meta, v| {
            if meta.primary == version {
                return Err(KeyringError::NotAllowed(
                    "the primary version cannot be destroyed: rotate the key first",
                ));
            }
            match v.state {
                VersionState::Enabled | VersionState::Disabled => {
                    v.state = VersionState::ScheduledForDestruction {
                        destroy_at: now().saturating_add(u64::from(days).saturating_mul(day)),
                    };
                    Ok(())
                }
                _ => Err(KeyringError::NotAllowed(
                    "the version is already scheduled for destruction or destroyed",
                )),
            }
        })
    }

    /// Cancels a scheduled destruction; the version comes back disabled.
    pub fn cancel_destruction(
        &self,
        name: &str,
        version: u32,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let at = now();
        self.change_version(name, version, journal, |_, v| match v.state {
            // Once due, the HSM object may be gone already (destruction is retried until
            // the token confirms it): too late to cancel.
            VersionState::ScheduledForDestruction { destroy_at } if destroy_at <= at => {
                Err(KeyringError::NotAllowed(
                    "the version's destruction is due: it can no longer be cancelled",
                ))
            }
            VersionState::ScheduledForDestruction { .. } => {
                v.state = VersionState::Disabled;
                Ok(())
            }
            _ => Err(KeyringError::NotAllowed(
                "the version is not scheduled for destruction",
            )),
        })
    }

    /// Rotates keys whose rotation is due and destroys versions whose time has come.
    /// Returns how many of each it did. Each change is audited (principal `kms`).
    pub fn maintain(&self, at: u64) -> (usize, usize) {
        let log = &self.audit;
        let names: Vec<(String, Option<u64>, Vec<u32>)> = match self.keys.read() {
            Ok(keys) => keys
                .values()
                .map(|e| {
                    let due: Vec<u32> = e
                        .meta
                        .versions
                        .iter()
                        .filter(|v| matches!(v.state, VersionState::ScheduledForDestruction { destroy_at } if destroy_at <= at))
                        .map(|v| v.version)
                        .collect();
                    (e.meta.name.clone(), e.meta.next_rotation_at, due)
                })
                .collect(),
            Err(_) => return (0, 0),
        };
        let (mut rotated, mut destroyed) = (0, 0);
        for (name, next_rotation, due) in names {
            if next_rotation.is_some_and(|t| t <= at) {
                match self.admin().and_then(|_g| {
                    // Re-check under the lock: another call may have rotated it.
                    let e = self.entry(&name)?;
                    if e.meta.next_rotation_at.is_some_and(|t| t <= at) {
                        let journal = SystemJournal {
                            log,
                            operation: "AutoRotateKey",
                            version: None,
                        };
                        self.rotate_locked(&name, None, &journal).map(|_| true)
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
                match self.destroy(&name, version, at, log) {
                    Ok(()) => destroyed += 1,
                    Err(e) => {
                        tracing::error!(key = %name, version, error = %crate::error_chain(&e), "destruction failed: the version stays due, and the next maintenance run tries again")
                    }
                }
            }
        }
        (rotated, destroyed)
    }

    /// Destroys a version whose scheduled time has come: the salt is erased (software) or
    /// the HSM object destroyed. Crypto-shredding: the material cannot be made again.
    fn destroy(
        &self,
        name: &str,
        version: u32,
        at: u64,
        log: &AuditLog,
    ) -> Result<(), KeyringError> {
        let _g = self.admin()?;
        let entry = self.entry(name)?;
        let mut meta = entry.meta.clone();
        let (protection, algorithm) = (meta.protection, meta.algorithm);
        let v = meta
            .version_mut(version)
            .ok_or(KeyringError::Internal("version"))?;
        if !matches!(v.state, VersionState::ScheduledForDestruction { destroy_at } if destroy_at <= at)
        {
            return Ok(());
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
        let journal = SystemJournal {
            log,
            operation: "DestroyKeyVersion",
            version: Some(version),
        };
        self.commit(meta, Some(&entry), &journal)?;
        tracing::info!(key = %name, version, "key version destroyed");
        Ok(())
    }

    /// The entry, checked for purpose.
    fn entry_for(
        &self,
        name: &str,
        purpose: Purpose,
        operation: &'static str,
    ) -> Result<Arc<KeyEntry>, KeyringError> {
        let e = self.entry(name)?;
        if e.meta.purpose != purpose {
            return Err(KeyringError::WrongPurpose {
                name: name.to_owned(),
                purpose: purpose_name(e.meta.purpose),
                operation,
            });
        }
        Ok(e)
    }

    /// The material of `version`, which must be enabled (and, for decrypt/verify, at or
    /// above the minimum decryption version).
    fn usable(
        e: &KeyEntry,
        version: u32,
        check_min: bool,
    ) -> Result<&Arc<VersionMaterial>, KeyringError> {
        let name = &e.meta.name;
        let vm = e
            .meta
            .version(version)
            .ok_or_else(|| KeyringError::VersionNotFound {
                name: name.clone(),
                version,
            })?;
        if check_min && version < e.meta.min_decryption_version {
            return Err(KeyringError::BelowMinimum {
                name: name.clone(),
                version,
                min: e.meta.min_decryption_version,
            });
        }
        if vm.state != VersionState::Enabled {
            return Err(KeyringError::VersionNotEnabled {
                name: name.clone(),
                version,
                state: vm.state.name(),
            });
        }
        e.versions
            .get(&version)
            .ok_or(KeyringError::Internal("material"))
    }

    /// The secret of a usable version (see [`Keyring::usable`]).
    fn secret(e: &KeyEntry, version: u32, check_min: bool) -> Result<&Secret, KeyringError> {
        Self::usable(e, version, check_min)?
            .secret
            .as_ref()
            .ok_or(KeyringError::Internal("no secret"))
    }

    /// Takes one message from the primary version's nonce budget; rotates at 3/4 of it.
    /// Returns whether this call rotated the key (the caller then uses the new primary).
    fn take_nonce_budget(&self, e: &KeyEntry) -> Result<bool, KeyringError> {
        let version = e.meta.primary;
        let m = Self::usable(e, version, false)?;
        let max = self.settings.max_messages_per_version;
        let n = m.counter.fetch_add(1, Ordering::SeqCst);
        if n >= max {
            return Err(KeyringError::Exhausted {
                name: e.meta.name.clone(),
                version,
            });
        }
        if n >= m.reserved.load(Ordering::SeqCst) {
            let _g = self.admin()?;
            let reserved = m.reserved.load(Ordering::SeqCst);
            if n >= reserved {
                let block = (max / 64).clamp(1, 1 << 16);
                let new = n.saturating_add(block).min(max);
                self.store.put(
                    Table::Counters,
                    &counter_key(&e.meta.name, version),
                    &new.to_be_bytes(),
                )?;
                m.reserved.store(new, Ordering::SeqCst);
            }
        }
        if n >= max - max / 4 {
            let _g = self.admin()?;
            let journal = SystemJournal {
                log: &self.audit,
                operation: "AutoRotateKey",
                version: None,
            };
            let meta = self.rotate_locked(&e.meta.name, Some(version), &journal)?;
            return Ok(meta.primary != version);
        }
        Ok(false)
    }

    /// Encrypts under the primary version. Returns the ciphertext and the version.
    pub fn encrypt(
        &self,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        check_size(
            "the plaintext",
            plaintext.len(),
            MAX_PLAINTEXT,
            ": encrypt larger data locally under a data key from GenerateDataKey",
        )?;
        check_size("the associated data", aad.len(), MAX_AAD, "")?;
        let mut e = self.entry_for(name, Purpose::EncryptDecrypt, "encryption")?;
        if self.take_nonce_budget(&e)? {
            // This call rotated the key: encrypt under the new primary version.
            e = self.entry(name)?;
            self.take_nonce_budget(&e)?;
        }
        let version = e.meta.primary;
        let secret = Self::secret(&e, version, false)?;
        let nonce = random::<{ ciphertext::NONCE_LEN }>()?;
        let header = ciphertext::header(version);
        // Build the output once: header | nonce, then the ciphertext is made in place.
        let mut out = Vec::with_capacity(ciphertext::OVERHEAD + plaintext.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        secret.encrypt_into(
            Some(&self.hsm),
            &nonce,
            &ciphertext::gcm_aad(&header, name, aad),
            plaintext,
            &mut out,
        )?;
        Ok((out, version))
    }

    /// Decrypts with the version the ciphertext names.
    pub fn decrypt(
        &self,
        name: &str,
        ct: &[u8],
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, u32), KeyringError> {
        check_size(
            "the ciphertext",
            ct.len(),
            MAX_PLAINTEXT + ciphertext::OVERHEAD,
            "",
        )?;
        check_size("the associated data", aad.len(), MAX_AAD, "")?;
        let e = self.entry_for(name, Purpose::EncryptDecrypt, "decryption")?;
        let parsed = ciphertext::parse(ct).map_err(|_| KeyringError::DecryptionFailed)?;
        // An unknown version is indistinguishable from tampering.
        if e.meta.version(parsed.version).is_none() {
            return Err(KeyringError::DecryptionFailed);
        }
        let secret = Self::secret(&e, parsed.version, true)?;
        let pt = secret.decrypt(
            Some(&self.hsm),
            &parsed.nonce,
            &ciphertext::gcm_aad(&parsed.header, name, aad),
            parsed.body,
        )?;
        Ok((pt, parsed.version))
    }

    /// Decrypts with `name` and encrypts under `destination` (or `name`)'s primary version,
    /// without returning the plaintext.
    pub fn reencrypt(
        &self,
        name: &str,
        ct: &[u8],
        aad: &[u8],
        destination: Option<&str>,
    ) -> Result<(Vec<u8>, u32, u32), KeyringError> {
        let (pt, source_version) = self.decrypt(name, ct, aad)?;
        let (ct, version) = self.encrypt(destination.unwrap_or(name), &pt, aad)?;
        Ok((ct, version, source_version))
    }

    /// Makes a grant on an existing key. `by` is the admin's principal.
    pub fn create_grant(
        &self,
        req: NewGrant,
        by: &str,
        journal: &dyn Journal,
    ) -> Result<Grant, KeyringError> {
        let principal = crate::access::Pattern::new(&req.principal)?;
        let operations: std::collections::BTreeSet<_> = req.operations.iter().copied().collect();
        if operations.is_empty() {
            return Err(KeyringError::BadRequest(
                "a grant needs at least one operation",
            ));
        }
        if operations.contains(&crate::access::Operation::Reencrypt) {
            return Err(KeyringError::BadRequest(
                "the operation reencrypt was split: grant reencrypt-from on the source key and reencrypt-to on the destination key",
            ));
        }
        if req.associated_data.is_some() && !operations.iter().all(|o| o.has_associated_data()) {
            return Err(KeyringError::BadRequest(
                "an associated-data constraint applies only to encrypt, decrypt, reencrypt-from, reencrypt-to and generate-data-key",
            ));
        }
        if let Some(aad) = &req.associated_data {
            check_size("associated data", aad.len(), MAX_AAD, "")?;
        }
        let _g = self.admin()?;
        self.entry(&req.key)?;
        let live_on_key = self
            .grants
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?
            .values()
            .filter(|g| g.key == req.key)
            .count();
        if live_on_key >= grants::MAX_GRANTS_PER_KEY {
            return Err(KeyringError::NotAllowed(
                "the key has the most grants allowed (1000): revoke some first",
            ));
        }
        let associated_data_mac = match &req.associated_data {
            Some(aad) => Some(hex(&grants::aad_mac(&self.mac_key, &req.key, aad)?)),
            None => None,
        };
        let grant = Grant {
            schema: grants::GRANT_SCHEMA,
            id: hex(&random::<16>()?),
            key: req.key,
            principal,
            operations,
            associated_data_mac,
            created_at: now(),
            created_by: by.to_owned(),
            revoked_at: None,
            revoked_by: None,
        };
        self.commit_grant(&grant, journal)?;
        self.grants
            .write()
            .map_err(|_| KeyringError::Internal("lock"))?
            .insert(grant.id.clone(), grant.clone());
        Ok(grant)
    }

    /// Revokes a live grant: the next call it would have allowed is refused.
    pub fn revoke_grant(
        &self,
        id: &str,
        by: &str,
        journal: &dyn Journal,
    ) -> Result<Grant, KeyringError> {
        grants::check_id(id)?;
        let _g = self.admin()?;
        let mut grant = self
            .grants
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?
            .get(id)
            .cloned()
            .ok_or_else(|| KeyringError::GrantNotFound(id.to_owned()))?;
        grant.revoked_at = Some(now());
        grant.revoked_by = Some(by.to_owned());
        self.commit_grant(&grant, journal)?;
        self.grants
            .write()
            .map_err(|_| KeyringError::Internal("lock"))?
            .remove(id);
        Ok(grant)
    }

    fn commit_grant(&self, grant: &Grant, journal: &dyn Journal) -> Result<(), KeyringError> {
        let bytes = grants::encode(grant, &self.mac_key)?;
        journal.commit(
            Change::Grant(grant),
            vec![Write {
                table: Table::Grants,
                key: grant.id.clone(),
                value: bytes,
            }],
        )
    }

    /// The live grants, optionally only those on `key` and those whose grantee is or
    /// matches `principal` (empty: all).
    pub fn list_grants(&self, key: &str, principal: &str) -> Result<Vec<Grant>, KeyringError> {
        Ok(self
            .grants
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?
            .values()
            .filter(|g| key.is_empty() || g.key == key)
            .filter(|g| {
                principal.is_empty()
                    || g.principal.as_str() == principal
                    || g.principal.matches(principal)
            })
            .cloned()
            .collect())
    }

    /// Whether a live grant lets `principal` do `operation` with `key`, with the
    /// request's associated data `aads` (all of them must satisfy a constrained grant).
    pub fn permits(
        &self,
        principal: &str,
        key: &str,
        operation: crate::access::Operation,
        aads: &[&[u8]],
    ) -> Result<bool, KeyringError> {
        let grants = self
            .grants
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?;
        for g in grants.values().filter(|g| g.key == key) {
            if g.allows(principal, operation, aads, &self.mac_key)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every key's metadata, by name.
    pub fn all_keys(&self) -> Result<Vec<KeyMeta>, KeyringError> {
        Ok(self
            .keys
            .read()
            .map_err(|_| KeyringError::Internal("lock"))?
            .values()
            .map(|e| e.meta.clone())
            .collect())
    }

    /// A random data key, and its ciphertext under `name`.
    pub fn generate_data_key(
        &self,
        name: &str,
        length: usize,
        aad: &[u8],
    ) -> Result<DataKey, KeyringError> {
        if !(1..=MAX_DATA_KEY).contains(&length) {
            return Err(KeyringError::BadRequest(
                "length_bytes must be 1..=64 (default 32)",
            ));
        }
        let mut dk = Zeroizing::new(vec![0u8; length]);
        getrandom::fill(dk.as_mut_slice()).map_err(|_| KeyringError::Randomness)?;
        let (ct, version) = self.encrypt(name, &dk, aad)?;
        Ok((dk, ct, version))
    }

    /// Signs with the primary version.
    pub fn sign(
        &self,
        name: &str,
        input: SignInput<'_>,
        raw: bool,
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        if let SignInput::Message(m) = input {
            check_size(
                "the message",
                m.len(),
                MAX_MESSAGE,
                ": sign its SHA-256 digest instead (ECDSA)",
            )?;
        }
        let e = self.entry_for(name, Purpose::SignVerify, "signing")?;
        let version = e.meta.primary;
        let secret = Self::secret(&e, version, false)?;
        Ok((secret.sign(Some(&self.hsm), input, raw)?, version))
    }

    fn version_or_primary(e: &KeyEntry, version: u32) -> u32 {
        if version == 0 {
            e.meta.primary
        } else {
            version
        }
    }

    /// Verifies a signature made by `version` (0: the primary).
    pub fn verify(
        &self,
        name: &str,
        version: u32,
        input: SignInput<'_>,
        signature: &[u8],
    ) -> Result<bool, KeyringError> {
        if let SignInput::Message(m) = input {
            check_size("the message", m.len(), MAX_MESSAGE, "")?;
        }
        let e = self.entry_for(name, Purpose::SignVerify, "verification")?;
        let m = Self::usable(&e, Self::version_or_primary(&e, version), true)?;
        m.public
            .as_ref()
            .ok_or(KeyringError::Internal("no public key"))?
            .verify(input, signature)
    }

    /// The public key of `version` (0: the primary), SubjectPublicKeyInfo PEM.
    pub fn public_key(&self, name: &str, version: u32) -> Result<(String, u32), KeyringError> {
        let e = self.entry_for(name, Purpose::SignVerify, "public keys")?;
        let version = Self::version_or_primary(&e, version);
        let m = Self::usable(&e, version, false)?;
        Ok((
            m.public
                .as_ref()
                .ok_or(KeyringError::Internal("no public key"))?
                .to_pem()?,
            version,
        ))
    }

    /// HMAC-SHA256 with the primary version.
    pub fn mac(&self, name: &str, message: &[u8]) -> Result<(Vec<u8>, u32), KeyringError> {
        check_size("the message", message.len(), MAX_MESSAGE, "")?;
        let e = self.entry_for(name, Purpose::Mac, "MAC")?;
        let version = e.meta.primary;
        let secret = Self::secret(&e, version, false)?;
        Ok((secret.mac(Some(&self.hsm), message)?, version))
    }

    /// Checks a MAC made by `version` (0: the primary), in constant time.
    pub fn verify_mac(
        &self,
        name: &str,
        version: u32,
        message: &[u8],
        tag: &[u8],
    ) -> Result<bool, KeyringError> {
        check_size("the message", message.len(), MAX_MESSAGE, "")?;
        let e = self.entry_for(name, Purpose::Mac, "MAC verification")?;
        let secret = Self::secret(&e, Self::version_or_primary(&e, version), true)?;
        let want = secret.mac(Some(&self.hsm), message)?;
        Ok(subtle::ConstantTimeEq::ct_eq(want.as_slice(), tag).unwrap_u8() == 1)
    }
}
