//! RSA keys over real gRPC against a real SoftHSM token, checked by two independent
//! implementations: openssl (the command) and Python's `cryptography` (OpenSSL's RSA under
//! another API). Every RSA algorithm's scheme at both protection levels and every modulus
//! size: signatures (PSS, PKCS#1 v1.5) made by kms verify there, ciphertexts made there
//! (OAEP) decrypt in kms; Python verifies ECDSA P-384 too; the refusals; rotation, the CLI,
//! and a kill -9 with a restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use softhsm_tests::{Server, TestHsm, expect_code, python, start_unsealed};
use tonic::Code;
use tonic::transport::Channel;

type Client = KeyManagementClient<Channel>;

/// A secret that must never appear in a log or an audit record.
const SECRET: &[u8] = b"SECRET-RSA-PLAINTEXT-4b1d";

/// Python's `cryptography`: `verify PEM SCHEME MSG SIG` (exit 0 when valid, 1 when not)
/// and `encrypt PEM PLAINTEXT OUT` (RSA-OAEP, SHA-256, MGF1-SHA-256, no label).
const PY: &str = r#"
import sys
from cryptography.exceptions import InvalidSignature
# "The signature is invalid": not 1, which a crash (an uncaught exception) exits with too.
INVALID = 3
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

read = lambda p: open(p, "rb").read()
cmd, pem = sys.argv[1], serialization.load_pem_public_key(read(sys.argv[2]))
if cmd == "verify":
    scheme, msg, sig = sys.argv[3], read(sys.argv[4]), read(sys.argv[5])
    try:
        if scheme == "ecdsa-p384":
            pem.verify(sig, msg, ec.ECDSA(hashes.SHA384()))
        else:
            pad = (padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
                   if scheme == "pss" else padding.PKCS1v15())
            pem.verify(sig, msg, pad, hashes.SHA256())
    except InvalidSignature:
        sys.exit(INVALID)
elif cmd == "encrypt":
    ct = pem.encrypt(read(sys.argv[3]), padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    open(sys.argv[4], "wb").write(ct)
else:
    sys.exit(2)
"#;

#[derive(Clone, Copy, PartialEq)]
enum Scheme {
    Pss,
    Pkcs1,
    Oaep,
    /// Not RSA: ECDSA P-384 (SHA-384), the other new signing algorithm, for Python.
    EcdsaP384,
}

fn run(cmd: &mut Command) -> bool {
    let out = cmd
        .output()
        .expect("the tool is installed (scripts/test installs it)");
    out.status.success()
}

fn python_verifies(dir: &Path, pem: &str, scheme: Scheme, msg: &[u8], sig: &[u8]) -> bool {
    let (p, m, s) = (dir.join("py.pem"), dir.join("py.msg"), dir.join("py.sig"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&m, msg).unwrap();
    std::fs::write(&s, sig).unwrap();
    let scheme = match scheme {
        Scheme::Pss => "pss",
        Scheme::EcdsaP384 => "ecdsa-p384",
        _ => "pkcs1",
    };
    let status = Command::new(python())
        .args(["-c", PY, "verify"])
        .arg(&p)
        .arg(scheme)
        .arg(&m)
        .arg(&s)
        .status()
        .unwrap();
    assert!(
        matches!(status.code(), Some(0 | 3)),
        "python failed (not a verdict): {status}"
    );
    status.success()
}

fn python_encrypts(dir: &Path, pem: &str, pt: &[u8]) -> Vec<u8> {
    let (p, m, o) = (dir.join("py.pem"), dir.join("py.pt"), dir.join("py.ct"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&m, pt).unwrap();
    assert!(run(Command::new(python())
        .args(["-c", PY, "encrypt"])
        .arg(&p)
        .arg(&m)
        .arg(&o)));
    std::fs::read(o).unwrap()
}

fn openssl_verifies(dir: &Path, pem: &str, scheme: Scheme, msg: &[u8], sig: &[u8]) -> bool {
    let (p, m, s) = (dir.join("o.pem"), dir.join("o.msg"), dir.join("o.sig"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&m, msg).unwrap();
    std::fs::write(&s, sig).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["dgst", "-sha256", "-verify"]).arg(&p);
    if scheme == Scheme::Pss {
        cmd.args([
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
            "-sigopt",
            "rsa_mgf1_md:sha256",
        ]);
    }
    cmd.arg("-signature").arg(&s).arg(&m);
    run(&mut cmd)
}

fn openssl_encrypts(dir: &Path, pem: &str, pt: &[u8]) -> Vec<u8> {
    let (p, m, o) = (dir.join("o.pem"), dir.join("o.pt"), dir.join("o.ct"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&m, pt).unwrap();
    assert!(run(Command::new("openssl")
        .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
        .arg(&p)
        .args([
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ])
        .arg("-in")
        .arg(&m)
        .arg("-out")
        .arg(&o)));
    std::fs::read(o).unwrap()
}

/// The modulus size openssl reads from a public key.
fn openssl_bits(dir: &Path, pem: &str) -> usize {
    let p = dir.join("bits.pem");
    std::fs::write(&p, pem).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(&p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_default();
    // "Public-Key: (2048 bit)"
    line.split(['(', ' '])
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

async fn public_pem(c: &mut Client, key: &str, version: u32) -> String {
    c.get_public_key(pb::GetPublicKeyRequest {
        key: key.into(),
        key_version: version,
    })
    .await
    .unwrap()
    .into_inner()
    .pem
}

async fn sign(c: &mut Client, key: &str, input: pb::sign_request::Input) -> Vec<u8> {
    c.sign(pb::SignRequest {
        key: key.into(),
        input: Some(input),
        format: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .signature
}

async fn verify(c: &mut Client, key: &str, msg: &[u8], sig: &[u8]) -> bool {
    c.verify(pb::VerifyRequest {
        key: key.into(),
        key_version: 0,
        input: Some(pb::verify_request::Input::Message(msg.to_vec())),
        signature: sig.to_vec(),
    })
    .await
    .unwrap()
    .into_inner()
    .valid
}

async fn decrypt(
    c: &mut Client,
    key: &str,
    version: u32,
    ct: &[u8],
) -> Result<(Vec<u8>, u32), tonic::Status> {
    c.asymmetric_decrypt(pb::AsymmetricDecryptRequest {
        key: key.into(),
        key_version: version,
        ciphertext: ct.to_vec(),
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        (r.plaintext, r.key_version)
    })
}

/// The algorithms tried at each level: every scheme, every size at least once.
const ALGORITHMS: &[(pb::Algorithm, Scheme, usize)] = &[
    (pb::Algorithm::RsaSignPss2048Sha256, Scheme::Pss, 2048),
    (pb::Algorithm::RsaSignPkcs12048Sha256, Scheme::Pkcs1, 2048),
    (pb::Algorithm::RsaDecryptOaep2048Sha256, Scheme::Oaep, 2048),
    (pb::Algorithm::RsaSignPss3072Sha256, Scheme::Pss, 3072),
    (pb::Algorithm::RsaDecryptOaep3072Sha256, Scheme::Oaep, 3072),
    (pb::Algorithm::RsaSignPkcs14096Sha256, Scheme::Pkcs1, 4096),
    (pb::Algorithm::RsaDecryptOaep4096Sha256, Scheme::Oaep, 4096),
];

/// Signing keys: kms's signatures over a message and over its digest verify in kms,
/// openssl and Python, and a signature over another message verifies nowhere.
async fn check_signing_key(c: &mut Client, dir: &Path, name: &str, scheme: Scheme, bits: usize) {
    let pem = public_pem(c, name, 0).await;
    assert_eq!(openssl_bits(dir, &pem), bits, "{name}");
    let msg = b"a JWT header.a JWT payload";
    let sig = sign(c, name, pb::sign_request::Input::Message(msg.to_vec())).await;
    assert_eq!(sig.len(), bits / 8, "{name}");
    assert!(verify(c, name, msg, &sig).await, "{name}");
    assert!(!verify(c, name, b"another message", &sig).await, "{name}");
    assert!(openssl_verifies(dir, &pem, scheme, msg, &sig), "{name}");
    assert!(
        !openssl_verifies(dir, &pem, scheme, b"other", &sig),
        "{name}"
    );
    assert!(python_verifies(dir, &pem, scheme, msg, &sig), "{name}");
    assert!(
        !python_verifies(dir, &pem, scheme, b"other", &sig),
        "{name}"
    );
    // PSS is randomised, PKCS#1 v1.5 is not.
    let again = sign(c, name, pb::sign_request::Input::Message(msg.to_vec())).await;
    assert_eq!(again == sig, scheme == Scheme::Pkcs1, "{name}");
    // The same from the SHA-256 digest alone.
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(msg).to_vec()
    };
    let by_digest = sign(c, name, pb::sign_request::Input::Digest(digest)).await;
    assert!(
        openssl_verifies(dir, &pem, scheme, msg, &by_digest),
        "{name}"
    );
    assert!(
        python_verifies(dir, &pem, scheme, msg, &by_digest),
        "{name}"
    );
    // A SHA-384 digest, a signature of the wrong size, and a decryption: refused.
    let r = c
        .sign(pb::SignRequest {
            key: name.into(),
            input: Some(pb::sign_request::Input::Digest(vec![0; 48])),
            format: 0,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "SHA-256 digest is 32 bytes");
    assert!(!verify(c, name, msg, &sig[1..]).await);
    expect_code(
        decrypt(c, name, 0, &vec![1; bits / 8]).await,
        Code::FailedPrecondition,
        "asymmetric decryption",
    );
}

/// Decryption keys: what openssl and Python encrypt to the public key decrypts in kms, up
/// to the largest plaintext; anything altered fails with the one opaque error.
async fn check_decryption_key(c: &mut Client, dir: &Path, name: &str, bits: usize) {
    let pem = public_pem(c, name, 0).await;
    assert_eq!(openssl_bits(dir, &pem), bits, "{name}");
    let ct = openssl_encrypts(dir, &pem, SECRET);
    assert_eq!(ct.len(), bits / 8);
    assert_eq!(
        decrypt(c, name, 0, &ct).await.unwrap(),
        (SECRET.to_vec(), 1)
    );
    let largest = vec![0xa5; bits / 8 - 66];
    let ct_py = python_encrypts(dir, &pem, &largest);
    assert_eq!(decrypt(c, name, 1, &ct_py).await.unwrap().0, largest);
    let empty = python_encrypts(dir, &pem, b"");
    assert_eq!(decrypt(c, name, 0, &empty).await.unwrap().0, b"");
    for i in [0, 1, bits / 16, bits / 8 - 1] {
        let mut bad = ct.clone();
        bad[i] ^= 0x01;
        expect_code(
            decrypt(c, name, 0, &bad).await,
            Code::InvalidArgument,
            "decryption failed",
        );
    }
    let longer = [ct.as_slice(), &[0]].concat();
    let longer = if bits < 4096 { &longer[..] } else { &ct[2..] };
    for bad in [&ct[1..], longer, &[][..], &vec![0xff; bits / 8]] {
        expect_code(
            decrypt(c, name, 0, bad).await,
            Code::InvalidArgument,
            "decryption failed",
        );
    }
    expect_code(
        decrypt(c, name, 0, &vec![0; 513]).await,
        Code::InvalidArgument,
        "ciphertext",
    );
    expect_code(decrypt(c, name, 7, &ct).await, Code::NotFound, "version");
    // Not a signing key, nor a symmetric one.
    let r = c
        .sign(pb::SignRequest {
            key: name.into(),
            input: Some(pb::sign_request::Input::Message(b"m".to_vec())),
            format: 0,
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "ASYMMETRIC_DECRYPT");
    let r = c
        .decrypt(pb::DecryptRequest {
            key: name.into(),
            ciphertext: ct.clone(),
            associated_data: vec![],
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "ASYMMETRIC_DECRYPT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_at_both_levels_interoperate_with_openssl_and_python() {
    let hsm = TestHsm::new("kms-rsa");
    let config = hsm.config_full("rsa.toml", &hsm.hsm_table(), "[log]\nlevel = \"debug\"\n");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    let dir = hsm.path().to_path_buf();
    let mut kept = Vec::new();
    for (protection, p) in [
        (pb::ProtectionLevel::Software, "sw"),
        (pb::ProtectionLevel::Hsm, "hsm"),
    ] {
        for &(alg, scheme, bits) in ALGORITHMS {
            let name = format!("{}-{p}", alg.as_str_name().to_lowercase().replace('_', "-"));
            let key = server.create_key_of(&name, alg, protection).await;
            let purpose = if scheme == Scheme::Oaep {
                pb::Purpose::AsymmetricDecrypt
            } else {
                pb::Purpose::SignVerify
            };
            assert_eq!(key.purpose, purpose as i32, "{name}");
            assert_eq!(key.algorithm, alg as i32);
            assert_eq!(key.protection_level, protection as i32);
            if scheme == Scheme::Oaep {
                check_decryption_key(&mut c, &dir, &name, bits).await;
            } else {
                check_signing_key(&mut c, &dir, &name, scheme, bits).await;
            }
            kept.push((name, scheme));
        }
    }

    // ECDSA P-384 at both levels: Python verifies kms's DER signatures too (openssl does in
    // keyring.rs).
    for (protection, p) in [
        (pb::ProtectionLevel::Software, "sw"),
        (pb::ProtectionLevel::Hsm, "hsm"),
    ] {
        let name = format!("p384-{p}");
        server
            .create_key_of(&name, pb::Algorithm::EcdsaP384Sha384, protection)
            .await;
        let pem = public_pem(&mut c, &name, 0).await;
        let sig = sign(
            &mut c,
            &name,
            pb::sign_request::Input::Message(b"CNSA".to_vec()),
        )
        .await;
        assert!(
            python_verifies(&dir, &pem, Scheme::EcdsaP384, b"CNSA", &sig),
            "{name}"
        );
        assert!(
            !python_verifies(&dir, &pem, Scheme::EcdsaP384, b"other", &sig),
            "{name}"
        );
    }

    // Rotation: version 2 is primary with a new key pair; version 1 still decrypts and
    // its public key is still served.
    let name = "rsa-decrypt-oaep-2048-sha256-sw";
    let pem1 = public_pem(&mut c, name, 0).await;
    let ct1 = openssl_encrypts(&dir, &pem1, SECRET);
    c.rotate_key(pb::RotateKeyRequest { name: name.into() })
        .await
        .unwrap();
    let pem2 = public_pem(&mut c, name, 0).await;
    assert_ne!(pem1, pem2);
    assert_eq!(public_pem(&mut c, name, 1).await, pem1);
    let ct2 = openssl_encrypts(&dir, &pem2, SECRET);
    assert_eq!(
        decrypt(&mut c, name, 0, &ct2).await.unwrap(),
        (SECRET.to_vec(), 2)
    );
    assert_eq!(
        decrypt(&mut c, name, 1, &ct1).await.unwrap(),
        (SECRET.to_vec(), 1)
    );
    // The other version's key cannot decrypt it.
    expect_code(
        decrypt(&mut c, name, 2, &ct1).await,
        Code::InvalidArgument,
        "decryption failed",
    );

    // Signatures and ciphertexts made before a kill -9 verify and decrypt after the restart
    // (software keys come back from their sealed records, HSM keys from the token).
    let mut before = Vec::new();
    for (name, scheme) in &kept {
        let pem = public_pem(&mut c, name, 0).await;
        let made = match scheme {
            Scheme::Oaep => openssl_encrypts(&dir, &pem, SECRET),
            _ => {
                sign(
                    &mut c,
                    name,
                    pb::sign_request::Input::Message(SECRET.to_vec()),
                )
                .await
            }
        };
        before.push((name.clone(), *scheme, pem, made));
    }
    drop(c);
    server.kill9();
    let server: Server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    for (name, scheme, pem, made) in &before {
        assert_eq!(&public_pem(&mut c, name, 0).await, pem, "{name}");
        match scheme {
            Scheme::Oaep => assert_eq!(
                decrypt(&mut c, name, 0, made).await.unwrap().0,
                SECRET,
                "{name}"
            ),
            _ => {
                assert!(verify(&mut c, name, SECRET, made).await, "{name}");
                let sig = sign(
                    &mut c,
                    name,
                    pb::sign_request::Input::Message(b"m".to_vec()),
                )
                .await;
                assert!(openssl_verifies(&dir, pem, *scheme, b"m", &sig), "{name}");
            }
        }
    }
    assert_eq!(decrypt(&mut c, name, 1, &ct1).await.unwrap().0, SECRET);

    // The CLI: `kms public-key`, openssl encrypts, `kms asymmetric-decrypt` (version 1 named,
    // raw and base64).
    let pem = server.kms(&["public-key", "--key", name, "--version", "1"], "");
    assert_eq!(pem.code, Some(0), "{}", pem.stderr);
    assert_eq!(pem.stdout, pem1);
    std::fs::write(dir.join("cli.ct"), &ct1).unwrap();
    let out = server.kms(
        &[
            "asymmetric-decrypt",
            "--key",
            name,
            "--version",
            "1",
            "--in",
            dir.join("cli.ct").to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.as_bytes(), SECRET);
    let b64 = data_encoding::BASE64.encode(&ct2);
    let out = server.kms(&["asymmetric-decrypt", "--key", name, "--base64"], &b64);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        data_encoding::BASE64
            .decode(out.stdout.trim().as_bytes())
            .unwrap(),
        SECRET
    );
    let out = server.kms(
        &[
            "asymmetric-decrypt",
            "--key",
            name,
            "--version",
            "2",
            "--in",
            dir.join("cli.ct").to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("decryption failed"), "{}", out.stderr);

    // Nothing secret in the log (at debug) or the audit log.
    let log = hsm.logs();
    let secret = String::from_utf8_lossy(SECRET);
    assert!(
        !log.contains(secret.as_ref()),
        "the plaintext is in the log"
    );
    assert!(
        log.contains("AsymmetricDecrypt"),
        "calls are logged at debug"
    );
    // SoftHSM 2.6 refuses OAEP with SHA-256: its raw RSA decryption and kms's own
    // constant-time OAEP decoding did the HSM keys' work above.
    assert!(log.contains("kms removes the OAEP padding"), "{log}");
    let export = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(export.code, Some(0), "{}", export.stderr);
    assert!(!export.stdout.contains(secret.as_ref()));
    assert!(export.stdout.contains("\"AsymmetricDecrypt\""));
}
