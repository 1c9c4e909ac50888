//! Bring your own key, end to end against SoftHSM: keys of origin EXTERNAL, import
//! parameters, and material made and wrapped by Python's `cryptography` (a fresh AES key
//! under RSA-OAEP-SHA-256 plus `aes_key_wrap_with_padding`, or OAEP alone), imported at both
//! protection levels. Then an independent implementation agrees with kms: AES-GCM
//! ciphertexts in kms's format made by Python decrypt in kms (and kms's in Python), HMACs
//! match, signatures verify with Python's own public key, and what Python encrypts to an
//! imported RSA-OAEP key decrypts. Every bad import is refused by name and changes nothing;
//! the CLI imports, with its own wrapping and with openssl's (docs/byok.md).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use softhsm_tests::{Server, TestHsm, expect_code, python, start_unsealed};
use tonic::Code;
use tonic::transport::Channel;

type Client = KeyManagementClient<Channel>;

/// The customer's tools, in Python's `cryptography`.
const PY: &str = r#"
import os, sys
from cryptography.exceptions import InvalidSignature
# "The signature is invalid": not 1, which a crash (an uncaught exception) exits with too.
INVALID = 3
from cryptography.hazmat.primitives import hashes, hmac, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

read = lambda p: open(p, "rb").read()
def write(p, b):
    with open(p, "wb") as f:
        f.write(b)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
cmd, a = sys.argv[1], sys.argv[2:]

def kms_aad(name, version, aad):
    return b"kms/v1/ct" + b"\x01" + version.to_bytes(4, "big") + len(name).to_bytes(2, "big") + name + aad

if cmd == "genkey":  # KIND DIR: DIR/material.bin, DIR/pub.pem
    kind, d = a
    if kind in ("aes", "hmac"):
        write(d + "/material.bin", os.urandom(32))
        sys.exit(0)
    key = {"rsa2048": lambda: rsa.generate_private_key(65537, 2048),
           "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
    write(d + "/material.bin", key.private_bytes(serialization.Encoding.DER,
          serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    write(d + "/pub.pem", key.public_key().public_bytes(serialization.Encoding.PEM,
          serialization.PublicFormat.SubjectPublicKeyInfo))
elif cmd == "wrap":  # WRAPPING_PEM MODE MATERIAL OUT
    pub = serialization.load_pem_public_key(read(a[0]))
    material = read(a[2])
    if a[1] == "rsa-aes":
        kek = os.urandom(32)
        out = pub.encrypt(kek, OAEP) + keywrap.aes_key_wrap_with_padding(kek, material)
    else:
        out = pub.encrypt(material, OAEP)
    write(a[3], out)
elif cmd == "kms-encrypt":  # KEY NAME VERSION PLAINTEXT AAD OUT: kms's ciphertext format
    key, name, version, pt, aad, out = read(a[0]), a[1].encode(), int(a[2]), read(a[3]), read(a[4]), a[5]
    nonce = os.urandom(12)
    header = b"\x01" + version.to_bytes(4, "big")
    write(out, header + nonce + AESGCM(key).encrypt(nonce, pt, kms_aad(name, version, aad)))
elif cmd == "kms-decrypt":  # KEY NAME CIPHERTEXT AAD OUT
    key, name, ct, aad, out = read(a[0]), a[1].encode(), read(a[2]), read(a[3]), a[4]
    assert ct[0] == 1
    version = int.from_bytes(ct[1:5], "big")
    write(out, AESGCM(key).decrypt(ct[5:17], ct[17:], kms_aad(name, version, aad)))
elif cmd == "hmac":  # KEY MESSAGE OUT
    h = hmac.HMAC(read(a[0]), hashes.SHA256())
    h.update(read(a[1]))
    write(a[2], h.finalize())
elif cmd == "verify":  # KIND PUB MESSAGE SIGNATURE: exit 0 valid, INVALID invalid
    kind, pub, msg, sig = a[0], serialization.load_pem_public_key(read(a[1])), read(a[2]), read(a[3])
    try:
        if kind == "pss": pub.verify(sig, msg, PSS, hashes.SHA256())
        elif kind == "p256": pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        else: pub.verify(sig, msg)
    except InvalidSignature:
        sys.exit(INVALID)
elif cmd == "oaep":  # PUB PLAINTEXT OUT
    write(a[2], serialization.load_pem_public_key(read(a[0])).encrypt(read(a[1]), OAEP))
else:
    sys.exit(2)
"#;

fn py(args: &[&dyn AsRef<std::ffi::OsStr>]) -> bool {
    let mut cmd = Command::new(python());
    cmd.args(["-c", PY]);
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

async fn create_external(
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
            origin: pb::KeyOrigin::External as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    server.grant_all(name).await;
    key
}

async fn params(c: &mut Client, name: &str, valid_for: u32) -> pb::GetImportParametersResponse {
    c.get_import_parameters(pb::GetImportParametersRequest {
        key: name.into(),
        valid_for_seconds: valid_for,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Wraps `material` (a file) with Python for `p`'s wrapping key; the wrapped bytes.
fn py_wrap(
    dir: &Path,
    p: &pb::GetImportParametersResponse,
    mode: &str,
    material: &Path,
) -> Vec<u8> {
    let pem = dir.join("wrapping.pem");
    std::fs::write(&pem, &p.wrapping_public_key_pem).unwrap();
    let out = dir.join("wrapped.bin");
    assert!(py(&[&"wrap", &pem, &mode, &material, &out]));
    std::fs::read(out).unwrap()
}

async fn import(
    c: &mut Client,
    name: &str,
    token: &[u8],
    wrapping: pb::WrappingAlgorithm,
    wrapped: Vec<u8>,
    public_key_pem: &str,
) -> Result<pb::Key, tonic::Status> {
    c.import_key_material(pb::ImportKeyMaterialRequest {
        key: name.into(),
        import_token: token.to_vec(),
        wrapping_algorithm: wrapping as i32,
        wrapped_material: wrapped,
        public_key_pem: public_key_pem.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Makes material of `kind` with Python in its own directory; (material file, public PEM).
fn material(dir: &Path, tag: &str, kind: &str) -> (PathBuf, String) {
    let d = dir.join(tag);
    std::fs::create_dir_all(&d).unwrap();
    assert!(py(&[&"genkey", &kind, &d]));
    let public = std::fs::read_to_string(d.join("pub.pem")).unwrap_or_default();
    (d.join("material.bin"), public)
}

async fn sign(c: &mut Client, name: &str, msg: &[u8]) -> Vec<u8> {
    c.sign(pb::SignRequest {
        key: name.into(),
        input: Some(pb::sign_request::Input::Message(msg.to_vec())),
        format: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .signature
}

async fn versions(c: &mut Client, name: &str) -> usize {
    c.get_key(pb::GetKeyRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .versions
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn material_wrapped_by_python_is_imported_and_agrees_with_python() {
    let hsm = TestHsm::new("kms-byok");
    let config = hsm.config_full(
        "byok.toml",
        &hsm.hsm_table(),
        "[keyring]\ntesting_day_seconds = 1\nmaintenance_interval_seconds = 1\n",
    );
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    let dir = hsm.path().to_path_buf();
    let f = |n: &str| dir.join(n);
    std::fs::write(f("pt"), b"customer data").unwrap();
    std::fs::write(f("aad"), b"tenant=acme").unwrap();
    let rsa_aes = pb::WrappingAlgorithm::RsaAesKeyWrapSha256;
    let oaep = pb::WrappingAlgorithm::RsaesOaepSha256;

    for (protection, p) in [
        (pb::ProtectionLevel::Software, "sw"),
        (pb::ProtectionLevel::Hsm, "hsm"),
    ] {
        // AES-256: pending until imported; then Python's ciphertexts in kms's format
        // decrypt in kms and kms's in Python.
        let name = format!("aes-{p}");
        let key =
            create_external(&server, &mut c, &name, pb::Algorithm::Aes256Gcm, protection).await;
        assert!(key.pending_import && key.versions.is_empty());
        assert_eq!(key.origin, pb::KeyOrigin::External as i32);
        let r = c
            .encrypt(pb::EncryptRequest {
                key: name.clone(),
                plaintext: b"x".to_vec(),
                associated_data: vec![],
            })
            .await;
        expect_code(r, Code::FailedPrecondition, "no key material yet");
        let r = c
            .rotate_key(pb::RotateKeyRequest { name: name.clone() })
            .await;
        expect_code(r, Code::FailedPrecondition, "by import");
        let (aes, _) = material(&dir, &format!("aes-{p}"), "aes");
        let ps = params(&mut c, &name, 0).await;
        assert!(
            ps.wrapping_public_key_pem
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = i64::try_from(now).unwrap();
        assert!((now + 86_390..=now + 86_410).contains(&ps.expire_time));
        let wrapped = py_wrap(&dir, &ps, "rsa-aes", &aes);
        let key = import(&mut c, &name, &ps.import_token, rsa_aes, wrapped, "")
            .await
            .unwrap_or_else(|e| panic!("{e:?} {}", hsm.logs()));
        assert!(!key.pending_import);
        assert_eq!(key.primary_version, 1);
        assert_eq!(key.versions[0].origin, pb::KeyOrigin::External as i32);
        let ct = f("py.ct");
        assert!(py(&[
            &"kms-encrypt",
            &aes,
            &name,
            &"1",
            &f("pt"),
            &f("aad"),
            &ct
        ]));
        let pt = c
            .decrypt(pb::DecryptRequest {
                key: name.clone(),
                ciphertext: std::fs::read(&ct).unwrap(),
                associated_data: b"tenant=acme".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (pt.plaintext.as_slice(), pt.key_version),
            (&b"customer data"[..], 1)
        );
        let made = c
            .encrypt(pb::EncryptRequest {
                key: name.clone(),
                plaintext: b"customer data".to_vec(),
                associated_data: b"tenant=acme".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        std::fs::write(f("kms.ct"), &made.ciphertext).unwrap();
        assert!(py(&[
            &"kms-decrypt",
            &aes,
            &name,
            &f("kms.ct"),
            &f("aad"),
            &f("kms.pt")
        ]));
        assert_eq!(std::fs::read(f("kms.pt")).unwrap(), b"customer data");
        // The same material again (a restore), this time wrapped with OAEP alone: version
        // 2; both versions decrypt.
        let wrapped = py_wrap(&dir, &ps, "oaep", &aes);
        let key = import(&mut c, &name, &ps.import_token, oaep, wrapped, "")
            .await
            .unwrap();
        assert_eq!(key.primary_version, 2);
        assert!(py(&[
            &"kms-encrypt",
            &aes,
            &name,
            &"2",
            &f("pt"),
            &f("aad"),
            &ct
        ]));
        let pt = c
            .decrypt(pb::DecryptRequest {
                key: name.clone(),
                ciphertext: std::fs::read(&ct).unwrap(),
                associated_data: b"tenant=acme".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pt.key_version, 2);

        // HMAC: the same tag as Python's.
        let name = format!("mac-{p}");
        create_external(
            &server,
            &mut c,
            &name,
            pb::Algorithm::HmacSha256,
            protection,
        )
        .await;
        let (mac_key, _) = material(&dir, &format!("mac-{p}"), "hmac");
        let ps = params(&mut c, &name, 0).await;
        let wrapped = py_wrap(&dir, &ps, "rsa-aes", &mac_key);
        import(&mut c, &name, &ps.import_token, rsa_aes, wrapped, "")
            .await
            .unwrap();
        assert!(py(&[&"hmac", &mac_key, &f("pt"), &f("py.mac")]));
        let mac = c
            .mac(pb::MacRequest {
                key: name.clone(),
                message: b"customer data".to_vec(),
            })
            .await
            .unwrap()
            .into_inner()
            .mac;
        assert_eq!(mac, std::fs::read(f("py.mac")).unwrap());

        // Signing keys: kms's signatures verify with Python's own public key. The HSM
        // needs the EC and Ed25519 public keys given.
        for (alg, kind, verify_as) in [
            (pb::Algorithm::RsaSignPss2048Sha256, "rsa2048", "pss"),
            (pb::Algorithm::EcdsaP256Sha256, "p256", "p256"),
            (pb::Algorithm::Ed25519, "ed25519", "ed25519"),
        ] {
            let name = format!("{kind}-{p}");
            create_external(&server, &mut c, &name, alg, protection).await;
            let (m, public) = material(&dir, &name, kind);
            let ps = params(&mut c, &name, 0).await;
            let wrapped = py_wrap(&dir, &ps, "rsa-aes", &m);
            let given = if kind == "rsa2048" {
                ""
            } else {
                public.as_str()
            };
            let r = import(&mut c, &name, &ps.import_token, rsa_aes, wrapped, given).await;
            if kind == "ed25519" && protection == pb::ProtectionLevel::Hsm {
                // SoftHSM 2.6.1 cannot unwrap an Ed25519 private key (its C_UnwrapKey knows
                // RSA, DSA, DH and EC keys): refused with that said, nothing made.
                expect_code(r, Code::InvalidArgument, "cannot unwrap an Ed25519 key");
                assert_eq!(versions(&mut c, &name).await, 0);
                continue;
            }
            let key = r.unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(key.primary_version, 1);
            let sig = sign(&mut c, &name, b"customer data").await;
            std::fs::write(f("sig"), &sig).unwrap();
            let pem = dir.join(&name).join("pub.pem");
            assert!(
                py(&[&"verify", &verify_as, &pem, &f("pt"), &f("sig")]),
                "{name}"
            );
            std::fs::write(f("other"), b"other data").unwrap();
            assert!(
                !py(&[&"verify", &verify_as, &pem, &f("other"), &f("sig")]),
                "{name}"
            );
        }

        // An imported RSA-OAEP key decrypts what Python encrypts to Python's public key.
        let name = format!("oaep-{p}");
        create_external(
            &server,
            &mut c,
            &name,
            pb::Algorithm::RsaDecryptOaep2048Sha256,
            protection,
        )
        .await;
        let (m, public) = material(&dir, &name, "rsa2048");
        let ps = params(&mut c, &name, 0).await;
        let wrapped = py_wrap(&dir, &ps, "rsa-aes", &m);
        import(&mut c, &name, &ps.import_token, rsa_aes, wrapped, "")
            .await
            .unwrap();
        let pub_file = dir.join(&name).join("pub.pem");
        assert!(py(&[&"oaep", &pub_file, &f("pt"), &f("oaep.ct")]));
        let pt = c
            .asymmetric_decrypt(pb::AsymmetricDecryptRequest {
                key: name.clone(),
                key_version: 0,
                ciphertext: std::fs::read(f("oaep.ct")).unwrap(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pt.plaintext, b"customer data");
        let served = c
            .get_public_key(pb::GetPublicKeyRequest {
                key: name.clone(),
                key_version: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .pem;
        let strip = |s: &str| s.split_whitespace().collect::<String>();
        assert_eq!(strip(&served), strip(&public));
    }

    // Bad imports: each refused by name, and the key unchanged.
    let name = "aes-sw";
    let (aes, _) = material(&dir, "bad-aes", "aes");
    let before = versions(&mut c, name).await;
    let ps = params(&mut c, name, 0).await;
    let good = py_wrap(&dir, &ps, "rsa-aes", &aes);
    let other = params(&mut c, "mac-sw", 0).await;
    // Another key's token; an altered token; no token.
    let r = import(&mut c, name, &other.import_token, rsa_aes, good.clone(), "").await;
    expect_code(
        r,
        Code::InvalidArgument,
        "not one this server gave for this key",
    );
    let mut token = ps.import_token.clone();
    *token.last_mut().unwrap() ^= 1;
    let r = import(&mut c, name, &token, rsa_aes, good.clone(), "").await;
    expect_code(
        r,
        Code::InvalidArgument,
        "not one this server gave for this key",
    );
    let r = import(&mut c, name, b"", rsa_aes, good.clone(), "").await;
    expect_code(
        r,
        Code::InvalidArgument,
        "not one this server gave for this key",
    );
    // Wrapped for another key's wrapping key (with this key's token).
    let foreign = py_wrap(&dir, &other, "rsa-aes", &aes);
    let r = import(&mut c, name, &ps.import_token, rsa_aes, foreign, "").await;
    expect_code(r, Code::InvalidArgument, "does not unwrap");
    // Altered in the RSA block, and in the AES-KWP part.
    for at in [10, good.len() - 3] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        let r = import(&mut c, name, &ps.import_token, rsa_aes, bad, "").await;
        expect_code(r, Code::InvalidArgument, "does not unwrap");
    }
    let r = import(
        &mut c,
        name,
        &ps.import_token,
        rsa_aes,
        good[..530].to_vec(),
        "",
    )
    .await;
    expect_code(r, Code::InvalidArgument, "does not unwrap");
    // The wrong length and the wrong type of material.
    std::fs::write(f("short"), [7u8; 16]).unwrap();
    let short = py_wrap(&dir, &ps, "rsa-aes", &f("short"));
    let r = import(&mut c, name, &ps.import_token, rsa_aes, short, "").await;
    expect_code(r, Code::InvalidArgument, "must be 32 raw bytes");
    let (ec_material, ec_public) = material(&dir, "bad-ec", "p256");
    let ec_wrapped = py_wrap(&dir, &ps, "rsa-aes", &ec_material);
    let r = import(&mut c, name, &ps.import_token, rsa_aes, ec_wrapped, "").await;
    expect_code(r, Code::InvalidArgument, "must be 32 raw bytes");
    let r = import(
        &mut c,
        name,
        &ps.import_token,
        rsa_aes,
        good.clone(),
        &ec_public,
    )
    .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "symmetric key takes no public key",
    );
    let r = import(
        &mut c,
        name,
        &ps.import_token,
        pb::WrappingAlgorithm::Unspecified,
        good.clone(),
        "",
    )
    .await;
    expect_code(r, Code::InvalidArgument, "wrapping_algorithm");
    let r = import(&mut c, name, &ps.import_token, rsa_aes, vec![0; 9000], "").await;
    expect_code(r, Code::InvalidArgument, "more than the 8192 allowed");
    // RSA material into an ECDSA key; an RSA key's material by OAEP alone; a mismatched
    // public key.
    let p256 = "p256-sw";
    let (rsa_material, _) = material(&dir, "bad-rsa", "rsa2048");
    let pp = params(&mut c, p256, 0).await;
    let w = py_wrap(&dir, &pp, "rsa-aes", &rsa_material);
    let r = import(&mut c, p256, &pp.import_token, rsa_aes, w, "").await;
    expect_code(r, Code::InvalidArgument, "P-256 private key, PKCS#8");
    let w = py_wrap(&dir, &pp, "oaep", &f("short"));
    let r = import(&mut c, p256, &pp.import_token, oaep, w, "").await;
    expect_code(r, Code::InvalidArgument, "at most 32 bytes");
    let w = py_wrap(&dir, &pp, "rsa-aes", &ec_material);
    let (_, someone_else) = material(&dir, "bad-ec-2", "p256");
    let r = import(
        &mut c,
        p256,
        &pp.import_token,
        rsa_aes,
        w.clone(),
        &someone_else,
    )
    .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "not the public key of the imported material",
    );
    let hp = params(&mut c, "p256-hsm", 0).await;
    let r = import(
        &mut c,
        "p256-hsm",
        &hp.import_token,
        rsa_aes,
        w,
        &someone_else,
    )
    .await;
    expect_code(r, Code::InvalidArgument, "does not unwrap");
    // Replaced and expired parameters.
    let newer = params(&mut c, name, 1).await;
    let r = import(&mut c, name, &ps.import_token, rsa_aes, good.clone(), "").await;
    expect_code(r, Code::FailedPrecondition, "replaced");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let w = py_wrap(&dir, &newer, "rsa-aes", &aes);
    let r = import(&mut c, name, &newer.import_token, rsa_aes, w, "").await;
    expect_code(r, Code::FailedPrecondition, "expired");
    // A key kms made refuses imports.
    server
        .create_key_of(
            "made-here",
            pb::Algorithm::Aes256Gcm,
            pb::ProtectionLevel::Software,
        )
        .await;
    let r = c
        .get_import_parameters(pb::GetImportParametersRequest {
            key: "made-here".into(),
            valid_for_seconds: 0,
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "origin GENERATED");
    // HSM keys: a wrapped length no 32 bytes give is refused before the HSM sees it; 28
    // bytes wrap to the same length as 32, and the key the token made of them is refused
    // (and destroyed) because it does not work as an AES-256 key.
    let hp = params(&mut c, "aes-hsm", 0).await;
    let hsm_before = versions(&mut c, "aes-hsm").await;
    let w = py_wrap(&dir, &hp, "rsa-aes", &f("short"));
    let r = import(&mut c, "aes-hsm", &hp.import_token, rsa_aes, w, "").await;
    expect_code(r, Code::InvalidArgument, "must be 32 raw bytes");
    std::fs::write(f("28"), [9u8; 28]).unwrap();
    let w = py_wrap(&dir, &hp, "rsa-aes", &f("28"));
    let r = import(&mut c, "aes-hsm", &hp.import_token, rsa_aes, w, "").await;
    expect_code(r, Code::InvalidArgument, "not 32 bytes");
    assert_eq!(versions(&mut c, "aes-hsm").await, hsm_before);
    assert_eq!(versions(&mut c, name).await, before, "nothing was imported");

    // Crypto-shredding: an imported version destroyed (a "day" is 1 s here) decrypts no more.
    let ct = f("py.ct");
    assert!(py(&[
        &"kms-encrypt",
        &aes,
        &"aes-sw",
        &"1",
        &f("pt"),
        &f("aad"),
        &ct
    ]));
    c.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
        name: "aes-sw".into(),
        version: 1,
        pending_days: 1,
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let k = c
            .get_key(pb::GetKeyRequest {
                name: "aes-sw".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if k.versions[0].state == pb::KeyVersionState::Destroyed as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not destroyed in time"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let r = c
        .decrypt(pb::DecryptRequest {
            key: "aes-sw".into(),
            ciphertext: std::fs::read(&ct).unwrap(),
            associated_data: b"tenant=acme".to_vec(),
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "DESTROYED");

    // Every import parameter and import is audited, the refused ones too, with key and
    // outcome.
    let export = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(export.code, Some(0), "{}", export.stderr);
    let records: Vec<serde_json::Value> = export
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of = |op: &str, outcome: &str| {
        records
            .iter()
            .filter(|r| r["event"]["operation"] == op && r["event"]["outcome"] == outcome)
            .count()
    };
    assert!(
        of("GetImportParameters", "OK") >= 16,
        "{}",
        of("GetImportParameters", "OK")
    );
    assert!(of("ImportKeyMaterial", "OK") >= 10);
    assert!(of("ImportKeyMaterial", "INVALID_ARGUMENT") >= 10);
    assert!(of("ImportKeyMaterial", "FAILED_PRECONDITION") >= 2);
    assert!(
        !export
            .stdout
            .contains(&data_encoding::HEXLOWER.encode(&std::fs::read(&aes).unwrap()))
    );

    // Nothing secret in the log.
    let log = hsm.logs();
    assert!(log.contains("key material imported"));
    // No imported material, as hex, in the log (at the default level).
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let m = entry.unwrap().path().join("material.bin");
        if let Ok(secret) = std::fs::read(&m) {
            let hex = data_encoding::HEXLOWER.encode(&secret);
            assert!(!log.contains(&hex[..32]), "{} is in the log", m.display());
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} materials checked");

    // Imported versions come back after a kill -9 and an unseal: SOFTWARE ones from their
    // sealed records, HSM ones found in the token by label and CKA_ID.
    drop(c);
    server.kill9();
    let server: Server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    for p in ["sw", "hsm"] {
        let name = format!("aes-{p}");
        let material = dir.join(&name).join("material.bin");
        assert!(py(&[
            &"kms-encrypt",
            &material,
            &name,
            &"2",
            &f("pt"),
            &f("aad"),
            &ct
        ]));
        let back = c
            .decrypt(pb::DecryptRequest {
                key: name.clone(),
                ciphertext: std::fs::read(&ct).unwrap(),
                associated_data: b"tenant=acme".to_vec(),
            })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
            .into_inner();
        assert_eq!(back.plaintext, b"customer data");
        let name = format!("p256-{p}");
        let sig = sign(&mut c, &name, b"customer data").await;
        std::fs::write(f("sig"), &sig).unwrap();
        let pem = dir.join(&name).join("pub.pem");
        assert!(
            py(&[&"verify", &"p256", &pem, &f("pt"), &f("sig")]),
            "{name}"
        );
    }
    // What the token itself says of the objects BYOK made. Imported versions (every
    // keyring object here was imported): sensitive, not extractable, not modifiable, no
    // derivation or wrapping, value unreadable; and, by PKCS#11's definition of an
    // unwrapped key, neither always sensitive nor never extractable (docs/byok.md). The
    // wrapping keys (RSA, generated in the token): sensitive and never extractable.
    let imported = hsm.inspect_all("kms/");
    let wrapping = hsm.inspect_all("kms-import/");
    assert!(imported.len() >= 4, "{imported:?}");
    assert!(!wrapping.is_empty(), "{wrapping:?}");
    for o in &imported {
        softhsm_tests::assert_kms_key_attributes(o, false);
    }
    for o in &wrapping {
        softhsm_tests::assert_kms_key_attributes(o, true);
        assert_eq!(o["class"], "private", "{o}");
        assert_ne!(o["sign"], true, "{o}");
    }
}

/// The shell block `name` of docs/byok.md (between its begin and end markers).
fn documented_block(name: &str) -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/byok.md"))
            .unwrap();
    let start = doc
        .find(&format!("<!-- {name}: begin"))
        .expect("the block's start marker");
    let end = doc
        .find(&format!("<!-- {name}: end"))
        .expect("the block's end marker");
    let block = &doc[start..end];
    let code = block.split("```sh\n").nth(1).unwrap();
    code.split("```").next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_with_its_own_wrapping_and_with_the_documented_openssl_commands() {
    let hsm = TestHsm::new("kms-byok-cli");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    let dir = hsm.path().to_path_buf();
    let kms = |args: &[&str]| {
        let out = server.kms(args, "");
        assert_eq!(out.code, Some(0), "kms {args:?}: {}", out.stderr);
        out.stdout
    };

    // `kms key import --material`: AES material from a file, into an HSM key.
    kms(&[
        "key",
        "create",
        "ext-aes",
        "--algorithm",
        "aes-256-gcm",
        "--protection",
        "hsm",
        "--origin",
        "external",
    ]);
    let shown = kms(&["key", "get", "ext-aes"]);
    assert!(shown.contains("PENDING_IMPORT"), "{shown}");
    let (aes, _) = material(&dir, "cli-aes", "aes");
    let shown = kms(&[
        "key",
        "import",
        "ext-aes",
        "--material",
        aes.to_str().unwrap(),
    ]);
    assert!(
        shown.contains("Origin                  EXTERNAL"),
        "{shown}"
    );
    assert!(shown.contains("ENABLED  (imported)"), "{shown}");
    server.grant_all("ext-aes").await;
    std::fs::write(dir.join("pt"), b"through the CLI").unwrap();
    std::fs::write(dir.join("aad"), b"").unwrap();
    kms(&[
        "encrypt",
        "--key",
        "ext-aes",
        "--in",
        dir.join("pt").to_str().unwrap(),
        "--out",
        dir.join("ct").to_str().unwrap(),
    ]);
    assert!(py(&[
        &"kms-decrypt",
        &aes,
        &"ext-aes",
        &dir.join("ct"),
        &dir.join("aad"),
        &dir.join("back")
    ]));
    assert_eq!(std::fs::read(dir.join("back")).unwrap(), b"through the CLI");

    // `kms key import-parameters`, openssl as docs/byok.md says, `kms key import --wrapped`:
    // a P-256 key openssl made, into an HSM key; openssl verifies kms's signature.
    kms(&[
        "key",
        "create",
        "ext-ec",
        "--algorithm",
        "ecdsa-p256-sha256",
        "--protection",
        "hsm",
        "--origin",
        "external",
    ]);
    let params = dir.join("params");
    let said = kms(&[
        "key",
        "import-parameters",
        "ext-ec",
        "--out",
        params.to_str().unwrap(),
    ]);
    assert!(said.contains("Valid until"), "{said}");
    let run = |cmd: &mut Command| {
        let out = cmd.current_dir(&params).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("bash").args(["-e", "-c", &documented_block("byok-openssl-ec")]));
    run(Command::new("bash").args(["-e", "-c", &documented_block("byok-openssl")]));
    assert!(
        !params.join("aes-key.bin").exists(),
        "the block removes the AES key"
    );
    let shown = kms(&[
        "key",
        "import",
        "ext-ec",
        "--wrapped",
        params.join("wrapped.bin").to_str().unwrap(),
        "--token",
        params.join("import-token.bin").to_str().unwrap(),
        "--public-key",
        params.join("pub.pem").to_str().unwrap(),
    ]);
    assert!(shown.contains("ENABLED  (imported)"), "{shown}");
    server.grant_all("ext-ec").await;
    kms(&[
        "sign",
        "--key",
        "ext-ec",
        "--in",
        dir.join("pt").to_str().unwrap(),
        "--out",
        params.join("sig").to_str().unwrap(),
    ]);
    run(Command::new("openssl")
        .args(["dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig"])
        .arg(dir.join("pt")));

    // The token is refused on another key, by the CLI too, with the server's reason.
    kms(&[
        "key",
        "create",
        "ext-other",
        "--algorithm",
        "ecdsa-p256-sha256",
        "--origin",
        "external",
    ]);
    let out = server.kms(
        &[
            "key",
            "import",
            "ext-other",
            "--wrapped",
            params.join("wrapped.bin").to_str().unwrap(),
            "--token",
            params.join("import-token.bin").to_str().unwrap(),
        ],
        "",
    );
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("not one this server gave for this key"),
        "{}",
        out.stderr
    );
}

/// An EXTERNAL AES key cannot be rotated by kms at 3/4 of a version's message budget, as a
/// generated one is: every message up to the budget is encrypted (the crossing is logged,
/// saying to import), then encryption is refused with RESOURCE_EXHAUSTED until an import
/// adds a version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_key_at_its_message_budget_asks_for_an_import() {
    let hsm = TestHsm::new("kms-byok-budget");
    let config = hsm.config_full(
        "budget.toml",
        &hsm.hsm_table(),
        "[keyring]\nmax_messages_per_version = 8\n",
    );
    let (server, _) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    let dir = hsm.path().to_path_buf();
    let name = "ext-budget";
    create_external(
        &server,
        &mut c,
        name,
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    let (aes, _) = material(&dir, "budget", "aes");
    let ps = params(&mut c, name, 0).await;
    let wrapped = py_wrap(&dir, &ps, "rsa-aes", &aes);
    let rsa_aes = pb::WrappingAlgorithm::RsaAesKeyWrapSha256;
    import(&mut c, name, &ps.import_token, rsa_aes, wrapped, "")
        .await
        .unwrap();
    let encrypt = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.encrypt(pb::EncryptRequest {
                key: name.into(),
                plaintext: b"m".to_vec(),
                associated_data: vec![],
            })
            .await
            .map(|r| r.into_inner().key_version)
        }
    };
    for i in 0..8 {
        assert_eq!(encrypt(&mut c).await.unwrap(), 1, "message {i}");
    }
    expect_code(
        encrypt(&mut c).await,
        Code::ResourceExhausted,
        "import new material",
    );
    assert!(hsm.logs().contains("import new material (kms key import)"));
    // An import makes version 2, which encrypts.
    let wrapped = py_wrap(&dir, &ps, "rsa-aes", &aes);
    let key = import(&mut c, name, &ps.import_token, rsa_aes, wrapped, "")
        .await
        .unwrap();
    assert_eq!(key.primary_version, 2);
    assert_eq!(encrypt(&mut c).await.unwrap(), 2);
}

/// Import parameters that expire are removed by the maintenance run: their wrapping key is
/// destroyed in the token (audited as `ExpireImportParameters`), and their token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_import_parameters_leave_no_wrapping_key_in_the_token() {
    let hsm = TestHsm::new("kms-byok-expiry");
    let config = hsm.config_full(
        "expiry.toml",
        &hsm.hsm_table(),
        "[keyring]\nmaintenance_interval_seconds = 1\n",
    );
    let (server, _) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    let wrapping_keys = || hsm.count("kms-import/");
    create_external(
        &server,
        &mut c,
        "ext-expiring",
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Hsm,
    )
    .await;
    // Validity out of range, and an unknown key: refused by name, nothing made.
    for bad in [86_401, u32::MAX] {
        let r = c
            .get_import_parameters(pb::GetImportParametersRequest {
                key: "ext-expiring".into(),
                valid_for_seconds: bad,
            })
            .await;
        expect_code(
            r,
            Code::InvalidArgument,
            "valid_for_seconds must be 1..=86400",
        );
    }
    let r = c
        .get_import_parameters(pb::GetImportParametersRequest {
            key: "no-such-key".into(),
            valid_for_seconds: 0,
        })
        .await;
    expect_code(r, Code::NotFound, "no-such-key");
    assert_eq!(wrapping_keys(), 0);
    let out = server.kms(
        &[
            "key",
            "import-parameters",
            "ext-expiring",
            "--out",
            hsm.path().join("p").to_str().unwrap(),
            "--valid-for",
            "48h",
        ],
        "",
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("valid_for_seconds must be 1..=86400"),
        "{out:?}"
    );
    assert_eq!(wrapping_keys(), 0);
    let ps = params(&mut c, "ext-expiring", 2).await;
    assert_eq!(wrapping_keys(), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while wrapping_keys() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the wrapping key outlived its expiry"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let dir = hsm.path().to_path_buf();
    let (aes, _) = material(&dir, "expiring", "aes");
    let wrapped = py_wrap(&dir, &ps, "rsa-aes", &aes);
    let r = import(
        &mut c,
        "ext-expiring",
        &ps.import_token,
        pb::WrappingAlgorithm::RsaAesKeyWrapSha256,
        wrapped,
        "",
    )
    .await;
    expect_code(r, Code::FailedPrecondition, "have expired");
    let export = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert!(
        export.stdout.contains("\"ExpireImportParameters\""),
        "{}",
        export.stdout
    );
    // New parameters work.
    let ps = params(&mut c, "ext-expiring", 0).await;
    let wrapped = py_wrap(&dir, &ps, "rsa-aes", &aes);
    let key = import(
        &mut c,
        "ext-expiring",
        &ps.import_token,
        pb::WrappingAlgorithm::RsaAesKeyWrapSha256,
        wrapped,
        "",
    )
    .await
    .unwrap();
    assert_eq!(key.primary_version, 1);
}

/// Issue 25: an import retried with its idempotency key (its answer lost) is answered from
/// the first import, and makes no second version; the same key for other material is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_retried_with_its_request_id_is_made_once() {
    let hsm = TestHsm::new("kms-byok-retry");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    let mut c = server.keys().await;
    let dir = hsm.path().to_path_buf();
    let name = "ext-retried";
    create_external(
        &server,
        &mut c,
        name,
        pb::Algorithm::Aes256Gcm,
        pb::ProtectionLevel::Software,
    )
    .await;
    let (aes, _) = material(&dir, "retried", "aes");
    let ps = params(&mut c, name, 0).await;
    let wrapped = py_wrap(&dir, &ps, "rsa-aes", &aes);
    let request = pb::ImportKeyMaterialRequest {
        key: name.into(),
        import_token: ps.import_token.clone(),
        wrapping_algorithm: pb::WrappingAlgorithm::RsaAesKeyWrapSha256 as i32,
        wrapped_material: wrapped,
        public_key_pem: String::new(),
    };
    let with_id = |r: pb::ImportKeyMaterialRequest| {
        let mut r = tonic::Request::new(r);
        r.metadata_mut()
            .insert("idempotency-key", "import-1".parse().unwrap());
        r
    };
    let first = c
        .import_key_material(with_id(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .import_key_material(with_id(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(versions(&mut c, name).await, 1);
    // Other material under the same id: refused, nothing imported.
    let other = pb::ImportKeyMaterialRequest {
        wrapped_material: py_wrap(&dir, &ps, "rsa-aes", &aes),
        ..request
    };
    expect_code(
        c.import_key_material(with_id(other)).await,
        Code::InvalidArgument,
        "idempotency-key was used by another request",
    );
    assert_eq!(versions(&mut c, name).await, 1);
}
