//! `kms backup create|restore`: a backup taken online under load, restored into a fresh
//! PostgreSQL database and into a fresh redb file, each unsealed with the old shares and
//! decrypting everything acknowledged before the backup; damaged files and non-empty
//! stores refused; the backup is the admin's alone.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kms_proto::v1 as pb;
use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{TestHsm, start_unsealed};

async fn encrypt(c: &mut softhsm_tests::KeysClient, key: &str, pt: &[u8]) -> Vec<u8> {
    softhsm_tests::encrypt_ctx(c, key, pt).await.unwrap()
}

async fn decrypt(c: &mut softhsm_tests::KeysClient, key: &str, ct: &[u8]) -> Vec<u8> {
    softhsm_tests::decrypt_ctx(c, key, ct).await.unwrap()
}

/// Everything each restored server must decrypt: (key, plaintext, ciphertext).
type Acknowledged = Vec<(String, Vec<u8>, Vec<u8>)>;

async fn check_restored(
    hsm: &TestHsm,
    config: &std::path::Path,
    shares: &[String],
    acked: &Acknowledged,
) {
    let server = hsm.try_start(config, &[]).unwrap();
    let status = server.kms(&["operator", "status", "--json"], "");
    assert_eq!(
        status.json()["sealed"],
        true,
        "a restored server comes up sealed: {status:?}"
    );
    server.unseal_with(shares);
    let mut c = server.keys().await;
    for (key, pt, ct) in acked {
        assert_eq!(&decrypt(&mut c, key, ct).await, pt);
    }
    // And it goes on: new calls work and the audit chain continues intact.
    let ct = encrypt(&mut c, "soft", b"after the restore").await;
    assert_eq!(decrypt(&mut c, "soft", &ct).await, b"after the restore");
    let verify = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert!(verify.stdout.contains("intact"), "{verify:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_either_backend() {
    let pg = TestPostgres::start();
    let hsm = TestHsm::new("kms-backup");
    let config = hsm.config();
    let (server, shares) = start_unsealed(&hsm, &config);
    server
        .create_aes_key("soft", pb::ProtectionLevel::Software)
        .await;
    server
        .create_aes_key("hard", pb::ProtectionLevel::Hsm)
        .await;
    let mut c = server.keys().await;
    let mut acked: Acknowledged = Vec::new();
    for i in 0..20 {
        for key in ["soft", "hard"] {
            let pt = format!("{key} secret {i}").into_bytes();
            let ct = encrypt(&mut c, key, &pt).await;
            acked.push((key.to_owned(), pt, ct));
        }
    }
    // The backup, online, while calls go on.
    let load = tokio::spawn({
        let c = c.clone();
        async move {
            for i in 0..200 {
                let mut c = c.clone();
                encrypt(&mut c, "soft", format!("during {i}").as_bytes()).await;
            }
        }
    });
    let file = hsm.path().join("kms.backup");
    let out = server.kms(&["backup", "create", "--out", file.to_str().unwrap()], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("backup written"), "{out:?}");
    load.await.unwrap();
    let exists = server.kms(&["backup", "create", "--out", file.to_str().unwrap()], "");
    assert_ne!(exists.code, Some(0));
    assert!(
        exists.stderr.contains("exists: choose a new file"),
        "{exists:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Not for an auditor, nor anyone but an admin.
    let denied = server.kms_as(
        Some(&server.auditor),
        &[
            "backup",
            "create",
            "--out",
            hsm.path().join("x").to_str().unwrap(),
        ],
        "",
    );
    assert_ne!(denied.code, Some(0));
    assert!(denied.stderr.contains("PERMISSION_DENIED"), "{denied:?}");
    assert!(!hsm.path().join("x").exists() && !hsm.path().join("x.partial").exists());
    // It holds no secret of the test in clear.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("secret 1") && !text.contains(&hsm.pin));
    let check = softhsm_tests::run_kms(
        "https://127.0.0.1:1",
        &["backup", "check", "--in", file.to_str().unwrap()],
        "",
    );
    assert_eq!(check.code, Some(0), "{check:?}");
    drop(server);

    // Into a fresh PostgreSQL database: the migration path from redb.
    let pg_config = hsm.config_full("pg.toml", &hsm.hsm_table(), &pg.storage_table());
    let restore = |cfg: &std::path::Path, input: &std::path::Path| {
        softhsm_tests::run_kms(
            "https://127.0.0.1:1",
            &[
                "backup",
                "restore",
                "--in",
                input.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ],
            "",
        )
    };
    let out = restore(&pg_config, &file);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("restored"), "{out:?}");
    check_restored(&hsm, &pg_config, &shares, &acked).await;
    // A second restore into the same (now not empty) store is refused.
    let again = restore(&pg_config, &file);
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("not empty"), "{again:?}");

    // Into a fresh redb file.
    let redb_dir = hsm.path().join("restored");
    let redb_config = hsm.config_full(
        "redb.toml",
        &hsm.hsm_table(),
        &format!(
            "[storage]\npath = \"{}\"\n",
            redb_dir.join("kms.redb").display()
        ),
    );
    let out = restore(&redb_config, &file);
    assert_eq!(out.code, Some(0), "{out:?}");
    check_restored(&hsm, &redb_config, &shares, &acked).await;

    // A damaged file is refused whole, and nothing is written.
    let fresh = pg.new_database("kms_damaged");
    let damaged_config = hsm.config_full(
        "damaged.toml",
        &hsm.hsm_table(),
        &pg.storage_table().replace(&pg.url(), &fresh),
    );
    let lines: Vec<&str> = text.lines().collect();
    let flip = |line: &str| {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let value = v["value"].as_str().unwrap().to_owned();
        let other = if value.starts_with('A') { "B" } else { "A" };
        v["value"] = serde_json::Value::String(format!("{other}{}", &value[1..]));
        v.to_string()
    };
    let mut altered = lines.clone();
    let flipped = flip(lines[lines.len() / 2]);
    altered[lines.len() / 2] = &flipped;
    for (name, body, why) in [
        (
            "altered",
            altered.join("\n") + "\n",
            "do not match its checksum",
        ),
        (
            "cut",
            lines[..lines.len() - 1].join("\n") + "\n",
            "no trailer",
        ),
        ("truncated", text[..text.len() / 2].to_owned(), "cut short"),
        ("empty", String::new(), "no header"),
        ("junk", "not a backup\n".repeat(3), "not a backup header"),
    ] {
        let path = hsm.path().join(format!("{name}.backup"));
        std::fs::write(&path, body).unwrap();
        let out = restore(&damaged_config, &path);
        assert_ne!(out.code, Some(0), "{name}: {out:?}");
        assert!(
            out.stderr.contains("damaged or not a kms backup"),
            "{name}: {out:?}"
        );
        assert!(out.stderr.contains(why), "{name}: {out:?}");
    }
    // A missing file, and an output that exists, are refused clearly.
    let missing = restore(&damaged_config, &hsm.path().join("no-such.backup"));
    assert_ne!(missing.code, Some(0));
    assert!(missing.stderr.contains("backup file"), "{missing:?}");
    // No plaintext, share or PIN of the test in the servers' logs.
    let logs = hsm.logs();
    for secret in
        shares
            .iter()
            .map(String::as_str)
            .chain([hsm.pin.as_str(), "secret 1", "after the restore"])
    {
        assert!(!logs.contains(secret), "a secret in the logs");
    }
    let rows = pg.sql_in("kms_damaged", "SELECT (SELECT count(*) FROM kms_system) + (SELECT count(*) FROM kms_keys) + (SELECT count(*) FROM kms_audit)");
    assert_eq!(rows.trim(), "0", "a refused restore wrote nothing");
}
