//! An HSM that fails and comes back: the SoftHSM token's files are moved away under load
//! and back. The server must keep serving software keys, answer `UNAVAILABLE` for HSM keys
//! while the token is gone, say so in its status, health and metrics, and serve every HSM
//! key again within seconds of its return: no restart, no unseal, nothing acknowledged lost.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use softhsm_tests::{KeysClient, Server, TestHsm, decrypt_ctx, encrypt_ctx, start_unsealed};
use tokio::sync::Mutex;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// What the load saw: acknowledged ciphertexts and signatures, and every failure's code.
#[derive(Default)]
struct Seen {
    soft: Vec<(Vec<u8>, Vec<u8>)>,
    hard: Vec<(Vec<u8>, Vec<u8>)>,
    signed: Vec<(Vec<u8>, Vec<u8>)>,
    /// Time of each HSM call's outcome: (when, ok).
    hsm: Vec<(Instant, bool)>,
    soft_failures: usize,
    other_codes: Vec<Code>,
}

async fn sign(keys: &mut KeysClient, message: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    keys.sign(pb::SignRequest {
        key: "signer".into(),
        input: Some(pb::sign_request::Input::Message(message.to_vec())),
        format: 0,
    })
    .await
    .map(|r| r.into_inner().signature)
}

async fn load(server: &Server, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>, worker: usize) {
    let mut keys = server.keys().await;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let pt = format!("worker {worker} message {n}").into_bytes();
        let soft = encrypt_ctx(&mut keys, "ledger", &pt).await;
        let hard = encrypt_ctx(&mut keys, "vault", &pt).await;
        let signed = sign(&mut keys, &pt).await;
        let now = Instant::now();
        let mut s = seen.lock().await;
        match soft {
            Ok(ct) => s.soft.push((pt.clone(), ct)),
            Err(_) => s.soft_failures += 1,
        }
        for (result, ok_to) in [(hard, 0), (signed, 1)] {
            match result {
                Ok(out) => {
                    if ok_to == 0 {
                        s.hard.push((pt.clone(), out));
                    } else {
                        s.signed.push((pt.clone(), out));
                    }
                    s.hsm.push((now, true));
                }
                Err(e) => {
                    if e.code() != Code::Unavailable {
                        s.other_codes.push(e.code());
                    }
                    s.hsm.push((now, false));
                }
            }
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hsm_health(server: &Server) -> ServingStatus {
    let mut health = HealthClient::new(server.channel(None).await);
    let r = health
        .check(HealthCheckRequest {
            service: "kms.hsm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

fn status(server: &Server) -> serde_json::Value {
    server.kms(&["operator", "status", "--json"], "").json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_away_under_load_and_comes_back_without_a_restart() {
    let hsm = TestHsm::new("kms-hsm-outage");
    let (server, shares) = start_unsealed(&hsm, &hsm.config());
    server
        .create_aes_key("ledger", pb::ProtectionLevel::Software)
        .await;
    server
        .create_aes_key("vault", pb::ProtectionLevel::Hsm)
        .await;
    server
        .create_key_of(
            "signer",
            pb::Algorithm::EcdsaP256Sha256,
            pb::ProtectionLevel::Hsm,
        )
        .await;
    assert_eq!(hsm_health(&server).await, ServingStatus::Serving);
    assert_eq!(status(&server)["hsm_available"], true);

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let server = Arc::new(server);
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (server, seen, stop) = (Arc::clone(&server), Arc::clone(&seen), Arc::clone(&stop));
            tokio::spawn(async move { load(&server, seen, stop, w).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The token's files go away.
    let tokens = hsm.path().join("softhsm/tokens");
    let away = hsm.path().join("softhsm/tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(&server)["hsm_available"], false);
    assert_eq!(hsm_health(&server).await, ServingStatus::NotServing);
    let text = server.kms(&["operator", "status"], "");
    assert!(
        text.stdout.contains("HSM              UNAVAILABLE"),
        "{text:?}"
    );
    let metrics_soft_before = seen.lock().await.soft.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        seen.lock().await.soft.len() > metrics_soft_before,
        "software keys keep working while the HSM is away"
    );

    // Back: every HSM call must succeed again within a few seconds.
    std::fs::rename(&away, &tokens).unwrap();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let s = seen.lock().await;
    assert!(
        s.other_codes.is_empty(),
        "only UNAVAILABLE while away: {:?}",
        s.other_codes
    );
    assert_eq!(s.soft_failures, 0, "software keys never failed");
    let first_ok = s
        .hsm
        .iter()
        .find(|(t, ok)| *t > back && *ok)
        .map(|(t, _)| t.duration_since(back))
        .expect("HSM calls succeeded again after the token came back");
    assert!(
        first_ok < Duration::from_secs(3),
        "recovered after {first_ok:?}"
    );
    let settled = back + first_ok + Duration::from_millis(100);
    let late_failures = s.hsm.iter().filter(|(t, ok)| *t > settled && !ok).count();
    let late_calls = s.hsm.iter().filter(|(t, _)| *t > settled).count();
    assert!(late_calls > 20, "{late_calls} HSM calls after the recovery");
    assert_eq!(
        late_failures, 0,
        "every HSM call after the recovery succeeded"
    );
    assert!(
        s.hsm.iter().any(|(t, ok)| *t < back && !ok),
        "calls failed while away"
    );
    eprintln!(
        "HSM back after {first_ok:?}; {} software and {} HSM ciphertexts, {} signatures acknowledged",
        s.soft.len(),
        s.hard.len(),
        s.signed.len()
    );
    assert_eq!(status(&server)["hsm_available"], true);
    assert_eq!(hsm_health(&server).await, ServingStatus::Serving);

    // Nothing acknowledged is lost: every ciphertext decrypts, every signature verifies.
    let mut keys = server.keys().await;
    for (pt, ct) in &s.soft {
        assert_eq!(&decrypt_ctx(&mut keys, "ledger", ct).await.unwrap(), pt);
    }
    for (pt, ct) in &s.hard {
        assert_eq!(&decrypt_ctx(&mut keys, "vault", ct).await.unwrap(), pt);
    }
    for (pt, sig) in s.signed.iter().step_by(7) {
        let v = keys
            .verify(pb::VerifyRequest {
                key: "signer".into(),
                key_version: 0,
                input: Some(pb::verify_request::Input::Message(pt.clone())),
                signature: sig.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.valid);
    }
    // A new HSM key, and the audit chain with its HSM-signed checkpoints, work too.
    server
        .create_aes_key("vault-2", pb::ProtectionLevel::Hsm)
        .await;
    encrypt_ctx(&mut keys, "vault-2", b"after").await.unwrap();
    let out = server.kms_as(Some(&server.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let logs = hsm.logs();
    assert!(logs.contains("the HSM is available again"), "{logs}");
    assert!(!logs.contains(&hsm.pin));
    for share in &shares {
        assert!(!logs.contains(share.as_str()));
    }
}

/// An object swapped in the token behind the server's back (the key kms made destroyed, an
/// extractable key with its label and CKA_ID made in its place) is not taken up when the
/// server finds its objects again: calls on that key fail rather than encrypt under a key
/// someone can read, and the log says why. A restart (or unseal) looks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_object_is_not_found_again_as_the_key_kms_made() {
    let hsm = TestHsm::new("kms-hsm-swap");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    server
        .create_aes_key("vault", pb::ProtectionLevel::Hsm)
        .await;
    server
        .create_aes_key("ledger", pb::ProtectionLevel::Software)
        .await;
    let mut keys = server.keys().await;
    let ct = encrypt_ctx(&mut keys, "vault", b"before").await.unwrap();
    let (label, id) = hsm.ids("kms/")[0].clone();
    // Another process with the PIN replaces the object.
    assert!(hsm.tool(&["destroy"], &[&label]).status.success());
    assert!(hsm.tool(&["weak-key"], &[&label, &id]).status.success());
    assert_eq!(hsm.ids("kms/"), vec![(label.clone(), id.clone())]);
    for _ in 0..3 {
        let r = encrypt_ctx(&mut keys, "vault", b"never under a readable key").await;
        let e = r.expect_err("encrypted under the swapped, extractable key");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(decrypt_ctx(&mut keys, "vault", &ct).await.is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Everything else goes on.
    let soft = encrypt_ctx(&mut keys, "ledger", b"soft").await.unwrap();
    assert_eq!(
        decrypt_ctx(&mut keys, "ledger", &soft).await.unwrap(),
        b"soft"
    );
    let logs = hsm.logs();
    assert!(
        logs.contains("was not found again as kms made it")
            && logs.contains("not sensitive, or extractable"),
        "{logs}"
    );
}

/// An insider with the PIN swaps an HSM key for one created from a value they know,
/// sensitive and not extractable (but, made by `C_CreateObject`, never "always sensitive"
/// nor "never extractable" as a key generated in the token is). Neither the recovery nor a
/// restart takes it as the key kms made: kms never encrypts under a key someone knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_key_of_known_value_is_never_taken_for_the_key_kms_made() {
    let hsm = TestHsm::new("kms-hsm-known");
    let (mut server, shares) = start_unsealed(&hsm, &hsm.config());
    server
        .create_aes_key("vault", pb::ProtectionLevel::Hsm)
        .await;
    let mut keys = server.keys().await;
    encrypt_ctx(&mut keys, "vault", b"before").await.unwrap();
    let (label, id) = hsm.ids("kms/")[0].clone();
    assert!(hsm.tool(&["destroy"], &[&label]).status.success());
    let known = "42".repeat(32);
    assert!(
        hsm.tool(&["known-key"], &[&label, &id, &known])
            .status
            .success()
    );
    for _ in 0..3 {
        let e = encrypt_ctx(&mut keys, "vault", b"an insider could read this")
            .await
            .expect_err("encrypted under a key whose value someone knows");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        hsm.logs().contains("made from a value someone had"),
        "{}",
        hsm.logs()
    );
    // Nor after a restart: the version's object is refused at the unseal.
    drop(keys);
    assert!(server.terminate().success());
    let server = hsm.try_start(&hsm.config(), &[]).unwrap();
    server.unseal_with(&shares);
    let mut keys = server.keys().await;
    let e = encrypt_ctx(&mut keys, "vault", b"an insider could read this")
        .await
        .expect_err("encrypted under a key whose value someone knows");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
}
