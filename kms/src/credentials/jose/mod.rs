//! JOSE for JWT-SVIDs: JWKs of keyring keys, compact JWS signing and verification.
//!
//! The SPIFFE JWT-SVID profile narrows JWS to what this module accepts and produces: a
//! header of only `alg`, `kid` and `typ` (`"JWT"`, or `"JOSE"` when reading), the compact
//! serialization, and the algorithms ES256, ES384, RS256 and PS256 ([`Alg`]).
//!
//! Signing never touches a private key here: [`sign_compact`] builds the signing input and
//! hands it to a closure (the keyring, possibly an HSM), then checks the shape of what came
//! back. Verification ([`verify_compact`]) treats the token as hostile: its length is bounded
//! before any work, every segment is strict unpadded base64url, the header may name nothing
//! but `alg`, `kid` and `typ`, the algorithm must be the one of the key the `kid` names (no
//! `none`, no HMAC, no algorithm confusion), and JSON objects with a duplicated member are
//! refused, since two parsers may keep different copies.
//!
//! Errors say what is wrong without echoing the token: no token bytes and no claim values
//! appear in a [`JoseError`]; a `kid` is shown only when short and printable ASCII.

use std::fmt;

use data_encoding::BASE64URL_NOPAD;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::keyring::model::Algorithm;

/// The longest token [`verify_compact`] reads, in bytes; a longer one is refused unread.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The smallest RSA modulus, in bits, a [`Jwk`] accepts.
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// The longest `kid` an error message may show.
const MAX_SHOWN_KID: usize = 64;

/// A JWS algorithm kms signs JWTs with (RFC 7518 §3.1 names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Alg {
    /// ECDSA over P-256 with SHA-256; the signature is `r || s`, 64 bytes.
    Es256,
    /// ECDSA over P-384 with SHA-384; the signature is `r || s`, 96 bytes.
    Es384,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt (RFC 7518 §3.5).
    Ps256,
}

impl Alg {
    /// The name JOSE gives the algorithm (`"ES256"`, ...).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
        }
    }

    /// The algorithm of a JOSE name; exact, case-sensitive match only.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(Self::Es256),
            "ES384" => Some(Self::Es384),
            "RS256" => Some(Self::Rs256),
            "PS256" => Some(Self::Ps256),
            _ => None,
        }
    }

    /// The JWS algorithm a keyring key of `algorithm` signs with, if it can sign JWTs.
    pub(crate) fn of(algorithm: Algorithm) -> Option<Self> {
        // No wildcard: a new keyring algorithm must decide whether it signs JWTs.
        match algorithm {
            Algorithm::EcdsaP256Sha256 => Some(Self::Es256),
            Algorithm::EcdsaP384Sha384 => Some(Self::Es384),
            Algorithm::RsaSignPss2048Sha256
            | Algorithm::RsaSignPss3072Sha256
            | Algorithm::RsaSignPss4096Sha256 => Some(Self::Ps256),
            Algorithm::RsaSignPkcs12048Sha256
            | Algorithm::RsaSignPkcs13072Sha256
            | Algorithm::RsaSignPkcs14096Sha256 => Some(Self::Rs256),
            Algorithm::Aes256Gcm
            | Algorithm::Ed25519
            | Algorithm::HmacSha256
            | Algorithm::RsaDecryptOaep2048Sha256
            | Algorithm::RsaDecryptOaep3072Sha256
            | Algorithm::RsaDecryptOaep4096Sha256 => None,
        }
    }

    /// The exact length of a signature, for the algorithms whose length is fixed (ES*).
    fn fixed_signature_len(self) -> Option<usize> {
        match self {
            Self::Es256 => Some(64),
            Self::Es384 => Some(96),
            Self::Rs256 | Self::Ps256 => None,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A segment of a compact JWS, named in errors instead of its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Segment {
    /// The protected header, the first segment.
    Header,
    /// The payload (the claims), the second segment.
    Payload,
    /// The signature, the third segment.
    Signature,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::Payload => "payload",
            Self::Signature => "signature",
        })
    }
}

/// A `kid` from a token as an error may show it: only when at most 64 printable ASCII
/// characters, otherwise not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ShownKid(Option<String>);

impl ShownKid {
    /// The `kid` if it is safe to show.
    fn new(kid: &str) -> Self {
        let printable = kid.bytes().all(|b| (0x20..=0x7e).contains(&b));
        Self((printable && kid.len() <= MAX_SHOWN_KID).then(|| kid.to_owned()))
    }
}

impl fmt::Display for ShownKid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(kid) => write!(f, "{kid:?}"),
            None => f.write_str("(not shown)"),
        }
    }
}

/// Why a key could not become a [`Jwk`], or why a token was refused.
///
/// The key variants come from our own configuration; the token variants from untrusted
/// input. None carries token bytes or claim values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum JoseError {
    /// The PEM is not an SPKI public key of the type the algorithm needs.
    #[error("the public key is not a {alg} key")]
    KeyNotForAlg {
        /// The algorithm the key was meant for.
        alg: Alg,
    },
    /// The RSA modulus is shorter than [`MIN_RSA_BITS`].
    #[error("the RSA key has {bits} bits, fewer than the {MIN_RSA_BITS} required")]
    RsaKeyTooSmall {
        /// The modulus length in bits.
        bits: usize,
    },
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("the token is {len} bytes, longer than the {MAX_TOKEN_LEN} allowed")]
    TooLong {
        /// The token's length in bytes.
        len: usize,
    },
    /// The token is not three segments separated by dots.
    #[error("the token is not three dot-separated segments")]
    Segments,
    /// A segment is not strict base64url without padding.
    #[error("the token's {0} is not unpadded base64url")]
    Base64(Segment),
    /// The header or payload is not JSON.
    #[error("the token's {0} is not JSON")]
    Json(Segment),
    /// The header or payload is JSON but not an object.
    #[error("the token's {0} is not a JSON object")]
    NotObject(Segment),
    /// The header or payload names a member twice.
    #[error("the token's {0} names a member twice")]
    DuplicateMember(Segment),
    /// The header has a member other than `alg`, `kid` and `typ`.
    #[error("the token's header has a member other than alg, kid and typ")]
    ExtraHeaderMember,
    /// The header's `typ` is neither `"JWT"` nor `"JOSE"`.
    #[error("the token's header typ is neither JWT nor JOSE")]
    Type,
    /// The header has no `kid` string.
    #[error("the token's header has no kid")]
    MissingKid,
    /// The header has no `alg` string.
    #[error("the token's header has no alg")]
    MissingAlg,
    /// The header's `alg` is `none`: an unsecured JWS.
    #[error("the token is unsecured (alg none)")]
    Unsecured,
    /// The header's `alg` is not one of [`Alg`] (HMAC among others).
    #[error("the token's alg is not one kms accepts")]
    UnsupportedAlg,
    /// No key has the header's `kid`.
    #[error("no key has the token's kid {kid}")]
    UnknownKid {
        /// The `kid`, if safe to show.
        kid: ShownKid,
    },
    /// The key the `kid` names is for another algorithm than the header's.
    #[error("the token's alg {header} is not its key's {key}")]
    AlgMismatch {
        /// The header's algorithm.
        header: Alg,
        /// The algorithm of the key the `kid` names.
        key: Alg,
    },
    /// An ES* signature is not exactly `r || s`.
    #[error("the {alg} signature is {len} bytes, not {expected}")]
    SignatureLength {
        /// The header's algorithm.
        alg: Alg,
        /// The signature's length.
        len: usize,
        /// The length the algorithm requires.
        expected: usize,
    },
    /// The signature does not verify under the key.
    #[error("the token's signature does not verify")]
    BadSignature,
}

/// Why [`sign_compact`] produced no token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SignError<E> {
    /// The claims could not be serialized.
    #[error("the claims cannot be encoded as JSON")]
    Encode(#[source] serde_json::Error),
    /// The signer failed.
    #[error("the signer failed")]
    Signer(#[source] E),
    /// The signer returned a signature of the wrong length for the algorithm.
    #[error("the signer returned {len} bytes, {alg} signatures are {expected}")]
    SignatureLength {
        /// The algorithm.
        alg: Alg,
        /// The signature's length.
        len: usize,
        /// The length the algorithm requires.
        expected: usize,
    },
}

/// A parsed public key, the one verification uses.
#[derive(Clone, Debug)]
enum PublicKey {
    /// A P-256 key (ES256).
    P256(p256::ecdsa::VerifyingKey),
    /// A P-384 key (ES384).
    P384(p384::ecdsa::VerifyingKey),
    /// An RSA key of at least [`MIN_RSA_BITS`] (RS256, PS256).
    Rsa(Box<rsa::PublicKey>),
}

/// The members RFC 7518 requires of a key, base64url-encoded.
enum Members {
    /// An EC key (RFC 7518 §6.2.1).
    Ec {
        /// `"P-256"` or `"P-384"`.
        crv: &'static str,
        /// The affine x coordinate, fixed size.
        x: String,
        /// The affine y coordinate, fixed size.
        y: String,
    },
    /// An RSA key (RFC 7518 §6.3.1), big-endian without leading zeros.
    Rsa {
        /// The modulus.
        n: String,
        /// The public exponent.
        e: String,
    },
}

/// A public key as a JWK (RFC 7517/7518), with its key id: the RFC 7638 thumbprint
/// (SHA-256, base64url) of its required members.
#[derive(Clone, Debug)]
pub(crate) struct Jwk {
    /// The one algorithm the key verifies.
    alg: Alg,
    /// The RFC 7638 thumbprint.
    kid: String,
    /// The key itself.
    key: PublicKey,
}

impl Jwk {
    /// The JWK of an SPKI PEM public key, for `alg`; refuses a key of another type or curve,
    /// and an RSA key under [`MIN_RSA_BITS`].
    pub(crate) fn from_spki_pem(pem: &str, alg: Alg) -> Result<Self, JoseError> {
        let unfit = JoseError::KeyNotForAlg { alg };
        match alg {
            Alg::Es256 => {
                let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem).map_err(|_| unfit)?;
                Ok(Self::new(alg, PublicKey::P256(key)))
            }
            Alg::Es384 => {
                let key = p384::ecdsa::VerifyingKey::from_public_key_pem(pem).map_err(|_| unfit)?;
                Ok(Self::new(alg, PublicKey::P384(key)))
            }
            Alg::Rs256 | Alg::Ps256 => {
                let key = rsa::PublicKey::from_public_key_pem(pem).map_err(|_| unfit)?;
                Self::from_rsa(key, alg)
            }
        }
    }

    /// The JWK of an RSA key, for RS256 or PS256.
    fn from_rsa(key: rsa::PublicKey, alg: Alg) -> Result<Self, JoseError> {
        if alg.fixed_signature_len().is_some() {
            return Err(JoseError::KeyNotForAlg { alg });
        }
        let n = key.n_bytes();
        let bits = n.first().map_or(0, |top| {
            (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
        });
        if bits < MIN_RSA_BITS {
            return Err(JoseError::RsaKeyTooSmall { bits });
        }
        Ok(Self::new(alg, PublicKey::Rsa(Box::new(key))))
    }

    /// A JWK whose key already fits `alg`; computes the kid.
    fn new(alg: Alg, key: PublicKey) -> Self {
        let mut jwk = Self {
            alg,
            kid: String::new(),
            key,
        };
        // RFC 7638 §3.2: the required members only, lexicographic order, no whitespace.
        // Every value is base64url or a fixed curve name: nothing to escape.
        let canonical = match jwk.members() {
            Members::Ec { crv, x, y } => {
                format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
            Members::Rsa { n, e } => format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#),
        };
        jwk.kid = BASE64URL_NOPAD.encode(&Sha256::digest(canonical.as_bytes()));
        jwk
    }

    /// The key id: the RFC 7638 SHA-256 thumbprint, base64url.
    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm the key verifies.
    pub(crate) fn alg(&self) -> Alg {
        self.alg
    }

    /// The JWK as a JWKS lists it: `kty`, `kid`, `alg`, `use` (`use_`: `"sig"` or
    /// `"jwt-svid"`), and the key's members (EC: `crv`, `x`, `y`; RSA: `n`, `e`).
    pub(crate) fn to_json(&self, use_: &str) -> Value {
        let mut out = Map::new();
        let kty = match self.key {
            PublicKey::P256(_) | PublicKey::P384(_) => "EC",
            PublicKey::Rsa(_) => "RSA",
        };
        out.insert("kty".into(), kty.into());
        out.insert("kid".into(), self.kid.clone().into());
        out.insert("alg".into(), self.alg.name().into());
        out.insert("use".into(), use_.into());
        match self.members() {
            Members::Ec { crv, x, y } => {
                out.insert("crv".into(), crv.into());
                out.insert("x".into(), x.into());
                out.insert("y".into(), y.into());
            }
            Members::Rsa { n, e } => {
                out.insert("n".into(), n.into());
                out.insert("e".into(), e.into());
            }
        }
        Value::Object(out)
    }

    /// The key's required members.
    fn members(&self) -> Members {
        /// `x` and `y` of an uncompressed SEC1 point `04 || x || y`.
        fn coordinates(sec1: &[u8]) -> (String, String) {
            let xy = sec1.get(1..).unwrap_or_default();
            let (x, y) = xy.split_at(xy.len() / 2);
            (BASE64URL_NOPAD.encode(x), BASE64URL_NOPAD.encode(y))
        }
        match &self.key {
            PublicKey::P256(k) => {
                let (x, y) = coordinates(k.to_sec1_point(false).as_bytes());
                Members::Ec { crv: "P-256", x, y }
            }
            PublicKey::P384(k) => {
                let (x, y) = coordinates(k.to_sec1_point(false).as_bytes());
                Members::Ec { crv: "P-384", x, y }
            }
            PublicKey::Rsa(k) => Members::Rsa {
                n: BASE64URL_NOPAD.encode(&k.n_bytes()),
                e: BASE64URL_NOPAD.encode(&k.e_bytes()),
            },
        }
    }

    /// Whether `signature` is this key's over `input`.
    fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            // Low-S only: a token has one signature, so that a second string of the same
            // token (its `s` negated) is not another valid token.
            PublicKey::P256(k) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| sig.normalize_s() == sig && k.verify(input, &sig).is_ok()),
            PublicKey::P384(k) => p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| sig.normalize_s() == sig && k.verify(input, &sig).is_ok()),
            PublicKey::Rsa(k) => {
                let digest = Sha256::digest(input);
                let checked = match self.alg {
                    Alg::Rs256 => k.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, signature),
                    // RFC 7518 §3.5: the salt is as long as the hash, 32 bytes.
                    Alg::Ps256 => {
                        k.verify(rsa::Pss::<Sha256>::new_with_salt(32), &digest, signature)
                    }
                    Alg::Es256 | Alg::Es384 => return false,
                };
                checked.is_ok()
            }
        }
    }
}

/// The protected header kms writes: exactly these members, in this order.
#[derive(serde::Serialize)]
struct Header<'a> {
    /// The algorithm's JOSE name.
    alg: &'static str,
    /// The signing key's id.
    kid: &'a str,
    /// Always `"JWT"`.
    typ: &'static str,
}

/// Signs `claims` as a compact JWS with header `{"alg","kid","typ":"JWT"}`.
///
/// `sign` receives the signing input (ASCII `b64(header).b64(payload)`) and returns the
/// signature as JWS wants it: for ES*, `r || s` of fixed size (64 or 96 bytes, checked); for
/// RS256 and PS256, the RSA signature.
pub(crate) fn sign_compact<E>(
    alg: Alg,
    kid: &str,
    claims: &Map<String, Value>,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, SignError<E>> {
    let header = serde_json::to_vec(&Header {
        alg: alg.name(),
        kid,
        typ: "JWT",
    })
    .map_err(SignError::Encode)?;
    let payload = serde_json::to_vec(claims).map_err(SignError::Encode)?;
    let mut token = BASE64URL_NOPAD.encode(&header);
    token.push('.');
    token.push_str(&BASE64URL_NOPAD.encode(&payload));
    let signature = sign(token.as_bytes()).map_err(SignError::Signer)?;
    if let Some(expected) = alg.fixed_signature_len()
        && signature.len() != expected
    {
        return Err(SignError::SignatureLength {
            alg,
            len: signature.len(),
            expected,
        });
    }
    // Low-S, the one form [`verify_compact`] accepts: a signer (an HSM) may make either.
    let signature = match alg {
        Alg::Es256 => p256::ecdsa::Signature::from_slice(&signature)
            .map(|s| s.normalize_s().to_bytes().to_vec())
            .unwrap_or(signature),
        Alg::Es384 => p384::ecdsa::Signature::from_slice(&signature)
            .map(|s| s.normalize_s().to_bytes().to_vec())
            .unwrap_or(signature),
        Alg::Rs256 | Alg::Ps256 => signature,
    };
    token.push('.');
    token.push_str(&BASE64URL_NOPAD.encode(&signature));
    Ok(token)
}

/// Verifies a compact JWS against `keys`: returns the claims when the signature verifies
/// under the key whose `kid` the header names, for the header's `alg`.
pub(crate) fn verify_compact(token: &str, keys: &[Jwk]) -> Result<Map<String, Value>, JoseError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JoseError::TooLong { len: token.len() });
    }
    if token.bytes().filter(|&b| b == b'.').count() != 2 {
        return Err(JoseError::Segments);
    }
    let Some((input, signature)) = token.rsplit_once('.') else {
        return Err(JoseError::Segments);
    };
    let Some((header, payload)) = input.split_once('.') else {
        return Err(JoseError::Segments);
    };

    let header = object(&decode(header, Segment::Header)?, Segment::Header)?;
    if header
        .keys()
        .any(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JoseError::ExtraHeaderMember);
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(_) => return Err(JoseError::Type),
    }
    let Some(Value::String(kid)) = header.get("kid") else {
        return Err(JoseError::MissingKid);
    };
    let alg = match header.get("alg") {
        Some(Value::String(name)) if name == "none" => return Err(JoseError::Unsecured),
        Some(Value::String(name)) => Alg::from_name(name).ok_or(JoseError::UnsupportedAlg)?,
        _ => return Err(JoseError::MissingAlg),
    };

    // The same key may be listed for two algorithms (RS256 and PS256 share a thumbprint).
    let mut named = keys.iter().filter(|k| k.kid == *kid).peekable();
    let Some(first) = named.peek().map(|k| k.alg) else {
        return Err(JoseError::UnknownKid {
            kid: ShownKid::new(kid),
        });
    };
    let Some(key) = named.find(|k| k.alg == alg) else {
        return Err(JoseError::AlgMismatch {
            header: alg,
            key: first,
        });
    };

    // Every segment is decoded before the signature is checked; the payload is parsed after.
    let payload = decode(payload, Segment::Payload)?;
    let signature = decode(signature, Segment::Signature)?;
    if let Some(expected) = alg.fixed_signature_len()
        && signature.len() != expected
    {
        return Err(JoseError::SignatureLength {
            alg,
            len: signature.len(),
            expected,
        });
    }
    if !key.verifies(input.as_bytes(), &signature) {
        return Err(JoseError::BadSignature);
    }
    // JSON is parsed only once authenticated.
    object(&payload, Segment::Payload)
}

/// A segment's bytes: strict base64url, no padding, canonical trailing bits.
fn decode(segment: &str, which: Segment) -> Result<Vec<u8>, JoseError> {
    BASE64URL_NOPAD
        .decode(segment.as_bytes())
        .map_err(|_| JoseError::Base64(which))
}

/// A JSON object with no member named twice.
fn object(bytes: &[u8], which: Segment) -> Result<Map<String, Value>, JoseError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|_| JoseError::Json(which))?;
    if !value.is_object() {
        return Err(JoseError::NotObject(which));
    }
    // `Value` keeps the last of duplicated members silently; parse again, refusing them.
    serde_json::from_slice::<UniqueObject>(bytes)
        .map(|unique| unique.0)
        .map_err(|_| JoseError::DuplicateMember(which))
}

/// A JSON object whose members all have distinct names (at the top level).
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Builds the map, failing at the first repeated name.
        struct Unique;
        impl<'de> Visitor<'de> for Unique {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object without duplicate members")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some(name) = access.next_key::<String>()? {
                    if map.contains_key(&name) {
                        return Err(de::Error::custom("duplicate member"));
                    }
                    let value: Value = access.next_value()?;
                    map.insert(name, value);
                }
                Ok(UniqueObject(map))
            }
        }
        deserializer.deserialize_map(Unique)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
