//! The HSM: one PKCS#11 login per process, a pool of sessions, and the master key.
//!
//! The master key is an AES-256 token object, sensitive and never extractable, with every
//! usage attribute set explicitly (SoftHSM adds defaults otherwise): it encrypts and
//! decrypts with CKM_AES_GCM and nothing else. It never leaves the HSM; kms holds only its
//! object handle.
//!
//! Login is per application and lasts while a session is open, so the pool keeps its
//! sessions for the life of the process and never logs in per request (C_Login costs
//! milliseconds). `Session` is `Send` but not `Sync`: a session is taken out of the pool for
//! one call and put back.
//!
//! Calls block. The hot crypto calls on HSM keys run on the HSM's own threads
//! (`Hsm::run`, `threads.rs`: as many as the pool has sessions, fed by a bounded queue);
//! every other async caller (administration, the seal) uses `tokio::task::spawn_blocking`.
//!
//! Network HSMs restart, fail over and drop sessions; a SoftHSM token whose files go away
//! and come back invalidates every object handle. So a [`KeyHandle`] names an entry of a
//! registry that remembers how the object was found (class, label, CKA_ID), and when a call
//! fails in a way that means "the session or the handle is gone" (see `recover.rs`), the pool is
//! opened again, the application logs in again, every registered object is found again,
//! and the call is retried once. While the module keeps failing, recovery is tried at most
//! once a second, [`Hsm::watch_available`] says the HSM is unavailable, and the server
//! keeps serving what needs no HSM.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use kms_pkcs11_conf::token::{self, TokenError};
use kms_pkcs11_conf::{PinError, PinSource, ValidHsmConfig};
use secrecy::SecretString;
use zeroize::Zeroizing;

pub(crate) mod oaep;
mod objects;
mod owner;
mod recover;
mod threads;

pub use objects::{HsmKeyKind, MasterKeyAttributes, Provenance, RsaScheme, TokenObject};
pub use owner::{InstanceId, Ownership};
pub(crate) use threads::NoResult;

/// The AES-GCM IV length we use and enforce (SoftHSM does not check it).
pub(crate) const GCM_IV_LEN: usize = 12;
/// The AES-GCM tag length in bits.
const GCM_TAG_BITS: u64 = 128;

/// Why an HSM operation failed. Never carries a PIN or key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PIN could not be read from its source.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The module or token could not be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token refused the PIN.
    #[error("the HSM token {token:?} refused the PIN from {pin_source} ({reason})")]
    Login {
        /// The token label.
        token: String,
        /// Where the PIN came from.
        pin_source: PinSource,
        /// A short reason.
        reason: &'static str,
        /// The PKCS#11 error.
        #[source]
        source: cryptoki::error::Error,
    },
    /// The master key is not in the token.
    #[error(
        "no master key labelled {label:?} in the HSM token (was the token replaced or the key deleted?)"
    )]
    MasterKeyMissing {
        /// The object's CKA_LABEL.
        label: String,
    },
    /// Several keys carry the master key's label.
    #[error(
        "{count} objects in the HSM token are labelled {label:?}: the master key label must be unique"
    )]
    MasterKeyAmbiguous {
        /// The object's CKA_LABEL.
        label: String,
        /// How many.
        count: usize,
    },
    /// A PKCS#11 call failed.
    #[error("HSM call failed while trying to {op}")]
    Pkcs11 {
        /// What we were doing.
        op: &'static str,
        /// The call and its return code.
        #[source]
        source: cryptoki::error::Error,
    },
    /// An authenticated decryption in the HSM failed: the data or its associated data were
    /// altered, or another key made them.
    #[error("the HSM could not decrypt the data: it was altered or made under another key")]
    DecryptFailed,
    /// Imported key material is not what the key's algorithm needs.
    #[error("{0}")]
    ImportRefused(&'static str),
    /// The module does not offer what this needs.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Several token objects answer to one key's label and id: kms will not guess which.
    #[error(
        "{count} objects in the HSM token answer to the key object {label:?}: refusing to pick one"
    )]
    KeyAmbiguous {
        /// The object's CKA_LABEL.
        label: String,
        /// How many.
        count: usize,
    },
    /// The object found is not the key kms made: another class or type, or not sensitive
    /// and non-extractable.
    #[error("the HSM object {label:?} is not the key kms made ({why})")]
    UnexpectedObject {
        /// The object's CKA_LABEL.
        label: String,
        /// What differs.
        why: &'static str,
    },
    /// A destroy of this object failed earlier in this process, and some modules (SoftHSM)
    /// then hide the object from the process although it is still in the token: its
    /// destruction cannot be confirmed before a restart.
    #[error(
        "the HSM token failed to destroy {label:?} earlier; it cannot be confirmed gone before the server restarts"
    )]
    DestroyUnconfirmed {
        /// The object's CKA_LABEL.
        label: String,
    },
    /// The HSM failed and could not be recovered yet (tried again at most once a second).
    #[error("the HSM is unavailable (recovery is tried every second)")]
    Unavailable,
    /// The HSM came back, but the server keeps its PIN in the unseal shares: it cannot log
    /// in again by itself.
    #[error(
        "the HSM came back, but this server keeps its HSM PIN in the unseal shares and cannot log in again by itself: seal and unseal it"
    )]
    NeedsUnseal,
    /// The object was not made by this kms instance (another instance sharing the token,
    /// such as a copy restored from a backup, made it; or it was made outside kms): kms
    /// destroys only what it made.
    #[error(
        "the HSM object {label:?} was not made by this kms instance ({maker}): kms destroys only its own objects (see `kms operator take-over`)"
    )]
    NotOurs {
        /// The object's CKA_LABEL.
        label: String,
        /// Who made it, as its CKA_ID says.
        maker: String,
    },
    /// Bad arguments from our own code (a bug, not caller input).
    #[error("invalid HSM request: {0}")]
    Misuse(&'static str),
}

fn pk(op: &'static str) -> impl FnOnce(cryptoki::error::Error) -> HsmError {
    move |source| HsmError::Pkcs11 { op, source }
}

/// A logged-in HSM token and its session pool.
pub struct Hsm {
    /// The module, to open sessions again after a failure (`None` only while a recovery
    /// loads it again).
    pkcs11: Mutex<Option<cryptoki::context::Pkcs11>>,
    /// The module's path, to load it again.
    module: std::path::PathBuf,
    // Each session holds its own handle to the PKCS#11 context.
    pool: Mutex<recover::Pool>,
    available: Condvar,
    /// How many sessions the pool holds.
    sessions: usize,
    /// How each object kms uses was found, to find it again (a [`KeyHandle`] indexes it).
    objects: Mutex<Vec<recover::Registered>>,
    /// When recovery last failed (recovery is tried at most once a second).
    recovery: Mutex<Option<std::time::Instant>>,
    /// Whether the module answers (false from a session or handle failure until a
    /// recovery succeeds).
    up: tokio::sync::watch::Sender<bool>,
    /// Whether the application should be logged in (a recovery logs in again).
    logged_in: std::sync::atomic::AtomicBool,
    /// Objects (label, id) whose destroy failed in this process: see
    /// [`HsmError::DestroyUnconfirmed`].
    unconfirmed: Mutex<HashSet<(String, Option<Vec<u8>>)>>,
    /// Whether the module refused CKM_RSA_PKCS_OAEP with SHA-256, so that kms removes the
    /// padding itself (see [`Hsm::rsa_oaep_decrypt`]).
    oaep_in_kms: std::sync::atomic::AtomicBool,
    /// What this instance may destroy, and the identity its new objects carry.
    owner: std::sync::RwLock<Ownership>,
    slot: Mutex<Slot>,
    token_label: String,
    master_key_label: String,
    pin_source: PinSource,
    /// The threads the hot crypto calls run on (`Hsm::run`), as many as `sessions`.
    threads: threads::Threads,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token_label", &self.token_label)
            .field(
                "slot",
                &self.slot.lock().map(|s| s.id()).unwrap_or_default(),
            )
            .finish_non_exhaustive()
    }
}

/// A key object inside the token (the master key, or a keyring key): an entry of the
/// HSM's registry, which holds its current object handle and how to find it again. Valid
/// while this process runs; never stored (objects are found again by label and id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHandle(usize);

impl Hsm {
    /// Loads the module, finds the token by label, opens `config.sessions` sessions, and,
    /// unless the PIN travels in the unseal shares, reads the PIN and logs in (once).
    pub fn open(config: &ValidHsmConfig) -> Result<Self, HsmError> {
        Self::open_with_context(token::load(&config.module)?, config)
    }

    /// As [`Hsm::open`], on a PKCS#11 context the caller already loaded and initialised
    /// (a process may initialise a module only once).
    pub fn open_with_context(
        pkcs11: cryptoki::context::Pkcs11,
        config: &ValidHsmConfig,
    ) -> Result<Self, HsmError> {
        let slot = token::find_token(&pkcs11, &config.token_label)?;
        let mut sessions = Vec::with_capacity(config.sessions);
        for _ in 0..config.sessions {
            sessions.push(pkcs11.open_rw_session(slot).map_err(pk("open a session"))?);
        }
        crate::metrics::metrics()
            .hsm_sessions
            .set(i64::try_from(sessions.len()).unwrap_or(i64::MAX));
        let hsm = Self {
            pkcs11: Mutex::new(Some(pkcs11)),
            module: config.module.clone(),
            pool: Mutex::new(recover::Pool {
                generation: 0,
                sessions,
                out: 0,
                waiting: 0,
            }),
            available: Condvar::new(),
            sessions: config.sessions,
            objects: Mutex::new(Vec::new()),
            recovery: Mutex::new(None),
            up: tokio::sync::watch::Sender::new(true),
            logged_in: std::sync::atomic::AtomicBool::new(false),
            unconfirmed: Mutex::new(HashSet::new()),
            oaep_in_kms: std::sync::atomic::AtomicBool::new(false),
            owner: std::sync::RwLock::new(Ownership::default()),
            slot: Mutex::new(slot),
            token_label: config.token_label.clone(),
            master_key_label: config.master_key_label.clone(),
            pin_source: config.pin.clone(),
            threads: threads::Threads::new(config.sessions, threads::QUEUE_CAPACITY),
        };
        if config.pin != PinSource::Shares {
            let pin = config.pin.read()?;
            hsm.login(&pin)?;
        }
        Ok(hsm)
    }

    /// Whether the PIN travels in the unseal shares (login happens at unseal).
    pub fn pin_in_shares(&self) -> bool {
        self.pin_source == PinSource::Shares
    }

    /// Logs the application in. Login is per application: every pooled session shares it
    /// while any session stays open.
    pub fn login(&self, pin: &SecretString) -> Result<(), HsmError> {
        self.with_session("login", |s| self.login_on(s, pin))?;
        self.logged_in
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn login_on(&self, s: &Session, pin: &SecretString) -> Result<(), HsmError> {
        match s.login(UserType::User, Some(pin)) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(source) => {
                let reason = match &source {
                    cryptoki::error::Error::Pkcs11(RvError::PinIncorrect, _) => "wrong PIN",
                    cryptoki::error::Error::Pkcs11(RvError::PinLocked, _) => "PIN locked",
                    cryptoki::error::Error::Pkcs11(RvError::PinExpired, _) => "PIN expired",
                    cryptoki::error::Error::Pkcs11(RvError::PinLenRange, _) => {
                        "PIN length out of range"
                    }
                    cryptoki::error::Error::Pkcs11(RvError::UserPinNotInitialized, _) => {
                        "user PIN not initialised"
                    }
                    _ => "login failed",
                };
                Err(HsmError::Login {
                    token: self.token_label.clone(),
                    pin_source: self.pin_source.clone(),
                    reason,
                    source,
                })
            }
        }
    }

    /// Logs the application out (every session). Already logged out is fine.
    pub(crate) fn logout(&self) -> Result<(), HsmError> {
        self.logged_in
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.with_session("logout", |s| match s.logout() {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
            Err(e) => Err(pk("log out")(e)),
        })
    }

    /// Whether the application is logged in (with the PIN in the shares: only while
    /// unsealed, or during a ceremony that brought a quorum).
    pub(crate) fn is_logged_in(&self) -> bool {
        self.logged_in.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// The master key's label.
    pub fn master_key_label(&self) -> &str {
        &self.master_key_label
    }

    /// Runs `job` on one of the HSM's threads (started at the first job, as many as the
    /// pool has sessions) and awaits its result, without holding an async worker: a full
    /// queue makes the caller await room. Once queued, the job runs whether or not its
    /// caller still waits. For the hot crypto calls on HSM keys: one hand-off each way
    /// instead of a `spawn_blocking` thread per call, and a thread that finds work queued
    /// runs it without sleeping in between. [`NoResult`] when the job panicked.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NoResult> {
        self.threads.run(job).await
    }

    /// Runs `f` with a session from the pool, waiting for one if all are busy. `operation`
    /// names it in the metrics (its time, and whether the module failed it). If the session
    /// or an object handle turns out to be gone ([`recover::is_stale`]), the HSM is
    /// recovered and `f` runs once more, with handles found again.
    fn with_session<T>(
        &self,
        operation: &'static str,
        mut f: impl FnMut(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let (generation, result) = self.once(operation, &mut f)?;
        match result {
            Err(e) if recover::is_stale(&e) => {
                self.mark_unavailable();
                self.recover(generation)?;
                let (_, again) = self.once(operation, &mut f)?;
                if again.as_ref().is_err_and(recover::is_stale) {
                    self.mark_unavailable();
                }
                again
            }
            other => other,
        }
    }

    /// One run of `f` on a pooled session: the session's generation and `f`'s result.
    fn once<T>(
        &self,
        operation: &'static str,
        f: &mut impl FnMut(&Session) -> Result<T, HsmError>,
    ) -> Result<(u64, Result<T, HsmError>), HsmError> {
        let (generation, session) = {
            let mut pool = self
                .pool
                .lock()
                .map_err(|_| HsmError::Misuse("session pool poisoned"))?;
            loop {
                let generation = pool.generation;
                if let Some(s) = pool.sessions.pop() {
                    pool.out += 1;
                    break (generation, s);
                }
                // A recovery emptied the pool: no waiting on an HSM that is not there.
                if !self.is_available() {
                    return Err(HsmError::Unavailable);
                }
                pool.waiting += 1;
                pool = self
                    .available
                    .wait_timeout(pool, std::time::Duration::from_millis(100))
                    .map_err(|_| HsmError::Misuse("session pool poisoned"))?
                    .0;
                pool.waiting -= 1;
            }
        };
        let metrics = crate::metrics::metrics();
        metrics.hsm_sessions_in_use.inc();
        let started = std::time::Instant::now();
        let result = f(&session);
        let failed = matches!(result, Err(HsmError::Pkcs11 { .. }));
        metrics.hsm(operation, started.elapsed(), failed);
        metrics.hsm_sessions_in_use.dec();
        if let Ok(mut pool) = self.pool.lock() {
            pool.out = pool.out.saturating_sub(1);
            // A session of an earlier generation closes as it drops: a recovery replaced it.
            if pool.generation == generation {
                pool.sessions.push(session);
            } else {
                drop(session);
            }
            // Waking no one is a system call too: the HSM threads, one per session, return
            // sessions thousands of times a second with no one waiting.
            if pool.waiting > 0 {
                self.available.notify_all();
            }
        }
        Ok((generation, result))
    }

    /// Finds the master key by the configured label.
    pub(crate) fn find_master_key(&self) -> Result<KeyHandle, HsmError> {
        self.find_master_key_by(&self.master_key_label, None)
    }

    /// Finds a master key by label and, when given, CKA_ID (a rotation leaves two keys
    /// with one label for a moment: the id tells them apart). Exactly one must answer.
    pub(crate) fn find_master_key_by(
        &self,
        label: &str,
        id: Option<&[u8]>,
    ) -> Result<KeyHandle, HsmError> {
        let lookup = recover::Lookup::new(ObjectClass::SECRET_KEY, Some(KeyType::AES), label, id);
        let label = label.to_owned();
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.clone().into_bytes()),
        ];
        if let Some(id) = id {
            template.push(Attribute::Id(id.to_vec()));
        }
        self.with_session("find", |s| {
            let found = s
                .find_objects(&template)
                .map_err(pk("find the master key"))?;
            match found.as_slice() {
                [one] => Ok(self.register(*one, lookup.clone())),
                [] => Err(HsmError::MasterKeyMissing {
                    label: label.clone(),
                }),
                many => Err(HsmError::MasterKeyAmbiguous {
                    label: label.clone(),
                    count: many.len(),
                }),
            }
        })
    }

    /// Finds the master key, or generates it inside the token if there is none.
    /// The token's master key, or a new one; and whether it was already there.
    pub(crate) fn find_or_generate_master_key(&self) -> Result<(KeyHandle, bool), HsmError> {
        match self.find_master_key() {
            Err(HsmError::MasterKeyMissing { .. }) => Ok((self.generate_master_key()?, false)),
            other => Ok((other?, true)),
        }
    }

    /// The master key is an AES-256 token key like the keyring's HSM AES keys: sensitive,
    /// never extractable, encrypt/decrypt only, every usage flag explicit.
    fn generate_master_key(&self) -> Result<KeyHandle, HsmError> {
        let label = self.master_key_label.clone();
        self.generate_master_key_labelled(&label)
    }

    /// A new master key labelled `label`, with a fresh CKA_ID of this instance.
    pub(crate) fn generate_master_key_labelled(&self, label: &str) -> Result<KeyHandle, HsmError> {
        let id = self.new_object_id()?;
        self.generate_key(HsmKeyKind::Aes256, label, &id)
            .map(|(key, _)| key)
    }

    /// A key object's CKA_ID (empty when it has none).
    pub(crate) fn key_id(&self, key: KeyHandle) -> Result<Vec<u8>, HsmError> {
        self.with_session("attributes", |s| {
            let attrs = s
                .get_attributes(self.handle(key)?, &[AttributeType::Id])
                .map_err(pk("read a key's id"))?;
            Ok(attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Id(id) => Some(id),
                    _ => None,
                })
                .unwrap_or_default())
        })
    }

    /// Encrypts `plaintext` with AES-256-GCM under an AES key of the token, inside the HSM,
    /// with a fresh random 96-bit IV. Returns `iv | ciphertext | tag`.
    pub fn encrypt(
        &self,
        key: KeyHandle,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let mut iv = [0u8; GCM_IV_LEN];
        getrandom::fill(&mut iv)
            .map_err(|_| HsmError::Misuse("operating system random source failed"))?;
        // The module may write the IV it used back into the buffer (a token that makes its
        // own IVs): what it wrote is what goes out with the ciphertext.
        let ct = self.with_session("encrypt", |s| {
            let params =
                GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(pk("set up AES-GCM"))?;
            s.encrypt(&Mechanism::AesGcm(params), self.handle(key)?, plaintext)
                .map_err(pk("encrypt with the master key"))
        })?;
        let mut out = Vec::with_capacity(GCM_IV_LEN + ct.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts `iv | ciphertext | tag` made by [`Hsm::encrypt`]. A wrong key, wrong `aad`
    /// or altered data give [`HsmError::DecryptFailed`].
    pub fn decrypt(
        &self,
        key: KeyHandle,
        aad: &[u8],
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if blob.len() < GCM_IV_LEN + 16 {
            return Err(HsmError::DecryptFailed);
        }
        let (iv, ct) = blob.split_at(GCM_IV_LEN);
        let iv: [u8; GCM_IV_LEN] = iv.try_into().map_err(|_| HsmError::DecryptFailed)?;
        self.with_session("decrypt", |s| {
            let mut iv = iv;
            let params =
                GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(pk("set up AES-GCM"))?;
            match s.decrypt(&Mechanism::AesGcm(params), self.handle(key)?, ct) {
                Ok(pt) => Ok(Zeroizing::new(pt)),
                // SoftHSM reports a failed tag check as CKR_GENERAL_ERROR; the standard says
                // CKR_ENCRYPTED_DATA_INVALID. Both mean the same to us.
                Err(cryptoki::error::Error::Pkcs11(
                    RvError::EncryptedDataInvalid
                    | RvError::GeneralError
                    | RvError::EncryptedDataLenRange,
                    _,
                )) => Err(HsmError::DecryptFailed),
                Err(e) => Err(pk("decrypt with the master key")(e)),
            }
        })
    }

    /// Encrypts with a caller-made 96-bit IV (the keyring's ciphertext format carries it).
    /// Returns `ciphertext | tag`.
    pub(crate) fn encrypt_with_iv(
        &self,
        key: KeyHandle,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.with_session("encrypt", |s| {
            let mut used = *iv;
            let params = GcmParams::new(&mut used, aad, GCM_TAG_BITS.into())
                .map_err(pk("set up AES-GCM"))?;
            let ct = s
                .encrypt(&Mechanism::AesGcm(params), self.handle(key)?, plaintext)
                .map_err(pk("encrypt"))?;
            iv_kept(iv, &used)?;
            Ok(ct)
        })
    }

    /// Signs (or MACs) `data` inside the HSM. For ECDSA `data` is the SHA-256 digest and the
    /// result is raw `r | s`; for Ed25519 it is the message; for HMAC the message; for RSA
    /// (PSS or PKCS#1 v1.5) the SHA-256 digest.
    pub fn sign(&self, kind: HsmKeyKind, key: KeyHandle, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        let digest_info;
        let (mechanism, data) = match kind {
            HsmKeyKind::Ed25519 => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                data,
            ),
            HsmKeyKind::EcdsaP256 | HsmKeyKind::EcdsaP384 => (Mechanism::Ecdsa, data),
            HsmKeyKind::HmacSha256 => (Mechanism::Sha256Hmac, data),
            HsmKeyKind::Rsa(RsaScheme::Pss, _) => (
                Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32u64.into(),
                }),
                data,
            ),
            HsmKeyKind::Rsa(RsaScheme::Pkcs1, _) => {
                // CKM_RSA_PKCS signs what it is given: the DigestInfo of the SHA-256 digest.
                digest_info = [SHA256_DIGEST_INFO, data].concat();
                (Mechanism::RsaPkcs, digest_info.as_slice())
            }
            HsmKeyKind::Aes256 | HsmKeyKind::Rsa(RsaScheme::Oaep, _) => {
                return Err(HsmError::Misuse("this key does not sign"));
            }
        };
        self.with_session("sign", |s| {
            s.sign(&mechanism, self.handle(key)?, data)
                .map_err(pk("sign"))
        })
    }

    /// Decrypts an RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label) ciphertext with an RSA
    /// key of `bits` inside the HSM. Any failure of the decryption itself is
    /// [`HsmError::DecryptFailed`], whatever the reason.
    ///
    /// The module does the OAEP decoding when it offers CKM_RSA_PKCS_OAEP with SHA-256
    /// (kryoptic does); a module that refuses those parameters (SoftHSM 2.6 takes only
    /// SHA-1) decrypts with CKM_RSA_X_509 and kms removes the padding in constant time
    /// (`oaep::decode`). The choice is made at the first decryption and kept.
    pub fn rsa_oaep_decrypt(
        &self,
        key: KeyHandle,
        bits: usize,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let k = bits / 8;
        if ciphertext.len() != k {
            return Err(HsmError::DecryptFailed);
        }
        // What modules answer for a ciphertext that does not decrypt: the standard's
        // CKR_ENCRYPTED_DATA_*, SoftHSM's CKR_GENERAL_ERROR, kryoptic's CKR_DEVICE_ERROR
        // (OpenSSL's failure passed on), CKR_FUNCTION_FAILED elsewhere. All one failure.
        let failed = |e: cryptoki::error::Error, what: &'static str| match e {
            cryptoki::error::Error::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError
                | RvError::DeviceError
                | RvError::FunctionFailed
                | RvError::DataInvalid
                | RvError::DataLenRange,
                _,
            ) => HsmError::DecryptFailed,
            e => pk(what)(e),
        };
        use std::sync::atomic::Ordering::Relaxed;
        if !self.oaep_in_kms.load(Relaxed) {
            let native = self.with_session("decrypt", |s| {
                let params = PkcsOaepParams::new(
                    MechanismType::SHA256,
                    PkcsMgfType::MGF1_SHA256,
                    PkcsOaepSource::empty(),
                );
                match s.decrypt(
                    &Mechanism::RsaPkcsOaep(params),
                    self.handle(key)?,
                    ciphertext,
                ) {
                    Ok(pt) => Ok(Some(Zeroizing::new(pt))),
                    // The mechanism or its parameters refused before any data was read:
                    // a fact about the module, not about this ciphertext.
                    Err(cryptoki::error::Error::Pkcs11(
                        RvError::ArgumentsBad
                        | RvError::MechanismParamInvalid
                        | RvError::MechanismInvalid,
                        _,
                    )) => Ok(None),
                    Err(e) => Err(failed(e, "decrypt with RSA-OAEP")),
                }
            })?;
            match native {
                Some(pt) => return Ok(pt),
                None => {
                    self.oaep_in_kms.store(true, Relaxed);
                    tracing::info!(
                        "the HSM module refuses RSA-OAEP with SHA-256: kms removes the OAEP padding after a raw RSA decryption in the token"
                    );
                }
            }
        }
        let em = self.with_session("decrypt", |s| {
            s.decrypt(&Mechanism::RsaX509, self.handle(key)?, ciphertext)
                .map(Zeroizing::new)
                .map_err(|e| failed(e, "decrypt with raw RSA"))
        })?;
        oaep::decode(&em, k).ok_or(HsmError::DecryptFailed)
    }
}

/// Refuses a ciphertext the module made under another IV than the one kms gave it: the
/// keyring's format carries kms's IV (and its nonce accounting counts kms's IVs), so a
/// module that writes its own IV back (PKCS#11 allows it) would make ciphertexts that never
/// decrypt. Such a module is refused for HSM AES keys; the ciphertext is thrown away.
fn iv_kept(given: &[u8; GCM_IV_LEN], used: &[u8; GCM_IV_LEN]) -> Result<(), HsmError> {
    if given == used {
        Ok(())
    } else {
        Err(HsmError::Unsupported(
            "the HSM module replaced the AES-GCM IV kms gave it (it makes its own IVs): kms cannot use this module for HSM AES-GCM keys",
        ))
    }
}

/// DER of `DigestInfo { sha256, NULL }` before the 32 digest bytes (RFC 8017, 9.2 note 1).
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_that_writes_its_own_iv_back_is_refused() {
        let given = [7u8; GCM_IV_LEN];
        assert!(iv_kept(&given, &given).is_ok());
        let mut replaced = given;
        replaced[GCM_IV_LEN - 1] ^= 1;
        assert!(matches!(
            iv_kept(&given, &replaced),
            Err(HsmError::Unsupported(why)) if why.contains("replaced the AES-GCM IV")
        ));
    }
}
