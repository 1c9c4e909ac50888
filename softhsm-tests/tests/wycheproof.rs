//! Project Wycheproof's RSA-OAEP (SHA-256, MGF1-SHA-256) vectors through a real server:
//! each group's private key imported (bring your own key) into a SOFTWARE key and an HSM
//! key, then every test's ciphertext through `AsymmetricDecrypt`. On SoftHSM the HSM keys
//! decrypt with raw RSA in the token and kms's own constant-time OAEP decoding, so the
//! vectors' malformed paddings test that code; the SOFTWARE keys test `rsa` 0.10's.
//! (The RSA-PSS and ECDSA P-384 files give public keys only: kms/src/keyring/material.rs
//! runs them through the verifier; softhsm-tests/wycheproof/README.md.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kms::keyring::{Wrapping, wrap};
use kms_proto::v1 as pb;
use softhsm_tests::{TestHsm, start_unsealed};
use tonic::Code;

fn hex(v: &serde_json::Value) -> Vec<u8> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(v.as_str().unwrap().as_bytes())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wycheproof_rsa_oaep_vectors_through_asymmetric_decrypt_with_imported_keys() {
    let hsm = TestHsm::new("kms-wycheproof");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    let mut c = server.keys().await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("wycheproof");
    let mut report = Vec::new();
    for (file, algorithm) in [
        (
            "rsa_oaep_2048_sha256_mgf1sha256_test.json",
            pb::Algorithm::RsaDecryptOaep2048Sha256,
        ),
        (
            "rsa_oaep_4096_sha256_mgf1sha256_test.json",
            pb::Algorithm::RsaDecryptOaep4096Sha256,
        ),
    ] {
        let set: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        for (protection, p) in [
            (pb::ProtectionLevel::Software, "sw"),
            (pb::ProtectionLevel::Hsm, "hsm"),
        ] {
            let (mut valid, mut invalid, mut labelled) = (0, 0, 0);
            for (n, g) in set["testGroups"].as_array().unwrap().iter().enumerate() {
                assert_eq!(g["sha"], "SHA-256");
                assert_eq!(g["mgfSha"], "SHA-256");
                let name = format!("wp-{}-{n}-{p}", g["keySize"]);
                c.create_key(pb::CreateKeyRequest {
                    name: name.clone(),
                    algorithm: algorithm as i32,
                    protection_level: protection as i32,
                    origin: pb::KeyOrigin::External as i32,
                    ..Default::default()
                })
                .await
                .unwrap();
                server.grant_all(&name).await;
                let params = c
                    .get_import_parameters(pb::GetImportParametersRequest {
                        key: name.clone(),
                        valid_for_seconds: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let wrapped = wrap::wrap(
                    &params.wrapping_public_key_pem,
                    Wrapping::RsaAesKeyWrapSha256,
                    &hex(&g["privateKeyPkcs8"]),
                )
                .unwrap();
                c.import_key_material(pb::ImportKeyMaterialRequest {
                    key: name.clone(),
                    import_token: params.import_token,
                    wrapping_algorithm: pb::WrappingAlgorithm::RsaAesKeyWrapSha256 as i32,
                    wrapped_material: wrapped,
                    public_key_pem: String::new(),
                })
                .await
                .unwrap();
                for t in g["tests"].as_array().unwrap() {
                    if !hex(&t["label"]).is_empty() {
                        // kms's OAEP has no label: not applicable.
                        labelled += 1;
                        continue;
                    }
                    let id = &t["tcId"];
                    let r = c
                        .asymmetric_decrypt(pb::AsymmetricDecryptRequest {
                            key: name.clone(),
                            key_version: 1,
                            ciphertext: hex(&t["ct"]),
                        })
                        .await;
                    match t["result"].as_str().unwrap() {
                        "valid" => {
                            let pt = r
                                .unwrap_or_else(|e| panic!("{file} {p} #{id}: {e:?}"))
                                .into_inner()
                                .plaintext;
                            assert_eq!(pt, hex(&t["msg"]), "{file} {p} #{id}");
                            valid += 1;
                        }
                        "invalid" => {
                            let e = r.expect_err(&format!("{file} {p} #{id} must fail"));
                            assert_eq!(e.code(), Code::InvalidArgument, "{file} {p} #{id}");
                            // One answer, whatever was wrong (a ciphertext over the largest
                            // modulus is refused by its size before any decryption).
                            assert!(
                                e.message() == "decryption failed"
                                    || e.message().starts_with("the ciphertext is"),
                                "{file} {p} #{id}: {}",
                                e.message()
                            );
                            invalid += 1;
                        }
                        other => panic!("{file} #{id}: result {other}"),
                    }
                }
            }
            assert!(valid > 0 && invalid > 0, "{file} {p}");
            // Every vector of the file was run or set aside for its label: none was lost.
            let tests = set["numberOfTests"].as_u64().unwrap();
            let groups: usize = set["testGroups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["tests"].as_array().unwrap().len())
                .sum();
            assert_eq!(groups as u64, tests, "{file}: numberOfTests");
            assert_eq!(valid + invalid + labelled, tests, "{file} {p}");
            report.push(format!(
                "{file} {p}: {valid} valid decrypted, {invalid} invalid refused, {labelled} with a label not applicable"
            ));
        }
    }
    // The counts, for the record (cargo test -- --nocapture).
    for line in &report {
        eprintln!("{line}");
    }
    assert_eq!(report.len(), 4);
}
