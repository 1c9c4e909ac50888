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

mod admin;
pub mod ciphertext;
pub(crate) mod config;
mod crypto;
mod error;
mod follow;
pub mod grants;
mod import;
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
pub mod wrap;

pub use crypto::ReEncrypted;
pub use error::KeyringError;
pub use journal::{Change, Journal, SystemJournal, SystemRecorder};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::Zeroizing;

use crate::hsm::{Hsm, HsmError, HsmKeyKind, KeyHandle};
use crate::store::{Store, StoreError, Table, Write};
use grants::Grant;
use material::{Public, Secret, SignInput, SignatureEncoding, VersionMaterial};
use model::{
    Algorithm, KeyMeta, Origin, Protection, Purpose, RsaScheme, VersionMeta, VersionState,
};
use pregen::{HsmObject, Pregenerated};

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
    root: Zeroizing<[u8; 32]>,
    mac_key: Zeroizing<[u8; 32]>,
    hsm: Arc<Hsm>,
    store: Arc<dyn Store>,
    recorder: Arc<dyn SystemRecorder>,
    keys: RwLock<BTreeMap<String, Arc<KeyEntry>>>,
    tampered: RwLock<BTreeMap<String, ()>>,
    admin: Mutex<()>,
    settings: Settings,
    /// Live grants, by id.
    grants: RwLock<grants::LiveGrants>,
    /// Changes other servers made that this one has heard of and not applied yet
    /// (`keyring::follow`).
    lag: follow::Lag,
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

/// A read lock on one of the keyring's in-memory maps.
fn read_lock<T>(l: &RwLock<T>) -> Result<RwLockReadGuard<'_, T>, KeyringError> {
    l.read().map_err(|_| KeyringError::Internal(LOCK))
}

/// A write lock on one of the keyring's in-memory maps.
fn write_lock<T>(l: &RwLock<T>) -> Result<RwLockWriteGuard<'_, T>, KeyringError> {
    l.write().map_err(|_| KeyringError::Internal(LOCK))
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
    fn entry(&self, name: &str) -> Result<Arc<KeyEntry>, KeyringError> {
        model::check_name(name)?;
        let found = read_lock(&self.keys)?.get(name).cloned();
        match found {
            Some(e) => Ok(e),
            // A refused (tampered) key is never in `keys`: look only on a miss.
            None if read_lock(&self.tampered)?.contains_key(name) => {
                Err(KeyringError::Tampered(name.to_owned()))
            }
            None => Err(KeyringError::NotFound(name.to_owned())),
        }
    }

    /// As [`Keyring::entry`]; on a shared store, a key this server has not heard of yet is
    /// looked up there first (another server may have made it a moment ago), and a key
    /// another server changed is refused while this one has not applied the change
    /// (`keyring::follow`). Every crypto call finds its key here.
    fn fetch(&self, name: &str) -> Result<Arc<KeyEntry>, KeyringError> {
        self.refuse_if_behind(name)?;
        match self.entry(name) {
            Err(KeyringError::NotFound(_)) if self.store.shared() && self.reload_key(name)? => {
                self.entry(name)
            }
            other => other,
        }
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
        read_lock(&self.keys).map_or(true, |keys| match keys.get(name) {
            Some(e) => e.meta.protection == model::Protection::Software,
            // On a shared store an unknown key is looked up there first: a database round
            // trip, for a blocking thread.
            None => !self.store.shared(),
        })
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
        let entry = self.build_entry(meta.clone(), old, None)?;
        write_lock(&self.keys)?.insert(meta.name.clone(), Arc::new(entry));
        Ok(meta)
    }
}
