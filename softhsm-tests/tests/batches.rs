//! Batches against a real server: the limits that bound them (items, the request, the
//! answer; docs/api.md "Batch limits") at their edges, with a client that keeps gRPC's
//! default 4 MiB receive limit; that a batch refused for its size did nothing; and
//! BatchReEncrypt (round trip, per-item failures, grants, its audit record).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use serde_json::Value;
use softhsm_tests::{ClientSpec, Server, TestHsm, expect_code, start_unsealed};
use tonic::Code;
use tonic::transport::Channel;

type Client = KeyManagementClient<Channel>;

/// A client as an application writes it: tonic's defaults (4 MiB receive limit).
async fn default_client(server: &Server) -> Client {
    KeyManagementClient::new(server.channel(Some(&server.admin)).await)
}

/// The audit records (their events), as the auditor exports them.
fn audit_events(server: &Server) -> Vec<Value> {
    let out = server.kms_as(Some(&server.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l.get("seq").is_some())
        .map(|l| l["event"].clone())
        .collect()
}

fn encrypt_items(n: usize, size: usize) -> Vec<pb::EncryptItem> {
    (0..n)
        .map(|i| pb::EncryptItem {
            plaintext: vec![(i % 251) as u8; size],
            associated_data: format!("record={i}").into_bytes(),
        })
        .collect()
}

async fn batch_encrypt(
    c: &mut Client,
    key: &str,
    items: Vec<pb::EncryptItem>,
) -> Result<Vec<pb::EncryptResponse>, tonic::Status> {
    let r = c
        .batch_encrypt(pb::BatchEncryptRequest {
            key: key.into(),
            items,
        })
        .await?
        .into_inner();
    Ok(r.results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::batch_encrypt_result::Result::Ok(ok)) => ok,
            other => panic!("an item failed: {other:?}"),
        })
        .collect())
}

async fn primary(c: &mut Client, key: &str) -> u32 {
    c.get_key(pb::GetKeyRequest { name: key.into() })
        .await
        .unwrap()
        .into_inner()
        .primary_version
}

/// The documented edges: 1000 items to encrypt of 4,097 bytes make an answer a default
/// client reads, 4,098 are refused; the same for their 4,130-byte ciphertexts to decrypt
/// and to re-encrypt; a request is at most 16 MiB (1000 messages of 16 KiB to sign fit,
/// of 16.5 KiB do not). A batch refused for its answer's size did nothing: the key's nonce
/// budget, one message from a rotation, did not move, and its audit record says refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_limits_fit_a_default_client_and_a_refused_batch_does_nothing() {
    let hsm = TestHsm::new("kms-batch-limits");
    // A budget of 2000 messages per version: the key rotates at the 1501st encryption.
    let config = hsm.config_full(
        "batch.toml",
        &hsm.hsm_table(),
        "[keyring]\nmax_messages_per_version = 2000\n",
    );
    let (server, _) = start_unsealed(&hsm, &config);
    for key in ["edge", "budget"] {
        server
            .create_aes_key(key, pb::ProtectionLevel::Software)
            .await;
    }
    server
        .create_key_of("ed", pb::Algorithm::Ed25519, pb::ProtectionLevel::Software)
        .await;
    let mut c = default_client(&server).await;

    // BatchEncrypt: 1000 x 4,097 bytes is the largest equal batch.
    let made = batch_encrypt(&mut c, "edge", encrypt_items(1000, 4097))
        .await
        .unwrap();
    assert_eq!(made.len(), 1000);
    assert!(made.iter().all(|m| m.ciphertext.len() == 4130));
    expect_code(
        batch_encrypt(&mut c, "edge", encrypt_items(1000, 4098)).await,
        Code::InvalidArgument,
        "the answer to this batch could be 4195256 bytes, more than the 4194304",
    );

    // BatchDecrypt of what that batch made: it fits; a byte more in each item does not.
    let decrypt_items: Vec<pb::DecryptItem> = made
        .iter()
        .enumerate()
        .map(|(i, m)| pb::DecryptItem {
            ciphertext: m.ciphertext.clone(),
            associated_data: format!("record={i}").into_bytes(),
        })
        .collect();
    let r = c
        .batch_decrypt(pb::BatchDecryptRequest {
            key: "edge".into(),
            items: decrypt_items.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for (i, r) in r.results.iter().enumerate() {
        match &r.result {
            Some(pb::batch_decrypt_result::Result::Ok(ok)) => {
                assert_eq!(ok.plaintext, vec![(i % 251) as u8; 4097]);
            }
            other => panic!("{other:?}"),
        }
    }
    let mut longer = decrypt_items.clone();
    longer.iter_mut().for_each(|i| i.ciphertext.push(0));
    expect_code(
        c.batch_decrypt(pb::BatchDecryptRequest {
            key: "edge".into(),
            items: longer,
        })
        .await,
        Code::InvalidArgument,
        "more than the 4194304 a batch answer may be",
    );

    // BatchReEncrypt moves what one BatchEncrypt made in one call.
    let reencrypt_items: Vec<pb::ReEncryptItem> = decrypt_items
        .iter()
        .map(|d| pb::ReEncryptItem {
            ciphertext: d.ciphertext.clone(),
            associated_data: d.associated_data.clone(),
        })
        .collect();
    let r = c
        .batch_re_encrypt(pb::BatchReEncryptRequest {
            key: "edge".into(),
            items: reencrypt_items.clone(),
            destination_key: "budget".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 1000);
    assert_eq!(r.key, "budget");
    // (Those 1000 are the budget key's first messages.)

    // The request: at most 16 MiB. 1000 messages of 16 KiB to sign fit (and the answer,
    // 1000 signatures, is small); 1000 of 16.5 KiB are refused before any handler.
    let sign = |size: usize| pb::BatchSignRequest {
        key: "ed".into(),
        items: (0..1000)
            .map(|_| pb::SignItem {
                input: Some(pb::sign_item::Input::Message(vec![7; size])),
            })
            .collect(),
        format: 0,
    };
    let r = c.batch_sign(sign(16 * 1024)).await.unwrap().into_inner();
    assert!(
        r.results
            .iter()
            .all(|r| matches!(r.result, Some(pb::batch_sign_result::Result::Ok(_))))
    );
    expect_code(
        c.batch_sign(sign(16 * 1024 + 512)).await,
        Code::OutOfRange,
        "16777216",
    );
    // 1000 items of the largest plaintext (64 KiB each): over the request limit too.
    expect_code(
        batch_encrypt(&mut c, "budget", encrypt_items(1000, 64 * 1024)).await,
        Code::OutOfRange,
        "16777216",
    );

    // The budget key has encrypted 1000 messages; 500 more bring it to one message before
    // its rotation.
    let more = batch_encrypt(&mut c, "budget", encrypt_items(500, 1))
        .await
        .unwrap();
    assert!(more.iter().all(|m| m.key_version == 1));
    assert_eq!(primary(&mut c, "budget").await, 1);
    // Refused for their answers' size: 70 plaintexts of 64 KiB (the report's batch); 1000
    // ciphertexts re-encrypted into it, each a byte too long.
    expect_code(
        batch_encrypt(&mut c, "budget", encrypt_items(70, 64 * 1024)).await,
        Code::InvalidArgument,
        "more than the 4194304 a batch answer may be",
    );
    let mut longer = reencrypt_items.clone();
    longer.iter_mut().for_each(|i| i.ciphertext.push(0));
    expect_code(
        c.batch_re_encrypt(pb::BatchReEncryptRequest {
            key: "edge".into(),
            items: longer,
            destination_key: "budget".into(),
        })
        .await,
        Code::InvalidArgument,
        "more than the 4194304 a batch answer may be",
    );
    // Nothing was encrypted: the key did not rotate. The next single message is the one
    // that rotates it (so one encryption by a refused batch would have shown).
    assert_eq!(primary(&mut c, "budget").await, 1);
    let r = c
        .encrypt(pb::EncryptRequest {
            key: "budget".into(),
            plaintext: b"x".to_vec(),
            associated_data: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.key_version, 2, "the budget was not where the test put it");

    // The audit log says refused, with no items done and nothing answered.
    let events = audit_events(&server);
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["outcome"] == "INVALID_ARGUMENT")
        .collect();
    let ops: Vec<(&str, &str)> = refused
        .iter()
        .map(|e| (e["operation"].as_str().unwrap(), e["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        [
            ("BatchEncrypt", "edge"),
            ("BatchDecrypt", "edge"),
            ("BatchEncrypt", "budget"),
            ("BatchReEncrypt", "edge"),
        ],
        "{refused:?}"
    );
    for e in &refused {
        assert!(e["batch"].is_null(), "{e}");
        assert_eq!(e["output_bytes"], 0, "{e}");
        assert!(e["key_version"].is_null(), "{e}");
    }
    // The transport's refusals (OUT_OF_RANGE) are recorded too, before any handler.
    assert_eq!(
        events
            .iter()
            .filter(|e| e["outcome"] == "OUT_OF_RANGE")
            .count(),
        2,
        "{events:?}"
    );
    // The accepted batches: one record each, with their items.
    let ok = |op: &str, key: &str| {
        events
            .iter()
            .filter(|e| e["operation"] == op && e["key"] == key && e["outcome"] == "OK")
            .map(|e| e["batch"]["items"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ok("BatchEncrypt", "edge"), [1000]);
    assert_eq!(ok("BatchDecrypt", "edge"), [1000]);
    assert_eq!(ok("BatchReEncrypt", "edge"), [1000]);
    assert_eq!(ok("BatchSign", "ed"), [1000]);
}

fn reencrypt_request(
    key: &str,
    destination: &str,
    items: &[(Vec<u8>, Vec<u8>)],
) -> pb::BatchReEncryptRequest {
    pb::BatchReEncryptRequest {
        key: key.into(),
        items: items
            .iter()
            .map(|(ct, aad)| pb::ReEncryptItem {
                ciphertext: ct.clone(),
                associated_data: aad.clone(),
            })
            .collect(),
        destination_key: destination.into(),
    }
}

/// The outcome of each item: `Ok` or (code, message).
fn outcomes(results: &[pb::BatchReEncryptResult]) -> Vec<Result<(), (i32, String)>> {
    results
        .iter()
        .map(|r| match &r.result {
            Some(pb::batch_re_encrypt_result::Result::Ok(_)) => Ok(()),
            Some(pb::batch_re_encrypt_result::Result::Error(e)) => Err((e.code, e.message.clone())),
            None => panic!("an item without a result"),
        })
        .collect()
}

/// BatchReEncrypt moves 1,000 records from one key to another in one call: every new
/// ciphertext decrypts under the destination with its record's associated data, and no
/// longer under the source; each item fails alone, as in BatchDecrypt, with the same codes
/// and messages; it needs exactly ReEncrypt's grants (reencrypt-from on the source,
/// reencrypt-to on the destination, a constrained grant matching every item); and its
/// audit record names both keys, the items, and the source versions read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reencrypt_moves_records_within_reencrypts_grants() {
    let hsm = TestHsm::new("kms-batch-reencrypt");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    server
        .create_aes_key("old", pb::ProtectionLevel::Software)
        .await;
    server.create_aes_key("new", pb::ProtectionLevel::Hsm).await;
    let mut c = default_client(&server).await;

    // 1000 records under `old`, each with its own associated data, made by two versions.
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for half in 0..2 {
        let items: Vec<pb::EncryptItem> = (0..500)
            .map(|i| pb::EncryptItem {
                plaintext: format!("record {} of the ledger", half * 500 + i).into_bytes(),
                associated_data: format!("row={}", half * 500 + i).into_bytes(),
            })
            .collect();
        let aads: Vec<Vec<u8>> = items.iter().map(|i| i.associated_data.clone()).collect();
        let made = batch_encrypt(&mut c, "old", items).await.unwrap();
        assert!(made.iter().all(|m| m.key_version == half + 1));
        records.extend(made.into_iter().map(|m| m.ciphertext).zip(aads));
        if half == 0 {
            c.rotate_key(pb::RotateKeyRequest { name: "old".into() })
                .await
                .unwrap();
        }
    }

    let started = std::time::Instant::now();
    let r = c
        .batch_re_encrypt(reencrypt_request("old", "new", &records))
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!(r.key, "new");
    assert_eq!(r.results.len(), 1000);
    let moved: Vec<pb::DecryptItem> = r
        .results
        .iter()
        .zip(&records)
        .map(|(r, (old_ct, aad))| match &r.result {
            Some(pb::batch_re_encrypt_result::Result::Ok(ok)) => {
                assert_eq!(ok.key_version, 1);
                assert_eq!(ok.ciphertext.len(), old_ct.len());
                assert_ne!(&ok.ciphertext, old_ct);
                pb::DecryptItem {
                    ciphertext: ok.ciphertext.clone(),
                    associated_data: aad.clone(),
                }
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let back = c
        .batch_decrypt(pb::BatchDecryptRequest {
            key: "new".into(),
            items: moved.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for (i, r) in back.results.iter().enumerate() {
        match &r.result {
            Some(pb::batch_decrypt_result::Result::Ok(ok)) => {
                assert_eq!(
                    ok.plaintext,
                    format!("record {i} of the ledger").into_bytes()
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // Not under the source, and not with another record's associated data.
    let mut wrong = moved[..2].to_vec();
    wrong[1].associated_data = b"row=0".to_vec();
    let not = c
        .batch_decrypt(pb::BatchDecryptRequest {
            key: "old".into(),
            items: moved[..1].to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        not.results[0].result,
        Some(pb::batch_decrypt_result::Result::Error(_))
    ));
    let not = c
        .batch_decrypt(pb::BatchDecryptRequest {
            key: "new".into(),
            items: wrong,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        not.results[1].result,
        Some(pb::batch_decrypt_result::Result::Error(_))
    ));
    eprintln!("BatchReEncrypt of 1000 records: {took:?}");

    // No destination: the source's primary version (2).
    let r = c
        .batch_re_encrypt(reencrypt_request("old", "", &records[..3]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.key, "old");
    assert!(r.results.iter().all(|r| matches!(
        &r.result,
        Some(pb::batch_re_encrypt_result::Result::Ok(ok)) if ok.key_version == 2
    )));

    // Per-item failures, the same as BatchDecrypt's for the same items: tampered, wrong
    // associated data, not a ciphertext, too long; and a disabled version.
    let mut tampered = records[0].0.clone();
    tampered[20] ^= 1;
    let mixed = vec![
        records[0].clone(),
        (tampered, records[0].1.clone()),
        (records[1].0.clone(), b"row=0".to_vec()),
        (b"short".to_vec(), Vec::new()),
        (vec![1; 64 * 1024 + 34], Vec::new()),
        records[999].clone(),
    ];
    let r = c
        .batch_re_encrypt(reencrypt_request("old", "new", &mixed))
        .await
        .unwrap()
        .into_inner();
    let got = outcomes(&r.results);
    let decrypted = c
        .batch_decrypt(pb::BatchDecryptRequest {
            key: "old".into(),
            items: mixed
                .iter()
                .map(|(ct, aad)| pb::DecryptItem {
                    ciphertext: ct.clone(),
                    associated_data: aad.clone(),
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let want: Vec<Result<(), (i32, String)>> = decrypted
        .results
        .iter()
        .map(|r| match &r.result {
            Some(pb::batch_decrypt_result::Result::Ok(_)) => Ok(()),
            Some(pb::batch_decrypt_result::Result::Error(e)) => Err((e.code, e.message.clone())),
            None => panic!(),
        })
        .collect();
    assert_eq!(got, want);
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(
        got[..4],
        [
            Ok(()),
            Err((invalid, "decryption failed".into())),
            Err((invalid, "decryption failed".into())),
            Err((invalid, "decryption failed".into())),
        ]
    );
    assert!(matches!(&got[4], Err((c, m)) if *c == invalid && m.contains("more than")));
    assert_eq!(got[5], Ok(()));
    c.disable_key_version(pb::KeyVersionRequest {
        name: "old".into(),
        version: 1,
    })
    .await
    .unwrap();
    let r = c
        .batch_re_encrypt(reencrypt_request(
            "old",
            "new",
            &[records[0].clone(), records[999].clone()],
        ))
        .await
        .unwrap()
        .into_inner();
    let got = outcomes(&r.results);
    assert!(
        matches!(&got[0], Err((c, m)) if *c == Code::FailedPrecondition as i32 && m.contains("DISABLED")),
        "{got:?}"
    );
    assert_eq!(got[1], Ok(()));

    // Grants: exactly ReEncrypt's.
    let app = hsm.pki.client("app", &ClientSpec::spiffe("mover"));
    let mut access = server.access().await;
    let grant = |key: &str, op: pb::Operation, aad: Option<&[u8]>| pb::CreateGrantRequest {
        key: key.into(),
        principal: app.principal.clone(),
        operations: vec![op as i32],
        associated_data: aad.map(<[u8]>::to_vec),
    };
    let mut a = KeyManagementClient::new(server.channel(Some(&app)).await);
    let two = [records[998].clone(), records[999].clone()];
    // Nothing yet: reencrypt-from on the source is missing.
    expect_code(
        a.batch_re_encrypt(reencrypt_request("old", "new", &two))
            .await,
        Code::PermissionDenied,
        "no grant to reencrypt-from with key \"old\"",
    );
    // From the source, not into the destination.
    let from = access
        .create_grant(grant("old", pb::Operation::ReencryptFrom, None))
        .await
        .unwrap()
        .into_inner()
        .id;
    expect_code(
        a.batch_re_encrypt(reencrypt_request("old", "new", &two))
            .await,
        Code::PermissionDenied,
        "no grant to reencrypt-to with key \"new\"",
    );
    // Decrypt and encrypt grants are not re-encryption grants.
    access
        .create_grant(grant("new", pb::Operation::Encrypt, None))
        .await
        .unwrap();
    expect_code(
        a.batch_re_encrypt(reencrypt_request("old", "new", &two))
            .await,
        Code::PermissionDenied,
        "no grant to reencrypt-to with key \"new\"",
    );
    // Into the destination, constrained to one record's associated data: a batch whose
    // every item has it passes, one item with another refuses the whole batch.
    access
        .create_grant(grant("new", pb::Operation::ReencryptTo, Some(b"row=999")))
        .await
        .unwrap();
    let r = a
        .batch_re_encrypt(reencrypt_request("old", "new", &two[1..]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&r.results), [Ok(())]);
    expect_code(
        a.batch_re_encrypt(reencrypt_request("old", "new", &two))
            .await,
        Code::PermissionDenied,
        "no grant to reencrypt-to with key \"new\"",
    );
    // Without reencrypt-from on the source (revoked), into the destination alone: refused.
    access
        .revoke_grant(pb::RevokeGrantRequest { id: from })
        .await
        .unwrap();
    expect_code(
        a.batch_re_encrypt(reencrypt_request("old", "new", &two[1..]))
            .await,
        Code::PermissionDenied,
        "no grant to reencrypt-from with key \"old\"",
    );

    // The audit record of the 1000: one record, both keys, the source versions read.
    let events = audit_events(&server);
    let e = events
        .iter()
        .find(|e| {
            e["operation"] == "BatchReEncrypt"
                && e["outcome"] == "OK"
                && e["batch"]["items"] == 1000
        })
        .unwrap();
    assert_eq!(e["key"], "old");
    assert_eq!(e["destination_key"], "new");
    assert_eq!(e["destination_key_version"], 1);
    assert_eq!(e["batch"]["outcomes"], serde_json::json!({"OK": 1000}));
    assert_eq!(
        e["batch"]["versions"],
        serde_json::json!({"1": 500, "2": 500})
    );
    assert_eq!(e["principal"], hsm.admin.principal.as_str());
    let mixed_record = events
        .iter()
        .find(|e| e["operation"] == "BatchReEncrypt" && e["batch"]["items"] == 6)
        .unwrap();
    assert_eq!(
        mixed_record["batch"]["outcomes"],
        serde_json::json!({"OK": 2, "INVALID_ARGUMENT": 4})
    );
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["operation"] == "BatchReEncrypt" && e["outcome"] == "PERMISSION_DENIED")
        .collect();
    assert_eq!(denied.len(), 5, "{denied:?}");
    assert!(
        denied
            .iter()
            .all(|e| e["principal"] == app.principal.as_str()
                && e["key"] == "old"
                && e["destination_key"] == "new"
                && e["batch"].is_null())
    );
    // No plaintext or associated data in the log.
    let log = hsm.logs();
    assert!(!log.contains("of the ledger") && !log.contains("row=999"));
}
