//! The speed targets, each against its baseline in the same run:
//!
//! - `Encrypt` of 1 KiB with a SOFTWARE key through the keyring vs `aes-gcm` called
//!   directly on the same data (both make a fresh random nonce per message).
//! - `Sign` (ECDSA P-256, SHA-256 of a 1 KiB message) with an HSM key through the keyring
//!   vs cryptoki's `C_Sign` on a key of the same token, same thread; and `C_Sign` from 16
//!   threads at once, the baseline of the gRPC path at concurrency 16 (run it pinned to the
//!   server's core: `taskset -c 0 cargo bench -p kms-benches --bench keyring -- sign`).
//!
//! - RSA-2048 (PSS signature of a 1 KiB message, OAEP decryption of 32 bytes), SOFTWARE keys
//!   through the keyring vs the `rsa` crate called directly with a key of the same size, and
//!   HSM keys through the keyring vs cryptoki on the very key object kms uses (for OAEP on
//!   SoftHSM: the raw `CKM_RSA_X_509` operation kms asks of it, so the difference is kms's
//!   own OAEP decoding and everything around it).
//!
//! Run: `cargo bench -p kms-benches --bench keyring`. Needs SoftHSM. The bench runs itself
//! again with a private `SOFTHSM2_CONF` (a process must not change its own environment).
//! Results: docs/benchmarks.md.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use criterion::{Criterion, Throughput};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use kms::audit::{AuditLog, CheckpointPolicy, Signer};
use kms::hsm::Hsm;
use kms::keyring::material::{SignInput, SignatureEncoding};
use kms::keyring::model::{Algorithm, Protection};
use kms::keyring::{Keyring, NewKey, Settings, SystemJournal};
use kms::store::RedbStore;
use kms_pkcs11_conf::softhsm::{self, SoftHsmDir};
use kms_pkcs11_conf::{HsmConfig, PinSource};
use secrecy::ExposeSecret;
use sha2::Digest;

fn main() {
    if std::env::var_os(softhsm::CONF_ENV).is_none() {
        let dir = tempfile::tempdir().unwrap();
        let conf = SoftHsmDir::create(dir.path()).unwrap().conf;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env(softhsm::CONF_ENV, conf)
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}

/// Every benchmark, in one function on purpose: they share one token, one store and one
/// unsealed keyring set up here (a SoftHSM token and its keys take seconds to make), and each
/// in-process path sits next to the raw baseline it is compared with.
fn benches(c: &mut Criterion) {
    let module = kms_pkcs11_conf::find_softhsm_module().expect("SoftHSM is not installed");
    let pkcs11 = kms_pkcs11_conf::token::load(&module).unwrap();
    let pin = softhsm::random_pin().unwrap();
    let so = softhsm::random_pin().unwrap();
    let slot = softhsm::provision_token(&pkcs11, "bench", &so, &pin).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&pin_file)
            .unwrap();
        f.write_all(pin.expose_secret().as_bytes()).unwrap();
    }
    let config = HsmConfig {
        module,
        token_label: "bench".into(),
        pin_env: None,
        pin_file: Some(pin_file),
        pin_in_shares: false,
        master_key_label: "m".into(),
        sessions: 4,
    }
    .validate()
    .unwrap();
    assert_eq!(config.pin, PinSource::File(dir.path().join("pin")));
    let hsm = Arc::new(Hsm::open_with_context(pkcs11.clone(), &config).unwrap());
    let store = Arc::new(RedbStore::open(&dir.path().join("kms.redb")).unwrap());
    let mut root = [0u8; 32];
    getrandom::fill(&mut root).unwrap();
    let audit = AuditLog::open(
        store.clone(),
        Arc::new(Signer::disabled()),
        CheckpointPolicy::default(),
    )
    .unwrap();
    // What the seal sets from its record at init: the identity the keys' objects carry.
    hsm.set_ownership(kms::hsm::Ownership {
        instance: kms::hsm::InstanceId::from_hex("0123456789abcdef"),
        ..Default::default()
    });
    let keyring = Keyring::load(
        Arc::new(kms::barrier::Barrier::new(root.into())),
        hsm,
        store,
        Arc::new(audit.clone()),
        Settings::default(),
    )
    .unwrap();
    let admin = SystemJournal {
        recorder: &audit,
        operation: "CreateKey",
        version: None,
    };
    let new = |name: &str, algorithm, protection| NewKey {
        name: name.into(),
        algorithm,
        protection,
        rotation_period: None,
        labels: Default::default(),
        origin: Default::default(),
    };
    keyring
        .create_key(
            new("enc", Algorithm::Aes256Gcm, Protection::Software),
            &admin,
        )
        .unwrap();
    keyring
        .create_key(
            new("sig", Algorithm::EcdsaP256Sha256, Protection::Hsm),
            &admin,
        )
        .unwrap();

    for (name, algorithm, protection) in [
        (
            "rsa-sw",
            Algorithm::RsaSignPss2048Sha256,
            Protection::Software,
        ),
        ("rsa-hsm", Algorithm::RsaSignPss2048Sha256, Protection::Hsm),
        (
            "oaep-sw",
            Algorithm::RsaDecryptOaep2048Sha256,
            Protection::Software,
        ),
        (
            "oaep-hsm",
            Algorithm::RsaDecryptOaep2048Sha256,
            Protection::Hsm,
        ),
    ] {
        keyring
            .create_key(new(name, algorithm, protection), &admin)
            .unwrap();
    }

    let data = vec![0x5au8; 1024];
    let aad = b"tenant=bench".to_vec();
    let mut g = c.benchmark_group("encrypt 1 KiB, software key");
    g.throughput(Throughput::Bytes(1024));
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).unwrap();
    let direct = Aes256Gcm::new_from_slice(&key).unwrap();
    g.bench_function("aes-gcm directly", |b| {
        b.iter(|| {
            let mut nonce = [0u8; 12];
            getrandom::fill(&mut nonce).unwrap();
            direct
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: &data,
                        aad: &aad,
                    },
                )
                .unwrap()
        })
    });
    g.bench_function("kms keyring Encrypt", |b| {
        b.iter(|| keyring.encrypt("enc", &data, &aad).unwrap())
    });
    g.finish();

    // The baseline: C_Sign directly on the very key object kms uses (found by its label),
    // from a session of our own, with the SHA-256 the caller must do for CKM_ECDSA.
    let session = pkcs11.open_rw_session(slot).unwrap();
    session.login(UserType::User, Some(&pin)).ok();
    let key_id = keyring.get_key("sig").unwrap().key_id;
    let label = format!("kms/{key_id}/1").into_bytes();
    let found = session
        .find_objects(&[
            Attribute::Label(label),
            Attribute::Class(ObjectClass::PRIVATE_KEY),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    let private = found[0];
    let mut g = c.benchmark_group("sign ECDSA P-256, 1 KiB message, HSM key");
    g.bench_function("cryptoki C_Sign directly", |b| {
        b.iter(|| {
            let digest = sha2::Sha256::digest(&data);
            session.sign(&Mechanism::Ecdsa, private, &digest).unwrap()
        })
    });
    g.bench_function("kms keyring Sign (DER)", |b| {
        b.iter(|| {
            keyring
                .sign("sig", SignInput::Message(&data), SignatureEncoding::Der)
                .unwrap()
        })
    });
    // The gRPC path's baseline at its concurrency: 16 threads, each with its own session,
    // signing at once (run pinned, `taskset -c 0`, to compare with a server on one core).
    // Time per signature = wall time / signatures.
    g.bench_function("cryptoki C_Sign directly, 16 threads", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(16);
            let started = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..16 {
                    s.spawn(|| {
                        let session = pkcs11.open_ro_session(slot).unwrap();
                        for _ in 0..per_thread {
                            let digest = sha2::Sha256::digest(&data);
                            session.sign(&Mechanism::Ecdsa, private, &digest).unwrap();
                        }
                    });
                }
            });
            started
                .elapsed()
                .mul_f64(iters as f64 / (per_thread * 16) as f64)
        })
    });
    g.finish();

    rsa_benches(c, &keyring, &session, &data);
}

/// RSA-2048 through the keyring against its baselines (see the module's documentation).
fn rsa_benches(
    c: &mut Criterion,
    keyring: &Keyring,
    session: &cryptoki::session::Session,
    data: &[u8],
) {
    use rsa::pkcs8::DecodePublicKey as _;
    let object = |name: &str| {
        let key_id = keyring.get_key(name).unwrap().key_id;
        let found = session
            .find_objects(&[
                Attribute::Label(format!("kms/{key_id}/1").into_bytes()),
                Attribute::Class(ObjectClass::PRIVATE_KEY),
            ])
            .unwrap();
        assert_eq!(found.len(), 1, "{name}");
        found[0]
    };
    let direct = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap();

    let mut g = c.benchmark_group("sign RSA-2048 PSS, 1 KiB message");
    g.bench_function("rsa crate directly (SOFTWARE baseline)", |b| {
        b.iter(|| {
            let digest = sha2::Sha256::digest(data);
            direct
                .sign_with_rng(
                    &mut getrandom::SysRng,
                    rsa::Pss::<sha2::Sha256>::new(),
                    &digest,
                )
                .unwrap()
        })
    });
    g.bench_function("kms keyring Sign, SOFTWARE key", |b| {
        b.iter(|| {
            keyring
                .sign("rsa-sw", SignInput::Message(data), SignatureEncoding::Der)
                .unwrap()
        })
    });
    let private = object("rsa-hsm");
    let pss = Mechanism::RsaPkcsPss(PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32u64.into(),
    });
    g.bench_function("cryptoki C_Sign directly (HSM baseline)", |b| {
        b.iter(|| {
            let digest = sha2::Sha256::digest(data);
            session.sign(&pss, private, &digest).unwrap()
        })
    });
    g.bench_function("kms keyring Sign, HSM key", |b| {
        b.iter(|| {
            keyring
                .sign("rsa-hsm", SignInput::Message(data), SignatureEncoding::Der)
                .unwrap()
        })
    });
    g.finish();

    // Ciphertexts of a 32-byte data key, made with each key's public half.
    let secret = [0x42u8; 32];
    let encrypt_to = |pem: &str| {
        rsa::PublicKey::from_public_key_pem(pem)
            .unwrap()
            .encrypt(
                &mut getrandom::SysRng,
                rsa::Oaep::<sha2::Sha256>::new(),
                &secret,
            )
            .unwrap()
    };
    let mut g = c.benchmark_group("decrypt RSA-2048 OAEP, 32-byte plaintext");
    let direct_ct = encrypt_to(
        &rsa::pkcs8::EncodePublicKey::to_public_key_pem(
            &direct.to_public_key(),
            rsa::pkcs8::LineEnding::LF,
        )
        .unwrap(),
    );
    g.bench_function("rsa crate directly (SOFTWARE baseline)", |b| {
        b.iter(|| {
            direct
                .decrypt_blinded(
                    &mut getrandom::SysRng,
                    rsa::Oaep::<sha2::Sha256>::new(),
                    &direct_ct,
                )
                .unwrap()
        })
    });
    let sw_ct = encrypt_to(&keyring.public_key("oaep-sw", 0).unwrap().0);
    g.bench_function("kms keyring AsymmetricDecrypt, SOFTWARE key", |b| {
        b.iter(|| keyring.asymmetric_decrypt("oaep-sw", 1, &sw_ct).unwrap())
    });
    let private = object("oaep-hsm");
    let hsm_ct = encrypt_to(&keyring.public_key("oaep-hsm", 0).unwrap().0);
    g.bench_function(
        "cryptoki C_Decrypt CKM_RSA_X_509 directly (HSM baseline)",
        |b| {
            b.iter(|| {
                session
                    .decrypt(&Mechanism::RsaX509, private, &hsm_ct)
                    .unwrap()
            })
        },
    );
    g.bench_function("kms keyring AsymmetricDecrypt, HSM key", |b| {
        b.iter(|| keyring.asymmetric_decrypt("oaep-hsm", 1, &hsm_ct).unwrap())
    });
    g.finish();
}
