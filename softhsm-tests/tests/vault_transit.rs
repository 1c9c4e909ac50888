//! The Vault-compatible HTTPS front (`[http] listen`, docs/vault-transit.md), driven by the
//! real `hvac` client over mTLS against a real server on a SoftHSM token: every Transit
//! method, batches, refusals (no grant: 403; what kms does not offer: 400), the exact
//! calls SPIRE's `hashicorp_vault` KeyManager makes (its signatures checked by Python's
//! `cryptography`), ciphertexts crossing between gRPC and Transit both ways, a sealed
//! server (503), and the audit records the front's calls leave.
//!
//! The script is `vault_transit_client.py` beside this file; the interpreter is
//! `KMS_TEST_PYTHON`, else `target/pyenv` (scripts/test installs hvac and cryptography
//! there). The test fails, never skips, when neither is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use softhsm_tests::{ClientSpec, Server, TestHsm, free_port, start_unsealed};

/// Runs a phase of the client script; its JSON output.
fn client(phase: &str, config: &serde_json::Value) -> serde_json::Value {
    softhsm_tests::python_phase("vault_transit_client.py", phase, config)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Every record the audit log holds, as the auditor exports them.
fn audit_events(server: &Server, hsm: &TestHsm) -> Vec<serde_json::Value> {
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_clients_work_unchanged_against_the_transit_front() {
    let hsm = TestHsm::new("vault-transit");
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, "token_ttl_seconds = 60\n");
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let mut cfg = serde_json::json!({
        "url": format!("https://127.0.0.1:{port}"),
        "ca": server.ca,
        "admin_cert": hsm.admin.cert,
        "admin_key": hsm.admin.key,
        "admin_principal": hsm.admin.principal,
        "app_cert": app.cert,
        "app_key": app.key,
    });

    // Health, seal status, login, token binding, key creation and what is refused.
    let created = client("create", &cfg);
    assert_eq!(created["health"]["sealed"], false);
    assert_eq!(created["seal_status"]["type"], "shamir");
    assert_eq!(created["login_ttl"], 60);
    let mut keys = strings(&created["keys"]);
    keys.sort();
    assert_eq!(
        keys,
        [
            "aes",
            "ed",
            "mac",
            "p256",
            "p384",
            "rsa",
            "spire-ec",
            "spire-rsa"
        ]
    );
    for (label, needle) in [
        ("convergent", "convergent_encryption is not supported"),
        ("derived", "derived is not supported"),
        ("exportable", "exportable is not supported"),
        (
            "plaintext_backup",
            "allow_plaintext_backup is not supported",
        ),
        ("chacha", "chacha20-poly1305 is not offered"),
        ("export", "never leaves kms"),
    ] {
        let errors = strings(&created["refusals"][label]);
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{label}: {errors:?}"
        );
    }
    // The keys exist as kms keys, with the algorithms the Vault types map to.
    let mut grpc = server.keys().await;
    for (name, algorithm) in [
        ("aes", kms_proto::v1::Algorithm::Aes256Gcm),
        ("p256", kms_proto::v1::Algorithm::EcdsaP256Sha256),
        ("rsa", kms_proto::v1::Algorithm::RsaSignPkcs12048Sha256),
        ("spire-ec", kms_proto::v1::Algorithm::EcdsaP256Sha256),
        ("mac", kms_proto::v1::Algorithm::HmacSha256),
    ] {
        let key = grpc
            .get_key(kms_proto::v1::GetKeyRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(key.algorithm, algorithm as i32, "{name}");
        assert_eq!(
            key.protection_level,
            kms_proto::v1::ProtectionLevel::Hsm as i32,
            "{name}"
        );
    }

    // Grants map one to one: the admin gets every operation on every key (the app none).
    for key in &keys {
        server.grant_all(key).await;
    }
    // A ciphertext made by gRPC Encrypt, in the documented Transit form.
    let made = grpc
        .encrypt(kms_proto::v1::EncryptRequest {
            key: "aes".into(),
            plaintext: b"from grpc".to_vec(),
            associated_data: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    cfg["grpc_ciphertext"] = serde_json::json!(format!(
        "vault:v{}:{}",
        made.key_version,
        data_encoding::BASE64.encode(&made.ciphertext)
    ));

    let used = client("use", &cfg);
    assert_eq!(used["from_grpc"], "from grpc");
    // And back: a Transit ciphertext decrypts with gRPC Decrypt.
    let for_grpc = used["for_grpc"].as_str().unwrap();
    let (version, body) = for_grpc
        .strip_prefix("vault:v")
        .unwrap()
        .split_once(':')
        .unwrap();
    assert_eq!(version, "2", "the key was rotated once");
    let back = grpc
        .decrypt(kms_proto::v1::DecryptRequest {
            key: "aes".into(),
            ciphertext: data_encoding::BASE64.decode(body.as_bytes()).unwrap(),
            associated_data: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, b"from transit");
    assert_eq!(back.key_version, 2);
    assert!(
        strings(&used["no_grant"])
            .iter()
            .any(|e| e.starts_with("permission denied") && e.contains("encrypt")),
        "{}",
        used["no_grant"]
    );
    assert!(
        strings(&used["prefix_mismatch"])
            .iter()
            .any(|e| e.contains("does not match")),
        "{}",
        used["prefix_mismatch"]
    );
    assert_eq!(used["spire"]["spire-ec"]["key_type"], "ecdsa-p256");
    assert_eq!(used["spire"]["spire-rsa"]["key_type"], "rsa-2048");
    assert_eq!(used["spire"]["spire-rsa"]["signature_bytes"], 256);
    assert_eq!(used["read_aes"]["latest_version"], 2);
    // DELETE scheduled every version but the primary and disabled the primary.
    let p384 = grpc
        .get_key(kms_proto::v1::GetKeyRequest {
            name: "p384".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let state = |v: u32| {
        p384.versions
            .iter()
            .find(|x| x.version == v)
            .map(|x| x.state)
            .unwrap()
    };
    assert_eq!(p384.primary_version, 2);
    assert_eq!(
        state(1),
        kms_proto::v1::KeyVersionState::ScheduledForDestruction as i32
    );
    assert_eq!(state(2), kms_proto::v1::KeyVersionState::Disabled as i32);

    // The front's calls are in the audit log, as gRPC's: by principal, operation and key,
    // the refused ones too, and no plaintext, ciphertext or token anywhere in it.
    let events = audit_events(&server, &hsm);
    let count = |principal: &str, operation: &str, key: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| {
                e["principal"] == principal
                    && e["operation"] == operation
                    && (key.is_empty() || e["key"] == key)
                    && e["outcome"] == outcome
            })
            .count()
    };
    let admin = hsm.admin.principal.as_str();
    assert!(count(admin, "Encrypt", "aes", "OK") >= 3);
    assert!(count(admin, "BatchDecrypt", "aes", "OK") >= 1);
    assert!(count(admin, "Sign", "spire-ec", "OK") >= 1);
    assert!(count(admin, "CreateKey", "spire-rsa", "OK") == 1);
    assert!(count(admin, "CertLogin", "", "OK") == 1);
    assert!(count(&app.principal, "Encrypt", "aes", "PERMISSION_DENIED") == 1);
    assert!(count(&app.principal, "CreateKey", "app-key", "PERMISSION_DENIED") == 1);
    assert!(count(admin, "Hash", "", "OK") >= 2);
    // Refused before its call (a derivation context): recorded with its key all the same.
    // (a derivation context and a body that is not JSON)
    assert!(count(admin, "Encrypt", "aes", "INVALID_ARGUMENT") >= 2);
    assert!(count(admin, "Hash", "", "INVALID_ARGUMENT") == 1);
    // Each record says which front the call came through: `http` here, none for gRPC.
    let transit_encrypts: Vec<_> = events
        .iter()
        .filter(|e| e["operation"] == "Encrypt" && e["key"] == "aes")
        .collect();
    assert!(
        transit_encrypts.iter().any(|e| e["front"] == "http")
            && transit_encrypts.iter().any(|e| e["front"].is_null()),
        "{transit_encrypts:?}"
    );
    assert!(
        events
            .iter()
            .filter(|e| e["operation"] == "CertLogin")
            .all(|e| e["front"] == "http" && e["service"] == "kms.v1.Access")
    );
    // A single rewrap's record names the version it wrote under, as gRPC's ReEncrypt's does.
    let rewraps: Vec<_> = events
        .iter()
        .filter(|e| e["operation"] == "ReEncrypt" && e["front"] == "http" && e["outcome"] == "OK")
        .collect();
    assert!(!rewraps.is_empty());
    assert!(
        rewraps.iter().all(|e| e["destination_key_version"]
            .as_u64()
            .is_some_and(|v| v >= 1)),
        "{rewraps:?}"
    );
    // DELETE left one record per version it changed, each naming its version.
    let deleted: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["key"] == "p384" && e["outcome"] == "OK" && e["front"] == "http")
        .filter(|e| {
            e["operation"] == "DisableKeyVersion"
                || e["operation"] == "ScheduleKeyVersionDestruction"
        })
        .map(|e| {
            (
                e["operation"].as_str().unwrap().to_owned(),
                e["key_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        deleted,
        [
            ("DisableKeyVersion".to_owned(), 2),
            ("ScheduleKeyVersionDestruction".to_owned(), 1)
        ]
    );
    let log = serde_json::to_string(&events).unwrap();
    let token = created["token"].as_str().unwrap();
    for secret in [token, "attack at dawn", "YXR0YWNrIGF0IGRhd24=", for_grpc] {
        assert!(!log.contains(secret), "{secret} in the audit log");
        assert!(!hsm.logs().contains(secret), "{secret} in the server log");
    }

    // What the front refuses before any call: answered as Vault does, each refusal of a
    // certificate holder recorded (`kms.Http`/`Refused`, the path by its size only, the
    // canonical code), none of the path's text in the log.
    let probe = hsm.pki.client("probe", &ClientSpec::spiffe("probe"));
    cfg["probe_cert"] = serde_json::json!(probe.cert);
    cfg["probe_key"] = serde_json::json!(probe.key);
    let front = client("front", &cfg);
    for (label, status) in [
        ("unknown", 404),
        ("outside", 404),
        ("method", 405),
        ("login_json", 400),
        ("export", 400),
        ("token", 403),
        ("too_large", 413),
        ("no_grant_bad_params", 403),
        ("hash_max", 200),
        ("hash_over", 400),
        ("batch_over", 400),
    ] {
        assert_eq!(front["codes"][label], status, "{label}: {front}");
    }
    assert_eq!(front["anonymous_method"], 405, "{front}");
    assert!(
        strings(&front["batch_over"])
            .iter()
            .any(|e| e.contains("split the batch")),
        "{front}"
    );
    let warnings = strings(&front["warnings"]);
    assert!(
        warnings.len() == 1 && warnings[0].len() < 512 && warnings[0].contains("and 184 more"),
        "{warnings:?}"
    );
    assert_eq!(front["health_600"], 400, "{front}");
    assert_eq!(front["health_503"], 503, "{front}");
    let events = audit_events(&server, &hsm);
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e["principal"] == probe.principal.as_str())
        .collect();
    let outcomes = |outcome: &str| {
        refused
            .iter()
            .filter(|e| {
                e["service"] == "kms.Http"
                    && e["operation"] == "Refused"
                    && e["front"] == "http"
                    && e["outcome"] == outcome
                    && e["key"].as_str().is_some_and(|k| k.starts_with("<path, "))
            })
            .count()
    };
    assert_eq!(outcomes("NOT_FOUND"), 2, "{refused:?}");
    assert_eq!(outcomes("UNIMPLEMENTED"), 1, "{refused:?}");
    assert_eq!(outcomes("INVALID_ARGUMENT"), 2, "{refused:?}");
    assert_eq!(outcomes("PERMISSION_DENIED"), 1, "{refused:?}");
    assert_eq!(outcomes("OUT_OF_RANGE"), 1, "{refused:?}");
    // Refused for its grant (`verify-mac`), not for its parameters.
    assert_eq!(
        refused
            .iter()
            .filter(|e| e["operation"] == "VerifyMac"
                && e["key"] == "mac"
                && e["outcome"] == "PERMISSION_DENIED")
            .count(),
        1,
        "{refused:?}"
    );
    let log = serde_json::to_string(&events).unwrap();
    assert!(!log.contains("s3cr3t"), "a path's text in the audit log");

    // Sealed: 503 on health and on every call, as Vault's.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let sealed = client("sealed", &cfg);
    assert_eq!(sealed["sealed_health"], 503);
}

/// The front's own refusals count against the gate's limits, as gRPC's: a certificate
/// holder's unknown paths reach its limit of refused calls (the first 429 of the minute
/// recorded), and a caller without a certificate over `anonymous_calls_per_minute` waits a
/// second before its 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fronts_refusals_count_against_the_gates_limits() {
    let hsm = TestHsm::new("vault-transit-limits");
    let port = free_port();
    let tables = hsm.tls_tables().replace(
        "refused_calls_per_minute = 100000",
        "refused_calls_per_minute = 5\nanonymous_calls_per_minute = 3",
    );
    let config = hsm.config_full(
        "kms.toml",
        &hsm.hsm_table(),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n{tables}"),
    );
    let (server, _shares) = start_unsealed(&hsm, &config);
    let probe = hsm.pki.client("probe", &ClientSpec::spiffe("probe"));
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let cfg = serde_json::json!({
        "url": format!("https://127.0.0.1:{port}"),
        "ca": server.ca,
        "admin_cert": hsm.admin.cert,
        "admin_key": hsm.admin.key,
        "admin_principal": hsm.admin.principal,
        "app_cert": app.cert,
        "app_key": app.key,
        "probe_cert": probe.cert,
        "probe_key": probe.key,
    });
    let out = client("limits", &cfg);
    let holder: Vec<u64> = out["holder"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let not_found = holder.iter().take_while(|s| **s == 404).count();
    assert!(
        (1..8).contains(&not_found) && holder[not_found..].iter().all(|s| *s == 429),
        "{holder:?}"
    );
    let anonymous = out["anonymous"].as_array().unwrap();
    let limited: Vec<_> = anonymous.iter().filter(|a| a[0] == 429).collect();
    assert!(!limited.is_empty(), "{anonymous:?}");
    assert!(
        limited.iter().all(|a| a[1].as_f64().unwrap() >= 0.9),
        "{anonymous:?}"
    );
    let events = audit_events(&server, &hsm);
    let of = |outcome: &str| {
        events
            .iter()
            .filter(|e| {
                e["principal"] == probe.principal.as_str()
                    && e["service"] == "kms.Http"
                    && e["outcome"] == outcome
            })
            .count()
    };
    assert_eq!(of("NOT_FOUND"), not_found, "{events:?}");
    assert_eq!(of("RESOURCE_EXHAUSTED"), 1, "{events:?}");
}
