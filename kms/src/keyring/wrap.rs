//! The customer's side of bring-your-own-key: wrapping material with the import
//! parameters' public key, as `kms key import --material` does on the customer's machine
//! (docs/byok.md gives the same with openssl).

use aes_gcm::aead::KeyInit as _;
use rsa::pkcs8::DecodePublicKey as _;
use zeroize::Zeroizing;

use super::import::Wrapping;
use super::material;
use super::model::Algorithm;

/// Why material could not be wrapped.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    /// The wrapping key is not an RSA-4096 public key in PEM.
    #[error("the wrapping key is not an RSA 4096 public key (PEM)")]
    WrappingKey,
    /// The material does not fit the wrapping algorithm.
    #[error("{0}")]
    Material(&'static str),
    /// The OS random source failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
}

/// Reads material as a file holds it: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) is
/// converted to DER; anything else is taken as it is (raw key bytes, or PKCS#8 DER).
pub fn material_bytes(file: &[u8]) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    if file.starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(file)
            .map_err(|_| WrapError::Material("the PEM file is not text"))?;
        let (label, doc) = p256::pkcs8::SecretDocument::from_pem(text)
            .map_err(|_| WrapError::Material("the PEM file is not one PKCS#8 private key"))?;
        if label != "PRIVATE KEY" {
            return Err(WrapError::Material(
                "the PEM file must be a PKCS#8 \"PRIVATE KEY\" (openssl pkcs8 -topk8 -nocrypt converts others)",
            ));
        }
        return Ok(Zeroizing::new(doc.as_bytes().to_vec()));
    }
    Ok(Zeroizing::new(file.to_vec()))
}

/// The public key (SubjectPublicKeyInfo PEM) of asymmetric material for `algorithm`; `None`
/// for symmetric keys. An error when the material is not what the algorithm needs.
pub fn material_public_pem(
    algorithm: Algorithm,
    material: &[u8],
) -> Result<Option<String>, WrapError> {
    let secret = material::secret_from_material(algorithm, material)
        .ok_or(WrapError::Material(material::material_problem(algorithm)))?;
    match secret.public() {
        Some(p) => p
            .to_pem()
            .map(Some)
            .map_err(|_| WrapError::Material("cannot encode the public key")),
        None => Ok(None),
    }
}

/// Wraps `material` with the wrapping public key (PEM) the way `wrapping` says.
pub fn wrap(wrapping_pem: &str, wrapping: Wrapping, material: &[u8]) -> Result<Vec<u8>, WrapError> {
    let key = rsa::PublicKey::from_public_key_pem(wrapping_pem.trim())
        .map_err(|_| WrapError::WrappingKey)?;
    if rsa::traits::PublicKeyParts::size(&key) != 512 {
        return Err(WrapError::WrappingKey);
    }
    let oaep = |pt: &[u8]| {
        key.encrypt(&mut getrandom::SysRng, rsa::Oaep::<sha2::Sha256>::new(), pt)
            .map_err(|_| WrapError::Randomness)
    };
    match wrapping {
        Wrapping::RsaesOaepSha256 => {
            if material.len() > 32 {
                return Err(WrapError::Material(
                    "RSAES_OAEP_SHA_256 carries at most 32 bytes: use RSA_AES_KEY_WRAP_SHA_256",
                ));
            }
            oaep(material)
        }
        Wrapping::RsaAesKeyWrapSha256 => {
            let mut kek = Zeroizing::new([0u8; 32]);
            getrandom::fill(kek.as_mut_slice()).map_err(|_| WrapError::Randomness)?;
            let kwp = aes_kw::KwpAes256::new_from_slice(kek.as_slice())
                .map_err(|_| WrapError::Randomness)?;
            let mut body = vec![0u8; material.len().div_ceil(8) * 8 + 8];
            let body_len = kwp
                .wrap_key(material, &mut body)
                .map_err(|_| WrapError::Material("the material cannot be wrapped (empty?)"))?
                .len();
            body.truncate(body_len);
            let mut out = oaep(kek.as_slice())?;
            out.extend_from_slice(&body);
            Ok(out)
        }
    }
}
