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
use softhsm_tests::TestHsm;
use softhsm_tests::pg::TestPostgres;

async fn encrypt(c: &mut softhsm_tests::KeysClient, key: &str, pt: &[u8]) -> Vec<u8> {
    softhsm_tests::encrypt_ctx(c, key, pt).await.unwrap()
}

async fn decrypt(c: &mut softhsm_tests::KeysClient, key: &str, ct: &[u8]) -> Vec<u8> {
    softhsm_tests::decrypt_ctx(c, key, ct).await.unwrap()
}

/// Everything each restored server must decrypt: (key, plaintext, ciphertext).
type Acknowledged = Vec<(String, Vec<u8>, Vec<u8>)>;

/// What the backed-up server was: its instance, and the backup's last record and digest.
struct Identity {
    instance: String,
    last_seq: u64,
    sha256: String,
}

/// Rewrites a backup as whoever can write the backup storage could: the seal record's audit
/// public key replaced by `python`'s own Ed25519 key, the digest and signature made again.
/// Returns the forged file's text and the forger's fingerprint.
fn forge(original: &str, dir: &std::path::Path) -> (String, String) {
    let script = r#"
import base64, hashlib, json, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
lines = open(sys.argv[1], "rb").read().splitlines(keepends=True)
key = Ed25519PrivateKey.generate()
public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
body = []
for line in lines[:-1]:
    v = json.loads(line)
    if v.get("table") == "system" and v.get("key") == "seal":
        record = json.loads(base64.b64decode(v["value"]))
        record["audit_public_key"] = public.hex()
        v["value"] = base64.b64encode(json.dumps(record, separators=(",", ":")).encode()).decode()
        line = (json.dumps(v, separators=(",", ":")) + "\n").encode()
    body.append(line)
digest = hashlib.sha256(b"".join(body)).hexdigest()
fingerprint = hashlib.sha256(public).digest()[:16].hex()
trailer = json.loads(lines[-1])
trailer["sha256"] = digest
trailer["key_fingerprint"] = fingerprint
trailer["signature"] = key.sign(("kms/v1/backup/" + digest).encode()).hex()
open(sys.argv[2], "wb").write(b"".join(body) + (json.dumps(trailer) + "\n").encode())
print(fingerprint)
"#;
    let input = dir.join("to-forge.backup");
    let output = dir.join("forged.backup");
    std::fs::write(&input, original).unwrap();
    let out = std::process::Command::new(softhsm_tests::python())
        .args([
            "-c",
            script,
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        std::fs::read_to_string(output).unwrap(),
        String::from_utf8(out.stdout).unwrap().trim().to_owned(),
    )
}

/// The highest audit sequence number a backup file holds.
fn last_audit_seq(backup: &str) -> u64 {
    backup
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["table"] == "audit")
        .map(|v| v["key"].as_str().unwrap().parse::<u64>().unwrap())
        .max()
        .unwrap()
}

async fn check_restored(
    hsm: &TestHsm,
    config: &std::path::Path,
    shares: &[String],
    acked: &Acknowledged,
    original: &Identity,
) {
    let server = hsm.try_start(config, &[]).unwrap();
    let status = server.kms(&["operator", "status", "--json"], "");
    assert_eq!(
        status.json()["sealed"],
        true,
        "a restored server comes up sealed: {status:?}"
    );
    // It took an identity of its own at its start, and names the one it came from: it
    // destroys nothing that one made (a restore drill on production's token).
    let instance = status.json()["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(instance.len(), 16, "{status:?}");
    assert_ne!(instance, original.instance, "{status:?}");
    assert_eq!(
        status.json()["restored_from_instance_ids"],
        serde_json::json!([original.instance]),
        "{status:?}"
    );
    server.unseal_with(shares);
    // The restore is the first record after the backup's last one, naming the backup; the
    // new identity's record follows it.
    let export = hsm.path().join(format!("restored-{instance}.jsonl"));
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", export.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("seq").is_some() && v.get("event").is_some())
        .collect();
    let at = |seq: u64| {
        records
            .iter()
            .find(|r| r["seq"] == seq)
            .unwrap_or_else(|| panic!("no record {seq}"))
    };
    let restored = at(original.last_seq + 1);
    assert_eq!(
        restored["event"]["operation"], "RestoreBackup",
        "{restored}"
    );
    assert_eq!(
        restored["event"]["ceremony"]["backup_sha256"],
        original.sha256.as_str(),
        "{restored}"
    );
    let renewed = at(original.last_seq + 2);
    assert_eq!(renewed["event"]["operation"], "RenewInstance", "{renewed}");
    assert_eq!(
        renewed["event"]["ceremony"]["instance"],
        instance.as_str(),
        "{renewed}"
    );
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
    let server = hsm.try_start(&config, &[]).unwrap();
    let init = server.init(3, 2, "");
    assert_eq!(init.code, Some(0), "{init:?}");
    let (shares, fingerprint) = (
        init.shares(),
        init.json()["audit_key_fingerprint"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    server.unseal_with(&shares);
    let instance = server.kms(&["operator", "status", "--json"], "").json()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(instance.len(), 16, "init gives the instance an identity");
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
    // The backup, online, while calls go on: calls are answered while it runs.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let calls = std::sync::Arc::new(AtomicU64::new(0));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (c, calls, stop) = (c.clone(), calls.clone(), stop.clone());
        async move {
            for i in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut c = c.clone();
                encrypt(&mut c, "soft", format!("during {i}").as_bytes()).await;
                calls.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    while calls.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let file = hsm.path().join("kms.backup");
    let before = calls.load(Ordering::SeqCst);
    let out = server.kms(&["backup", "create", "--out", file.to_str().unwrap()], "");
    let after = calls.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("backup written"), "{out:?}");
    assert!(
        after > before,
        "no call was answered while the backup ran ({before} before, {after} after)"
    );
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
    let check = |input: &std::path::Path, pin: Option<&str>| {
        let mut args = vec!["backup", "check", "--in", input.to_str().unwrap()];
        args.extend(pin.map(|p| ["--public-key", p]).into_iter().flatten());
        softhsm_tests::run_kms("https://127.0.0.1:1", &args, "")
    };
    // Pinned to the audit key recorded at init: intact and proven ours, exit 0.
    let pinned = check(&file, Some(&fingerprint));
    assert_eq!(pinned.code, Some(0), "{pinned:?}");
    assert!(
        pinned.stdout.contains("intact") && pinned.stdout.contains(&fingerprint),
        "{pinned:?}"
    );
    // Not pinned: the file can only vouch for itself, and says so, exit 4.
    let alone = check(&file, None);
    assert_eq!(alone.code, Some(4), "{alone:?}");
    assert!(
        alone.stdout.contains("NOT PINNED")
            && alone
                .stdout
                .contains("checked only against the key it names itself"),
        "{alone:?}"
    );
    let original = Identity {
        instance,
        last_seq: last_audit_seq(&text),
        sha256: pinned
            .stdout
            .split("sha256 ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_owned(),
    };
    drop(server);

    // A forged backup: the seal record's audit key replaced by the forger's, signed again.
    // Alone it looks intact (and says it proves nothing); against the key we trust it is
    // refused, and a restore of it writes nothing.
    let (forged, forger) = forge(&text, hsm.path());
    let forged_file = hsm.path().join("forged.backup");
    assert_ne!(forger, fingerprint);
    let alone = check(&forged_file, None);
    assert_eq!(alone.code, Some(4), "{alone:?}");
    assert!(alone.stdout.contains(&forger), "{alone:?}");
    // A key to trust that is no fingerprint or public key at all: refused by name.
    for bad in ["not-hex", &"ab".repeat(20), &"zz".repeat(16)] {
        let out = check(&file, Some(bad));
        assert_ne!(out.code, Some(0), "{bad}: {out:?}");
        assert!(
            out.stderr.contains("neither a fingerprint"),
            "{bad}: {out:?}"
        );
    }
    let refused = check(&forged_file, Some(&fingerprint));
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused.stderr.contains("not by the audit key you trust"),
        "{refused:?}"
    );
    assert!(forged.contains(&forger));

    // Into a fresh PostgreSQL database: the migration path from redb.
    let pg_config = hsm.config_full("pg.toml", &hsm.hsm_table(), &pg.storage_table());
    let restore_as = |cfg: &std::path::Path, input: &std::path::Path, pin: Option<&str>| {
        let mut args = vec![
            "backup",
            "restore",
            "--in",
            input.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ];
        args.extend(pin.map(|p| ["--public-key", p]).into_iter().flatten());
        softhsm_tests::run_kms("https://127.0.0.1:1", &args, "")
    };
    let restore =
        |cfg: &std::path::Path, input: &std::path::Path| restore_as(cfg, input, Some(&fingerprint));
    // Without a key to trust, and with the forged file, nothing is restored.
    let unpinned = restore_as(&pg_config, &file, None);
    assert_eq!(unpinned.code, Some(4), "{unpinned:?}");
    assert!(
        unpinned.stdout.contains("nothing was restored"),
        "{unpinned:?}"
    );
    let forged_restore = restore(&pg_config, &forged_file);
    assert_ne!(forged_restore.code, Some(0), "{forged_restore:?}");
    assert!(
        forged_restore
            .stderr
            .contains("not by the audit key you trust"),
        "{forged_restore:?}"
    );
    let rows = pg.sql_in("kms", "SELECT (SELECT count(*) FROM kms_system) + (SELECT count(*) FROM kms_keys) + (SELECT count(*) FROM kms_audit)");
    assert_eq!(rows.trim(), "0", "a refused restore wrote nothing");
    let out = restore(&pg_config, &file);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("restored"), "{out:?}");
    check_restored(&hsm, &pg_config, &shares, &acked, &original).await;
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
    check_restored(&hsm, &redb_config, &shares, &acked, &original).await;

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
