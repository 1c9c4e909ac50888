//! The engine against a real redb store and a key source of software P-256 keys (the
//! keyring's own signing is tested with the keyring; the server's, with SoftHSM, in
//! softhsm-tests/tests/credentials.rs).

use std::sync::{Arc, Mutex};

use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::Generate as _;
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use serde_json::Value;

use super::model::{self, Issuer};
use super::{
    Credentials, CredentialsError, ISSUERS, Journal, JwtRequest, KeySource, KeyVersion,
    KeyVersions, SignatureEncoding,
};
use crate::barrier::Barrier;
use crate::keyring::model::Algorithm;
use crate::policy::Pattern;
use crate::store::{RedbStore, Store, Write};

const BASE: &str = "https://kms.example:8201";
const APP: &str = "spiffe://corp/app/web";
const CI: &str = "spiffe://corp/ci";

/// Versions of one P-256 key, each with when it was made and whether it is enabled.
struct Keys {
    versions: Mutex<Vec<Version>>,
    algorithm: Algorithm,
    /// Whether a grant lets someone sign with the key.
    granted: Mutex<bool>,
}

struct Version {
    key: p256::ecdsa::SigningKey,
    created_at: u64,
    enabled: bool,
}

impl Keys {
    fn new(algorithm: Algorithm) -> Self {
        Self {
            versions: Mutex::new(vec![Version {
                key: new_key(),
                created_at: crate::keyring::now() - 86_400,
                enabled: true,
            }]),
            algorithm,
            granted: Mutex::new(false),
        }
    }

    /// Adds a version made `age` seconds ago; its number.
    fn rotate(&self, age: u64) -> u32 {
        let mut versions = self.versions.lock().unwrap();
        versions.push(Version {
            key: new_key(),
            created_at: crate::keyring::now() - age,
            enabled: true,
        });
        u32::try_from(versions.len()).unwrap()
    }

    fn set(&self, version: u32, change: impl FnOnce(&mut Version)) {
        change(&mut self.versions.lock().unwrap()[version as usize - 1]);
    }
}

fn new_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap()
}

impl KeySource for Keys {
    fn versions(&self, key: &str) -> Result<KeyVersions, CredentialsError> {
        let _ = key;
        let enabled = (1..)
            .zip(self.versions.lock().unwrap().iter())
            .filter(|(_, v)| v.enabled)
            .map(|(version, v)| KeyVersion {
                version,
                created_at: v.created_at,
            })
            .collect();
        Ok(KeyVersions {
            algorithm: self.algorithm,
            enabled,
        })
    }

    fn public_key(&self, _: &str, version: u32) -> Result<String, CredentialsError> {
        let versions = self.versions.lock().unwrap();
        let v = &versions[version as usize - 1];
        Ok(v.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap())
    }

    fn sign_granted(&self, _: &str) -> Result<bool, CredentialsError> {
        Ok(*self.granted.lock().unwrap())
    }

    fn sign(
        &self,
        _: &str,
        version: u32,
        message: &[u8],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>, CredentialsError> {
        assert_eq!(encoding, SignatureEncoding::Raw);
        let versions = self.versions.lock().unwrap();
        let v = &versions[version as usize - 1];
        assert!(v.enabled, "a disabled version does not sign");
        let sig: p256::ecdsa::Signature = v.key.sign(message);
        Ok(sig.to_bytes().to_vec())
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

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("kms.redb")).unwrap());
    let barrier = Arc::new(Barrier::new(zeroize::Zeroizing::new([9u8; 32])));
    let engine = Credentials::open(barrier, Arc::clone(&store));
    let f = Fixture {
        _dir: dir,
        store,
        engine,
        keys: Keys::new(Algorithm::EcdsaP256Sha256),
    };
    f.engine
        .create_issuer(&Direct(Arc::clone(&f.store)), &f.keys, issuer(), "admin")
        .unwrap();
    f
}

fn issuer() -> Issuer {
    Issuer {
        schema: model::SCHEMA,
        name: "workloads".to_owned(),
        kind: model::Kind::Jwt,
        publish_ahead: model::DEFAULT_PUBLISH_AHEAD,
        ca: Vec::new(),
        self_signed: false,
        ssh_principals: Vec::new(),
        ssh_critical_options: Default::default(),
        ssh_extensions: Vec::new(),
        key: "signer".to_owned(),
        principals: vec![Pattern::new("spiffe://corp/app/*").unwrap()],
        audiences: vec!["payments".to_owned()],
        default_ttl: 300,
        max_ttl: 600,
        claims: [("team".to_owned(), "platform".to_owned())].into(),
        delegators: vec![Pattern::new(CI).unwrap()],
        subjects: vec![Pattern::new("spiffe://corp/app/*").unwrap()],
        created_ms: 0,
        created_by: String::new(),
    }
}

fn ask<'a>(audience: &'a str, subject: &'a str, ttl: u64) -> JwtRequest<'a> {
    JwtRequest {
        issuer: "workloads",
        audience,
        subject,
        ttl,
    }
}

fn claims_of(token: &str) -> serde_json::Map<String, Value> {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_token_carries_the_jwt_svid_claims_and_validates() {
    let f = fixture();
    let issued = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), APP, &ask("payments", "", 0))
        .unwrap();
    let c = claims_of(&issued.token);
    assert_eq!(
        c["iss"],
        format!("{BASE}/v1/identity/oidc/provider/workloads")
    );
    assert_eq!(c["sub"], APP);
    assert_eq!(c["aud"], serde_json::json!(["payments"]));
    assert_eq!(c["team"], "platform");
    assert_eq!(c["jti"], issued.summary.jti.as_str());
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        300,
        "the issuer's default lifetime"
    );
    assert!(c.get("act").is_none());
    assert_eq!(issued.summary.subject, APP);
    assert_eq!(issued.summary.actor, None);
    let v = f
        .engine
        .validate_jwt(&f.keys, Some(BASE), "workloads", &issued.token, "payments")
        .unwrap()
        .unwrap();
    assert_eq!(v.subject, APP);
    assert_eq!(v.jti, issued.summary.jti);
    // Another audience, another issuer URL: not valid.
    assert!(
        f.engine
            .validate_jwt(&f.keys, Some(BASE), "workloads", &issued.token, "other")
            .unwrap()
            .is_err()
    );
    assert!(
        f.engine
            .validate_jwt(
                &f.keys,
                Some("https://elsewhere"),
                "workloads",
                &issued.token,
                "payments"
            )
            .unwrap()
            .is_err()
    );
}

#[test]
fn a_delegator_asks_for_its_subjects_only_and_the_token_names_it() {
    let f = fixture();
    let issued = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), CI, &ask("payments", APP, 0))
        .unwrap();
    let c = claims_of(&issued.token);
    assert_eq!(c["sub"], APP);
    assert_eq!(c["act"], serde_json::json!({ "sub": CI }));
    assert_eq!(issued.summary.actor.as_deref(), Some(CI));
    for (caller, subject) in [
        (CI, "spiffe://corp/admin"),
        (APP, "spiffe://corp/app/db"),
        (CI, ""),
    ] {
        assert!(
            matches!(
                f.engine
                    .issue_jwt(&f.keys, Some(BASE), caller, &ask("payments", subject, 0)),
                Err(CredentialsError::Denied(_))
            ),
            "{caller} for {subject:?}"
        );
    }
}

#[test]
fn requests_out_of_the_issuers_bounds_are_refused() {
    let f = fixture();
    let issue =
        |caller: &str, req: JwtRequest<'_>| f.engine.issue_jwt(&f.keys, Some(BASE), caller, &req);
    // The refusals say what the issuer allows (its audiences are public), not what was sent.
    assert!(matches!(
        issue(APP, ask("elsewhere", "", 0)),
        Err(CredentialsError::Denied(m))
            if m.contains("(it issues for: payments)") && !m.contains("elsewhere")
    ));
    assert!(matches!(
        issue(APP, ask("payments", "", 601)),
        Err(CredentialsError::BadRequest(m)) if m.contains("ttl_seconds 601 is over") && m.contains(", 600")
    ));
    assert!(issue(APP, ask("payments", "", 600)).is_ok());
    assert!(matches!(
        issue("spiffe://corp/other", ask("payments", "", 0)),
        Err(CredentialsError::Denied(_))
    ));
    assert!(matches!(
        f.engine.issue_jwt(
            &f.keys,
            Some(BASE),
            APP,
            &JwtRequest {
                issuer: "nobody",
                ..ask("payments", "", 0)
            }
        ),
        Err(CredentialsError::IssuerNotFound(_))
    ));
    // Without the HTTPS front, no token: none could name where its keys are.
    assert!(matches!(
        f.engine
            .issue_jwt(&f.keys, None, APP, &ask("payments", "", 0)),
        Err(CredentialsError::NoHttpsFront)
    ));
    // A key that cannot sign JWTs: the issuer is refused.
    let ed = Keys::new(Algorithm::Ed25519);
    let mut other = issuer();
    other.name = "ed".to_owned();
    assert!(matches!(
        f.engine
            .create_issuer(&Direct(Arc::clone(&f.store)), &ed, other, "admin"),
        Err(CredentialsError::KeyUnusable(_))
    ));
}

/// The kids of the issuer's JWKS, in order.
fn published_kids(f: &Fixture) -> Vec<String> {
    f.engine.jwks(&f.keys, "workloads").unwrap()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// A new version is published at once and signs once it has been published for the
/// issuer's `publish_ahead`; the old one stays published; a new version with every older
/// one disabled signs at once (an emergency rotation).
#[test]
fn a_new_version_is_published_before_it_signs() {
    let f = fixture();
    let issue = || {
        f.engine
            .issue_jwt(&f.keys, Some(BASE), APP, &ask("payments", "", 0))
            .unwrap()
    };
    let first = issue();
    assert_eq!(first.key_version, 1);
    let ahead = model::DEFAULT_PUBLISH_AHEAD;
    assert_eq!(f.keys.rotate(ahead - 5), 2);
    let kids = published_kids(&f);
    assert_eq!(kids.len(), 2, "the new version is published at once");
    let before = issue();
    assert_eq!(
        before.key_version, 1,
        "published for less than publish_ahead"
    );
    assert_eq!(kids[0], before.kid);
    f.keys.set(2, |v| v.created_at -= 5);
    let after = issue();
    assert_eq!(after.key_version, 2, "published for publish_ahead");
    assert_eq!(kids[1], after.kid);
    for t in [&first, &before, &after] {
        assert!(
            f.engine
                .validate_jwt(&f.keys, Some(BASE), "workloads", &t.token, "payments")
                .unwrap()
                .is_ok()
        );
    }
    // An issuer that publishes for 0 seconds signs with the newest at once.
    assert_eq!(f.keys.rotate(0), 3);
    assert_eq!(issue().key_version, 2);
    f.engine
        .update_issuer(&Direct(Arc::clone(&f.store)), &f.keys, "workloads", |i| {
            i.publish_ahead = 0
        })
        .unwrap();
    assert_eq!(issue().key_version, 3);
    // The older versions disabled, a new version signs at once whatever the setting.
    f.engine
        .update_issuer(&Direct(Arc::clone(&f.store)), &f.keys, "workloads", |i| {
            i.publish_ahead = 3600
        })
        .unwrap();
    assert_eq!(f.keys.rotate(0), 4);
    assert_eq!(issue().key_version, 1, "the only one published for an hour");
    for v in 1..=3 {
        f.keys.set(v, |v| v.enabled = false);
    }
    assert_eq!(issue().key_version, 4);
    assert_eq!(published_kids(&f).len(), 1);
}

/// A request that names no audience gets the issuer's only one; an issuer with several
/// refuses it.
#[test]
fn no_audience_named_is_the_issuers_only_one() {
    let f = fixture();
    let issued = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), APP, &ask("", "", 0))
        .unwrap();
    assert_eq!(issued.summary.audience, "payments");
    assert_eq!(
        claims_of(&issued.token)["aud"],
        serde_json::json!(["payments"])
    );
    f.engine
        .update_issuer(&Direct(Arc::clone(&f.store)), &f.keys, "workloads", |i| {
            i.audiences.push("ledger".to_owned())
        })
        .unwrap();
    let e = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), APP, &ask("", "", 0))
        .err()
        .unwrap();
    assert!(
        matches!(&e, CredentialsError::BadRequest(m) if m.contains("several audiences")),
        "{e}"
    );
}

#[test]
fn the_signing_version_is_the_newest_published_long_enough() {
    let v = |version, created_at| KeyVersion {
        version,
        created_at,
    };
    let versions = [v(1, 0), v(2, 1000), v(3, 1100)];
    let pick = |ahead, now| super::signing_version(&versions, ahead, now, |_| true);
    assert_eq!(pick(120, 1119), Some(1));
    assert_eq!(pick(120, 1120), Some(2));
    assert_eq!(pick(120, 1219), Some(2));
    assert_eq!(pick(120, 1220), Some(3));
    assert_eq!(pick(2000, 1500), Some(1), "none old enough: the oldest");
    assert_eq!(pick(0, 1100), Some(3));
    assert_eq!(
        super::signing_version(&versions, 0, 5000, |n| n != 3),
        Some(2),
        "only usable versions"
    );
    assert_eq!(super::signing_version(&versions, 0, 5000, |_| false), None);
    assert_eq!(super::signing_version(&[], 0, 5000, |_| true), None);
}

#[test]
fn an_issuer_record_altered_in_the_store_is_refused() {
    let f = fixture();
    let sealed = f.store.get(ISSUERS, "workloads").unwrap().unwrap();
    // Moved under another name: it does not open there.
    f.store.put(ISSUERS, "moved", &sealed).unwrap();
    assert!(matches!(
        f.engine.issuer("moved"),
        Err(CredentialsError::Tampered(_))
    ));
    assert_eq!(f.engine.issuers().unwrap().len(), 1, "left out of the list");
    let mut bytes = sealed;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    f.store.put(ISSUERS, "workloads", &bytes).unwrap();
    assert!(matches!(
        f.engine
            .issue_jwt(&f.keys, Some(BASE), APP, &ask("payments", "", 0)),
        Err(CredentialsError::Tampered(_))
    ));
}

#[test]
fn an_update_is_checked_as_a_new_issuer_is() {
    let f = fixture();
    let journal = Direct(Arc::clone(&f.store));
    let updated = f
        .engine
        .update_issuer(&journal, &f.keys, "workloads", |i| i.max_ttl = 900)
        .unwrap();
    assert_eq!(updated.max_ttl, 900);
    assert!(matches!(
        f.engine
            .update_issuer(&journal, &f.keys, "workloads", |i| i.audiences.clear()),
        Err(CredentialsError::BadRequest(_))
    ));
    assert_eq!(
        f.engine.issuer("workloads").unwrap().audiences,
        ["payments"]
    );
    // The key is the issuer's for good: another would withdraw the old keys' public
    // keys at once and sign unpublished.
    assert!(matches!(
        f.engine
            .update_issuer(&journal, &f.keys, "workloads", |i| i.key = "other".to_owned()),
        Err(CredentialsError::BadRequest(m)) if m.contains("rotate")
    ));
    // The key signs tokens: no issuer of another kind may use it.
    let mut ssh = issuer();
    ssh.name = "ssh".to_owned();
    ssh.kind = model::Kind::SshUser;
    ssh.audiences.clear();
    ssh.claims.clear();
    ssh.delegators.clear();
    ssh.subjects.clear();
    ssh.ssh_principals = vec!["deploy".to_owned()];
    let e = f
        .engine
        .create_issuer(&journal, &f.keys, ssh, "admin")
        .err()
        .unwrap();
    assert!(
        matches!(&e, CredentialsError::KeyUnusable(m) if m.contains("a key of its own")),
        "{e}"
    );
    assert!(matches!(
        f.engine.create_issuer(&journal, &f.keys, issuer(), "admin"),
        Err(CredentialsError::IssuerExists(_))
    ));
}

#[test]
fn a_revoked_token_is_refused_until_the_revocation_expires() {
    let f = fixture();
    let journal = Direct(Arc::clone(&f.store));
    let issued = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), APP, &ask("payments", "", 0))
        .unwrap();
    let other = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), APP, &ask("payments", "", 0))
        .unwrap();
    let until = f
        .engine
        .revoke_jwt(&journal, "workloads", &issued.summary.jti)
        .unwrap();
    assert!(until >= crate::keyring::now() + model::MAX_TTL_LIMIT - 5);
    let validate = |token: &str| {
        f.engine
            .validate_jwt(&f.keys, Some(BASE), "workloads", token, "payments")
            .unwrap()
    };
    assert_eq!(
        validate(&issued.token).err().unwrap(),
        "the token was revoked"
    );
    assert!(validate(&other.token).is_ok(), "only the jti revoked");
    for bad in ["", "abc", &"G".repeat(32), &"A".repeat(32)] {
        assert!(matches!(
            f.engine.revoke_jwt(&journal, "workloads", bad),
            Err(CredentialsError::BadRequest(_))
        ));
    }
    assert!(matches!(
        f.engine.revoke_jwt(&journal, "nobody", &issued.summary.jti),
        Err(CredentialsError::IssuerNotFound(_))
    ));
    // A revocation record that does not open refuses its token all the same, and stays.
    let key = format!("workloads/{}", other.summary.jti);
    f.store.put(super::REVOCATIONS, &key, b"forged").unwrap();
    assert!(validate(&other.token).is_err());
    // Maintenance removes what has expired, nothing else.
    assert_eq!(f.engine.sweep_revocations(until - 1).unwrap(), 0);
    assert_eq!(f.engine.sweep_revocations(until).unwrap(), 1);
    assert!(validate(&issued.token).is_ok());
    assert!(f.store.get(super::REVOCATIONS, &key).unwrap().is_some());
}

/// A change of a token's claims.
type Change<'a> = dyn Fn(&mut serde_json::Map<String, Value>) + 'a;

/// A token signed with the issuer's key outside the issuer (by a holder of a `sign` grant,
/// had one been allowed): ValidateJwt refuses what the issuer would not have issued.
#[test]
fn a_token_the_issuer_would_not_issue_is_refused_even_well_signed() {
    let f = fixture();
    let issued = f
        .engine
        .issue_jwt(&f.keys, Some(BASE), APP, &ask("payments", "", 0))
        .unwrap();
    let good = claims_of(&issued.token);
    let forge = |change: &Change<'_>| {
        let mut claims = good.clone();
        change(&mut claims);
        super::jose::sign_compact(super::jose::Alg::Es256, &issued.kid, &claims, |input| {
            f.keys.sign("signer", 1, input, SignatureEncoding::Raw)
        })
        .unwrap()
    };
    let validate = |token: &str| {
        f.engine
            .validate_jwt(&f.keys, Some(BASE), "workloads", token, "payments")
            .unwrap()
    };
    assert!(
        validate(&forge(&|_| {})).is_ok(),
        "the same claims, signed again"
    );
    let now = crate::keyring::now();
    let cases: [(&str, &Change<'_>); 6] = [
        ("subject", &|c| {
            c.insert("sub".into(), "spiffe://corp/admin".into());
        }),
        ("lifetime", &|c| {
            c.insert("exp".into(), (now + 601).into());
        }),
        ("no iat", &|c| {
            c.remove("iat");
        }),
        ("iat ahead", &|c| {
            c.insert("iat".into(), (now + 3600).into());
            c.insert("exp".into(), (now + 3700).into());
        }),
        ("act of no delegator", &|c| {
            c.insert(
                "act".into(),
                serde_json::json!({ "sub": "spiffe://corp/app/db" }),
            );
        }),
        ("not a SPIFFE ID", &|c| {
            c.insert("sub".into(), "spiffe://corp/app/../admin".into());
        }),
    ];
    for (what, change) in cases {
        assert!(validate(&forge(change)).is_err(), "{what} accepted");
    }
}

#[test]
fn keys_others_may_sign_with_and_subjects_that_are_not_spiffe_ids_are_refused() {
    let f = fixture();
    *f.keys.granted.lock().unwrap() = true;
    let mut other = issuer();
    other.name = "other".to_owned();
    assert!(matches!(
        f.engine
            .create_issuer(&Direct(Arc::clone(&f.store)), &f.keys, other, "admin"),
        Err(CredentialsError::KeyUnusable(_))
    ));
    *f.keys.granted.lock().unwrap() = false;
    for subject in [
        "spiffe://corp/app/../admin",
        "spiffe://corp/app/web?x=1",
        "spiffe://corp/app/web ",
        "spiffe://corp/app/w\u{435}b",
    ] {
        assert!(
            matches!(
                f.engine
                    .issue_jwt(&f.keys, Some(BASE), CI, &ask("payments", subject, 0)),
                Err(CredentialsError::BadRequest(_))
            ),
            "{subject:?}"
        );
    }
    assert!(f.engine.signs_with("signer").unwrap());
    assert!(!f.engine.signs_with("another").unwrap());
}

mod ssh;
