//! X.509-SVIDs (the SPIFFE X509-SVID profile): an x509 issuer's CA certificates, one per
//! version of its key (kms's own, self-signed, or an outside CA's), and the leaves it signs
//! for PKCS#10 requests.
//!
//! Every signature is the keyring's ([`KeySource::sign`], DER-encoded): rcgen builds the
//! certificates and requests around a [`RemoteKey`] that never holds key material, so an
//! HSM key signs in the HSM. Untrusted input (a caller's request, an administrator's chain)
//! is read with x509-parser, strictly, and its signatures verified before anything is
//! signed or stored.

use std::cell::RefCell;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::model::{CaCert, Issuer};
use super::{CredentialsError, KeySource, SignatureEncoding};
use crate::keyring::model::Algorithm;

/// The largest certificate request taken (PEM or DER).
pub(crate) const MAX_CSR: usize = 16 * 1024;
/// The largest CA chain taken (PEM), and the most certificates in it.
pub(crate) const MAX_CHAIN: usize = 64 * 1024;
pub(crate) const MAX_CHAIN_CERTS: usize = 8;
/// How long a self-signed CA certificate is valid: 1 year. Rotate the issuer's key within
/// the year (a version whose CA certificate has expired signs nothing).
pub(crate) const CA_VALIDITY: u64 = 365 * 86_400;
/// How far a CA certificate's notBefore is set back (other machines' clocks).
const CA_BACKDATE: u64 = 3600;
/// How far a leaf's notBefore is set back (other machines' clocks; the profile's bound).
pub(crate) const LEAF_BACKDATE: u64 = 60;
/// The smallest and largest RSA keys a leaf may have, bits.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// Why a certificate request is refused. Its text is safe to show: a request is public.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CsrProblem {
    /// Over [`MAX_CSR`] bytes.
    #[error("a certificate request is at most {MAX_CSR} bytes")]
    TooLarge,
    /// Not one PKCS#10 request, PEM or DER, with nothing after it.
    #[error("not a PKCS#10 certificate request (PEM or DER), or bytes after it")]
    Malformed,
    /// Its signature does not verify with its own key (no proof of possession).
    #[error("the request's signature does not verify with its own key")]
    BadSignature,
    /// Its signature is made with SHA-1.
    #[error(
        "the request is signed with SHA-1, which kms refuses: sign it with SHA-256 (openssl req -sha256)"
    )]
    Sha1,
    /// A key of another kind than ECDSA P-256/P-384, Ed25519 or RSA.
    #[error("a certificate's key is ECDSA P-256 or P-384, Ed25519, or RSA of 2048 to 8192 bits")]
    KeyType,
    /// An RSA key outside 2048..=8192 bits.
    #[error("an RSA key is 2048 to 8192 bits, not {0}")]
    RsaSize(usize),
    /// A SAN other than one URI: DNS, IP, email, other, or several.
    #[error("a request names no subject alternative name, or exactly one URI (the SPIFFE ID): {0}")]
    Names(&'static str),
    /// Its URI SAN names another SPIFFE ID than the one the certificate is for.
    #[error("the request's URI names another SPIFFE ID than the certificate's subject")]
    OtherSubject,
}

/// Why a CA chain is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ChainProblem {
    /// Over [`MAX_CHAIN`] bytes or [`MAX_CHAIN_CERTS`] certificates, or none.
    #[error(
        "a CA chain is 1 to {MAX_CHAIN_CERTS} certificates in at most {MAX_CHAIN} bytes of PEM"
    )]
    Size,
    /// Not PEM certificates, or one that does not parse.
    #[error("not PEM certificates (-----BEGIN CERTIFICATE-----), or one does not parse")]
    Malformed,
    /// The first certificate's public key is not the key version's.
    #[error("the first certificate's public key is not that of version {0} of the issuer's key")]
    OtherKey(u32),
    /// The first certificate is not a CA (basicConstraints cA, keyUsage keyCertSign).
    #[error("the first certificate is not a CA: basicConstraints cA=true and keyUsage keyCertSign")]
    NotCa,
    /// A certificate is not valid now.
    #[error("certificate {0} of the chain is not valid now (expired, or not yet valid)")]
    Validity(usize),
    /// A certificate is not signed by the next one (or the last, self-signed, by itself).
    #[error("certificate {0} of the chain is not signed by the next one")]
    Signature(usize),
    /// A certificate above the first is not a CA (basicConstraints cA; keyUsage, if any,
    /// with keyCertSign), or its pathLen leaves no room for those below it.
    #[error("certificate {0} of the chain is not a CA that may sign the ones below it")]
    UpperNotCa(usize),
    /// A certificate's issuer is not the next one's subject.
    #[error("certificate {0} of the chain does not name the next one as its issuer")]
    Names(usize),
    /// A certificate signed with SHA-1, or with an RSA key under 2048 bits.
    #[error("certificate {0} of the chain is signed with SHA-1 or by an RSA key under 2048 bits")]
    Weak(usize),
    /// The first certificate's subject cannot be written again as the leaves' issuer
    /// exactly as it is (repeated or multi-valued attributes): leaves would not chain.
    #[error(
        "the CA certificate's subject name has attributes kms cannot repeat exactly in its leaves (several values in one RDN, or one type twice): ask for a subject of distinct attributes"
    )]
    SubjectName,
}

/// A certificate issued, and what its record says of it.
pub(crate) struct X509Issued {
    /// The leaf, PEM.
    pub certificate_pem: String,
    /// The CA certificate that signed it and those above it, PEM.
    pub chain_pem: String,
    /// What the record names (the serial, hex, as its `jti`).
    pub summary: crate::audit::CredentialSummary,
    /// The key that signed (its version is the summary's).
    pub key: String,
}

/// A request for a certificate.
pub(crate) struct X509Request<'a> {
    /// The issuer's name.
    pub issuer: &'a str,
    /// The PKCS#10 request, PEM or DER.
    pub csr: &'a [u8],
    /// Empty: the caller's own identity.
    pub subject: &'a str,
    /// 0: the issuer's default.
    pub ttl: u64,
}

/// The signature algorithm a CA key of `algorithm` signs certificates with.
pub(crate) fn ca_algorithm(
    algorithm: Algorithm,
) -> Result<&'static SignatureAlgorithm, CredentialsError> {
    // No wildcard: a new keyring algorithm must decide whether it signs certificates.
    match algorithm {
        Algorithm::EcdsaP256Sha256 => Ok(&rcgen::PKCS_ECDSA_P256_SHA256),
        Algorithm::EcdsaP384Sha384 => Ok(&rcgen::PKCS_ECDSA_P384_SHA384),
        Algorithm::RsaSignPkcs12048Sha256
        | Algorithm::RsaSignPkcs13072Sha256
        | Algorithm::RsaSignPkcs14096Sha256 => Ok(&rcgen::PKCS_RSA_SHA256),
        Algorithm::Aes256Gcm
        | Algorithm::Ed25519
        | Algorithm::HmacSha256
        | Algorithm::RsaSignPss2048Sha256
        | Algorithm::RsaSignPss3072Sha256
        | Algorithm::RsaSignPss4096Sha256
        | Algorithm::RsaDecryptOaep2048Sha256
        | Algorithm::RsaDecryptOaep3072Sha256
        | Algorithm::RsaDecryptOaep4096Sha256 => Err(CredentialsError::KeyUnusable(
            "an X.509 CA key is ECDSA P-256 or P-384, or RSA PKCS#1 v1.5 with SHA-256".to_owned(),
        )),
    }
}

/// A version of a keyring key as rcgen sees a key: its public key, and a signature made by
/// the keyring (in the HSM for an HSM key). The keyring's error is kept for the caller,
/// rcgen's own being opaque.
pub(crate) struct RemoteKey<'a> {
    keys: &'a dyn KeySource,
    key: &'a str,
    version: u32,
    /// The subjectPublicKey BIT STRING's bytes (an EC point, or an RSAPublicKey).
    public: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
    failure: RefCell<Option<CredentialsError>>,
}

impl<'a> RemoteKey<'a> {
    /// Version `version` of `key`, a key of `algorithm`.
    pub(crate) fn new(
        keys: &'a dyn KeySource,
        key: &'a str,
        version: u32,
        algorithm: Algorithm,
    ) -> Result<Self, CredentialsError> {
        let algorithm = ca_algorithm(algorithm)?;
        let spki = spki_der(&keys.public_key(key, version)?)?;
        let (_, info) = SubjectPublicKeyInfo::from_der(&spki)
            .map_err(|_| CredentialsError::Internal("a public key that is not one"))?;
        Ok(Self {
            keys,
            key,
            version,
            public: info.subject_public_key.data.to_vec(),
            algorithm,
            failure: RefCell::new(None),
        })
    }

    /// rcgen's error, or the keyring's that caused it.
    fn error(&self, e: rcgen::Error) -> CredentialsError {
        match self.failure.borrow_mut().take() {
            Some(k) => k,
            None => {
                tracing::error!(error = %e, "a certificate could not be encoded");
                CredentialsError::Internal("a certificate could not be encoded")
            }
        }
    }
}

impl PublicKeyData for RemoteKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl SigningKey for RemoteKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.keys
            .sign(self.key, self.version, msg, SignatureEncoding::Der)
            .map_err(|e| {
                *self.failure.borrow_mut() = Some(e);
                rcgen::Error::RemoteKeyError
            })
    }
}

/// A leaf's public key, from its request.
struct LeafKey {
    public: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
}

impl PublicKeyData for LeafKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

/// A SubjectPublicKeyInfo PEM's DER.
fn spki_der(pem: &str) -> Result<Vec<u8>, CredentialsError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| CredentialsError::Internal("a public key that is not PEM"))?;
    Ok(p.contents)
}

/// Unix seconds as rcgen's date.
fn date(unix: u64) -> Result<time::OffsetDateTime, CredentialsError> {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(CredentialsError::Internal("a date out of range"))
}

/// A random positive serial number of 16 bytes (126 random bits; the first byte never 0,
/// so that its hex is the integer's as openssl prints it), and its hex.
fn serial() -> Result<(SerialNumber, String), CredentialsError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| CredentialsError::Randomness)?;
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    Ok((
        SerialNumber::from_slice(&bytes),
        data_encoding::HEXLOWER.encode(&bytes),
    ))
}

/// The issuer's name as a CA's subject: CN = the issuer's name, O = kms.
fn ca_name(issuer: &Issuer) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kms");
    dn.push(DnType::CommonName, issuer.name.as_str());
    dn
}

/// A self-signed CA certificate (DER) for version `version` of `issuer`'s key, valid from
/// an hour before `now` for [`CA_VALIDITY`]: basicConstraints critical cA pathLen 0,
/// keyUsage critical keyCertSign and cRLSign, a subject key identifier.
pub(crate) fn self_signed_ca(
    keys: &dyn KeySource,
    issuer: &Issuer,
    version: u32,
    algorithm: Algorithm,
    now: u64,
) -> Result<Vec<u8>, CredentialsError> {
    let signer = RemoteKey::new(keys, &issuer.key, version, algorithm)?;
    let mut params = CertificateParams::default();
    params.not_before = date(now.saturating_sub(CA_BACKDATE))?;
    params.not_after = date(now.saturating_add(CA_VALIDITY))?;
    params.serial_number = Some(serial()?.0);
    params.distinguished_name = ca_name(issuer);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&signer).map_err(|e| signer.error(e))?;
    Ok(cert.der().to_vec())
}

/// A PKCS#10 request (PEM) for a CA certificate for version `version` of `issuer`'s key,
/// signed by it: CN = the issuer's name, O = kms, asking for basicConstraints cA pathLen 0
/// and keyUsage keyCertSign, cRLSign (the outside CA decides).
pub(crate) fn ca_request(
    keys: &dyn KeySource,
    issuer: &Issuer,
    version: u32,
) -> Result<String, CredentialsError> {
    let algorithm = keys.versions(&issuer.key)?.algorithm;
    let signer = RemoteKey::new(keys, &issuer.key, version, algorithm)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(issuer);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let csr = params
        .serialize_request(&signer)
        .map_err(|e| signer.error(e))?;
    csr.pem().map_err(|e| signer.error(e))
}

/// Certificates from PEM (DER each), at most [`MAX_CHAIN_CERTS`] in [`MAX_CHAIN`] bytes.
pub(crate) fn chain_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, ChainProblem> {
    if pem.len() > MAX_CHAIN {
        return Err(ChainProblem::Size);
    }
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|_| ChainProblem::Malformed)?;
        if p.label != "CERTIFICATE" {
            return Err(ChainProblem::Malformed);
        }
        out.push(p.contents);
        if out.len() > MAX_CHAIN_CERTS {
            return Err(ChainProblem::Size);
        }
    }
    if out.is_empty() {
        return Err(ChainProblem::Size);
    }
    Ok(out)
}

/// A certificate, all of the bytes.
fn certificate(der: &[u8]) -> Result<X509Certificate<'_>, ChainProblem> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(ChainProblem::Malformed),
    }
}

/// Checks a chain an outside CA made for version `version` of `issuer`'s key (public key
/// `spki`, DER) at `now`: the first certificate has that key and is a CA, every one is
/// valid now and signed by the next (the last, if self-signed, by itself).
pub(crate) fn check_chain(
    chain: &[Vec<u8>],
    spki: &[u8],
    version: u32,
    now: u64,
) -> Result<(), ChainProblem> {
    let certs = chain
        .iter()
        .map(|d| certificate(d))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = certs.first() else {
        return Err(ChainProblem::Size);
    };
    let (_, want) = SubjectPublicKeyInfo::from_der(spki).map_err(|_| ChainProblem::Malformed)?;
    let have = first.public_key();
    if have.algorithm.algorithm != want.algorithm.algorithm
        || have.subject_public_key.data != want.subject_public_key.data
    {
        return Err(ChainProblem::OtherKey(version));
    }
    let ca = matches!(first.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let signs = matches!(first.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
    if !ca || !signs {
        return Err(ChainProblem::NotCa);
    }
    let at = x509_parser::time::ASN1Time::from_timestamp(i64::try_from(now).unwrap_or(i64::MAX))
        .map_err(|_| ChainProblem::Malformed)?;
    for (n, cert) in certs.iter().enumerate() {
        if !cert.validity().is_valid_at(at) {
            return Err(ChainProblem::Validity(n));
        }
        let weak_rsa = matches!(
            cert.public_key().parsed(),
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) if rsa.key_size() < 2048
        );
        if weak_rsa || is_sha1(&cert.signature_algorithm.algorithm.to_id_string()) {
            return Err(ChainProblem::Weak(n));
        }
        if n > 0 {
            // A CA above the first: cA, keyCertSign if it says its usages, and a pathLen
            // that allows the CAs below it (n - 1 of them between it and the leaves' CA).
            let bc = match cert.basic_constraints() {
                Ok(Some(bc)) if bc.value.ca => bc.value,
                _ => return Err(ChainProblem::UpperNotCa(n)),
            };
            let may_sign = match cert.key_usage() {
                Ok(Some(ku)) => ku.value.key_cert_sign(),
                Ok(None) => true,
                Err(_) => false,
            };
            let room = bc
                .path_len_constraint
                .is_none_or(|l| usize::try_from(l).unwrap_or(usize::MAX) >= n);
            if !may_sign || !room {
                return Err(ChainProblem::UpperNotCa(n));
            }
        }
        if let Some(next) = certs.get(n + 1)
            && cert.issuer().as_raw() != next.subject().as_raw()
        {
            return Err(ChainProblem::Names(n));
        }
        let signer = match certs.get(n + 1) {
            Some(next) => Some(next.public_key()),
            None if cert.subject() == cert.issuer() => Some(cert.public_key()),
            // The last one, signed by a root not given: verified by whoever trusts that root.
            None => None,
        };
        if let Some(key) = signer
            && cert.verify_signature(Some(key)).is_err()
        {
            return Err(ChainProblem::Signature(n));
        }
    }
    Ok(())
}

/// Whether a leaf made under CA certificate `ca` names it as its issuer byte for byte: rcgen
/// writes the issuer's name again from its attributes, which loses a multi-valued RDN or
/// a second value of one type (`DC=corp, DC=com`). Tried with throwaway keys.
fn reproduces_subject(ca: &[u8]) -> bool {
    let trial = || -> Option<bool> {
        let ca_key = KeyPair::generate().ok()?;
        let leaf_key = KeyPair::generate().ok()?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca.into(), &ca_key).ok()?;
        let leaf = CertificateParams::default()
            .signed_by(&leaf_key, &issuer)
            .ok()?;
        let (_, made) = X509Certificate::from_der(leaf.der()).ok()?;
        let ca = certificate(ca).ok()?;
        Some(made.issuer().as_raw() == ca.subject().as_raw())
    };
    trial().unwrap_or(false)
}

/// Whether a signature algorithm (dotted OID) hashes with SHA-1: sha1WithRSAEncryption
/// (and its OIW alias), ecdsa-with-SHA1, dsa-with-sha1.
fn is_sha1(oid: &str) -> bool {
    matches!(
        oid,
        "1.2.840.113549.1.1.5" | "1.3.14.3.2.29" | "1.2.840.10045.4.1" | "1.2.840.10040.4.3"
    )
}

/// A caller's request, read: the leaf's key.
fn read_csr(csr: &[u8], subject: &str) -> Result<LeafKey, CsrProblem> {
    if csr.len() > MAX_CSR {
        return Err(CsrProblem::TooLarge);
    }
    // PEM (white space around it allowed), else DER.
    let text = csr.trim_ascii_start();
    let der = if text.starts_with(b"-----BEGIN") {
        let (rest, p) =
            x509_parser::pem::parse_x509_pem(text).map_err(|_| CsrProblem::Malformed)?;
        if !matches!(
            p.label.as_str(),
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
        ) || !rest.iter().all(u8::is_ascii_whitespace)
        {
            return Err(CsrProblem::Malformed);
        }
        p.contents
    } else {
        csr.to_vec()
    };
    let req = match X509CertificationRequest::from_der(&der) {
        Ok(([], req)) => req,
        _ => return Err(CsrProblem::Malformed),
    };
    let spki = &req.certification_request_info.subject_pki;
    let algorithm = match spki.parsed().map_err(|_| CsrProblem::Malformed)? {
        PublicKey::EC(_) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == x509_parser::oid_registry::OID_EC_P256 => {
                    &rcgen::PKCS_ECDSA_P256_SHA256
                }
                Some(c) if c == x509_parser::oid_registry::OID_NIST_EC_P384 => {
                    &rcgen::PKCS_ECDSA_P384_SHA384
                }
                _ => return Err(CsrProblem::KeyType),
            }
        }
        PublicKey::RSA(rsa) => {
            if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
                return Err(CsrProblem::KeyType);
            }
            let bits = rsa.key_size();
            if !RSA_BITS.contains(&bits) {
                return Err(CsrProblem::RsaSize(bits));
            }
            &rcgen::PKCS_RSA_SHA256
        }
        PublicKey::Unknown(key)
            if spki.algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519
                && spki.algorithm.parameters.is_none()
                && key.len() == 32 =>
        {
            &rcgen::PKCS_ED25519
        }
        _ => return Err(CsrProblem::KeyType),
    };
    let sha1 = [
        x509_parser::oid_registry::OID_PKCS1_SHA1WITHRSA,
        x509_parser::oid_registry::OID_SHA1_WITH_RSA,
    ];
    if sha1.contains(&req.signature_algorithm.algorithm) {
        return Err(CsrProblem::Sha1);
    }
    if req.verify_signature().is_err() {
        return Err(CsrProblem::BadSignature);
    }
    let mut names = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => names.extend(san.general_names.iter()),
            ParsedExtension::ParseError { .. } => return Err(CsrProblem::Malformed),
            _ => {}
        }
    }
    match names.as_slice() {
        [] => {}
        [GeneralName::URI(uri)] if *uri == subject => {}
        [GeneralName::URI(_)] => return Err(CsrProblem::OtherSubject),
        [_] => {
            return Err(CsrProblem::Names(
                "a DNS name, IP address, email or other name",
            ));
        }
        _ => return Err(CsrProblem::Names("several names")),
    }
    Ok(LeafKey {
        public: spki.subject_public_key.data.to_vec(),
        algorithm,
    })
}

/// The leaf for `subject` with the key a request asked for, signed by `signer` under its
/// CA certificate `ca` (DER), valid from [`LEAF_BACKDATE`] before
/// `now` until `not_after`: its DER and serial (hex).
fn leaf(
    signer: &RemoteKey<'_>,
    ca: &[u8],
    key: &LeafKey,
    subject: &str,
    now: u64,
    not_after: u64,
) -> Result<(Vec<u8>, String), CredentialsError> {
    let ca_issuer = rcgen::Issuer::from_ca_cert_der(&ca.into(), signer)
        .map_err(|_| CredentialsError::Internal("a stored CA certificate that does not parse"))?;
    let (serial, hex) = serial()?;
    let mut params = CertificateParams::default();
    params.not_before = date(now.saturating_sub(LEAF_BACKDATE))?;
    params.not_after = date(not_after)?;
    params.serial_number = Some(serial);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kms");
    params.distinguished_name = dn;
    params.subject_alt_names =
        vec![SanType::URI(subject.try_into().map_err(|_| {
            CredentialsError::BadRequest("a SPIFFE ID is ASCII".to_owned())
        })?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if std::ptr::eq(key.algorithm, &rcgen::PKCS_RSA_SHA256) {
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(key, &ca_issuer)
        .map_err(|e| signer.error(e))?;
    Ok((cert.der().to_vec(), hex))
}

impl super::Credentials {
    /// Gives each enabled version of an x509 issuer's key that has none its CA certificate
    /// entry: a self-signed certificate, or (an outside CA's issuer) an empty entry that
    /// awaits one. Whether anything was added.
    pub(crate) fn complete_ca(
        keys: &dyn KeySource,
        issuer: &mut Issuer,
        now: u64,
    ) -> Result<bool, CredentialsError> {
        if issuer.kind != super::model::Kind::X509 {
            return Ok(false);
        }
        let mut added = false;
        let versions = keys.versions(&issuer.key)?;
        for v in versions.enabled {
            if issuer.ca.iter().any(|c| c.version == v.version) {
                continue;
            }
            let chain = if issuer.self_signed {
                vec![self_signed_ca(
                    keys,
                    issuer,
                    v.version,
                    versions.algorithm,
                    now,
                )?]
            } else {
                Vec::new()
            };
            issuer.ca.push(CaCert {
                version: v.version,
                chain,
                self_signed: issuer.self_signed,
                set_at: now,
            });
            added = true;
        }
        issuer.ca.sort_by_key(|c| c.version);
        Ok(added)
    }

    /// A PKCS#10 request for a CA certificate for `version` (0: the newest enabled) of x509
    /// issuer `name`'s key, and that version.
    pub(crate) fn issuer_csr(
        &self,
        keys: &dyn KeySource,
        name: &str,
        version: u32,
    ) -> Result<(String, u32), CredentialsError> {
        let issuer = self.issuer_of_kind(name, super::model::Kind::X509)?;
        if issuer.self_signed {
            return Err(CredentialsError::BadRequest(format!(
                "issuer {:?} signs its CA certificates itself: it needs no outside CA's (an issuer for an outside CA is made without --self-signed)",
                issuer.name
            )));
        }
        let version = enabled_version(keys, &issuer, version)?;
        Ok((ca_request(keys, &issuer, version)?, version))
    }

    /// Sets the CA certificate (and the chain above it, PEM) an outside CA made for
    /// `version` of x509 issuer `name`'s key, once checked ([`check_chain`]).
    pub(crate) fn set_issuer_certificate(
        &self,
        journal: &dyn super::Journal,
        keys: &dyn KeySource,
        name: &str,
        version: u32,
        chain_pem: &str,
    ) -> Result<Issuer, CredentialsError> {
        let _one = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let _shared = self.store.lock_changes()?;
        let mut issuer = self.issuer_of_kind(name, super::model::Kind::X509)?;
        if issuer.self_signed {
            return Err(CredentialsError::BadRequest(format!(
                "issuer {:?} signs its own CA certificates (self_signed): it takes none from an outside CA",
                issuer.name
            )));
        }
        if version == 0 {
            return Err(CredentialsError::BadRequest(
                "key_version names the version the certificate is for".to_owned(),
            ));
        }
        let version = enabled_version(keys, &issuer, version)?;
        let chain = chain_from_pem(chain_pem).map_err(CredentialsError::BadCaChain)?;
        let spki = spki_der(&keys.public_key(&issuer.key, version)?)?;
        check_chain(&chain, &spki, version, crate::keyring::now())
            .map_err(CredentialsError::BadCaChain)?;
        if !chain.first().is_some_and(|ca| reproduces_subject(ca)) {
            return Err(CredentialsError::BadCaChain(ChainProblem::SubjectName));
        }
        issuer.ca.retain(|c| c.version != version);
        issuer.ca.push(CaCert {
            version,
            chain,
            self_signed: false,
            set_at: crate::keyring::now(),
        });
        issuer.ca.sort_by_key(|c| c.version);
        journal.commit(&issuer.name, vec![self.write(&issuer)?])?;
        Ok(issuer)
    }

    /// Issues an X.509-SVID to `caller` (its principal) for the key of a PKCS#10 request.
    pub(crate) fn issue_x509(
        &self,
        keys: &dyn KeySource,
        caller: &str,
        req: &X509Request<'_>,
    ) -> Result<X509Issued, CredentialsError> {
        let issuer = self.issuer_of_kind(req.issuer, super::model::Kind::X509)?;
        let (subject, actor) = super::subject_of(&issuer, caller, req.subject, "a certificate")?;
        if !crate::access::tls::is_spiffe_id(&subject) {
            return Err(CredentialsError::BadRequest(
                "an X.509-SVID's subject is a SPIFFE ID: the caller's certificate names none"
                    .to_owned(),
            ));
        }
        let ttl = super::ttl_of(&issuer, req.ttl)?;
        let key = read_csr(req.csr, &subject).map_err(CredentialsError::BadCsr)?;
        let now = crate::keyring::now();
        let versions = keys.versions(&issuer.key)?;
        let published = issuer.published(&versions.enabled);
        let version = super::signing_version(&published, issuer.publish_ahead, now, |v| {
            issuer.can_sign_with(v)
        })
        .ok_or(CredentialsError::NoCaCertificate)?;
        let chain = issuer
            .ca
            .iter()
            .find(|c| c.version == version)
            .map(|c| c.chain.as_slice())
            .unwrap_or_default();
        let Some(ca) = chain.first() else {
            return Err(CredentialsError::NoCaCertificate);
        };
        // The leaf lives no longer than any certificate above it.
        let mut ca_not_after = u64::MAX;
        for der in chain {
            let t = certificate(der)
                .map_err(|_| {
                    CredentialsError::Internal("a stored CA certificate that does not parse")
                })?
                .validity()
                .not_after
                .timestamp();
            ca_not_after = ca_not_after.min(u64::try_from(t).unwrap_or(0));
        }
        if ca_not_after <= now {
            return Err(CredentialsError::KeyUnusable(format!(
                "the CA certificate of version {version} of the issuer's key has expired: rotate the issuer"
            )));
        }
        let expires = now.saturating_add(ttl).min(ca_not_after);
        let signer = RemoteKey::new(keys, &issuer.key, version, versions.algorithm)?;
        let (der, serial) = leaf(&signer, ca, &key, &subject, now, expires)?;
        Ok(X509Issued {
            key: issuer.key.clone(),
            certificate_pem: super::pem_chain(&[der]),
            chain_pem: super::pem_chain(chain),
            summary: crate::audit::CredentialSummary {
                issuer: issuer.name.clone(),
                kind: issuer.kind.name().to_owned(),
                subject,
                audience: String::new(),
                actor,
                jti: serial,
                expires,
                key_version: version,
                principals: Vec::new(),
            },
        })
    }

    /// The CA certificates x509 issuer `name` publishes: the one of the version that signs
    /// now (`current`), or every one with its chain, PEM.
    pub(crate) fn ca_pem(
        &self,
        keys: &dyn KeySource,
        name: &str,
        current: bool,
    ) -> Result<String, CredentialsError> {
        let issuer = self.issuer_of_kind(name, super::model::Kind::X509)?;
        if current {
            let version = self.signing_version_of(keys, &issuer)?;
            let ca = issuer
                .ca
                .iter()
                .find(|c| c.version == version)
                .and_then(|c| c.chain.first())
                .ok_or(CredentialsError::NoCaCertificate)?;
            return Ok(super::pem_chain(std::slice::from_ref(ca)));
        }
        // The CA certificates of the enabled versions only (a disabled version's CA is no
        // longer vouched for), each certificate once (the chains share their root).
        let enabled = keys.versions(&issuer.key)?.enabled;
        let mut out: Vec<Vec<u8>> = Vec::new();
        for c in issuer
            .ca
            .iter()
            .filter(|c| enabled.iter().any(|v| v.version == c.version))
        {
            for der in &c.chain {
                if !out.contains(der) {
                    out.push(der.clone());
                }
            }
        }
        Ok(super::pem_chain(&out))
    }
}

/// `version` of `issuer`'s key if enabled (0: the newest enabled).
fn enabled_version(
    keys: &dyn KeySource,
    issuer: &Issuer,
    version: u32,
) -> Result<u32, CredentialsError> {
    let enabled = keys.versions(&issuer.key)?.enabled;
    let found = if version == 0 {
        enabled.iter().map(|v| v.version).max()
    } else {
        enabled.iter().map(|v| v.version).find(|v| *v == version)
    };
    found.ok_or_else(|| {
        CredentialsError::KeyUnusable(format!(
            "version {version} of the issuer's key is not enabled"
        ))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests;
