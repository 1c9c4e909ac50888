//! Custody over the years, end to end against the real `kms` binary and a SoftHSM token:
//! rekey (with kill -9 after every step), shares sealed to custodians' age keys and opened
//! with the standard `age` tool, and verify-share.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;

use kms_proto::v1::ProtectionLevel;
use serde_json::Value;
use softhsm_tests::{
    Out, Server, TestHsm, age_decrypt, age_identity, decrypt_ctx, encrypt_ctx, forge_share,
    independent_audit_verify, strings,
};

fn status(server: &Server) -> Value {
    server.kms(&["operator", "status", "--json"], "").json()
}

fn rekey_status(server: &Server) -> Value {
    server
        .kms(&["operator", "rekey", "status", "--json"], "")
        .json()
}

fn lines(shares: &[&String]) -> String {
    shares.iter().map(|s| format!("{s}\n")).collect()
}

fn unseal(server: &Server, shares: &[&String]) -> Out {
    server.custodian(&["operator", "unseal"], &lines(shares))
}

fn submit(server: &Server, shares: &[&String]) -> Out {
    server.rekey_submit(shares)
}

/// Kills the server with SIGKILL and starts it again: it comes up sealed.
fn crash(hsm: &TestHsm, server: &mut Server) -> Server {
    server.kill9();
    let again = hsm.start();
    assert_eq!(status(&again)["sealed"], true);
    again
}

/// The auditor's export, as JSON values (records only), verified by `kms audit verify` and
/// by the independent verifier (audit_verify.py) under the key read from the token.
fn audit_records(server: &Server, hsm: &TestHsm) -> Vec<Value> {
    let path = hsm
        .path()
        .join(format!("export-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", path.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let verify = server.kms_as(
        Some(&server.auditor),
        &["audit", "verify", "--export", path.to_str().unwrap()],
        "",
    );
    assert_eq!(verify.code, Some(0), "the chain must verify: {verify:?}");
    let key = hsm.audit_key_proof(None);
    let independent = independent_audit_verify(&path, None, &key);
    assert_eq!(independent.code, Some(0), "{independent:?}");
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("seq").is_some())
        .collect()
}

#[test]
fn rekey_3_of_5_to_2_of_3_survives_kill_9_after_every_step() {
    let hsm = TestHsm::new("kms-rekey");
    let mut server = hsm.start();
    let out = server.init(5, 3, "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let old = out.shares();
    let old_set = out.json()["share_set_id"].as_str().unwrap().to_owned();
    assert_eq!(unseal(&server, &[&old[0], &old[1], &old[2]]).code, Some(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ct = rt.block_on(async {
        server
            .create_aes_key("ledger", ProtectionLevel::Software)
            .await;
        server.create_aes_key("vault", ProtectionLevel::Hsm).await;
        let mut keys = server.keys().await;
        (
            encrypt_ctx(&mut keys, "ledger", b"before the rekey")
                .await
                .unwrap(),
            encrypt_ctx(&mut keys, "vault", b"hsm before the rekey")
                .await
                .unwrap(),
        )
    });

    // Who may do what: a custodian cannot start one, and nothing is in progress yet.
    let out = server.custodian(
        &[
            "operator",
            "rekey",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
        ],
        "",
    );
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:?}");
    let out = submit(&server, &[&old[0]]);
    assert!(
        out.stderr.contains("FAILED_PRECONDITION")
            && out.stderr.contains("no rekey is in progress"),
        "{out:?}"
    );
    let out = server.rekey_init(3, 4);
    assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    assert_eq!(
        server.kms(&["operator", "rekey", "status"], "").code,
        Some(3)
    );

    // Step 1: started (on an unsealed server), then kill -9: a restart forgets it and the
    // old shares unseal.
    let out = server.rekey_init(3, 2);
    assert_eq!(out.code, Some(0), "{out:?}");
    let r = rekey_status(&server)["rekey"].clone();
    assert_eq!(r["phase"], "collecting");
    assert_eq!(r["required"], 3);
    let out = server.rekey_init(3, 2);
    assert!(
        out.stderr.contains("is in progress or awaits verification"),
        "{out:?}"
    );
    let mut server = crash(&hsm, &mut server);
    assert_eq!(rekey_status(&server)["rekey"], Value::Null);
    assert_eq!(unseal(&server, &[&old[3], &old[4], &old[0]]).code, Some(0));

    // Step 2: two of three current shares given, then kill -9: the same.
    assert_eq!(server.rekey_init(3, 2).code, Some(0));
    let steps = submit(&server, &[&old[0], &old[1]]).json_lines();
    assert_eq!(steps[1]["rekey"]["progress"], 2);
    // A share given twice, or forged, is refused and does not count.
    let out = submit(&server, &[&old[1]]);
    assert!(out.stderr.contains("already given"), "{out:?}");
    let out = submit(&server, &[&forge_share(&old[2])]);
    assert!(
        out.stderr.contains("not one of the shares made at init"),
        "{out:?}"
    );
    assert_eq!(rekey_status(&server)["rekey"]["progress"], 2);
    let mut server = crash(&hsm, &mut server);
    assert_eq!(rekey_status(&server)["rekey"], Value::Null);

    // Step 3 (on a sealed server): the quorum of current shares makes the new shares, which
    // are pending; kill -9 keeps them pending and the old shares valid.
    let out = server.rekey_init(3, 2);
    assert_eq!(out.code, Some(0), "{out:?}");
    let new_set = rekey_status(&server)["rekey"]["new_share_set_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_set, old_set);
    let steps = submit(&server, &[&old[2], &old[3], &old[4]]).json_lines();
    assert!(strings(&steps[0]["shares"]).is_empty());
    let new = strings(&steps[2]["shares"]);
    assert_eq!(new.len(), 3);
    assert!(new.iter().all(|s| s.starts_with("kms1-")));
    assert_eq!(steps[2]["shares_sealed"], false);
    assert_eq!(steps[2]["rekey"]["phase"], "verifying");
    assert_eq!(steps[2]["rekey"]["new_share_set_id"], new_set.as_str());
    // Not in force yet: a new share does not unseal, an old one does.
    let out = unseal(&server, &[&new[0]]);
    assert!(
        out.stderr
            .contains(&format!("this server's share set is {old_set}")),
        "{out:?}"
    );
    let mut server = crash(&hsm, &mut server);
    let r = rekey_status(&server)["rekey"].clone();
    assert_eq!(r["phase"], "verifying");
    assert_eq!(r["progress"], 0);
    assert_eq!(r["required"], 2);
    assert_eq!(unseal(&server, &[&old[1], &old[3], &old[4]]).code, Some(0));

    // Step 4: one new share given back, kill -9: still pending, old shares still valid.
    let steps = submit(&server, &[&new[0]]).json_lines();
    assert_eq!(steps[0]["rekey"]["progress"], 1);
    let out = submit(&server, &[&old[0]]);
    assert!(
        out.stderr
            .contains(&format!("verifying the new share set {new_set}")),
        "{out:?}"
    );
    let out = submit(&server, &[&forge_share(&new[1])]);
    assert!(
        out.stderr.contains("not one of the shares made at init"),
        "{out:?}"
    );
    let mut server = crash(&hsm, &mut server);
    assert_eq!(rekey_status(&server)["rekey"]["progress"], 0);
    assert_eq!(unseal(&server, &[&old[0], &old[2], &old[4]]).code, Some(0));

    // Step 5: the new quorum commits; the old shares are refused by name from then on.
    let steps = submit(&server, &[&new[2], &new[1]]).json_lines();
    assert_eq!(steps[1]["committed_share_set_id"], new_set.as_str());
    let st = status(&server);
    assert_eq!(st["share_set_id"], new_set.as_str());
    assert_eq!(st["shares"], 3);
    assert_eq!(st["threshold"], 2);
    assert_eq!(rekey_status(&server)["rekey"], Value::Null);
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let out = unseal(&server, &[&old[0]]);
    assert!(
        out.stderr.contains(&format!(
            "share set {old_set}, which a rekey retired: it no longer unseals; this server's share set is {new_set}"
        )),
        "{out:?}"
    );

    // After kill -9 the new shares unseal and every old ciphertext decrypts.
    let server = crash(&hsm, &mut server);
    let out = unseal(&server, &[&old[0], &old[1]]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(unseal(&server, &[&new[0], &new[2]]).code, Some(0));
    rt.block_on(async {
        let mut keys = server.keys().await;
        assert_eq!(
            decrypt_ctx(&mut keys, "ledger", &ct.0).await.unwrap(),
            b"before the rekey"
        );
        assert_eq!(
            decrypt_ctx(&mut keys, "vault", &ct.1).await.unwrap(),
            b"hsm before the rekey"
        );
    });

    // Every step is in the audit log, with share sets and indexes and never a share.
    let records = audit_records(&server, &hsm);
    let ceremony = |op: &str, step: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["event"]["operation"] == op && r["event"]["ceremony"]["step"] == step)
            .collect()
    };
    assert_eq!(ceremony("RekeyInit", "started").len(), 3);
    let made = ceremony("RekeySubmit", "made");
    assert_eq!(made.len(), 1);
    assert_eq!(
        made[0]["event"]["ceremony"]["new_share_set"],
        new_set.as_str()
    );
    assert_eq!(made[0]["event"]["ceremony"]["share_set"], old_set.as_str());
    let committed = ceremony("RekeySubmit", "committed");
    assert_eq!(committed.len(), 1);
    assert_eq!(committed[0]["event"]["ceremony"]["new_threshold"], 2);
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["event"]["operation"] == "RekeySubmit" && r["event"]["outcome"] != "OK")
        .collect();
    assert!(
        refused
            .iter()
            .any(|r| r["event"]["ceremony"]["share_index"].is_u64())
    );
    let text = serde_json::to_string(&records).unwrap();
    for share in old.iter().chain(&new) {
        assert!(!text.contains(share.as_str()));
    }
    let logs = hsm.logs();
    for share in old.iter().chain(&new) {
        assert!(!logs.contains(share.as_str()), "a share in the server log");
    }
}

#[test]
fn rekey_cancel_leaves_the_old_shares_and_voids_the_new() {
    let hsm = TestHsm::new("kms-rekey-cancel");
    let server = hsm.start();
    let out = server.init(3, 2, "");
    let old = out.shares();
    assert_eq!(server.rekey_init(2, 2).code, Some(0));
    let steps = submit(&server, &[&old[0], &old[1]]).json_lines();
    let new = strings(&steps[1]["shares"]);
    assert_eq!(new.len(), 2);
    // The admin cancels; the pending shares never become valid.
    let out = server.custodian(&["operator", "rekey", "cancel"], "");
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:?}");
    assert_eq!(
        server.kms(&["operator", "rekey", "cancel"], "").code,
        Some(0)
    );
    assert_eq!(
        server.kms(&["operator", "rekey", "cancel"], "").code,
        Some(0)
    );
    let out = submit(&server, &[&new[0]]);
    assert!(out.stderr.contains("no rekey is in progress"), "{out:?}");
    let out = unseal(&server, &[&new[0]]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(unseal(&server, &[&old[1], &old[2]]).code, Some(0));
}

#[test]
fn shares_sealed_to_custodians_open_with_age_only_for_their_custodian() {
    let hsm = TestHsm::new("kms-age");
    let server = hsm.start();
    let dir = hsm.path().join("custodians");
    std::fs::create_dir(&dir).unwrap();
    let ids: Vec<PathBuf> = (1..=5).map(|i| dir.join(format!("key-{i}.txt"))).collect();
    let recipients: Vec<String> = ids.iter().map(|p| age_identity(p)).collect();
    // A recipients file works as well as the key itself.
    let file = dir.join("custodian-5.pub");
    std::fs::write(&file, format!("# custodian five\n{}\n", recipients[4])).unwrap();

    // Bad recipients are refused before anything is made.
    let out = server.kms(
        &[
            "operator",
            "init",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--recipient",
            &recipients[0],
            "--recipient",
            &recipients[1],
        ],
        "",
    );
    assert!(
        out.stderr.contains("2 recipients were given for 5 shares"),
        "{out:?}"
    );
    let mut args: Vec<String> = ["operator", "init", "--shares", "5", "--threshold", "3"]
        .map(str::to_owned)
        .to_vec();
    for r in &recipients[..4] {
        args.extend(["--recipient".to_owned(), r.clone()]);
    }
    let mut bad = args.clone();
    bad.extend(["--recipient".to_owned(), "age1notarecipient".to_owned()]);
    let out = server.kms(&bad.iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert!(
        out.stderr.contains("INVALID_ARGUMENT")
            && out
                .stderr
                .contains("recipient 5 is not an age X25519 recipient"),
        "{out:?}"
    );
    assert_eq!(status(&server)["initialized"], false);

    let shares_dir = hsm.path().join("sealed");
    std::fs::create_dir(&shares_dir).unwrap();
    args.extend([
        "--recipient".to_owned(),
        file.display().to_string(),
        "--out-dir".to_owned(),
        shares_dir.display().to_string(),
    ]);
    let out = server.kms(&args.iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("kms1-"), "no share in clear: {out:?}");
    let mut shares = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let sealed = shares_dir.join(format!("share-{}.age", i + 1));
        let text = std::fs::read_to_string(&sealed).unwrap();
        assert!(text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert!(!text.contains("kms1-"));
        // Only its own custodian opens it.
        let other = &ids[(i + 1) % ids.len()];
        assert!(age_decrypt(other, &sealed).is_err());
        let share = age_decrypt(id, &sealed).unwrap();
        assert!(share.starts_with("kms1-"), "{share}");
        shares.push(share);
    }
    assert_eq!(
        unseal(&server, &[&shares[4], &shares[0], &shares[2]]).code,
        Some(0)
    );

    // A rekey to three custodians, while unsealed, sealed to their keys too.
    let new_ids: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("new-{i}.txt"))).collect();
    let new_recipients: Vec<String> = new_ids.iter().map(|p| age_identity(p)).collect();
    let mut args: Vec<String> = [
        "operator",
        "rekey",
        "init",
        "--shares",
        "3",
        "--threshold",
        "2",
    ]
    .map(str::to_owned)
    .to_vec();
    for r in &new_recipients {
        args.extend(["--recipient".to_owned(), r.clone()]);
    }
    let out = server.kms(&args.iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(rekey_status(&server)["rekey"]["sealed_to_recipients"], true);
    let new_dir = hsm.path().join("rekeyed");
    std::fs::create_dir(&new_dir).unwrap();
    let out = server.custodian(
        &[
            "operator",
            "rekey",
            "submit",
            "--out-dir",
            new_dir.to_str().unwrap(),
        ],
        &lines(&[&shares[1], &shares[3], &shares[0]]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("kms1-"), "{out:?}");
    for (i, r) in new_recipients.iter().enumerate() {
        assert!(
            out.stdout
                .contains(&format!("Share {}, sealed to {r}: ", i + 1)),
            "{out:?}"
        );
    }
    let new: Vec<String> = new_ids
        .iter()
        .enumerate()
        .map(|(i, id)| age_decrypt(id, &new_dir.join(format!("share-{}.age", i + 1))).unwrap())
        .collect();
    let steps = submit(&server, &[&new[1], &new[0]]).json_lines();
    assert!(
        !steps[1]["committed_share_set_id"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    assert_eq!(unseal(&server, &[&new[2], &new[1]]).code, Some(0));

    // The recipients are in the records (public keys), the shares nowhere.
    let records = audit_records(&server, &hsm);
    let init = records
        .iter()
        .find(|r| r["event"]["operation"] == "Init" && r["event"]["outcome"] == "OK")
        .unwrap();
    assert_eq!(
        init["event"]["ceremony"]["recipients"][4],
        recipients[4].as_str()
    );
    let text = serde_json::to_string(&records).unwrap() + &hsm.logs();
    for share in shares.iter().chain(&new) {
        assert!(!text.contains(share.as_str()));
    }
}

#[test]
fn verify_share_proves_a_share_without_unsealing_and_is_rate_limited() {
    let hsm = TestHsm::new("kms-verify-share");
    let tables = hsm
        .tls_tables()
        .replace("max_failed_shares = 1000", "max_failed_shares = 6");
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &tables);
    let server = hsm.try_start(&config, &[]).unwrap();
    let out = server.init(3, 2, "");
    let shares = out.shares();
    let set = out.json()["share_set_id"].as_str().unwrap().to_owned();
    let other = TestHsm::new("kms-verify-other");
    let other_server = other.start();
    let foreign = other_server.init(2, 2, "").shares();
    drop(other_server);

    // Good shares, sealed: intact and current; nothing unsealed, no progress counted.
    let out = server.custodian(
        &["operator", "verify-share"],
        &lines(&[&shares[1], &shares[2]]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("Share 2 of share set {set} is intact and current")),
        "{out:?}"
    );
    assert!(out.stdout.contains("Share 3 of share set"), "{out:?}");
    let st = status(&server);
    assert_eq!(st["sealed"], true);
    assert_eq!(st["progress"], 0);
    // Admins are not custodians.
    let out = server.kms(&["operator", "verify-share"], &lines(&[&shares[0]]));
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:?}");

    // Bad shares: altered (valid checksum), another server's, malformed.
    let out = server.custodian(
        &["operator", "verify-share"],
        &lines(&[&forge_share(&shares[0])]),
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("share 1 is not one of the shares made at init"),
        "{out:?}"
    );
    let out = server.custodian(&["operator", "verify-share"], &lines(&[&foreign[0]]));
    assert!(out.stderr.contains("belongs to share set"), "{out:?}");
    let out = server.custodian(&["operator", "verify-share"], "kms1-NOTASHARE\n");
    assert!(
        out.stderr.contains("INVALID_ARGUMENT") && out.stderr.contains("malformed share"),
        "{out:?}"
    );

    // Unseal still works with what was verified.
    assert_eq!(unseal(&server, &[&shares[0], &shares[2]]).code, Some(0));

    // The drill is in the audit log: who, which share, the outcome.
    let records = audit_records(&server, &hsm);
    let verifies: Vec<_> = records
        .iter()
        .filter(|r| r["event"]["operation"] == "VerifyShare")
        .collect();
    // Five by the custodian, and the admin's refused try.
    assert_eq!(verifies.len(), 6);
    let refused = verifies
        .iter()
        .find(|r| r["event"]["outcome"] == "PERMISSION_DENIED")
        .unwrap();
    assert_eq!(
        refused["event"]["principal"],
        server.admin.principal.as_str()
    );
    let verifies: Vec<_> = verifies
        .into_iter()
        .filter(|r| r["event"]["outcome"] != "PERMISSION_DENIED")
        .collect();
    let ok: Vec<_> = verifies
        .iter()
        .filter(|r| r["event"]["outcome"] == "OK")
        .map(|r| r["event"]["ceremony"]["share_index"].as_u64().unwrap())
        .collect();
    assert_eq!(ok, [2, 3]);
    assert!(
        verifies
            .iter()
            .all(|r| r["event"]["principal"] == server.custodian.principal.as_str())
    );
    let forged = verifies
        .iter()
        .find(|r| {
            r["event"]["outcome"] == "INVALID_ARGUMENT"
                && r["event"]["ceremony"]["share_index"] == 1
        })
        .unwrap();
    assert_eq!(forged["event"]["ceremony"]["share_set"], set.as_str());

    // The auditor's report shows the drill: per share set and share, who and the outcome.
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "report", "--format", "json"],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let custody = out.json()["custody"].as_array().unwrap().clone();
    let verified: Vec<u64> = custody
        .iter()
        .filter(|c| {
            c["operation"] == "VerifyShare"
                && c["outcome"] == "OK"
                && c["share_set"] == set.as_str()
        })
        .map(|c| c["share_index"].as_u64().unwrap())
        .collect();
    assert_eq!(verified, [2, 3]);
    assert!(
        custody
            .iter()
            .any(|c| c["operation"] == "Init" && c["outcome"] == "OK")
    );
    let table = server.kms_as(Some(&server.auditor), &["audit", "report"], "");
    assert!(table.stdout.contains("Custodians' ceremonies"), "{table:?}");
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with(&format!("{set}  2")) && l.contains("VerifyShare")),
        "{}",
        table.stdout
    );

    // Failures count against the unseal limit (six a minute here, per address): three
    // above, three more, then even a good share is refused for now.
    for _ in 0..3 {
        let out = server.custodian(
            &["operator", "verify-share"],
            &lines(&[&forge_share(&shares[1])]),
        );
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    }
    let out = server.custodian(&["operator", "verify-share"], &lines(&[&shares[1]]));
    assert!(out.stderr.contains("RESOURCE_EXHAUSTED"), "{out:?}");
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let out = unseal(&server, &[&shares[0]]);
    assert!(
        out.stderr.contains("RESOURCE_EXHAUSTED"),
        "the limit is shared: {out:?}"
    );
}

#[test]
fn with_the_pin_in_the_shares_a_rekey_carries_the_pin_into_the_new_shares() {
    let hsm = TestHsm::new("kms-rekey-pin");
    let module = hsm.module.display().to_string();
    let config = hsm.config_with(
        "shares.toml",
        &hsm.hsm_table_with(&module, &hsm.label, "pin_in_shares = true"),
    );
    let mut server = hsm.try_start(&config, &[]).unwrap();
    let out = server.init(3, 2, &format!("{}\n", hsm.pin));
    assert_eq!(out.code, Some(0), "{out:?}");
    let old = out.shares();
    // Sealed, hence logged out of the token: the rekey logs in with the PIN the old shares
    // carry, makes the new ones, and logs out again.
    let out = server.rekey_init(4, 3);
    assert_eq!(out.code, Some(0), "{out:?}");
    let steps = submit(&server, &[&old[2], &old[0]]).json_lines();
    let new = strings(&steps[1]["shares"]);
    assert_eq!(new.len(), 4);
    let steps = submit(&server, &[&new[3], &new[1], &new[0]]).json_lines();
    assert!(
        !steps[2]["committed_share_set_id"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(status(&server)["sealed"], true);

    // A restart: the new shares alone log in to the HSM and unseal.
    server.kill9();
    let server = hsm.try_start(&config, &[]).unwrap();
    assert_eq!(unseal(&server, &[&old[0], &old[1]]).code, Some(1));
    let out = unseal(&server, &[&new[2], &new[0], &new[1]]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(status(&server)["sealed"], false);
    let logs = hsm.logs();
    assert!(!logs.contains(hsm.pin.as_str()));
}

/// Every file under the token directory, with its bytes.
fn token_files(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(token_files(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

fn master_keys(hsm: &TestHsm, label: &str) -> usize {
    hsm.labels(label).iter().filter(|l| *l == label).count()
}

#[test]
fn master_key_rotation_keeps_shares_and_ciphertexts_across_a_restart() {
    let hsm = TestHsm::new("kms-rotate-master");
    let mut server = hsm.start();
    let out = server.init(3, 2, "");
    let shares = out.shares();
    assert_eq!(unseal(&server, &[&shares[0], &shares[1]]).code, Some(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (soft, hard) = rt.block_on(async {
        server
            .create_aes_key("ledger", ProtectionLevel::Software)
            .await;
        server.create_aes_key("vault", ProtectionLevel::Hsm).await;
        let mut keys = server.keys().await;
        (
            encrypt_ctx(&mut keys, "ledger", b"software").await.unwrap(),
            encrypt_ctx(&mut keys, "vault", b"in the token")
                .await
                .unwrap(),
        )
    });
    assert_eq!(master_keys(&hsm, "kms-master-key"), 1);
    let before = hsm.inspect_key("kms-master-key");

    // Generated in the token: one master key again afterwards, a new one, as safe.
    let out = server.custodian(&["operator", "rotate-master-key"], "");
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:?}");
    let out = server.kms(&["operator", "rotate-master-key"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("was destroyed"), "{out:?}");
    assert_eq!(master_keys(&hsm, "kms-master-key"), 1);
    let after = hsm.inspect_key("kms-master-key");
    for attr in ["sensitive", "never_extractable", "always_sensitive"] {
        assert_eq!(after[attr], true, "{attr}: {after}");
    }
    assert_eq!(after["extractable"], false);
    assert_eq!(before["extractable"], false);

    // Sealed: refused (the custodians must have unsealed for a rotation).
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let out = server.kms(&["operator", "rotate-master-key"], "");
    assert!(out.stderr.contains("UNAVAILABLE: sealed"), "{out:?}");
    assert_eq!(unseal(&server, &[&shares[2], &shares[1]]).code, Some(0));

    // Adopting a key made elsewhere: a missing, an unsafe, then a good one.
    let out = server.kms(
        &["operator", "rotate-master-key", "--adopt-label", "nowhere"],
        "",
    );
    assert!(
        out.stderr.contains("no master key labelled \"nowhere\""),
        "{out:?}"
    );
    assert!(hsm.tool(&["weak-key"], &["weak-master"]).status.success());
    let out = server.kms(
        &[
            "operator",
            "rotate-master-key",
            "--adopt-label",
            "weak-master",
        ],
        "",
    );
    assert!(out.stderr.contains("extractable"), "{out:?}");
    let out = server.kms(
        &[
            "operator",
            "rotate-master-key",
            "--adopt-label",
            "bad\nlabel",
        ],
        "",
    );
    assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    assert!(
        hsm.tool(&["loose-key"], &["replacement-master", ""])
            .status
            .success()
    );
    let tokens = hsm.path().join("softhsm").join("tokens");
    let before_files = token_files(&tokens);
    let out = server.kms(
        &[
            "operator",
            "rotate-master-key",
            "--adopt-label",
            "replacement-master",
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(master_keys(&hsm, "kms-master-key"), 0);
    assert_eq!(master_keys(&hsm, "replacement-master"), 1);

    // kill -9, restart (the configuration still names the old label: the record's key is
    // used), the same shares unseal, every ciphertext decrypts.
    server.kill9();
    // What a crash between the rotation's commit and the old key's destruction leaves: the
    // old key still in the token (its files put back as they were), listed as retired in the
    // committed record. The next start destroys it.
    let after_files = token_files(&tokens);
    let gone: Vec<_> = before_files
        .iter()
        .filter(|(path, _)| !after_files.contains_key(*path))
        .collect();
    assert!(
        gone.iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "object")),
        "the old master key's object file was removed: {gone:?}"
    );
    for (path, bytes) in &gone {
        std::fs::write(path, bytes).unwrap();
    }
    assert_eq!(master_keys(&hsm, "kms-master-key"), 1, "put back");
    let server = hsm.start();
    assert_eq!(master_keys(&hsm, "kms-master-key"), 0);
    let logs = hsm.logs();
    assert!(
        logs.contains("a master key a rotation retired was destroyed"),
        "{logs}"
    );
    assert_eq!(unseal(&server, &[&shares[0], &shares[2]]).code, Some(0));
    rt.block_on(async {
        let mut keys = server.keys().await;
        assert_eq!(
            decrypt_ctx(&mut keys, "ledger", &soft).await.unwrap(),
            b"software"
        );
        assert_eq!(
            decrypt_ctx(&mut keys, "vault", &hard).await.unwrap(),
            b"in the token"
        );
    });
    let records = audit_records(&server, &hsm);
    let rotations: Vec<_> = records
        .iter()
        .filter(|r| r["event"]["operation"] == "RotateMasterKey" && r["event"]["outcome"] == "OK")
        .collect();
    assert_eq!(rotations.len(), 2);
    assert!(
        rotations[1]["event"]["ceremony"]["master_key"]
            .as_str()
            .unwrap()
            .starts_with("replacement-master/")
    );
}

/// Bad input to the rekey and verify-share calls is refused by name and changes nothing: a
/// recipient count that does not match the shares, a submit naming another attempt's nonce,
/// and a share far larger than any share (sent whole to the server).
#[test]
fn rekey_and_verify_share_refuse_bad_input_by_name() {
    let hsm = TestHsm::new("kms-rekey-bad");
    let server = hsm.start();
    let out = server.init(3, 2, "");
    let old = out.shares();
    server.unseal_with(&old);

    // One recipient for three shares.
    let recipient = age_identity(&hsm.path().join("custodian-1.key"));
    let out = server.kms(
        &[
            "operator",
            "rekey",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--recipient",
            &recipient,
        ],
        "",
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("1 recipients were given for 3 shares: give one per share, or none"),
        "{out:?}"
    );
    assert_eq!(
        rekey_status(&server)["rekey"],
        Value::Null,
        "nothing started"
    );

    // Another attempt's nonce: refused, the share not counted.
    assert_eq!(server.rekey_init(3, 2).code, Some(0));
    let nonce = rekey_status(&server)["rekey"]["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = if nonce.starts_with('0') { "1" } else { "0" }.repeat(nonce.len());
    let out = server.custodian(
        &["operator", "rekey", "submit", "--nonce", &other],
        &lines(&[&old[0]]),
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("is not the one in progress"), "{out:?}");
    assert_eq!(rekey_status(&server)["rekey"]["progress"], 0);
    let out = server.custodian(
        &["operator", "rekey", "submit", "--nonce", &nonce],
        &lines(&[&old[0]]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(rekey_status(&server)["rekey"]["progress"], 1);

    // A 64 KiB "share": a clear refusal from both calls, nothing counted, nothing echoed.
    let huge = format!("kms1-{}", "A".repeat(64 * 1024));
    for args in [
        &["operator", "rekey", "submit"][..],
        &["operator", "verify-share"][..],
    ] {
        let out = server.custodian(args, &format!("{huge}\n"));
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{args:?}: {out:?}");
        assert!(
            !out.stderr.contains(&"A".repeat(100)),
            "the share is not echoed"
        );
    }
    assert_eq!(rekey_status(&server)["rekey"]["progress"], 1);
    assert!(!hsm.logs().contains(&"A".repeat(100)));
}

/// A rekey alone keeps the root key and the master key: an older copy of the store (a
/// backup, a replica, an old redb file) still unseals with the retired shares. The answer
/// docs/ceremony.md gives for an exposed share: rekey, then rotate the master key (the old
/// one is destroyed in the token), then take a new backup. Every older copy is then
/// useless, whoever holds old shares; the live server unseals with the new shares only.
#[test]
fn after_a_rekey_and_a_master_key_rotation_older_copies_of_the_store_are_useless() {
    let hsm = TestHsm::new("kms-exposed-share");
    let server = hsm.start();
    let init = server.init(3, 2, "");
    assert_eq!(init.code, Some(0), "{init:?}");
    let old = init.shares();
    let fingerprint = init.json()["audit_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(unseal(&server, &[&old[0], &old[1]]).code, Some(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ct = rt.block_on(async {
        server
            .create_aes_key("ledger", ProtectionLevel::Software)
            .await;
        let mut keys = server.keys().await;
        encrypt_ctx(&mut keys, "ledger", b"before").await.unwrap()
    });
    let old_backup = hsm.path().join("old.backup");
    let out = server.kms(
        &["backup", "create", "--out", old_backup.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");

    // The rekey: the old shares are retired on the live server.
    assert_eq!(server.rekey_init(3, 2).code, Some(0));
    let steps = submit(&server, &[&old[0], &old[1]]).json_lines();
    let new = strings(&steps[1]["shares"]);
    assert_eq!(new.len(), 3);
    let steps = submit(&server, &[&new[0], &new[1]]).json_lines();
    assert!(steps[1]["committed_share_set_id"].is_string(), "{steps:?}");

    // A copy of the store from before the rekey, restored: the old shares still unseal it.
    let copy = |name: &str| {
        let config = hsm.config_full(
            &format!("{name}.toml"),
            &hsm.hsm_table(),
            &format!(
                "[storage]\npath = \"{}\"\n",
                hsm.path().join(format!("{name}.redb")).display()
            ),
        );
        let out = softhsm_tests::run_kms(
            "https://127.0.0.1:1",
            &[
                "backup",
                "restore",
                "--in",
                old_backup.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--public-key",
                &fingerprint,
            ],
            "",
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        config
    };
    let before_rotation = copy("copy-1");
    let stale = hsm.try_start(&before_rotation, &[]).unwrap();
    assert_eq!(unseal(&stale, &[&old[0], &old[2]]).code, Some(0));
    rt.block_on(async {
        let mut keys = stale.keys().await;
        assert_eq!(
            decrypt_ctx(&mut keys, "ledger", &ct).await.unwrap(),
            b"before"
        );
    });
    drop(stale);

    // The master key rotation: the key every older copy is wrapped under is destroyed.
    let out = server.kms(&["operator", "rotate-master-key"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("was destroyed"), "{out:?}");

    // Every older copy is now useless: the one restored before, and a new restore of the
    // old backup. Their server stops at start-up: the master key they name is gone.
    for config in [before_rotation, copy("copy-2")] {
        let err = match hsm.try_start(&config, &[]) {
            Ok(_) => panic!("an older copy still starts after the rotation"),
            Err(e) => e,
        };
        assert!(err.contains("no master key labelled"), "{err}");
    }
    // The live server: the new shares unseal, the old ones are refused by name.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let out = unseal(&server, &[&old[0]]);
    assert!(out.stderr.contains("which a rekey retired"), "{out:?}");
    assert_eq!(unseal(&server, &[&new[2], &new[0]]).code, Some(0));
    rt.block_on(async {
        let mut keys = server.keys().await;
        assert_eq!(
            decrypt_ctx(&mut keys, "ledger", &ct).await.unwrap(),
            b"before"
        );
    });
}
