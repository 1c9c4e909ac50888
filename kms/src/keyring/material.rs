//! Key material: derived beneath the root key (software) or held in the HSM, and the
//! primitive operations on it.
//!
//! Software material: `HKDF-SHA256(ikm = root key, salt = the version's random 32-byte salt,
//! info = "kms/v1/key-material" | key id (16) | version (u32 BE) | algorithm name)`.
//! Derived once per version when the keyring loads or the version is made, and cached
//! (zeroized on drop) until seal.

use std::sync::atomic::AtomicU64;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use ed25519_dalek::Signer as _;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::pkcs8::EncodePublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256, Sha384};

use crate::barrier::Barrier;
use zeroize::Zeroizing;

use super::KeyringError;
use super::ciphertext::NONCE_LEN;
use super::model::{Algorithm, KeyMeta, RsaScheme};
use super::unhex;
use crate::hsm::{Hsm, HsmKeyKind, KeyHandle};

/// How an ECDSA signature is encoded (Ed25519 signatures are always 64 raw bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    /// ASN.1 DER, what openssl and most verifiers take.
    #[default]
    Der,
    /// `r | s`: 64 bytes for P-256, 96 for P-384 (JOSE/JWS, WebAuthn-style raw).
    Raw,
}

/// What to sign: a message, or (ECDSA only) its digest under the key's hash.
#[derive(Debug, Clone, Copy)]
pub enum SignInput<'a> {
    /// The message itself.
    Message(&'a [u8]),
    /// A SHA-256 digest (32 bytes; P-256) or a SHA-384 digest (48 bytes; P-384).
    Digest(&'a [u8]),
}

/// The secret part of a version. No `Debug`; zeroized on drop.
pub enum Secret {
    /// AES-256-GCM with its key schedule.
    Aes(Box<Aes256Gcm>),
    /// An Ed25519 signing key.
    Ed25519(Box<ed25519_dalek::SigningKey>),
    /// A P-256 ECDSA signing key.
    P256(Box<p256::ecdsa::SigningKey>),
    /// A P-384 ECDSA signing key.
    P384(Box<p384::ecdsa::SigningKey>),
    /// An HMAC-SHA256 key.
    Hmac(Zeroizing<[u8; 32]>),
    /// An RSA private key (zeroized on drop by the `rsa` crate) and what it does.
    Rsa(Box<rsa::PrivateKey>, RsaScheme),
    /// A key inside the HSM.
    Hsm(HsmKeyKind, KeyHandle),
    /// An HSM key whose object is not in the token.
    HsmMissing,
}

/// A public key.
#[derive(Clone)]
pub enum Public {
    /// Ed25519.
    Ed25519(ed25519_dalek::VerifyingKey),
    /// P-256.
    P256(p256::ecdsa::VerifyingKey),
    /// P-384.
    P384(p384::ecdsa::VerifyingKey),
    /// RSA, and what its private half does.
    Rsa(Box<rsa::PublicKey>, RsaScheme),
}

impl Public {
    /// From stored bytes (Ed25519: 32; P-256: SEC1).
    pub(crate) fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Option<Self> {
        match algorithm {
            Algorithm::Ed25519 => {
                let arr: [u8; 32] = bytes.try_into().ok()?;
                ed25519_dalek::VerifyingKey::from_bytes(&arr)
                    .ok()
                    .map(Self::Ed25519)
            }
            Algorithm::EcdsaP256Sha256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
                .ok()
                .map(Self::P256),
            Algorithm::EcdsaP384Sha384 => p384::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
                .ok()
                .map(Self::P384),
            _ => {
                let (scheme, bits) = algorithm.rsa()?;
                let key = rsa::PublicKey::from_public_key_der(bytes).ok()?;
                (key.size() * 8 == bits).then(|| Self::Rsa(Box::new(key), scheme))
            }
        }
    }

    /// The bytes kept in metadata.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Ed25519(k) => k.to_bytes().to_vec(),
            Self::P256(k) => k.to_sec1_bytes().to_vec(),
            Self::P384(k) => k.to_sec1_bytes().to_vec(),
            Self::Rsa(k, _) => k
                .to_public_key_der()
                .map(|d| d.into_vec())
                .unwrap_or_default(),
        }
    }

    /// SubjectPublicKeyInfo, PEM.
    pub(crate) fn to_pem(&self) -> Result<String, KeyringError> {
        let le = p256::pkcs8::LineEnding::LF;
        match self {
            Self::Ed25519(k) => k.to_public_key_pem(le),
            Self::P256(k) => k.to_public_key_pem(le),
            Self::P384(k) => k.to_public_key_pem(le),
            Self::Rsa(k, _) => k.to_public_key_pem(le),
        }
        .map_err(|_| KeyringError::Internal("encode public key"))
    }

    /// Verifies a signature in the standard encoding (Ed25519 raw 64 bytes; ECDSA DER,
    /// or raw `r | s` of 64 or 96 bytes; RSA the modulus's size). Malformed signatures are
    /// simply invalid.
    pub fn verify(&self, input: SignInput<'_>, signature: &[u8]) -> Result<bool, KeyringError> {
        match (self, input) {
            (Self::Ed25519(k), SignInput::Message(m)) => {
                let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
                    return Ok(false);
                };
                Ok(k.verify_strict(m, &sig).is_ok())
            }
            (Self::Ed25519(_), SignInput::Digest(_)) => Err(KeyringError::BadRequest(
                "Ed25519 signs messages, not digests: send the message",
            )),
            (Self::P256(k), input) => {
                let digest = sha256_input(input)?;
                let sig = match p256::ecdsa::Signature::from_der(signature) {
                    Ok(s) => s,
                    Err(_) => match p256::ecdsa::Signature::from_slice(signature) {
                        Ok(s) => s,
                        Err(_) => return Ok(false),
                    },
                };
                Ok(k.verify_prehash(&digest, &sig).is_ok())
            }
            (Self::P384(k), input) => {
                let digest = sha384_input(input)?;
                let sig = match p384::ecdsa::Signature::from_der(signature) {
                    Ok(s) => s,
                    Err(_) => match p384::ecdsa::Signature::from_slice(signature) {
                        Ok(s) => s,
                        Err(_) => return Ok(false),
                    },
                };
                Ok(k.verify_prehash(&digest, &sig).is_ok())
            }
            (Self::Rsa(k, scheme), input) => {
                let digest = sha256_input(input)?;
                Ok(match scheme {
                    RsaScheme::Pss => k.verify(rsa::Pss::<Sha256>::new(), &digest, signature),
                    RsaScheme::Pkcs1 => {
                        k.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, signature)
                    }
                    RsaScheme::Oaep => {
                        return Err(KeyringError::Internal("not a verification key"));
                    }
                }
                .is_ok())
            }
        }
    }
}

/// The digest an ECDSA signature covers.
fn sha256_input(input: SignInput<'_>) -> Result<[u8; 32], KeyringError> {
    match input {
        SignInput::Message(m) => Ok(Sha256::digest(m).into()),
        SignInput::Digest(d) => d
            .try_into()
            .map_err(|_| KeyringError::BadRequest("a SHA-256 digest is 32 bytes")),
    }
}

/// The digest a P-384 signature covers.
fn sha384_input(input: SignInput<'_>) -> Result<[u8; 48], KeyringError> {
    match input {
        SignInput::Message(m) => Ok(Sha384::digest(m).into()),
        SignInput::Digest(d) => d
            .try_into()
            .map_err(|_| KeyringError::BadRequest("a SHA-384 digest is 48 bytes")),
    }
}

fn need(hsm: Option<&Hsm>) -> Result<&Hsm, KeyringError> {
    hsm.ok_or(KeyringError::Internal("an HSM key without an HSM"))
}

/// One version's material, its public key, and its message counter.
pub(crate) struct VersionMaterial {
    /// The secret part once made: an HSM version's when its key is read (the key's first
    /// use), a software version's at the version's first use (see
    /// [`VersionMaterial::secret`]).
    pub ready: std::sync::OnceLock<Secret>,
    /// Whether the secret is derived at first use (a live software version), from the
    /// key's record (see [`VersionMaterial::secret`]).
    pub derived: bool,
    /// The public key, for asymmetric keys.
    /// (Boxed: most versions have none, and an Ed25519 verifying key is ~200 bytes.)
    pub public: Option<Box<Public>>,
    /// Messages encrypted under this version (AES-GCM nonce budget).
    pub counter: AtomicU64,
    /// The count up to which the store has a reservation (see `Keyring::encrypt`).
    pub reserved: AtomicU64,
    /// Held while this version reserves more (on a store only this server writes; on a
    /// shared one the keyring's change lock is).
    pub reserving: std::sync::Mutex<()>,
}

impl VersionMaterial {
    /// The secret of `meta`'s version `version` (`None` when destroyed). A software
    /// version's is derived under the barrier at its first use, not at load: a keyring of many
    /// keys, most of them cold, unseals faster and holds less (no key schedule per key).
    pub(crate) fn secret(
        &self,
        barrier: &Barrier,
        meta: &KeyMeta,
        version: u32,
    ) -> Result<Option<&Secret>, KeyringError> {
        if let Some(s) = self.ready.get() {
            return Ok(Some(s));
        }
        if !self.derived {
            return Ok(None);
        }
        // Both were checked when the key was read; a record that changed since is not ours.
        let tampered = || KeyringError::Tampered(meta.name.clone());
        let salt = meta
            .version(version)
            .and_then(|v| v.salt.as_deref())
            .and_then(unhex)
            .ok_or_else(tampered)?;
        let key_id = unhex(&meta.key_id).ok_or_else(tampered)?;
        let stored = meta.version(version).and_then(|v| v.material.as_deref());
        let made = match stored {
            Some(sealed) => {
                let sealed = unhex(sealed).ok_or_else(tampered)?;
                let der = open_material(barrier, &salt, &key_id, version, meta.algorithm, &sealed)
                    .ok_or_else(tampered)?;
                secret_from_material(meta.algorithm, &der).ok_or_else(tampered)?
            }
            None => derive_secret(barrier, &salt, &key_id, version, meta.algorithm)?,
        };
        // Two first uses at once derive twice; one result is kept, the other dropped.
        Ok(Some(self.ready.get_or_init(|| made)))
    }
}

/// HKDF output of `N` bytes for a software version.
fn derive<const N: usize>(
    barrier: &Barrier,
    salt: &[u8],
    key_id: &[u8],
    version: u32,
    algorithm: Algorithm,
    counter: u8,
) -> Result<Zeroizing<[u8; N]>, KeyringError> {
    derive_labelled(
        b"kms/v1/key-material",
        barrier,
        salt,
        key_id,
        version,
        algorithm,
        counter,
    )
}

/// HKDF-SHA256 output of `N` bytes: `info = label | key id | version (u32 BE) | algorithm
/// name [| counter]`.
fn derive_labelled<const N: usize>(
    label: &[u8],
    barrier: &Barrier,
    salt: &[u8],
    key_id: &[u8],
    version: u32,
    algorithm: Algorithm,
    counter: u8,
) -> Result<Zeroizing<[u8; N]>, KeyringError> {
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(label);
    info.extend_from_slice(key_id);
    info.extend_from_slice(&version.to_be_bytes());
    info.extend_from_slice(algorithm.name().as_bytes());
    if counter > 0 {
        info.push(counter);
    }
    barrier
        .derive_key::<N>(Some(salt), &[&info])
        .map_err(|_| KeyringError::Internal("hkdf"))
}

/// Derives a software version's secret.
pub(crate) fn derive_secret(
    barrier: &Barrier,
    salt: &[u8],
    key_id: &[u8],
    version: u32,
    algorithm: Algorithm,
) -> Result<Secret, KeyringError> {
    let d = |c| derive::<32>(barrier, salt, key_id, version, algorithm, c);
    Ok(match algorithm {
        Algorithm::Aes256Gcm => {
            let k = d(0)?;
            Secret::Aes(Box::new(
                Aes256Gcm::new_from_slice(k.as_slice())
                    .map_err(|_| KeyringError::Internal("aes key"))?,
            ))
        }
        Algorithm::Ed25519 => {
            Secret::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&*d(0)?)))
        }
        Algorithm::EcdsaP256Sha256 => {
            // A scalar must be in 1..n; a 32-byte string is not with probability ~2^-32:
            // derive again with a counter in the info.
            let mut counter = 0u8;
            loop {
                if let Ok(k) = p256::ecdsa::SigningKey::from_slice(d(counter)?.as_slice()) {
                    break Secret::P256(Box::new(k));
                }
                counter = counter
                    .checked_add(1)
                    .ok_or(KeyringError::Internal("p256 derivation"))?;
            }
        }
        Algorithm::EcdsaP384Sha384 => {
            // As for P-256, with a 48-byte string for the 384-bit scalar.
            let mut counter = 0u8;
            loop {
                let okm = derive::<48>(barrier, salt, key_id, version, algorithm, counter)?;
                if let Ok(k) = p384::ecdsa::SigningKey::from_slice(okm.as_slice()) {
                    break Secret::P384(Box::new(k));
                }
                counter = counter
                    .checked_add(1)
                    .ok_or(KeyringError::Internal("p384 derivation"))?;
            }
        }
        Algorithm::HmacSha256 => Secret::Hmac(d(0)?),
        _ => return Err(KeyringError::Internal("RSA keys are stored, not derived")),
    })
}

/// The label of the key that encrypts a version's stored material.
const STORED_MATERIAL: &[u8] = b"kms/v1/stored-material";

/// The AES-256-GCM key for a version's stored material, derived like its secret would be
/// but under another label: destroying the version's salt destroys this key too.
fn material_cipher(
    barrier: &Barrier,
    salt: &[u8],
    key_id: &[u8],
    version: u32,
    algorithm: Algorithm,
) -> Result<Aes256Gcm, KeyringError> {
    let k = derive_labelled::<32>(
        STORED_MATERIAL,
        barrier,
        salt,
        key_id,
        version,
        algorithm,
        0,
    )?;
    Aes256Gcm::new_from_slice(k.as_slice()).map_err(|_| KeyringError::Internal("aes key"))
}

/// Encrypts a version's private key (PKCS#8 DER) for its record: `nonce | ciphertext | tag`.
pub(crate) fn seal_material(
    barrier: &Barrier,
    salt: &[u8],
    key_id: &[u8],
    version: u32,
    algorithm: Algorithm,
    der: &[u8],
) -> Result<Vec<u8>, KeyringError> {
    let cipher = material_cipher(barrier, salt, key_id, version, algorithm)?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| KeyringError::Randomness)?;
    let ct = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: der,
                aad: STORED_MATERIAL,
            },
        )
        .map_err(|_| KeyringError::Internal("aes-gcm encrypt"))?;
    Ok([nonce.as_slice(), &ct].concat())
}

/// What [`seal_material`] sealed for this version, or `None` if it was not that.
fn open_material(
    barrier: &Barrier,
    salt: &[u8],
    key_id: &[u8],
    version: u32,
    algorithm: Algorithm,
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let cipher = material_cipher(barrier, salt, key_id, version, algorithm).ok()?;
    let (nonce, ct) = sealed.split_at_checked(NONCE_LEN)?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    cipher
        .decrypt(
            &nonce.into(),
            Payload {
                msg: ct,
                aad: STORED_MATERIAL,
            },
        )
        .ok()
        .map(Zeroizing::new)
}

/// A new software RSA key for `algorithm`: its PKCS#8 DER (to seal) and its public key.
/// Generation takes a while (seconds for 4096 bits); it runs once per version.
pub(crate) fn generate_rsa(
    algorithm: Algorithm,
) -> Result<(Zeroizing<Vec<u8>>, Public), KeyringError> {
    let (scheme, bits) = algorithm
        .rsa()
        .ok_or(KeyringError::Internal("not an RSA algorithm"))?;
    let key =
        rsa::PrivateKey::new(&mut getrandom::SysRng, bits).map_err(|_| KeyringError::Randomness)?;
    let der = key
        .to_pkcs8_der()
        .map_err(|_| KeyringError::Internal("encode RSA key"))?;
    let public = Public::Rsa(Box::new(key.to_public_key()), scheme);
    Ok((Zeroizing::new(der.as_bytes().to_vec()), public))
}

/// The secret of stored material for `algorithm` (a generated RSA key, or imported
/// material): 32 raw bytes for AES-256 and HMAC, PKCS#8 DER for the others, of the
/// algorithm's size or curve; `None` otherwise.
pub(crate) fn secret_from_material(algorithm: Algorithm, bytes: &[u8]) -> Option<Secret> {
    use p256::pkcs8::DecodePrivateKey as _;
    Some(match algorithm {
        Algorithm::Aes256Gcm => {
            let key: &[u8; 32] = bytes.try_into().ok()?;
            Secret::Aes(Box::new(Aes256Gcm::new_from_slice(key).ok()?))
        }
        Algorithm::HmacSha256 => {
            let key: [u8; 32] = bytes.try_into().ok()?;
            Secret::Hmac(Zeroizing::new(key))
        }
        Algorithm::Ed25519 => Secret::Ed25519(Box::new(
            ed25519_dalek::SigningKey::from_pkcs8_der(bytes).ok()?,
        )),
        Algorithm::EcdsaP256Sha256 => Secret::P256(Box::new(
            p256::ecdsa::SigningKey::from_pkcs8_der(bytes).ok()?,
        )),
        Algorithm::EcdsaP384Sha384 => Secret::P384(Box::new(
            p384::ecdsa::SigningKey::from_pkcs8_der(bytes).ok()?,
        )),
        _ => {
            let (scheme, bits) = algorithm.rsa()?;
            let key = rsa::PrivateKey::from_pkcs8_der(bytes).ok()?;
            if key.size() * 8 != bits {
                return None;
            }
            Secret::Rsa(Box::new(key), scheme)
        }
    })
}

/// What is wrong with material for `algorithm`, as a caller should read it.
pub(crate) fn material_problem(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Aes256Gcm | Algorithm::HmacSha256 => "the material must be 32 raw bytes",
        Algorithm::Ed25519 => "the material must be an Ed25519 private key, PKCS#8 DER",
        Algorithm::EcdsaP256Sha256 => "the material must be a P-256 private key, PKCS#8 DER",
        Algorithm::EcdsaP384Sha384 => "the material must be a P-384 private key, PKCS#8 DER",
        _ => "the material must be an RSA private key of the algorithm's size, PKCS#8 DER",
    }
}

/// A public key from SubjectPublicKeyInfo PEM, for `algorithm`.
pub(crate) fn public_from_pem(algorithm: Algorithm, pem: &str) -> Option<Public> {
    use p256::pkcs8::DecodePublicKey as _;
    Some(match algorithm {
        Algorithm::Ed25519 => {
            Public::Ed25519(ed25519_dalek::VerifyingKey::from_public_key_pem(pem).ok()?)
        }
        Algorithm::EcdsaP256Sha256 => {
            Public::P256(p256::ecdsa::VerifyingKey::from_public_key_pem(pem).ok()?)
        }
        Algorithm::EcdsaP384Sha384 => {
            Public::P384(p384::ecdsa::VerifyingKey::from_public_key_pem(pem).ok()?)
        }
        _ => {
            let (scheme, bits) = algorithm.rsa()?;
            let key = rsa::PublicKey::from_public_key_pem(pem).ok()?;
            if key.size() * 8 != bits {
                return None;
            }
            Public::Rsa(Box::new(key), scheme)
        }
    })
}

/// Derives the key that authenticates key metadata.
pub(crate) fn metadata_mac_key(barrier: &Barrier) -> Result<Zeroizing<[u8; 32]>, KeyringError> {
    barrier
        .derive_key::<32>(None, &[b"kms/v1/metadata-mac"])
        .map_err(|_| KeyringError::Internal("hkdf"))
}

impl Secret {
    /// The public key of an asymmetric software secret.
    pub fn public(&self) -> Option<Public> {
        match self {
            Self::Ed25519(k) => Some(Public::Ed25519(k.verifying_key())),
            Self::P256(k) => Some(Public::P256(*k.verifying_key())),
            Self::P384(k) => Some(Public::P384(*k.verifying_key())),
            Self::Rsa(k, scheme) => Some(Public::Rsa(Box::new(k.to_public_key()), *scheme)),
            _ => None,
        }
    }

    fn hsm_missing<T>() -> Result<T, KeyringError> {
        Err(KeyringError::HsmKeyMissing)
    }

    /// AES-256-GCM encryption with the caller's nonce: appends `ciphertext | tag` to `out`
    /// (in place for software keys: no intermediate copy).
    pub(crate) fn encrypt_into(
        &self,
        hsm: Option<&Hsm>,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        pt: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), KeyringError> {
        match self {
            Self::Aes(c) => {
                let start = out.len();
                out.extend_from_slice(pt);
                let body = out
                    .get_mut(start..)
                    .ok_or(KeyringError::Internal("buffer"))?;
                let tag = c
                    .encrypt_inout_detached(&(*nonce).into(), aad, body.into())
                    .map_err(|_| KeyringError::Internal("aes-gcm encrypt"))?;
                out.extend_from_slice(&tag);
                Ok(())
            }
            Self::Hsm(HsmKeyKind::Aes256, h) => {
                out.extend_from_slice(&need(hsm)?.encrypt_with_iv(*h, nonce, aad, pt)?);
                Ok(())
            }
            Self::HsmMissing => Self::hsm_missing(),
            _ => Err(KeyringError::Internal("not an encryption key")),
        }
    }

    /// AES-256-GCM decryption. Every failure is the opaque `DecryptionFailed`.
    pub fn decrypt(
        &self,
        hsm: Option<&Hsm>,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        match self {
            Self::Aes(c) => c
                .decrypt(&(*nonce).into(), Payload { msg: body, aad })
                .map(Zeroizing::new)
                .map_err(|_| KeyringError::DecryptionFailed),
            Self::Hsm(HsmKeyKind::Aes256, h) => {
                let mut blob = Vec::with_capacity(NONCE_LEN + body.len());
                blob.extend_from_slice(nonce);
                blob.extend_from_slice(body);
                match need(hsm)?.decrypt(*h, aad, &blob) {
                    Ok(pt) => Ok(pt),
                    Err(crate::hsm::HsmError::DecryptFailed) => Err(KeyringError::DecryptionFailed),
                    Err(e) => Err(e.into()),
                }
            }
            Self::HsmMissing => Self::hsm_missing(),
            _ => Err(KeyringError::Internal("not an encryption key")),
        }
    }

    /// Signs: Ed25519 gives 64 raw bytes; ECDSA gives `encoding` (DER, or raw `r | s`).
    pub fn sign(
        &self,
        hsm: Option<&Hsm>,
        input: SignInput<'_>,
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>, KeyringError> {
        let ed_message = |input| match input {
            SignInput::Message(m) => Ok(m),
            SignInput::Digest(_) => Err(KeyringError::BadRequest(
                "Ed25519 signs messages, not digests: send the message",
            )),
        };
        let ecdsa_out = |sig: p256::ecdsa::Signature| {
            // Low-S form, as most verifiers (and Bitcoin-style strict ones) expect.
            let sig = sig.normalize_s();
            match encoding {
                SignatureEncoding::Raw => sig.to_bytes().to_vec(),
                SignatureEncoding::Der => sig.to_der().as_bytes().to_vec(),
            }
        };
        let ecdsa384_out = |sig: p384::ecdsa::Signature| {
            let sig = sig.normalize_s();
            match encoding {
                SignatureEncoding::Raw => sig.to_bytes().to_vec(),
                SignatureEncoding::Der => sig.to_der().as_bytes().to_vec(),
            }
        };
        match self {
            Self::Ed25519(k) => Ok(k.sign(ed_message(input)?).to_bytes().to_vec()),
            Self::P256(k) => {
                let digest = sha256_input(input)?;
                let sig: p256::ecdsa::Signature = k
                    .sign_prehash(&digest)
                    .map_err(|_| KeyringError::Internal("ecdsa sign"))?;
                Ok(ecdsa_out(sig))
            }
            Self::P384(k) => {
                let digest = sha384_input(input)?;
                let sig: p384::ecdsa::Signature = k
                    .sign_prehash(&digest)
                    .map_err(|_| KeyringError::Internal("ecdsa sign"))?;
                Ok(ecdsa384_out(sig))
            }
            Self::Hsm(HsmKeyKind::Ed25519, h) => {
                Ok(need(hsm)?.sign(HsmKeyKind::Ed25519, *h, ed_message(input)?)?)
            }
            Self::Hsm(HsmKeyKind::EcdsaP256, h) => {
                let digest = sha256_input(input)?;
                let rs = need(hsm)?.sign(HsmKeyKind::EcdsaP256, *h, &digest)?;
                let sig = p256::ecdsa::Signature::from_slice(&rs).map_err(|_| {
                    KeyringError::Internal("HSM returned a malformed ECDSA signature")
                })?;
                Ok(ecdsa_out(sig))
            }
            Self::Hsm(HsmKeyKind::EcdsaP384, h) => {
                let digest = sha384_input(input)?;
                let rs = need(hsm)?.sign(HsmKeyKind::EcdsaP384, *h, &digest)?;
                let sig = p384::ecdsa::Signature::from_slice(&rs).map_err(|_| {
                    KeyringError::Internal("HSM returned a malformed ECDSA signature")
                })?;
                Ok(ecdsa384_out(sig))
            }
            Self::Rsa(k, scheme) => {
                let digest = sha256_input(input)?;
                let mut rng = getrandom::SysRng;
                match scheme {
                    // Blinded, and constant-time in the key (rsa 0.10, crypto-bigint).
                    RsaScheme::Pss => k.sign_with_rng(&mut rng, rsa::Pss::<Sha256>::new(), &digest),
                    RsaScheme::Pkcs1 => {
                        k.sign_with_rng(&mut rng, rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)
                    }
                    RsaScheme::Oaep => return Err(KeyringError::Internal("not a signing key")),
                }
                .map_err(|_| KeyringError::Internal("rsa sign"))
            }
            Self::Hsm(kind @ HsmKeyKind::Rsa(RsaScheme::Pss | RsaScheme::Pkcs1, _), h) => {
                let digest = sha256_input(input)?;
                Ok(need(hsm)?.sign(*kind, *h, &digest)?)
            }
            Self::HsmMissing => Self::hsm_missing(),
            _ => Err(KeyringError::Internal("not a signing key")),
        }
    }

    /// RSAES-OAEP (SHA-256) decryption. Every failure is the opaque `DecryptionFailed`.
    pub fn asymmetric_decrypt(
        &self,
        hsm: Option<&Hsm>,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        match self {
            Self::Rsa(k, RsaScheme::Oaep) => {
                // The blinded, constant-time private-key operation of rsa 0.10 (checked by
                // re-encryption), then kms's own constant-time OAEP decoding, the one the
                // HSM path uses: rsa 0.10's ignores the encoded block's leading byte
                // (Wycheproof's "First byte is 1" decrypts under it).
                let size = k.size();
                if ciphertext.len() != size {
                    return Err(KeyringError::DecryptionFailed);
                }
                let c = rsa::BoxedUint::from_be_slice(ciphertext, k.n_bits_precision())
                    .map_err(|_| KeyringError::DecryptionFailed)?;
                let mut m = rsa::hazmat::rsa_decrypt_and_check(
                    k.as_ref(),
                    Some(&mut getrandom::SysRng),
                    &c,
                )
                .map_err(|_| KeyringError::DecryptionFailed)?;
                let em = Zeroizing::new(m.to_be_bytes().into_vec());
                zeroize::Zeroize::zeroize(&mut m);
                let em = em
                    .get(em.len().saturating_sub(size)..)
                    .ok_or(KeyringError::DecryptionFailed)?;
                crate::hsm::oaep::decode(em, size).ok_or(KeyringError::DecryptionFailed)
            }
            Self::Hsm(HsmKeyKind::Rsa(RsaScheme::Oaep, bits), h) => {
                match need(hsm)?.rsa_oaep_decrypt(*h, *bits, ciphertext) {
                    Ok(pt) => Ok(pt),
                    Err(crate::hsm::HsmError::DecryptFailed) => Err(KeyringError::DecryptionFailed),
                    Err(e) => Err(e.into()),
                }
            }
            Self::HsmMissing => Self::hsm_missing(),
            _ => Err(KeyringError::Internal("not an asymmetric decryption key")),
        }
    }

    /// HMAC-SHA256 of `message`.
    pub fn mac(&self, hsm: Option<&Hsm>, message: &[u8]) -> Result<Vec<u8>, KeyringError> {
        match self {
            Self::Hmac(k) => {
                let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(k.as_slice())
                    .map_err(|_| KeyringError::Internal("hmac key"))?;
                m.update(message);
                Ok(m.finalize().into_bytes().to_vec())
            }
            Self::Hsm(HsmKeyKind::HmacSha256, h) => {
                Ok(need(hsm)?.sign(HsmKeyKind::HmacSha256, *h, message)?)
            }
            Self::HsmMissing => Self::hsm_missing(),
            _ => Err(KeyringError::Internal("not a MAC key")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    /// A barrier over a root key of 32 bytes `b`.
    fn barrier(b: u8) -> Barrier {
        Barrier::new(Zeroizing::new([b; 32]))
    }

    #[test]
    fn derivation_is_deterministic_and_separated() {
        let root = barrier(1);
        let a = derive::<32>(&root, &[2; 32], &[3; 16], 1, Algorithm::Aes256Gcm, 0).unwrap();
        let b = derive::<32>(&root, &[2; 32], &[3; 16], 1, Algorithm::Aes256Gcm, 0).unwrap();
        assert_eq!(*a, *b);
        // The vector of before the barrier (computed independently: see `barrier`'s tests).
        assert_eq!(
            data_encoding::HEXLOWER.encode(a.as_slice()),
            "cb5ca4b507d95bf9a020305d1680e3b55b362603e8d66cb3e98b3f84c50cf19c"
        );
        for other in [
            derive::<32>(&barrier(9), &[2; 32], &[3; 16], 1, Algorithm::Aes256Gcm, 0).unwrap(),
            derive::<32>(&root, &[9; 32], &[3; 16], 1, Algorithm::Aes256Gcm, 0).unwrap(),
            derive::<32>(&root, &[2; 32], &[9; 16], 1, Algorithm::Aes256Gcm, 0).unwrap(),
            derive::<32>(&root, &[2; 32], &[3; 16], 2, Algorithm::Aes256Gcm, 0).unwrap(),
            derive::<32>(&root, &[2; 32], &[3; 16], 1, Algorithm::HmacSha256, 0).unwrap(),
        ] {
            assert_ne!(*a, *other);
        }
    }

    /// RFC 8032, section 7.1, TEST 2: through our own signing and verification path.
    #[test]
    fn ed25519_rfc8032_test_2() {
        let hex = |s: &str| data_encoding::HEXLOWER.decode(s.as_bytes()).unwrap();
        let seed: [u8; 32] =
            hex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
                .try_into()
                .unwrap();
        let secret = Secret::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&seed)));
        let public = secret.public().unwrap();
        assert_eq!(
            public.to_bytes(),
            hex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
        );
        let msg = hex("72");
        let expected = hex(
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        );
        let sig = secret
            .sign(None, SignInput::Message(&msg), SignatureEncoding::Der)
            .unwrap();
        assert_eq!(sig, expected);
        assert!(
            secret
                .sign(None, SignInput::Digest(&[0; 32]), SignatureEncoding::Der)
                .is_err()
        );
        assert!(public.verify(SignInput::Message(&msg), &expected).unwrap());
        let mut bad = expected.clone();
        bad[0] ^= 1;
        assert!(!public.verify(SignInput::Message(&msg), &bad).unwrap());
        assert!(
            !public
                .verify(SignInput::Message(b"other"), &expected)
                .unwrap()
        );
    }

    /// ECDSA P-256: our signatures (DER and raw) verify with our verifier and with p256's
    /// own, low-S; and a signature over another message does not.
    #[test]
    fn ecdsa_p256_sign_verify() {
        let secret = derive_secret(
            &barrier(5),
            &[6; 32],
            &[7; 16],
            1,
            Algorithm::EcdsaP256Sha256,
        )
        .unwrap();
        let public = secret.public().unwrap();
        let der = secret
            .sign(None, SignInput::Message(b"hello"), SignatureEncoding::Der)
            .unwrap();
        let raw = secret
            .sign(None, SignInput::Message(b"hello"), SignatureEncoding::Raw)
            .unwrap();
        assert_eq!(raw.len(), 64);
        assert!(der.len() > 64 && der[0] == 0x30);
        assert!(public.verify(SignInput::Message(b"hello"), &der).unwrap());
        assert!(public.verify(SignInput::Message(b"hello"), &raw).unwrap());
        let digest: [u8; 32] = Sha256::digest(b"hello").into();
        assert!(public.verify(SignInput::Digest(&digest), &der).unwrap());
        assert!(!public.verify(SignInput::Message(b"hellO"), &der).unwrap());
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        assert!(sig.normalize_s() == sig);
        let pem = public.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    /// ECDSA P-384 likewise, with SHA-384: 96-byte raw signatures, 48-byte digests (a
    /// SHA-256 digest is refused), and a public key that round-trips through its bytes.
    #[test]
    fn ecdsa_p384_sign_verify() {
        let secret = derive_secret(
            &barrier(5),
            &[6; 32],
            &[7; 16],
            1,
            Algorithm::EcdsaP384Sha384,
        )
        .unwrap();
        let public = secret.public().unwrap();
        let der = secret
            .sign(None, SignInput::Message(b"hello"), SignatureEncoding::Der)
            .unwrap();
        let raw = secret
            .sign(None, SignInput::Message(b"hello"), SignatureEncoding::Raw)
            .unwrap();
        assert_eq!(raw.len(), 96);
        assert!(der[0] == 0x30);
        assert!(public.verify(SignInput::Message(b"hello"), &der).unwrap());
        assert!(public.verify(SignInput::Message(b"hello"), &raw).unwrap());
        let digest: [u8; 48] = Sha384::digest(b"hello").into();
        assert!(public.verify(SignInput::Digest(&digest), &der).unwrap());
        assert!(!public.verify(SignInput::Message(b"hellO"), &der).unwrap());
        let short: [u8; 32] = Sha256::digest(b"hello").into();
        assert!(matches!(
            secret.sign(None, SignInput::Digest(&short), SignatureEncoding::Der),
            Err(KeyringError::BadRequest(_))
        ));
        let sig = p384::ecdsa::Signature::from_der(&der).unwrap();
        assert!(sig.normalize_s() == sig);
        let back = Public::from_bytes(Algorithm::EcdsaP384Sha384, &public.to_bytes()).unwrap();
        assert!(back.verify(SignInput::Message(b"hello"), &raw).unwrap());
        // Not the P-256 key of the same derivation inputs.
        let p256 = derive_secret(
            &barrier(5),
            &[6; 32],
            &[7; 16],
            1,
            Algorithm::EcdsaP256Sha256,
        )
        .unwrap();
        assert_ne!(p256.public().unwrap().to_bytes(), public.to_bytes());
    }

    /// RSA software keys: generated, sealed under the root key and opened again (another
    /// version, salt or root opens nothing); PSS and PKCS#1 v1.5 signatures over a message
    /// and over its digest verify, with the other scheme's verifier they do not; OAEP
    /// decrypts what the public key encrypted, and a changed ciphertext fails opaquely.
    #[test]
    fn rsa_software_keys() {
        use rsa::traits::PublicKeyParts;
        let (root, salt, id) = (barrier(5), [6u8; 32], [7u8; 16]);
        let alg = Algorithm::RsaSignPss2048Sha256;
        let (der, public) = generate_rsa(alg).unwrap();
        let sealed = seal_material(&root, &salt, &id, 1, alg, &der).unwrap();
        assert!(!sealed.windows(16).any(|w| der.windows(16).any(|d| d == w)));
        assert!(open_material(&root, &salt, &id, 2, alg, &sealed).is_none());
        assert!(open_material(&root, &[9; 32], &id, 1, alg, &sealed).is_none());
        assert!(open_material(&barrier(9), &salt, &id, 1, alg, &sealed).is_none());
        let opened = open_material(&root, &salt, &id, 1, alg, &sealed).unwrap();
        assert_eq!(*opened, *der);
        let pss = secret_from_material(alg, &opened).unwrap();
        // The wrong size for the algorithm is refused.
        assert!(secret_from_material(Algorithm::RsaSignPss3072Sha256, &opened).is_none());
        assert!(secret_from_material(alg, &opened[1..]).is_none());
        let digest: [u8; 32] = Sha256::digest(b"hello").into();
        let sig = pss
            .sign(None, SignInput::Message(b"hello"), SignatureEncoding::Der)
            .unwrap();
        assert_eq!(sig.len(), 256);
        assert!(public.verify(SignInput::Message(b"hello"), &sig).unwrap());
        assert!(public.verify(SignInput::Digest(&digest), &sig).unwrap());
        assert!(!public.verify(SignInput::Message(b"hellO"), &sig).unwrap());
        let by_digest = pss
            .sign(None, SignInput::Digest(&digest), SignatureEncoding::Der)
            .unwrap();
        assert!(
            public
                .verify(SignInput::Message(b"hello"), &by_digest)
                .unwrap()
        );
        assert!(matches!(
            pss.sign(None, SignInput::Digest(&[0; 48]), SignatureEncoding::Der),
            Err(KeyringError::BadRequest(_))
        ));
        let Public::Rsa(k, _) = &public else {
            unreachable!("an RSA public key")
        };
        let pkcs1_public = Public::Rsa(k.clone(), RsaScheme::Pkcs1);
        assert!(
            !pkcs1_public
                .verify(SignInput::Message(b"hello"), &sig)
                .unwrap()
        );
        let pkcs1 = secret_from_material(Algorithm::RsaSignPkcs12048Sha256, &opened).unwrap();
        let sig1 = pkcs1
            .sign(None, SignInput::Message(b"hello"), SignatureEncoding::Der)
            .unwrap();
        // PKCS#1 v1.5 is deterministic.
        let again = pkcs1
            .sign(None, SignInput::Digest(&digest), SignatureEncoding::Der)
            .unwrap();
        assert_eq!(sig1, again);
        assert!(
            pkcs1_public
                .verify(SignInput::Message(b"hello"), &sig1)
                .unwrap()
        );
        assert!(!public.verify(SignInput::Message(b"hello"), &sig1).unwrap());
        // The public key round-trips through its stored bytes (SPKI DER).
        let back = Public::from_bytes(alg, &public.to_bytes()).unwrap();
        assert!(back.verify(SignInput::Message(b"hello"), &sig).unwrap());
        assert!(Public::from_bytes(Algorithm::RsaSignPss4096Sha256, &public.to_bytes()).is_none());
        assert!(
            public
                .to_pem()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        // OAEP with the same key material, as a decryption key.
        let oaep = secret_from_material(Algorithm::RsaDecryptOaep2048Sha256, &opened).unwrap();
        assert!(
            oaep.sign(None, SignInput::Message(b"x"), SignatureEncoding::Der)
                .is_err()
        );
        let ct = k
            .encrypt(
                &mut getrandom::SysRng,
                rsa::Oaep::<Sha256>::new(),
                b"secret",
            )
            .unwrap();
        assert_eq!(ct.len(), k.size());
        assert_eq!(*oaep.asymmetric_decrypt(None, &ct).unwrap(), b"secret");
        for i in [0, 100, 255] {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert!(matches!(
                oaep.asymmetric_decrypt(None, &bad),
                Err(KeyringError::DecryptionFailed)
            ));
        }
        assert!(matches!(
            oaep.asymmetric_decrypt(None, &ct[1..]),
            Err(KeyringError::DecryptionFailed)
        ));
        assert!(pss.asymmetric_decrypt(None, &ct).is_err());
    }

    /// Project Wycheproof's RSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt) and ECDSA P-384
    /// (SHA-384, DER) verification vectors through `Public::verify`, the verifier behind
    /// `Verify` (softhsm-tests/wycheproof/README.md). `valid` must verify, `invalid` must not;
    /// `acceptable` may go either way and is counted.
    #[test]
    fn wycheproof_verification() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-tests/wycheproof");
        let hex = |v: &serde_json::Value| {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(v.as_str().unwrap().as_bytes())
                .unwrap()
        };
        for file in [
            "rsa_pss_2048_sha256_mgf1_32_test.json",
            "rsa_pss_4096_sha256_mgf1_32_test.json",
            "ecdsa_secp384r1_sha384_test.json",
        ] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let set: serde_json::Value = serde_json::from_str(&text).unwrap();
            let (mut valid, mut invalid, mut acceptable) = (0, 0, 0);
            for g in set["testGroups"].as_array().unwrap() {
                let public = if file.starts_with("ecdsa") {
                    Public::from_bytes(
                        Algorithm::EcdsaP384Sha384,
                        &hex(&g["publicKey"]["uncompressed"]),
                    )
                } else {
                    let alg = match g["keySize"].as_u64() {
                        Some(2048) => Algorithm::RsaSignPss2048Sha256,
                        _ => Algorithm::RsaSignPss4096Sha256,
                    };
                    assert_eq!(g["sLen"].as_u64(), Some(32));
                    Public::from_bytes(alg, &hex(&g["publicKeyDer"]))
                }
                .unwrap_or_else(|| panic!("{file}: a group's public key"));
                for t in g["tests"].as_array().unwrap() {
                    let (msg, sig) = (hex(&t["msg"]), hex(&t["sig"]));
                    let got = public.verify(SignInput::Message(&msg), &sig).unwrap();
                    let id = &t["tcId"];
                    match t["result"].as_str().unwrap() {
                        "valid" => {
                            assert!(got, "{file} #{id} must verify: {}", t["comment"]);
                            valid += 1;
                        }
                        "invalid" => {
                            assert!(!got, "{file} #{id} must not verify: {}", t["comment"]);
                            invalid += 1;
                        }
                        _ => acceptable += 1,
                    }
                }
            }
            assert!(valid > 0 && invalid > 0, "{file}");
            // Every vector the file declares was run: none lost on the way.
            let count = set["numberOfTests"].as_u64().unwrap();
            assert_eq!(
                valid + invalid + acceptable,
                count,
                "{file}: {valid} {invalid} {acceptable}"
            );
        }
    }

    /// NIST GCM test vector (gcmEncryptExtIV256.rsp, Count 0 of the 96-bit IV, 128-bit
    /// tag, 128-bit PT, 128-bit AAD set) through our AES-GCM `Secret`.
    #[test]
    fn aes_256_gcm_known_answer() {
        let hex = |s: &str| data_encoding::HEXLOWER.decode(s.as_bytes()).unwrap();
        let key = hex("92e11dcdaa866f5ce790fd24501f92509aacf4cb8b1339d50c9c1240935dd08b");
        let iv: [u8; 12] = hex("ac93a1a6145299bde902f21a").try_into().unwrap();
        let pt = hex("2d71bcfa914e4ac045b2aa60955fad24");
        let aad = hex("1e0889016f67601c8ebea4943bc23ad6");
        let ct = hex("8995ae2e6df3dbf96fac7b7137bae67f");
        let tag = hex("eca5aa77d51d4a0a14d9c51e1da474ab");
        let cipher = Aes256Gcm::new_from_slice(&key).unwrap();
        let secret = Secret::Aes(Box::new(cipher));
        let mut out = Vec::new();
        secret.encrypt_into(None, &iv, &aad, &pt, &mut out).unwrap();
        assert_eq!(out, [ct.clone(), tag.clone()].concat());
        let back = secret.decrypt(None, &iv, &aad, &out).unwrap();
        assert_eq!(*back, pt);
        let mut tampered = out.clone();
        tampered[0] ^= 1;
        assert!(matches!(
            secret.decrypt(None, &iv, &aad, &tampered),
            Err(KeyringError::DecryptionFailed)
        ));
        assert!(matches!(
            secret.decrypt(None, &iv, b"other", &out),
            Err(KeyringError::DecryptionFailed)
        ));
    }
}
