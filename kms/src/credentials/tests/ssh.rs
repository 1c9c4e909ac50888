//! OpenSSH certificates: issued by the engine, decoded back field by field and verified
//! with the CA key, for a P-256 and an Ed25519 key (sshd and ssh-keygen read them in
//! softhsm-tests/tests/credentials_ssh.rs).

use std::collections::BTreeMap;
use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePublicKey as _;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::LineEnding;

use super::super::ssh::{Reader, SshKeyError};
use super::super::{SshRequest, model};
use super::{CredentialsError, Direct, Fixture, KeySource, KeyVersion, KeyVersions};
use super::{fixture, issuer};
use crate::keyring::model::Algorithm;
use crate::policy::Pattern;

const ALICE: &str = "spiffe://corp/people/alice";
const ED25519_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH alice@laptop";

/// One Ed25519 key version.
struct EdKeys(ed25519_dalek::SigningKey);

impl KeySource for EdKeys {
    fn versions(&self, _: &str) -> Result<KeyVersions, CredentialsError> {
        Ok(KeyVersions {
            algorithm: Algorithm::Ed25519,
            enabled: vec![KeyVersion {
                version: 1,
                created_at: 0,
            }],
        })
    }

    fn public_key(&self, _: &str, _: u32) -> Result<String, CredentialsError> {
        Ok(self
            .0
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap())
    }

    fn sign(
        &self,
        _: &str,
        _: u32,
        message: &[u8],
        _: super::SignatureEncoding,
    ) -> Result<Vec<u8>, CredentialsError> {
        use ed25519_dalek::Signer as _;
        Ok(self.0.sign(message).to_bytes().to_vec())
    }

    fn sign_granted(&self, _: &str) -> Result<bool, CredentialsError> {
        Ok(false)
    }
}

fn ssh_issuer(name: &str, kind: model::Kind) -> model::Issuer {
    let mut i = issuer();
    i.name = name.to_owned();
    i.key = format!("{name}-ca");
    i.kind = kind;
    i.audiences.clear();
    i.claims.clear();
    i.delegators.clear();
    i.subjects.clear();
    i.principals = vec![Pattern::new("spiffe://corp/people/*").unwrap()];
    i.ssh_principals = vec!["root".to_owned(), "alice".to_owned()];
    i.default_ttl = 3600;
    i.max_ttl = 7200;
    if kind == model::Kind::SshUser {
        i.ssh_extensions = vec!["permit-pty".to_owned(), "permit-X11-forwarding".to_owned()];
        i.ssh_critical_options = BTreeMap::from([
            ("force-command".to_owned(), "/bin/true".to_owned()),
            ("source-address".to_owned(), "10.0.0.0/8,::1".to_owned()),
            ("verify-required".to_owned(), String::new()),
        ]);
    }
    i
}

fn create(f: &Fixture, keys: &dyn KeySource, i: model::Issuer) {
    f.engine
        .create_issuer(&Direct(Arc::clone(&f.store)), keys, i, "admin")
        .unwrap();
}

fn ask<'a>(issuer: &'a str, key: &'a str, principals: &'a [String], ttl: u64) -> SshRequest<'a> {
    SshRequest {
        issuer,
        public_key: key,
        principals,
        ttl,
    }
}

/// A certificate's fields, decoded as OpenSSH reads them.
#[derive(Debug)]
struct Decoded {
    kind: String,
    serial: u64,
    cert_type: u32,
    key_id: String,
    principals: Vec<String>,
    valid_after: u64,
    valid_before: u64,
    options: Vec<(String, Vec<u8>)>,
    extensions: Vec<(String, Vec<u8>)>,
    ca: Vec<u8>,
    signature: Vec<u8>,
    signed: Vec<u8>,
    comment: String,
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

fn pairs(b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut r = Reader::new(b);
    let mut out = Vec::new();
    while !r.is_empty() {
        out.push((text(r.string().unwrap()), r.string().unwrap().to_vec()));
    }
    out
}

fn decode(line: &str) -> Decoded {
    let mut parts = line.trim_end().splitn(3, ' ');
    let kind = parts.next().unwrap().to_owned();
    let blob = data_encoding::BASE64
        .decode(parts.next().unwrap().as_bytes())
        .unwrap();
    let comment = parts.next().unwrap_or_default().to_owned();
    let mut r = Reader::new(&blob);
    assert_eq!(text(r.string().unwrap()), kind);
    assert_eq!(r.string().unwrap().len(), 32, "nonce");
    assert_eq!(
        kind, "ssh-ed25519-cert-v01@openssh.com",
        "the test certifies Ed25519 keys"
    );
    assert_eq!(r.string().unwrap(), [7u8; 32]);
    let serial = r.u64().unwrap();
    let cert_type = r.u32().unwrap();
    let key_id = text(r.string().unwrap());
    let mut pr = Reader::new(r.string().unwrap());
    let mut principals = Vec::new();
    while !pr.is_empty() {
        principals.push(text(pr.string().unwrap()));
    }
    let valid_after = r.u64().unwrap();
    let valid_before = r.u64().unwrap();
    let options = pairs(r.string().unwrap());
    let extensions = pairs(r.string().unwrap());
    assert!(r.string().unwrap().is_empty(), "reserved");
    let ca = r.string().unwrap().to_vec();
    let signed_len = consumed(&blob, &ca);
    let signature = r.string().unwrap().to_vec();
    assert!(r.is_empty());
    Decoded {
        kind,
        serial,
        cert_type,
        key_id,
        principals,
        valid_after,
        valid_before,
        options,
        extensions,
        ca,
        signature,
        signed: blob[..signed_len].to_vec(),
        comment,
    }
}

/// Where the CA key's field ends in `blob` (the signed bytes end there).
fn consumed(blob: &[u8], ca: &[u8]) -> usize {
    let at = blob.windows(ca.len()).rposition(|w| w == ca).unwrap();
    at + ca.len()
}

/// Verifies `d`'s signature with its CA key (as OpenSSH's sshkey_verify does).
fn verify(d: &Decoded) {
    let mut ca = Reader::new(&d.ca);
    let mut sig = Reader::new(&d.signature);
    let ca_type = text(ca.string().unwrap());
    assert_eq!(text(sig.string().unwrap()), ca_type);
    let blob = sig.string().unwrap();
    assert!(sig.is_empty());
    match ca_type.as_str() {
        "ecdsa-sha2-nistp256" => {
            assert_eq!(ca.string().unwrap(), b"nistp256");
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(ca.string().unwrap()).unwrap();
            let mut rs = Reader::new(blob);
            let (r, s) = (rs.string().unwrap(), rs.string().unwrap());
            assert!(rs.is_empty());
            let mut raw = [0u8; 64];
            let strip = |n: &[u8]| {
                n.iter()
                    .skip_while(|b| **b == 0)
                    .copied()
                    .collect::<Vec<_>>()
            };
            let (r, s) = (strip(r), strip(s));
            raw[32 - r.len()..32].copy_from_slice(&r);
            raw[64 - s.len()..].copy_from_slice(&s);
            let signature = p256::ecdsa::Signature::from_slice(&raw).unwrap();
            key.verify(&d.signed, &signature).unwrap();
        }
        "ssh-ed25519" => {
            let key =
                ed25519_dalek::VerifyingKey::from_bytes(ca.string().unwrap().try_into().unwrap())
                    .unwrap();
            let signature = ed25519_dalek::Signature::from_slice(blob).unwrap();
            key.verify_strict(&d.signed, &signature).unwrap();
        }
        other => unreachable!("CA type {other}"),
    }
    assert!(ca.is_empty());
}

#[test]
fn a_user_certificate_carries_what_the_issuer_says_and_verifies() {
    let f = fixture();
    create(&f, &f.keys, ssh_issuer("users", model::Kind::SshUser));
    let before = crate::keyring::now();
    let issued = f
        .engine
        .issue_ssh(&f.keys, ALICE, &ask("users", ED25519_KEY, &[], 600))
        .unwrap();
    let d = decode(&issued.certificate);
    assert_eq!(d.kind, "ssh-ed25519-cert-v01@openssh.com");
    assert_eq!(d.comment, "alice@laptop");
    assert_eq!(d.serial, issued.serial);
    assert_eq!(d.cert_type, 1);
    assert_eq!(d.key_id, ALICE);
    assert_eq!(d.principals, ["root", "alice"]);
    assert!(d.valid_after + 60 >= before && d.valid_after + 60 <= before + 2);
    assert_eq!(d.valid_before, d.valid_after + 60 + 600);
    let names = |l: &[(String, Vec<u8>)]| l.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&d.options),
        ["force-command", "source-address", "verify-required"]
    );
    // A value is a string inside the data string; a flag's data is empty.
    assert_eq!(d.options[0].1, b"\0\0\0\x09/bin/true");
    assert_eq!(d.options[1].1, b"\0\0\0\x0e10.0.0.0/8,::1");
    assert!(d.options[2].1.is_empty());
    assert_eq!(
        names(&d.extensions),
        ["permit-X11-forwarding", "permit-pty"]
    );
    assert!(d.extensions.iter().all(|(_, v)| v.is_empty()));
    verify(&d);
    // The record: the serial as its jti, the caller, the principals.
    assert_eq!(issued.summary.jti, d.serial.to_string());
    assert_eq!(issued.summary.subject, ALICE);
    assert_eq!(issued.summary.kind, "ssh_user");
    assert_eq!(issued.summary.principals, ["root", "alice"]);
    assert_eq!(issued.summary.expires, d.valid_before);
    assert_eq!(issued.summary.key_version, 1);
    // The CA key served for TrustedUserCAKeys is the one in the certificate.
    let published = f.engine.ssh_ca_keys(&f.keys, "users").unwrap();
    let b64 = published.lines().next().unwrap().split(' ').nth(1).unwrap();
    assert_eq!(data_encoding::BASE64.decode(b64.as_bytes()).unwrap(), d.ca);
    // Two certificates differ in serial and nonce.
    let again = f
        .engine
        .issue_ssh(&f.keys, ALICE, &ask("users", ED25519_KEY, &[], 0))
        .unwrap();
    assert_ne!(again.serial, issued.serial);
    let d2 = decode(&again.certificate);
    assert_eq!(
        d2.valid_before - d2.valid_after,
        3600 + 60,
        "the default ttl"
    );
}

/// A fixed principal is for every caller the issuer allows (a shared account); `{{name}}`
/// is each caller's own name, which no other caller gets.
#[test]
fn a_caller_gets_its_own_name_and_the_shared_principals_only() {
    let f = fixture();
    let mut i = ssh_issuer("people", model::Kind::SshUser);
    i.ssh_principals = vec![model::CALLER_NAME.to_owned(), "deploy".to_owned()];
    create(&f, &f.keys, i);
    let bob = "spiffe://corp/people/bob";
    let issue = |who: &str, asked: &[String]| {
        f.engine
            .issue_ssh(&f.keys, who, &ask("people", ED25519_KEY, asked, 600))
    };
    assert_eq!(issue(ALICE, &[]).unwrap().principals, ["alice", "deploy"]);
    assert_eq!(issue(bob, &[]).unwrap().principals, ["bob", "deploy"]);
    assert_eq!(issue(bob, &["bob".to_owned()]).unwrap().principals, ["bob"]);
    for other in ["alice", "{{name}}", "root"] {
        let e = issue(bob, &[other.to_owned()]).err().unwrap();
        assert!(matches!(e, CredentialsError::Denied(_)), "{other}: {e}");
    }
    let many: Vec<String> = (0..65).map(|_| "bob".to_owned()).collect();
    assert!(matches!(
        issue(bob, &many).err().unwrap(),
        CredentialsError::BadRequest(_)
    ));
    // A caller whose name is not an SSH principal gets the shared ones only.
    assert_eq!(model::caller_name("spiffe://corp/people/a,b"), None);
    assert_eq!(model::caller_name("cn:build host"), None);
    assert_eq!(model::caller_name("cn:ci"), Some("ci"));
    assert_eq!(
        model::caller_name("spiffe://corp/host/db1.corp"),
        Some("db1.corp")
    );
    assert_eq!(model::caller_name("spiffe://corp"), None);
}

#[test]
fn a_host_certificate_from_an_ed25519_key_carries_no_options() {
    let f = fixture();
    let keys = EdKeys(ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]));
    let mut host = ssh_issuer("hosts", model::Kind::SshHost);
    host.ssh_principals = vec!["web1.corp".to_owned(), "10.0.0.5".to_owned()];
    create(&f, &keys, host);
    let one = ["web1.corp".to_owned()];
    let issued = f
        .engine
        .issue_ssh(&keys, ALICE, &ask("hosts", ED25519_KEY, &one, 0))
        .unwrap();
    let d = decode(&issued.certificate);
    assert_eq!(d.cert_type, 2);
    assert_eq!(d.principals, one);
    assert!(d.options.is_empty() && d.extensions.is_empty());
    verify(&d);
    assert!(
        f.engine
            .ssh_ca_keys(&keys, "hosts")
            .unwrap()
            .starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI")
    );
}

#[test]
fn requests_an_ssh_issuer_would_not_grant_are_refused_with_their_error() {
    let f = fixture();
    create(&f, &f.keys, ssh_issuer("users", model::Kind::SshUser));
    let issue = |issuer: &str, caller: &str, key: &str, principals: &[String], ttl| {
        f.engine
            .issue_ssh(&f.keys, caller, &ask(issuer, key, principals, ttl))
    };
    assert!(matches!(
        issue("users", "spiffe://corp/app/web", ED25519_KEY, &[], 0),
        Err(CredentialsError::Denied(_))
    ));
    assert!(matches!(
        issue("users", ALICE, ED25519_KEY, &["bob".to_owned()], 0),
        Err(CredentialsError::Denied(_))
    ));
    assert!(matches!(
        issue("users", ALICE, ED25519_KEY, &[], 7201),
        Err(CredentialsError::BadRequest(_))
    ));
    assert!(matches!(
        issue("users", ALICE, "ssh-ed25519 AAAA", &[], 0),
        Err(CredentialsError::SshKey(SshKeyError::Malformed(_)))
    ));
    assert!(matches!(
        issue("workloads", ALICE, ED25519_KEY, &[], 0),
        Err(CredentialsError::WrongKind { .. })
    ));
    assert!(matches!(
        issue("nobody", ALICE, ED25519_KEY, &[], 0),
        Err(CredentialsError::IssuerNotFound(_))
    ));
    assert!(matches!(
        f.engine.ssh_ca_keys(&f.keys, "workloads"),
        Err(CredentialsError::WrongKind { .. })
    ));
    // A principal named twice is named once.
    let twice = ["alice".to_owned(), "alice".to_owned()];
    let d = decode(
        &issue("users", ALICE, ED25519_KEY, &twice, 0)
            .unwrap()
            .certificate,
    );
    assert_eq!(d.principals, ["alice"]);
}

#[test]
fn an_ssh_issuers_key_is_p256_or_ed25519() {
    let f = fixture();
    for algorithm in [Algorithm::EcdsaP384Sha384, Algorithm::RsaSignPss2048Sha256] {
        let keys = super::Keys::new(algorithm);
        assert!(matches!(
            f.engine.create_issuer(
                &Direct(Arc::clone(&f.store)),
                &keys,
                ssh_issuer("users", model::Kind::SshUser),
                "admin"
            ),
            Err(CredentialsError::KeyUnusable(_))
        ));
    }
}

#[test]
fn an_ssh_issuers_settings_are_checked() {
    assert!(ssh_issuer("u", model::Kind::SshUser).check().is_ok());
    let mut host = ssh_issuer("h", model::Kind::SshHost);
    assert!(host.check().is_ok());
    host.ssh_extensions = vec!["permit-pty".to_owned()];
    assert!(
        host.check().is_err(),
        "a host certificate has no extensions"
    );
    let bad: Vec<fn(&mut model::Issuer)> = vec![
        |i| i.ssh_principals.clear(),
        |i| i.ssh_principals = (0..65).map(|n| format!("u{n}")).collect(),
        |i| i.ssh_principals = vec!["a b".to_owned()],
        |i| i.ssh_principals = vec!["a,b".to_owned()],
        |i| i.ssh_principals = vec!["a\u{7}".to_owned()],
        |i| i.ssh_principals = vec![String::new()],
        |i| i.ssh_principals = vec!["x".repeat(257)],
        |i| i.ssh_extensions = vec!["permit-everything".to_owned()],
        |i| i.ssh_extensions = vec!["permit-pty".to_owned(), "permit-pty".to_owned()],
        |i| {
            i.ssh_critical_options
                .insert("no-such-option".to_owned(), String::new());
        },
        |i| {
            i.ssh_critical_options
                .insert("force-command".to_owned(), String::new());
        },
        |i| {
            i.ssh_critical_options
                .insert("verify-required".to_owned(), "yes".to_owned());
        },
        |i| {
            i.ssh_critical_options
                .insert("source-address".to_owned(), "10.0.0.1/8".to_owned());
        },
        |i| {
            i.ssh_critical_options
                .insert("source-address".to_owned(), "10.0.0.0/33".to_owned());
        },
        |i| {
            i.ssh_critical_options
                .insert("source-address".to_owned(), "10.0.0.0/8,".to_owned());
        },
        |i| {
            i.ssh_critical_options
                .insert("source-address".to_owned(), "*.corp".to_owned());
        },
        |i| i.delegators = vec![Pattern::new("spiffe://corp/ci").unwrap()],
        |i| i.audiences = vec!["x".to_owned()],
    ];
    for (n, change) in bad.iter().enumerate() {
        let mut i = ssh_issuer("u", model::Kind::SshUser);
        change(&mut i);
        assert!(i.check().is_err(), "change {n} accepted");
    }
    let mut ok = ssh_issuer("u", model::Kind::SshUser);
    ok.ssh_critical_options.insert(
        "source-address".to_owned(),
        "192.168.1.7,10.0.0.0/8,2001:db8::/32,0.0.0.0/0".to_owned(),
    );
    assert!(ok.check().is_ok());
}

#[test]
fn a_new_ca_key_is_published_before_it_signs() {
    let f = fixture();
    create(&f, &f.keys, ssh_issuer("users", model::Kind::SshUser));
    let ca_of = |line: &str| decode(line).ca;
    let issue = || {
        f.engine
            .issue_ssh(&f.keys, ALICE, &ask("users", ED25519_KEY, &[], 0))
            .unwrap()
    };
    let first = issue();
    // A version made just now is published at once and does not sign yet.
    let v2 = f.keys.rotate(0);
    let published = f.engine.ssh_ca_keys(&f.keys, "users").unwrap();
    assert_eq!(published.lines().count(), 2, "{published}");
    assert!(published.lines().nth(1).unwrap().ends_with(":v2"));
    let still = issue();
    assert_eq!(still.summary.key_version, 1);
    assert_eq!(ca_of(&still.certificate), ca_of(&first.certificate));
    // One published for longer than publish_ahead signs.
    f.keys
        .set(v2, |v| v.created_at -= model::DEFAULT_PUBLISH_AHEAD);
    let rotated = issue();
    assert_eq!(rotated.summary.key_version, 2);
    let d = decode(&rotated.certificate);
    verify(&d);
    assert_ne!(d.ca, ca_of(&first.certificate));
    // A disabled version is no longer published.
    f.keys.set(1, |v| v.enabled = false);
    assert_eq!(
        f.engine
            .ssh_ca_keys(&f.keys, "users")
            .unwrap()
            .lines()
            .count(),
        1
    );
}
