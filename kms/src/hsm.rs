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
//! Calls block: async callers run them on `tokio::task::spawn_blocking`.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use kms_pkcs11_conf::token::{self, TokenError};
use kms_pkcs11_conf::{PinError, PinSource, ValidHsmConfig};
use secrecy::SecretString;
use zeroize::Zeroizing;

/// The AES-GCM IV length we use and enforce (SoftHSM does not check it).
pub const GCM_IV_LEN: usize = 12;
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
        /// The label.
        label: String,
    },
    /// Several keys carry the master key's label.
    #[error(
        "{count} objects in the HSM token are labelled {label:?}: the master key label must be unique"
    )]
    MasterKeyAmbiguous {
        /// The label.
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
    /// Several token objects answer to one key's label and id: kms will not guess which.
    #[error(
        "{count} objects in the HSM token answer to the key object {label:?}: refusing to pick one"
    )]
    KeyAmbiguous {
        /// The label.
        label: String,
        /// How many.
        count: usize,
    },
    /// The object found is not the key kms made: another class or type, or not sensitive
    /// and non-extractable.
    #[error("the HSM object {label:?} is not the key kms made ({why})")]
    UnexpectedObject {
        /// The label.
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
        /// The label.
        label: String,
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
    // Each session holds its own handle to the PKCS#11 context.
    pool: Mutex<Vec<Session>>,
    available: Condvar,
    /// Objects (label, id) whose destroy failed in this process: see
    /// [`HsmError::DestroyUnconfirmed`].
    unconfirmed: Mutex<HashSet<(String, Option<Vec<u8>>)>>,
    slot: Slot,
    token_label: String,
    master_key_label: String,
    pin_source: PinSource,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token_label", &self.token_label)
            .field("slot", &self.slot.id())
            .finish_non_exhaustive()
    }
}

/// A handle to a key object inside the token (the master key, or a keyring key). Valid
/// while this process is logged in; never stored (objects are found again by label).
#[derive(Debug, Clone, Copy)]
pub struct KeyHandle(ObjectHandle);

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
        let hsm = Self {
            pool: Mutex::new(sessions),
            available: Condvar::new(),
            unconfirmed: Mutex::new(HashSet::new()),
            slot,
            token_label: config.token_label.clone(),
            master_key_label: config.master_key_label.clone(),
            pin_source: config.pin.clone(),
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
        self.with_session(|s| match s.login(UserType::User, Some(pin)) {
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
        })
    }

    /// Logs the application out (every session). Already logged out is fine.
    pub fn logout(&self) -> Result<(), HsmError> {
        self.with_session(|s| match s.logout() {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
            Err(e) => Err(pk("log out")(e)),
        })
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// The master key's label.
    pub fn master_key_label(&self) -> &str {
        &self.master_key_label
    }

    /// Runs `f` with a session from the pool, waiting for one if all are busy.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let session = {
            let mut pool = self
                .pool
                .lock()
                .map_err(|_| HsmError::Misuse("session pool poisoned"))?;
            loop {
                if let Some(s) = pool.pop() {
                    break s;
                }
                pool = self
                    .available
                    .wait(pool)
                    .map_err(|_| HsmError::Misuse("session pool poisoned"))?;
            }
        };
        let result = f(&session);
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(session);
            self.available.notify_one();
        }
        result
    }

    /// Finds the master key by label.
    pub fn find_master_key(&self) -> Result<KeyHandle, HsmError> {
        let label = self.master_key_label.clone();
        self.with_session(|s| {
            let found = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label.clone().into_bytes()),
                ])
                .map_err(pk("find the master key"))?;
            match found.as_slice() {
                [one] => Ok(KeyHandle(*one)),
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
    pub fn find_or_generate_master_key(&self) -> Result<KeyHandle, HsmError> {
        match self.find_master_key() {
            Err(HsmError::MasterKeyMissing { .. }) => self.generate_master_key(),
            other => other,
        }
    }

    /// The master key is an AES-256 token key like the keyring's HSM AES keys: sensitive,
    /// never extractable, encrypt/decrypt only, every usage flag explicit.
    fn generate_master_key(&self) -> Result<KeyHandle, HsmError> {
        let label = self.master_key_label.clone();
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)
            .map_err(|_| HsmError::Misuse("operating system random source failed"))?;
        self.generate_key(HsmKeyKind::Aes256, &label, &id)
            .map(|(key, _)| key)
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
        let ct = self.with_session(|s| {
            let params =
                GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(pk("set up AES-GCM"))?;
            s.encrypt(&Mechanism::AesGcm(params), key.0, plaintext)
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
        let mut iv: [u8; GCM_IV_LEN] = iv.try_into().map_err(|_| HsmError::DecryptFailed)?;
        self.with_session(|s| {
            let params =
                GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(pk("set up AES-GCM"))?;
            match s.decrypt(&Mechanism::AesGcm(params), key.0, ct) {
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
    pub fn encrypt_with_iv(
        &self,
        key: KeyHandle,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let mut iv = *iv;
        self.with_session(|s| {
            let params =
                GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(pk("set up AES-GCM"))?;
            s.encrypt(&Mechanism::AesGcm(params), key.0, plaintext)
                .map_err(pk("encrypt"))
        })
    }

    /// Generates a keyring key inside the token, labelled `label`: a token object,
    /// private, sensitive, never extractable, with only the usages `kind` needs.
    /// Returns the private (or secret) key and, for key pairs, the public key's bytes
    /// (Ed25519: 32 bytes; P-256: the 65-byte uncompressed SEC1 point).
    pub fn generate_key(
        &self,
        kind: HsmKeyKind,
        label: &str,
        id: &[u8],
    ) -> Result<(KeyHandle, Option<Vec<u8>>), HsmError> {
        let label = label.as_bytes().to_vec();
        // Attributes every keyring key has: a private token object that never leaves, with
        // a random CKA_ID that tells it apart from any other object with its label (one
        // left by a crash before its version was committed, say).
        let base = || {
            vec![
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.clone()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Derive(false),
            ]
        };
        // Secret keys: every usage flag explicit (SoftHSM adds defaults otherwise).
        let common = |sign: bool, encrypt: bool| {
            let mut t = base();
            t.extend([
                Attribute::Encrypt(encrypt),
                Attribute::Decrypt(encrypt),
                Attribute::Sign(sign),
                Attribute::Verify(sign),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
            ]);
            t
        };
        self.with_session(|s| match kind {
            HsmKeyKind::Aes256 | HsmKeyKind::HmacSha256 => {
                // 256-bit secret keys: AES encrypts/decrypts, the HMAC key signs/verifies.
                let (mechanism, key_type, mac) = match kind {
                    HsmKeyKind::Aes256 => (Mechanism::AesKeyGen, KeyType::AES, false),
                    _ => (
                        Mechanism::GenericSecretKeyGen,
                        KeyType::GENERIC_SECRET,
                        true,
                    ),
                };
                let mut t = common(mac, !mac);
                t.extend([
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(key_type),
                    Attribute::ValueLen(32u64.into()),
                ]);
                let h = s
                    .generate_key(&mechanism, &t)
                    .map_err(pk("generate a secret key"))?;
                Ok((KeyHandle(h), None))
            }
            HsmKeyKind::Ed25519 | HsmKeyKind::EcdsaP256 => {
                let (mechanism, key_type, params): (Mechanism<'_>, KeyType, &[u8]) = match kind {
                    HsmKeyKind::Ed25519 => (
                        Mechanism::EccEdwardsKeyPairGen,
                        KeyType::EC_EDWARDS,
                        OID_ED25519,
                    ),
                    _ => (Mechanism::EccKeyPairGen, KeyType::EC, OID_P256),
                };
                // The public half is a session object: kms keeps the public key's bytes in
                // its (authenticated) metadata and verifies in software.
                let public = [
                    Attribute::Token(false),
                    Attribute::Verify(true),
                    Attribute::KeyType(key_type),
                    Attribute::EcParams(params.to_vec()),
                ];
                // Private keys: the usages a private key can have, explicit.
                let mut private = base();
                private.extend([
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(key_type),
                    Attribute::Sign(true),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(false),
                ]);
                let (pub_h, priv_h) = s
                    .generate_key_pair(&mechanism, &public, &private)
                    .map_err(pk("generate a key pair"))?;
                let point = s
                    .get_attributes(pub_h, &[AttributeType::EcPoint])
                    .map_err(pk("read the public key"))?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::EcPoint(p) => Some(p),
                        _ => None,
                    })
                    .ok_or(HsmError::Misuse("the token returned no public key"))?;
                let _ = s.destroy_object(pub_h);
                let want = if kind == HsmKeyKind::Ed25519 { 32 } else { 65 };
                Ok((KeyHandle(priv_h), Some(unwrap_ec_point(&point, want)?)))
            }
        })
    }

    /// Finds a key kms made (after a restart, handles are looked up again): the token
    /// object of `kind` with this label and, when given, this CKA_ID. Exactly one must
    /// answer (`None`: none does), and it must be what kms made: the right class and key
    /// type, sensitive and never extractable.
    pub fn find_key(
        &self,
        kind: HsmKeyKind,
        label: &str,
        id: Option<&[u8]>,
    ) -> Result<Option<KeyHandle>, HsmError> {
        let (class, key_type) = kind.class_and_type();
        let mut template = vec![
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        if let Some(id) = id {
            template.push(Attribute::Id(id.to_vec()));
        }
        let unexpected = |why| HsmError::UnexpectedObject {
            label: label.to_owned(),
            why,
        };
        self.with_session(|s| {
            let found = s.find_objects(&template).map_err(pk("find a key"))?;
            let one = match found.as_slice() {
                [] => return Ok(None),
                [one] => *one,
                many => {
                    return Err(HsmError::KeyAmbiguous {
                        label: label.to_owned(),
                        count: many.len(),
                    });
                }
            };
            let attrs = s
                .get_attributes(
                    one,
                    &[
                        AttributeType::KeyType,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                    ],
                )
                .map_err(pk("read a key's attributes"))?;
            let (mut typ, mut sensitive, mut extractable) = (None, false, true);
            for a in attrs {
                match a {
                    Attribute::KeyType(t) => typ = Some(t),
                    Attribute::Sensitive(v) => sensitive = v,
                    Attribute::Extractable(v) => extractable = v,
                    _ => {}
                }
            }
            if typ != Some(key_type) {
                return Err(unexpected("another key type"));
            }
            if !sensitive || extractable {
                return Err(unexpected("not sensitive, or extractable"));
            }
            Ok(Some(KeyHandle(one)))
        })
    }

    /// Every token object whose label starts with `prefix`: handle, label and CKA_ID (for
    /// finding the objects kms made that no record names).
    pub fn objects_labelled(&self, prefix: &str) -> Result<Vec<TokenObject>, HsmError> {
        self.with_session(|s| {
            let all = s
                .find_objects(&[Attribute::Token(true)])
                .map_err(pk("list token objects"))?;
            let mut out = Vec::new();
            for h in all {
                let attrs = s
                    .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
                    .map_err(pk("read an object's label"))?;
                let mut object = TokenObject {
                    handle: KeyHandle(h),
                    label: String::new(),
                    id: Vec::new(),
                };
                for a in attrs {
                    match a {
                        Attribute::Label(l) => object.label = String::from_utf8_lossy(&l).into(),
                        Attribute::Id(i) => object.id = i,
                        _ => {}
                    }
                }
                if object.label.starts_with(prefix) {
                    out.push(object);
                }
            }
            Ok(out)
        })
    }

    /// Signs (or MACs) `data` inside the HSM. For ECDSA `data` is the SHA-256 digest and the
    /// result is raw `r | s`; for Ed25519 it is the message; for HMAC the message.
    pub fn sign(&self, kind: HsmKeyKind, key: KeyHandle, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mechanism = match kind {
            HsmKeyKind::Ed25519 => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            HsmKeyKind::EcdsaP256 => Mechanism::Ecdsa,
            HsmKeyKind::HmacSha256 => Mechanism::Sha256Hmac,
            HsmKeyKind::Aes256 => return Err(HsmError::Misuse("an AES key does not sign")),
        };
        self.with_session(|s| s.sign(&mechanism, key.0, data).map_err(pk("sign")))
    }

    /// Destroys the key object kms made with this label and id, and confirms with the token
    /// that it is gone (`Ok` also when it was gone already). After a failed destroy the
    /// object is never confirmed gone in this process (see
    /// [`HsmError::DestroyUnconfirmed`]): a restart, with a fresh view of the token, is
    /// needed to try again.
    pub fn destroy_key(
        &self,
        kind: HsmKeyKind,
        label: &str,
        id: Option<&[u8]>,
    ) -> Result<(), HsmError> {
        let entry = (label.to_owned(), id.map(<[u8]>::to_vec));
        let unconfirmed = || self.unconfirmed.lock().unwrap_or_else(|p| p.into_inner());
        if unconfirmed().contains(&entry) {
            return Err(HsmError::DestroyUnconfirmed {
                label: label.to_owned(),
            });
        }
        if let Some(h) = self.find_key(kind, label, id)?
            && let Err(e) = self.destroy(h)
        {
            unconfirmed().insert(entry);
            return Err(e);
        }
        if self.find_key(kind, label, id)?.is_some() {
            return Err(HsmError::Misuse(
                "the token still holds an object it destroyed",
            ));
        }
        Ok(())
    }

    /// Destroys a key object: its material is gone from the token for good.
    pub fn destroy(&self, key: KeyHandle) -> Result<(), HsmError> {
        self.with_session(|s| s.destroy_object(key.0).map_err(pk("destroy a key")))
    }

    /// Reads the master key's security attributes, as the token reports them.
    pub fn master_key_attributes(&self, key: KeyHandle) -> Result<MasterKeyAttributes, HsmError> {
        self.with_session(|s| {
            let attrs = s
                .get_attributes(
                    key.0,
                    &[
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::NeverExtractable,
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Copyable,
                        AttributeType::Derive,
                        AttributeType::Wrap,
                    ],
                )
                .map_err(pk("read master key attributes"))?;
            // Read what the token says; an attribute it does not report counts against the
            // key, except CKA_COPYABLE (PKCS#11 2.40), whose copies could not be extractable
            // or less sensitive anyway.
            let mut out = MasterKeyAttributes {
                derive: true,
                wrap: true,
                ..MasterKeyAttributes::default()
            };
            for a in attrs {
                match a {
                    Attribute::Sensitive(v) => out.sensitive = v,
                    Attribute::Extractable(v) => out.extractable = v,
                    Attribute::NeverExtractable(v) => out.never_extractable = v,
                    Attribute::Token(v) => out.token = v,
                    Attribute::Private(v) => out.private = v,
                    Attribute::Copyable(v) => out.copyable = v,
                    Attribute::Derive(v) => out.derive = v,
                    Attribute::Wrap(v) => out.wrap = v,
                    _ => {}
                }
            }
            Ok(out)
        })
    }
}

/// A token object found by [`Hsm::objects_labelled`].
#[derive(Debug, Clone)]
pub struct TokenObject {
    /// Its handle.
    pub handle: KeyHandle,
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID.
    pub id: Vec<u8>,
}

/// The kinds of keyring key kms makes inside the HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmKeyKind {
    /// AES-256 for AES-GCM.
    Aes256,
    /// Ed25519 (CKM_EDDSA).
    Ed25519,
    /// ECDSA over P-256 (CKM_ECDSA on a SHA-256 digest).
    EcdsaP256,
    /// A 256-bit generic secret for CKM_SHA256_HMAC.
    HmacSha256,
}

impl HsmKeyKind {
    /// The class and key type of the object kms uses (the private half of a pair).
    fn class_and_type(self) -> (ObjectClass, KeyType) {
        match self {
            Self::Aes256 => (ObjectClass::SECRET_KEY, KeyType::AES),
            Self::HmacSha256 => (ObjectClass::SECRET_KEY, KeyType::GENERIC_SECRET),
            Self::Ed25519 => (ObjectClass::PRIVATE_KEY, KeyType::EC_EDWARDS),
            Self::EcdsaP256 => (ObjectClass::PRIVATE_KEY, KeyType::EC),
        }
    }
}

/// DER of the Ed25519 curve OID 1.3.101.112 (CKA_EC_PARAMS).
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];
/// DER of the P-256 curve OID 1.2.840.10045.3.1.7 (CKA_EC_PARAMS).
const OID_P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// CKA_EC_POINT is a DER OCTET STRING around the point; some tokens return the bare point.
fn unwrap_ec_point(value: &[u8], want: usize) -> Result<Vec<u8>, HsmError> {
    match value {
        [0x04, len, rest @ ..] if usize::from(*len) == want && rest.len() == want => {
            Ok(rest.to_vec())
        }
        bare if bare.len() == want => Ok(bare.to_vec()),
        _ => Err(HsmError::Misuse(
            "unexpected EC point encoding from the token",
        )),
    }
}

/// The master key's security attributes, as read from the token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MasterKeyAttributes {
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: bool,
    /// CKA_TOKEN.
    pub token: bool,
    /// CKA_PRIVATE: only a logged-in user sees it.
    pub private: bool,
    /// CKA_COPYABLE.
    pub copyable: bool,
    /// CKA_DERIVE: other keys could be derived from it (and those could be extractable).
    pub derive: bool,
    /// CKA_WRAP: it could wrap other keys out of the token.
    pub wrap: bool,
}

impl MasterKeyAttributes {
    /// Why the key is not as kms requires (a sensitive, never extractable, private token
    /// object that derives and wraps nothing); empty when it is.
    pub fn problems(&self) -> Vec<&'static str> {
        [
            (!self.sensitive, "not sensitive"),
            (self.extractable, "extractable"),
            (!self.never_extractable, "was extractable once"),
            (!self.token, "not a token object"),
            (!self.private, "not private"),
            (self.copyable, "copyable"),
            (self.derive, "can derive keys"),
            (self.wrap, "can wrap keys"),
        ]
        .into_iter()
        .filter_map(|(bad, why)| bad.then_some(why))
        .collect()
    }

    /// Whether the key is as kms requires ([`MasterKeyAttributes::problems`] is empty).
    pub fn is_safe(&self) -> bool {
        self.problems().is_empty()
    }
}
