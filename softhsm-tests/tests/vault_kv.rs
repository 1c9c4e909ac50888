//! Vault's KV version 2 paths on the Vault-compatible HTTPS front (`/v1/secret/...`,
//! docs/vault-kv.md), driven by the real `hvac` client over mTLS against a real server on a
//! SoftHSM token: every method of `client.secrets.kv.v2`, Vault's raw PATCH and subkeys
//! calls, the answers' shapes and status codes, a principal without a grant (403 whatever
//! it sends), the audit records the calls leave (path, versions, `front: http`), no value
//! in the audit log, its files on disk, the store or the server's log, and a sealed server.
//!
//! The script is `vault_kv_client.py` beside this file; the interpreter is
//! `KMS_TEST_PYTHON`, else `target/pyenv` (scripts/test installs hvac there). The test
//! fails, never skips, when neither is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kms_proto::v1 as pb;
use softhsm_tests::{ClientSpec, Server, TestHsm};

/// Runs a phase of the client script; its JSON output.
fn client(phase: &str, config: &serde_json::Value) -> serde_json::Value {
    softhsm_tests::python_phase("vault_kv_client.py", phase, config)
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

/// The values the script writes: none may appear in a log, a record or a file on disk.
const VALUES: [&str; 3] = [
    "kv-value-one-7f3a9c",
    "kv-value-two-51d2e8",
    "kv-value-three-c04b16",
];

/// A custom metadata value the script sets (sealed in the store, never in a record).
const CUSTOM: &str = "kv-custom-owner-9e21aa";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_kv_clients_work_unchanged_against_the_secret_mount() {
    let hsm = TestHsm::new("vault-kv");
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, "");
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let cfg = serde_json::json!({
        "url": format!("https://127.0.0.1:{port}"),
        "ca": server.ca,
        "admin_cert": hsm.admin.cert,
        "admin_key": hsm.admin.key,
        "app_cert": app.cert,
        "app_key": app.key,
        "values": VALUES,
        "custom_value": CUSTOM,
    });

    // The admin holds the admin role (the engine's configuration) and a grant of every
    // secret operation on every path; the app holds nothing.
    let mut secrets =
        pb::secrets_client::SecretsClient::new(server.channel(Some(&server.admin)).await);
    secrets
        .create_secret_grant(pb::CreateSecretGrantRequest {
            path: "*".into(),
            principal: hsm.admin.principal.clone(),
            operations: (1..=6).collect(),
        })
        .await
        .unwrap();

    let kv = client("kv", &cfg);
    assert_eq!(kv["config"]["delete_version_after"], "3h25m19s");
    assert_eq!(
        kv["listed"],
        serde_json::json!(["api", "db", "nested/", "ttl"])
    );
    assert_eq!(kv["patch_json"], 415);
    assert_eq!(kv["deleted_read"]["data"], serde_json::Value::Null);
    assert_eq!(kv["metadata"]["current_version"], 4);
    assert!(
        kv["cas_mismatch"][0]
            .as_str()
            .unwrap()
            .starts_with("check-and-set parameter did not match the current version"),
        "{kv}"
    );
    assert!(
        kv["not_strings"][0]
            .as_str()
            .unwrap()
            .contains("values must be strings"),
        "{kv}"
    );
    for (label, status) in [
        ("unknown", 404),
        ("method", 405),
        ("get_delete", 405),
        ("list_data", 405),
        ("not_json", 400),
        ("bad_path", 400),
    ] {
        assert_eq!(kv["codes"][label], status, "{label}: {kv}");
    }
    assert!(
        kv["warnings"][0].as_str().unwrap().contains("bogus"),
        "{kv}"
    );
    // What the front wrote is what gRPC reads: the same engine, the same versions.
    let read = secrets
        .get_secret(pb::GetSecretRequest {
            path: "app/db".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read.data.get("password").map(String::as_str),
        Some(VALUES[2])
    );
    assert_eq!(read.data.get("role").map(String::as_str), Some("ro"));
    assert_eq!(read.version.unwrap().version, 4);

    let nogrant = client("nogrant", &cfg);
    for (label, errors) in nogrant["forbidden"].as_object().unwrap() {
        let first = errors[0].as_str().unwrap_or_default();
        assert!(first.starts_with("permission denied"), "{label}: {errors}");
    }
    assert_eq!(nogrant["forbidden"].as_object().unwrap().len(), 14);
    for label in [
        "patch_json",
        "patch_merge",
        "subkeys",
        "not_json",
        "metadata_patch",
    ] {
        assert_eq!(nogrant["codes"][label], 403, "{label}: {nogrant}");
    }

    // The records: one per call, through the front (`front: http`), naming the path and
    // the versions, the refusals with their outcome.
    let events = audit_events(&server, &hsm);
    let admin = hsm.admin.principal.as_str();
    let of = |principal: &str, operation: &str, path: &str, outcome: &str| -> Vec<Vec<u64>> {
        events
            .iter()
            .filter(|e| {
                e["principal"] == principal
                    && e["operation"] == operation
                    && e["outcome"] == outcome
                    && e["secret"]["path"] == path
                    && e["front"] == "http"
            })
            .map(|e| {
                assert_eq!(e["service"], "kms.v1.Secrets", "{e}");
                e["secret"]["versions"]
                    .as_array()
                    .map(|v| v.iter().map(|n| n.as_u64().unwrap()).collect())
                    .unwrap_or_default()
            })
            .collect()
    };
    // The test's own gRPC read is the one record without a front.
    let grpc: Vec<_> = events
        .iter()
        .filter(|e| e["service"] == "kms.v1.Secrets" && e["front"].is_null())
        .map(|e| e["operation"].as_str().unwrap())
        .collect();
    assert_eq!(grpc, ["CreateSecretGrant", "GetSecret"]);
    assert_eq!(of(admin, "PutSecret", "app/db", "OK"), [[1], [2], [3]]);
    assert_eq!(of(admin, "PatchSecret", "app/db", "OK"), [[4]]);
    assert_eq!(
        of(admin, "PutSecret", "app/db", "FAILED_PRECONDITION").len(),
        3
    );
    assert_eq!(
        of(admin, "PutSecret", "app/api", "INVALID_ARGUMENT").len(),
        1
    );
    assert_eq!(
        of(admin, "PatchSecret", "app/db", "INVALID_ARGUMENT").len(),
        1
    );
    assert_eq!(
        of(admin, "DeleteSecretVersions", "app/db", "OK"),
        [vec![4], vec![1, 2]]
    );
    assert_eq!(
        of(admin, "UndeleteSecretVersions", "app/db", "OK"),
        [[2, 4]]
    );
    assert_eq!(of(admin, "DestroySecretVersions", "app/db", "OK"), [[3]]);
    // Lowering max_versions dropped version 1: the record says so.
    assert!(
        events
            .iter()
            .any(|e| e["operation"] == "UpdateSecretMetadata"
                && e["outcome"] == "OK"
                && e["secret"]["path"] == "app/db"
                && e["secret"]["dropped"] == serde_json::json!([1])),
        "{events:?}"
    );
    assert_eq!(of(admin, "DeleteSecret", "app/api", "OK").len(), 1);
    assert_eq!(of(admin, "ListSecrets", "app/", "OK").len(), 3);
    assert_eq!(of(admin, "ListSecrets", "nothing/", "NOT_FOUND").len(), 1);
    assert_eq!(of(admin, "UpdateSecretsConfig", "", "OK").len(), 2);
    // A deleted version read: Vault's 404 with its metadata, recorded NOT_FOUND with it.
    assert!(
        of(admin, "GetSecret", "app/db", "NOT_FOUND").contains(&vec![4]),
        "{events:?}"
    );
    assert!(of(admin, "GetSecret", "app/db", "OK").contains(&vec![2]));
    assert!(of(admin, "GetSecretSubkeys", "app/db", "OK").contains(&vec![1]));
    assert_eq!(of(admin, "GetSecret", "app/none", "NOT_FOUND").len(), 2);
    // The app: refused for its grant, whatever it sent, each recorded with the path.
    let app_p = app.principal.as_str();
    assert_eq!(
        of(app_p, "PutSecret", "app/db", "PERMISSION_DENIED").len(),
        3
    );
    assert_eq!(
        of(app_p, "PatchSecret", "app/db", "PERMISSION_DENIED").len(),
        2
    );
    assert_eq!(
        of(app_p, "UpdateSecretsConfig", "", "PERMISSION_DENIED").len(),
        1
    );
    assert_eq!(
        of(app_p, "ListSecrets", "app/", "PERMISSION_DENIED").len(),
        1
    );

    // No value, custom metadata value or token anywhere: the export, the server's log,
    // the store and the audit log's files on disk.
    let exported = serde_json::to_string(&events).unwrap();
    let mut places = vec![
        ("the audit export", exported.into_bytes()),
        ("the server log", hsm.logs().into_bytes()),
        (
            "the store",
            std::fs::read(hsm.path().join("kms.redb")).unwrap(),
        ),
    ];
    let mut segments = 0;
    for entry in std::fs::read_dir(hsm.path().join("kms.redb.audit")).unwrap() {
        let path = entry.unwrap().path();
        segments += usize::from(path.extension().is_some_and(|e| e == "log"));
        places.push(("an audit log file", std::fs::read(&path).unwrap()));
    }
    assert!(segments >= 1, "the records are in the audit log's files");
    for secret in VALUES.iter().chain([&CUSTOM]) {
        for (what, bytes) in &places {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in {what}"
            );
        }
    }
    // The test would see a value had one been written: the export holds the path.
    assert!(places[0].1.windows(6).any(|w| w == b"app/db"));

    // secret-write alone: answers without the custom metadata.
    secrets
        .create_secret_grant(pb::CreateSecretGrantRequest {
            path: "app/w".into(),
            principal: app.principal.clone(),
            operations: vec![pb::SecretOperation::Write as i32],
        })
        .await
        .unwrap();
    let writeonly = client("writeonly", &cfg);
    assert_eq!(writeonly["versions"], serde_json::json!([1, 2, 4]));

    // Sealed: 503, as Vault's.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let sealed = client("sealed", &cfg);
    assert_eq!(sealed["sealed_read"], 503);
}
