//! JWT-SVIDs issued by the credentials engine (docs/credentials.md) on a real server over a
//! SoftHSM token, checked by what verifiers really use: PyJWT's `PyJWKClient` fetching the
//! issuer's keys from its JWKS URL over TLS without a client certificate, and `jwt.decode`
//! (`credentials_client.py`). An HSM P-256 key signs; a key rotation keeps the old tokens
//! verifying and the new ones verify at once; a delegator's token carries `act`; refusals
//! are typed and recorded; no token's text reaches the audit log or the server's log.
//!
//! The interpreter is `KMS_TEST_PYTHON`, else `target/pyenv` (scripts/test installs PyJWT
//! there). The test fails, never skips, when neither is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kms_proto::v1 as pb;
use pb::credentials_client::CredentialsClient;
use softhsm_tests::{ClientSpec, TestHsm};

/// Runs a phase of the verifier script; its JSON output.
fn verifier(phase: &str, config: &serde_json::Value) -> serde_json::Value {
    softhsm_tests::python_phase("credentials_client.py", phase, config)
}

fn issuer(name: &str, key: &str, principals: &[&str]) -> pb::Issuer {
    pb::Issuer {
        name: name.into(),
        key: key.into(),
        principals: principals.iter().map(|p| (*p).to_owned()).collect(),
        audiences: vec!["payments".into()],
        claims: [("team".to_owned(), "platform".to_owned())].into(),
        ..pb::Issuer::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_verify_with_pyjwt_against_the_published_keys() {
    let hsm = TestHsm::new("credentials");
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, "");
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let ci = hsm.pki.client("ci", &ClientSpec::spiffe("ci"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    let admin_channel = server.channel(Some(&server.admin)).await;
    let mut keys = pb::key_management_client::KeyManagementClient::new(admin_channel.clone());
    server
        .create_keys(&[
            (
                "jwt-hsm",
                pb::Algorithm::EcdsaP256Sha256,
                pb::ProtectionLevel::Hsm,
            ),
            (
                "jwt-other",
                pb::Algorithm::EcdsaP384Sha384,
                pb::ProtectionLevel::Software,
            ),
            (
                "aes",
                pb::Algorithm::Aes256Gcm,
                pb::ProtectionLevel::Software,
            ),
        ])
        .await;
    let mut admin = CredentialsClient::new(admin_channel);
    let mut workloads = issuer("workloads", "jwt-hsm", &[&app.principal]);
    workloads.delegators = vec![ci.principal.clone()];
    workloads.subjects = vec![app.principal.clone()];
    workloads.max_ttl_seconds = 600;
    // Published for 2 seconds before a new version signs (a real issuer: minutes).
    workloads.publish_ahead_seconds = Some(2);
    let made = admin
        .create_issuer(pb::CreateIssuerRequest {
            issuer: Some(workloads),
        })
        .await
        .unwrap()
        .into_inner();
    let iss = format!("https://127.0.0.1:{port}/v1/identity/oidc/provider/workloads");
    assert_eq!(made.issuer_url, iss);
    assert_eq!(made.default_ttl_seconds, 300);
    assert_eq!(made.kind, pb::CredentialKind::Jwt as i32);
    assert_eq!(made.signing_version, 1);
    admin
        .create_issuer(pb::CreateIssuerRequest {
            issuer: Some(issuer("other", "jwt-other", &[&app.principal])),
        })
        .await
        .unwrap();
    // A key that cannot sign JWTs, a name taken, a registered claim, the app as admin.
    let refused = |r: Result<tonic::Response<pb::Issuer>, tonic::Status>, code: tonic::Code| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), code, "{s:?}");
    };
    refused(
        admin
            .create_issuer(pb::CreateIssuerRequest {
                issuer: Some(issuer("aes", "aes", &[&app.principal])),
            })
            .await,
        tonic::Code::FailedPrecondition,
    );
    refused(
        admin
            .create_issuer(pb::CreateIssuerRequest {
                issuer: Some(issuer("workloads", "jwt-hsm", &[&app.principal])),
            })
            .await,
        tonic::Code::AlreadyExists,
    );
    let mut bad = issuer("claims", "jwt-hsm", &[&app.principal]);
    bad.claims.insert("sub".into(), "x".into());
    refused(
        admin
            .create_issuer(pb::CreateIssuerRequest { issuer: Some(bad) })
            .await,
        tonic::Code::InvalidArgument,
    );

    // A key an issuer signs with takes no `sign` grant (its holder could sign tokens
    // outside the issuer's rules), and a key with one makes no issuer.
    let mut access =
        pb::access_client::AccessClient::new(server.channel(Some(&server.admin)).await);
    let sign_grant = |key: &str| pb::CreateGrantRequest {
        key: key.into(),
        principal: app.principal.clone(),
        operations: vec![pb::Operation::Sign as i32],
        associated_data: None,
    };
    let s = access
        .create_grant(sign_grant("jwt-hsm"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    keys.create_key(pb::CreateKeyRequest {
        name: "shared-signer".into(),
        algorithm: pb::Algorithm::EcdsaP256Sha256 as i32,
        ..pb::CreateKeyRequest::default()
    })
    .await
    .unwrap();
    access
        .create_grant(sign_grant("shared-signer"))
        .await
        .unwrap();
    refused(
        admin
            .create_issuer(pb::CreateIssuerRequest {
                issuer: Some(issuer("shared", "shared-signer", &[&app.principal])),
            })
            .await,
        tonic::Code::FailedPrecondition,
    );

    let mut as_app = CredentialsClient::new(server.channel(Some(&app)).await);
    let ask = |issuer: &str, audience: &str, subject: &str, ttl: u64| pb::IssueJwtRequest {
        issuer: issuer.into(),
        audience: audience.into(),
        subject: subject.into(),
        ttl_seconds: ttl,
    };
    let first = as_app
        .issue_jwt(ask("workloads", "payments", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.subject, app.principal);
    assert_eq!(first.key_version, 1);
    assert!(format!("{first:?}").contains("bytes redacted"));
    let other_token = as_app
        .issue_jwt(ask("other", "payments", "", 0))
        .await
        .unwrap()
        .into_inner()
        .token;
    let expired = as_app
        .issue_jwt(ask("workloads", "payments", "", 1))
        .await
        .unwrap()
        .into_inner()
        .token;
    // The delegator asks on the app's behalf: `act` names it.
    let delegated = CredentialsClient::new(server.channel(Some(&ci)).await)
        .issue_jwt(ask("workloads", "payments", &app.principal, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delegated.subject, app.principal);

    // Refusals: each typed, nothing issued.
    let no = |r: Result<tonic::Response<pb::IssueJwtResponse>, tonic::Status>,
              code: tonic::Code| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), code, "{s:?}");
    };
    no(
        as_app.issue_jwt(ask("workloads", "elsewhere", "", 0)).await,
        tonic::Code::PermissionDenied,
    );
    no(
        as_app
            .issue_jwt(ask("workloads", "payments", "", 601))
            .await,
        tonic::Code::InvalidArgument,
    );
    no(
        as_app
            .issue_jwt(ask("workloads", "payments", &ci.principal, 0))
            .await,
        tonic::Code::PermissionDenied,
    );
    no(
        as_app.issue_jwt(ask("nobody", "payments", "", 0)).await,
        tonic::Code::NotFound,
    );
    no(
        CredentialsClient::new(server.channel(Some(&other)).await)
            .issue_jwt(ask("workloads", "payments", "", 0))
            .await,
        tonic::Code::PermissionDenied,
    );

    // Rotation: the new version is published at once, signs once it has been published
    // for the issuer's publish-ahead time; the old one stays published while enabled.
    let before = admin
        .rotate_issuer(pb::RotateIssuerRequest {
            name: "workloads".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.signing_version, 1);
    let just_rotated = as_app
        .issue_jwt(ask("workloads", "payments", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(just_rotated.key_version, 1, "not yet published for 2 s");
    assert_eq!(just_rotated.kid, first.kid);
    let published = verifier(
        "discovery",
        &serde_json::json!({ "ca": server.ca, "issuer_url": iss }),
    );
    assert_eq!(published["kids"].as_array().map(Vec::len), Some(2));
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let rotated = as_app
        .issue_jwt(ask("workloads", "payments", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.key_version, 2);
    assert_ne!(rotated.kid, first.kid);
    let got = admin
        .get_issuer(pb::GetIssuerRequest {
            name: "workloads".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.signing_version, 2);
    // Rotating needs the admin role.
    refused(
        as_app
            .rotate_issuer(pb::RotateIssuerRequest {
                name: "workloads".into(),
            })
            .await,
        tonic::Code::PermissionDenied,
    );

    let discovered = verifier(
        "discovery",
        &serde_json::json!({ "ca": server.ca, "issuer_url": iss }),
    );
    let mut kids = vec![first.kid.clone(), rotated.kid.clone()];
    kids.sort();
    assert_eq!(discovered["kids"], serde_json::json!(kids));
    assert_eq!(discovered["algs"], serde_json::json!(["ES256"]));
    assert_eq!(discovered["unknown_issuer"], 404);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let verified = verifier(
        "verify",
        &serde_json::json!({
            "ca": server.ca,
            "issuer_url": iss,
            "audience": "payments",
            "alg": "ES256",
            "valid": [first.token, rotated.token, delegated.token],
            "other_issuer": other_token,
            "expired": expired,
        }),
    );
    assert_eq!(
        verified["subjects"],
        serde_json::json!([app.principal, app.principal, app.principal])
    );
    assert_eq!(
        verified["actors"],
        serde_json::json!([null, null, ci.principal])
    );
    assert_eq!(verified["jtis"][0], first.jti.as_str());
    assert_eq!(
        verified["team"],
        serde_json::json!(["platform", "platform", "platform"])
    );
    assert_eq!(verified["other_audience"], "InvalidAudienceError");
    assert_eq!(verified["altered"], "InvalidSignatureError");
    assert_eq!(verified["unknown_kid"], "PyJWKClientError");
    assert_eq!(verified["expired"], "ExpiredSignatureError");

    // Vault's identity token path, with hvac: the same issuance, over the HTTPS front.
    let vault = verifier(
        "vault",
        &serde_json::json!({
            "ca": server.ca,
            "url": format!("https://127.0.0.1:{port}"),
            "issuer_url": iss,
            "alg": "ES256",
            "app_cert": app.cert,
            "app_key": app.key,
            "other_cert": other.cert,
            "other_key": other.key,
        }),
    );
    assert_eq!(vault["subject"], app.principal.as_str());
    assert_eq!(vault["other"], "Forbidden");
    assert_eq!(vault["unknown"], "InvalidRequest");
    assert_eq!(vault["elsewhere"], "Forbidden");
    let vault_jti = vault["jti"].as_str().unwrap().to_owned();

    // ValidateJwt: for services that ask kms rather than fetch the keys.
    let mut validator = CredentialsClient::new(server.channel(Some(&other)).await);
    let validate = |token: &str, audience: &str| pb::ValidateJwtRequest {
        issuer: "workloads".into(),
        token: token.into(),
        audience: audience.into(),
    };
    let ok = validator
        .validate_jwt(validate(&delegated.token, "payments"))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.valid, "{ok:?}");
    assert_eq!(ok.actor, ci.principal);
    for (token, audience) in [
        (rotated.token.as_str(), "elsewhere"),
        (expired.as_str(), "payments"),
        (other_token.as_str(), "payments"),
        ("not.a.token", "payments"),
    ] {
        let v = validator
            .validate_jwt(validate(token, audience))
            .await
            .unwrap()
            .into_inner();
        assert!(!v.valid && !v.reason.is_empty(), "{v:?}");
    }

    // A revoked token: ValidateJwt refuses it; the app may not revoke.
    let revoked = admin
        .revoke_jwt(pb::RevokeJwtRequest {
            issuer: "workloads".into(),
            jti: delegated.jti.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.until_unix > delegated.expires_unix);
    let v = validator
        .validate_jwt(validate(&delegated.token, "payments"))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid && v.reason.contains("revoked"), "{v:?}");
    let s = as_app
        .revoke_jwt(pb::RevokeJwtRequest {
            issuer: "workloads".into(),
            jti: first.jti.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");

    // The records: each issuance with its issuer, subject, audience, jti and expiry; each
    // refusal with its issuer; no token anywhere.
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .filter(|e| e["service"] == "kms.v1.Credentials")
        .collect();
    let issued: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["operation"] == "IssueJwt" && e["outcome"] == "OK")
        .collect();
    assert_eq!(issued.len(), 7, "{events:#?}");
    let through_vault = issued
        .iter()
        .find(|e| e["credential"]["jti"] == vault_jti.as_str())
        .expect("the token of Vault's path is recorded");
    assert_eq!(through_vault["principal"], app.principal.as_str());
    assert_eq!(through_vault["credential"]["audience"], "payments");
    let delegated_record = issued
        .iter()
        .find(|e| e["credential"]["jti"] == delegated.jti.as_str())
        .expect("the delegated token is recorded");
    assert_eq!(delegated_record["principal"], ci.principal.as_str());
    assert_eq!(
        delegated_record["credential"]["subject"],
        app.principal.as_str()
    );
    assert_eq!(
        delegated_record["credential"]["actor"],
        ci.principal.as_str()
    );
    assert_eq!(delegated_record["credential"]["audience"], "payments");
    assert_eq!(
        delegated_record["credential"]["expires"],
        delegated.expires_unix
    );
    assert_eq!(delegated_record["credential"]["kind"], "jwt");
    assert_eq!(delegated_record["key"], "jwt-hsm");
    assert_eq!(delegated_record["key_version"], 1);
    assert_eq!(delegated_record["credential"]["key_version"], 1);
    let rotated_record = issued
        .iter()
        .find(|e| e["credential"]["jti"] == rotated.jti.as_str())
        .expect("the token of the new version is recorded");
    assert_eq!(rotated_record["credential"]["key_version"], 2);
    let rotation = events
        .iter()
        .find(|e| e["operation"] == "RotateIssuer" && e["outcome"] == "OK")
        .expect("the rotation is recorded");
    assert_eq!(rotation["credential"]["issuer"], "workloads");
    assert_eq!(rotation["key_version"], 2, "{rotation:#}");
    let revocation = events
        .iter()
        .find(|e| e["operation"] == "RevokeJwt" && e["outcome"] == "OK")
        .expect("the revocation is recorded");
    assert_eq!(revocation["credential"]["jti"], delegated.jti.as_str());
    assert_eq!(revocation["credential"]["issuer"], "workloads");
    let refusals: Vec<&str> = events
        .iter()
        .filter(|e| e["operation"] == "IssueJwt" && e["outcome"] != "OK")
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        refusals,
        [
            "PERMISSION_DENIED",
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "NOT_FOUND",
            "PERMISSION_DENIED",
            "PERMISSION_DENIED",
            "NOT_FOUND",
            "PERMISSION_DENIED"
        ]
    );
    assert!(
        events
            .iter()
            .filter(|e| e["operation"] == "IssueJwt")
            .all(|e| !e["credential"]["issuer"]
                .as_str()
                .unwrap_or_default()
                .is_empty()),
        "{events:#?}"
    );
    // A refused request's record says what it asked for: the app asking for the CI's
    // subject, and for an audience the issuer does not list.
    assert!(
        events.iter().any(|e| e["operation"] == "IssueJwt"
            && e["outcome"] == "PERMISSION_DENIED"
            && e["credential"]["subject"] == ci.principal.as_str()
            && e["credential"]["actor"] == app.principal.as_str()),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e["operation"] == "IssueJwt"
            && e["outcome"] == "PERMISSION_DENIED"
            && e["credential"]["audience"] == "elsewhere"),
        "{events:#?}"
    );
    // The auditors' report: issuances per issuer, subject, delegator and key version, and
    // the refusals.
    let report = server.kms_as(
        Some(&hsm.auditor),
        &["audit", "report", "--format", "json"],
        "",
    );
    assert_eq!(report.code, Some(0), "{report:?}");
    let report = report.json();
    let rows = report["credentials"].as_array().unwrap();
    let count = |subject: &str, actor: Option<&str>, version: u64, outcome: &str| {
        rows.iter()
            .filter(|r| {
                r["issuer"] == "workloads"
                    && r["kind"] == "jwt"
                    && r["subject"] == subject
                    && r["actor"].as_str() == actor
                    && r["key_version"] == version
                    && r["outcome"] == outcome
            })
            .map(|r| r["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    let me = app.principal.as_str();
    assert_eq!(count(me, None, 1, "OK"), 3, "{rows:#?}");
    assert_eq!(count(me, None, 2, "OK"), 2, "{rows:#?}");
    assert_eq!(count(me, Some(&ci.principal), 1, "OK"), 1, "{rows:#?}");
    assert_eq!(count(me, None, 0, "PERMISSION_DENIED"), 2, "{rows:#?}");
    // An issuance is a use of the key version that signed it: the report's usage rows
    // count it, and its "no successful use" section does not name a version that signed.
    let used = report["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["key"] == "jwt-hsm" && u["operation"] == "IssueJwt" && u["outcome"] == "OK")
        .map(|u| (u["version"].as_u64().unwrap(), u["count"].as_u64().unwrap()))
        .collect::<Vec<_>>();
    // Seven tokens issued, one of them by the other issuer's key.
    assert_eq!(used.iter().map(|(_, n)| n).sum::<u64>(), 6, "{used:?}");
    assert!(used.iter().any(|(v, _)| *v == 2), "{used:?}");
    let unused = report["unused"].as_array().unwrap();
    assert!(!unused.iter().any(|u| u["key"] == "jwt-hsm"), "{unused:#?}");
    let logs = hsm.logs();
    for token in [&first.token, &rotated.token, &delegated.token, &expired] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!out.stdout.contains(signature), "a token in the audit log");
        assert!(!logs.contains(signature), "a token in the server's log");
    }
    let signature = vault["signature"].as_str().unwrap();
    assert!(signature.len() > 40);
    assert!(!out.stdout.contains(signature) && !logs.contains(signature));
}
