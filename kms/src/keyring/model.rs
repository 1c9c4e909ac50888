//! Keys and versions as stored: the metadata, its validation, and its authenticated record.

use std::collections::BTreeMap;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::KeyringError;

/// The key record's schema version.
pub(crate) const KEY_SCHEMA: u32 = 1;
/// Longest key name.
pub(crate) const MAX_NAME_LEN: usize = 128;
/// Most labels per key.
pub(crate) const MAX_LABELS: usize = 64;

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Purpose {
    /// Encrypt, Decrypt, ReEncrypt, GenerateDataKey.
    EncryptDecrypt,
    /// Sign, Verify, GetPublicKey.
    SignVerify,
    /// Mac, VerifyMac.
    Mac,
    /// AsymmetricDecrypt, GetPublicKey (callers encrypt with the public key anywhere).
    AsymmetricDecrypt,
}

/// The algorithm of every version of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Algorithm {
    /// AES-256-GCM, 96-bit random nonces.
    Aes256Gcm,
    /// Ed25519 (pure, RFC 8032).
    Ed25519,
    /// ECDSA over P-256 with SHA-256.
    EcdsaP256Sha256,
    /// ECDSA over P-384 with SHA-384.
    EcdsaP384Sha384,
    /// HMAC-SHA256.
    HmacSha256,
    /// RSASSA-PSS, 2048-bit modulus, SHA-256, MGF1-SHA-256, 32-byte salt.
    #[serde(rename = "RSA_SIGN_PSS_2048_SHA256")]
    RsaSignPss2048Sha256,
    /// RSASSA-PSS, 3072-bit modulus.
    #[serde(rename = "RSA_SIGN_PSS_3072_SHA256")]
    RsaSignPss3072Sha256,
    /// RSASSA-PSS, 4096-bit modulus.
    #[serde(rename = "RSA_SIGN_PSS_4096_SHA256")]
    RsaSignPss4096Sha256,
    /// RSASSA-PKCS1-v1_5, 2048-bit modulus, SHA-256.
    #[serde(rename = "RSA_SIGN_PKCS1_2048_SHA256")]
    RsaSignPkcs12048Sha256,
    /// RSASSA-PKCS1-v1_5, 3072-bit modulus.
    #[serde(rename = "RSA_SIGN_PKCS1_3072_SHA256")]
    RsaSignPkcs13072Sha256,
    /// RSASSA-PKCS1-v1_5, 4096-bit modulus.
    #[serde(rename = "RSA_SIGN_PKCS1_4096_SHA256")]
    RsaSignPkcs14096Sha256,
    /// RSAES-OAEP, 2048-bit modulus, SHA-256, MGF1-SHA-256, empty label.
    #[serde(rename = "RSA_DECRYPT_OAEP_2048_SHA256")]
    RsaDecryptOaep2048Sha256,
    /// RSAES-OAEP, 3072-bit modulus.
    #[serde(rename = "RSA_DECRYPT_OAEP_3072_SHA256")]
    RsaDecryptOaep3072Sha256,
    /// RSAES-OAEP, 4096-bit modulus.
    #[serde(rename = "RSA_DECRYPT_OAEP_4096_SHA256")]
    RsaDecryptOaep4096Sha256,
}

pub use crate::hsm::RsaScheme;

impl Algorithm {
    /// Every algorithm, in the API's order.
    pub const ALL: [Algorithm; 14] = [
        Self::Aes256Gcm,
        Self::Ed25519,
        Self::EcdsaP256Sha256,
        Self::HmacSha256,
        Self::EcdsaP384Sha384,
        Self::RsaSignPss2048Sha256,
        Self::RsaSignPss3072Sha256,
        Self::RsaSignPss4096Sha256,
        Self::RsaSignPkcs12048Sha256,
        Self::RsaSignPkcs13072Sha256,
        Self::RsaSignPkcs14096Sha256,
        Self::RsaDecryptOaep2048Sha256,
        Self::RsaDecryptOaep3072Sha256,
        Self::RsaDecryptOaep4096Sha256,
    ];

    /// An RSA algorithm's scheme and modulus size in bits.
    pub fn rsa(self) -> Option<(RsaScheme, usize)> {
        match crate::keyring::hsm_kind(self) {
            crate::hsm::HsmKeyKind::Rsa(scheme, bits) => Some((scheme, bits)),
            _ => None,
        }
    }

    /// Whether versions have a public key (and `GetPublicKey` answers).
    pub fn is_asymmetric(self) -> bool {
        matches!(
            self,
            Self::Ed25519 | Self::EcdsaP256Sha256 | Self::EcdsaP384Sha384
        ) || self.rsa().is_some()
    }

    /// The purpose this algorithm serves.
    pub fn purpose(self) -> Purpose {
        match self {
            Self::Aes256Gcm => Purpose::EncryptDecrypt,
            Self::Ed25519 | Self::EcdsaP256Sha256 | Self::EcdsaP384Sha384 => Purpose::SignVerify,
            Self::HmacSha256 => Purpose::Mac,
            _ => match self.rsa() {
                Some((RsaScheme::Oaep, _)) => Purpose::AsymmetricDecrypt,
                _ => Purpose::SignVerify,
            },
        }
    }

    /// A stable name, used in key derivation info.
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "AES_256_GCM",
            Self::Ed25519 => "ED25519",
            Self::EcdsaP256Sha256 => "ECDSA_P256_SHA256",
            Self::EcdsaP384Sha384 => "ECDSA_P384_SHA384",
            Self::HmacSha256 => "HMAC_SHA256",
            Self::RsaSignPss2048Sha256 => "RSA_SIGN_PSS_2048_SHA256",
            Self::RsaSignPss3072Sha256 => "RSA_SIGN_PSS_3072_SHA256",
            Self::RsaSignPss4096Sha256 => "RSA_SIGN_PSS_4096_SHA256",
            Self::RsaSignPkcs12048Sha256 => "RSA_SIGN_PKCS1_2048_SHA256",
            Self::RsaSignPkcs13072Sha256 => "RSA_SIGN_PKCS1_3072_SHA256",
            Self::RsaSignPkcs14096Sha256 => "RSA_SIGN_PKCS1_4096_SHA256",
            Self::RsaDecryptOaep2048Sha256 => "RSA_DECRYPT_OAEP_2048_SHA256",
            Self::RsaDecryptOaep3072Sha256 => "RSA_DECRYPT_OAEP_3072_SHA256",
            Self::RsaDecryptOaep4096Sha256 => "RSA_DECRYPT_OAEP_4096_SHA256",
        }
    }
}

/// Where a key's material lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protection {
    /// Derived with HKDF-SHA256 beneath the root key (RSA: generated, and stored encrypted
    /// under a key so derived); in process memory while unsealed.
    Software,
    /// Generated inside the HSM, never extractable; every operation is a PKCS#11 call.
    Hsm,
}

/// Where a key's (or a version's) material comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Origin {
    /// Made by kms.
    #[default]
    Generated,
    /// Imported by the customer (bring your own key).
    External,
}

impl Origin {
    fn is_generated(&self) -> bool {
        *self == Self::Generated
    }
}

/// The parameters of the import a key of origin EXTERNAL awaits: the wrapping key in the
/// HSM (RSA 4096, decrypts only) and how long the import token is good for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportJob {
    /// Random (hex, 16 bytes); bound into the import token.
    pub id: String,
    /// The wrapping key's label in the token (`kms-import/<key id>/<job id>`).
    pub wrapping_label: String,
    /// The wrapping key's CKA_ID (hex).
    pub wrapping_id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds: the token is refused from then on.
    pub expires_at: u64,
}

/// A version's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VersionState {
    /// Usable for every operation of the key's purpose.
    Enabled,
    /// Refuses every operation; can be enabled again.
    Disabled,
    /// Refuses every operation; destroyed at `destroy_at` unless cancelled.
    ScheduledForDestruction {
        /// Unix seconds.
        destroy_at: u64,
    },
    /// The material is gone for good (salt erased / HSM object destroyed).
    Destroyed {
        /// Unix seconds.
        destroyed_at: u64,
    },
}

impl VersionState {
    /// The API name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Disabled => "DISABLED",
            Self::ScheduledForDestruction { .. } => "SCHEDULED_FOR_DESTRUCTION",
            Self::Destroyed { .. } => "DESTROYED",
        }
    }
}

/// One version of a key. Its `Debug` omits the salt and the stored material: destroying a version erases the salt,
/// and crypto-shredding holds only if no copy of it was ever written to a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionMeta {
    /// 1, 2, ...
    pub version: u32,
    /// Its state.
    pub state: VersionState,
    /// Unix seconds.
    pub created_at: u64,
    /// Software keys: the HKDF salt (hex, 32 bytes); erased on destruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// HSM keys: the token object's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_label: Option<String>,
    /// HSM keys: the token object's CKA_ID (hex, 16 random bytes), which tells it apart
    /// from any other object with its label. Absent in versions made before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_id: Option<String>,
    /// Asymmetric keys: the public key (hex; Ed25519 32 bytes, P-256 65-byte SEC1, RSA
    /// SubjectPublicKeyInfo DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Software keys that cannot be derived (RSA): the private key, PKCS#8 DER, encrypted
    /// under a key derived from the root key and the salt (hex, `nonce | ciphertext | tag`);
    /// erased with the salt on destruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub material: Option<String>,
    /// Imported (origin EXTERNAL) rather than made by kms.
    #[serde(default, skip_serializing_if = "Origin::is_generated")]
    pub origin: Origin,
}

impl VersionMeta {
    /// A new, enabled version made now, with nothing yet about its material.
    pub(crate) fn new(version: u32, created_at: u64, origin: Origin) -> Self {
        Self {
            version,
            state: VersionState::Enabled,
            created_at,
            salt: None,
            hsm_label: None,
            hsm_id: None,
            public_key: None,
            material: None,
            origin,
        }
    }
}

impl std::fmt::Debug for VersionMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionMeta")
            .field("version", &self.version)
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .field("salt", &self.salt.as_ref().map(|_| "<redacted>"))
            .field("hsm_label", &self.hsm_label)
            .field("hsm_id", &self.hsm_id)
            .field("public_key", &self.public_key)
            .field("material", &self.material.as_ref().map(|_| "<redacted>"))
            .field("origin", &self.origin)
            .finish()
    }
}

/// A key, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyMeta {
    /// Record schema.
    pub schema: u32,
    /// The name (unique, permanent).
    pub name: String,
    /// A random id (hex, 16 bytes), bound into key derivation and HSM labels.
    pub key_id: String,
    /// What the key is for; it follows from the algorithm.
    pub purpose: Purpose,
    /// The algorithm of every version, fixed at creation.
    pub algorithm: Algorithm,
    /// Protection level.
    pub protection: Protection,
    /// Unix seconds.
    pub created_at: u64,
    /// The version that encrypts and signs.
    pub primary: u32,
    /// Versions below this refuse to decrypt / verify.
    pub min_decryption_version: u32,
    /// Rotation period in seconds, if automatic rotation is on.
    pub rotation_period: Option<u64>,
    /// When automatic rotation is next due (Unix seconds).
    pub next_rotation_at: Option<u64>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Every version, in order.
    pub versions: Vec<VersionMeta>,
    /// GENERATED, or EXTERNAL: versions come only from imports.
    #[serde(default, skip_serializing_if = "Origin::is_generated")]
    pub origin: Origin,
    /// An EXTERNAL key's current import parameters, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_job: Option<ImportJob>,
}

impl KeyMeta {
    /// The version `v`.
    pub fn version(&self, v: u32) -> Option<&VersionMeta> {
        self.versions.iter().find(|m| m.version == v)
    }

    /// The number the next version gets.
    pub(crate) fn next_version(&self) -> Result<u32, KeyringError> {
        self.versions
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(KeyringError::NotAllowed(
                "the key has the maximum number of versions",
            ))
    }

    /// The version `v`, mutable.
    pub(crate) fn version_mut(&mut self, v: u32) -> Option<&mut VersionMeta> {
        self.versions.iter_mut().find(|m| m.version == v)
    }
}

/// Checks a key name: `[a-zA-Z0-9_.-]{1,128}`.
pub(crate) fn check_name(name: &str) -> Result<(), KeyringError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(KeyringError::BadName)
    }
}

/// Checks labels: at most 64, keys like names (1..=63 chars), values up to 256 chars.
pub(crate) fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), KeyringError> {
    if labels.len() > MAX_LABELS {
        return Err(KeyringError::BadLabels);
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if !key_ok || v.len() > 256 || v.chars().any(char::is_control) {
            return Err(KeyringError::BadLabels);
        }
    }
    Ok(())
}

/// The stored form: the record's bytes and their MAC.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    record: String,
    mac: String,
}

/// HMAC-SHA256 under `mac_key` over `domain`, `name`, a zero byte and `record`.
pub(crate) fn record_mac(
    mac_key: &[u8; 32],
    domain: &str,
    name: &str,
    record: &[u8],
) -> Result<Vec<u8>, KeyringError> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(mac_key)
        .map_err(|_| KeyringError::Internal("mac key"))?;
    mac.update(domain.as_bytes());
    mac.update(name.as_bytes());
    mac.update(&[0]);
    mac.update(record);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// The MAC domain of key records.
const KEY_DOMAIN: &str = "kms/v1/key-record/";

/// Stores `record` (JSON) with its MAC: HMAC-SHA256 under the metadata key over `domain`,
/// the record's `name` (its store key) and its bytes.
pub(crate) fn seal_record(
    record: &impl Serialize,
    domain: &str,
    name: &str,
    mac_key: &[u8; 32],
) -> Result<Vec<u8>, KeyringError> {
    let record =
        serde_json::to_string(record).map_err(|_| KeyringError::Internal("encode record"))?;
    let mac = record_mac(mac_key, domain, name, record.as_bytes())?;
    serde_json::to_vec(&Sealed {
        record,
        mac: data_encoding::HEXLOWER.encode(&mac),
    })
    .map_err(|_| KeyringError::Internal("encode record"))
}

/// Authenticates and parses what [`seal_record`] stored under `name`; `None` if anything
/// was changed, or the record was moved to another name or domain.
pub(crate) fn open_record<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    domain: &str,
    name: &str,
    mac_key: &[u8; 32],
) -> Result<Option<T>, KeyringError> {
    let Ok(sealed) = serde_json::from_slice::<Sealed>(bytes) else {
        return Ok(None);
    };
    let want = record_mac(mac_key, domain, name, sealed.record.as_bytes())?;
    let Ok(got) = data_encoding::HEXLOWER.decode(sealed.mac.as_bytes()) else {
        return Ok(None);
    };
    if subtle::ConstantTimeEq::ct_eq(want.as_slice(), got.as_slice()).unwrap_u8() != 1 {
        return Ok(None);
    }
    Ok(serde_json::from_str(&sealed.record).ok())
}

/// Encodes a key record with its MAC (HMAC-SHA256 under the metadata key over the domain,
/// the key name and the record).
pub fn encode(meta: &KeyMeta, mac_key: &[u8; 32]) -> Result<Vec<u8>, KeyringError> {
    seal_record(meta, KEY_DOMAIN, &meta.name, mac_key)
}

/// Decodes and authenticates a stored key record. Any change to the stored bytes, or a
/// record moved to another name, fails with [`KeyringError::Tampered`].
pub fn decode(name: &str, bytes: &[u8], mac_key: &[u8; 32]) -> Result<KeyMeta, KeyringError> {
    match open_record::<KeyMeta>(bytes, KEY_DOMAIN, name, mac_key)? {
        Some(meta) if meta.schema == KEY_SCHEMA && meta.name == name => Ok(meta),
        _ => Err(KeyringError::Tampered(name.to_owned())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn meta() -> KeyMeta {
        KeyMeta {
            schema: KEY_SCHEMA,
            name: "payments".into(),
            key_id: "00".repeat(16),
            purpose: Purpose::EncryptDecrypt,
            algorithm: Algorithm::Aes256Gcm,
            protection: Protection::Software,
            created_at: 1,
            primary: 1,
            min_decryption_version: 1,
            rotation_period: None,
            next_rotation_at: None,
            labels: BTreeMap::new(),
            versions: vec![VersionMeta {
                version: 1,
                state: VersionState::Enabled,
                created_at: 1,
                salt: Some("11".repeat(32)),
                hsm_label: None,
                hsm_id: None,
                public_key: None,
                material: Some("22".repeat(40)),
                origin: Origin::Generated,
            }],
            origin: Origin::Generated,
            import_job: None,
        }
    }

    #[test]
    fn debug_omits_the_salt() {
        let printed = format!("{:?}", meta());
        assert!(!printed.contains(&"11".repeat(32)), "{printed}");
        assert!(!printed.contains(&"22".repeat(40)), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "payments.v2", "A-b_c.9", &"x".repeat(128)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(129), "a\n"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_and_any_edit_is_detected() {
        let key = [7u8; 32];
        let bytes = encode(&meta(), &key).unwrap();
        assert_eq!(decode("payments", &bytes, &key).unwrap(), meta());
        // Another name, another MAC key.
        assert!(matches!(
            decode("other", &bytes, &key),
            Err(KeyringError::Tampered(_))
        ));
        assert!(matches!(
            decode("payments", &bytes, &[8u8; 32]),
            Err(KeyringError::Tampered(_))
        ));
        // Lowering min_decryption_version, or any other byte, in the stored text.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let edited = text.replace("\\\"primary\\\":1", "\\\"primary\\\":2");
        assert_ne!(edited, text);
        assert!(matches!(
            decode("payments", edited.as_bytes(), &key),
            Err(KeyringError::Tampered(_))
        ));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(decode("payments", &b, &key).is_err(), "flip at {i}");
        }
    }
}
