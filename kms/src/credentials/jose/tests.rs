//! JWS signing and verification: round trips, RFC 7638, and every refusal.

use std::convert::Infallible;
use std::sync::OnceLock;

use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use rsa::Generate as _;
use serde_json::json;

use data_encoding::BASE64URL_NOPAD;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::{
    Alg, JoseError, Jwk, MAX_TOKEN_LEN, Segment, ShownKid, SignError, decode, sign_compact,
    verify_compact,
};
use crate::keyring::model::Algorithm;

/// One RSA key per test run: generation is the slow part.
fn rsa_key() -> &'static rsa::PrivateKey {
    static KEY: OnceLock<rsa::PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap())
}

/// A test signer and its JWK.
enum TestKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Alg),
}

impl TestKey {
    fn new(alg: Alg) -> Self {
        match alg {
            Alg::Es256 => Self::P256(
                p256::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap(),
            ),
            Alg::Es384 => Self::P384(
                p384::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap(),
            ),
            Alg::Rs256 | Alg::Ps256 => Self::Rsa(alg),
        }
    }

    fn pem(&self) -> String {
        match self {
            Self::P256(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
            Self::P384(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
            Self::Rsa(_) => rsa_key().to_public_key().to_public_key_pem(LineEnding::LF),
        }
        .unwrap()
    }

    fn alg(&self) -> Alg {
        match self {
            Self::P256(_) => Alg::Es256,
            Self::P384(_) => Alg::Es384,
            Self::Rsa(alg) => *alg,
        }
    }

    fn jwk(&self) -> Jwk {
        Jwk::from_spki_pem(&self.pem(), self.alg()).unwrap()
    }

    /// The JWS signature over `input`, as the crates make it.
    fn sign(&self, input: &[u8]) -> Vec<u8> {
        match self {
            // Low-S, as the keyring signs.
            Self::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(input);
                sig.normalize_s().to_bytes().to_vec()
            }
            Self::P384(k) => {
                let sig: p384::ecdsa::Signature = k.sign(input);
                sig.normalize_s().to_bytes().to_vec()
            }
            Self::Rsa(alg) => {
                let digest = Sha256::digest(input);
                let mut rng = getrandom::SysRng;
                match alg {
                    Alg::Rs256 => rsa_key().sign_with_rng(
                        &mut rng,
                        rsa::Pkcs1v15Sign::new::<Sha256>(),
                        &digest,
                    ),
                    _ => rsa_key().sign_with_rng(&mut rng, rsa::Pss::<Sha256>::new(), &digest),
                }
                .unwrap()
            }
        }
    }

    /// A token signed by this key through `sign_compact`.
    fn token(&self, claims: &Map<String, Value>) -> String {
        let jwk = self.jwk();
        sign_compact(jwk.alg(), jwk.kid(), claims, |input| {
            Ok::<_, Infallible>(self.sign(input))
        })
        .unwrap()
    }

    /// A token of arbitrary header and payload bytes, correctly signed by this key.
    fn forge(&self, header: &[u8], payload: &[u8]) -> String {
        let input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(header),
            BASE64URL_NOPAD.encode(payload)
        );
        let sig = BASE64URL_NOPAD.encode(&self.sign(input.as_bytes()));
        format!("{input}.{sig}")
    }

    /// A token of this header (JSON) over the usual claims, correctly signed.
    fn forge_header(&self, header: Value) -> String {
        self.forge(
            header.to_string().as_bytes(),
            Value::Object(claims()).to_string().as_bytes(),
        )
    }
}

fn claims() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "sub": "spiffe://example.org/workload",
        "aud": ["service"],
        "exp": 1_900_000_000,
    }) else {
        unreachable!()
    };
    map
}

/// RFC 7638 §3.1: the thumbprint of the example RSA key (the value printed in the RFC;
/// also `sha256sum` + `basenc --base64url` of the canonical JSON).
#[test]
fn rfc7638_thumbprint() {
    let n = BASE64URL_NOPAD
        .decode(
            b"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        )
        .unwrap();
    let e = BASE64URL_NOPAD.decode(b"AQAB").unwrap();
    let key = rsa::PublicKey::new(
        rsa::BoxedUint::from_be_slice_vartime(&n),
        rsa::BoxedUint::from_be_slice_vartime(&e),
    )
    .unwrap();
    let jwk = Jwk::from_rsa(key, Alg::Rs256).unwrap();
    assert_eq!(jwk.kid(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    let json = jwk.to_json("sig");
    assert_eq!(json["kty"], "RSA");
    assert_eq!(json["e"], "AQAB");
    assert_eq!(json["alg"], "RS256");
    assert_eq!(json["use"], "sig");
    assert_eq!(json["kid"], "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    assert_eq!(json["n"].as_str().unwrap().len(), 342);
}

#[test]
fn names_round_trip_exactly() {
    for alg in [Alg::Es256, Alg::Es384, Alg::Rs256, Alg::Ps256] {
        assert_eq!(Alg::from_name(alg.name()), Some(alg));
    }
    for bad in ["es256", "none", "HS256", "EdDSA", "ES256 ", ""] {
        assert_eq!(Alg::from_name(bad), None, "{bad}");
    }
    assert_eq!(Alg::of(Algorithm::EcdsaP256Sha256), Some(Alg::Es256));
    assert_eq!(Alg::of(Algorithm::EcdsaP384Sha384), Some(Alg::Es384));
    assert_eq!(Alg::of(Algorithm::RsaSignPss3072Sha256), Some(Alg::Ps256));
    assert_eq!(Alg::of(Algorithm::RsaSignPkcs14096Sha256), Some(Alg::Rs256));
    assert_eq!(Alg::of(Algorithm::Ed25519), None);
    assert_eq!(Alg::of(Algorithm::HmacSha256), None);
    assert_eq!(Alg::of(Algorithm::RsaDecryptOaep2048Sha256), None);
}

#[test]
fn round_trip_every_alg() {
    for alg in [Alg::Es256, Alg::Es384, Alg::Rs256, Alg::Ps256] {
        let key = TestKey::new(alg);
        let jwk = key.jwk();
        let token = key.token(&claims());
        // The header is exactly alg, kid, typ, in that order.
        let header = token.split('.').next().unwrap();
        let header = String::from_utf8(BASE64URL_NOPAD.decode(header.as_bytes()).unwrap());
        assert_eq!(
            header.unwrap(),
            format!(r#"{{"alg":"{}","kid":"{}","typ":"JWT"}}"#, alg, jwk.kid())
        );
        let other = TestKey::new(alg);
        let keys = [other.jwk(), jwk];
        assert_eq!(verify_compact(&token, &keys).unwrap(), claims(), "{alg}");
    }
}

#[test]
fn jwk_json_of_ec_keys() {
    let json = TestKey::new(Alg::Es256).jwk().to_json("jwt-svid");
    assert_eq!(json["kty"], "EC");
    assert_eq!(json["crv"], "P-256");
    assert_eq!(json["use"], "jwt-svid");
    assert_eq!(json["alg"], "ES256");
    assert_eq!(json["x"].as_str().unwrap().len(), 43);
    assert_eq!(json["y"].as_str().unwrap().len(), 43);
    let json = TestKey::new(Alg::Es384).jwk().to_json("sig");
    assert_eq!(json["crv"], "P-384");
    assert_eq!(json["x"].as_str().unwrap().len(), 64);
    assert_eq!(json.as_object().unwrap().len(), 7);
}

#[test]
fn keys_must_match_their_alg() {
    let p256 = TestKey::new(Alg::Es256).pem();
    let p384 = TestKey::new(Alg::Es384).pem();
    let rsa = TestKey::new(Alg::Rs256).pem();
    let refused = |pem: &str, alg| {
        assert_eq!(
            Jwk::from_spki_pem(pem, alg).unwrap_err(),
            JoseError::KeyNotForAlg { alg }
        );
    };
    refused(&p384, Alg::Es256);
    refused(&rsa, Alg::Es256);
    refused(&p256, Alg::Es384);
    refused(&p256, Alg::Rs256);
    refused(&p384, Alg::Ps256);
    refused("not a pem", Alg::Ps256);
    assert!(Jwk::from_rsa(rsa_key().to_public_key(), Alg::Es256).is_err());

    let small = rsa::PrivateKey::new(&mut getrandom::SysRng, 1024).unwrap();
    let pem = small
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    assert_eq!(
        Jwk::from_spki_pem(&pem, Alg::Rs256).unwrap_err(),
        JoseError::RsaKeyTooSmall { bits: 1024 }
    );
}

#[test]
fn sign_checks_es_signature_length() {
    let err = sign_compact(Alg::Es256, "k", &claims(), |_| {
        Ok::<_, Infallible>(vec![1; 65])
    })
    .unwrap_err();
    assert!(matches!(
        err,
        SignError::SignatureLength {
            len: 65,
            expected: 64,
            ..
        }
    ));
    let err = sign_compact(Alg::Es384, "k", &claims(), |_| {
        Ok::<_, Infallible>(vec![1; 64])
    })
    .unwrap_err();
    assert!(matches!(
        err,
        SignError::SignatureLength { expected: 96, .. }
    ));
    let err = sign_compact(Alg::Rs256, "k", &claims(), |_| {
        Err::<Vec<u8>, _>("hsm down")
    });
    assert!(matches!(err, Err(SignError::Signer("hsm down"))));
}

#[test]
fn refuses_altered_payload_and_signature() {
    for alg in [Alg::Es256, Alg::Ps256] {
        let key = TestKey::new(alg);
        let keys = [key.jwk()];
        let token = key.token(&claims());
        let parts: Vec<&str> = token.split('.').collect();

        let mut other = claims();
        other.insert("sub".into(), "spiffe://example.org/admin".into());
        let payload = BASE64URL_NOPAD.encode(Value::Object(other).to_string().as_bytes());
        let altered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(
            verify_compact(&altered, &keys),
            Err(JoseError::BadSignature)
        );

        let mut sig = BASE64URL_NOPAD.decode(parts[2].as_bytes()).unwrap();
        let last = sig.len() - 1;
        sig[last] ^= 1;
        let altered = format!("{}.{}.{}", parts[0], parts[1], BASE64URL_NOPAD.encode(&sig));
        assert_eq!(
            verify_compact(&altered, &keys),
            Err(JoseError::BadSignature)
        );
    }
}

/// RFC 7518 §3.5: PS256's salt is 32 bytes; a PSS signature with another salt is refused.
#[test]
fn refuses_pss_with_another_salt() {
    let key = TestKey::new(Alg::Ps256);
    let jwk = key.jwk();
    let token = sign_compact(Alg::Ps256, jwk.kid(), &claims(), |input| {
        let digest = Sha256::digest(input);
        rsa_key().sign_with_rng(
            &mut getrandom::SysRng,
            rsa::Pss::<Sha256>::new_with_salt(20),
            &digest,
        )
    })
    .unwrap();
    assert_eq!(verify_compact(&token, &[jwk]), Err(JoseError::BadSignature));
}

#[test]
fn refuses_unsecured_hmac_and_unknown_algs() {
    let key = TestKey::new(Alg::Es256);
    let jwk = key.jwk();
    let keys = [key.jwk()];
    let kid = jwk.kid();
    // alg none with an empty signature, as an attacker sends it.
    let header = BASE64URL_NOPAD.encode(json!({"alg": "none", "kid": kid}).to_string().as_bytes());
    let payload = BASE64URL_NOPAD.encode(Value::Object(claims()).to_string().as_bytes());
    let token = format!("{header}.{payload}.");
    assert_eq!(verify_compact(&token, &keys), Err(JoseError::Unsecured));
    let token = key.forge_header(json!({"alg": "none", "kid": kid, "typ": "JWT"}));
    assert_eq!(verify_compact(&token, &keys), Err(JoseError::Unsecured));
    let token = key.forge_header(json!({"alg": "HS256", "kid": kid, "typ": "JWT"}));
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::UnsupportedAlg)
    );
    let token = key.forge_header(json!({"alg": "es256", "kid": kid}));
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::UnsupportedAlg)
    );
    let token = key.forge_header(json!({"kid": kid, "typ": "JWT"}));
    assert_eq!(verify_compact(&token, &keys), Err(JoseError::MissingAlg));
    let token = key.forge_header(json!({"alg": 256, "kid": kid}));
    assert_eq!(verify_compact(&token, &keys), Err(JoseError::MissingAlg));
}

#[test]
fn refuses_alg_other_than_the_keys() {
    // Signed by the P-256 key, header ES384: the key's alg decides, not the header's.
    let key = TestKey::new(Alg::Es256);
    let kid = key.jwk().kid().to_owned();
    let token = key.forge_header(json!({"alg": "ES384", "kid": kid, "typ": "JWT"}));
    assert_eq!(
        verify_compact(&token, &[key.jwk()]),
        Err(JoseError::AlgMismatch {
            header: Alg::Es384,
            key: Alg::Es256
        })
    );
    // RS256 and PS256 JWKs of one RSA key share a kid: each token finds its own.
    let rs = TestKey::new(Alg::Rs256);
    let ps = TestKey::new(Alg::Ps256);
    assert_eq!(rs.jwk().kid(), ps.jwk().kid());
    let token = rs.token(&claims());
    assert_eq!(
        verify_compact(&token, &[ps.jwk()]),
        Err(JoseError::AlgMismatch {
            header: Alg::Rs256,
            key: Alg::Ps256
        })
    );
    assert_eq!(
        verify_compact(&token, &[ps.jwk(), rs.jwk()]).unwrap(),
        claims()
    );
}

#[test]
fn refuses_unknown_and_missing_kid() {
    let key = TestKey::new(Alg::Es256);
    let other = TestKey::new(Alg::Es256);
    let token = key.token(&claims());
    let err = verify_compact(&token, &[other.jwk()]).unwrap_err();
    assert_eq!(
        err,
        JoseError::UnknownKid {
            kid: ShownKid(Some(key.jwk().kid().to_owned()))
        }
    );
    assert!(err.to_string().contains(key.jwk().kid()));
    // A kid that is long or not printable is not shown.
    for kid in ["k\u{1b}[31m".to_owned(), "k".repeat(65)] {
        let token = key.forge_header(json!({"alg": "ES256", "kid": kid}));
        let err = verify_compact(&token, &[key.jwk()]).unwrap_err();
        assert_eq!(
            err,
            JoseError::UnknownKid {
                kid: ShownKid(None)
            }
        );
        assert!(!err.to_string().contains("kkk"));
    }
    let token = key.forge_header(json!({"alg": "ES256", "typ": "JWT"}));
    assert_eq!(
        verify_compact(&token, &[key.jwk()]),
        Err(JoseError::MissingKid)
    );
    let token = key.forge_header(json!({"alg": "ES256", "kid": 7}));
    assert_eq!(
        verify_compact(&token, &[key.jwk()]),
        Err(JoseError::MissingKid)
    );
}

#[test]
fn refuses_header_beyond_the_profile() {
    let key = TestKey::new(Alg::Es256);
    let keys = [key.jwk()];
    let kid = key.jwk().kid().to_owned();
    // Correctly signed each time: only the header's shape is wrong.
    let token = key.forge_header(json!({"alg": "ES256", "kid": kid, "typ": "JWT", "jku": "x"}));
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::ExtraHeaderMember)
    );
    let token = key.forge_header(json!({"alg": "ES256", "kid": kid, "typ": "other"}));
    assert_eq!(verify_compact(&token, &keys), Err(JoseError::Type));
    let token = key.forge_header(json!({"alg": "ES256", "kid": kid, "typ": 1}));
    assert_eq!(verify_compact(&token, &keys), Err(JoseError::Type));
    // typ JOSE, or none at all, is accepted.
    let token = key.forge_header(json!({"alg": "ES256", "kid": kid, "typ": "JOSE"}));
    assert!(verify_compact(&token, &keys).is_ok());
    let token = key.forge_header(json!({"alg": "ES256", "kid": kid}));
    assert!(verify_compact(&token, &keys).is_ok());

    let dup = format!(r#"{{"alg":"HS256","kid":"{kid}","alg":"ES256"}}"#);
    let token = key.forge(dup.as_bytes(), b"{}");
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::DuplicateMember(Segment::Header))
    );
    let token = key.forge(b"[1]", b"{}");
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::NotObject(Segment::Header))
    );
    let token = key.forge(b"{", b"{}");
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::Json(Segment::Header))
    );
}

#[test]
fn refuses_payload_that_is_not_one_object() {
    let key = TestKey::new(Alg::Es256);
    let keys = [key.jwk()];
    let header = json!({"alg": "ES256", "kid": key.jwk().kid(), "typ": "JWT"}).to_string();
    let header = header.as_bytes();
    for (payload, err) in [
        (&b"[1]"[..], JoseError::NotObject(Segment::Payload)),
        (b"\"sub\"", JoseError::NotObject(Segment::Payload)),
        (b"{\"a\":1} x", JoseError::Json(Segment::Payload)),
        (b"\xff", JoseError::Json(Segment::Payload)),
        (
            b"{\"sub\":\"a\",\"sub\":\"b\"}",
            JoseError::DuplicateMember(Segment::Payload),
        ),
    ] {
        assert_eq!(verify_compact(&key.forge(header, payload), &keys), Err(err));
    }
    // Nested duplicates are the claims' business, not refused here.
    assert!(verify_compact(&key.forge(header, b"{\"a\":{}}"), &keys).is_ok());
}

#[test]
fn refuses_bad_base64() {
    let key = TestKey::new(Alg::Es256);
    let keys = [key.jwk()];
    let token = key.token(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let with = |i: usize, segment: &str| {
        let mut p = parts.clone();
        p[i] = segment;
        p.join(".")
    };
    let padded = format!("{}==", parts[2]);
    let plus = format!("+{}", &parts[1][1..]);
    let slash = format!("/{}", &parts[0][1..]);
    let cases = [
        (with(2, &padded), Segment::Signature),
        (with(1, &plus), Segment::Payload),
        (with(0, &slash), Segment::Header),
        (with(1, &format!("{} ", parts[1])), Segment::Payload),
    ];
    for (token, segment) in cases {
        assert_eq!(
            verify_compact(&token, &keys),
            Err(JoseError::Base64(segment))
        );
    }
    // Canonical only: "YR" has non-zero trailing bits ("YQ" is the encoding of "a").
    assert_eq!(decode("YQ", Segment::Payload).unwrap(), b"a");
    assert!(decode("YR", Segment::Payload).is_err());
    assert!(decode("YQ==", Segment::Payload).is_err());
    assert!(decode("Y", Segment::Payload).is_err());
}

#[test]
fn refuses_wrong_segment_count_and_size() {
    let key = TestKey::new(Alg::Es256);
    let keys = [key.jwk()];
    let token = key.token(&claims());
    let (input, _) = token.rsplit_once('.').unwrap();
    assert_eq!(verify_compact(input, &keys), Err(JoseError::Segments));
    assert_eq!(
        verify_compact(&format!("{token}."), &keys),
        Err(JoseError::Segments)
    );
    assert_eq!(
        verify_compact(&format!("{token}.x"), &keys),
        Err(JoseError::Segments)
    );
    assert_eq!(verify_compact("", &keys), Err(JoseError::Segments));

    // A correctly signed token just over the bound.
    let mut big = claims();
    big.insert("pad".into(), "a".repeat(MAX_TOKEN_LEN).into());
    let token = key.token(&big);
    assert_eq!(
        verify_compact(&token, &keys),
        Err(JoseError::TooLong { len: token.len() })
    );
    let mut fits = claims();
    fits.insert("pad".into(), "a".repeat(MAX_TOKEN_LEN / 2).into());
    assert!(verify_compact(&key.token(&fits), &keys).is_ok());
}

#[test]
fn refuses_es_signatures_not_r_s() {
    for alg in [Alg::Es256, Alg::Es384] {
        let key = TestKey::new(alg);
        let keys = [key.jwk()];
        let token = key.token(&claims());
        let (input, sig) = token.rsplit_once('.').unwrap();
        let raw = BASE64URL_NOPAD.decode(sig.as_bytes()).unwrap();
        let expected = raw.len();
        // DER, as a careless signer would return it.
        let der = match &key {
            TestKey::P256(_) => p256::ecdsa::Signature::from_slice(&raw)
                .unwrap()
                .to_der()
                .as_bytes()
                .to_vec(),
            _ => p384::ecdsa::Signature::from_slice(&raw)
                .unwrap()
                .to_der()
                .as_bytes()
                .to_vec(),
        };
        let mut longer = raw.clone();
        longer.push(0);
        for bad in [der, longer, raw[1..].to_vec()] {
            let token = format!("{input}.{}", BASE64URL_NOPAD.encode(&bad));
            assert_eq!(
                verify_compact(&token, &keys),
                Err(JoseError::SignatureLength {
                    alg,
                    len: bad.len(),
                    expected
                })
            );
        }
    }
}

/// One signature per token: a signer's high-S signature is made low-S, and the verifier
/// refuses high-S (the same token with `s` negated would be a second valid string).
#[test]
fn signatures_are_low_s_only() {
    let key = TestKey::new(Alg::Es256);
    let jwk = key.jwk();
    let high = |input: &[u8]| {
        let sig = p256::ecdsa::Signature::from_slice(&key.sign(input)).unwrap();
        let (r, s) = sig.split_scalars();
        let high = if sig.normalize_s() == sig {
            p256::ecdsa::Signature::from_scalars(r, -s).unwrap()
        } else {
            sig
        };
        Ok::<_, Infallible>(high.to_bytes().to_vec())
    };
    let token = sign_compact(Alg::Es256, jwk.kid(), &claims(), high).unwrap();
    assert_eq!(
        verify_compact(&token, std::slice::from_ref(&jwk)).unwrap(),
        claims()
    );
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&BASE64URL_NOPAD.decode(sig.as_bytes()).unwrap())
        .unwrap();
    assert_eq!(sig.normalize_s(), sig, "made low-S");
    let (r, s) = sig.split_scalars();
    let flipped = p256::ecdsa::Signature::from_scalars(r, -s).unwrap();
    let token = format!("{input}.{}", BASE64URL_NOPAD.encode(&flipped.to_bytes()));
    assert_eq!(verify_compact(&token, &[jwk]), Err(JoseError::BadSignature));
}

#[test]
fn errors_do_not_echo_the_token() {
    let key = TestKey::new(Alg::Es256);
    let mut secret = claims();
    secret.insert("sub".into(), "spiffe://secret.example/x".into());
    let token = key.token(&secret);
    let altered = format!("{}A", token);
    let err = verify_compact(&altered, &[key.jwk()]).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("secret"), "{text}");
    assert!(!text.contains(token.split('.').nth(1).unwrap()), "{text}");
}
