//! The Kubernetes KMS v2 plugin (docs/kubernetes.md) on a real server and SoftHSM token,
//! driven by a Python gRPC client generated from the apiserver's own `api.proto` (package
//! `v2`, k8s.io/kms) playing kube-apiserver: Status, Encrypt of a DEK seed and Decrypt; a
//! rotation (the key_id changes, old ciphertexts still decrypt until their version is
//! disabled); seal (Status not ok, Encrypt refused UNAVAILABLE at once) and unseal; the
//! apiserver's limits on what it sends and stores; a process of another uid, without a
//! grant, refused (the caller is who `SO_PEERCRED` says); the records the calls leave
//! (`front: kubernetes`, the apiserver's uid as the request id), and no seed in the server's
//! log or the audit export; the socket's mode, and its removal at stop.
//!
//! The script is `kubernetes_client.py` beside this file; the interpreter is
//! `KMS_TEST_PYTHON`, else `target/pyenv`. The test fails, never skips, when neither is
//! there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use softhsm_tests::{Server, TestHsm};

/// The encoding of bytes in the client's JSON.
fn b64(bytes: impl AsRef<[u8]>) -> String {
    data_encoding::BASE64.encode(bytes.as_ref())
}

fn unb64(text: &str) -> Vec<u8> {
    data_encoding::BASE64.decode(text.as_bytes()).unwrap()
}

/// The uid and gid of a process that has no grant (no account of this machine's: the
/// kernel names any number).
const STRANGER: u32 = 4242;

/// The kernel's overflow uid: what a process of another user namespace shows as.
const OVERFLOW: u32 = 65534;

/// Compiles the apiserver's api.proto into `dir` with grpcio-tools' protoc.
fn stubs(dir: &Path) {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/k8s/kms/apis/v2");
    std::fs::create_dir_all(dir).unwrap();
    softhsm_tests::python_stubs_of(dir, &proto, &[proto.join("api.proto")]);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        let mode = if f.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Runs a phase of the client as `uid` with the group [`STRANGER`] (the socket's), or as
/// this test (root) for `None`.
fn client_as(uid: Option<u32>, phase: &str, config: &Value) -> Value {
    let interpreter = match uid {
        None => Command::new(softhsm_tests::python()),
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={u}"))
                .arg(format!("--regid={STRANGER}"))
                .arg("--clear-groups")
                .arg(softhsm_tests::python());
            c
        }
    };
    softhsm_tests::python_phase_under(interpreter, "kubernetes_client.py", phase, config)
}

/// The plugin's calls `calls`, made as `uid`; their results.
fn calls_as(uid: Option<u32>, config: &Value, calls: Value) -> Vec<Value> {
    let mut c = config.clone();
    c["calls"] = calls;
    client_as(uid, "calls", &c)["results"]
        .as_array()
        .unwrap()
        .clone()
}

fn calls(config: &Value, calls: Value) -> Vec<Value> {
    calls_as(None, config, calls)
}

/// Every record the audit log holds, as the auditor exports them.
fn audit_events(server: &Server, hsm: &TestHsm) -> Vec<Value> {
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone())
        .collect()
}

fn ok(server: &Server, args: &[&str]) {
    let out = server.kms(args, "");
    assert_eq!(out.code, Some(0), "kms {args:?}: {out:?}");
}

#[test]
fn kube_apiserver_encrypts_its_seeds_through_the_plugin_socket() {
    let hsm = TestHsm::new("kubernetes");
    // The stranger must reach the socket (its group is the stranger's) and the stubs.
    std::fs::set_permissions(hsm.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let socket: PathBuf = hsm.path().join("kubernetes.sock");
    let config = hsm.config_full(
        "kms.toml",
        &hsm.hsm_table(),
        &format!(
            "[kubernetes_kms]\nsocket = \"{}\"\nkey = \"k8s-secrets\"\ngroup = \"{STRANGER}\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            socket.display()
        ),
    );
    let (mut server, shares) = softhsm_tests::start_unsealed(&hsm, &config);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "the socket is the group's too"
    );
    assert_eq!(meta.gid(), STRANGER);

    let stub_dir = hsm.path().join("stubs");
    stubs(&stub_dir);
    let cfg = json!({"socket": socket, "stubs": stub_dir});

    // No key, or a key without a grant for uid 0: refused, and nothing about the key said.
    let r = calls(&cfg, json!([{"method": "status"}]));
    assert_eq!(r[0]["code"], "PERMISSION_DENIED", "{r:?}");
    // In the token: every call of the plugin is an HSM call (the outage below).
    ok(
        &server,
        &[
            "key",
            "create",
            "k8s-secrets",
            "--algorithm",
            "aes-256-gcm",
            "--protection",
            "hsm",
        ],
    );
    let r = calls(
        &cfg,
        json!([{"method": "status"}, {"method": "encrypt", "plaintext": b64([7u8; 32])}]),
    );
    assert_eq!(r[0]["code"], "PERMISSION_DENIED", "{r:?}");
    assert_eq!(r[1]["code"], "PERMISSION_DENIED", "{r:?}");
    ok(
        &server,
        &[
            "grant",
            "create",
            "k8s-secrets",
            "unix:uid=0",
            "--operations",
            "encrypt,decrypt",
            // Bound to the plugin's associated data: the grant opens seeds only.
            "--aad",
            "k8s.io/kms/v2",
        ],
    );

    // The apiserver's round: Status ok, a seed encrypted under the key Status names, and back.
    let first = client_as(None, "apiserver", &cfg);
    assert_eq!(first["key_id"], "kms:k8s-secrets:v1", "{first}");
    let seed = first["seed"].as_str().unwrap().to_owned();

    // A process of another uid that holds no grant: refused, though it reaches the socket.
    let r = calls_as(
        Some(STRANGER),
        &cfg,
        json!([
            {"method": "status"},
            {"method": "encrypt", "plaintext": b64([1u8; 32])},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": first["key_id"]},
        ]),
    );
    for (i, c) in r.iter().enumerate() {
        assert_eq!(c["code"], "PERMISSION_DENIED", "call {i}: {c}");
        assert!(!c.to_string().contains(&seed), "{c}");
    }
    // The overflow uid (a process of another user namespace, many share it) is no one, even
    // if granted.
    ok(
        &server,
        &[
            "grant",
            "create",
            "k8s-secrets",
            &format!("unix:uid={OVERFLOW}"),
            "--operations",
            "encrypt,decrypt",
        ],
    );
    let r = calls_as(
        Some(OVERFLOW),
        &cfg,
        json!([{"method": "status"}, {"method": "encrypt", "plaintext": b64([1u8; 32])}]),
    );
    for c in &r {
        assert_eq!(c["code"], "UNAUTHENTICATED", "{c}");
    }
    // A client that sends the socket's path as its HTTP/2 authority (grpcio's default, and
    // kube-apiserver's before 1.32) is refused by the HTTP/2 stack (docs/kubernetes.md).
    let r = client_as(None, "path-authority", &cfg);
    assert_eq!(r["code"], "INTERNAL", "{r}");

    // The apiserver's limits: refused, named, and nothing lost.
    let ct = unb64(first["ciphertext"].as_str().unwrap());
    let mut tampered = ct.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let r = calls(
        &cfg,
        json!([
            {"method": "encrypt", "plaintext": b64(vec![0u8; 992])},
            {"method": "decrypt", "ciphertext": b64(vec![1u8; 1025]), "key_id": first["key_id"]},
            {"method": "decrypt", "ciphertext": "", "key_id": first["key_id"]},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": format!("kms:k8s-secrets:v1{}", "0".repeat(1020))},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": "aws:arn:key"},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": first["key_id"], "annotations": {"Not_A_Name": b64(b"x")}},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": first["key_id"], "annotations": {"big.example.com": b64(vec![0u8; 33 * 1024])}},
            {"method": "decrypt", "ciphertext": b64(tampered), "key_id": first["key_id"]},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": "kms:k8s-secrets:v2"},
            // What the apiserver may store beside a ciphertext is read by no one, but allowed.
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": first["key_id"], "annotations": {"version.example.com": b64(b"1")}},
            {"method": "encrypt", "plaintext": b64(vec![5u8; 991])},
        ]),
    );
    for (i, why) in [
        (0, "plaintext"),
        (1, "ciphertext"),
        (2, "ciphertext"),
        (3, "key_id"),
        (4, "key_id"),
        (5, "annotations"),
        (6, "annotations"),
    ] {
        assert_eq!(r[i]["code"], "INVALID_ARGUMENT", "call {i}: {}", r[i]);
        assert!(
            r[i]["message"].as_str().unwrap().contains(why),
            "call {i}: {}",
            r[i]
        );
    }
    for (i, what) in [
        (7, "a tampered ciphertext"),
        (8, "a key_id that is not the ciphertext's"),
    ] {
        assert_eq!(r[i]["code"], "INVALID_ARGUMENT", "{what}: {}", r[i]);
        assert!(
            r[i]["message"]
                .as_str()
                .unwrap()
                .contains("decryption failed"),
            "{what}: {}",
            r[i]
        );
    }

    assert_eq!(r[9]["code"], "OK", "{}", r[9]);
    assert_eq!(r[9]["plaintext"], seed);
    assert_eq!(r[10]["code"], "OK", "the longest plaintext: {}", r[10]);
    assert_eq!(unb64(r[10]["ciphertext"].as_str().unwrap()).len(), 1024);

    // A key_id naming another key: a key the caller holds no grant on is refused as such;
    // one it holds opens only the plugin's own ciphertexts made with it (the name, version
    // and the plugin's associated data are authenticated in each), not the seed of another
    // key, nor a ciphertext made through the gRPC API.
    ok(
        &server,
        &["key", "create", "other", "--algorithm", "aes-256-gcm"],
    );
    ok(
        &server,
        &["key", "create", "ungranted", "--algorithm", "aes-256-gcm"],
    );
    ok(
        &server,
        &[
            "grant",
            "create",
            "other",
            "unix:uid=0",
            "--operations",
            "decrypt",
        ],
    );
    ok(
        &server,
        &[
            "grant",
            "create",
            "other",
            &hsm.admin.principal,
            "--operations",
            "encrypt",
        ],
    );
    let plain = hsm.path().join("plain");
    std::fs::write(&plain, [9u8; 32]).unwrap();
    let grpc_ct = server.kms(
        &[
            "encrypt",
            "--key",
            "other",
            "--in",
            plain.to_str().unwrap(),
            "--base64",
        ],
        "",
    );
    assert_eq!(grpc_ct.code, Some(0), "{grpc_ct:?}");
    let r = calls(
        &cfg,
        json!([
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": "kms:ungranted:v1"},
            {"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": "kms:other:v1"},
            {"method": "decrypt", "ciphertext": grpc_ct.stdout.trim(), "key_id": "kms:other:v1"},
        ]),
    );
    assert_eq!(r[0]["code"], "PERMISSION_DENIED", "{r:?}");
    for c in &r[1..] {
        assert_eq!(c["code"], "INVALID_ARGUMENT", "{c}");
        assert!(
            c["message"].as_str().unwrap().contains("decryption failed"),
            "{c}"
        );
    }

    // Rotation: Status names the new version, new seeds are made under it, the old
    // ciphertext still decrypts under its own key_id.
    ok(&server, &["key", "rotate", "k8s-secrets"]);
    let second = client_as(None, "apiserver", &cfg);
    assert_eq!(second["key_id"], "kms:k8s-secrets:v2", "{second}");
    let old =
        json!({"method": "decrypt", "ciphertext": first["ciphertext"], "key_id": first["key_id"]});
    let r = calls(&cfg, json!([old]));
    assert_eq!(r[0]["code"], "OK", "{r:?}");
    assert_eq!(r[0]["plaintext"], seed);
    // Until its version is disabled.
    ok(&server, &["key", "disable-version", "k8s-secrets", "1"]);
    let r = calls(&cfg, json!([old, {"method": "status"}]));
    assert_eq!(r[0]["code"], "FAILED_PRECONDITION", "{r:?}");
    assert_eq!(r[1]["healthz"], "ok", "v2 still works: {r:?}");
    ok(&server, &["key", "enable-version", "k8s-secrets", "1"]);

    // Sealed: Status is not ok and says so; Encrypt and Decrypt are refused UNAVAILABLE at
    // once (the apiserver waits 3 s at most).
    ok(&server, &["operator", "seal"]);
    let r = calls(
        &cfg,
        json!([{"method": "status"}, {"method": "encrypt", "plaintext": b64([2u8; 32])}, old]),
    );
    assert_eq!(r[0]["code"], "OK", "{r:?}");
    assert!(
        r[0]["healthz"].as_str().unwrap().starts_with("SEALED"),
        "{r:?}"
    );
    assert_eq!(r[0]["key_id"], "", "{r:?}");
    for c in &r[1..] {
        assert_eq!(c["code"], "UNAVAILABLE", "{c}");
        assert!(c["seconds"].as_f64().unwrap() < 1.0, "{c}");
    }
    server.unseal_with(&shares);
    let third = client_as(None, "apiserver", &cfg);
    assert_eq!(third["key_id"], "kms:k8s-secrets:v2", "{third}");
    let r = calls(&cfg, json!([old]));
    assert_eq!(r[0]["plaintext"], seed, "{r:?}");

    // The HSM goes away (its token's files moved): Encrypt is refused UNAVAILABLE at once,
    // Status stops saying ok (within the 5 s a passed check is kept) and says why; back,
    // Status is ok again within seconds, with no restart and no unseal.
    let tokens = hsm.path().join("softhsm/tokens");
    let away = hsm.path().join("softhsm/tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    let gone = std::time::Instant::now();
    let seal_free =
        json!([{"method": "status"}, {"method": "encrypt", "plaintext": b64([3u8; 32])}]);
    let r = loop {
        let r = calls(&cfg, seal_free.clone());
        if r[0]["healthz"] != "ok" {
            break r;
        }
        assert!(
            gone.elapsed() < std::time::Duration::from_secs(15),
            "still ok: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        gone.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        gone.elapsed()
    );
    assert!(
        r[0]["healthz"]
            .as_str()
            .unwrap()
            .starts_with("HSM_UNAVAILABLE"),
        "{r:?}"
    );
    assert_eq!(r[1]["code"], "UNAVAILABLE", "{r:?}");
    assert!(r[1]["seconds"].as_f64().unwrap() < 1.0, "{r:?}");
    std::fs::rename(&away, &tokens).unwrap();
    let back = std::time::Instant::now();
    loop {
        let r = calls(&cfg, json!([{"method": "status"}]));
        if r[0]["healthz"] == "ok" {
            break;
        }
        assert!(
            back.elapsed() < std::time::Duration::from_secs(15),
            "not back: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let r = calls(&cfg, json!([old]));
    assert_eq!(r[0]["plaintext"], seed, "{r:?}");

    // The records: who (the uid), what, which key version, the apiserver's uid as the
    // request id, the front.
    let events = audit_events(&server, &hsm);
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["front"] == "kubernetes")
        .collect();
    let enc = mine
        .iter()
        .find(|e| e["request_id"] == first["uid"])
        .unwrap_or_else(|| {
            panic!(
                "no record of the apiserver's uid {}: {mine:?}",
                first["uid"]
            )
        });
    assert_eq!(enc["operation"], "Encrypt");
    assert_eq!(enc["principal"], "unix:uid=0");
    assert_eq!(enc["key"], "k8s-secrets");
    assert_eq!(enc["key_version"], 1);
    assert_eq!(enc["outcome"], "OK");
    assert!(
        mine.iter()
            .any(|e| e["operation"] == "CheckKey" && e["outcome"] == "OK")
    );
    assert!(
        mine.iter()
            .any(|e| e["principal"] == format!("unix:uid={STRANGER}")
                && e["operation"] == "Decrypt"
                && e["outcome"] == "PERMISSION_DENIED"
                && e["peer"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("gid={STRANGER}"))),
        "{mine:?}"
    );
    assert!(
        mine.iter()
            .any(|e| e["principal"] == "unix:unknown" && e["outcome"] == "UNAUTHENTICATED"),
        "{mine:?}"
    );
    assert!(enc["peer"].as_str().unwrap().starts_with("pid="), "{enc}");
    assert!(
        mine.iter()
            .any(|e| e["operation"] == "Encrypt" && e["outcome"] == "UNAVAILABLE")
    );

    // The metrics count the plugin's calls by method and code, and name no uid or key.
    let (code, text) = softhsm_tests::http_get(server.metrics.as_ref().unwrap());
    assert_eq!(code, 200, "{text}");
    for line in [
        r#"kms_requests_total{service="v2.KeyManagementService",method="Decrypt",code="OK"}"#,
        r#"kms_requests_total{service="v2.KeyManagementService",method="Encrypt",code="PERMISSION_DENIED"}"#,
        r#"kms_requests_total{service="v2.KeyManagementService",method="Status",code="UNAVAILABLE"}"#,
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }
    assert!(
        !text.contains("k8s-secrets") && !text.contains("uid="),
        "{text}"
    );

    // No seed anywhere it should not be.
    let export = server
        .kms_as(Some(&hsm.auditor), &["audit", "export"], "")
        .stdout;
    for s in [&seed, second["seed"].as_str().unwrap()] {
        let raw = unb64(s);
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        // As Debug prints bytes: [1, 2, 3, ...].
        let decimal = format!("{:?}", &raw[..8]);
        let decimal = decimal.trim_end_matches(']');
        for text in [&export, &hsm.logs()] {
            assert!(!text.contains(s) && !text.contains(&hex) && !text.contains(decimal));
        }
    }

    // Stopped: the socket is gone.
    assert!(server.terminate().success());
    assert!(!socket.exists(), "the socket is removed at stop");
}
