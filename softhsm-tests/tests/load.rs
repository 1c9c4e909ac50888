//! The load generator and the echo server (benches/): `kms-load` drives a real server over
//! mTLS and reports what it measured, and `kms-echo` answers the same calls with no work
//! behind them. Short runs: they show the tools work, they measure nothing (scripts/bench
//! does, in release builds, pinned to cores).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kms_proto::v1 as pb;
use softhsm_tests::{ClientSpec, TestHsm, bin, start_unsealed};

/// Runs `kms-load` with `args` and returns its JSON report.
fn load(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("kms-load"))
        .args(args)
        .args(["--duration", "1s", "--warmup", "200ms", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kms-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_load_measures_a_real_server_and_the_echo_ceiling() {
    let hsm = TestHsm::new("kms-load");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let mut keys = server.keys().await;
    keys.create_key(pb::CreateKeyRequest {
        name: "payments".into(),
        algorithm: pb::Algorithm::Aes256Gcm as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    server.grant("payments", &app.principal).await;
    let pid = server.pid().to_string();
    let (ca, cert, key) = (
        server.ca.to_str().unwrap().to_owned(),
        app.cert.to_str().unwrap().to_owned(),
        app.key.to_str().unwrap().to_owned(),
    );
    let common = [
        "--addr",
        &server.addr,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--cert-key",
        &key,
        "--key",
        "payments",
    ];
    let mut measured = std::collections::BTreeMap::new();
    for (op, extra) in [
        ("encrypt", vec![]),
        ("decrypt", vec![]),
        ("batch-encrypt", vec!["--batch", "8"]),
    ] {
        let mut args = common.to_vec();
        args.extend(["--op", op, "--concurrency", "4", "--server-pid", &pid]);
        args.extend(extra);
        let r = load(&args);
        assert_eq!(r["errors"], 0, "{op}: {r}");
        assert!(r["calls"].as_u64().unwrap() > 0, "{op}: {r}");
        measured.insert(op, r["calls"].as_u64().unwrap());
        assert!(
            r["p99_us"].as_u64().unwrap() >= r["p50_us"].as_u64().unwrap(),
            "{r}"
        );
        assert!(
            r["server_cpu_seconds_per_1000"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        if op == "batch-encrypt" {
            assert_eq!(
                r["items_per_second"].as_f64().unwrap(),
                r["ops_per_second"].as_f64().unwrap() * 8.0
            );
        }
    }
    // The calls were real: each measured call is in the audit log, an OK record of the
    // application (kms-load's warm-up calls add a few more).
    let export = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(export.code, Some(0), "{export:?}");
    let recorded = |operation: &str| {
        export
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                let e = &v["event"];
                e["operation"] == operation
                    && e["outcome"] == "OK"
                    && e["principal"] == app.principal
            })
            .count() as u64
    };
    for (op, operation) in [
        ("encrypt", "Encrypt"),
        ("decrypt", "Decrypt"),
        ("batch-encrypt", "BatchEncrypt"),
    ] {
        let (calls, records) = (measured[op], recorded(operation));
        assert!(records >= calls, "{op}: {calls} calls, {records} records");
    }
    // Errors are counted, not hidden: a key the identity has no grant for.
    let mut args = common.to_vec();
    args.extend(["--op", "encrypt", "--concurrency", "2"]);
    let idx = args.iter().position(|a| *a == "payments").unwrap();
    args[idx] = "no-grant";
    let r = load(&args);
    assert_eq!(r["calls"], 0, "{r}");
    assert!(r["errors"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["first_error"]
            .as_str()
            .unwrap()
            .contains("PermissionDenied"),
        "{r}"
    );

    // --rate paces the calls: 40/s over the 1 s measured is about 40, not thousands.
    let mut args = common.to_vec();
    args.extend(["--op", "encrypt", "--concurrency", "2", "--rate", "40"]);
    let r = load(&args);
    assert_eq!(r["errors"], 0, "{r}");
    assert!((20..=60).contains(&r["calls"].as_u64().unwrap()), "{r}");

    // --populate (the key-scale bench's set-up): keys with a grant each, as the admin.
    let (admin_cert, admin_key) = (
        hsm.admin.cert.to_str().unwrap().to_owned(),
        hsm.admin.key.to_str().unwrap().to_owned(),
    );
    let out = Command::new(bin("kms-load"))
        .args(["--addr", &server.addr, "--ca", &ca])
        .args(["--cert", &admin_cert, "--cert-key", &admin_key])
        .args(["--populate", "25", "--concurrency", "4"])
        .args(["--grantee", &app.principal])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("created 25 keys with a grant each"),
        "{out:?}"
    );
    let mut args = common.to_vec();
    args.extend(["--op", "encrypt", "--concurrency", "2"]);
    let idx = args.iter().position(|a| *a == "payments").unwrap();
    args[idx] = "scale-000024";
    assert_eq!(load(&args)["errors"], 0);
    // ...and pages of ListKeys.
    let mut args = common.to_vec();
    args[5] = &admin_cert;
    args[7] = &admin_key;
    args.extend(["--op", "list-keys", "--batch", "10", "--concurrency", "1"]);
    let r = load(&args);
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["calls"].as_u64().unwrap() > 0, "{r}");

    // The echo: the same calls, same TLS and client certificate, no work.
    let mut echo = Command::new(bin("kms-echo"))
        .args(["--cert", hsm.pki.server.cert.to_str().unwrap()])
        .args(["--cert-key", hsm.pki.server.key.to_str().unwrap()])
        .args(["--client-ca", &ca])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = BufReader::new(echo.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let addr = format!(
        "https://{}",
        line.strip_prefix("kms-echo listening on ").unwrap()
    );
    let mut args = common.to_vec();
    args[1] = &addr;
    args.extend(["--op", "encrypt", "--concurrency", "4", "--payload", "1024"]);
    let r = load(&args);
    let _ = echo.kill();
    let _ = echo.wait();
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["calls"].as_u64().unwrap() > 0, "{r}");
}
