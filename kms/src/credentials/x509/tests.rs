//! X.509-SVIDs against a real redb store and a key source of software P-256 keys that sign
//! DER (the server's HSM signing, with openssl and Python verifying, is tested in
//! softhsm-tests/tests/credentials_x509.rs). Requests are made with rcgen.

use std::sync::{Arc, Mutex};

use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::Generate as _;
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType, SignatureAlgorithm, SigningKey};
use sha2::Digest as _;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{ChainProblem, CsrProblem, X509Request};
use crate::barrier::Barrier;
use crate::credentials::model::{self, Issuer, Kind};
use crate::credentials::{
    Credentials, CredentialsError, Journal, KeySource, KeyVersion, KeyVersions, SignatureEncoding,
};
use crate::keyring::model::Algorithm;
use crate::policy::Pattern;
use crate::store::{RedbStore, Store, Write};

const APP: &str = "spiffe://corp/app/web";
const CI: &str = "spiffe://corp/ci";

/// Versions of one P-256 key that sign DER, as the keyring does for X.509.
struct Keys {
    versions: Mutex<Vec<p256::ecdsa::SigningKey>>,
    /// The versions disabled.
    disabled: Mutex<Vec<u32>>,
}

impl Keys {
    fn new() -> Self {
        Self {
            versions: Mutex::new(vec![new_key()]),
            disabled: Mutex::new(Vec::new()),
        }
    }

    fn rotate(&self) -> u32 {
        let mut v = self.versions.lock().unwrap();
        v.push(new_key());
        u32::try_from(v.len()).unwrap()
    }
}

fn new_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap()
}

impl KeySource for Keys {
    fn versions(&self, _: &str) -> Result<KeyVersions, CredentialsError> {
        let n = self.versions.lock().unwrap().len();
        let old = crate::keyring::now() - 86_400;
        let disabled = self.disabled.lock().unwrap().clone();
        Ok(KeyVersions {
            algorithm: Algorithm::EcdsaP256Sha256,
            enabled: (1..=u32::try_from(n).unwrap())
                .filter(|v| !disabled.contains(v))
                .map(|version| KeyVersion {
                    version,
                    created_at: old,
                })
                .collect(),
        })
    }

    fn public_key(&self, _: &str, version: u32) -> Result<String, CredentialsError> {
        Ok(self.versions.lock().unwrap()[version as usize - 1]
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap())
    }

    fn sign_granted(&self, _: &str) -> Result<bool, CredentialsError> {
        Ok(false)
    }

    fn sign(
        &self,
        _: &str,
        version: u32,
        message: &[u8],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>, CredentialsError> {
        assert_eq!(encoding, SignatureEncoding::Der, "X.509 signatures are DER");
        let sig: p256::ecdsa::Signature =
            self.versions.lock().unwrap()[version as usize - 1].sign(message);
        Ok(sig.to_der().as_bytes().to_vec())
    }
}

struct Direct(Arc<dyn Store>);

impl Journal for Direct {
    fn commit(&self, _: &str, writes: Vec<Write>) -> Result<(), CredentialsError> {
        self.0.write_all(&writes)?;
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    engine: Credentials,
    keys: Keys,
}

impl Fixture {
    fn journal(&self) -> Direct {
        Direct(Arc::clone(&self.store))
    }
}

/// An engine with x509 issuers `self` (self-signed) and `outside` (awaiting an outside
/// CA), and jwt issuer `jwt`.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("kms.redb")).unwrap());
    let barrier = Arc::new(Barrier::new(zeroize::Zeroizing::new([9u8; 32])));
    let f = Fixture {
        _dir: dir,
        engine: Credentials::open(barrier, Arc::clone(&store)),
        store,
        keys: Keys::new(),
    };
    for (name, self_signed) in [("self", true), ("outside", false)] {
        let mut i = issuer(Kind::X509);
        i.name = name.to_owned();
        i.self_signed = self_signed;
        f.engine
            .create_issuer(&f.journal(), &f.keys, i, "admin")
            .unwrap();
    }
    let mut jwt = issuer(Kind::Jwt);
    jwt.key = "jwt-signer".to_owned();
    jwt.audiences = vec!["payments".to_owned()];
    f.engine
        .create_issuer(&f.journal(), &f.keys, jwt, "admin")
        .unwrap();
    f
}

fn issuer(kind: Kind) -> Issuer {
    Issuer {
        schema: model::SCHEMA,
        name: kind.name().to_owned(),
        kind,
        publish_ahead: model::DEFAULT_PUBLISH_AHEAD,
        ca: Vec::new(),
        self_signed: false,
        ssh_principals: Vec::new(),
        ssh_critical_options: Default::default(),
        ssh_extensions: Vec::new(),
        key: "signer".to_owned(),
        principals: vec![Pattern::new("spiffe://corp/app/*").unwrap()],
        audiences: Vec::new(),
        default_ttl: 3600,
        max_ttl: 7200,
        claims: Default::default(),
        delegators: Vec::new(),
        subjects: Vec::new(),
        created_ms: 0,
        created_by: String::new(),
    }
}

/// A request (PEM) for a new P-256 key naming `sans`.
fn csr(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
        .into_bytes()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn ask<'a>(issuer: &'a str, csr: &'a [u8], subject: &'a str, ttl: u64) -> X509Request<'a> {
    X509Request {
        issuer,
        csr,
        subject,
        ttl,
    }
}

fn der_of(pem: &str) -> Vec<Vec<u8>> {
    super::chain_from_pem(pem).unwrap()
}

#[test]
fn a_leaf_follows_the_x509_svid_profile() {
    let f = fixture();
    let req = csr(vec![uri(APP)]);
    let issued = f
        .engine
        .issue_x509(&f.keys, APP, &ask("self", &req, "", 0))
        .unwrap();
    let now = crate::keyring::now();
    let leaf_der = &der_of(&issued.certificate_pem)[0];
    let chain = der_of(&issued.chain_pem);
    assert_eq!(chain.len(), 1, "a self-signed CA: the chain is the CA");
    let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
    let (_, ca) = X509Certificate::from_der(&chain[0]).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    ca.verify_signature(None).unwrap();
    // Exactly one SAN, the SPIFFE ID.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(APP)]);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    // The AKI is the CA's SKI.
    let ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let aki = leaf
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ski.as_slice());
    assert_eq!(leaf.issuer(), ca.subject());
    // A random positive serial of more than 64 bits; its hex is the record's jti.
    let serial = leaf.raw_serial();
    assert!(serial.len() >= 9 && serial[0] & 0x80 == 0);
    assert_eq!(issued.summary.jti, data_encoding::HEXLOWER.encode(serial));
    // notBefore backdated at most 60 s, notAfter now + the default TTL.
    let nb = u64::try_from(leaf.validity().not_before.timestamp()).unwrap();
    let na = u64::try_from(leaf.validity().not_after.timestamp()).unwrap();
    assert!(nb + 60 >= now - 2 && nb <= now - 59, "{nb} {now}");
    assert!(na.abs_diff(now + 3600) <= 2);
    assert_eq!(issued.summary.expires, na);
    assert_eq!(issued.summary.subject, APP);
    assert_eq!(issued.summary.kind, "x509");
    assert_eq!(issued.summary.key_version, 1);
    // The CA: CN the issuer's name, cA pathLen 0, keyCertSign and cRLSign, critical.
    let cn = ca.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "self");
    let cabc = ca.basic_constraints().unwrap().unwrap();
    assert!(cabc.critical && cabc.value.ca && cabc.value.path_len_constraint == Some(0));
    let caku = ca.key_usage().unwrap().unwrap();
    assert!(caku.critical && caku.value.key_cert_sign() && caku.value.crl_sign());
    // Without a SAN in the request, the same profile.
    let bare = csr(Vec::new());
    let own = f
        .engine
        .issue_x509(&f.keys, APP, &ask("self", &bare, "", 60))
        .unwrap();
    assert_eq!(own.summary.actor, None);
    let d_der = der_of(&own.certificate_pem);
    let (_, d) = X509Certificate::from_der(&d_der[0]).unwrap();
    let san = d.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(APP)]);
    // No delegation: a certificate cannot name its delegator, and kms would take it as its
    // subject's own client certificate.
    let e = f
        .engine
        .issue_x509(&f.keys, CI, &ask("self", &bare, APP, 60))
        .err()
        .unwrap();
    assert!(matches!(e, CredentialsError::Denied(_)), "{e}");
    let mut delegating = issuer(Kind::X509);
    delegating.name = "delegating".to_owned();
    delegating.delegators = vec![Pattern::new(CI).unwrap()];
    delegating.subjects = vec![Pattern::new("spiffe://corp/app/*").unwrap()];
    assert!(matches!(
        delegating.check(),
        Err(CredentialsError::BadRequest(m)) if m.contains("delegation is for jwt")
    ));
}

/// An Ed25519 key is certified too: digitalSignature only, signed by the CA.
#[test]
fn an_ed25519_key_is_certified() {
    let f = fixture();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(APP)];
    let req = params.serialize_request(&key).unwrap();
    let issued = f
        .engine
        .issue_x509(&f.keys, APP, &ask("self", req.der(), "", 0))
        .unwrap();
    let leaf_der = der_of(&issued.certificate_pem);
    let (_, leaf) = X509Certificate::from_der(&leaf_der[0]).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature() && !ku.value.key_encipherment());
    let chain = der_of(&issued.chain_pem);
    let (_, ca) = X509Certificate::from_der(&chain[0]).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
}

/// A request from a key rcgen cannot make: RSA of `bits`, signed with the rsa crate.
struct Rsa(rsa::PrivateKey, Vec<u8>);

impl Rsa {
    fn new(bits: usize) -> Self {
        use rsa::pkcs1::EncodeRsaPublicKey as _;
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits).unwrap();
        let public = key
            .to_public_key()
            .to_pkcs1_der()
            .unwrap()
            .as_bytes()
            .to_vec();
        Self(key, public)
    }
}

impl PublicKeyData for Rsa {
    fn der_bytes(&self) -> &[u8] {
        &self.1
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

impl SigningKey for Rsa {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let digest = sha2::Sha256::digest(msg);
        self.0
            .sign(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

#[test]
fn bad_requests_are_refused_with_their_reason() {
    let f = fixture();
    let issue = |caller: &str, req: X509Request<'_>| f.engine.issue_x509(&f.keys, caller, &req);
    let csr_problem = |r: Result<_, CredentialsError>| match r {
        Err(CredentialsError::BadCsr(p)) => p,
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("issued"),
    };
    let other = csr(vec![uri("spiffe://corp/app/db")]);
    assert_eq!(
        csr_problem(issue(APP, ask("self", &other, "", 0))),
        CsrProblem::OtherSubject
    );
    let dns = csr(vec![
        uri(APP),
        SanType::DnsName("web.corp".try_into().unwrap()),
    ]);
    assert!(matches!(
        csr_problem(issue(APP, ask("self", &dns, "", 0))),
        CsrProblem::Names(_)
    ));
    let only_dns = csr(vec![SanType::DnsName("web.corp".try_into().unwrap())]);
    assert!(matches!(
        csr_problem(issue(APP, ask("self", &only_dns, "", 0))),
        CsrProblem::Names(_)
    ));
    let two = csr(vec![uri(APP), uri(APP)]);
    assert!(matches!(
        csr_problem(issue(APP, ask("self", &two, "", 0))),
        CsrProblem::Names(_)
    ));
    let small = CertificateParams::default()
        .serialize_request(&Rsa::new(1024))
        .unwrap();
    assert_eq!(
        csr_problem(issue(APP, ask("self", small.der(), "", 0))),
        CsrProblem::RsaSize(1024)
    );
    // A request whose signature is altered: no proof of possession.
    let good = csr(vec![uri(APP)]);
    let mut der = x509_parser::pem::parse_x509_pem(&good).unwrap().1.contents;
    let last = der.len() - 2;
    der[last] ^= 1;
    assert_eq!(
        csr_problem(issue(APP, ask("self", &der, "", 0))),
        CsrProblem::BadSignature
    );
    let big = vec![b'A'; super::MAX_CSR + 1];
    assert_eq!(
        csr_problem(issue(APP, ask("self", &big, "", 0))),
        CsrProblem::TooLarge
    );
    assert_eq!(
        csr_problem(issue(APP, ask("self", b"not a request", "", 0))),
        CsrProblem::Malformed
    );
    let mut trailing = x509_parser::pem::parse_x509_pem(&good).unwrap().1.contents;
    trailing.push(0);
    assert_eq!(
        csr_problem(issue(APP, ask("self", &trailing, "", 0))),
        CsrProblem::Malformed
    );
    // The issuer's rules, as for tokens.
    assert!(matches!(
        issue(APP, ask("self", &good, "", 7201)),
        Err(CredentialsError::BadRequest(_))
    ));
    assert!(issue(APP, ask("self", &good, "", 7200)).is_ok());
    let mut spaced = b"\n  ".to_vec();
    spaced.extend_from_slice(&good);
    spaced.extend_from_slice(b"\r\n\n");
    assert!(
        issue(APP, ask("self", &spaced, "", 0)).is_ok(),
        "PEM with white space"
    );
    assert!(matches!(
        issue("spiffe://corp/other", ask("self", &good, "", 0)),
        Err(CredentialsError::Denied(_))
    ));
    assert!(matches!(
        issue(APP, ask("self", &good, "spiffe://corp/app/db", 0)),
        Err(CredentialsError::Denied(_))
    ));
    assert!(matches!(
        issue(APP, ask("jwt", &good, "", 0)),
        Err(CredentialsError::WrongKind { .. })
    ));
    assert!(matches!(
        issue(APP, ask("nobody", &good, "", 0)),
        Err(CredentialsError::IssuerNotFound(_))
    ));
    // An issuer awaiting its outside CA's certificate issues nothing.
    assert!(matches!(
        issue(APP, ask("outside", &good, "", 0)),
        Err(CredentialsError::NoCaCertificate)
    ));
    // A caller without a SPIFFE ID gets no X.509-SVID.
    let mut i = issuer(Kind::X509);
    i.name = "cn".to_owned();
    i.self_signed = true;
    i.principals = vec![Pattern::new("web").unwrap()];
    f.engine
        .create_issuer(&f.journal(), &f.keys, i, "admin")
        .unwrap();
    assert!(matches!(
        issue("web", ask("cn", &good, "", 0)),
        Err(CredentialsError::BadRequest(_))
    ));
}

/// A root CA made outside kms, and a CA certificate it signs for a request.
struct Root {
    key: KeyPair,
    params: CertificateParams,
}

impl Root {
    fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Corp Root");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        Self { key, params }
    }

    fn pem(&self) -> String {
        self.params.self_signed(&self.key).unwrap().pem()
    }

    /// Signs a certificate for the request `csr` (PEM), changed by `change`.
    fn sign(&self, csr: &str, change: impl FnOnce(&mut CertificateParams)) -> String {
        let mut req = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
        req.params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        req.params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        change(&mut req.params);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        req.params
            .signed_by(&req.public_key, &issuer)
            .unwrap()
            .pem()
    }
}

#[test]
fn an_outside_ca_certificate_is_checked_before_it_is_stored() {
    let f = fixture();
    // A self-signed issuer has no use for an outside CA's request.
    assert!(matches!(
        f.engine.issuer_csr(&f.keys, "self", 0),
        Err(CredentialsError::BadRequest(m)) if m.contains("itself")
    ));
    let set = |version: u32, chain: &str| {
        f.engine
            .set_issuer_certificate(&f.journal(), &f.keys, "outside", version, chain)
    };
    let chain_problem = |r: Result<Issuer, CredentialsError>| match r {
        Err(CredentialsError::BadCaChain(p)) => p,
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("stored"),
    };
    let root = Root::new();
    let (csr, version) = f.engine.issuer_csr(&f.keys, "outside", 0).unwrap();
    assert_eq!(version, 1);
    // The CSR verifies and names the issuer.
    let der = x509_parser::pem::parse_x509_pem(csr.as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
    req.verify_signature().unwrap();
    // Another key's certificate.
    let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other_csr = CertificateParams::default()
        .serialize_request(&other_key)
        .unwrap()
        .pem()
        .unwrap();
    let other = root.sign(&other_csr, |_| {}) + &root.pem();
    assert_eq!(chain_problem(set(1, &other)), ChainProblem::OtherKey(1));
    let not_ca = root.sign(&csr, |p| {
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    }) + &root.pem();
    assert_eq!(chain_problem(set(1, &not_ca)), ChainProblem::NotCa);
    let expired = root.sign(&csr, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }) + &root.pem();
    assert_eq!(chain_problem(set(1, &expired)), ChainProblem::Validity(0));
    // Signed by a root, followed by another root: the signature does not verify.
    let another = Root::new();
    let wrong = root.sign(&csr, |_| {}) + &another.pem();
    assert_eq!(chain_problem(set(1, &wrong)), ChainProblem::Signature(0));
    assert_eq!(chain_problem(set(1, "")), ChainProblem::Size);
    let nine = root.pem().repeat(9);
    assert_eq!(chain_problem(set(1, &nine)), ChainProblem::Size);
    assert!(matches!(
        set(2, &other),
        Err(CredentialsError::KeyUnusable(_))
    ));
    assert!(
        f.engine.issuer("outside").unwrap().ca[0].chain.is_empty(),
        "nothing stored"
    );
    assert!(matches!(
        f.engine
            .set_issuer_certificate(&f.journal(), &f.keys, "self", 1, &other),
        Err(CredentialsError::BadRequest(_))
    ));
    // The right one: stored, and leaves chain up to the root.
    let good = root.sign(&csr, |_| {}) + &root.pem();
    let stored = set(1, &good).unwrap();
    assert_eq!(stored.ca[0].chain.len(), 2);
    let req = csr_for_app();
    let issued = f
        .engine
        .issue_x509(&f.keys, APP, &ask("outside", &req, "", 0))
        .unwrap();
    let chain = der_of(&issued.chain_pem);
    assert_eq!(chain.len(), 2);
    let leaf_der = der_of(&issued.certificate_pem);
    let (_, leaf) = X509Certificate::from_der(&leaf_der[0]).unwrap();
    let (_, ca) = X509Certificate::from_der(&chain[0]).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert_eq!(leaf.issuer(), ca.subject());
    assert_eq!(
        f.engine.ca_pem(&f.keys, "outside", true).unwrap(),
        crate::credentials::pem_chain(&chain[..1])
    );
}

fn csr_for_app() -> Vec<u8> {
    csr(vec![uri(APP)])
}

/// A rotation gives the new version its CA certificate (self-signed issuers) or an entry
/// awaiting one; a version without one never signs.
#[test]
fn a_rotation_makes_the_new_versions_ca_certificate() {
    let f = fixture();
    assert_eq!(f.keys.rotate(), 2);
    let s = f.engine.rotated(&f.journal(), &f.keys, "self").unwrap();
    assert_eq!(s.ca.len(), 2);
    assert!(s.ca.iter().all(|c| c.chain.len() == 1 && c.self_signed));
    let o = f.engine.rotated(&f.journal(), &f.keys, "outside").unwrap();
    assert_eq!(o.ca.len(), 2);
    assert!(o.ca.iter().all(|c| c.chain.is_empty()));
    assert_eq!(f.engine.issuer("self").unwrap(), s, "stored");
    // ca_chain: the enabled versions' CA certificates; a disabled version's is withdrawn.
    let count = |pem: String| pem.matches("BEGIN CERTIFICATE").count();
    assert_eq!(count(f.engine.ca_pem(&f.keys, "self", false).unwrap()), 2);
    f.keys.disabled.lock().unwrap().push(1);
    assert_eq!(count(f.engine.ca_pem(&f.keys, "self", false).unwrap()), 1);
    f.keys.disabled.lock().unwrap().clear();
    // Both keys are old, but version 2's CA certificate was published just now: version 1
    // signs until it has been published for publish_ahead, version 2 after.
    let issue_self = || {
        f.engine
            .issue_x509(&f.keys, APP, &ask("self", &csr_for_app(), "", 0))
            .unwrap()
            .summary
            .key_version
    };
    assert_eq!(issue_self(), 1);
    let mut published = f.engine.issuer("self").unwrap();
    for c in &mut published.ca {
        c.set_at -= model::DEFAULT_PUBLISH_AHEAD;
    }
    f.store
        .write_all(&[f.engine.write(&published).unwrap()])
        .unwrap();
    assert_eq!(issue_self(), 2);
    // Only version 2 of the outside issuer certified: it signs.
    let root = Root::new();
    let (csr2, v) = f.engine.issuer_csr(&f.keys, "outside", 0).unwrap();
    assert_eq!(v, 2);
    f.engine
        .set_issuer_certificate(
            &f.journal(),
            &f.keys,
            "outside",
            2,
            &root.sign(&csr2, |_| {}),
        )
        .unwrap();
    let issued = f
        .engine
        .issue_x509(&f.keys, APP, &ask("outside", &csr_for_app(), "", 0))
        .unwrap();
    assert_eq!(issued.summary.key_version, 2);
    // A CA certificate that expires before the asked lifetime bounds the leaf's.
    let (csr1, _) = f.engine.issuer_csr(&f.keys, "outside", 1).unwrap();
    let soon = crate::keyring::now() + 600;
    let short = root.sign(&csr1, |p| {
        p.not_after =
            time::OffsetDateTime::from_unix_timestamp(i64::try_from(soon).unwrap()).unwrap();
    });
    f.engine
        .set_issuer_certificate(&f.journal(), &f.keys, "outside", 1, &short)
        .unwrap();
    f.engine
        .update_issuer(&f.journal(), &f.keys, "outside", |i| {
            i.publish_ahead = 7 * 86_400
        })
        .unwrap();
    let issued = f
        .engine
        .issue_x509(&f.keys, APP, &ask("outside", &csr_for_app(), "", 0))
        .unwrap();
    assert_eq!(
        issued.summary.key_version, 1,
        "the oldest: none published long enough"
    );
    assert_eq!(issued.summary.expires, soon);
    assert!(matches!(
        f.engine
            .update_issuer(&f.journal(), &f.keys, "outside", |i| i.key =
                "another".to_owned()),
        Err(CredentialsError::BadRequest(_))
    ));
}

/// The SPIFFE bundle: the jwt issuer's key as a `jwt-svid` key with its kid, each x509
/// issuer's CA certificates (those it has) as `x509-svid` keys with the certificate.
#[test]
fn the_spiffe_bundle_names_every_issuers_keys_by_use() {
    let f = fixture();
    let bundle = f.engine.spiffe_bundle(&f.keys, 60).unwrap();
    assert_eq!(bundle["spiffe_refresh_hint"], 60);
    let keys = bundle["keys"].as_array().unwrap();
    let jwt: Vec<_> = keys.iter().filter(|k| k["use"] == "jwt-svid").collect();
    assert_eq!(jwt.len(), 1);
    assert!(jwt[0]["kid"].as_str().is_some_and(|k| !k.is_empty()));
    let x509: Vec<_> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    assert_eq!(
        x509.len(),
        1,
        "the outside CA's issuer has no certificate yet"
    );
    assert!(x509[0].get("kid").is_none() && x509[0]["kty"] == "EC");
    let ca = f.engine.issuer("self").unwrap().ca[0].chain[0].clone();
    assert_eq!(
        x509[0]["x5c"],
        serde_json::json!([data_encoding::BASE64.encode(&ca)])
    );
    assert_eq!(keys.len(), 2);
}

/// An outside CA's certificate whose subject kms could not write again byte for byte as
/// its leaves' issuer (an AD CS-style `DC=com, DC=corp, OU=PKI, OU=Workloads`) is refused
/// when it is set, rather than making leaves that do not chain.
#[test]
fn a_ca_subject_kms_cannot_repeat_is_refused() {
    use std::process::Command;
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (csr, _) = f.engine.issuer_csr(&f.keys, "outside", 0).unwrap();
    std::fs::write(d("kms.csr"), &csr).unwrap();
    std::fs::write(
        d("ext.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &d("root.key"),
        "-out",
        &d("root.pem"),
        "-subj",
        "/CN=Corp Root",
        "-days",
        "30",
    ]);
    let sign = |subject: &str| {
        run(&[
            "x509",
            "-req",
            "-in",
            &d("kms.csr"),
            "-CA",
            &d("root.pem"),
            "-CAkey",
            &d("root.key"),
            "-set_serial",
            "7",
            "-days",
            "30",
            "-extfile",
            &d("ext.cnf"),
            "-subj",
            subject,
            "-out",
            &d("ca.pem"),
        ]);
        std::fs::read_to_string(d("ca.pem")).unwrap()
            + &std::fs::read_to_string(d("root.pem")).unwrap()
    };
    let repeated = sign("/DC=com/DC=corp/OU=PKI/OU=Workloads/CN=kms-outside");
    assert!(matches!(
        f.engine
            .set_issuer_certificate(&f.journal(), &f.keys, "outside", 1, &repeated),
        Err(CredentialsError::BadCaChain(ChainProblem::SubjectName))
    ));
    // Distinct attributes: set, and the leaf names the CA as its issuer byte for byte.
    let plain = sign("/O=Corp/OU=PKI/CN=kms-outside");
    f.engine
        .set_issuer_certificate(&f.journal(), &f.keys, "outside", 1, &plain)
        .unwrap();
    let issued = f
        .engine
        .issue_x509(&f.keys, APP, &ask("outside", &csr_for_app(), "", 0))
        .unwrap();
    let leaf_der = der_of(&issued.certificate_pem);
    let chain_der = der_of(&issued.chain_pem);
    let (_, leaf) = X509Certificate::from_der(&leaf_der[0]).unwrap();
    let (_, ca) = X509Certificate::from_der(&chain_der[0]).unwrap();
    assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
}

/// A certificate above the CA's that is no CA, or that its CA certificate does not name
/// as its issuer, is refused.
#[test]
fn a_chain_through_a_non_ca_or_another_name_is_refused() {
    let f = fixture();
    let upper_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut upper = CertificateParams::default();
    upper.distinguished_name = rcgen::DistinguishedName::new();
    upper
        .distinguished_name
        .push(rcgen::DnType::CommonName, "not a CA at all");
    upper.is_ca = rcgen::IsCa::ExplicitNoCa;
    upper.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let upper_pem = upper.self_signed(&upper_key).unwrap().pem();
    let (csr, _) = f.engine.issuer_csr(&f.keys, "outside", 0).unwrap();
    let mut req = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
    req.params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    req.params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let set = |chain: String| {
        f.engine
            .set_issuer_certificate(&f.journal(), &f.keys, "outside", 1, &chain)
    };
    // Signed by the non-CA's key under its own name: refused as no CA.
    let issuer = rcgen::Issuer::from_params(&upper, &upper_key);
    let ca = req
        .params
        .signed_by(&req.public_key, &issuer)
        .unwrap()
        .pem();
    assert!(matches!(
        set(ca + &upper_pem),
        Err(CredentialsError::BadCaChain(ChainProblem::UpperNotCa(1)))
    ));
    // Signed by the same key under another name: refused, the names do not chain.
    let mut renamed = upper.clone();
    renamed.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    renamed.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let renamed_pem = renamed.self_signed(&upper_key).unwrap().pem();
    renamed.distinguished_name = rcgen::DistinguishedName::new();
    renamed
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Some Other Root");
    let issuer = rcgen::Issuer::from_params(&renamed, &upper_key);
    let ca = req
        .params
        .signed_by(&req.public_key, &issuer)
        .unwrap()
        .pem();
    assert!(matches!(
        set(ca + &renamed_pem),
        Err(CredentialsError::BadCaChain(ChainProblem::Names(0)))
    ));
    assert!(
        f.engine
            .issuer("outside")
            .unwrap()
            .ca
            .iter()
            .all(|c| c.chain.is_empty())
    );
}
