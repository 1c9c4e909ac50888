//! The keyring and the crypto API over real gRPC, against a real SoftHSM token: every
//! algorithm at both protection levels, rotation, version states, destruction, restarts,
//! tampering, batches, bad input, and signatures checked with openssl.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use softhsm_tests::{Server, TestHsm, expect_code, start_unsealed, version_state};
use tonic::Code;
use tonic::transport::Channel;

type Client = KeyManagementClient<Channel>;

const PLAINTEXT: &[u8] = b"attack at dawn: SECRET-PLAINTEXT-7f3a";
const AAD: &[u8] = b"tenant=acme;SECRET-AAD-91c2";

/// Creates a key as the admin and grants the admin client every operation on it (these
/// tests are about the keyring, not access; see access.rs).
async fn create(
    server: &Server,
    c: &mut Client,
    name: &str,
    algorithm: pb::Algorithm,
    protection: pb::ProtectionLevel,
) -> pb::Key {
    let key = c
        .create_key(pb::CreateKeyRequest {
            name: name.into(),
            algorithm: algorithm as i32,
            protection_level: protection as i32,
            rotation_period_seconds: 0,
            labels: [("team".to_owned(), "payments".to_owned())].into(),
            origin: 0,
        })
        .await
        .unwrap()
        .into_inner();
    server.grant_all(name).await;
    key
}

async fn encrypt(c: &mut Client, key: &str, pt: &[u8], aad: &[u8]) -> (Vec<u8>, u32) {
    let r = c
        .encrypt(pb::EncryptRequest {
            key: key.into(),
            plaintext: pt.to_vec(),
            associated_data: aad.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.ciphertext, r.key_version)
}

async fn decrypt(
    c: &mut Client,
    key: &str,
    ct: &[u8],
    aad: &[u8],
) -> Result<(Vec<u8>, u32), tonic::Status> {
    c.decrypt(pb::DecryptRequest {
        key: key.into(),
        ciphertext: ct.to_vec(),
        associated_data: aad.to_vec(),
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        (r.plaintext, r.key_version)
    })
}

async fn sign(
    c: &mut Client,
    key: &str,
    msg: &[u8],
    format: pb::SignatureFormat,
) -> (Vec<u8>, u32) {
    let r = c
        .sign(pb::SignRequest {
            key: key.into(),
            input: Some(pb::sign_request::Input::Message(msg.to_vec())),
            format: format as i32,
        })
        .await
        .unwrap()
        .into_inner();
    (r.signature, r.key_version)
}

async fn verify(c: &mut Client, key: &str, version: u32, msg: &[u8], sig: &[u8]) -> bool {
    c.verify(pb::VerifyRequest {
        key: key.into(),
        key_version: version,
        input: Some(pb::verify_request::Input::Message(msg.to_vec())),
        signature: sig.to_vec(),
    })
    .await
    .unwrap()
    .into_inner()
    .valid
}

/// Verifies a signature with openssl, from files: an independent implementation.
fn openssl_verifies(
    dir: &std::path::Path,
    pem: &str,
    msg: &[u8],
    sig: &[u8],
    hash: Option<&str>,
) -> bool {
    let (p, m, s) = (dir.join("pub.pem"), dir.join("msg"), dir.join("sig"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&m, msg).unwrap();
    std::fs::write(&s, sig).unwrap();
    let mut cmd = Command::new("openssl");
    match hash {
        None => cmd
            .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
            .arg(&p)
            .arg("-in")
            .arg(&m)
            .arg("-sigfile")
            .arg(&s),
        Some(hash) => cmd
            .args(["dgst", &format!("-{hash}"), "-verify"])
            .arg(&p)
            .arg("-signature")
            .arg(&s)
            .arg(&m),
    };
    cmd.output()
        .expect("openssl is installed (scripts/test installs it)")
        .status
        .success()
}

fn keyring_config(hsm: &TestHsm, extra: &str) -> std::path::PathBuf {
    hsm.config_full("keyring.toml", &hsm.hsm_table(), extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_at_both_protection_levels() {
    let hsm = TestHsm::new("kms-algos");
    // At debug, the server logs a line per call (and whatever else it has to say): none of
    // it may hold a secret.
    let (server, _) = start_unsealed(&hsm, &keyring_config(&hsm, "[log]\nlevel = \"debug\"\n"));
    let mut c = server.keys().await;
    let hsm_objects_before = hsm.count("kms/");

    for (protection, p) in [
        (pb::ProtectionLevel::Software, "sw"),
        (pb::ProtectionLevel::Hsm, "hsm"),
    ] {
        // AES-256-GCM.
        let name = format!("aes-{p}");
        let key = create(&server, &mut c, &name, pb::Algorithm::Aes256Gcm, protection).await;
        assert_eq!(key.purpose, pb::Purpose::EncryptDecrypt as i32);
        assert_eq!(key.primary_version, 1);
        assert_eq!(key.labels["team"], "payments");
        let (ct, v) = encrypt(&mut c, &name, PLAINTEXT, AAD).await;
        assert_eq!(v, 1);
        assert_eq!(
            ct.len(),
            PLAINTEXT.len() + 33,
            "format: 5 header + 12 nonce + 16 tag"
        );
        assert_eq!(
            decrypt(&mut c, &name, &ct, AAD).await.unwrap(),
            (PLAINTEXT.to_vec(), 1)
        );
        let (ct2, _) = encrypt(&mut c, &name, PLAINTEXT, AAD).await;
        assert_ne!(ct, ct2, "fresh nonce per message");
        // Wrong associated data, none, and every single flipped bit: one opaque error.
        expect_code(
            decrypt(&mut c, &name, &ct, b"tenant=evil").await,
            Code::InvalidArgument,
            "decryption failed",
        );
        expect_code(
            decrypt(&mut c, &name, &ct, b"").await,
            Code::InvalidArgument,
            "decryption failed",
        );
        for i in 0..ct.len() {
            for bit in [0x01u8, 0x80] {
                let mut t = ct.clone();
                t[i] ^= bit;
                let e = decrypt(&mut c, &name, &t, AAD).await.unwrap_err();
                assert!(
                    e.code() == Code::InvalidArgument && e.message() == "decryption failed",
                    "byte {i}: {e:?}"
                );
            }
        }
        expect_code(
            decrypt(&mut c, &name, &ct[..20], AAD).await,
            Code::InvalidArgument,
            "decryption failed",
        );
        expect_code(
            decrypt(&mut c, &name, b"", AAD).await,
            Code::InvalidArgument,
            "decryption failed",
        );

        // Data keys, with and without the plaintext.
        let dk = c
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: name.clone(),
                length_bytes: 0,
                associated_data: AAD.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(dk.plaintext.len(), 32);
        assert_eq!(
            decrypt(&mut c, &name, &dk.ciphertext, AAD).await.unwrap().0,
            dk.plaintext
        );
        let dk2 = c
            .generate_data_key_without_plaintext(pb::GenerateDataKeyRequest {
                key: name.clone(),
                length_bytes: 16,
                associated_data: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            decrypt(&mut c, &name, &dk2.ciphertext, b"")
                .await
                .unwrap()
                .0
                .len(),
            16
        );

        // Signing keys: our verifier and openssl agree. (hash: None for Ed25519, which
        // signs the message itself; the raw r|s length for ECDSA.)
        for (alg, short, hash, raw_len) in [
            (pb::Algorithm::EcdsaP256Sha256, "ec", Some("sha256"), 64),
            (pb::Algorithm::EcdsaP384Sha384, "ec384", Some("sha384"), 96),
            (pb::Algorithm::Ed25519, "ed", None, 64),
        ] {
            let name = format!("{short}-{p}");
            create(&server, &mut c, &name, alg, protection).await;
            let pem = c
                .get_public_key(pb::GetPublicKeyRequest {
                    key: name.clone(),
                    key_version: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                pem.pem.starts_with("-----BEGIN PUBLIC KEY-----"),
                "{}",
                pem.pem
            );
            let (sig, v) = sign(&mut c, &name, b"the message", pb::SignatureFormat::Default).await;
            assert_eq!(v, 1);
            match hash {
                None => assert_eq!(sig.len(), 64),
                Some(_) => assert_eq!(sig[0], 0x30, "DER"),
            }
            assert!(verify(&mut c, &name, 1, b"the message", &sig).await);
            assert!(!verify(&mut c, &name, 1, b"the massage", &sig).await);
            assert!(
                openssl_verifies(hsm.path(), &pem.pem, b"the message", &sig, hash),
                "{name}"
            );
            assert!(
                !openssl_verifies(hsm.path(), &pem.pem, b"other", &sig, hash),
                "{name}"
            );
            if let Some(hash) = hash {
                let (raw, _) = sign(&mut c, &name, b"the message", pb::SignatureFormat::Raw).await;
                assert_eq!(raw.len(), raw_len);
                assert!(verify(&mut c, &name, 0, b"the message", &raw).await);
                // Signing a digest is the same as signing the message; a digest of the
                // other hash's length is refused.
                let digest = openssl_digest(hsm.path(), b"the message", hash);
                let r = c
                    .sign(pb::SignRequest {
                        key: name.clone(),
                        input: Some(pb::sign_request::Input::Digest(digest.clone())),
                        format: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(openssl_verifies(
                    hsm.path(),
                    &pem.pem,
                    b"the message",
                    &r.signature,
                    Some(hash)
                ));
                let wrong = vec![0; if digest.len() == 32 { 48 } else { 32 }];
                let r = c
                    .sign(pb::SignRequest {
                        key: name.clone(),
                        input: Some(pb::sign_request::Input::Digest(wrong)),
                        format: 0,
                    })
                    .await;
                expect_code(r, Code::InvalidArgument, "digest is");
            } else {
                let r = c
                    .sign(pb::SignRequest {
                        key: name.clone(),
                        input: Some(pb::sign_request::Input::Digest(vec![0; 32])),
                        format: 0,
                    })
                    .await;
                expect_code(r, Code::InvalidArgument, "Ed25519 signs messages");
            }
        }

        // MAC.
        let name = format!("mac-{p}");
        create(
            &server,
            &mut c,
            &name,
            pb::Algorithm::HmacSha256,
            protection,
        )
        .await;
        let m = c
            .mac(pb::MacRequest {
                key: name.clone(),
                message: b"msg".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.mac.len(), 32);
        for (msg, mac, want) in [
            (&b"msg"[..], m.mac.clone(), true),
            (b"msh", m.mac.clone(), false),
            (b"msg", vec![0; 32], false),
        ] {
            let ok = c
                .verify_mac(pb::VerifyMacRequest {
                    key: name.clone(),
                    key_version: 0,
                    message: msg.to_vec(),
                    mac,
                })
                .await
                .unwrap()
                .into_inner()
                .valid;
            assert_eq!(ok, want);
        }
    }
    // Five HSM keys made five token objects.
    assert_eq!(hsm.count("kms/"), hsm_objects_before + 5);
    // Every key kms made in the token, of every kind (the keyring's AES, HMAC, Ed25519 and
    // ECDSA versions; the master key, the seal record key, the audit key), as the token
    // itself reports it: sensitive since it was made, never extractable, private, no
    // derivation or wrapping, its value unreadable.
    let mut made = hsm.inspect_all("kms/");
    made.extend(hsm.inspect_all("kms-master-key"));
    assert!(made.len() >= 5 + 3, "{made:?}");
    assert!(made.iter().any(|o| o["class"] == "secret"), "{made:?}");
    assert!(made.iter().any(|o| o["class"] == "private"), "{made:?}");
    for o in &made {
        softhsm_tests::assert_kms_key_attributes(o, true);
    }

    // Cross-key replay: a ciphertext of one key never decrypts under another.
    let (ct, _) = encrypt(&mut c, "aes-sw", PLAINTEXT, AAD).await;
    expect_code(
        decrypt(&mut c, "aes-hsm", &ct, AAD).await,
        Code::InvalidArgument,
        "decryption failed",
    );
    create(
        &server,
        &mut c,
        "aes-sw-2",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    expect_code(
        decrypt(&mut c, "aes-sw-2", &ct, AAD).await,
        Code::InvalidArgument,
        "decryption failed",
    );

    // ReEncrypt to another key, without the plaintext coming back.
    let r = c
        .re_encrypt(pb::ReEncryptRequest {
            key: "aes-sw".into(),
            ciphertext: ct.clone(),
            associated_data: AAD.to_vec(),
            destination_key: "aes-hsm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.key, "aes-hsm");
    assert_eq!(
        decrypt(&mut c, "aes-hsm", &r.ciphertext, AAD)
            .await
            .unwrap()
            .0,
        PLAINTEXT
    );

    // Listing, with pagination.
    let page = c
        .list_keys(pb::ListKeysRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.keys.len(), 3);
    let mut names: Vec<String> = page.keys.iter().map(|k| k.name.clone()).collect();
    let mut token = page.next_page_token;
    while !token.is_empty() {
        let p = c
            .list_keys(pb::ListKeysRequest {
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(p.keys.iter().map(|k| k.name.clone()));
        token = p.next_page_token;
    }
    assert_eq!(names.len(), 11, "{names:?}");
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);

    // Nothing secret in the server's log.
    let logs = hsm.logs();
    assert!(logs.contains("KeyManagement/Encrypt"));
    for secret in ["SECRET-PLAINTEXT", "SECRET-AAD", "attack at dawn"] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
    drop(server);
}

fn openssl_digest(dir: &std::path::Path, msg: &[u8], hash: &str) -> Vec<u8> {
    let m = dir.join("digest-in");
    std::fs::write(&m, msg).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", &format!("-{hash}"), "-binary"])
        .arg(&m)
        .output()
        .unwrap();
    assert!(out.stdout.len() == 32 || out.stdout.len() == 48);
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_versions_destruction_and_restart() {
    let hsm = TestHsm::new("kms-versions");
    let config = keyring_config(
        &hsm,
        "[keyring]\ntesting_day_seconds = 1\nmaintenance_interval_seconds = 1\n",
    );
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    // A ciphertext of each key's version 1, which is destroyed below.
    let mut made_by_v1 = Vec::new();

    for (name, protection) in [
        ("rot-sw", pb::ProtectionLevel::Software),
        ("rot-hsm", pb::ProtectionLevel::Hsm),
    ] {
        create(&server, &mut c, name, pb::Algorithm::Aes256Gcm, protection).await;
        let (ct1, v1) = encrypt(&mut c, name, PLAINTEXT, AAD).await;
        made_by_v1.push((name, ct1.clone()));
        let key = c
            .rotate_key(pb::RotateKeyRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(key.primary_version, 2);
        let (ct2, v2) = encrypt(&mut c, name, PLAINTEXT, AAD).await;
        assert_eq!((v1, v2), (1, 2));
        assert_eq!(
            decrypt(&mut c, name, &ct1, AAD).await.unwrap().1,
            1,
            "old versions still decrypt"
        );
        assert_eq!(decrypt(&mut c, name, &ct2, AAD).await.unwrap().1, 2);

        // ReEncrypt moves an old ciphertext to the primary version.
        let r = c
            .re_encrypt(pb::ReEncryptRequest {
                key: name.into(),
                ciphertext: ct1.clone(),
                associated_data: AAD.to_vec(),
                destination_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.key_version, 2);

        // min_decryption_version.
        let update = |min| pb::UpdateKeyRequest {
            name: name.into(),
            rotation_period_seconds: None,
            min_decryption_version: Some(min),
            update_labels: false,
            labels: Default::default(),
        };
        c.update_key(update(2)).await.unwrap();
        expect_code(
            decrypt(&mut c, name, &ct1, AAD).await,
            Code::FailedPrecondition,
            "below its min_decryption_version 2",
        );
        expect_code(
            c.update_key(update(3)).await,
            Code::InvalidArgument,
            "min_decryption_version",
        );
        c.update_key(update(1)).await.unwrap();

        // Disable / enable.
        let kv = |v| pb::KeyVersionRequest {
            name: name.into(),
            version: v,
        };
        c.disable_key_version(kv(1)).await.unwrap();
        expect_code(
            decrypt(&mut c, name, &ct1, AAD).await,
            Code::FailedPrecondition,
            "is DISABLED",
        );
        c.enable_key_version(kv(1)).await.unwrap();
        assert!(decrypt(&mut c, name, &ct1, AAD).await.is_ok());

        // Destruction: not the primary; scheduled refuses at once; cancel; then for real.
        let schedule = |v, days| pb::ScheduleKeyVersionDestructionRequest {
            name: name.into(),
            version: v,
            pending_days: days,
        };
        expect_code(
            c.schedule_key_version_destruction(schedule(2, 1)).await,
            Code::FailedPrecondition,
            "primary",
        );
        expect_code(
            c.schedule_key_version_destruction(schedule(1, 31)).await,
            Code::InvalidArgument,
            "1 to 30 days",
        );
        let key = c
            .schedule_key_version_destruction(schedule(1, 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            key.versions[0].state,
            pb::KeyVersionState::ScheduledForDestruction as i32
        );
        // Default window: 7 "days" (seconds here).
        assert!(key.versions[0].destroy_time >= key.versions[0].create_time + 7);
        expect_code(
            decrypt(&mut c, name, &ct1, AAD).await,
            Code::FailedPrecondition,
            "SCHEDULED_FOR_DESTRUCTION",
        );
        let key = c
            .cancel_key_version_destruction(kv(1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(key.versions[0].state, pb::KeyVersionState::Disabled as i32);
        c.enable_key_version(kv(1)).await.unwrap();
        c.schedule_key_version_destruction(schedule(1, 1))
            .await
            .unwrap();
    }
    let hsm_objects = hsm.count("kms/");
    // The maintenance task destroys both after a "day" (1 s here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let states: Vec<i32> = futures_states(&mut c, &["rot-sw", "rot-hsm"]).await;
        if states
            .iter()
            .all(|s| *s == pb::KeyVersionState::Destroyed as i32)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not destroyed: {states:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        hsm.count("kms/"),
        hsm_objects - 1,
        "the HSM object of rot-hsm v1 is gone"
    );
    let kv = |n: &str| pb::KeyVersionRequest {
        name: n.into(),
        version: 1,
    };
    expect_code(
        c.enable_key_version(kv("rot-sw")).await,
        Code::FailedPrecondition,
        "destroyed",
    );

    // A restart: sealed, then every key and version as before.
    let (ct_sw, _) = encrypt(&mut c, "rot-sw", PLAINTEXT, AAD).await;
    create(
        &server,
        &mut c,
        "signer",
        pb::Algorithm::Ed25519,
        pb::ProtectionLevel::Hsm,
    )
    .await;
    let (sig, _) = sign(&mut c, "signer", b"m", pb::SignatureFormat::Default).await;
    drop(c);
    server.kill9();
    // In the store: the destroyed SOFTWARE version keeps neither its salt (from which, with
    // the root key, its secret is derived) nor any material; version 2 keeps its salt.
    let stored = softhsm_tests::store_get(&hsm.path().join("kms.redb"), "keys", "rot-sw");
    let sealed: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    let meta: serde_json::Value = serde_json::from_str(sealed["record"].as_str().unwrap()).unwrap();
    let version = |n: u64| {
        meta["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == n)
            .unwrap_or_else(|| panic!("no version {n} in {meta}"))
            .clone()
    };
    let (v1, v2) = (version(1), version(2));
    assert!(
        v1.get("salt").is_none() && v1.get("material").is_none(),
        "{v1}"
    );
    assert!(v2["salt"].as_str().is_some_and(|s| !s.is_empty()), "{v2}");
    let server = hsm.try_start(&config, &[]).unwrap();
    let mut c = server.keys().await;
    expect_code(
        encrypt_raw(&mut c, "rot-sw").await,
        Code::Unavailable,
        "sealed",
    );
    server.unseal_with(&shares);
    // After the restart, what version 1 encrypted no longer decrypts, under either key.
    for (name, ct) in &made_by_v1 {
        expect_code(
            decrypt(&mut c, name, ct, AAD).await,
            Code::FailedPrecondition,
            "is DESTROYED",
        );
    }
    assert_eq!(
        decrypt(&mut c, "rot-sw", &ct_sw, AAD).await.unwrap(),
        (PLAINTEXT.to_vec(), 2)
    );
    assert!(verify(&mut c, "signer", 1, b"m", &sig).await);
    let key = c
        .get_key(pb::GetKeyRequest {
            name: "rot-hsm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.versions[0].state, pb::KeyVersionState::Destroyed as i32);
    assert_eq!(key.primary_version, 2);
}

async fn futures_states(c: &mut Client, names: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for n in names {
        let k = c
            .get_key(pb::GetKeyRequest { name: (*n).into() })
            .await
            .unwrap()
            .into_inner();
        out.push(k.versions[0].state);
    }
    out
}

async fn encrypt_raw(c: &mut Client, key: &str) -> Result<pb::EncryptResponse, tonic::Status> {
    c.encrypt(pb::EncryptRequest {
        key: key.into(),
        plaintext: b"x".to_vec(),
        associated_data: vec![],
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_and_the_nonce_budget() {
    let hsm = TestHsm::new("kms-autorot");
    let config = keyring_config(
        &hsm,
        "[keyring]\nmax_messages_per_version = 8\nmaintenance_interval_seconds = 1\n",
    );
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;

    // The nonce budget: 8 per version, rotation at 6.
    create(
        &server,
        &mut c,
        "budget",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    let mut versions = Vec::new();
    let mut cts = Vec::new();
    for _ in 0..14 {
        let (ct, v) = encrypt(&mut c, "budget", PLAINTEXT, b"").await;
        versions.push(v);
        cts.push(ct);
    }
    assert_eq!(&versions[..6], &[1; 6], "{versions:?}");
    assert!(
        versions[6..].iter().all(|v| *v >= 2),
        "rotated before the budget ran out: {versions:?}"
    );
    assert!(versions.iter().all(|v| *v <= 3), "{versions:?}");
    for ct in &cts {
        assert_eq!(
            decrypt(&mut c, "budget", ct, b"").await.unwrap().0,
            PLAINTEXT
        );
    }
    // Counts survive a crash: after kill -9 the version does not start its budget again.
    let before = c
        .get_key(pb::GetKeyRequest {
            name: "budget".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .primary_version;
    drop(c);
    server.kill9();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    let mut after = Vec::new();
    for _ in 0..8 {
        after.push(encrypt(&mut c, "budget", PLAINTEXT, b"").await.1);
    }
    // With a budget of 8 the reservations are one message each: the version in force has
    // exactly 6 - (its messages before the crash) left before it rotates. A count reset by
    // the crash would give it 6 again.
    let used = versions.iter().filter(|v| **v == before).count();
    assert!(
        (1..6).contains(&used),
        "the version in force must have used part of its budget: {versions:?}"
    );
    let old = after.iter().take_while(|v| **v == before).count();
    assert_eq!(
        old,
        6 - used,
        "the count survived the crash: {after:?} after {versions:?}"
    );
    assert!(after[old..].iter().all(|v| *v == before + 1), "{after:?}");

    // A rotation period: the maintenance task rotates, and the schedule is stored.
    let key = c
        .create_key(pb::CreateKeyRequest {
            name: "periodic".into(),
            algorithm: pb::Algorithm::HmacSha256 as i32,
            protection_level: 0,
            rotation_period_seconds: 1,
            labels: Default::default(),
            origin: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(key.next_rotation_time > 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let k = c
            .get_key(pb::GetKeyRequest {
                name: "periodic".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if k.primary_version >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic rotation: v{}",
            k.primary_version
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Turning it off.
    let k = c
        .update_key(pb::UpdateKeyRequest {
            name: "periodic".into(),
            rotation_period_seconds: Some(0),
            min_decryption_version: None,
            update_labels: true,
            labels: [("a".to_owned(), "b".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.rotation_period_seconds, 0);
    assert_eq!(k.next_rotation_time, 0);
    assert_eq!(k.labels["a"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_typed_errors() {
    let hsm = TestHsm::new("kms-badinput");
    let (server, _) = start_unsealed(&hsm, &keyring_config(&hsm, ""));
    let mut c = server.keys().await;
    create(
        &server,
        &mut c,
        "enc",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    create(
        &server,
        &mut c,
        "sig",
        pb::Algorithm::EcdsaP256Sha256,
        pb::ProtectionLevel::Software,
    )
    .await;

    let new = |name: &str, alg: i32| pb::CreateKeyRequest {
        name: name.into(),
        algorithm: alg,
        protection_level: 0,
        rotation_period_seconds: 0,
        labels: Default::default(),
        origin: 0,
    };
    expect_code(
        c.create_key(new("enc", 1)).await,
        Code::AlreadyExists,
        "already exists",
    );
    expect_code(
        c.create_key(new("a b", 1)).await,
        Code::InvalidArgument,
        "invalid key name",
    );
    expect_code(
        c.create_key(new(&"x".repeat(129), 1)).await,
        Code::InvalidArgument,
        "invalid key name",
    );
    expect_code(
        c.create_key(new("k", 0)).await,
        Code::InvalidArgument,
        "algorithm must be",
    );
    expect_code(
        c.create_key(new("k", 99)).await,
        Code::InvalidArgument,
        "algorithm must be",
    );
    let mut bad_labels = new("k", 1);
    bad_labels.labels.insert("bad key!".into(), "v".into());
    expect_code(
        c.create_key(bad_labels).await,
        Code::InvalidArgument,
        "invalid labels",
    );
    let mut bad_protection = new("k", 1);
    bad_protection.protection_level = 7;
    expect_code(
        c.create_key(bad_protection).await,
        Code::InvalidArgument,
        "protection_level",
    );

    // No grant on an unknown key: refused without saying whether it exists.
    expect_code(
        encrypt_raw(&mut c, "nope").await,
        Code::PermissionDenied,
        "has no grant to encrypt with key \"nope\"",
    );
    expect_code(
        c.get_key(pb::GetKeyRequest {
            name: "nope".into(),
        })
        .await,
        Code::NotFound,
        "no key",
    );
    expect_code(
        encrypt_raw(&mut c, "sig").await,
        Code::FailedPrecondition,
        "is for SIGN_VERIFY, not for encryption",
    );
    let r = c
        .sign(pb::SignRequest {
            key: "enc".into(),
            input: Some(pb::sign_request::Input::Message(b"m".to_vec())),
            format: 0,
        })
        .await;
    expect_code(
        r,
        Code::FailedPrecondition,
        "is for ENCRYPT_DECRYPT, not for signing",
    );
    let big = c
        .encrypt(pb::EncryptRequest {
            key: "enc".into(),
            plaintext: vec![0; 64 * 1024 + 1],
            associated_data: vec![],
        })
        .await;
    expect_code(big, Code::InvalidArgument, "GenerateDataKey");
    let r = c
        .sign(pb::SignRequest {
            key: "sig".into(),
            input: Some(pb::sign_request::Input::Digest(vec![0; 31])),
            format: 0,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "32 bytes");
    let r = c
        .sign(pb::SignRequest {
            key: "sig".into(),
            input: None,
            format: 0,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "message or its digest");
    let r = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "enc".into(),
            length_bytes: 65,
            associated_data: vec![],
        })
        .await;
    expect_code(r, Code::InvalidArgument, "length_bytes");
    let kv = pb::KeyVersionRequest {
        name: "enc".into(),
        version: 9,
    };
    expect_code(
        c.disable_key_version(kv).await,
        Code::NotFound,
        "has no version 9",
    );
    // A ciphertext naming a version that does not exist is just "decryption failed".
    let (mut ct, _) = encrypt(&mut c, "enc", b"x", b"").await;
    ct[4] = 9;
    expect_code(
        decrypt(&mut c, "enc", &ct, b"").await,
        Code::InvalidArgument,
        "decryption failed",
    );

    // Batches: one bad item does not fail the batch.
    let (good, _) = encrypt(&mut c, "enc", b"one", b"").await;
    let mut bad = good.clone();
    bad[20] ^= 1;
    let r = c
        .batch_decrypt(pb::BatchDecryptRequest {
            key: "enc".into(),
            items: vec![
                pb::DecryptItem {
                    ciphertext: good.clone(),
                    associated_data: vec![],
                },
                pb::DecryptItem {
                    ciphertext: bad,
                    associated_data: vec![],
                },
                pb::DecryptItem {
                    ciphertext: good,
                    associated_data: b"wrong".to_vec(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 3);
    match &r.results[0].result {
        Some(pb::batch_decrypt_result::Result::Ok(ok)) => assert_eq!(ok.plaintext, b"one"),
        other => panic!("{other:?}"),
    }
    for i in [1, 2] {
        match &r.results[i].result {
            Some(pb::batch_decrypt_result::Result::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.message, "decryption failed");
            }
            other => panic!("{other:?}"),
        }
    }
    let r = c
        .batch_encrypt(pb::BatchEncryptRequest {
            key: "enc".into(),
            items: vec![
                pb::EncryptItem {
                    plaintext: b"a".to_vec(),
                    associated_data: vec![],
                },
                pb::EncryptItem {
                    plaintext: vec![0; 64 * 1024 + 1],
                    associated_data: vec![],
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.results[0].result,
        Some(pb::batch_encrypt_result::Result::Ok(_))
    ));
    assert!(
        matches!(&r.results[1].result, Some(pb::batch_encrypt_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
    let r = c
        .batch_sign(pb::BatchSignRequest {
            key: "sig".into(),
            items: vec![
                pb::SignItem {
                    input: Some(pb::sign_item::Input::Message(b"a".to_vec())),
                },
                pb::SignItem {
                    input: Some(pb::sign_item::Input::Digest(vec![1; 3])),
                },
                pb::SignItem { input: None },
            ],
            format: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.results[0].result,
        Some(pb::batch_sign_result::Result::Ok(_))
    ));
    assert!(matches!(
        r.results[1].result,
        Some(pb::batch_sign_result::Result::Error(_))
    ));
    assert!(matches!(
        r.results[2].result,
        Some(pb::batch_sign_result::Result::Error(_))
    ));
    let r = c
        .batch_encrypt(pb::BatchEncryptRequest {
            key: "enc".into(),
            items: vec![],
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no items");
    let r = c
        .batch_encrypt(pb::BatchEncryptRequest {
            key: "enc".into(),
            items: vec![
                pb::EncryptItem {
                    plaintext: vec![],
                    associated_data: vec![]
                };
                1001
            ],
        })
        .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "1001 items, more than the 1000 allowed",
    );

    // A sealed server refuses every key call.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    expect_code(
        encrypt_raw(&mut c, "enc").await,
        Code::Unavailable,
        "sealed",
    );
    expect_code(
        c.get_key(pb::GetKeyRequest { name: "enc".into() }).await,
        Code::Unavailable,
        "sealed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_edited_on_disk_is_refused() {
    let hsm = TestHsm::new("kms-tamper");
    let config = keyring_config(&hsm, "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    create(
        &server,
        &mut c,
        "victim",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    create(
        &server,
        &mut c,
        "bystander",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    c.rotate_key(pb::RotateKeyRequest {
        name: "victim".into(),
    })
    .await
    .unwrap();
    let (ct, _) = encrypt(&mut c, "bystander", PLAINTEXT, b"").await;
    drop(c);
    server.terminate();

    // Someone with write access to the disk lowers the primary version.
    let store = hsm.path().join("kms.redb");
    softhsm_tests::store_replace(
        &store,
        "keys",
        "victim",
        "\\\"primary\\\":2",
        "\\\"primary\\\":1",
    );

    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    expect_code(
        c.get_key(pb::GetKeyRequest {
            name: "victim".into(),
        })
        .await,
        Code::DataLoss,
        "failed authentication",
    );
    expect_code(
        encrypt_raw(&mut c, "victim").await,
        Code::DataLoss,
        "failed authentication",
    );
    // The name stays taken; the other key is unaffected.
    let r = c
        .create_key(pb::CreateKeyRequest {
            name: "victim".into(),
            algorithm: 1,
            protection_level: 0,
            rotation_period_seconds: 0,
            labels: Default::default(),
            origin: 0,
        })
        .await;
    expect_code(r, Code::AlreadyExists, "already exists");
    assert_eq!(
        decrypt(&mut c, "bystander", &ct, b"").await.unwrap().0,
        PLAINTEXT
    );
    assert!(hsm.logs().contains("failed authentication"));
    // The key is refused at its first use (above); the verification walk that follows the
    // unseal reports it too, by name in the log and in a metric, whether used or not.
    let t0 = std::time::Instant::now();
    while !hsm.logs().contains("keyring verification walk done") {
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "no walk");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let logs = hsm.logs();
    assert!(
        logs.contains("key=victim") && logs.contains("found by the keyring's verification walk"),
        "{logs}"
    );
    assert!(logs.contains("tampered_keys=1"), "{logs}");
    let (code, metrics) = softhsm_tests::http_get(server.metrics.as_deref().unwrap());
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kms_keyring_tampered_records 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_encrypts_signs_and_manages_keys() {
    let hsm = TestHsm::new("kms-cli");
    let (server, _) = start_unsealed(&hsm, &keyring_config(&hsm, ""));
    let dir = hsm.path();
    let out = server.kms(
        &[
            "key",
            "create",
            "files",
            "--algorithm",
            "aes-256-gcm",
            "--label",
            "env=prod",
            "--json",
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["algorithm"], "AES_256_GCM");
    assert_eq!(out.json()["labels"]["env"], "prod");
    // Administering a key does not allow using it: the admin needs a grant too.
    let out = server.kms(&["encrypt", "--key", "files"], "x");
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:?}");
    let admin = server.admin.principal.clone();
    let out = server.kms(
        &[
            "grant",
            "create",
            "files",
            &admin,
            "--operations",
            "encrypt,decrypt,generate-data-key",
            "--json",
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["principal"], admin.as_str());

    let out = server.kms(
        &["encrypt", "--key", "files", "--aad", "ctx", "--base64"],
        "hello from the cli",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let ct_path = dir.join("ct.b64");
    std::fs::write(&ct_path, &out.stdout).unwrap();
    let out = server.kms(
        &[
            "decrypt",
            "--key",
            "files",
            "--aad",
            "ctx",
            "--base64",
            "--in",
            ct_path.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let pt = data_encoding::BASE64
        .decode(out.stdout.trim().as_bytes())
        .unwrap();
    assert_eq!(pt, b"hello from the cli");
    let out = server.kms(
        &[
            "decrypt",
            "--key",
            "files",
            "--aad",
            "other",
            "--base64",
            "--in",
            ct_path.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("INVALID_ARGUMENT: decryption failed"),
        "{out:?}"
    );

    assert_eq!(server.kms(&["key", "rotate", "files"], "").code, Some(0));
    let out = server.kms(&["key", "get", "files", "--json"], "");
    assert_eq!(out.json()["primary_version"], 2);
    let out = server.kms(&["key", "update", "files", "--rotation-period", "90d"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        server.kms(&["key", "get", "files", "--json"], "").json()["rotation_period_seconds"],
        90 * 86400
    );
    // Shown the way it was given, not as "2months 29days 2h 52m 48s".
    let shown = server.kms(&["key", "get", "files"], "");
    assert!(
        shown.stdout.contains("Rotation period         90d\n"),
        "{}",
        shown.stdout
    );

    let out = server.kms(
        &[
            "key",
            "create",
            "sigs",
            "--algorithm",
            "ed25519",
            "--protection",
            "hsm",
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = server.kms(
        &[
            "grant",
            "create",
            "sigs",
            &admin,
            "--operations",
            "sign,verify,get-public-key",
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let sig_path = dir.join("cli.sig");
    let out = server.kms(
        &["sign", "--key", "sigs", "--out", sig_path.to_str().unwrap()],
        "document",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = server.kms(
        &[
            "verify",
            "--key",
            "sigs",
            "--signature",
            sig_path.to_str().unwrap(),
        ],
        "document",
    );
    assert_eq!((out.code, out.stdout.trim()), (Some(0), "valid"), "{out:?}");
    let out = server.kms(
        &[
            "verify",
            "--key",
            "sigs",
            "--signature",
            sig_path.to_str().unwrap(),
        ],
        "tampered",
    );
    assert_eq!(
        (out.code, out.stdout.trim()),
        (Some(3), "invalid"),
        "{out:?}"
    );
    let pem = server.kms(&["public-key", "--key", "sigs"], "");
    assert!(openssl_verifies(
        dir,
        &pem.stdout,
        b"document",
        &std::fs::read(&sig_path).unwrap(),
        None
    ));

    // Over 64 KiB: Ed25519 signs the message itself, so the CLI says why it cannot...
    let large = "x".repeat(200 * 1024);
    let out = server.kms(&["sign", "--key", "sigs"], &large);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(
            "the input is 204800 bytes: an Ed25519 key signs the message itself, at most 65536 bytes"
        ),
        "{out:?}"
    );
    // ...and an ECDSA key signs the digest the CLI makes (SHA-256; SHA-384 for P-384, which
    // the CLI learns from the server's refusal of a SHA-256 digest), which openssl verifies
    // against the whole document.
    for (key, algorithm, hash) in [
        ("big-sigs", "ecdsa-p256-sha256", "sha256"),
        ("big-sigs-384", "ecdsa-p384-sha384", "sha384"),
    ] {
        for args in [
            vec!["key", "create", key, "--algorithm", algorithm],
            vec![
                "grant",
                "create",
                key,
                &admin,
                "--operations",
                "sign,verify,get-public-key",
            ],
        ] {
            let out = server.kms(&args, "");
            assert_eq!(out.code, Some(0), "{out:?}");
        }
        let big_sig = dir.join(format!("{key}.sig"));
        let out = server.kms(
            &["sign", "--key", key, "--out", big_sig.to_str().unwrap()],
            &large,
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        let verify_big = |doc: &str| {
            server.kms(
                &[
                    "verify",
                    "--key",
                    key,
                    "--signature",
                    big_sig.to_str().unwrap(),
                ],
                doc,
            )
        };
        assert_eq!(verify_big(&large).code, Some(0));
        assert_eq!(verify_big(&format!("{large}!")).code, Some(3));
        let pem = server.kms(&["public-key", "--key", key], "");
        assert!(openssl_verifies(
            dir,
            &pem.stdout,
            large.as_bytes(),
            &std::fs::read(&big_sig).unwrap(),
            Some(hash)
        ));
    }

    let out = server.kms(&["datakey", "--key", "files"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["key_version"], 2);
    let list = server.kms(&["key", "list", "--json"], "").json();
    assert_eq!(list.as_array().unwrap().len(), 4);
    // A key without a grant looks the same whether it exists or not.
    let out = server.kms(&["encrypt", "--key", "nope"], "x");
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains(&format!(
            "PERMISSION_DENIED: permission denied: \"{admin}\" has no grant to encrypt with key \"nope\""
        )),
        "{out:?}"
    );
    let out = server.kms(&["key", "get", "nope"], "");
    assert!(
        out.stderr.contains("NOT_FOUND: no key named \"nope\""),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_key_survives_kill_9() {
    let hsm = TestHsm::new("kms-keykill");
    let config = keyring_config(&hsm, "");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    hsm_key_at_version_2(&server, &mut c, "durable").await;
    let (ct, _) = encrypt(&mut c, "durable", PLAINTEXT, b"").await;
    drop(c);
    server.kill9();
    let server: Server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    assert_eq!(
        decrypt(&mut c, "durable", &ct, b"").await.unwrap(),
        (PLAINTEXT.to_vec(), 2)
    );
}

/// Creates an HSM AES key (with a grant to the admin) and rotates it once.
async fn hsm_key_at_version_2(server: &Server, c: &mut Client, name: &str) {
    create(
        server,
        c,
        name,
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Hsm,
    )
    .await;
    c.rotate_key(pb::RotateKeyRequest { name: name.into() })
        .await
        .unwrap();
}

/// A kill -9 between making a version's HSM object and committing the version leaves an
/// object with the label the next version takes. kms told objects apart by label only,
/// first match, so such an orphan could be used for that version after a restart
/// (ciphertexts that no longer decrypt). Each version now records its object's random
/// CKA_ID, exactly one object must answer, and orphans are swept at unseal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_hsm_object_is_never_used_and_is_swept() {
    let hsm = TestHsm::new("kms-orphan");
    let config = keyring_config(&hsm, "");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    create(
        &server,
        &mut c,
        "vault",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Hsm,
    )
    .await;
    let labels = hsm.labels("kms/");
    assert_eq!(labels.len(), 1, "{labels:?}");
    let v1 = labels[0].clone();
    let base = v1.strip_suffix("/1").unwrap().to_owned();
    // What a crash would have left: objects with the labels versions 2 and 3 will take,
    // made by this instance (its identity in their CKA_ID, as every object kms makes); and
    // one for version 2 with no CKA_ID, which no kms made and none destroys.
    let instance = server.kms(&["operator", "status", "--json"], "").json()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (v, random) in [(2, "01"), (3, "02")] {
        let id = format!("6b6d7331{instance}{}", random.repeat(16));
        let out = hsm.tool(&["orphan-id"], &[&format!("{base}/{v}"), &id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // kms marks an object pending before it makes it: a crash leaves both.
        assert!(
            hsm.tool(&["marker"], &[&format!("kms-pending/{id}")])
                .status
                .success()
        );
    }
    let out = hsm.tool(&["orphan"], &[&format!("{base}/2")]);
    assert!(out.status.success());
    c.rotate_key(pb::RotateKeyRequest {
        name: "vault".into(),
    })
    .await
    .unwrap();
    let (ct, version) = encrypt(&mut c, "vault", PLAINTEXT, AAD).await;
    assert_eq!(version, 2);
    drop(c);
    assert!(server.terminate().success());

    // After a restart, version 2 is its own object (not the orphan), and the orphan of
    // version 2 is swept; the one of version 3, not yet committed, is kept.
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    for _ in 0..3 {
        let (pt, v) = decrypt(&mut c, "vault", &ct, AAD).await.unwrap();
        assert_eq!((pt.as_slice(), v), (PLAINTEXT, 2));
    }
    // Version 2's own object, and the one without an id (never kms's to destroy).
    assert_eq!(hsm.labels(&format!("{base}/2")).len(), 2);
    assert_eq!(hsm.labels(&format!("{base}/3")).len(), 1);
    let logs = hsm.logs();
    assert!(logs.contains("destroyed an orphan HSM object"), "{logs}");
    assert!(logs.contains("pending=1"), "{logs}");
    // Rotating to version 3 uses a fresh object, and the next unseal sweeps that orphan.
    c.rotate_key(pb::RotateKeyRequest {
        name: "vault".into(),
    })
    .await
    .unwrap();
    let (ct3, _) = encrypt(&mut c, "vault", PLAINTEXT, AAD).await;
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    server.unseal_with(&shares);
    assert_eq!(hsm.labels(&format!("{base}/3")).len(), 1);
    let mut c = server.keys().await;
    assert_eq!(decrypt(&mut c, "vault", &ct3, AAD).await.unwrap().1, 3);
    assert_eq!(decrypt(&mut c, "vault", &ct, AAD).await.unwrap().1, 2);
}

/// A key's material is made before the keyring's admin lock is taken (an RSA-4096 key
/// takes the token seconds, and every other change would wait), so changes race: creates
/// of one name, rotations of one key. Exactly one create wins; the objects made for the
/// losers, and for a version number another rotation took first, are destroyed; each
/// committed version has exactly its own objects in the token; after a kill -9 and a
/// restart the newest version still signs and verifies and nothing is left to sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_and_rotations_leave_one_hsm_object_per_version() {
    let hsm = TestHsm::new("kms-race");
    let config = keyring_config(&hsm, "");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let request = |name: &str| pb::CreateKeyRequest {
        name: name.into(),
        algorithm: pb::Algorithm::RsaSignPss2048Sha256 as i32,
        protection_level: pb::ProtectionLevel::Hsm as i32,
        ..Default::default()
    };
    // How many token objects one version of such a key has (its key pair).
    let before = hsm.count("kms/");
    let mut c = server.keys().await;
    c.create_key(request("calm")).await.unwrap();
    let calm = hsm.labels("kms/");
    let per_version = calm.len() - before;
    assert!(per_version >= 1);

    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut c = server.keys().await;
        let req = request("raced");
        calls.push(tokio::spawn(async move { c.create_key(req).await }));
    }
    let mut won = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(key) => won.push(key.into_inner()),
            Err(s) => assert_eq!(s.code(), Code::AlreadyExists, "{s:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one create of a name wins");
    assert_eq!(won[0].name, "raced");
    assert_eq!(hsm.count("kms/"), before + 2 * per_version);
    // The winner's objects: labelled kms/KEY_ID/1.
    let base = hsm
        .labels("kms/")
        .into_iter()
        .find(|l| !calm.contains(l))
        .and_then(|l| l.strip_suffix("/1").map(str::to_owned))
        .unwrap();
    server.grant_all("raced").await;

    let mut calls = Vec::new();
    for _ in 0..5 {
        let mut c = server.keys().await;
        calls.push(tokio::spawn(async move {
            c.rotate_key(pb::RotateKeyRequest {
                name: "raced".into(),
            })
            .await
        }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let key = c
        .get_key(pb::GetKeyRequest {
            name: "raced".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.primary_version, 6);
    assert_eq!(key.versions.len(), 6);
    for v in 1..=6 {
        assert_eq!(
            hsm.labels(&format!("{base}/{v}")).len(),
            per_version,
            "version {v} has its own objects and no other"
        );
    }
    assert_eq!(hsm.count("kms/"), before + 7 * per_version);
    let (sig6, v) = sign(&mut c, "raced", PLAINTEXT, pb::SignatureFormat::Default).await;
    assert_eq!(v, 6);
    drop(c);

    server.kill9();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    assert!(verify(&mut c, "raced", 6, PLAINTEXT, &sig6).await);
    let (sig, v) = sign(&mut c, "raced", PLAINTEXT, pb::SignatureFormat::Default).await;
    assert_eq!(v, 6);
    assert!(verify(&mut c, "raced", 6, PLAINTEXT, &sig).await);
    assert_eq!(hsm.count("kms/"), before + 7 * per_version);
    let logs = hsm.logs();
    assert!(!logs.contains("orphan HSM object"), "{logs}");
    assert!(
        !logs.contains("no committed key version names yet"),
        "{logs}"
    );
}

/// Makes every directory under `dir` immutable (`chattr +i`: not even root may remove a
/// file from it) until dropped: the token then cannot delete an object's file.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &std::path::Path, on: bool) {
        let out = Command::new("chattr")
            .arg("-R")
            .arg(if on { "+i" } else { "-i" })
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chattr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        Immutable::set(&self.0, false);
    }
}

/// The token refuses to destroy an HSM version's object when its time comes: the version
/// stays due (never recorded destroyed while the material exists), cannot be cancelled, and
/// the maintenance task tries again until the token confirms. Runs as root, as CI does:
/// it makes the token directory immutable for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destruction_the_token_refuses_is_retried_until_it_is_confirmed() {
    let hsm = TestHsm::new("kms-retry");
    let config = keyring_config(
        &hsm,
        "[keyring]\ntesting_day_seconds = 1\nmaintenance_interval_seconds = 1\n",
    );
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    hsm_key_at_version_2(&server, &mut c, "doomed").await;
    let labels = hsm.labels("kms/");
    let v1 = labels.iter().find(|l| l.ends_with("/1")).unwrap().clone();
    let tokens = hsm.path().join("softhsm");
    let guard = Immutable(tokens.clone());
    Immutable::set(&tokens, true);
    c.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
        name: "doomed".into(),
        version: 1,
        pending_days: 1,
    })
    .await
    .unwrap();
    // Due after 1 s; the maintenance runs every second and fails: wait for its failures
    // (two, so that one whole run after the first failed too), not for a fixed time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while hsm
        .logs()
        .matches("destruction failed: the version stays due")
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "{}", hsm.logs());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        version_state(&mut c, "doomed", 1).await,
        pb::KeyVersionState::ScheduledForDestruction as i32
    );
    assert_eq!(hsm.labels(&v1).len(), 1, "the object is still there");
    assert!(
        hsm.logs()
            .contains("destruction failed: the version stays due")
    );
    expect_code(
        c.cancel_key_version_destruction(pb::KeyVersionRequest {
            name: "doomed".into(),
            version: 1,
        })
        .await,
        Code::FailedPrecondition,
        "can no longer be cancelled",
    );
    // SoftHSM hides an object from the process after a failed destroy, though its file is
    // still in the token: "gone" is not believed in this process; the version stays due.
    assert!(
        hsm.logs()
            .contains("cannot be confirmed gone before the server restarts"),
        "{}",
        hsm.logs()
    );
    drop(guard);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        version_state(&mut c, "doomed", 1).await,
        pb::KeyVersionState::ScheduledForDestruction as i32
    );
    // After a restart (a fresh view of the token), the next run destroys it for good.
    drop(c);
    assert!(server.terminate().success());
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while version_state(&mut c, "doomed", 1).await != pb::KeyVersionState::Destroyed as i32 {
        assert!(std::time::Instant::now() < deadline, "not retried");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(hsm.labels(&v1).is_empty(), "destroyed and gone");
}

/// The keyring holds at most `[keyring] cache_keys` keys (and as many keys' grant lists)
/// prepared in memory: with more keys than that, each is read again at its next use and
/// serves as before; a revocation holds whether the key's grants were cached or not; the
/// list of keys pages through the store; and after a restart (nothing read at the unseal)
/// every key answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_keys_than_the_cache_holds() {
    let hsm = TestHsm::new("kms-small-cache");
    let config = keyring_config(&hsm, "[keyring]\ncache_keys = 16\n");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    let names: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    let mut grants = Vec::new();
    for name in &names {
        c.create_key(pb::CreateKeyRequest {
            name: name.clone(),
            algorithm: pb::Algorithm::Aes256Gcm as i32,
            protection_level: pb::ProtectionLevel::Software as i32,
            rotation_period_seconds: 0,
            labels: Default::default(),
            origin: 0,
        })
        .await
        .unwrap();
        grants.push(server.grant_all(name).await);
    }
    let mut cts = Vec::new();
    for name in &names {
        cts.push(encrypt(&mut c, name, PLAINTEXT, AAD).await.0);
    }
    // Every key was evicted at least once since it encrypted.
    for (name, ct) in names.iter().zip(&cts) {
        assert_eq!(decrypt(&mut c, name, ct, AAD).await.unwrap().0, PLAINTEXT);
    }
    // k00's grant revoked while its grants are cached, k01's while they are not.
    let mut a = server.access().await;
    encrypt(&mut c, "k00", PLAINTEXT, AAD).await;
    for id in &grants[..2] {
        a.revoke_grant(pb::RevokeGrantRequest { id: id.clone() })
            .await
            .unwrap();
    }
    for name in ["k00", "k01"] {
        expect_code(encrypt_raw(&mut c, name).await, Code::PermissionDenied, "");
    }
    // The list pages through every key in name order.
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_keys(pb::ListKeysRequest {
                page_size: 15,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.keys.into_iter().map(|k| k.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, names);
    drop((c, a));
    server.terminate();

    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    for (name, ct) in names.iter().zip(&cts).skip(2) {
        assert_eq!(decrypt(&mut c, name, ct, AAD).await.unwrap().0, PLAINTEXT);
    }
    for name in ["k00", "k01"] {
        expect_code(encrypt_raw(&mut c, name).await, Code::PermissionDenied, "");
    }
    let logs = hsm.logs();
    assert!(logs.contains("keyring loaded: no key read yet"), "{logs}");
}

/// A rotation that comes due while the server is down is made after the unseal, though no
/// key is read at the unseal: the verification walk finds it due, without any call on the
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_due_while_down_is_made_after_the_unseal() {
    let hsm = TestHsm::new("kms-due-walk");
    let config = keyring_config(&hsm, "[keyring]\nmaintenance_interval_seconds = 1\n");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    c.create_key(pb::CreateKeyRequest {
        name: "rotating".into(),
        algorithm: pb::Algorithm::Aes256Gcm as i32,
        protection_level: pb::ProtectionLevel::Software as i32,
        rotation_period_seconds: 3,
        labels: Default::default(),
        origin: 0,
    })
    .await
    .unwrap();
    drop(c);
    server.terminate();
    let rotated_before = hsm.logs().matches("key rotated").count();
    std::thread::sleep(std::time::Duration::from_secs(4));

    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let t0 = std::time::Instant::now();
    while hsm.logs().matches("key rotated").count() == rotated_before {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the due rotation was never made: {}",
            hsm.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut c = server.keys().await;
    let key = c
        .get_key(pb::GetKeyRequest {
            name: "rotating".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(key.primary_version >= 2, "{key:?}");
}
