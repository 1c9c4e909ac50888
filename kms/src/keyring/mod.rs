//! The keyring: named, versioned keys beneath the root key, and the crypto operations.
//!
//! A [`Keyring`] exists only while the server is unsealed: it is opened at unseal without
//! reading any key, and dropped at seal, which zeroizes every derived key.
//!
//! **Lazy.** A key's record (and, apart, its grants) is read from the store, authenticated
//! with a MAC under a key derived from the root key, and prepared at its first use, then
//! kept in a bounded cache (`keyring::cache`, `[keyring] cache_keys` entries) until it is
//! evicted, which drops (and so zeroizes) its derived secrets. A record that fails its MAC
//! is refused by name at its first use; a background walk after unseal
//! (`keyring::walk`) checks every record, reports the altered ones (log and metric), sweeps
//! orphan HSM objects and finds the keys whose rotation or destruction comes due.
//!
//! Reads take a snapshot (`Arc<KeyEntry>`) from the cache and run without locks. Writes
//! (administration, rotation, destruction) are serialised by one mutex, written durably to
//! the store first, and then replace the cached entry: a write the caller saw acknowledged
//! is on disk.
//!
//! Nonce budget: AES-GCM with random 96-bit nonces is safe for 2^32 messages per key
//! (NIST SP 800-38D, 8.3). Each version counts its encryptions; the count is reserved in the
//! store in blocks before use (so a crash never lets a version exceed its budget), the key
//! is rotated automatically at three quarters of the budget, and a version at its budget
//! refuses to encrypt.

mod admin;
mod cache;
pub mod ciphertext;
pub(crate) mod config;
mod crypto;
mod engine;
mod error;
mod follow;
pub mod grants;
mod import;
mod index;
pub(crate) use import::Import;
pub use import::Wrapping;
mod journal;
mod lifecycle;
mod load;
mod maintenance;
pub mod material;
pub mod model;
mod pregen;
pub(crate) mod requests;
mod reserve;
mod walk;
pub mod wrap;

pub use crypto::ReEncrypted;
pub use error::KeyringError;
pub use journal::{Change, Journal, SystemJournal, SystemRecorder};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::Zeroizing;

use crate::hsm::{Hsm, HsmError, HsmKeyKind, KeyHandle};
use crate::store::{Follow, Store, StoreError, Table, Write};
use grants::Grant;
use material::{Public, Secret, SignInput, SignatureEncoding, VersionMaterial};
use model::{
    Algorithm, KeyMeta, Origin, Protection, Purpose, RsaScheme, VersionMeta, VersionState,
};
use pregen::{HsmObject, Pregenerated};

/// Key records (authenticated by the keyring), by key name.
pub const KEYS: Table = Table::new("keys", Follow::Changes);
/// Grants (authenticated by the keyring), by grant id.
pub const GRANTS: Table = Table::new("grants", Follow::Changes);
/// Per-version AES-GCM message counters (reservations), `name/version` -> u64 BE.
pub const COUNTERS: Table = Table::new("counters", Follow::Never);
/// The first answers to changes made with a caller's request id (authenticated by the
/// keyring), kept a day so that a retry does not change anything twice.
pub const REQUESTS: Table = Table::new("requests", Follow::Never);
/// What finds a record without reading every one (`keyring::index`): grant ids by key
/// name, HSM keys' names by key id. Hints only: every record found through it is read and
/// authenticated in its own table.
pub const INDEX: Table = Table::new("key_index", Follow::Never);
/// The keyring's tables, in the order a backup writes them.
pub const TABLES: &[Table] = &[KEYS, GRANTS, COUNTERS, REQUESTS, INDEX];

/// Largest plaintext `Encrypt` takes (use `GenerateDataKey` and encrypt locally above it).
pub(crate) const MAX_PLAINTEXT: usize = 64 * 1024;
/// Largest associated data.
pub(crate) const MAX_AAD: usize = 64 * 1024;
/// Largest message `Sign` or `Mac` takes.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// The sizes a data key may have: those of AES-128, -192 and -256 keys, and 64 bytes (an
/// AES-256-SIV or XTS key pair, an HMAC-SHA-512 key). Any other length is no key's.
pub(crate) const DATA_KEY_LENGTHS: [usize; 4] = [16, 24, 32, 64];
/// Longest RSA ciphertext: one block of the largest modulus (4096 bits).
pub(crate) const MAX_RSA_CIPHERTEXT: usize = 512;
/// AES-GCM random-nonce budget per version (NIST SP 800-38D).
pub(crate) const DEFAULT_MAX_MESSAGES: u64 = 1 << 32;

/// Keyring settings (`[keyring]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// AES-GCM messages per version before it refuses (auto-rotation at 3/4 of it).
    pub max_messages_per_version: u64,
    /// The length of a "day" for destruction windows, in seconds (86400; tests shorten it).
    pub day_seconds: u64,
    /// The most keys (and, apart, keys' grant lists) kept prepared in memory.
    pub cache_keys: usize,
}

/// `[keyring] cache_keys` by default: about 30 MiB of keys and as much of grants.
pub(crate) const DEFAULT_CACHE_KEYS: usize = 10_000;

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_messages_per_version: DEFAULT_MAX_MESSAGES,
            day_seconds: 86_400,
            cache_keys: DEFAULT_CACHE_KEYS,
        }
    }
}

/// What `CreateKey` asks for.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The key's name: unique, permanent, `[a-zA-Z0-9_.-]{1,128}`.
    pub name: String,
    /// Algorithm (the purpose follows from it).
    pub algorithm: Algorithm,
    /// Protection level.
    pub protection: Protection,
    /// Automatic rotation period in seconds.
    pub rotation_period: Option<u64>,
    /// Free-form labels for operators (at most 64), authenticated with the key's record.
    pub labels: BTreeMap<String, String>,
    /// EXTERNAL: no version until the customer's material is imported.
    pub origin: Origin,
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
pub(crate) type DataKey = (Zeroizing<Vec<u8>>, Vec<u8>, u32);

/// One key's metadata and its versions' material.
struct KeyEntry {
    meta: KeyMeta,
    versions: HashMap<u32, Arc<VersionMaterial>>,
}

/// Held while the keyring changes (see `Keyring::admin`); the shared lock is released first.
struct AdminGuard<'a> {
    _shared: Option<crate::store::ChangeLock>,
    _local: MutexGuard<'a, ()>,
}

/// The keyring. No `Debug`: it holds key material.
pub struct Keyring {
    barrier: Arc<crate::barrier::Barrier>,
    mac_key: Zeroizing<[u8; 32]>,
    hsm: Arc<Hsm>,
    store: Arc<dyn Store>,
    recorder: Arc<dyn SystemRecorder>,
    /// Keys used lately, as read at their first use (or since changed).
    keys: cache::Cache<Arc<KeyEntry>>,
    admin: Mutex<()>,
    settings: Settings,
    /// The live grants of keys used lately, by key name.
    grants: cache::Cache<Arc<[Grant]>>,
    /// What the background walk found (`keyring::walk`), and the maintenance schedule.
    walk: walk::Walk,
    /// Nonce-budget reservations committed in groups (`keyring::reserve`).
    reservations: reserve::Reservations,
    /// Changes other servers made that this one has heard of and not applied yet
    /// (`keyring::follow`).
    lag: follow::Lag,
    /// When maintenance last removed retries' expired first answers (`keyring::engine`).
    forgot: Mutex<Option<std::time::Instant>>,
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
        Purpose::AsymmetricDecrypt => "ASYMMETRIC_DECRYPT",
    }
}

/// The token object kind that holds an `algorithm` key.
pub(crate) const fn hsm_kind(a: Algorithm) -> HsmKeyKind {
    match a {
        Algorithm::Aes256Gcm => HsmKeyKind::Aes256,
        Algorithm::Ed25519 => HsmKeyKind::Ed25519,
        Algorithm::EcdsaP256Sha256 => HsmKeyKind::EcdsaP256,
        Algorithm::EcdsaP384Sha384 => HsmKeyKind::EcdsaP384,
        Algorithm::HmacSha256 => HsmKeyKind::HmacSha256,
        Algorithm::RsaSignPss2048Sha256 => HsmKeyKind::Rsa(RsaScheme::Pss, 2048),
        Algorithm::RsaSignPss3072Sha256 => HsmKeyKind::Rsa(RsaScheme::Pss, 3072),
        Algorithm::RsaSignPss4096Sha256 => HsmKeyKind::Rsa(RsaScheme::Pss, 4096),
        Algorithm::RsaSignPkcs12048Sha256 => HsmKeyKind::Rsa(RsaScheme::Pkcs1, 2048),
        Algorithm::RsaSignPkcs13072Sha256 => HsmKeyKind::Rsa(RsaScheme::Pkcs1, 3072),
        Algorithm::RsaSignPkcs14096Sha256 => HsmKeyKind::Rsa(RsaScheme::Pkcs1, 4096),
        Algorithm::RsaDecryptOaep2048Sha256 => HsmKeyKind::Rsa(RsaScheme::Oaep, 2048),
        Algorithm::RsaDecryptOaep3072Sha256 => HsmKeyKind::Rsa(RsaScheme::Oaep, 3072),
        Algorithm::RsaDecryptOaep4096Sha256 => HsmKeyKind::Rsa(RsaScheme::Oaep, 4096),
    }
}

/// The prefix of the label of every keyring object kms makes in the token.
pub(crate) const HSM_LABEL_PREFIX: &str = "kms/";

/// The label of the HSM marker that says the keyring object with CKA_ID `id` was made for
/// a version not committed yet: made before the object, removed once the version is
/// committed (or the object destroyed). Only an object that carries one is ever swept as an
/// orphan: a committed version's object never is, whatever a (rolled-back) record says.
fn pending_label(id: &[u8]) -> String {
    format!("kms-pending/{}", hex(id))
}

/// The prefix of the label of an import job's wrapping key: `kms-import/KEY_ID/JOB_ID`.
pub(crate) const IMPORT_LABEL_PREFIX: &str = "kms-import/";

/// The token label of an HSM key's version: `kms/KEY_ID/VERSION`.
fn hsm_label(key_id: &str, version: u32) -> String {
    format!("{HSM_LABEL_PREFIX}{key_id}/{version}")
}

/// What a poisoned lock is reported as: a bug (every update of the guarded maps is one
/// assignment, so a panic cannot leave them half-written, but we do not carry on blindly).
const LOCK: &str = "lock";

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
    /// The key `name`: from the cache, or read from the store, authenticated and prepared
    /// now (its first use since the unseal, or since it was evicted). A record that fails
    /// authentication is refused by name; a name the store does not have is remembered as
    /// absent for a moment (`cache::ABSENT_FOR`).
    fn entry(&self, name: &str) -> Result<Arc<KeyEntry>, KeyringError> {
        model::check_name(name)?;
        let found = match self.keys.get(name) {
            Some(c) => c,
            None => self.load_key(name)?,
        };
        match found {
            cache::Cached::Found(e) => Ok(e),
            cache::Cached::Tampered => Err(KeyringError::Tampered(name.to_owned())),
            cache::Cached::Absent(_) => Err(KeyringError::NotFound(name.to_owned())),
        }
    }

    /// As [`Keyring::entry`]; a key another server changed is refused while this one has
    /// not applied the change (`keyring::follow`). Every crypto call finds its key here.
    fn fetch(&self, name: &str) -> Result<Arc<KeyEntry>, KeyringError> {
        self.refuse_if_behind(name)?;
        self.entry(name)
    }

    /// The entry an administrative change starts from, the admin lock held: on a shared
    /// store, read afresh (another server may have changed it since it was heard of).
    fn entry_locked(&self, name: &str) -> Result<Arc<KeyEntry>, KeyringError> {
        if self.store.shared() {
            model::check_name(name)?;
            self.reload_key_locked(name)?;
        }
        self.entry(name)
    }

    /// Whether a crypto call on `name` is done in this process (a SOFTWARE key, or no such
    /// key on a store only this server writes: the call fails at once), so that the server
    /// may run it on the async worker instead of a blocking thread. HSM keys answer false:
    /// every use is a PKCS#11 call.
    pub(crate) fn runs_in_process(&self, name: &str) -> bool {
        match self.keys.peek(name) {
            Some(cache::Cached::Found(e)) => {
                e.meta.protection == model::Protection::Software && self.grants_cached(name)
            }
            Some(cache::Cached::Tampered | cache::Cached::Absent(_)) => true,
            // Not prepared yet: its first use reads the store (and, for an HSM key, the
            // token), for a blocking thread.
            None => false,
        }
    }

    /// Whether `name`'s grants are in the cache, so that checking a caller's grant reads
    /// no store (a call that would read one goes to a blocking thread, never an async
    /// worker or an HSM thread).
    pub(crate) fn grants_cached(&self, name: &str) -> bool {
        matches!(self.grants.peek(name), Some(cache::Cached::Found(_)))
    }

    /// The lock every change to the keyring holds: this process's mutex, and on a shared
    /// store the lock that serialises changes across servers (two servers rotating one key
    /// in the same instant would otherwise both make its next version).
    fn admin(&self) -> Result<AdminGuard<'_>, KeyringError> {
        let local = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        let shared = self.store.lock_changes()?;
        Ok(AdminGuard {
            _shared: shared,
            _local: local,
        })
    }

    /// Persists `meta` durably with its audit record, then publishes it. Call with the
    /// admin lock held (which is what makes a new name's write safe without a check in the
    /// transaction: `create_key` looked the name up in the store under it).
    fn commit(
        &self,
        meta: KeyMeta,
        old: Option<&KeyEntry>,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        let bytes = model::encode(&meta, &self.mac_key)?;
        let mut writes = vec![Write {
            table: crate::keyring::KEYS,
            key: meta.name.clone(),
            value: bytes,
        }];
        writes.extend(index::hsm_write(&meta));
        if let Err(e) = journal.commit(Change::Key(&meta), writes) {
            // It may have been written all the same (a lost acknowledgement): read again
            // at the next use rather than go on serving the old state.
            self.keys.evict(&meta.name);
            return Err(e);
        }
        self.walk.schedule(&meta);
        match self.build_entry(meta.clone(), old) {
            Ok(entry) => self
                .keys
                .replace(&meta.name, cache::Cached::Found(Arc::new(entry))),
            // Committed, but not prepared (its HSM object not found just now): read again
            // at its next use.
            Err(e) => {
                self.keys.evict(&meta.name);
                return Err(e);
            }
        }
        Ok(meta)
    }
}
