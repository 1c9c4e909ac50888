//! The audit log against a real server and a real SoftHSM token: every call recorded field
//! by field, nothing secret in it, offline verification of an export and of each kind of
//! tampering, a continuous chain across a restart, fail-closed on a full file system, and
//! the HTML report rendered in headless Chromium.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kms_proto::v1 as pb;
use prost::Message as _;
use serde_json::Value;
use softhsm_tests::{Mount, Server, TestHsm, independent_audit_verify, start_unsealed};
use tonic::Code;

const PLAINTEXT: &[u8] = b"wire transfer: SECRET-PLAINTEXT-a81f";
const AAD: &[u8] = b"account=SECRET-AAD-5c0e";

fn config(hsm: &TestHsm, store: &Path) -> PathBuf {
    let path = hsm.path().join("audit.toml");
    softhsm_tests::write_private(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[hsm]\n{}\n[audit]\ncheckpoint_every_records = 5\n{}",
            store.display(),
            hsm.hsm_table(),
            hsm.tls_tables(),
        ),
    );
    path
}

/// Creates a key as the admin, and grants the admin client its use.
async fn create(
    server: &Server,
    c: &mut softhsm_tests::KeysClient,
    name: &str,
    algorithm: pb::Algorithm,
) {
    c.create_key(pb::CreateKeyRequest {
        name: name.into(),
        algorithm: algorithm as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    server.grant_all(name).await;
}

fn encrypt_request() -> pb::EncryptRequest {
    pb::EncryptRequest {
        key: "payments".into(),
        plaintext: PLAINTEXT.to_vec(),
        associated_data: AAD.to_vec(),
    }
}

/// The export's lines: header, records, checkpoints.
fn export(server: &Server, dir: &Path, name: &str) -> (PathBuf, Vec<Value>) {
    let path = dir.join(name);
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", path.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (path, lines)
}

fn records(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("seq").is_some()).collect()
}

fn find<'a>(records: &[&'a Value], operation: &str, outcome: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["event"]["operation"] == operation && r["event"]["outcome"] == outcome)
        .unwrap_or_else(|| panic!("no {operation} {outcome} record"))
}

/// `kms audit verify --export FILE`: (exit code, stdout).
fn verify_offline(file: &Path) -> (Option<i32>, String) {
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &["audit", "verify", "--export", file.to_str().unwrap()],
        "",
    );
    (out.code, out.stdout)
}

/// Writes `lines` (JSON text) as a tampered export and verifies it offline.
fn verify_lines(dir: &Path, name: &str, lines: &[String]) -> (Option<i32>, String) {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    verify_offline(&path)
}

/// The independent verifier accepts `export` as written and rejects each alteration:
/// one field of one record, one byte of a checkpoint's signature, a checkpoint's signed
/// time, the seal's signature, and a key the token did not vouch for (exit 3, naming the
/// failure). Proof that it can fail.
fn independent_checks_catch_tampering(hsm: &TestHsm, export: &Path) {
    let key = hsm.audit_key_proof(None);
    let out = independent_audit_verify(export, None, &key);
    assert_eq!(out.code, Some(0), "{out:?}");
    let text = std::fs::read_to_string(export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let altered = |name: &str, index: usize, line: String, why: &str| {
        assert_ne!(lines[index], line, "{name}: nothing was altered");
        let mut copy: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        copy[index] = line;
        let path = hsm.path().join(name);
        std::fs::write(&path, copy.join("\n") + "\n").unwrap();
        let out = independent_audit_verify(&path, None, &key);
        assert_eq!(out.code, Some(3), "{name}: {out:?}");
        assert!(out.stderr.contains(why), "{name}: {out:?}");
    };
    // One byte of hex flipped in place.
    let flip = |line: &str, field: &str| {
        let at = line.find(&format!("\"{field}\":\"")).unwrap() + field.len() + 4;
        let mut bytes = line.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(bytes).unwrap()
    };
    let encrypt = lines
        .iter()
        .position(|l| l.contains("\"operation\":\"Encrypt\"") && l.contains("\"outcome\":\"OK\""))
        .unwrap();
    altered(
        "one-field.jsonl",
        encrypt,
        lines[encrypt].replacen("\"input_bytes\":", "\"input_bytes\":1", 1),
        "hash does not match its content",
    );
    let checkpoint = lines
        .iter()
        .position(|l| l.starts_with("{\"checkpoint\":"))
        .unwrap();
    altered(
        "checkpoint-signature.jsonl",
        checkpoint,
        flip(lines[checkpoint], "signature"),
        "signature invalid",
    );
    let time = lines[checkpoint].find("\"time_ms\":").unwrap() + "\"time_ms\":".len();
    let mut later = lines[checkpoint].to_owned();
    later.insert(time, '1');
    altered(
        "checkpoint-time.jsonl",
        checkpoint,
        later,
        "signature invalid",
    );
    let seal = lines.len() - 1;
    altered(
        "seal-signature.jsonl",
        seal,
        flip(lines[seal], "signature"),
        "export seal: signature invalid",
    );
    // A key the token did not vouch for: its signature of the challenge, one bit flipped.
    let mut forged = std::fs::read(&key.signature).unwrap();
    forged[0] ^= 1;
    let other = softhsm_tests::TokenProof {
        challenge: key.challenge.clone(),
        signature: hsm.path().join("forged.sig"),
    };
    std::fs::write(&other.signature, forged).unwrap();
    let out = independent_audit_verify(export, None, &other);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("not the token's audit key"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_recorded_and_the_export_verifies_offline() {
    let hsm = TestHsm::new("kms-audit");
    let store = hsm.path().join("kms.redb");
    let mut server = hsm.try_start(&config(&hsm, &store), &[]).unwrap();
    let init = server.init(3, 2, "");
    assert_eq!(init.code, Some(0), "{init:?}");
    let shares = init.shares();
    // Init tells the custodians the audit key's fingerprint, for auditors to pin.
    let fingerprint = init.json()["audit_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(fingerprint.len(), 32);
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    create(&server, &mut c, "payments", pb::Algorithm::Aes256Gcm).await;

    // A request id given by the caller is recorded and returned.
    let mut req = tonic::Request::new(encrypt_request());
    req.metadata_mut()
        .insert("x-request-id", "order-4711".parse().unwrap());
    let resp = c.encrypt(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "order-4711");
    let encrypted = resp.into_inner();
    let ct = encrypted.ciphertext.clone();
    let decrypted = c
        .decrypt(pb::DecryptRequest {
            key: "payments".into(),
            ciphertext: ct.clone(),
            associated_data: AAD.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let wrong = c
        .decrypt(pb::DecryptRequest {
            key: "payments".into(),
            ciphertext: ct.clone(),
            associated_data: b"account=other".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    c.rotate_key(pb::RotateKeyRequest {
        name: "payments".into(),
    })
    .await
    .unwrap();
    let re = c
        .re_encrypt(pb::ReEncryptRequest {
            key: "payments".into(),
            ciphertext: ct.clone(),
            associated_data: AAD.to_vec(),
            destination_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(re.key_version, 2);
    c.batch_decrypt(pb::BatchDecryptRequest {
        key: "payments".into(),
        items: vec![
            pb::DecryptItem {
                ciphertext: ct.clone(),
                associated_data: AAD.to_vec(),
            },
            pb::DecryptItem {
                ciphertext: b"not a ciphertext".to_vec(),
                associated_data: Vec::new(),
            },
        ],
    })
    .await
    .unwrap();
    let missing = c
        .get_key(pb::GetKeyRequest {
            name: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let out = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(0), "online verify: {out:?}");
    assert!(out.stdout.contains("intact"), "{out:?}");

    let dir = hsm.path();
    let (file, lines) = export(&server, dir, "export.jsonl");
    let header = &lines[0];
    assert_eq!(header["format"], "kms-audit-export/v1");
    assert_eq!(header["contiguous"], true);
    assert_eq!(header["checkpoint_public_key"].as_str().unwrap().len(), 64);
    assert_eq!(header["checkpoint_key_fingerprint"], fingerprint.as_str());
    let recs = records(&lines);

    // Sequence numbers are contiguous from 1 and times never go back.
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        if i > 0 {
            assert!(
                r["event"]["time_ms"].as_u64().unwrap()
                    >= recs[i - 1]["event"]["time_ms"].as_u64().unwrap()
            );
            assert_eq!(r["prev_hash"], recs[i - 1]["hash"]);
        }
    }
    // The ceremony is recorded.
    let init = find(&recs, "Init", "OK");
    assert_eq!(init["event"]["service"], "kms.v1.System");
    assert_eq!(
        recs.iter()
            .filter(|r| r["event"]["operation"] == "Unseal")
            .count(),
        2
    );
    // The encrypt, field by field.
    let e = &find(&recs, "Encrypt", "OK")["event"];
    assert_eq!(e["request_id"], "order-4711");
    assert_eq!(e["principal"], server.admin.principal.as_str());
    assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    assert_eq!(e["service"], "kms.v1.KeyManagement");
    assert_eq!(e["key"], "payments");
    assert_eq!(e["key_version"], 1);
    assert_eq!(e["input_bytes"], encrypt_request().encoded_len() as u64);
    assert_eq!(e["output_bytes"], encrypted.encoded_len() as u64);
    // A request id the caller did not give is made by the server.
    let d = &find(&recs, "Decrypt", "OK")["event"];
    assert_eq!(d["request_id"].as_str().unwrap().len(), 32);
    assert_eq!(d["output_bytes"], decrypted.encoded_len() as u64);
    let bad = &find(&recs, "Decrypt", "INVALID_ARGUMENT")["event"];
    assert_eq!(
        (bad["key"].as_str(), bad["output_bytes"].as_u64()),
        (Some("payments"), Some(0))
    );
    let rot = &find(&recs, "RotateKey", "OK")["event"];
    assert_eq!(rot["key_version"], 2);
    let r = &find(&recs, "ReEncrypt", "OK")["event"];
    assert_eq!(
        (
            &r["key_version"],
            &r["destination_key"],
            &r["destination_key_version"]
        ),
        (&Value::from(1), &Value::from("payments"), &Value::from(2))
    );
    let b = &find(&recs, "BatchDecrypt", "OK")["event"]["batch"];
    assert_eq!(b["items"], 2);
    assert_eq!(b["outcomes"]["OK"], 1);
    assert_eq!(b["outcomes"]["INVALID_ARGUMENT"], 1);
    assert_eq!(b["versions"]["1"], 1);
    assert_eq!(
        find(&recs, "GetKey", "NOT_FOUND")["event"]["key"],
        "missing"
    );
    // Audit reads are audited: the online verify, and this export (its own last record).
    find(&recs, "VerifyAuditLog", "OK");
    let last = recs.last().unwrap();
    assert_eq!(last["event"]["operation"], "ExportAuditLog");
    assert_eq!(header["last_seq"], last["seq"]);
    // Checkpoints every 5 records, and one covering the export's last record.
    let cps: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("checkpoint").is_some())
        .collect();
    assert!(cps.len() >= 3, "{cps:?}");
    assert_eq!(lines[lines.len() - 2]["checkpoint"], last["seq"]);
    // Last, the seal: exactly which records the export holds, signed by the HSM key.
    let seal = &lines.last().unwrap()["export_seal"];
    assert_eq!(seal["records"], recs.len());
    assert_eq!(seal["first_seq"], 1);
    assert_eq!(seal["last_seq"], last["seq"]);
    assert_eq!(seal["last_hash"], last["hash"]);
    assert_eq!(seal["key_fingerprint"], fingerprint.as_str());

    // Offline verification: intact as exported...
    let (code, stdout) = verify_offline(&file);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("intact"), "{stdout}");
    // ...and by the independent verifier (audit_verify.py, written from docs/audit.md alone)
    // under the key read from the token, which rejects one field of one record, one byte of
    // a checkpoint's signature, a checkpoint's time and the seal, each altered.
    independent_checks_catch_tampering(&hsm, &file);
    // ...and each kind of tampering named at the right sequence number.
    let text: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let index_of = |seq: u64| {
        text.iter()
            .position(|l| l.starts_with(&format!("{{\"schema\":1,\"seq\":{seq},")))
            .unwrap()
    };
    let seq_of = |v: &Value| v["seq"].as_u64().unwrap();
    let encrypt_seq = seq_of(find(&recs, "Encrypt", "OK"));
    let expect = |name: &str, lines: Vec<String>, seq: u64, why: &str| {
        let (code, stdout) = verify_lines(dir, name, &lines);
        assert_eq!(code, Some(3), "{name}: {stdout}");
        assert!(
            stdout.contains(&format!("first bad sequence {seq}: {why}")),
            "{name}: expected sequence {seq} ({why}): {stdout}"
        );
    };
    let mut altered = text.clone();
    let i = index_of(encrypt_seq);
    altered[i] = altered[i].replace("order-4711", "order-4712");
    expect("altered", altered, encrypt_seq, "record altered");
    let mut deleted = text.clone();
    deleted.remove(index_of(encrypt_seq));
    expect("deleted", deleted, encrypt_seq, "record missing");
    let mut inserted = text.clone();
    inserted.insert(
        index_of(encrypt_seq) + 1,
        text[index_of(encrypt_seq)].clone(),
    );
    expect("inserted", inserted, encrypt_seq, "record inserted");
    let mut reordered = text.clone();
    let (a, b) = (index_of(encrypt_seq), index_of(encrypt_seq + 1));
    reordered.swap(a, b);
    expect("reordered", reordered, encrypt_seq, "records out of order");
    let last_seq = seq_of(last);
    let cut = text[..index_of(last_seq - 2)].to_vec();
    expect("truncated", cut, last_seq - 2, "log truncated");
    // The review's attack: delete the checkpoints, cut the last 10 records, set the
    // header's last_seq. The seal (still there) says how many records there were...
    let cut_at = index_of(last_seq - 9);
    let mut cut: Vec<String> = text[..cut_at]
        .iter()
        .filter(|l| !l.starts_with("{\"checkpoint\""))
        .cloned()
        .collect();
    cut[0] = cut[0].replace(
        &format!("\"last_seq\":{last_seq}"),
        &format!("\"last_seq\":{}", last_seq - 10),
    );
    cut.push(text.last().unwrap().clone());
    expect("cut, seal kept", cut.clone(), last_seq - 9, "log truncated");
    // ...and without the seal nothing signed covers the end: exit 4, pinned or not.
    cut.pop();
    let (code, stdout) = verify_lines(dir, "cut-no-seal", &cut);
    assert_eq!(code, Some(4), "{stdout}");
    assert!(stdout.contains("NOT ANCHORED"), "{stdout}");
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &[
            "audit",
            "verify",
            "--export",
            dir.join("cut-no-seal").to_str().unwrap(),
            "--public-key",
            &fingerprint,
        ],
        "",
    );
    assert_eq!(out.code, Some(4), "{out:?}");
    // A seal whose statement was changed no longer verifies; lines after it are refused.
    let mut forged_seal = text.clone();
    let n = forged_seal.len() - 1;
    forged_seal[n] = forged_seal[n].replace(
        &format!("\"records\":{}", recs.len()),
        &format!("\"records\":{}", recs.len() - 1),
    );
    let (code, stdout) = verify_lines(dir, "forged-seal", &forged_seal);
    assert_eq!(code, Some(3), "{stdout}");
    assert!(stdout.contains("checkpoint signature invalid"), "{stdout}");
    let mut appended = text.clone();
    appended.push(text[index_of(encrypt_seq)].clone());
    let (code, stdout) = verify_lines(dir, "after-seal", &appended);
    assert_eq!(code, Some(3), "{stdout}");
    let mut forged_key = text.clone();
    forged_key[0] = forged_key[0].replace(
        header["checkpoint_public_key"].as_str().unwrap(),
        &"ab".repeat(32),
    );
    let (code, stdout) = verify_lines(dir, "forged-key", &forged_key);
    assert_eq!(code, Some(3), "{stdout}");
    assert!(stdout.contains("checkpoint signature invalid"), "{stdout}");
    // Pinned to the fingerprint from init, it verifies; pinned to another key, it does not.
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &[
            "audit",
            "verify",
            "--export",
            file.to_str().unwrap(),
            "--public-key",
            &fingerprint,
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &[
            "audit",
            "verify",
            "--export",
            file.to_str().unwrap(),
            "--public-key",
            "00112233445566778899aabbccddeeff",
        ],
        "",
    );
    assert_eq!(out.code, Some(3), "{out:?}");

    // A filtered export is not a chain: offline verify says so instead of passing.
    let filtered = dir.join("filtered.jsonl");
    let out = server.kms_as(
        Some(&server.auditor),
        &[
            "audit",
            "export",
            "--key",
            "payments",
            "--out",
            filtered.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let only: Vec<Value> = std::fs::read_to_string(&filtered)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("seq").is_some())
        .collect();
    assert!(!only.is_empty());
    assert!(only.iter().all(|r| r["event"]["key"] == "payments"
        || r["event"]["destination_key"] == "payments"));
    let (code, _) = verify_offline(&filtered);
    assert_eq!(code, Some(1));
    // CSV: one row per record.
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--format", "csv", "--key", "payments"],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), only.len() + 1, "{}", out.stdout);
    assert!(out.stdout.starts_with("seq,time,request_id,principal"));

    // A restart continues the chain.
    let before = last_seq;
    assert!(server.terminate().success());
    let server = hsm.try_start(&config(&hsm, &store), &[]).unwrap();
    server.unseal_with(&shares);
    let (file, lines) = export(&server, dir, "after-restart.jsonl");
    let recs = records(&lines);
    assert!(recs.len() as u64 > before + 2);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
    }
    assert_eq!(
        recs[before as usize..]
            .iter()
            .filter(|r| r["event"]["operation"] == "Unseal")
            .count(),
        2
    );
    let (code, stdout) = verify_offline(&file);
    assert_eq!(code, Some(0), "{stdout}");
    let out = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(0), "{out:?}");

    // Nothing secret in the store, the exports or the server log.
    let mut places = vec![
        ("store", std::fs::read(&store).unwrap()),
        ("server log", hsm.logs().into_bytes()),
    ];
    for f in ["export.jsonl", "after-restart.jsonl", "filtered.jsonl"] {
        places.push((f, std::fs::read(dir.join(f)).unwrap()));
    }
    // The audit log's append-only files beside the redb file, where most records are.
    let mut segments = 0;
    for entry in std::fs::read_dir(dir.join("kms.redb.audit")).unwrap() {
        let path = entry.unwrap().path();
        segments += usize::from(path.extension().is_some_and(|e| e == "log"));
        places.push(("an audit log file", std::fs::read(&path).unwrap()));
    }
    assert!(segments >= 1, "the records are in the audit log's files");
    for (what, bytes) in &places {
        for secret in [PLAINTEXT, AAD] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{} found in the {what}",
                String::from_utf8_lossy(secret)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_fails_requests_closed_and_loses_nothing() {
    let hsm = TestHsm::new("kms-audit-full");
    let mount = Mount::tmpfs(&hsm.path().join("data"), "16m");
    let store = mount.path().join("kms.redb");
    let config = config(&hsm, &store);
    // With metrics: the failures are counted for the alert docs/operations.md sets.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(&config, text).unwrap();
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let metrics = server.metrics.clone().expect("a metrics listener");
    let failures = || {
        let (code, text) = softhsm_tests::http_get(&metrics);
        assert_eq!(code, 200);
        text.lines()
            .find_map(|l| l.strip_prefix("kms_audit_write_failures_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or_else(|| panic!("no kms_audit_write_failures_total in {text}"))
    };
    assert_eq!(failures(), 0.0);
    let mut c = server.keys().await;
    create(&server, &mut c, "payments", pb::Algorithm::Aes256Gcm).await;
    // The first encryption reserves its nonce block; later ones write only their records.
    c.encrypt(encrypt_request()).await.unwrap();

    // Fill the file system.
    mount.fill();
    let filler = mount.path().join("filler");
    let mut acknowledged = 1;
    let mut refused = None;
    // The audit log's files are grown a megabyte ahead of their records (zeros written in
    // advance), so some thousands of records still find room after the file system fills.
    for _ in 0..30_000 {
        match c.encrypt(encrypt_request()).await {
            Ok(_) => acknowledged += 1,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("with the file system full, an encryption must fail");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(refused.message(), "audit log unavailable");
    // Every call fails closed from then on, key changes included.
    let again = c.encrypt(encrypt_request()).await.unwrap_err();
    assert_eq!(again.code(), Code::Unavailable, "{again:?}");
    let create_err = c
        .create_key(pb::CreateKeyRequest {
            name: "made-while-full".into(),
            algorithm: pb::Algorithm::Aes256Gcm as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(create_err.code(), Code::Unavailable, "{create_err:?}");
    assert!(hsm.logs().contains("audit write failed"));
    assert!(failures() >= 3.0, "{}", failures());

    // Space comes back; after a restart nothing refused has an effect or a record, and
    // everything acknowledged does.
    server.kill9();
    std::fs::remove_file(&filler).unwrap();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    let gone = c
        .get_key(pb::GetKeyRequest {
            name: "made-while-full".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let (file, lines) = export(&server, hsm.path(), "after-full.jsonl");
    let recs = records(&lines);
    let encrypts = recs
        .iter()
        .filter(|r| r["event"]["operation"] == "Encrypt" && r["event"]["outcome"] == "OK")
        .count();
    assert_eq!(
        encrypts, acknowledged,
        "every acknowledged encryption, and only those"
    );
    assert!(
        !recs
            .iter()
            .any(|r| r["event"]["key"] == "made-while-full" && r["event"]["outcome"] == "OK")
    );
    let (code, stdout) = verify_offline(&file);
    assert_eq!(code, Some(0), "{stdout}");
    drop(server);
    drop(mount);
}

/// kill -9 while 16 callers keep the audit log's group commit busy, eight times over, with
/// a key change between the rounds (its record commits with the change in the redb file,
/// the others go to the append-only files): every answered call's record is there after
/// the restarts, and the whole chain verifies offline and by the independent verifier. A
/// crash may leave a record whose answer never left (its caller saw an error); it never
/// leaves an answer without its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_inside_group_commits_loses_no_acknowledged_record() {
    use std::sync::{Arc, Mutex};
    let hsm = TestHsm::new("kms-audit-kill");
    let store = hsm.path().join("kms.redb");
    let config = config(&hsm, &store);
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    create(&server, &mut c, "payments", pb::Algorithm::Aes256Gcm).await;
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    for round in 0..8u64 {
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let mut c = c.clone();
                let acknowledged = Arc::clone(&acknowledged);
                tokio::spawn(async move {
                    for i in 0.. {
                        let id = format!("kill-{round}-{t}-{i}");
                        let mut req = tonic::Request::new(encrypt_request());
                        req.metadata_mut()
                            .insert("x-request-id", id.parse().unwrap());
                        if c.encrypt(req).await.is_err() {
                            break;
                        }
                        acknowledged.lock().unwrap().push(id);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(250 + 60 * round)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        server = hsm.try_start(&config, &[]).unwrap();
        server.unseal_with(&shares);
        c = server.keys().await;
        c.create_key(pb::CreateKeyRequest {
            name: format!("between-{round}"),
            algorithm: pb::Algorithm::Aes256Gcm as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 200,
        "{} calls answered",
        acknowledged.len()
    );
    // The records are in the store's append-only files, beside the redb file.
    let segments = std::fs::read_dir(hsm.path().join("kms.redb.audit"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count();
    assert!(segments >= 1);
    let (file, lines) = export(&server, hsm.path(), "after-kills.jsonl");
    let recorded: std::collections::HashSet<&str> = records(&lines)
        .iter()
        .filter(|r| r["event"]["operation"] == "Encrypt" && r["event"]["outcome"] == "OK")
        .filter_map(|r| r["event"]["request_id"].as_str())
        .collect();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !recorded.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} calls answered without a record, e.g. {:?}",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(5)]
    );
    for round in 0..8 {
        let name = format!("between-{round}");
        find_key_record(&lines, &name);
    }
    let (code, stdout) = verify_offline(&file);
    assert_eq!(code, Some(0), "{stdout}");
    softhsm_tests::audit_export_verifies_independently(&server, &hsm, "independent.jsonl");
}

/// The CreateKey record of key `name`, which must be there.
fn find_key_record<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|r| r["event"]["operation"] == "CreateKey" && r["event"]["key"] == name)
        .unwrap_or_else(|| panic!("no CreateKey record of {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_report_renders_in_headless_chromium() {
    let hsm = TestHsm::new("kms-audit-report");
    let (server, _) = start_unsealed(&hsm, &config(&hsm, &hsm.path().join("kms.redb")));
    let mut c = server.keys().await;
    create(&server, &mut c, "payments", pb::Algorithm::Aes256Gcm).await;
    create(&server, &mut c, "signer", pb::Algorithm::Ed25519).await;
    create(&server, &mut c, "idle", pb::Algorithm::HmacSha256).await;
    let mut cts = Vec::new();
    for _ in 0..3 {
        cts.push(
            c.encrypt(encrypt_request())
                .await
                .unwrap()
                .into_inner()
                .ciphertext,
        );
    }
    c.rotate_key(pb::RotateKeyRequest {
        name: "payments".into(),
    })
    .await
    .unwrap();
    for ct in &cts[..2] {
        c.decrypt(pb::DecryptRequest {
            key: "payments".into(),
            ciphertext: ct.clone(),
            associated_data: AAD.to_vec(),
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        c.sign(pb::SignRequest {
            key: "signer".into(),
            input: Some(pb::sign_request::Input::Message(b"m".to_vec())),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // A refusal: the auditor has no grant to encrypt.
    let denied = server
        .keys_as(Some(&server.auditor))
        .await
        .encrypt(encrypt_request())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let admin = server.admin.principal.clone();
    let auditor = server.auditor.principal.clone();

    // JSON: the numbers, per key, version, principal, operation and outcome.
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "report", "--format", "json"],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let report = out.json();
    let row = |key: &str, version: u64, who: &str, op: &str| -> Option<Value> {
        report["usage"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| {
                u["key"] == key
                    && u["version"] == version
                    && u["principal"] == who
                    && u["operation"] == op
                    && u["outcome"] == "OK"
            })
            .cloned()
    };
    let encrypts = row("payments", 1, &admin, "Encrypt").unwrap();
    let decrypts = row("payments", 1, &admin, "Decrypt").unwrap();
    let created = row("payments", 1, &admin, "CreateKey").unwrap();
    assert_eq!(encrypts["count"], 3);
    assert_eq!(decrypts["count"], 2);
    assert_eq!(row("signer", 1, &admin, "Sign").unwrap()["count"], 2);
    // Each row has its own first and last use: the decryptions came after every encryption,
    // and the key was created before either.
    assert!(
        decrypts["first_ms"].as_u64().unwrap() >= encrypts["last_ms"].as_u64().unwrap(),
        "{report}"
    );
    assert!(
        created["last_ms"].as_u64().unwrap() <= encrypts["first_ms"].as_u64().unwrap(),
        "{report}"
    );
    // No row says the auditor used a key; the refusal is in its own section.
    assert!(
        report["usage"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["principal"] != auditor.as_str()),
        "{report}"
    );
    let refused = report["refused"].as_array().unwrap();
    assert!(
        refused.iter().any(|f| f["principal"] == auditor.as_str()
            && f["operation"] == "Encrypt"
            && f["key"] == "payments"
            && f["outcome"] == "PERMISSION_DENIED"
            && f["count"] == 1),
        "{report}"
    );
    let summary = &report["keys"][0];
    assert_eq!(summary["key"], "payments", "busiest first: {report}");
    assert_eq!(summary["refused"], 1);
    assert_eq!(
        summary["principals"], 2,
        "the admin and the refused auditor"
    );
    let unused: Vec<(String, u64)> = report["unused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["key"].as_str().unwrap().to_owned(),
                v["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        unused,
        vec![("idle".to_owned(), 1), ("payments".to_owned(), 2)]
    );
    let below = &report["decrypt_below_primary"][0];
    assert_eq!(
        (&below["key"], &below["version"], &below["count"]),
        (&Value::from("payments"), &Value::from(1), &Value::from(2))
    );
    // Table and CSV carry the same rows.
    let table = server.kms_as(Some(&server.auditor), &["audit", "report"], "");
    let table_row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("payments") && l.contains(" Encrypt ") && l.contains(&admin))
        .unwrap_or_else(|| panic!("{}", table.stdout));
    assert!(
        table_row.contains(" 1 ") && table_row.contains(" 3 "),
        "{table_row}"
    );
    assert!(
        table.stdout.contains("Refused calls, by principal"),
        "{}",
        table.stdout
    );
    let csv = server.kms_as(
        Some(&server.auditor),
        &["audit", "report", "--format", "csv"],
        "",
    );
    assert!(
        csv.stdout
            .contains(&format!("usage,payments,1,{admin},Encrypt,OK,3,")),
        "{}",
        csv.stdout
    );
    assert!(
        csv.stdout.contains(&format!(
            "refused,payments,,{auditor},Encrypt,PERMISSION_DENIED,1,"
        )),
        "{}",
        csv.stdout
    );
    // Filters: one key, one principal, a period.
    let only = |args: &[&str]| -> Value {
        let mut all = vec!["audit", "report", "--format", "json"];
        all.extend_from_slice(args);
        let out = server.kms_as(Some(&server.auditor), &all, "");
        assert_eq!(out.code, Some(0), "{out:?}");
        out.json()
    };
    let signer = only(&["--key", "signer"]);
    assert!(
        signer["usage"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["key"] == "signer"),
        "{signer}"
    );
    assert_eq!(signer["key"], "signer");
    let by_auditor = only(&["--principal", &auditor]);
    assert_eq!(
        by_auditor["usage"].as_array().unwrap().len(),
        0,
        "{by_auditor}"
    );
    assert_eq!(
        by_auditor["refused"].as_array().unwrap().len(),
        1,
        "{by_auditor}"
    );
    let recent = only(&["--period", "30d"]);
    assert!(recent["since_ms"].as_u64().is_some(), "{recent}");
    assert_eq!(
        recent["usage"], report["usage"],
        "everything happened in the last 30 days"
    );

    // HTML: inline SVG, no script, rendered by Chromium.
    let html = hsm.path().join("report.html");
    let out = server.kms_as(
        Some(&server.auditor),
        &[
            "audit",
            "report",
            "--format",
            "html",
            "--out",
            html.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains("<script"), "the report runs no script");
    assert!(
        !page.contains(" src=") && !page.contains(" href="),
        "nothing to fetch"
    );
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("Debian's chromium package is needed (scripts/test installs it)");
    let browser = |extra: &[String]| {
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!(
                "--user-data-dir={}",
                hsm.path().join("chromium").display()
            ))
            .args(extra)
            .arg(format!("file://{}", html.display()))
            .output()
            .unwrap()
    };
    let rendered = browser(&["--dump-dom".to_owned()]);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let dom = String::from_utf8_lossy(&rendered.stdout);
    // Bars: payments' 5 uses (3 encryptions, 2 decryptions), signer's 2, idle none, and
    // the refusal in its own colour.
    let ok_of = |key: &str| -> u64 {
        let marker = format!("data-key=\"{key}\" data-ok=\"");
        dom.match_indices(&marker)
            .map(|(i, _)| {
                dom[i + marker.len()..]
                    .split('"')
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    };
    assert_eq!(ok_of("payments"), 5, "{dom}");
    assert_eq!(ok_of("signer"), 2, "{dom}");
    assert_eq!(ok_of("idle"), 0, "{dom}");
    assert!(dom.contains("data-refused=\"1\""), "{dom}");
    assert!(
        dom.contains("payments: 5") && dom.contains("signer: 2") && dom.contains("refused: 1"),
        "legend: {dom}"
    );
    assert!(
        dom.contains(&format!(
            "<td>payments</td><td>1</td><td>{admin}</td><td>Encrypt</td><td>OK</td><td class=\"n\">3</td>"
        )),
        "{dom}"
    );
    // As a person would see it: a screenshot of the size asked for, not blank, with the
    // series' colours and the refusals' red drawn in the chart's region.
    let png = hsm.path().join("report.png");
    let shot = browser(&[
        "--window-size=1000,700".to_owned(),
        format!("--screenshot={}", png.display()),
    ]);
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1000, 700));
    let channels = frame.color_type.samples();
    let colours: Vec<[u8; 3]> = pixels[..frame.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    let count = |rgb: [u8; 3]| colours.iter().filter(|c| **c == rgb).count();
    let non_white = colours.iter().filter(|c| **c != [255, 255, 255]).count();
    assert!(
        non_white * 50 > colours.len(),
        "the page is nearly blank: {non_white} of {} pixels drawn",
        colours.len()
    );
    // #1f77b4 (the first key), #ff7f0e (the second) and #d62728 (refused): each a visible area.
    for (name, rgb) in [
        ("payments", [0x1f, 0x77, 0xb4]),
        ("signer", [0xff, 0x7f, 0x0e]),
        ("refused", [0xd6, 0x27, 0x28]),
    ] {
        assert!(
            count(rgb) > 50,
            "{name}'s colour covers {} pixels",
            count(rgb)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audit_requests_get_clear_errors_and_are_recorded() {
    let hsm = TestHsm::new("kms-audit-bad");
    let (server, shares) = start_unsealed(&hsm, &config(&hsm, &hsm.path().join("kms.redb")));
    let dir = hsm.path();

    // A period that ends before it starts: refused by the server, and recorded.
    let out = server.kms_as(
        Some(&server.auditor),
        &[
            "audit",
            "export",
            "--since",
            "2026-11-23T10:00:00Z",
            "--until",
            "2026-11-23T09:00:00Z",
        ],
        "",
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("INVALID_ARGUMENT: since must be before until"),
        "{out:?}"
    );
    let out = server.kms_as(
        Some(&server.auditor),
        &[
            "audit",
            "report",
            "--since",
            "2026-11-23T10:00:00Z",
            "--until",
            "2026-11-23T10:00:00Z",
        ],
        "",
    );
    assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    // A time that is not RFC 3339: the CLI says what it wants.
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--since", "yesterday"],
        "",
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("RFC 3339"), "{out:?}");

    // Offline verify of something that is not an export, or of no file.
    let junk = dir.join("junk.jsonl");
    std::fs::write(&junk, "{\"hello\":1}\n").unwrap();
    let (code, _) = verify_offline(&junk);
    assert_eq!(code, Some(1));
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &["audit", "verify", "--export", junk.to_str().unwrap()],
        "",
    );
    assert!(out.stderr.contains("not a kms audit export"), "{out:?}");
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &[
            "audit",
            "verify",
            "--export",
            dir.join("nope").to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot read"), "{out:?}");
    // A pinned key that is neither a fingerprint nor a public key.
    let (file, _) = export(&server, dir, "good.jsonl");
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &[
            "audit",
            "verify",
            "--export",
            file.to_str().unwrap(),
            "--public-key",
            &"zz".repeat(32),
        ],
        "",
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("--public-key"), "{out:?}");

    // The report needs the keyring: sealed, it says so.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let out = server.kms_as(Some(&server.auditor), &["audit", "report"], "");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("UNAVAILABLE: sealed"), "{out:?}");
    // Export and verify work sealed (auditors need no unsealed server for the log).
    assert_eq!(
        server
            .kms_as(Some(&server.auditor), &["audit", "verify"], "")
            .code,
        Some(0)
    );
    server.unseal_with(&shares);

    // Every refusal above that reached the server is in the log, with its outcome.
    let (_, lines) = export(&server, dir, "after.jsonl");
    let recs = records(&lines);
    find(&recs, "ExportAuditLog", "INVALID_ARGUMENT");
    find(&recs, "KeyUsageReport", "INVALID_ARGUMENT");
    find(&recs, "KeyUsageReport", "UNAVAILABLE");
}

/// Someone with disk access alters the record the last checkpoint covers. At start-up the
/// server finds that its chain's tail does not connect to that checkpoint, says so, and
/// signs nothing over it (no checkpoint, no export seal) until it is restored; every
/// verification names the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_that_does_not_connect_is_never_signed() {
    let hsm = TestHsm::new("kms-tail");
    let dir = hsm.path();
    let store = dir.join("kms.redb");
    let config = config(&hsm, &store);
    let mut server = hsm.try_start(&config, &[]).unwrap();
    let shares = server.init(3, 2, "").shares();
    server.unseal_with(&shares);
    for _ in 0..7 {
        let out = server.kms(&["operator", "status"], "");
        assert_eq!(out.code, Some(0));
    }
    let (_, lines) = export(&server, dir, "before.jsonl");
    let covered = lines
        .iter()
        .filter_map(|l| l["checkpoint"].as_u64())
        .max()
        .unwrap();
    assert!(server.terminate().success());

    // One byte of the caller's name, in place (records are stored in a binary form).
    softhsm_tests::store_replace(
        &store,
        "audit",
        &format!("{covered:020}"),
        "test.kms/",
        "test.kmz/",
    );

    let server = hsm.try_start(&config, &[]).unwrap();
    assert!(
        hsm.logs()
            .contains("does not connect to its last signed checkpoint"),
        "{}",
        hsm.logs()
    );
    server.unseal_with(&shares);
    for _ in 0..7 {
        server.kms(&["operator", "status"], "");
    }
    let (file, lines) = export(&server, dir, "after.jsonl");
    // No checkpoint past the old one, and no seal.
    assert_eq!(
        lines.iter().filter_map(|l| l["checkpoint"].as_u64()).max(),
        Some(covered)
    );
    assert!(lines.iter().all(|l| l.get("export_seal").is_none()));
    let (code, stdout) = verify_offline(&file);
    assert_eq!(code, Some(3), "{stdout}");
    assert!(
        stdout.contains(&format!("first bad sequence {covered}: record altered")),
        "{stdout}"
    );
    let out = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(hsm.logs().contains("refusing to sign"), "{}", hsm.logs());
}

/// `kms audit verify --export LIVE --archive DIR`: (exit code, stdout).
fn verify_history(live: &Path, archive: &Path) -> (Option<i32>, String) {
    let out = softhsm_tests::run_kms(
        "http://127.0.0.1:9",
        &[
            "audit",
            "verify",
            "--export",
            live.to_str().unwrap(),
            "--archive",
            archive.to_str().unwrap(),
        ],
        "",
    );
    (out.code, format!("{}{}", out.stdout, out.stderr))
}

/// A server whose `[audit]` table also has `retention`, unsealed, with a `payments` key
/// used `calls` times. Returns it and its config file.
async fn serve_with_retention(hsm: &TestHsm, retention: &str, calls: usize) -> (Server, PathBuf) {
    let path = config(hsm, &hsm.path().join("kms.redb"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[audit]\n", &format!("[audit]\n{retention}"));
    std::fs::write(&path, text).unwrap();
    let (server, _) = start_unsealed(hsm, &path);
    let mut c = server.keys().await;
    create(&server, &mut c, "payments", pb::Algorithm::Aes256Gcm).await;
    for _ in 0..calls {
        c.encrypt(encrypt_request()).await.unwrap();
    }
    (server, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_archives_old_records_and_the_whole_history_verifies() {
    let hsm = TestHsm::new("kms-audit-retain");
    let dir = hsm.path().to_owned();
    let archive = dir.join("archive");
    let shipped = dir.join("shipped");
    std::fs::create_dir(&shipped).unwrap();
    // Keep 20 records, archive in segments of 10, check every second, and ship each segment
    // (here: copy it) before its records leave the store.
    let retention = format!(
        "retain_records = 20\nsegment_records = 10\nretain_check_seconds = 1\narchive_dir = \"{}\"\narchive_command = [\"cp\", \"-t\", \"{}\"]\n",
        archive.display(),
        shipped.display()
    );
    let (server, _path) = serve_with_retention(&hsm, &retention, 60).await;
    // Wait for at least four segments (1-10 ... 31-40).
    let segments = |d: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
            .collect();
        names.sort();
        names
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while segments(&archive).len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            segments(&archive)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let names = segments(&archive);
    assert_eq!(
        names[0],
        "audit-00000000000000000001-00000000000000000010.jsonl"
    );
    // Every segment was shipped: the archive command runs before a segment's records leave
    // the store, and a segment may be in the archive while its copy is still being made.
    while !names.iter().all(|n| segments(&shipped).contains(n)) {
        assert!(
            std::time::Instant::now() < deadline,
            "not shipped: {names:?} against {:?}",
            segments(&shipped)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in &names {
        assert_eq!(
            std::fs::read(archive.join(n)).unwrap(),
            std::fs::read(shipped.join(n)).unwrap(),
            "{n} shipped as archived"
        );
    }
    // Each segment verifies alone, anchored by its seal.
    let (code, out) = verify_offline(&archive.join(&names[0]));
    assert_eq!(code, Some(0), "{out}");

    // The store no longer holds them, and the live log says so: online verification starts
    // after the archived prefix, the export starts there, and a removal record names each
    // segment.
    let online = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert_eq!(online.code, Some(0), "{online:?}");
    assert!(online.stdout.contains("are archived"), "{online:?}");
    let (live, lines) = export(&server, &dir, "live.jsonl");
    let recs = records(&lines);
    assert!(recs[0]["seq"].as_u64().unwrap() > 10, "{}", recs[0]);
    let removals: Vec<&&Value> = recs
        .iter()
        .filter(|r| r["event"]["operation"] == "ArchiveSegment")
        .collect();
    assert!(removals.len() >= 4, "{removals:?}");
    assert_eq!(removals[0]["event"]["archived"]["first_seq"], 1);
    assert_eq!(removals[0]["event"]["archived"]["file"], names[0].as_str());

    // The whole history: segments and the live log, from record 1.
    let (code, out) = verify_history(&live, &archive);
    assert_eq!(code, Some(0), "{out}");
    // The same, by the independent verifier: every segment alone, linked from record 1, and
    // every ArchiveSegment record naming a segment that is there.
    let key = hsm.audit_key_proof(None);
    let independent = independent_audit_verify(&live, Some(&archive), &key);
    assert_eq!(independent.code, Some(0), "{independent:?}");
    assert!(out.starts_with("intact: records 1 to "), "{out}");

    // A segment missing: records removed unarchived.
    let hidden = dir.join("hidden.jsonl");
    std::fs::rename(archive.join(&names[1]), &hidden).unwrap();
    let (code, out) = verify_history(&live, &archive);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("records 11 to 20 are in no segment"), "{out}");
    let independent = independent_audit_verify(&live, Some(&archive), &key);
    assert_eq!(independent.code, Some(3), "{independent:?}");
    // A segment edited: its chain breaks.
    let edited =
        std::fs::read_to_string(&hidden)
            .unwrap()
            .replacen("\"Encrypt\"", "\"Decrypt\"", 1);
    std::fs::write(archive.join(&names[1]), edited).unwrap();
    let (code, out) = verify_history(&live, &archive);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(&names[1]), "{out}");
    let independent = independent_audit_verify(&live, Some(&archive), &key);
    assert_eq!(independent.code, Some(3), "{independent:?}");
    assert!(independent.stderr.contains(&names[1]), "{independent:?}");
    std::fs::rename(&hidden, archive.join(&names[1])).unwrap();
    // Restored, the history verifies again.
    let (code, out) = verify_history(&live, &archive);
    assert_eq!(code, Some(0), "{out}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stay_in_the_store_when_the_archive_command_fails() {
    let hsm = TestHsm::new("kms-audit-retain-fail");
    let dir = hsm.path().to_owned();
    let archive = dir.join("archive");
    let retention = format!(
        "retain_records = 5\nsegment_records = 5\nretain_check_seconds = 1\narchive_dir = \"{}\"\narchive_command = [\"false\"]\n",
        archive.display(),
    );
    let (server, path) = serve_with_retention(&hsm, &retention, 20).await;
    // Several retention runs fail: the command refuses every segment.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while hsm.logs().matches("the archive command failed").count() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", hsm.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, lines) = export(&server, &dir, "live.jsonl");
    let recs = records(&lines);
    assert_eq!(recs[0]["seq"], 1, "nothing left the store");
    assert!(
        recs.iter()
            .all(|r| r["event"]["operation"] != "ArchiveSegment")
    );
    let online = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert_eq!(online.code, Some(0), "{online:?}");
    // Bad retention settings are refused at start-up with the reason.
    let bad = dir.join("bad.toml");
    softhsm_tests::write_private(
        &bad,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace(&format!("archive_dir = \"{}\"\n", archive.display()), ""),
    );
    let (status, stderr) = hsm.start_failure(&bad, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("retain_days and retain_records need archive_dir"),
        "{stderr}"
    );
    drop(server);
}
