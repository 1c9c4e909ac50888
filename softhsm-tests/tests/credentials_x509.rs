//! X.509-SVIDs issued by the credentials engine (docs/credentials.md) on a real server over
//! a SoftHSM token, checked by the tools relying parties use: requests made by `openssl
//! req`, leaves verified by `openssl verify` (under kms's self-signed CA, and under a root
//! made by openssl that signed the issuer's CSR), read by Python's `cryptography`; a leaf
//! connecting to kms over mTLS once its CA is in `client_ca`; the CA certificates and the
//! SPIFFE bundle fetched over HTTPS without a certificate and read by the `spiffe` package
//! (`credentials_x509.py`), which also validates a JWT-SVID against the bundle. Refusals
//! are typed and recorded.
//!
//! The interpreter is `KMS_TEST_PYTHON`, else `target/pyenv` (scripts/test installs
//! `cryptography` and `spiffe` there). The test fails, never skips, when neither is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;

use kms_proto::v1 as pb;
use pb::credentials_client::CredentialsClient;
use softhsm_tests::{ClientSpec, Cred, TestHsm, spiffe};
use tonic::Code;

/// Runs `openssl ARGS` in `dir`; its standard output. Fails the test when it fails.
fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `openssl verify ARGS` accepts; what it said.
fn verify(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .arg("verify")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A new key (`STEM.key`) and a request for it (`STEM.csr`, PEM) made by `openssl req`,
/// with `newkey` (`ec` P-256, `ed25519` or `rsa:BITS`) and `san` (a subjectAltName value) if given.
fn request(dir: &Path, stem: &str, newkey: &str, san: Option<&str>) -> Vec<u8> {
    let key = format!("{stem}.key");
    let csr = format!("{stem}.csr");
    let mut args = vec![
        "req",
        "-new",
        "-nodes",
        "-newkey",
        newkey,
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=ignored by kms",
    ];
    if newkey == "ec" {
        args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
    }
    let ext;
    if let Some(san) = san {
        ext = format!("subjectAltName={san}");
        args.extend(["-addext", &ext]);
    }
    openssl(dir, &args);
    std::fs::read(dir.join(csr)).unwrap()
}

fn x509_issuer(name: &str, key: &str, self_signed: bool, principals: &[&str]) -> pb::Issuer {
    pb::Issuer {
        name: name.into(),
        key: key.into(),
        kind: pb::CredentialKind::X509 as i32,
        self_signed,
        principals: principals.iter().map(|p| (*p).to_owned()).collect(),
        max_ttl_seconds: 7200,
        publish_ahead_seconds: Some(0),
        ..pb::Issuer::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_svids_verify_with_openssl_and_authenticate_to_kms() {
    let hsm = TestHsm::new("credx509");
    let dir = hsm.path().join("x509");
    std::fs::create_dir_all(&dir).unwrap();
    // The server trusts client certificates of the CAs in its own file, which the test
    // extends (the server reloads it).
    let clients = hsm.path().join("clients.pem");
    std::fs::copy(&hsm.pki.ca, &clients).unwrap();
    let tls = hsm.tls_tables().replace(
        &format!("client_ca = \"{}\"", hsm.pki.ca.display()),
        &format!("client_ca = \"{}\"", clients.display()),
    );
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, &tls);
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let ci = hsm.pki.client("ci", &ClientSpec::spiffe("ci"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    let admin_channel = server.channel(Some(&server.admin)).await;
    let mut keys = pb::key_management_client::KeyManagementClient::new(admin_channel.clone());
    server
        .create_keys(&[
            (
                "x509-hsm",
                pb::Algorithm::EcdsaP256Sha256,
                pb::ProtectionLevel::Hsm,
            ),
            (
                "x509-corp",
                pb::Algorithm::EcdsaP384Sha384,
                pb::ProtectionLevel::Software,
            ),
            (
                "jwt-signer",
                pb::Algorithm::EcdsaP256Sha256,
                pb::ProtectionLevel::Software,
            ),
            ("ed", pb::Algorithm::Ed25519, pb::ProtectionLevel::Software),
        ])
        .await;
    let mut admin = CredentialsClient::new(admin_channel);
    let workloads = x509_issuer(
        "workloads",
        "x509-hsm",
        true,
        &[&app.principal, &ci.principal],
    );
    let made = admin
        .create_issuer(pb::CreateIssuerRequest {
            issuer: Some(workloads),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.default_ttl_seconds, 3600);
    assert_eq!(made.ca_certificates.len(), 1);
    assert!(made.ca_certificates[0].self_signed);
    assert_eq!(made.signing_version, 1);
    admin
        .create_issuer(pb::CreateIssuerRequest {
            issuer: Some(pb::Issuer {
                name: "tokens".into(),
                key: "jwt-signer".into(),
                principals: vec![app.principal.clone()],
                audiences: vec!["payments".into()],
                ..pb::Issuer::default()
            }),
        })
        .await
        .unwrap();
    // An Ed25519 key signs no X.509 CA certificate here.
    let s = admin
        .create_issuer(pb::CreateIssuerRequest {
            issuer: Some(x509_issuer("ed", "ed", true, &[&app.principal])),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("X.509 CA key"), "{s:?}");

    // The app's own request: openssl verifies the leaf under kms's CA.
    let mut as_app = CredentialsClient::new(server.channel(Some(&app)).await);
    let csr = request(&dir, "app", "ec", Some(&format!("URI:{}", app.principal)));
    let issued = as_app
        .issue_x509(pb::IssueX509Request {
            issuer: "workloads".into(),
            csr: csr.clone(),
            subject: String::new(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.spiffe_id, app.principal);
    assert_eq!(issued.key_version, 1);
    std::fs::write(dir.join("leaf.pem"), &issued.certificate_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), &issued.chain_pem).unwrap();
    let (ok, said) = verify(
        &dir,
        &["-CAfile", "ca.pem", "-purpose", "sslclient", "leaf.pem"],
    );
    assert!(ok, "{said}");
    // Under another CA it does not verify (the check can fail).
    let (ok, _) = verify(&dir, &["-CAfile", hsm.pki.ca.to_str().unwrap(), "leaf.pem"]);
    assert!(!ok, "a leaf verified under a CA that did not sign it");
    let serial = openssl(&dir, &["x509", "-in", "leaf.pem", "-noout", "-serial"]);
    assert_eq!(
        serial.trim().trim_start_matches("serial=").to_lowercase(),
        issued.serial
    );
    let leaf = softhsm_tests::python_phase(
        "credentials_x509.py",
        "leaf",
        &serde_json::json!({ "leaf": issued.certificate_pem, "spiffe_id": app.principal }),
    );
    assert_eq!(leaf["serial"], issued.serial);
    assert!(
        (600..=661).contains(&leaf["lifetime"].as_u64().unwrap()),
        "{leaf}"
    );

    // Bad requests, each refused with its reason.
    let ask = |csr: Vec<u8>, subject: &str, ttl: u64| pb::IssueX509Request {
        issuer: "workloads".into(),
        csr,
        subject: subject.into(),
        ttl_seconds: ttl,
    };
    let refused = |r: Result<tonic::Response<pb::IssueX509Response>, tonic::Status>,
                   code: Code,
                   text: &str| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), code, "{s:?}");
        assert!(s.message().contains(text), "{text}: {s:?}");
    };
    let for_other = request(&dir, "x", "ec", Some(&format!("URI:{}", spiffe("db"))));
    refused(
        as_app.issue_x509(ask(for_other, "", 0)).await,
        Code::InvalidArgument,
        "another SPIFFE ID",
    );
    let with_dns = request(
        &dir,
        "x",
        "ec",
        Some(&format!("URI:{},DNS:app.example", app.principal)),
    );
    refused(
        as_app.issue_x509(ask(with_dns, "", 0)).await,
        Code::InvalidArgument,
        "exactly one URI",
    );
    let small_rsa = request(&dir, "x", "rsa:1024", None);
    refused(
        as_app.issue_x509(ask(small_rsa, "", 0)).await,
        Code::InvalidArgument,
        "2048 to 8192 bits",
    );
    openssl(
        &dir,
        &[
            "req", "-new", "-nodes", "-sha1", "-newkey", "rsa:2048", "-keyout", "sha1.key", "-out",
            "sha1.csr", "-subj", "/CN=x",
        ],
    );
    refused(
        as_app
            .issue_x509(ask(std::fs::read(dir.join("sha1.csr")).unwrap(), "", 0))
            .await,
        Code::InvalidArgument,
        "signed with SHA-1",
    );
    refused(
        as_app.issue_x509(ask(csr.clone(), "", 7201)).await,
        Code::InvalidArgument,
        "ttl_seconds",
    );
    let mut altered = csr.clone();
    let at = altered.len() - 40;
    altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
    let s = as_app.issue_x509(ask(altered, "", 0)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let mut as_other = CredentialsClient::new(server.channel(Some(&other)).await);
    refused(
        as_other.issue_x509(ask(csr.clone(), "", 0)).await,
        Code::PermissionDenied,
        "may not ask",
    );
    refused(
        as_app
            .issue_x509(pb::IssueX509Request {
                issuer: "tokens".into(),
                ..ask(csr.clone(), "", 0)
            })
            .await,
        Code::FailedPrecondition,
        "issues jwt credentials",
    );

    // No delegation of certificates: the CI may not ask for another's (a certificate
    // cannot name its delegator, and kms would take it as the subject's own).
    let mut as_ci = CredentialsClient::new(server.channel(Some(&ci)).await);
    refused(
        as_ci
            .issue_x509(ask(request(&dir, "other", "ec", None), &app.principal, 0))
            .await,
        Code::PermissionDenied,
        "on behalf of another subject",
    );
    // The CI's leaf, of a key of its own: once its CA is in the server's client_ca, it
    // authenticates to kms as the CI's SPIFFE ID.
    let svc = ci.principal.clone();
    // An Ed25519 key: rustls (kms's TLS) and openssl take it.
    let svc_csr = request(&dir, "svc", "ed25519", None);
    let svc_leaf = as_ci
        .issue_x509(ask(svc_csr, "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svc_leaf.spiffe_id, svc);
    std::fs::write(dir.join("svc.pem"), &svc_leaf.certificate_pem).unwrap();
    let (ok, said) = verify(
        &dir,
        &["-CAfile", "ca.pem", "-purpose", "sslclient", "svc.pem"],
    );
    assert!(ok, "{said}");
    let svc_cred = Cred {
        cert: dir.join("svc.pem"),
        key: dir.join("svc.key"),
        principal: svc.clone(),
    };
    let get_issuer = |cred: Cred| {
        let addr = server.addr.clone();
        let ca = server.ca.clone();
        async move {
            let channel = softhsm_tests::try_channel(&addr, &ca, Some(&cred))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            CredentialsClient::new(channel)
                .get_issuer(pb::GetIssuerRequest {
                    name: "workloads".into(),
                })
                .await
        }
    };
    assert!(
        get_issuer(svc_cred.clone()).await.is_err(),
        "a leaf of a CA the server does not trust was accepted"
    );
    let mut trusted = std::fs::read_to_string(&clients).unwrap();
    trusted.push_str(&svc_leaf.chain_pem);
    std::fs::write(&clients, trusted).unwrap();
    let mut answered = None;
    for _ in 0..50 {
        if let Ok(r) = get_issuer(svc_cred.clone()).await {
            answered = Some(r.into_inner());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        answered
            .expect("the leaf authenticates once its CA is trusted")
            .name,
        "workloads"
    );

    // An outside root: openssl signs the issuer's request; leaves chain up to the root.
    let mut corp = x509_issuer("corp", "x509-corp", false, &[&app.principal]);
    corp.publish_ahead_seconds = Some(120);
    let corp = admin
        .create_issuer(pb::CreateIssuerRequest { issuer: Some(corp) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(corp.signing_version, 0, "no CA certificate yet");
    assert!(corp.ca_certificates[0].chain_pem.is_empty());
    refused(
        as_app
            .issue_x509(pb::IssueX509Request {
                issuer: "corp".into(),
                ..ask(csr.clone(), "", 0)
            })
            .await,
        Code::FailedPrecondition,
        "no version of the issuer's key has a CA certificate",
    );
    std::fs::write(
        dir.join("root.cnf"),
        "[req]\ndistinguished_name = dn\nx509_extensions = v3\nprompt = no\n\
         [dn]\nO = Corp\nCN = Corp Root\n\
         [v3]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-config",
            "root.cnf",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-days",
            "2",
        ],
    );
    let ca_csr = admin
        .get_issuer_csr(pb::GetIssuerCsrRequest {
            issuer: "corp".into(),
            key_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ca_csr.key_version, 1);
    std::fs::write(dir.join("corp.csr"), &ca_csr.csr_pem).unwrap();
    // openssl checks the request's signature (made by the keyring) itself.
    openssl(&dir, &["req", "-in", "corp.csr", "-noout", "-verify"]);
    std::fs::write(
        dir.join("ca.ext"),
        "[ca]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n\
         [leafish]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n",
    )
    .unwrap();
    let sign_csr = |out: &str, ext: &str| {
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "corp.csr",
                "-CA",
                "root.pem",
                "-CAkey",
                "root.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ca.ext",
                "-extensions",
                ext,
                "-out",
                out,
            ],
        );
        std::fs::read_to_string(dir.join(out)).unwrap()
    };
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let set = |chain: String| pb::SetIssuerCertificateRequest {
        issuer: "corp".into(),
        key_version: 1,
        chain_pem: chain,
    };
    // Not a CA, another key's certificate (the root's own), a chain out of order: refused,
    // nothing stored.
    let not_ca = sign_csr("notca.pem", "leafish");
    for (chain, text) in [
        (format!("{not_ca}{root}"), "not a CA"),
        (root.clone(), "public key is not that of version 1"),
        (
            format!("{root}{}", sign_csr("inter.pem", "ca")),
            "public key",
        ),
    ] {
        let s = admin.set_issuer_certificate(set(chain)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(text), "{text}: {s:?}");
    }
    let mut as_app_admin_attempt = CredentialsClient::new(server.channel(Some(&app)).await);
    let s = as_app_admin_attempt
        .set_issuer_certificate(set(String::new()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let inter = sign_csr("inter.pem", "ca");
    let corp = admin
        .set_issuer_certificate(set(format!("{inter}{root}")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(corp.signing_version, 1);
    let corp_leaf = as_app
        .issue_x509(pb::IssueX509Request {
            issuer: "corp".into(),
            ..ask(csr.clone(), "", 0)
        })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(dir.join("corp-leaf.pem"), &corp_leaf.certificate_pem).unwrap();
    std::fs::write(dir.join("corp-chain.pem"), &corp_leaf.chain_pem).unwrap();
    let (ok, said) = verify(
        &dir,
        &[
            "-CAfile",
            "root.pem",
            "-untrusted",
            "corp-chain.pem",
            "corp-leaf.pem",
        ],
    );
    assert!(ok, "{said}");
    let (ok, _) = verify(
        &dir,
        &[
            "-CAfile",
            "ca.pem",
            "-untrusted",
            "corp-chain.pem",
            "corp-leaf.pem",
        ],
    );
    assert!(!ok, "a corp leaf verified under the workloads CA");

    // An RSA PKCS#1 CA key, and an RSA leaf key: openssl verifies both ways.
    keys.create_key(pb::CreateKeyRequest {
        name: "x509-rsa".into(),
        algorithm: pb::Algorithm::RsaSignPkcs12048Sha256 as i32,
        protection_level: pb::ProtectionLevel::Software as i32,
        ..pb::CreateKeyRequest::default()
    })
    .await
    .unwrap();
    admin
        .create_issuer(pb::CreateIssuerRequest {
            issuer: Some(x509_issuer("rsa-ca", "x509-rsa", true, &[&app.principal])),
        })
        .await
        .unwrap();
    let rsa_csr = request(
        &dir,
        "rsa",
        "rsa:2048",
        Some(&format!("URI:{}", app.principal)),
    );
    for (issuer, csr) in [("rsa-ca", csr.clone()), ("workloads", rsa_csr)] {
        let leaf = as_app
            .issue_x509(pb::IssueX509Request {
                issuer: issuer.into(),
                ..ask(csr, "", 0)
            })
            .await
            .unwrap()
            .into_inner();
        std::fs::write(dir.join("l.pem"), &leaf.certificate_pem).unwrap();
        std::fs::write(dir.join("c.pem"), &leaf.chain_pem).unwrap();
        let (ok, said) = verify(
            &dir,
            &["-CAfile", "c.pem", "-purpose", "sslclient", "l.pem"],
        );
        assert!(ok, "{issuer}: {said}");
        let text = openssl(&dir, &["x509", "-in", "l.pem", "-noout", "-text"]);
        assert_eq!(
            text.contains("Key Encipherment"),
            issuer == "workloads",
            "keyEncipherment for an RSA leaf key only: {text}"
        );
    }

    // A rotation of the self-signed issuer: the new version gets its CA certificate.
    let rotated = admin
        .rotate_issuer(pb::RotateIssuerRequest {
            name: "workloads".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.ca_certificates.len(), 2);
    assert!(
        rotated
            .ca_certificates
            .iter()
            .all(|c| !c.chain_pem.is_empty())
    );
    assert_eq!(rotated.signing_version, 2, "publish_ahead 0: at once");

    // The published CA certificates and the SPIFFE bundle, without a certificate.
    let token = as_app
        .issue_jwt(pb::IssueJwtRequest {
            issuer: "tokens".into(),
            audience: "payments".into(),
            ..pb::IssueJwtRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let published = softhsm_tests::python_phase(
        "credentials_x509.py",
        "published",
        &serde_json::json!({
            "ca": server.ca,
            "base": format!("https://127.0.0.1:{port}"),
            "issuer": "workloads",
            "jwt_issuer": "tokens",
            "trust_domain": softhsm_tests::pki::TRUST_DOMAIN,
            "token": token,
            "audience": "payments",
            "spiffe_id": app.principal,
        }),
    );
    assert_eq!(published["ca_chain"], 2, "{published}");
    assert_eq!(published["unknown"], 404, "{published}");
    assert_eq!(published["other_kind"], 404, "{published}");
    assert_eq!(published["jwt_authorities"], 1, "{published}");
    assert_eq!(
        published["x509_authorities"], 4,
        "workloads' two, corp's one, rsa-ca's one: {published}"
    );

    // The records: each issuance with its subject, serial and expiry; each refusal; the
    // leaf's own call under its SPIFFE ID.
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .filter(|e| e["service"] == "kms.v1.Credentials")
        .collect();
    let issuance = events
        .iter()
        .find(|e| e["operation"] == "IssueX509" && e["credential"]["jti"] == issued.serial)
        .expect("the issuance is recorded with its serial");
    assert_eq!(issuance["outcome"], "OK");
    assert_eq!(issuance["credential"]["subject"], app.principal.as_str());
    assert_eq!(issuance["credential"]["kind"], "x509");
    assert_eq!(issuance["credential"]["expires"], issued.expires_unix);
    let delegated = events
        .iter()
        .find(|e| e["operation"] == "IssueX509" && e["credential"]["jti"] == svc_leaf.serial)
        .expect("the CI's issuance is recorded");
    assert_eq!(delegated["credential"]["subject"], ci.principal.as_str());
    assert!(delegated["credential"]["actor"].is_null(), "{delegated:#}");
    let refusals: Vec<&str> = events
        .iter()
        .filter(|e| e["operation"] == "IssueX509" && e["outcome"] != "OK")
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        refusals,
        [
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "FAILED_PRECONDITION",
            "PERMISSION_DENIED",
            "FAILED_PRECONDITION",
        ],
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e["operation"] == "GetIssuer"
            && e["principal"] == svc.as_str()
            && e["outcome"] == "OK"),
        "the leaf's call recorded under its SPIFFE ID"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["operation"] == "SetIssuerCertificate")
            .map(|e| e["outcome"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "OK"
        ]
    );
    // No private key anywhere: the keys openssl made stay in their files.
    let logs = hsm.logs();
    for stem in ["app", "svc"] {
        let key = std::fs::read_to_string(dir.join(format!("{stem}.key"))).unwrap();
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!out.stdout.contains(&body[..32]) && !logs.contains(&body[..32]));
    }
}
