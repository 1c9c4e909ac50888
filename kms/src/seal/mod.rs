//! The seal: init, unseal, seal, status.
//!
//! ```text
//! uninitialized --Init(n, t)--> sealed --Unseal x t--> unsealed --Seal / restart--> sealed
//! ```
//!
//! At `Init` kms makes two random 256-bit keys: the **unseal key**, split into Shamir shares
//! and never stored, and the **root key** of the keyring. The root key is stored only
//! wrapped twice: AES-256-GCM under the unseal key (in software), then AES-256-GCM under the
//! HSM master key (inside the HSM). Disk + HSM without a quorum, or disk + quorum without
//! the HSM, reveal nothing.
//!
//! Shamir shares carry no integrity, so a recombined unseal key is checked twice: against a
//! stored key check value (HMAC-SHA256 of a fixed label, 16 bytes; tells a wrong quorum
//! apart from an HSM fault without touching the HSM), and by the authenticated decryption
//! of the inner wrapping.
//!
//! With `pin_in_shares`, the Shamir secret is `unseal key | HSM PIN`: the server's disk and
//! environment hold no PIN; it logs in to the HSM at unseal and out again at seal. The key
//! check value then covers the PIN too, so an altered share is a wrong quorum, not a
//! rejected PIN.
//!
//! The root key lives in memory only while unsealed, in the [`crate::barrier::Barrier`]
//! the engines share (a zeroizing buffer); sealing (or dropping the manager) forgets it.

use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{KeyInit, Payload};
use hmac::Hmac;
use kms_unseal::{CombineError, Share, ShareError, ShareSetId, SplitError};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::audit::AuditLog;
use crate::engine::Engine;
use crate::hsm::{Hsm, HsmError, HsmKeyKind, InstanceId, KeyHandle, Ownership};
use crate::keyring::{Keyring, KeyringError};
use crate::store::{Store, StoreError, Write};

mod follow;
mod init;
mod recipients;
mod record;
mod rekey;
mod rotate;
mod unseal;
mod wrap;

pub use record::TakeOver;
pub use rekey::{RekeyStep, VerifiedShare};
pub use rotate::MasterKeyRotation;
use wrap::{key_check, random_key, random_nonce, to_key, unwrap_root, wrap_root};

/// The store key of the seal record.
const SEAL_RECORD_KEY: &str = "seal";
/// The seal record's schema version.
const SEAL_SCHEMA: u32 = 1;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const KCV_LEN: usize = 16;
const KCV_LABEL: &[u8] = b"kms/v1/unseal-key-check";
/// The longest HSM PIN that can travel in the shares.
pub(crate) const MAX_SHARED_PIN_LEN: usize = 128;
const INNER_AAD: &[u8] = b"kms/v1/root-key/inner/";
const OUTER_AAD: &[u8] = b"kms/v1/root-key/outer/";

/// Why a seal operation failed. Never carries a share, key or PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// `Init` has not been run.
    #[error("the server is not initialised: run `kms operator init`")]
    NotInitialized,
    /// `Init` was run already.
    #[error("the server is already initialised")]
    AlreadyInitialized,
    /// A key operation on a sealed server.
    #[error("sealed")]
    Sealed,
    /// Bad `Init` numbers.
    #[error(transparent)]
    BadParameters(#[from] SplitError),
    /// The share text is malformed or has a typo.
    #[error("malformed share: {0}")]
    MalformedShare(#[from] ShareError),
    /// The share belongs to another init.
    #[error(
        "the share belongs to share set {got}, but this server's share set is {expected}: it is from another init"
    )]
    WrongShareSet {
        /// This server's share set.
        expected: ShareSetId,
        /// The share's.
        got: ShareSetId,
    },
    /// The share's threshold differs from this server's (a forged or corrupted share).
    #[error("the share says threshold {got}, but this server's threshold is {expected}")]
    WrongThreshold {
        /// This server's.
        expected: u8,
        /// The share's.
        got: u8,
    },
    /// The share is well formed and of this share set, but not one of the shares made at
    /// init (altered, or forged from the public set id and threshold).
    #[error(
        "share {index} is not one of the shares made at init (its commitment does not match): it was altered or forged; it was not counted, progress is kept"
    )]
    UnknownShare {
        /// The index the share claims.
        index: u8,
    },
    /// The share belongs to a share set a rekey replaced.
    #[error(
        "the share belongs to share set {got}, which a rekey retired: it no longer unseals; this server's share set is {current}"
    )]
    RetiredShareSet {
        /// The share's.
        got: ShareSetId,
        /// This server's.
        current: ShareSetId,
    },
    /// A rekey verifying its new shares was given a share of another set.
    #[error(
        "the rekey is verifying the new share set {expected}: give a share of that set (this one is of share set {got})"
    )]
    NotNewShare {
        /// The new share set.
        expected: ShareSetId,
        /// The share's.
        got: ShareSetId,
    },
    /// No rekey is in progress.
    #[error("no rekey is in progress: an administrator starts one with `kms operator rekey init`")]
    NoRekey,
    /// A rekey is in progress or its new shares await verification.
    #[error(
        "a rekey to share set {0} is in progress or awaits verification: finish it or cancel it (`kms operator rekey cancel`)"
    )]
    RekeyInProgress(ShareSetId),
    /// Another server sharing the store changed the seal record during this step.
    #[error(
        "another server changed the seal record meanwhile (a rekey committed or cancelled): check `kms operator rekey status` and try again"
    )]
    RecordChanged,
    /// The recipients do not match the shares one to one.
    #[error("{recipients} recipients were given for {shares} shares: give one per share, or none")]
    RecipientCount {
        /// Shares asked for.
        shares: u8,
        /// Recipients given.
        recipients: usize,
    },
    /// A recipient is not an age X25519 recipient.
    #[error("recipient {position} is not an age X25519 recipient (age1...): {reason}")]
    BadRecipient {
        /// Its place in the list, from 1.
        position: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A share could not be encrypted to its recipient.
    #[error("a share could not be encrypted to its recipient")]
    ShareSealing,
    /// The share set was made before per-share commitments, so a share cannot be verified
    /// on its own.
    #[error(
        "this server's share set was made before per-share commitments: a share cannot be verified alone; rekey to make shares that can"
    )]
    NoCommitments,
    /// The same share (index) was given twice in one attempt.
    #[error("share {index} was already given in this attempt")]
    DuplicateShare {
        /// The share's index.
        index: u8,
    },
    /// The request named another attempt's nonce.
    #[error(
        "the unseal attempt named by the nonce is not the one in progress (it was reset or completed)"
    )]
    AttemptMismatch,
    /// A label to adopt that is empty, too long, or holds control characters.
    #[error("a master key label is 1..=128 bytes without control characters")]
    BadLabel,
    /// A rotation was asked to adopt the master key in force.
    #[error("the key to adopt is the master key in force already")]
    SameMasterKey,
    /// The shares recombine to a key that is not this server's unseal key.
    #[error(
        "the shares do not recombine to this server's unseal key: at least one share is wrong; unseal progress was reset"
    )]
    WrongQuorum,
    /// The unseal key was right but the root key could not be unwrapped.
    #[error(
        "the root key could not be unwrapped: the HSM master key is not the one used at init, or the store was altered; unseal progress was reset"
    )]
    RootKeyUnwrap,
    /// The stored seal record is unreadable.
    #[error("the stored seal record is corrupt or of an unknown schema")]
    CorruptRecord,
    /// The stored seal record does not carry the HSM's MAC over what it says: someone who
    /// can write the store altered it (or stripped its MAC), or it is another deployment's.
    #[error(
        "the stored seal record failed authentication with the seal record key in the HSM: the store was altered, or holds another deployment's record; nothing was done with it (put back the record kms wrote, e.g. from a backup)"
    )]
    RecordNotAuthentic,
    /// The seal record carries a MAC, but the token holds no seal record key.
    #[error(
        "the seal record is authenticated with an HSM key labelled {0:?}, which is not in the token: is this the token the store was initialised with?"
    )]
    RecordKeyMissing(String),
    /// `take-over` on an instance that was not restored from a backup, or took over already.
    #[error(
        "this instance was not restored from a backup, or took over its predecessor's objects already: there is nothing to take over"
    )]
    NothingToTakeOver,
    /// The HSM master key is not a sensitive, non-extractable, private token key that
    /// derives and wraps nothing.
    #[error("the HSM master key {label:?} is unsafe ({problems}): refusing to use it")]
    UnsafeMasterKey {
        /// Its label.
        label: String,
        /// What is wrong, e.g. "extractable, can derive keys".
        problems: String,
    },
    /// Init needs the HSM PIN (it travels in the shares) and none was given.
    #[error(
        "this server keeps its HSM PIN in the unseal shares: init needs the PIN (1..={MAX_SHARED_PIN_LEN} bytes)"
    )]
    PinRequired,
    /// Init was given a PIN, but the server reads its PIN from its configuration.
    #[error("this server reads its HSM PIN from its configuration: do not give one to init")]
    PinNotExpected,
    /// The token refused the PIN given to init.
    #[error("the HSM token refused the PIN given for init ({0}); nothing was stored")]
    InitPinRejected(&'static str),
    /// The token refused the PIN recombined from the shares (its PIN changed since init).
    #[error(
        "the HSM token refused the PIN carried in the shares ({0}): was the token's PIN changed since init? unseal progress was reset"
    )]
    SharesPinRejected(&'static str),
    /// The configuration's PIN mode differs from the one the store was initialised with.
    #[error(
        "the store was initialised with the HSM PIN {stored}, but the configuration {configured}"
    )]
    PinModeMismatch {
        /// What the store says.
        stored: &'static str,
        /// What the config says.
        configured: &'static str,
    },
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request's audit record could not be written: nothing was done.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// The audit signing key named in the seal record is not in the token.
    #[error(
        "the audit signing key {0:?} is not in the HSM token: audit checkpoints cannot be signed"
    )]
    AuditKeyMissing(String),
    /// The keyring could not be loaded at unseal.
    #[error("the keyring could not be loaded: {0}")]
    Keyring(#[from] KeyringError),
    /// The operating system's random source failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
}

/// The keyring root key while a ceremony holds it (unwrapped, wrapped again, or handed to
/// the [`crate::barrier::Barrier`] at unseal). Zeroized on drop; no `Debug`, no `Clone`.
struct RootKey(Zeroizing<[u8; KEY_LEN]>);

/// What the server holds while unsealed: the keyring (which holds the barrier, the root
/// key's one holder, and every derived key). Dropping the last reference zeroizes every
/// key byte.
struct Unsealed {
    engines: Opened,
}

/// The engines opened at unseal (`crate::engines::ENGINES`): every one alike, and the
/// keyring typed as well (its callers use its own API).
#[derive(Clone)]
struct Opened {
    keyring: Arc<Keyring>,
    secrets: Arc<crate::secrets::Secrets>,
    credentials: Arc<crate::credentials::Credentials>,
    databases: Arc<crate::databases::Databases>,
    all: Vec<Arc<dyn Engine>>,
}

/// The persisted seal metadata. Everything here is public or wrapped.
///
/// Its MAC (`record.rs`) covers the record as serde writes this struct: a field added later
/// must be skipped when absent (`skip_serializing_if`), so that an older record serialises
/// as it was MAC'd.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SealRecord {
    /// Record schema version.
    pub schema: u32,
    /// The share set id (hex).
    pub share_set_id: String,
    /// Shares made.
    pub shares: u8,
    /// Shares needed.
    pub threshold: u8,
    /// The HSM token's label at init.
    pub token_label: String,
    /// The master key's label.
    pub master_key_label: String,
    /// HMAC-SHA256(unseal key, label | share set id), first 16 bytes (hex).
    pub unseal_key_check: String,
    /// The root key wrapped twice (hex): HSM-GCM(iv | software-GCM(nonce | root key)).
    pub wrapped_root_key: String,
    /// Whether the HSM PIN travels in the shares.
    #[serde(default)]
    pub pin_in_shares: bool,
    /// The label of the audit checkpoint signing key (Ed25519, in the HSM).
    pub audit_key_label: String,
    /// Its public key (raw 32 bytes, hex).
    pub audit_public_key: String,
    /// Unix time of init, seconds.
    pub created_at: u64,
    /// Each share's commitment ([`Share::commitment`], hex), by index - 1. Empty in
    /// records made before commitments: their shares are checked only at the quorum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub share_commitments: Vec<String>,
    /// A rekey's new share set, made and handed out, awaiting the proof that its custodians
    /// hold it (a quorum of the new shares); until then the current share set stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_rekey: Option<PendingRekey>,
    /// The share sets rekeys replaced, oldest first (their shares are refused by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_share_sets: Vec<RetiredShareSet>,
    /// The master key's CKA_ID (hex): with `master_key_label` it names the one key that
    /// wraps the root key. Absent in records made before it (then the configured label
    /// alone names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key_id: Option<String>,
    /// Master keys that rotations replaced: destroyed after the commit, and again at start
    /// if a crash came between.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_master_keys: Vec<RetiredMasterKey>,
    /// This instance's identity (hex, [`InstanceId`]): made at init, new in a copy restored
    /// from a backup. The objects it makes carry it in their CKA_ID. Absent in records made
    /// before instances (they take one at their first unseal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Whether the objects made before CKA_IDs named their instance are this instance's
    /// (true for the instance upgraded in place, never for a restored copy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owns_untagged: bool,
    /// Instances whose objects this one took over (`kms operator take-over`), hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted_instances: Vec<String>,
    /// A restored copy's predecessor, whose objects it may take over once the operator says
    /// the predecessor is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<Predecessor>,
    /// Where the store this record was written for lives (hex SHA-256 of
    /// [`Store::location`]): a record found elsewhere is a copy, which takes its own
    /// identity, whatever else its store says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// HMAC-SHA256, made in the HSM with the seal record key, over the record without this
    /// field (hex; see `record.rs`). Absent only in records made before records were
    /// authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What a copy restored from a backup may take over: the objects of the instance it was
/// restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Predecessor {
    /// The instance the backup was taken from, and the instances it had taken over (hex).
    pub instances: Vec<String>,
    /// Whether it owned untagged objects.
    pub untagged: bool,
    /// The backup's SHA-256 (hex), as its trailer names it.
    pub backup_sha256: String,
    /// Unix time at which this copy took its own identity, seconds.
    pub renewed_at: u64,
}

/// A master key a rotation replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetiredMasterKey {
    /// Its label.
    pub label: String,
    /// Its CKA_ID (hex).
    pub id: String,
    /// Unix time of the rotation's commit, seconds.
    pub retired_at: u64,
}

/// A rekey's new share set, pending verification: what replaces the current one's fields at
/// the commit. Public or wrapped, like the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PendingRekey {
    /// The rekey's nonce.
    pub nonce: String,
    /// The new share set id (hex).
    pub share_set_id: String,
    /// New shares made.
    pub shares: u8,
    /// New shares needed.
    pub threshold: u8,
    /// The new unseal key's check value (hex).
    pub unseal_key_check: String,
    /// The same root key wrapped under the new unseal key and the master key (hex).
    pub wrapped_root_key: String,
    /// Each new share's commitment (hex), by index - 1.
    pub share_commitments: Vec<String>,
    /// The age recipients the new shares were sealed to, in order (public keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Unix time the new shares were made, seconds.
    pub made_at: u64,
}

/// A share set a rekey replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetiredShareSet {
    /// Its id (hex).
    pub share_set_id: String,
    /// Unix time of the rekey's commit, seconds.
    pub retired_at: u64,
}

impl SealRecord {
    fn share_set(&self) -> Result<ShareSetId, SealError> {
        ShareSetId::from_hex(&self.share_set_id).ok_or(SealError::CorruptRecord)
    }

    /// Whether `set` is one a rekey retired.
    fn retired(&self, set: ShareSetId) -> bool {
        let set = set.to_string();
        self.retired_share_sets
            .iter()
            .any(|r| r.share_set_id == set)
    }

    /// The refusal of a share of set `got`, which is not this record's.
    fn foreign_share(&self, got: ShareSetId) -> Result<SealError, SealError> {
        let current = self.share_set()?;
        Ok(if self.retired(got) {
            SealError::RetiredShareSet { got, current }
        } else {
            SealError::WrongShareSet {
                expected: current,
                got,
            }
        })
    }
}

/// Unix time now, seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The seal status, as `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealStatus {
    /// Whether `Init` was run.
    pub initialized: bool,
    /// Whether the server is sealed.
    pub sealed: bool,
    /// Shares needed.
    pub threshold: u8,
    /// Shares made.
    pub shares: u8,
    /// Shares accepted in the current attempt.
    pub progress: u8,
    /// The current attempt's nonce (hex).
    pub nonce: Option<String>,
    /// The id every share of this init carries (`None` before init).
    pub share_set_id: Option<ShareSetId>,
    /// Whether the HSM PIN travels in the shares (as configured; init then needs it).
    pub pin_in_shares: bool,
    /// The rekey in progress or pending verification.
    pub rekey: Option<RekeyStatus>,
    /// Whether the HSM answers (false from a session or handle failure until the server has
    /// recovered).
    pub hsm_available: bool,
    /// This instance's identity (hex), once its record names one.
    pub instance: Option<String>,
    /// A restored copy's predecessors, whose objects `take-over` would adopt (hex).
    pub restored_from: Vec<String>,
}

/// A rekey's progress, as `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeyStatus {
    /// `false` while current shares are collected; `true` once the new shares were made
    /// and a quorum of them must come back.
    pub verifying: bool,
    /// The rekey's nonce (hex).
    pub nonce: String,
    /// The new share set.
    pub new_share_set_id: ShareSetId,
    /// New shares.
    pub new_shares: u8,
    /// New threshold.
    pub new_threshold: u8,
    /// Shares given in this phase.
    pub progress: u8,
    /// Shares this phase needs.
    pub required: u8,
    /// Whether the new shares are sealed to age recipients.
    pub sealed_to_recipients: bool,
}

/// What makes init's seal record durable together with its audit record.
pub(crate) type InitCommit<'a> = dyn Fn(&InitOutput, Vec<Write>) -> Result<(), SealError> + 'a;

/// What `Init` returns: the shares, once.
pub struct InitOutput {
    /// The id every share of this init carries.
    pub share_set_id: ShareSetId,
    /// How many of the shares unseal.
    pub threshold: u8,
    /// Each custodian's share in text form (secret), or sealed to its recipient (an
    /// ASCII-armored age file).
    pub shares: Vec<Zeroizing<String>>,
    /// Whether `shares` are sealed to recipients.
    pub sealed: bool,
    /// The audit checkpoint key's fingerprint ([`crate::audit::fingerprint`]).
    pub audit_key_fingerprint: String,
    /// The master key's label.
    pub master_key_label: String,
    /// The master key's CKA_ID (hex), when it has one.
    pub master_key_id: Option<String>,
    /// Whether the token held the master key before this init (a store emptied to start
    /// over; or another kms using the same label on the token).
    pub master_key_reused: bool,
}

struct Attempt {
    nonce: String,
    shares: Vec<Share>,
}

/// A rekey collecting current shares: what it will make, and the shares given so far.
struct RekeyAttempt {
    nonce: String,
    new_set: ShareSetId,
    shares: u8,
    threshold: u8,
    recipients: Vec<age::x25519::Recipient>,
    given: Vec<Share>,
}

/// New shares given back while a pending rekey verifies them (for the pending rekey whose
/// nonce this names).
struct Verifying {
    nonce: String,
    given: Vec<Share>,
}

enum State {
    Uninitialized,
    Sealed(Option<Attempt>),
    Unsealed(Unsealed),
}

struct Inner {
    state: State,
    record: Option<SealRecord>,
    /// Whether `record` was authenticated with the HSM in this process (with the PIN in the
    /// shares it cannot be before the first unseal), or is one this process wrote.
    authentic: bool,
    master_key: Option<KeyHandle>,
    /// A rekey collecting current shares (in memory: a restart forgets it, and the current
    /// shares stay valid).
    rekey: Option<RekeyAttempt>,
    /// The new shares given back to a pending rekey (in memory, like unseal progress).
    verifying: Option<Verifying>,
}

/// The seal state machine. Methods block (HSM calls): call them from `spawn_blocking`.
pub struct SealManager {
    hsm: Arc<Hsm>,
    store: Arc<dyn Store>,
    audit: AuditLog,
    settings: crate::engines::Settings,
    inner: Mutex<Inner>,
    /// Whether the server is unsealed, for those who watch (health, metrics).
    unsealed: tokio::sync::watch::Sender<bool>,
    /// The engines while unsealed, published apart from `inner` so that a call reads them
    /// without waiting on a ceremony that holds `inner` (an unseal loading every key).
    published: std::sync::RwLock<Option<Opened>>,
    /// Changes to the keyring other servers made, heard while no keyring is published
    /// (sealed, or an unseal loading every key): the next keyring hears them before it is
    /// published, so a change committed while it loaded (a revocation) is never served
    /// stale. Bounded: past [`crate::store::MAX_HINTS`], one resync stands for them all.
    heard_unpublished: Mutex<Vec<crate::store::Change>>,
}

impl std::fmt::Debug for SealManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealManager").finish_non_exhaustive()
    }
}

impl SealManager {
    /// Loads the seal record, if any, and finds the master key when initialised. Always
    /// starts sealed.
    pub fn load(
        hsm: Arc<Hsm>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        settings: crate::engines::Settings,
    ) -> Result<Self, SealError> {
        let record = read_record(store.as_ref())?;
        let (state, master_key, authentic) = sealed_state(&hsm, &audit, record.as_ref())?;
        let manager = Self {
            hsm,
            store,
            audit,
            settings,
            unsealed: tokio::sync::watch::Sender::new(false),
            published: std::sync::RwLock::new(None),
            heard_unpublished: Mutex::new(Vec::new()),
            inner: Mutex::new(Inner {
                state,
                record,
                authentic,
                master_key,
                rekey: None,
                verifying: None,
            }),
        };
        if authentic {
            // Logged in with the configured PIN: a restored copy takes its identity, and
            // master keys a crash left retired are destroyed, before anything is served.
            let mut inner = manager.lock();
            manager.settle_record(&mut inner, false)?;
        }
        Ok(manager)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written state (every transition
        // is one assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The audit checkpoint public key recorded at init (raw 32 bytes), once initialised.
    pub(crate) fn audit_public_key(&self) -> Option<Vec<u8>> {
        self.lock().record.as_ref().and_then(|r| {
            data_encoding::HEXLOWER
                .decode(r.audit_public_key.as_bytes())
                .ok()
        })
    }

    /// Follows the seal state: `true` while unsealed. Changes are sent after the state
    /// changed (the health service and the metrics watch it).
    pub fn watch_unsealed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.unsealed.subscribe()
    }

    /// Whether the server is unsealed, as published to watchers: never waits on a ceremony
    /// in progress.
    pub(crate) fn is_unsealed(&self) -> bool {
        *self.unsealed.borrow()
    }

    /// The current status.
    pub fn status(&self) -> SealStatus {
        SealStatus {
            hsm_available: self.hsm.is_available(),
            ..status_of(&self.lock(), self.hsm.pin_in_shares())
        }
    }

    /// The keyring, or [`SealError::Sealed`] / [`SealError::NotInitialized`]. The lock is
    /// held only to clone the reference: crypto calls run without it.
    /// Never waits on a ceremony in progress (an unseal or init holding the state): a call
    /// made meanwhile is told the server is sealed.
    pub fn keyring(&self) -> Result<Arc<Keyring>, SealError> {
        self.opened().map(|o| o.keyring)
    }

    /// The secrets engine, or why there is none (sealed, not initialised).
    pub(crate) fn secrets(&self) -> Result<Arc<crate::secrets::Secrets>, SealError> {
        self.opened().map(|o| o.secrets)
    }

    /// The credentials engine, or why there is none (sealed, not initialised).
    pub(crate) fn credentials(&self) -> Result<Arc<crate::credentials::Credentials>, SealError> {
        self.opened().map(|o| o.credentials)
    }

    /// The databases engine, or why there is none (sealed, not initialised).
    pub(crate) fn databases(&self) -> Result<Arc<crate::databases::Databases>, SealError> {
        self.opened().map(|o| o.databases)
    }

    /// Every open engine (the keyring among them), as [`SealManager::keyring`] finds them:
    /// for the server's maintenance task.
    pub(crate) fn engines(&self) -> Result<Vec<Arc<dyn Engine>>, SealError> {
        self.opened().map(|o| o.all)
    }

    /// The engines published now, if any (a copy: the lock is not held after).
    fn published(&self) -> Option<Opened> {
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The open engines, or [`SealError::Sealed`] / [`SealError::NotInitialized`]; never
    /// waits on a ceremony in progress.
    fn opened(&self) -> Result<Opened, SealError> {
        if let Some(o) = self.published() {
            return Ok(o);
        }
        let inner = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(SealError::Sealed),
        };
        match &inner.state {
            State::Unsealed(u) => Ok(u.engines.clone()),
            State::Sealed(_) => Err(SealError::Sealed),
            State::Uninitialized => Err(SealError::NotInitialized),
        }
    }

    /// On a shared store: takes up the seal record as another server committed it: after
    /// its init (this server then comes up sealed, as after a restart), or a rekey's steps.
    pub(crate) fn adopt_record(&self) -> Result<(), SealError> {
        if !self.store.shared() {
            return Ok(());
        }
        let mut inner = self.lock();
        let Some(record) = read_record(self.store.as_ref())? else {
            return Ok(());
        };
        if !matches!(inner.state, State::Uninitialized) {
            if inner
                .record
                .as_ref()
                .is_some_and(|r| record::same(r, &record))
            {
                return Ok(());
            }
            // Nothing another server wrote is taken up unauthenticated while this one can
            // check it (logged in); sealed with the PIN in the shares, it is checked at the
            // unseal.
            let logged_in = inner.master_key.is_some();
            let authentic = if logged_in {
                let authentic = record::authenticate(&self.hsm, &record)?;
                if authentic == record::Authenticity::Authentic {
                    self.hsm.set_ownership(record.ownership()?);
                }
                authentic == record::Authenticity::Authentic
            } else {
                false
            };
            let rotated = inner.record.as_ref().is_some_and(|r| {
                (&r.master_key_label, &r.master_key_id)
                    != (&record.master_key_label, &record.master_key_id)
            });
            take_up(&mut inner, record);
            inner.authentic = authentic;
            if rotated && inner.master_key.is_some() {
                // Another server rotated the master key: this one's handle names the old,
                // destroyed key.
                let record = inner.record.as_ref().ok_or(SealError::NotInitialized)?;
                inner.master_key = Some(find_recorded_master_key(&self.hsm, record)?);
            }
            return Ok(());
        }
        let (state, master_key, authentic) = sealed_state(&self.hsm, &self.audit, Some(&record))?;
        tracing::info!("initialised by another server sharing the store: sealed");
        inner.state = state;
        inner.master_key = master_key;
        inner.record = Some(record);
        inner.authentic = authentic;
        Ok(())
    }

    /// Writes a backup of the whole store to `out` (see [`crate::backup::create`]).
    pub(crate) fn backup(
        &self,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, crate::backup::BackupError> {
        crate::backup::create(
            self.store.as_ref(),
            self.audit.signer(),
            crate::node::identity(),
            out,
        )
    }

    /// Follows the HSM's availability (see [`Hsm::watch_available`]).
    pub fn watch_hsm(&self) -> tokio::sync::watch::Receiver<bool> {
        self.hsm.watch_available()
    }

    /// Tries to recover an unavailable HSM now. Blocking.
    pub fn recover_hsm(&self) {
        self.hsm.try_recover();
    }

    /// Whether the audit key can sign now (a backup needs it).
    pub(crate) fn can_sign(&self) -> bool {
        self.audit.signer().public_key().is_some()
    }

    /// The shared store's change feed (once), for [`SealManager::follow`].
    pub(crate) fn changes(&self) -> Option<crate::store::ChangeFeed> {
        self.store.changes()
    }

    /// Forgets the current unseal attempt's shares.
    pub fn reset(&self) -> Result<SealStatus, SealError> {
        let mut inner = self.lock();
        match &mut inner.state {
            State::Uninitialized => Err(SealError::NotInitialized),
            State::Sealed(attempt) => {
                *attempt = None;
                Ok(status_of(&inner, self.hsm.pin_in_shares()))
            }
            State::Unsealed(_) => Ok(status_of(&inner, self.hsm.pin_in_shares())),
        }
    }

    /// Seals: forgets the root key, every derived key, and any unseal progress.
    pub fn seal(&self) -> Result<SealStatus, SealError> {
        let mut inner = self.lock();
        if matches!(inner.state, State::Uninitialized) {
            return Err(SealError::NotInitialized);
        }
        // Dropping the old state zeroizes the root key (Zeroizing) and the shares.
        let was_unsealed = matches!(inner.state, State::Unsealed(_));
        inner.state = State::Sealed(None);
        // Shares given to a rekey are forgotten too (the rekey itself, and a pending new
        // share set, stay: custodians give their shares again).
        if let Some(r) = &mut inner.rekey {
            r.given.clear();
        }
        inner.verifying = None;
        self.publish(None);
        self.unsealed.send_replace(false);
        if was_unsealed && self.hsm.pin_in_shares() {
            // Sealed means locked out of the HSM too: the PIN is gone with the shares.
            inner.master_key = None;
            self.audit.signer().set(None);
            self.hsm.logout()?;
        }
        Ok(status_of(&inner, self.hsm.pin_in_shares()))
    }
}

/// Takes up a seal record another server committed while this one is initialised (a rekey
/// made, committed or cancelled there): progress towards a share set that is no longer the
/// one in force is forgotten.
fn take_up(inner: &mut Inner, record: SealRecord) {
    let Some(old) = inner.record.as_ref() else {
        inner.record = Some(record);
        return;
    };
    if old.share_set_id != record.share_set_id {
        if let State::Sealed(attempt) = &mut inner.state {
            *attempt = None;
        }
        inner.rekey = None;
    }
    let pending_nonce = record.pending_rekey.as_ref().map(|p| p.nonce.as_str());
    if inner.verifying.as_ref().map(|v| v.nonce.as_str()) != pending_nonce {
        inner.verifying = None;
    }
    if record.pending_rekey.is_some() {
        // Another server made the new shares: its collecting attempt is over.
        inner.rekey = None;
    }
    inner.record = Some(record);
}

/// The stored seal record, checked, if the store has one.
fn read_record(store: &dyn Store) -> Result<Option<SealRecord>, SealError> {
    match store.get(crate::store::SYSTEM, SEAL_RECORD_KEY)? {
        None => Ok(None),
        Some(bytes) => {
            let r: SealRecord =
                serde_json::from_slice(&bytes).map_err(|_| SealError::CorruptRecord)?;
            if r.schema != SEAL_SCHEMA {
                return Err(SealError::CorruptRecord);
            }
            r.share_set()?;
            Ok(Some(r))
        }
    }
}

/// The state a server starts in with `record`: uninitialised, or sealed (with the record
/// authenticated and the master and audit keys found, unless the PIN comes with the
/// shares); and whether the record was authenticated.
fn sealed_state(
    hsm: &Hsm,
    audit: &AuditLog,
    record: Option<&SealRecord>,
) -> Result<(State, Option<KeyHandle>, bool), SealError> {
    Ok(match record {
        None => (State::Uninitialized, None, false),
        Some(r) if r.pin_in_shares != hsm.pin_in_shares() => {
            let (stored, configured) = if r.pin_in_shares {
                ("in the unseal shares", "names another PIN source")
            } else {
                ("from the configuration", "says pin_in_shares")
            };
            return Err(SealError::PinModeMismatch { stored, configured });
        }
        // Not logged in yet: the record is authenticated and the master key found at unseal.
        Some(_) if hsm.pin_in_shares() => (State::Sealed(None), None, false),
        Some(r) => {
            // Before anything the record names is looked for or acted on.
            let authentic = record::authenticate(hsm, r)? == record::Authenticity::Authentic;
            if authentic {
                hsm.set_ownership(r.ownership()?);
            }
            let key = find_recorded_master_key(hsm, r)?;
            check_master_key(hsm, key, &r.master_key_label)?;
            audit.signer().set(Some(find_audit_key(hsm, r)?));
            (State::Sealed(None), Some(key), authentic)
        }
    })
}

fn status_of(inner: &Inner, pin_in_shares: bool) -> SealStatus {
    let (initialized, sealed, progress, nonce) = match &inner.state {
        State::Uninitialized => (false, true, 0, None),
        State::Sealed(None) => (true, true, 0, None),
        State::Sealed(Some(a)) => (
            true,
            true,
            u8::try_from(a.shares.len()).unwrap_or(u8::MAX),
            Some(a.nonce.clone()),
        ),
        State::Unsealed(_) => (true, false, 0, None),
    };
    let record = inner.record.as_ref();
    SealStatus {
        initialized,
        sealed,
        threshold: record.map_or(0, |r| r.threshold),
        shares: record.map_or(0, |r| r.shares),
        progress,
        nonce,
        share_set_id: record.and_then(|r| r.share_set().ok()),
        pin_in_shares,
        rekey: rekey::status(inner),
        hsm_available: true,
        instance: record.and_then(|r| r.instance.clone()),
        restored_from: record
            .and_then(|r| r.restored_from.as_ref())
            .map(|p| p.instances.clone())
            .unwrap_or_default(),
    }
}

/// The audit signing key named in the seal record, and its public key.
fn find_audit_key(hsm: &Hsm, record: &SealRecord) -> Result<(KeyHandle, Vec<u8>), SealError> {
    let public = data_encoding::HEXLOWER
        .decode(record.audit_public_key.as_bytes())
        .map_err(|_| SealError::CorruptRecord)?;
    // Never a keyring key (any caller with a grant can sign with those).
    if record
        .audit_key_label
        .starts_with(crate::keyring::HSM_LABEL_PREFIX)
    {
        return Err(SealError::CorruptRecord);
    }
    let key = hsm
        .find_key(
            HsmKeyKind::Ed25519,
            crate::hsm::Provenance::Generated,
            &record.audit_key_label,
            None,
        )?
        .ok_or_else(|| SealError::AuditKeyMissing(record.audit_key_label.clone()))?;
    Ok((key, public))
}

/// The master key the seal record names: by its label and CKA_ID when the record has one
/// (made by init or a rotation since ids were recorded), else by the configured label.
fn find_recorded_master_key(hsm: &Hsm, record: &SealRecord) -> Result<KeyHandle, SealError> {
    let Some(id) = &record.master_key_id else {
        return Ok(hsm.find_master_key()?);
    };
    let id = data_encoding::HEXLOWER
        .decode(id.as_bytes())
        .map_err(|_| SealError::CorruptRecord)?;
    if record.master_key_label != hsm.master_key_label() {
        tracing::warn!(
            configured = hsm.master_key_label(),
            recorded = %record.master_key_label,
            "the configuration names another master key label than the seal record (a rotation adopted a key): using the record's"
        );
    }
    Ok(hsm.find_master_key_by(&record.master_key_label, Some(&id))?)
}

fn check_master_key(hsm: &Hsm, key: KeyHandle, label: &str) -> Result<(), SealError> {
    let problems = hsm.master_key_attributes(key)?.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SealError::UnsafeMasterKey {
            label: label.to_owned(),
            problems: problems.join(", "),
        })
    }
}
