//! What someone who can write the store (a DBA, the `kms` database role, the disk of the
//! redb file, a forged backup) can make kms do to the HSM: nothing destructive. The seal
//! record is authenticated by an HMAC made in the HSM before anything it says is acted on;
//! even an authenticated record never makes kms destroy the master key in force, a keyring
//! object, the audit or seal record key, an object without a CKA_ID, or an object another
//! instance made; and a copy restored on production's token (a restore drill) destroys
//! nothing production made (issue 24, findings 1 and 8). Every check reads the token through
//! `hsm-tool`, not kms's own word.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kms_proto::v1 as pb;
use serde_json::{Value, json};
use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{
    Server, TestHsm, decrypt_ctx, encrypt_ctx, store_get, store_put, version_state,
};

/// What the HMAC of a seal record covers, before the record's JSON.
const RECORD_MAC_DOMAIN: &[u8] = b"kms/v1/seal-record\0";

/// A server with an HSM AES key `vault` and a ciphertext under it.
async fn production(hsm: &TestHsm, config: &Path) -> (Server, Vec<String>, Vec<u8>) {
    let server = hsm.try_start(config, &[]).unwrap();
    let init = server.init(3, 2, "");
    assert_eq!(init.code, Some(0), "{init:?}");
    let shares = init.shares();
    server.unseal_with(&shares);
    server
        .create_aes_key("vault", pb::ProtectionLevel::Hsm)
        .await;
    let mut c = server.keys().await;
    let ct = encrypt_ctx(&mut c, "vault", b"kept by the HSM")
        .await
        .unwrap();
    (server, shares, ct)
}

/// `kms backup create` on `server` into `name`: the file, and the audit key's fingerprint
/// the CLI says signed it.
fn backup_of(hsm: &TestHsm, server: &Server, name: &str) -> (std::path::PathBuf, String) {
    let backup = hsm.path().join(name);
    let out = server.kms(&["backup", "create", "--out", backup.to_str().unwrap()], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let audit_key = out.stdout.split("audit key ").nth(1).unwrap()[..32].to_owned();
    (backup, audit_key)
}

/// `kms backup restore` of `backup` into the store `config` names, pinned to `audit_key`.
fn restore(backup: &Path, config: &Path, audit_key: &str) {
    let out = softhsm_tests::run_kms(
        "https://127.0.0.1:1",
        &[
            "backup",
            "restore",
            "--in",
            backup.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--public-key",
            audit_key,
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// The stored seal record with the attack: the master key's id removed, and the
/// master key and a keyring object listed as retired master keys. `mac` says what becomes of
/// the record's MAC: kept (stale), removed (a record "of before"), or replaced.
fn attacked(record: &Value, keyring_object: &(String, String), mac: Option<&str>) -> Vec<u8> {
    let mut r = record.clone();
    let map = r.as_object_mut().unwrap();
    let master_id = map.remove("master_key_id").unwrap();
    map.insert(
        "retired_master_keys".into(),
        json!([
            {"label": record["master_key_label"], "id": master_id, "retired_at": 1},
            {"label": keyring_object.0, "id": keyring_object.1, "retired_at": 1},
        ]),
    );
    match mac {
        Some("keep") => {}
        Some(other) => {
            map.insert("mac".into(), Value::String(other.to_owned()));
        }
        None => {
            map.remove("mac");
        }
    }
    serde_json::to_vec(&r).unwrap()
}

/// Starts the server on an altered record: it must refuse, naming the failed
/// authentication, and the token must hold exactly what it held.
fn refused(hsm: &TestHsm, config: &Path, before: &[(String, String)], what: &str) {
    let err = match hsm.try_start(config, &[]) {
        Ok(_) => panic!("{what}: the server started on an altered seal record"),
        Err(e) => e,
    };
    assert!(
        err.contains("the stored seal record failed authentication"),
        "{what}: {err}"
    );
    assert_eq!(hsm.ids(""), before, "{what}: the token changed");
    // And as OpenSC's pkcs11-tool sees it, which shares no code with kms.
    assert_eq!(
        hsm.pkcs11_tool_objects(),
        before,
        "{what}: the token changed (pkcs11-tool)"
    );
}

/// The original record back, the server starts, unseals with the same shares, and the HSM
/// key still decrypts what it encrypted.
async fn still_whole(hsm: &TestHsm, config: &Path, shares: &[String], ct: &[u8]) -> Server {
    let server = hsm
        .try_start(config, &[])
        .unwrap_or_else(|e| panic!("the original record does not start: {e}"));
    server.unseal_with(shares);
    let mut c = server.keys().await;
    assert_eq!(
        decrypt_ctx(&mut c, "vault", ct).await.unwrap(),
        b"kept by the HSM"
    );
    server
}

/// The attack on a redb store file: altered seal records (MAC stale, stripped,
/// replaced) are refused at start and destroy nothing; the original record unseals again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_writer_cannot_make_kms_destroy_hsm_keys_redb() {
    let hsm = TestHsm::new("kms-writer");
    let config = hsm.config();
    let (mut server, shares, ct) = production(&hsm, &config).await;
    let before = hsm.ids("");
    let keyring_object = hsm.ids("kms/")[0].clone();
    assert!(server.terminate().success());
    let store = hsm.path().join("kms.redb");
    let original = store_get(&store, "system", "seal");
    let record: Value = serde_json::from_slice(&original).unwrap();
    assert_eq!(
        record["mac"].as_str().map(str::len),
        Some(64),
        "the seal record carries its HMAC: {record}"
    );
    assert!(
        before
            .iter()
            .any(|(l, _)| l == record["master_key_label"].as_str().unwrap()),
        "{before:?}"
    );

    for (what, mac) in [
        ("the issue's attack, the MAC left as it was", Some("keep")),
        ("the MAC stripped (to pass as a record of before)", None),
        ("a MAC made up", Some(&"ab".repeat(32)[..])),
    ] {
        store_put(
            &store,
            "system",
            "seal",
            &attacked(&record, &keyring_object, mac),
        );
        refused(&hsm, &config, &before, what);
    }
    store_put(&store, "system", "seal", &original);
    drop(still_whole(&hsm, &config, &shares, &ct).await);
    assert_eq!(hsm.ids(""), before);
}

/// The same attack as the issue reproduced it: one `UPDATE kms_system` of the `seal` row on
/// PostgreSQL, one restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_writer_cannot_make_kms_destroy_hsm_keys_postgres() {
    let pg = TestPostgres::start();
    let hsm = TestHsm::new("kms-writer-pg");
    let config = hsm.config_full("pg.toml", &hsm.hsm_table(), &pg.storage_table());
    let (mut server, shares, ct) = production(&hsm, &config).await;
    let original = pg.sql_in(
        "kms",
        "SELECT convert_from(value, 'UTF8') FROM kms_system WHERE key = 'seal'",
    );
    let original = original.trim().to_owned();
    let record: Value = serde_json::from_str(&original).unwrap();
    let before = hsm.ids("");
    let keyring_object = hsm.ids("kms/")[0].clone();
    assert!(server.terminate().success());
    let update = |value: &[u8]| {
        let text = std::str::from_utf8(value).unwrap();
        assert!(!text.contains("$j$"));
        pg.sql_in(
            "kms",
            &format!(
                "UPDATE kms_system SET value = convert_to($j${text}$j$, 'UTF8') WHERE key = 'seal'"
            ),
        );
    };
    for (what, mac) in [
        ("the issue's attack, the MAC left as it was", Some("keep")),
        ("the MAC stripped", None),
    ] {
        update(&attacked(&record, &keyring_object, mac));
        refused(&hsm, &config, &before, what);
    }
    update(original.as_bytes());
    drop(still_whole(&hsm, &config, &shares, &ct).await);
    assert_eq!(hsm.ids(""), before);
}

/// An insider who holds the HSM PIN can make the record's HMAC. Even then, nothing kms keeps
/// is destroyed on the record's word: not the master key in force, a keyring object, the
/// audit key, the seal record key, an object without a CKA_ID, an object another instance
/// made, or one made before instances (this instance never owned those).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_an_authenticated_record_never_names_what_kms_keeps() {
    let hsm = TestHsm::new("kms-insider");
    let config = hsm.config();
    let (mut server, shares, ct) = production(&hsm, &config).await;
    let audit_key = hsm.ids("kms-master-key-audit")[0].clone();
    assert!(server.terminate().success());
    let store = hsm.path().join("kms.redb");
    let original = String::from_utf8(store_get(&store, "system", "seal")).unwrap();
    let record: Value = serde_json::from_str(&original).unwrap();
    assert_eq!(record["audit_key_label"], audit_key.0.as_str());
    let master_label = record["master_key_label"].as_str().unwrap().to_owned();
    let master = hsm
        .ids(&master_label)
        .into_iter()
        .find(|(l, _)| *l == master_label)
        .unwrap();
    // AES keys that look like master keys: one with no id, one another instance made, one
    // made before ids named their instance.
    let other_instance = format!("6b6d7331{}{}", "77".repeat(8), "01".repeat(16));
    let legacy = "5a".repeat(16);
    assert!(hsm.tool(&["orphan"], &["old-master"]).status.success());
    for (label, id) in [
        ("foreign-master", &other_instance),
        ("legacy-master", &legacy),
    ] {
        assert!(hsm.tool(&["orphan-id"], &[label, id]).status.success());
    }
    let named = |prefix: &str| hsm.ids(prefix)[0].clone();
    let retired: Vec<(String, String)> = vec![
        master.clone(),
        named("kms/"),
        audit_key,
        named(&format!("{master_label}-seal-record")),
        ("old-master".into(), String::new()),
        ("foreign-master".into(), other_instance.clone()),
        ("legacy-master".into(), legacy.clone()),
    ];
    let before = hsm.ids("");

    // The record as kms writes it (serde's field order, compact), with these listed as
    // retired master keys, and its HMAC made in the token as kms makes it.
    let list = format!(
        "[{}]",
        retired
            .iter()
            .map(|(label, id)| format!(
                "{{\"label\":{},\"id\":{},\"retired_at\":1}}",
                Value::from(label.as_str()),
                Value::from(id.as_str())
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (bare, _mac) = original.rsplit_once(",\"mac\":").unwrap();
    let at = bare.find(",\"instance\":").unwrap();
    let body = format!(
        "{},\"retired_master_keys\":{list}{}}}",
        &bare[..at],
        &bare[at..]
    );
    let mac = hsm.hmac(
        &format!("{master_label}-seal-record"),
        &[RECORD_MAC_DOMAIN, body.as_bytes()].concat(),
    );
    let forged = format!("{},\"mac\":\"{mac}\"}}", &body[..body.len() - 1]);
    store_put(&store, "system", "seal", forged.as_bytes());

    // Authentic: the server starts on it, and destroys nothing.
    let server = still_whole(&hsm, &config, &shares, &ct).await;
    assert_eq!(hsm.ids(""), before, "the token changed");
    let logs = hsm.logs();
    assert!(
        logs.contains("an object kms never destroys as one"),
        "{logs}"
    );
    assert!(logs.contains("was not made by this kms instance"), "{logs}");
    drop(server);
}

fn status(server: &Server) -> Value {
    server.kms(&["operator", "status", "--json"], "").json()
}

/// A restore drill on production's token: the restored copy takes its own identity, and
/// destroys nothing production made: no destruction production cancelled after the backup,
/// no sweep of production's newer objects as "orphans", not production's master key when it
/// rotates its own. Production is never disturbed. After `take-over` (production gone for
/// good), the copy destroys what its schedule says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_drill_on_the_production_token_destroys_nothing_of_production() {
    let hsm = TestHsm::new("kms-drill");
    let keyring = "[keyring]\ntesting_day_seconds = 1\nmaintenance_interval_seconds = 1\n";
    let config = hsm.config_full("production.toml", &hsm.hsm_table(), keyring);
    let (mut prod, shares, ct1) = production(&hsm, &config).await;
    let mut pc = prod.keys().await;
    pc.rotate_key(pb::RotateKeyRequest {
        name: "vault".into(),
    })
    .await
    .unwrap();
    // Version 1 scheduled for destruction in 3 "days" (3 s), backed up, then cancelled.
    pc.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
        name: "vault".into(),
        version: 1,
        pending_days: 3,
    })
    .await
    .unwrap();
    let (backup, audit_key) = backup_of(&hsm, &prod, "drill.backup");
    pc.cancel_key_version_destruction(pb::KeyVersionRequest {
        name: "vault".into(),
        version: 1,
    })
    .await
    .unwrap();
    pc.enable_key_version(pb::KeyVersionRequest {
        name: "vault".into(),
        version: 1,
    })
    .await
    .unwrap();
    let prod_instance = status(&prod)["instance_id"].as_str().unwrap().to_owned();

    // The drill: the backup restored into its own store, on the same token.
    let drill_config = hsm.config_full(
        "drill.toml",
        &hsm.hsm_table(),
        &format!(
            "[storage]\npath = \"{}\"\n{keyring}",
            hsm.path().join("drill.redb").display()
        ),
    );
    restore(&backup, &drill_config, &audit_key);
    let drill = hsm.try_start(&drill_config, &[]).unwrap();
    let drill_status = status(&drill);
    let drill_instance = drill_status["instance_id"].as_str().unwrap().to_owned();
    assert_ne!(drill_instance, prod_instance);
    assert_eq!(
        drill_status["restored_from_instance_ids"],
        json!([prod_instance])
    );
    drill.unseal_with(&shares);
    let mut dc = drill.keys().await;
    let v1 = hsm
        .ids("kms/")
        .into_iter()
        .find(|(l, _)| l.ends_with("/1"))
        .unwrap();

    // The destruction production cancelled comes due in the drill: the HSM records that
    // production cancelled it, so the drill keeps the version, disabled as the cancellation
    // left it; production's version 1 still works.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while version_state(&mut dc, "vault", 1).await != pb::KeyVersionState::Disabled as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "still due in the drill"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        hsm.ids(&v1.0).contains(&v1),
        "production's version 1 was destroyed"
    );
    assert_eq!(
        decrypt_ctx(&mut pc, "vault", &ct1).await.unwrap(),
        b"kept by the HSM"
    );
    assert!(
        hsm.logs()
            .contains("the HSM records that this destruction was cancelled"),
        "{}",
        hsm.logs()
    );

    // Both rotate to version 3: two objects with one label, each instance's own. Neither
    // sweeps the other's at its next unseal.
    for c in [&mut pc, &mut dc] {
        c.rotate_key(pb::RotateKeyRequest {
            name: "vault".into(),
        })
        .await
        .unwrap();
    }
    let p3 = encrypt_ctx(&mut pc, "vault", b"production v3")
        .await
        .unwrap();
    let d3 = encrypt_ctx(&mut dc, "vault", b"drill v3").await.unwrap();
    let v3: Vec<_> = hsm
        .ids("kms/")
        .into_iter()
        .filter(|(l, _)| l.ends_with("/3"))
        .collect();
    assert_eq!(v3.len(), 2, "{v3:?}");
    for server in [&prod, &drill] {
        assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
        server.unseal_with(&shares);
    }
    assert_eq!(
        hsm.ids("kms/")
            .iter()
            .filter(|(l, _)| l.ends_with("/3"))
            .count(),
        2,
        "an instance swept the other's object"
    );
    let mut pc = prod.keys().await;
    let mut dc = drill.keys().await;
    assert_eq!(
        decrypt_ctx(&mut pc, "vault", &p3).await.unwrap(),
        b"production v3"
    );
    assert_eq!(
        decrypt_ctx(&mut dc, "vault", &d3).await.unwrap(),
        b"drill v3"
    );

    // The drill schedules the destruction of version 2, which production made: when it
    // comes due, the drill refuses to destroy production's object, the version stays due.
    dc.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
        name: "vault".into(),
        version: 2,
        pending_days: 1,
    })
    .await
    .unwrap();
    let v2 = hsm
        .ids("kms/")
        .into_iter()
        .find(|(l, _)| l.ends_with("/2"))
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(
        version_state(&mut dc, "vault", 2).await,
        pb::KeyVersionState::ScheduledForDestruction as i32
    );
    assert!(
        hsm.ids(&v2.0).contains(&v2),
        "production's version 2 was destroyed"
    );
    assert!(
        hsm.logs().contains("was not made by this kms instance"),
        "{}",
        hsm.logs()
    );

    // The drill rotates its master key: production's (which production made) is left.
    let before = hsm.ids("");
    let out = drill.kms(&["operator", "rotate-master-key"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("was not destroyed"), "{out:?}");
    let after = hsm.ids("");
    assert!(
        before.iter().all(|o| after.contains(o)),
        "the drill destroyed an object: {before:?} -> {after:?}"
    );
    prod.kill9();
    let prod = hsm.try_start(&config, &[]).unwrap();
    prod.unseal_with(&shares);
    let mut pc = prod.keys().await;
    assert_eq!(
        decrypt_ctx(&mut pc, "vault", &ct1).await.unwrap(),
        b"kept by the HSM"
    );

    // Production is gone for good: the copy takes its objects over, and its schedule runs.
    drop(pc);
    drop(prod);
    let out = drill.kms(&["operator", "take-over"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&prod_instance), "{out:?}");
    assert!(
        status(&drill)["restored_from_instance_ids"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let again = drill.kms(&["operator", "take-over"], "");
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("nothing to take over"), "{again:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while version_state(&mut dc, "vault", 2).await != pb::KeyVersionState::Destroyed as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "not destroyed after the take-over"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(!hsm.ids(&v2.0).contains(&v2), "destroyed and gone");
    no_secret_in_the_logs(&hsm, &shares);
}

/// With the PIN in the shares, a sealed server cannot reach the token: the altered record
/// is refused at the unseal, before anything it says is acted on, and the server is left
/// logged out; the original record unseals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_pin_in_the_shares_an_altered_record_is_refused_at_the_unseal() {
    let hsm = TestHsm::new("kms-writer-pin");
    let module = hsm.module.display().to_string();
    let config = hsm.config_with(
        "shares.toml",
        &hsm.hsm_table_with(&module, &hsm.label, "pin_in_shares = true"),
    );
    let mut server = hsm.try_start(&config, &[]).unwrap();
    let init = server.init(3, 2, &format!("{}\n", hsm.pin));
    assert_eq!(init.code, Some(0), "{init:?}");
    let shares = init.shares();
    server.unseal_with(&shares);
    server
        .create_aes_key("vault", pb::ProtectionLevel::Hsm)
        .await;
    let mut c = server.keys().await;
    let ct = encrypt_ctx(&mut c, "vault", b"kept by the HSM")
        .await
        .unwrap();
    drop(c);
    let before = hsm.ids("");
    let keyring_object = hsm.ids("kms/")[0].clone();
    assert!(server.terminate().success());
    let store = hsm.path().join("kms.redb");
    let original = store_get(&store, "system", "seal");
    let record: Value = serde_json::from_slice(&original).unwrap();
    store_put(
        &store,
        "system",
        "seal",
        &attacked(&record, &keyring_object, None),
    );
    let server = hsm.try_start(&config, &[]).unwrap();
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[0], shares[1]),
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("DATA_LOSS")
            && out
                .stderr
                .contains("the stored seal record failed authentication"),
        "{out:?}"
    );
    assert_eq!(status(&server)["sealed"], true);
    assert_eq!(hsm.ids(""), before, "the token changed");
    drop(server);
    store_put(&store, "system", "seal", &original);
    drop(still_whole(&hsm, &config, &shares, &ct).await);
    assert_eq!(hsm.ids(""), before);
    no_secret_in_the_logs(&hsm, &shares);
}

/// No share, PIN or plaintext of these tests in anything the servers logged (every refusal
/// and warning of the attacks included).
fn no_secret_in_the_logs(hsm: &TestHsm, shares: &[String]) {
    let logs = hsm.logs();
    assert!(!logs.is_empty());
    for secret in shares
        .iter()
        .map(String::as_str)
        .chain([hsm.pin.as_str(), "kept by the HSM"])
    {
        assert!(!logs.contains(secret), "a secret in the logs");
    }
}

/// A store of before (a seal record with no MAC and no instance, no seal record key in the
/// token) starts, destroys nothing on its unauthenticated word, and is authenticated at its
/// first unseal: a seal record key made, an identity given, the retired master keys it
/// listed dropped (left in the token, named in the log), the change audited. From then on a
/// record without a MAC is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_before_is_authenticated_at_its_first_unseal() {
    let hsm = TestHsm::new("kms-upgrade");
    let config = hsm.config();
    let (mut server, shares, ct) = production(&hsm, &config).await;
    assert!(server.terminate().success());
    // What a store of the previous release looks like, with a leftover retired master key.
    let leftover = "5a".repeat(16);
    assert!(
        hsm.tool(&["orphan-id"], &["kms-master-key", &leftover])
            .status
            .success()
    );
    assert!(
        hsm.tool(&["destroy"], &["kms-master-key-seal-record"])
            .status
            .success()
    );
    let store = hsm.path().join("kms.redb");
    let mut record: Value = serde_json::from_slice(&store_get(&store, "system", "seal")).unwrap();
    let map = record.as_object_mut().unwrap();
    map.remove("mac");
    map.remove("instance");
    map.insert(
        "retired_master_keys".into(),
        json!([{"label": "kms-master-key", "id": leftover, "retired_at": 1}]),
    );
    store_put(
        &store,
        "system",
        "seal",
        &serde_json::to_vec(&record).unwrap(),
    );
    let before = hsm.ids("");

    let server = hsm.try_start(&config, &[]).unwrap();
    assert_eq!(
        status(&server)["instance_id"],
        "",
        "no identity before the unseal"
    );
    assert_eq!(hsm.ids(""), before, "destroyed on an unauthenticated word");
    server.unseal_with(&shares);
    let instance = status(&server)["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(instance.len(), 16);
    let mut c = server.keys().await;
    assert_eq!(
        decrypt_ctx(&mut c, "vault", &ct).await.unwrap(),
        b"kept by the HSM"
    );
    drop(c);
    let after = hsm.ids("");
    assert!(
        before.iter().all(|o| after.contains(o)),
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        hsm.ids("kms-master-key-seal-record").len(),
        1,
        "a seal record key was made"
    );
    assert!(
        hsm.logs()
            .contains("an HSM administrator should check and destroy it")
    );
    let export = hsm.path().join("upgrade.jsonl");
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", export.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        std::fs::read_to_string(&export)
            .unwrap()
            .contains("\"operation\":\"AuthenticateSealRecord\"")
    );
    drop(server);
    let stored: Value = serde_json::from_slice(&store_get(&store, "system", "seal")).unwrap();
    assert_eq!(stored["instance"], instance.as_str());
    assert_eq!(stored["owns_untagged"], true);
    assert!(stored.get("retired_master_keys").is_none(), "{stored}");
    assert_eq!(stored["mac"].as_str().map(str::len), Some(64));
    // Downgrading it again (the MAC stripped) is refused now.
    let mut stripped = stored.clone();
    stripped.as_object_mut().unwrap().remove("mac");
    store_put(
        &store,
        "system",
        "seal",
        &serde_json::to_vec(&stripped).unwrap(),
    );
    refused(
        &hsm,
        &config,
        &hsm.ids(""),
        "a MAC stripped after the upgrade",
    );
}

/// A store writer keeps an older, authentic key record in which an HSM version was
/// scheduled for destruction, and puts it back after the administrator cancelled that
/// destruction and once its time has passed. The HSM remembers the cancellation (a marker
/// no store writer can make or remove): kms does not destroy the object, and disables the
/// version again, as the cancellation left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_record_rolled_back_to_a_cancelled_schedule_destroys_nothing() {
    let hsm = TestHsm::new("kms-rollback");
    let keyring = "[keyring]\ntesting_day_seconds = 1\nmaintenance_interval_seconds = 1\n";
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), keyring);
    let (mut server, shares, ct1) = production(&hsm, &config).await;
    let mut c = server.keys().await;
    c.rotate_key(pb::RotateKeyRequest {
        name: "vault".into(),
    })
    .await
    .unwrap();
    c.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
        name: "vault".into(),
        version: 1,
        pending_days: 4,
    })
    .await
    .unwrap();
    drop(c);
    assert!(server.terminate().success());
    let store = hsm.path().join("kms.redb");
    let scheduled = store_get(&store, "keys", "vault");
    // The administrator changes their mind.
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    let v1 = pb::KeyVersionRequest {
        name: "vault".into(),
        version: 1,
    };
    c.cancel_key_version_destruction(v1.clone()).await.unwrap();
    c.enable_key_version(v1.clone()).await.unwrap();
    drop(c);
    let mut server = server;
    assert!(server.terminate().success());
    let object = hsm
        .ids("kms/")
        .into_iter()
        .find(|(l, _)| l.ends_with("/1"))
        .unwrap();
    // Past the old destroy time, the old record back.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    store_put(&store, "keys", "vault", &scheduled);
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while version_state(&mut c, "vault", 1).await != pb::KeyVersionState::Disabled as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rolled-back schedule was not undone"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        hsm.ids("kms/").contains(&object),
        "the HSM object was destroyed"
    );
    c.enable_key_version(v1).await.unwrap();
    assert_eq!(
        decrypt_ctx(&mut c, "vault", &ct1).await.unwrap(),
        b"kept by the HSM"
    );
    assert!(
        hsm.logs()
            .contains("the HSM records that this destruction was cancelled")
    );
}

/// A restore drill whose store writer undoes the drill's new identity: the seal record the
/// backup holds (production's own, authentic) put back after the drill took its identity,
/// or the restore's marker deleted before the drill's first start. The record names the
/// store it was written for, which is not the drill's: the drill takes its own identity
/// again, and never acts as production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_cannot_be_made_production_again_by_its_store_writer() {
    let hsm = TestHsm::new("kms-drill-rollback");
    let config = hsm.config();
    let (prod, _shares, _ct) = production(&hsm, &config).await;
    let (backup, audit_key) = backup_of(&hsm, &prod, "p.backup");
    let prod_instance = status(&prod)["instance_id"].as_str().unwrap().to_owned();
    for (n, attack) in ["record put back", "marker deleted"]
        .into_iter()
        .enumerate()
    {
        let store = hsm.path().join(format!("drill-{n}.redb"));
        let drill_config = hsm.config_full(
            &format!("drill-{n}.toml"),
            &hsm.hsm_table(),
            &format!("[storage]\npath = \"{}\"\n", store.display()),
        );
        restore(&backup, &drill_config, &audit_key);
        if attack == "record put back" {
            let backups_record = store_get(&store, "system", "seal");
            let mut drill = hsm.try_start(&drill_config, &[]).unwrap();
            assert_ne!(status(&drill)["instance_id"], prod_instance.as_str());
            assert!(drill.terminate().success());
            store_put(&store, "system", "seal", &backups_record);
        } else {
            softhsm_tests::store_delete(&store, "system", "restored-from-backup");
        }
        let drill = hsm.try_start(&drill_config, &[]).unwrap();
        let st = status(&drill);
        assert_ne!(st["instance_id"], prod_instance.as_str(), "{attack}: {st}");
        assert_eq!(
            st["restored_from_instance_ids"],
            json!([prod_instance]),
            "{attack}: {st}"
        );
        // Which instance answers, and where it came from, is for callers who are someone.
        let anonymous = drill.kms_as(None, &["operator", "status", "--json"], "");
        assert_eq!(anonymous.json()["instance_id"], "", "{anonymous:?}");
        assert_eq!(anonymous.json()["restored_from_instance_ids"], json!([]));
        // A take-over needs the admin and an unsealed server.
        let out = drill.kms_as(Some(&drill.auditor), &["operator", "take-over"], "");
        assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:?}");
        let out = drill.kms(&["operator", "take-over"], "");
        assert!(out.stderr.contains("UNAVAILABLE: sealed"), "{out:?}");
    }
}

/// PostgreSQL, the PIN in the shares: a sealed server cannot check another server's
/// records, and takes them up unchecked. A store writer makes it take up an altered record
/// (adopting another instance, naming that instance's master key as retired) and then puts
/// the original back. A rekey made while sealed must never sign the altered record: the
/// other instance's key survives, and the stored record adopts nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_while_sealed_never_signs_a_record_someone_altered() {
    let pg = TestPostgres::start();
    let hsm = TestHsm::new("kms-writer-rekey");
    let module = hsm.module.display().to_string();
    let config = hsm.config_full(
        "kms.toml",
        &hsm.hsm_table_with(&module, &hsm.label, "pin_in_shares = true"),
        &pg.storage_table(),
    );
    let server = hsm.try_start(&config, &[]).unwrap();
    let init = server.init(3, 2, &format!("{}\n", hsm.pin));
    assert_eq!(init.code, Some(0), "{init:?}");
    let old = init.shares();
    let other = format!("6b6d7331{}{}", "77".repeat(8), "01".repeat(16));
    assert!(
        hsm.tool(&["orphan-id"], &["other-master", &other])
            .status
            .success()
    );
    let read = || {
        pg.sql_in(
            "kms",
            "SELECT convert_from(value, 'UTF8') FROM kms_system WHERE key = 'seal'",
        )
        .trim()
        .to_owned()
    };
    let original = read();
    let update = |text: &str| {
        pg.sql_in(
            "kms",
            &format!(
                "UPDATE kms_system SET value = convert_to($j${text}$j$, 'UTF8') WHERE key = 'seal'; NOTIFY kms_changes, 'system:seal';"
            ),
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let mut altered: Value = serde_json::from_str(&original).unwrap();
    let map = altered.as_object_mut().unwrap();
    map.insert("adopted_instances".into(), json!(["7777777777777777"]));
    map.insert(
        "retired_master_keys".into(),
        json!([{"label": "other-master", "id": other, "retired_at": 1}]),
    );
    let mut bad_mac = altered.clone();
    bad_mac["mac"] = json!("00".repeat(32));
    update(&serde_json::to_string(&bad_mac).unwrap());
    update(&serde_json::to_string(&altered).unwrap());
    update(&original);

    assert_eq!(server.rekey_init(3, 2).code, Some(0));
    let steps = server.rekey_submit(&old[..2]).json_lines();
    let new = softhsm_tests::strings(&steps[1]["shares"]);
    server.rekey_submit(&new[..2]);
    let stored: Value = serde_json::from_str(&read()).unwrap();
    assert!(stored.get("adopted_instances").is_none(), "{stored}");
    assert!(stored.get("retired_master_keys").is_none(), "{stored}");
    let shares = if stored["share_set_id"] == steps[1]["rekey"]["new_share_set_id"] {
        new
    } else {
        old
    };
    server.unseal_with(&shares);
    assert_eq!(
        hsm.ids("other-master").len(),
        1,
        "the other instance's key was destroyed"
    );
}

/// A drill on another host with the same configuration (the same redb path) whose store
/// writer deletes the restore's marker: the store's identity file (`kms.redb.id`, beside
/// the file, in no backup) is the drill host's own, so the seal record (which names a hash
/// of the location it was written for) is known for a copy. The drill takes its own
/// identity, and its master key rotation leaves production's key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_at_the_same_path_on_another_host_is_not_production() {
    let hsm = TestHsm::new("kms-drill-path");
    let config = hsm.config();
    let (mut prod, shares, ct) = production(&hsm, &config).await;
    let (backup, audit_key) = backup_of(&hsm, &prod, "p.backup");
    let prod_instance = status(&prod)["instance_id"].as_str().unwrap().to_owned();
    assert!(prod.terminate().success());
    // Production's store lives on on its own host: its files (the redb file, its identity,
    // the audit log's append-only files) set aside here.
    let store = hsm.path().join("kms.redb");
    let id = hsm.path().join("kms.redb.id");
    let audit = hsm.path().join("kms.redb.audit");
    assert!(id.is_file(), "the store has its identity file");
    assert!(audit.is_dir(), "the store has its audit log's files");
    let prod_host = hsm.path().join("production-host");
    std::fs::create_dir(&prod_host).unwrap();
    std::fs::rename(&store, prod_host.join("kms.redb")).unwrap();
    std::fs::rename(&id, prod_host.join("kms.redb.id")).unwrap();
    std::fs::rename(&audit, prod_host.join("kms.redb.audit")).unwrap();

    // The drill host: the same configuration; the store writer deletes the marker.
    restore(&backup, &config, &audit_key);
    softhsm_tests::store_delete(&store, "system", "restored-from-backup");
    let mut drill = hsm.try_start(&config, &[]).unwrap();
    let st = status(&drill);
    assert_ne!(st["instance_id"], prod_instance.as_str(), "{st}");
    assert_eq!(
        st["restored_from_instance_ids"],
        json!([prod_instance]),
        "{st}"
    );
    drill.unseal_with(&shares);
    let out = drill.kms(&["operator", "rotate-master-key"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("was not destroyed"), "{out:?}");
    assert!(drill.terminate().success());

    // Production comes back on its own host's files, whole.
    std::fs::rename(prod_host.join("kms.redb"), &store).unwrap();
    std::fs::rename(prod_host.join("kms.redb.id"), &id).unwrap();
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::rename(prod_host.join("kms.redb.audit"), &audit).unwrap();
    let prod = hsm.try_start(&config, &[]).unwrap();
    assert_eq!(status(&prod)["instance_id"], prod_instance.as_str());
    prod.unseal_with(&shares);
    let mut c = prod.keys().await;
    assert_eq!(
        decrypt_ctx(&mut c, "vault", &ct).await.unwrap(),
        b"kept by the HSM"
    );
}

/// A drill on another PostgreSQL cluster whose store writer (the ordinary `kms` role)
/// shadows `pg_control_system()` with production's cluster id and deletes the restore's
/// marker: kms reads the cluster's identity from `pg_catalog` by name, so the drill is
/// still known for a copy. And a location that cannot be read at all stops the start; it is
/// never taken for a move, nor written over the one the record names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_drill_cannot_pass_for_production_and_an_unreadable_location_stops_the_start() {
    let pg_prod = TestPostgres::start();
    let pg_drill = TestPostgres::start();
    let hsm = TestHsm::new("kms-pg-location");
    let config = hsm.config_full("prod.toml", &hsm.hsm_table(), &pg_prod.storage_table());
    let (mut prod, _shares, _ct) = production(&hsm, &config).await;
    let (backup, audit_key) = backup_of(&hsm, &prod, "p.backup");
    let prod_instance = status(&prod)["instance_id"].as_str().unwrap().to_owned();
    let sysid = pg_prod
        .sql_in("kms", "SELECT system_identifier FROM pg_control_system()")
        .trim()
        .to_owned();
    assert!(prod.terminate().success());

    let drill_config = hsm.config_full("drill.toml", &hsm.hsm_table(), &pg_drill.storage_table());
    restore(&backup, &drill_config, &audit_key);
    let mut s = pg_drill.session_as("kms", &pg_drill.password.clone(), "kms");
    s.send(&format!(
        "CREATE FUNCTION public.pg_control_system(OUT pg_control_version integer, OUT catalog_version_no integer, OUT system_identifier bigint, OUT pg_control_last_modified timestamptz) \
         RETURNS record LANGUAGE sql AS $$ SELECT 0, 0, {sysid}::bigint, now() $$; \
         ALTER ROLE kms SET search_path = public, pg_catalog; \
         DELETE FROM kms_system WHERE key = 'restored-from-backup';"
    ));
    s.sync(std::time::Duration::from_secs(10));
    drop(s);
    let mut drill = hsm.try_start(&drill_config, &[]).unwrap();
    let st = status(&drill);
    assert_ne!(st["instance_id"], prod_instance.as_str(), "{st}");
    assert!(drill.terminate().success());

    // Production's cluster no longer lets kms read its identity: the start stops, and the
    // record keeps the location it names.
    let read = || {
        let text = pg_prod.sql_in(
            "kms",
            "SELECT convert_from(value, 'UTF8') FROM kms_system WHERE key = 'seal'",
        );
        serde_json::from_str::<Value>(text.trim()).unwrap()
    };
    let location = read()["location"].clone();
    assert!(location.is_string());
    pg_prod.sql_in(
        "kms",
        "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_control_system() FROM PUBLIC",
    );
    let err = match hsm.try_start(&config, &[]) {
        Ok(_) => panic!("started without knowing where its store lives"),
        Err(e) => e,
    };
    assert!(err.contains("read the cluster's identity"), "{err}");
    assert_eq!(read()["location"], location);
    assert_eq!(read()["instance"], prod_instance.as_str());
    pg_prod.sql_in(
        "kms",
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_system() TO PUBLIC",
    );
    let prod = hsm.try_start(&config, &[]).unwrap();
    assert_eq!(status(&prod)["instance_id"], prod_instance.as_str());
}

/// A store writer rolls a key record back past a rotation; the server rotates again (an
/// administrator, or the schedule): two objects now carry version 2's label. The one the
/// first rotation committed is never swept at the next unseal (its pending mark was
/// removed at its commit), and with the real record put back, its ciphertexts decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_rotation_never_gets_a_committed_version_swept() {
    let hsm = TestHsm::new("kms-sweep-rollback");
    let config = hsm.config();
    let (mut server, shares, _ct1) = production(&hsm, &config).await;
    assert!(server.terminate().success());
    let store = hsm.path().join("kms.redb");
    let r1 = store_get(&store, "keys", "vault");
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    c.rotate_key(pb::RotateKeyRequest {
        name: "vault".into(),
    })
    .await
    .unwrap();
    let ct2 = encrypt_ctx(&mut c, "vault", b"under version 2")
        .await
        .unwrap();
    drop(c);
    let mut server = server;
    assert!(server.terminate().success());
    let r2 = store_get(&store, "keys", "vault");
    let v2: Vec<_> = hsm
        .ids("kms/")
        .into_iter()
        .filter(|(l, _)| l.ends_with("/2"))
        .collect();
    assert_eq!(v2.len(), 1);

    store_put(&store, "keys", "vault", &r1);
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    c.rotate_key(pb::RotateKeyRequest {
        name: "vault".into(),
    })
    .await
    .unwrap();
    drop(c);
    // The next unseal sweeps what it may.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    server.unseal_with(&shares);
    let mut server = server;
    assert!(server.terminate().success());
    assert!(
        hsm.ids("kms/").contains(&v2[0]),
        "the committed version 2's object was swept"
    );
    assert!(
        hsm.logs()
            .contains("the key's record may have been rolled back")
    );
    store_put(&store, "keys", "vault", &r2);
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    assert_eq!(
        decrypt_ctx(&mut c, "vault", &ct2).await.unwrap(),
        b"under version 2"
    );
}
