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
//! The root key lives in memory only while unsealed, in a zeroizing buffer; sealing (or
//! dropping the manager) forgets it.

use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hmac::{Hmac, Mac};
use kms_unseal::{CombineError, Share, ShareError, ShareSetId, SplitError};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::audit::AuditLog;
use crate::hsm::{Hsm, HsmError, HsmKeyKind, KeyHandle};
use crate::keyring::{Keyring, KeyringError, Settings as KeyringSettings};
use crate::store::{Store, StoreError, Table, Write};

/// The store key of the seal record.
const SEAL_RECORD_KEY: &str = "seal";
/// The seal record's schema version.
const SEAL_SCHEMA: u32 = 1;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const KCV_LEN: usize = 16;
const KCV_LABEL: &[u8] = b"kms/v1/unseal-key-check";
/// The longest HSM PIN that can travel in the shares.
pub const MAX_SHARED_PIN_LEN: usize = 128;
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
    /// The same share (index) was given twice in one attempt.
    #[error("share {index} was already given in this unseal attempt")]
    DuplicateShare {
        /// The share's index.
        index: u8,
    },
    /// The request named another attempt's nonce.
    #[error(
        "the unseal attempt named by the nonce is not the one in progress (it was reset or completed)"
    )]
    AttemptMismatch,
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

/// The keyring root key. Zeroized on drop; no `Debug`, no `Clone`.
struct RootKey(Zeroizing<[u8; KEY_LEN]>);

/// What the server holds while unsealed: the keyring (which holds the root key and
/// every derived key). Dropping the last reference zeroizes every key byte.
struct Unsealed {
    keyring: Arc<Keyring>,
}

/// The persisted seal metadata. Everything here is public or wrapped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealRecord {
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
}

impl SealRecord {
    fn share_set(&self) -> Result<ShareSetId, SealError> {
        ShareSetId::from_hex(&self.share_set_id).ok_or(SealError::CorruptRecord)
    }
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
    /// The share set id.
    pub share_set_id: Option<ShareSetId>,
    /// Whether the HSM PIN travels in the shares (as configured; init then needs it).
    pub pin_in_shares: bool,
}

/// What makes init's seal record durable together with its audit record.
pub type InitCommit<'a> = dyn Fn(&InitOutput, Vec<Write>) -> Result<(), SealError> + 'a;

/// What `Init` returns: the shares, once.
pub struct InitOutput {
    /// The share set id.
    pub share_set_id: ShareSetId,
    /// The threshold.
    pub threshold: u8,
    /// Each custodian's share in text form. Secret.
    pub shares: Vec<Zeroizing<String>>,
    /// The audit checkpoint key's fingerprint ([`crate::audit::fingerprint`]).
    pub audit_key_fingerprint: String,
}

/// What init wraps and records, in one place. No `Debug`: it holds the keys.
#[derive(Clone, Copy)]
struct SealMaterial<'a> {
    master_key: KeyHandle,
    set: ShareSetId,
    unseal_key: &'a [u8; KEY_LEN],
    root_key: &'a [u8; KEY_LEN],
    pin_bytes: &'a [u8],
}

struct Attempt {
    nonce: String,
    shares: Vec<Share>,
}

enum State {
    Uninitialized,
    Sealed(Option<Attempt>),
    Unsealed(Unsealed),
}

struct Inner {
    state: State,
    record: Option<SealRecord>,
    master_key: Option<KeyHandle>,
}

/// The seal state machine. Methods block (HSM calls): call them from `spawn_blocking`.
pub struct SealManager {
    hsm: Arc<Hsm>,
    store: Arc<dyn Store>,
    audit: AuditLog,
    settings: KeyringSettings,
    inner: Mutex<Inner>,
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
        settings: KeyringSettings,
    ) -> Result<Self, SealError> {
        let record = match store.get(Table::System, SEAL_RECORD_KEY)? {
            None => None,
            Some(bytes) => {
                let r: SealRecord =
                    serde_json::from_slice(&bytes).map_err(|_| SealError::CorruptRecord)?;
                if r.schema != SEAL_SCHEMA {
                    return Err(SealError::CorruptRecord);
                }
                r.share_set()?;
                Some(r)
            }
        };
        let (state, master_key) = match &record {
            None => (State::Uninitialized, None),
            Some(r) if r.pin_in_shares != hsm.pin_in_shares() => {
                let (stored, configured) = if r.pin_in_shares {
                    ("in the unseal shares", "names another PIN source")
                } else {
                    ("from the configuration", "says pin_in_shares")
                };
                return Err(SealError::PinModeMismatch { stored, configured });
            }
            // Not logged in yet: the master key is found at unseal.
            Some(_) if hsm.pin_in_shares() => (State::Sealed(None), None),
            Some(r) => {
                let key = hsm.find_master_key()?;
                check_master_key(&hsm, key)?;
                audit.signer().set(Some(find_audit_key(&hsm, r)?));
                (State::Sealed(None), Some(key))
            }
        };
        Ok(Self {
            hsm,
            store,
            audit,
            settings,
            inner: Mutex::new(Inner {
                state,
                record,
                master_key,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written state (every transition
        // is one assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The audit checkpoint public key recorded at init (raw 32 bytes), once initialised.
    pub fn audit_public_key(&self) -> Option<Vec<u8>> {
        self.lock().record.as_ref().and_then(|r| {
            data_encoding::HEXLOWER
                .decode(r.audit_public_key.as_bytes())
                .ok()
        })
    }

    /// The current status.
    pub fn status(&self) -> SealStatus {
        status_of(&self.lock(), self.hsm.pin_in_shares())
    }

    /// The keyring, or [`SealError::Sealed`] / [`SealError::NotInitialized`]. The lock is
    /// held only to clone the reference: crypto calls run without it.
    pub fn keyring(&self) -> Result<Arc<Keyring>, SealError> {
        match &self.lock().state {
            State::Unsealed(u) => Ok(Arc::clone(&u.keyring)),
            State::Sealed(_) => Err(SealError::Sealed),
            State::Uninitialized => Err(SealError::NotInitialized),
        }
    }

    /// Initialises the server: see the module docs. Returns the shares; they are not
    /// stored anywhere. The server stays sealed. `hsm_pin` is required when the PIN
    /// travels in the shares, and refused otherwise.
    ///
    /// `commit` makes the seal record durable together with the request's audit record (see
    /// [`crate::audit`]); if it fails, init fails and nothing is stored.
    pub fn init(
        &self,
        shares: u32,
        threshold: u32,
        hsm_pin: Option<&SecretString>,
        commit: &InitCommit<'_>,
    ) -> Result<InitOutput, SealError> {
        let (n, t) = kms_unseal::check_parameters(shares, threshold)?;
        let pin = match (self.hsm.pin_in_shares(), hsm_pin) {
            (true, Some(p)) if (1..=MAX_SHARED_PIN_LEN).contains(&p.expose_secret().len()) => {
                Some(p)
            }
            (true, _) => return Err(SealError::PinRequired),
            (false, None) => None,
            (false, Some(_)) => return Err(SealError::PinNotExpected),
        };
        let mut inner = self.lock();
        if !matches!(inner.state, State::Uninitialized) {
            return Err(SealError::AlreadyInitialized);
        }
        if let Some(pin) = pin {
            self.hsm.login(pin).map_err(|e| match e {
                HsmError::Login { reason, .. } => SealError::InitPinRejected(reason),
                other => SealError::Hsm(other),
            })?;
        }
        let result = self.init_logged_in(&mut inner, n, t, pin, commit);
        if pin.is_some() {
            // The server stays sealed: with the PIN in the shares, sealed means logged out.
            let _ = self.hsm.logout();
            inner.master_key = None;
            self.audit.signer().set(None);
        }
        result
    }

    fn init_logged_in(
        &self,
        inner: &mut Inner,
        n: u8,
        t: u8,
        pin: Option<&SecretString>,
        commit: &InitCommit<'_>,
    ) -> Result<InitOutput, SealError> {
        let master_key = self.hsm.find_or_generate_master_key()?;
        check_master_key(&self.hsm, master_key)?;
        self.init_records(inner, master_key, n, t, pin, commit)
    }

    /// Makes the audit checkpoint key of the share set `set`, labelled with the set's id so
    /// that an init never touches another init's key (two servers may share a token).
    fn generate_audit_key(
        &self,
        set: ShareSetId,
    ) -> Result<(KeyHandle, Vec<u8>, String), SealError> {
        let label = format!("{}-audit-{set}", self.hsm.master_key_label());
        let (key, public) = self
            .hsm
            .generate_key(HsmKeyKind::Ed25519, &label, set.as_bytes())?;
        match public {
            Some(public) => Ok((key, public, label)),
            None => {
                let _ = self.hsm.destroy(key);
                Err(SealError::Hsm(HsmError::Misuse(
                    "the token returned no public key",
                )))
            }
        }
    }

    fn init_records(
        &self,
        inner: &mut Inner,
        master_key: KeyHandle,
        n: u8,
        t: u8,
        pin: Option<&SecretString>,
        commit: &InitCommit<'_>,
    ) -> Result<InitOutput, SealError> {
        let unseal_key = random_key()?;
        let root_key = random_key()?;
        let pin_bytes = pin
            .map(|p| p.expose_secret().as_bytes())
            .unwrap_or_default();
        let mut secret = Zeroizing::new(Vec::with_capacity(KEY_LEN + pin_bytes.len()));
        secret.extend_from_slice(unseal_key.as_slice());
        secret.extend_from_slice(pin_bytes);
        let (set, split) = kms_unseal::split(&secret, u32::from(n), u32::from(t))?;
        let (audit_key, audit_public, audit_key_label) = self.generate_audit_key(set)?;
        let sealed = SealMaterial {
            master_key,
            set,
            unseal_key: &unseal_key,
            root_key: &root_key,
            pin_bytes,
        };
        let result = self.store_init(
            inner,
            &sealed,
            n,
            t,
            &split,
            commit,
            &audit_key_label,
            &audit_public,
        );
        match &result {
            Ok(_) => self.audit.signer().set(Some((audit_key, audit_public))),
            Err(_) => {
                // This init's own key, by handle: nothing else is touched.
                let _ = self.hsm.destroy(audit_key);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn store_init(
        &self,
        inner: &mut Inner,
        m: &SealMaterial<'_>,
        n: u8,
        t: u8,
        split: &[Share],
        commit: &InitCommit<'_>,
        audit_key_label: &str,
        audit_public: &[u8],
    ) -> Result<InitOutput, SealError> {
        let SealMaterial {
            master_key,
            set,
            unseal_key,
            root_key,
            pin_bytes,
        } = *m;
        let mut inner_nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut inner_nonce).map_err(|_| SealError::Randomness)?;
        let inner_ct = software_wrap(
            unseal_key,
            &inner_nonce,
            &aad(INNER_AAD, set),
            root_key.as_slice(),
        )?;
        let mut inner_blob = Vec::with_capacity(NONCE_LEN + inner_ct.len());
        inner_blob.extend_from_slice(&inner_nonce);
        inner_blob.extend_from_slice(&inner_ct);
        let outer = self
            .hsm
            .encrypt(master_key, &aad(OUTER_AAD, set), &inner_blob)?;

        let record = SealRecord {
            schema: SEAL_SCHEMA,
            share_set_id: set.to_string(),
            shares: n,
            threshold: t,
            token_label: self.hsm.token_label().to_owned(),
            master_key_label: self.hsm.master_key_label().to_owned(),
            unseal_key_check: data_encoding::HEXLOWER
                .encode(&key_check(unseal_key, set, pin_bytes)?),
            wrapped_root_key: data_encoding::HEXLOWER.encode(&outer),
            pin_in_shares: !pin_bytes.is_empty(),
            audit_key_label: audit_key_label.to_owned(),
            audit_public_key: data_encoding::HEXLOWER.encode(audit_public),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            share_commitments: split
                .iter()
                .map(|s| data_encoding::HEXLOWER.encode(&s.commitment()))
                .collect(),
        };
        // Prove the round trip through the HSM before anything is stored, so a broken HSM
        // set-up fails init instead of leaving an unrecoverable store.
        let back = unwrap_root(&self.hsm, master_key, &record, unseal_key)?;
        if back.0.as_slice().ct_eq(root_key.as_slice()).unwrap_u8() != 1 {
            return Err(SealError::RootKeyUnwrap);
        }
        let bytes = serde_json::to_vec(&record).map_err(|_| SealError::CorruptRecord)?;
        // The state lock is held and the state is Uninitialized, and the seal record is
        // what makes it anything else: no other init can be writing it.
        if self.store.get(Table::System, SEAL_RECORD_KEY)?.is_some() {
            return Err(SealError::AlreadyInitialized);
        }
        let output = InitOutput {
            share_set_id: set,
            threshold: t,
            shares: split.iter().map(Share::to_text).collect(),
            audit_key_fingerprint: crate::audit::fingerprint(audit_public),
        };
        commit(
            &output,
            vec![Write {
                table: Table::System,
                key: SEAL_RECORD_KEY.to_owned(),
                value: bytes,
            }],
        )?;
        inner.record = Some(record);
        inner.master_key = Some(master_key);
        inner.state = State::Sealed(None);
        Ok(output)
    }

    /// Adds one share to the unseal attempt; unseals when the threshold is reached.
    /// `expected_nonce`, when given, must name the attempt in progress.
    pub fn unseal(
        &self,
        share_text: &str,
        expected_nonce: Option<&str>,
    ) -> Result<SealStatus, SealError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(record) = &inner.record else {
            return Err(SealError::NotInitialized);
        };
        let attempt = match &mut inner.state {
            State::Uninitialized => return Err(SealError::NotInitialized),
            State::Unsealed(_) => return Ok(status_of(inner, self.hsm.pin_in_shares())),
            State::Sealed(attempt) => attempt,
        };
        if let Some(want) = expected_nonce
            && attempt.as_ref().is_none_or(|a| a.nonce != want)
        {
            return Err(SealError::AttemptMismatch);
        }
        let share = Share::parse(share_text)?;
        let expected = record.share_set()?;
        if share.share_set() != expected {
            return Err(SealError::WrongShareSet {
                expected,
                got: share.share_set(),
            });
        }
        if share.threshold() != record.threshold {
            return Err(SealError::WrongThreshold {
                expected: record.threshold,
                got: share.threshold(),
            });
        }
        check_commitment(record, &share)?;
        if let Some(a) = attempt.as_ref()
            && a.shares.iter().any(|s| s.index() == share.index())
        {
            return Err(SealError::DuplicateShare {
                index: share.index(),
            });
        }
        let current = match attempt {
            Some(a) => a,
            None => attempt.insert(Attempt {
                nonce: random_nonce()?,
                shares: Vec::new(),
            }),
        };
        current.shares.push(share);
        if current.shares.len() < usize::from(record.threshold) {
            return Ok(status_of(inner, self.hsm.pin_in_shares()));
        }

        // The threshold is reached: whatever happens next, this attempt is over.
        let shares = std::mem::take(&mut current.shares);
        *attempt = None;
        let secret = kms_unseal::combine(&shares).map_err(|e| match e {
            CombineError::DuplicateIndex(index) => SealError::DuplicateShare { index },
            _ => SealError::WrongQuorum,
        })?;
        drop(shares);
        let (key_part, pin_part) = secret
            .split_at_checked(KEY_LEN)
            .ok_or(SealError::WrongQuorum)?;
        let unseal_key = to_key(key_part).ok_or(SealError::WrongQuorum)?;
        let stored_check = data_encoding::HEXLOWER
            .decode(record.unseal_key_check.as_bytes())
            .map_err(|_| SealError::CorruptRecord)?;
        let check = key_check(&unseal_key, expected, pin_part)?;
        if check.as_slice().ct_eq(&stored_check).unwrap_u8() != 1 {
            return Err(SealError::WrongQuorum);
        }
        let master_key = match inner.master_key {
            Some(k) => k,
            None => self.login_from_shares(pin_part)?,
        };
        let loaded = unwrap_root(&self.hsm, master_key, record, &unseal_key).and_then(|root| {
            if record.pin_in_shares {
                self.audit
                    .signer()
                    .set(Some(find_audit_key(&self.hsm, record)?));
            }
            Ok(Keyring::load(
                &root.0,
                Arc::clone(&self.hsm),
                Arc::clone(&self.store),
                self.audit.clone(),
                self.settings,
            )?)
        });
        let keyring = match loaded {
            Ok(k) => k,
            Err(e) => {
                if record.pin_in_shares {
                    let _ = self.hsm.logout();
                    inner.master_key = None;
                    self.audit.signer().set(None);
                }
                return Err(e);
            }
        };
        inner.master_key = Some(master_key);
        inner.state = State::Unsealed(Unsealed {
            keyring: Arc::new(keyring),
        });
        Ok(status_of(inner, self.hsm.pin_in_shares()))
    }

    /// Logs in with the PIN recombined from the shares and finds the master key; logs out
    /// again if anything fails.
    fn login_from_shares(&self, pin: &[u8]) -> Result<KeyHandle, SealError> {
        let pin = SecretString::from(std::str::from_utf8(pin).map_err(|_| SealError::WrongQuorum)?);
        self.hsm.login(&pin).map_err(|e| match e {
            HsmError::Login { reason, .. } => SealError::SharesPinRejected(reason),
            other => SealError::Hsm(other),
        })?;
        let found = self
            .hsm
            .find_master_key()
            .map_err(SealError::from)
            .and_then(|k| {
                check_master_key(&self.hsm, k)?;
                Ok(k)
            });
        if found.is_err() {
            let _ = self.hsm.logout();
        }
        found
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
        if was_unsealed && self.hsm.pin_in_shares() {
            // Sealed means locked out of the HSM too: the PIN is gone with the shares.
            inner.master_key = None;
            self.audit.signer().set(None);
            self.hsm.logout()?;
        }
        Ok(status_of(&inner, self.hsm.pin_in_shares()))
    }
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
    }
}

/// The audit signing key named in the seal record, and its public key.
fn find_audit_key(hsm: &Hsm, record: &SealRecord) -> Result<(KeyHandle, Vec<u8>), SealError> {
    let public = data_encoding::HEXLOWER
        .decode(record.audit_public_key.as_bytes())
        .map_err(|_| SealError::CorruptRecord)?;
    let key = hsm
        .find_key(HsmKeyKind::Ed25519, &record.audit_key_label, None)?
        .ok_or_else(|| SealError::AuditKeyMissing(record.audit_key_label.clone()))?;
    Ok((key, public))
}

/// Refuses a share whose commitment is not the one recorded at init for its index (a
/// share altered or forged with a valid checksum). Records from before commitments pass.
fn check_commitment(record: &SealRecord, share: &Share) -> Result<(), SealError> {
    if record.share_commitments.is_empty() {
        return Ok(());
    }
    let index = share.index();
    let stored = record
        .share_commitments
        .get(usize::from(index).saturating_sub(1))
        .and_then(|c| data_encoding::HEXLOWER.decode(c.as_bytes()).ok())
        .ok_or(SealError::UnknownShare { index })?;
    if share.commitment().ct_eq(stored.as_slice()).unwrap_u8() != 1 {
        return Err(SealError::UnknownShare { index });
    }
    Ok(())
}

fn check_master_key(hsm: &Hsm, key: KeyHandle) -> Result<(), SealError> {
    let problems = hsm.master_key_attributes(key)?.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SealError::UnsafeMasterKey {
            label: hsm.master_key_label().to_owned(),
            problems: problems.join(", "),
        })
    }
}

fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, SealError> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(k.as_mut_slice()).map_err(|_| SealError::Randomness)?;
    Ok(k)
}

/// Copies key bytes into a zeroizing array, without a stack copy left behind.
fn to_key(bytes: &[u8]) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    if bytes.len() != KEY_LEN {
        return None;
    }
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    k.copy_from_slice(bytes);
    Some(k)
}

fn random_nonce() -> Result<String, SealError> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|_| SealError::Randomness)?;
    Ok(data_encoding::HEXLOWER.encode(&n))
}

fn aad(label: &[u8], set: ShareSetId) -> Vec<u8> {
    let mut v = Vec::with_capacity(label.len() + 8);
    v.extend_from_slice(label);
    v.extend_from_slice(set.as_bytes());
    v
}

/// HMAC-SHA256(unseal key, label | share set id | PIN carried in the shares, if any),
/// truncated to 16 bytes. Keyed by the 256-bit unseal key, so it allows no guessing of the PIN.
fn key_check(
    unseal_key: &[u8; KEY_LEN],
    set: ShareSetId,
    pin: &[u8],
) -> Result<[u8; KCV_LEN], SealError> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(unseal_key)
        .map_err(|_| SealError::WrongQuorum)?;
    mac.update(KCV_LABEL);
    mac.update(set.as_bytes());
    mac.update(pin);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; KCV_LEN];
    out.copy_from_slice(full.get(..KCV_LEN).ok_or(SealError::WrongQuorum)?);
    Ok(out)
}

fn software_wrap(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    pt: &[u8],
) -> Result<Vec<u8>, SealError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::RootKeyUnwrap)?;
    cipher
        .encrypt(&(*nonce).into(), Payload { msg: pt, aad })
        .map_err(|_| SealError::RootKeyUnwrap)
}

fn unwrap_root(
    hsm: &Hsm,
    master_key: KeyHandle,
    record: &SealRecord,
    unseal_key: &[u8; KEY_LEN],
) -> Result<RootKey, SealError> {
    let set = record.share_set()?;
    let outer = data_encoding::HEXLOWER
        .decode(record.wrapped_root_key.as_bytes())
        .map_err(|_| SealError::CorruptRecord)?;
    let inner_blob = hsm
        .decrypt(master_key, &aad(OUTER_AAD, set), &outer)
        .map_err(|e| match e {
            HsmError::DecryptFailed => SealError::RootKeyUnwrap,
            other => SealError::Hsm(other),
        })?;
    if inner_blob.len() < NONCE_LEN {
        return Err(SealError::RootKeyUnwrap);
    }
    let (nonce, ct) = inner_blob.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::RootKeyUnwrap)?;
    let cipher = Aes256Gcm::new_from_slice(unseal_key).map_err(|_| SealError::RootKeyUnwrap)?;
    let pt = Zeroizing::new(
        cipher
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: ct,
                    aad: &aad(INNER_AAD, set),
                },
            )
            .map_err(|_| SealError::RootKeyUnwrap)?,
    );
    Ok(RootKey(to_key(&pt).ok_or(SealError::RootKeyUnwrap)?))
}
