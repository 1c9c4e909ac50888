//! `kms.v1.KeyManagement`: key administration and cryptography.

use kms_proto::v1 as pb;

use crate::wire::{
    algorithm_from, algorithm_pb, key_pb, origin_from, protection_from, signature_encoding_from,
    wrapping_from,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::with_keyring;
use crate::audit::BatchSummary;
use crate::keyring::material::SignInput;
use crate::keyring::{Import, KeyUpdate, KeyringError, NewKey, ciphertext};
use crate::service::{Aad, Call, Op, Refusal, Served, Service, ServiceError};

/// The most items in one batch.
pub(super) const MAX_BATCH: usize = 1000;

/// The largest answer to a batch: gRPC clients' default receive limit (4 MiB in grpc-core,
/// grpc-java, grpc-go and tonic), so that a client with default settings can read every
/// answer the server agrees to give. A batch whose answer could be larger is refused before
/// any item is done (docs/api.md, "Batch limits").
pub(super) const MAX_BATCH_ANSWER: usize = 4 * 1024 * 1024;

/// An item's error message in a batch answer is cut to this many bytes (the log has it
/// whole), so that an item's answer is bounded whatever failed.
const MAX_ITEM_ERROR: usize = 256;

/// What an item's answer adds to its largest output, at most: the protobuf tags and lengths
/// of the result, of its `ok` or `error` and of their fields, the key version, an error's
/// code. (20 bytes for an `ok`, 13 beside the message for an `error`; a unit test checks.)
const ITEM_FRAMING: usize = 64;

/// What a batch answer holds beside its items, at most.
const ANSWER_FRAMING: usize = 256;

/// The largest signature: RSA-4096's 512 bytes (ECDSA DER is at most 104, Ed25519 64).
const MAX_SIGNATURE: usize = 512;

/// An upper bound on the encoded size of a batch answer whose items' largest outputs
/// (ciphertext, plaintext, signature) are `outputs`: each item
/// counts as the larger of its output and an error message, plus [`ITEM_FRAMING`].
fn answer_bound(outputs: impl Iterator<Item = usize>) -> usize {
    outputs.fold(ANSWER_FRAMING, |sum, out| {
        sum.saturating_add(out.max(MAX_ITEM_ERROR).saturating_add(ITEM_FRAMING))
    })
}

/// The `kms.v1.KeyManagement` service.
#[derive(Debug, Clone)]
pub(crate) struct KeyManagementService {
    ctx: Service,
}

impl KeyManagementService {
    /// A service over the keyring.
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op) -> Call {
        super::call(&self.ctx, req, op)
    }
}

impl Aad for () {}

impl Aad for pb::EncryptRequest {
    fn aads(&self) -> Vec<&[u8]> {
        vec![&self.associated_data]
    }
}

impl Aad for pb::DecryptRequest {
    fn aads(&self) -> Vec<&[u8]> {
        vec![&self.associated_data]
    }
}

impl Aad for pb::ReEncryptRequest {
    fn aads(&self) -> Vec<&[u8]> {
        vec![&self.associated_data]
    }
}

impl Aad for pb::GenerateDataKeyRequest {
    fn aads(&self) -> Vec<&[u8]> {
        vec![&self.associated_data]
    }
}

impl Aad for pb::BatchEncryptRequest {
    fn aads(&self) -> Vec<&[u8]> {
        self.items
            .iter()
            .map(|i| i.associated_data.as_slice())
            .collect()
    }
}

impl Aad for pb::BatchDecryptRequest {
    fn aads(&self) -> Vec<&[u8]> {
        self.items
            .iter()
            .map(|i| i.associated_data.as_slice())
            .collect()
    }
}

impl Aad for pb::BatchReEncryptRequest {
    fn aads(&self) -> Vec<&[u8]> {
        self.items
            .iter()
            .map(|i| i.associated_data.as_slice())
            .collect()
    }
}

fn item_error(e: KeyringError) -> pb::ItemError {
    let refusal = Refusal::from(&ServiceError::Keyring(e));
    pb::ItemError {
        code: super::code_of(refusal.kind) as i32,
        message: cut(&refusal.message, MAX_ITEM_ERROR).to_owned(),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Runs `f` on each item of a batch: each item's result (an `ItemError` for a failed
/// item) and the batch's audit summary (items per outcome, successful items per version).
fn each_item<I, O>(
    items: &[I],
    mut f: impl FnMut(&I) -> Result<(O, u32), KeyringError>,
) -> (Vec<Result<O, pb::ItemError>>, BatchSummary) {
    let mut summary = BatchSummary::default();
    let results = items
        .iter()
        .map(|item| {
            summary.items += 1;
            let (outcome, result) = match f(item) {
                Ok((out, version)) => {
                    *summary.versions.entry(version).or_default() += 1;
                    ("OK", Ok(out))
                }
                Err(e) => {
                    let e = item_error(e);
                    (super::code_name(tonic::Code::from_i32(e.code)), Err(e))
                }
            };
            *summary.outcomes.entry(outcome.to_owned()).or_default() += 1;
            result
        })
        .collect();
    (results, summary)
}

/// Refuses, before any item is done, a batch of no items, of too many, or whose answer
/// could be larger than [`MAX_BATCH_ANSWER`] given its items' largest `outputs`.
fn check_batch(n: usize, outputs: impl Iterator<Item = usize>) -> Result<(), KeyringError> {
    if n == 0 {
        return Err(KeyringError::BadRequest("the batch has no items"));
    }
    if n > MAX_BATCH {
        return Err(KeyringError::TooManyItems {
            count: n,
            max: MAX_BATCH,
        });
    }
    let bound = answer_bound(outputs);
    if bound > MAX_BATCH_ANSWER {
        return Err(KeyringError::BatchTooLarge {
            bound,
            max: MAX_BATCH_ANSWER,
        });
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::key_management_server::KeyManagement for KeyManagementService {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self
            .call(&request, Op::CreateKey)
            .key(&request.get_ref().name);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            let meta = k.create_key(
                NewKey {
                    name: r.name,
                    algorithm: algorithm_from(r.algorithm)?,
                    protection: protection_from(r.protection_level)?,
                    rotation_period: Some(r.rotation_period_seconds).filter(|p| *p != 0),
                    labels: r.labels.into_iter().collect(),
                    origin: origin_from(r.origin)?,
                },
                c,
            )?;
            Ok(Served::new(key_pb(&meta)).version(meta.primary))
        })
        .await
    }

    async fn get_import_parameters(
        &self,
        request: Request<pb::GetImportParametersRequest>,
    ) -> Result<Response<pb::GetImportParametersResponse>, Status> {
        let call = self
            .call(&request, Op::GetImportParameters)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            let p = k.import_parameters(&r.key, u64::from(r.valid_for_seconds), c)?;
            Ok(Served::new(pb::GetImportParametersResponse {
                wrapping_public_key_pem: p.wrapping_public_pem,
                import_token: p.token,
                expire_time: i64::try_from(p.expires_at).unwrap_or(i64::MAX),
                wrapping_algorithms: vec![
                    pb::WrappingAlgorithm::RsaAesKeyWrapSha256 as i32,
                    pb::WrappingAlgorithm::RsaesOaepSha256 as i32,
                ],
            }))
        })
        .await
    }

    async fn import_key_material(
        &self,
        request: Request<pb::ImportKeyMaterialRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self
            .call(&request, Op::ImportKeyMaterial)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            let meta = k.import_material(
                Import {
                    name: &r.key,
                    token: &r.import_token,
                    wrapping: wrapping_from(r.wrapping_algorithm)?,
                    wrapped: &r.wrapped_material,
                    public_key_pem: Some(r.public_key_pem.as_str()).filter(|p| !p.is_empty()),
                },
                c,
            )?;
            Ok(Served::new(key_pb(&meta)).version(meta.primary))
        })
        .await
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self.call(&request, Op::GetKey).key(&request.get_ref().name);
        let name = request.into_inner().name;
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            Ok(Served::new(key_pb(&k.get_key(&name)?)))
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let call = self.call(&request, Op::ListKeys);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let (keys, next) = k.list_keys(
                usize::try_from(r.page_size).unwrap_or(usize::MAX),
                &r.page_token,
            )?;
            Ok(Served::new(pb::ListKeysResponse {
                keys: keys.iter().map(key_pb).collect(),
                next_page_token: next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self
            .call(&request, Op::RotateKey)
            .key(&request.get_ref().name);
        let name = request.into_inner().name;
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            let meta = k.rotate_key(&name, c)?;
            Ok(Served::new(key_pb(&meta)).version(meta.primary))
        })
        .await
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self
            .call(&request, Op::UpdateKey)
            .key(&request.get_ref().name);
        let r = request.into_inner();
        let update = KeyUpdate {
            rotation_period: r
                .rotation_period_seconds
                .map(|p| Some(p).filter(|p| *p != 0)),
            min_decryption_version: r.min_decryption_version,
            labels: r.update_labels.then(|| r.labels.into_iter().collect()),
        };
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            Ok(Served::new(key_pb(&k.update_key(&r.name, update, c)?)))
        })
        .await
    }

    async fn enable_key_version(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::EnableKeyVersion)
            .key(&r.name)
            .version(r.version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            Ok(Served::new(key_pb(
                &k.enable_version(&r.name, r.version, c)?,
            )))
        })
        .await
    }

    async fn disable_key_version(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::DisableKeyVersion)
            .key(&r.name)
            .version(r.version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            Ok(Served::new(key_pb(
                &k.disable_version(&r.name, r.version, c)?,
            )))
        })
        .await
    }

    async fn schedule_key_version_destruction(
        &self,
        request: Request<pb::ScheduleKeyVersionDestructionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::ScheduleKeyVersionDestruction)
            .key(&r.name)
            .version(r.version);
        let r = request.into_inner();
        let days = if r.pending_days == 0 {
            7
        } else {
            r.pending_days
        };
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            Ok(Served::new(key_pb(
                &k.schedule_destruction(&r.name, r.version, days, c)?,
            )))
        })
        .await
    }

    async fn cancel_key_version_destruction(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::CancelKeyVersionDestruction)
            .key(&r.name)
            .version(r.version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            Ok(Served::new(key_pb(
                &k.cancel_destruction(&r.name, r.version, c)?,
            )))
        })
        .await
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let call = self.call(&request, Op::Encrypt).key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, mut r| {
            let pt = Zeroizing::new(std::mem::take(&mut r.plaintext));
            let (ciphertext, key_version) = k.encrypt(&r.key, &pt, &r.associated_data)?;
            Ok(Served::new(pb::EncryptResponse {
                ciphertext,
                key_version,
            })
            .version(key_version))
        })
        .await
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let call = self.call(&request, Op::Decrypt).key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            let (pt, key_version) = k.decrypt(&r.key, &r.ciphertext, &r.associated_data)?;
            Ok(Served::new(pb::DecryptResponse {
                plaintext: pt.to_vec(),
                key_version,
            })
            .version(key_version))
        })
        .await
    }

    async fn re_encrypt(
        &self,
        request: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        let r = request.get_ref();
        let destination = destination_of(&r.key, &r.destination_key);
        let call = self
            .call(&request, Op::ReEncrypt)
            .key(&r.key)
            .destination(&destination);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            let made = k.reencrypt(
                &r.key,
                &r.ciphertext,
                &r.associated_data,
                Some(&destination),
            )?;
            Ok(Served::new(pb::ReEncryptResponse {
                ciphertext: made.ciphertext,
                key_version: made.version,
                key: destination.clone(),
            })
            .version(made.source_version)
            .destination(destination, made.version))
        })
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let call = self
            .call(&request, Op::GenerateDataKey)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            let (dk, ciphertext, key_version) =
                k.generate_data_key(&r.key, data_key_len(r.length_bytes), &r.associated_data)?;
            Ok(Served::new(pb::GenerateDataKeyResponse {
                plaintext: dk.to_vec(),
                ciphertext,
                key_version,
            })
            .version(key_version))
        })
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let call = self
            .call(&request, Op::GenerateDataKeyWithoutPlaintext)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            let (_dk, ciphertext, key_version) =
                k.generate_data_key(&r.key, data_key_len(r.length_bytes), &r.associated_data)?;
            Ok(Served::new(pb::GenerateDataKeyWithoutPlaintextResponse {
                ciphertext,
                key_version,
            })
            .version(key_version))
        })
        .await
    }

    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let call = self.call(&request, Op::Sign).key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let encoding = signature_encoding_from(r.format)?;
            let (signature, key_version) = k.sign(
                &r.key,
                sign_input(r.input.as_ref().map(SignOneof::Request))?,
                encoding,
            )?;
            Ok(Served::new(pb::SignResponse {
                signature,
                key_version,
            })
            .version(key_version))
        })
        .await
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::Verify)
            .key(&r.key)
            .version(r.key_version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let input = match &r.input {
                Some(pb::verify_request::Input::Message(m)) => SignInput::Message(m),
                Some(pb::verify_request::Input::Digest(d)) => SignInput::Digest(d),
                None => return Err(KeyringError::BadRequest("give the message or its digest")),
            };
            let valid = k.verify(&r.key, r.key_version, input, &r.signature)?;
            Ok(Served::new(pb::VerifyResponse { valid }))
        })
        .await
    }

    async fn get_public_key(
        &self,
        request: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::GetPublicKey)
            .key(&r.key)
            .version(r.key_version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let (pem, key_version) = k.public_key(&r.key, r.key_version)?;
            let algorithm = k.get_key(&r.key)?.algorithm;
            Ok(Served::new(pb::GetPublicKeyResponse {
                pem,
                key_version,
                algorithm: algorithm_pb(algorithm) as i32,
            })
            .version(key_version))
        })
        .await
    }

    async fn asymmetric_decrypt(
        &self,
        request: Request<pb::AsymmetricDecryptRequest>,
    ) -> Result<Response<pb::AsymmetricDecryptResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::AsymmetricDecrypt)
            .key(&r.key)
            .version(r.key_version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let (pt, key_version) = k.asymmetric_decrypt(&r.key, r.key_version, &r.ciphertext)?;
            Ok(Served::new(pb::AsymmetricDecryptResponse {
                plaintext: pt.to_vec(),
                key_version,
            })
            .version(key_version))
        })
        .await
    }

    async fn mac(
        &self,
        request: Request<pb::MacRequest>,
    ) -> Result<Response<pb::MacResponse>, Status> {
        let call = self.call(&request, Op::Mac).key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let (mac, key_version) = k.mac(&r.key, &r.message)?;
            Ok(Served::new(pb::MacResponse { mac, key_version }).version(key_version))
        })
        .await
    }

    async fn verify_mac(
        &self,
        request: Request<pb::VerifyMacRequest>,
    ) -> Result<Response<pb::VerifyMacResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::VerifyMac)
            .key(&r.key)
            .version(r.key_version);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let valid = k.verify_mac(&r.key, r.key_version, &r.message, &r.mac)?;
            Ok(Served::new(pb::VerifyMacResponse { valid }))
        })
        .await
    }

    async fn batch_encrypt(
        &self,
        request: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        let call = self
            .call(&request, Op::BatchEncrypt)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            // A ciphertext is its plaintext and the format's overhead.
            check_batch(
                r.items.len(),
                r.items
                    .iter()
                    .map(|i| i.plaintext.len().saturating_add(ciphertext::OVERHEAD)),
            )?;
            let (results, summary) = each_item(&r.items, |item| {
                let (ciphertext, key_version) =
                    k.encrypt(&r.key, &item.plaintext, &item.associated_data)?;
                Ok((
                    pb::EncryptResponse {
                        ciphertext,
                        key_version,
                    },
                    key_version,
                ))
            });
            let results = results
                .into_iter()
                .map(|r| pb::BatchEncryptResult {
                    result: Some(match r {
                        Ok(o) => pb::batch_encrypt_result::Result::Ok(o),
                        Err(e) => pb::batch_encrypt_result::Result::Error(e),
                    }),
                })
                .collect();
            Ok(Served::new(pb::BatchEncryptResponse { results }).batch(summary))
        })
        .await
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let call = self
            .call(&request, Op::BatchDecrypt)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            // A plaintext is shorter than its ciphertext.
            check_batch(r.items.len(), r.items.iter().map(|i| i.ciphertext.len()))?;
            let (results, summary) = each_item(&r.items, |item| {
                let (pt, key_version) =
                    k.decrypt(&r.key, &item.ciphertext, &item.associated_data)?;
                Ok((
                    pb::DecryptResponse {
                        plaintext: pt.to_vec(),
                        key_version,
                    },
                    key_version,
                ))
            });
            let results = results
                .into_iter()
                .map(|r| pb::BatchDecryptResult {
                    result: Some(match r {
                        Ok(o) => pb::batch_decrypt_result::Result::Ok(o),
                        Err(e) => pb::batch_decrypt_result::Result::Error(e),
                    }),
                })
                .collect();
            Ok(Served::new(pb::BatchDecryptResponse { results }).batch(summary))
        })
        .await
    }

    async fn batch_sign(
        &self,
        request: Request<pb::BatchSignRequest>,
    ) -> Result<Response<pb::BatchSignResponse>, Status> {
        let call = self
            .call(&request, Op::BatchSign)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            check_batch(r.items.len(), r.items.iter().map(|_| MAX_SIGNATURE))?;
            let encoding = signature_encoding_from(r.format)?;
            let (results, summary) = each_item(&r.items, |item| {
                let input = sign_input(item.input.as_ref().map(SignOneof::Item))?;
                let (signature, key_version) = k.sign(&r.key, input, encoding)?;
                Ok((
                    pb::SignResponse {
                        signature,
                        key_version,
                    },
                    key_version,
                ))
            });
            let results = results
                .into_iter()
                .map(|r| pb::BatchSignResult {
                    result: Some(match r {
                        Ok(o) => pb::batch_sign_result::Result::Ok(o),
                        Err(e) => pb::batch_sign_result::Result::Error(e),
                    }),
                })
                .collect();
            Ok(Served::new(pb::BatchSignResponse { results }).batch(summary))
        })
        .await
    }

    async fn batch_re_encrypt(
        &self,
        request: Request<pb::BatchReEncryptRequest>,
    ) -> Result<Response<pb::BatchReEncryptResponse>, Status> {
        let r = request.get_ref();
        let destination = destination_of(&r.key, &r.destination_key);
        // As ReEncrypt: `with_keyring` checks reencrypt-from on the key and reencrypt-to on
        // the destination, against every item's associated data.
        let call = self
            .call(&request, Op::BatchReEncrypt)
            .key(&r.key)
            .destination(&destination);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, _, r| {
            // The new ciphertext is as long as the old: the same plaintext, the same format.
            // (So whatever one BatchEncrypt made, one BatchReEncrypt moves.)
            check_batch(r.items.len(), r.items.iter().map(|i| i.ciphertext.len()))?;
            let mut made_by = std::collections::BTreeSet::new();
            // The summary counts the source versions read, as BatchDecrypt's does.
            let (results, summary) = each_item(&r.items, |item| {
                let made = k.reencrypt(
                    &r.key,
                    &item.ciphertext,
                    &item.associated_data,
                    Some(&destination),
                )?;
                made_by.insert(made.version);
                Ok((
                    pb::EncryptResponse {
                        ciphertext: made.ciphertext,
                        key_version: made.version,
                    },
                    made.source_version,
                ))
            });
            let results = results
                .into_iter()
                .map(|r| pb::BatchReEncryptResult {
                    result: Some(match r {
                        Ok(o) => pb::batch_re_encrypt_result::Result::Ok(o),
                        Err(e) => pb::batch_re_encrypt_result::Result::Error(e),
                    }),
                })
                .collect();
            let served = Served::new(pb::BatchReEncryptResponse {
                results,
                key: destination.clone(),
            })
            .batch(summary);
            // The destination's version, when one made every new ciphertext (the key may
            // rotate within a batch at 3/4 of its nonce budget; then the record names none).
            let mut made_by = made_by.into_iter();
            Ok(match (made_by.next(), made_by.next()) {
                (Some(v), None) => served.destination(destination, v),
                _ => served,
            })
        })
        .await
    }
}

/// A data key's length: 32 bytes unless given.
fn data_key_len(length_bytes: u32) -> usize {
    if length_bytes == 0 {
        32
    } else {
        usize::try_from(length_bytes).unwrap_or(usize::MAX)
    }
}

/// The two generated `input` oneofs that carry a message or a digest.
enum SignOneof<'a> {
    Request(&'a pb::sign_request::Input),
    Item(&'a pb::sign_item::Input),
}

fn sign_input(input: Option<SignOneof<'_>>) -> Result<SignInput<'_>, KeyringError> {
    match input {
        Some(SignOneof::Request(pb::sign_request::Input::Message(m)))
        | Some(SignOneof::Item(pb::sign_item::Input::Message(m))) => Ok(SignInput::Message(m)),
        Some(SignOneof::Request(pb::sign_request::Input::Digest(d)))
        | Some(SignOneof::Item(pb::sign_item::Input::Digest(d))) => Ok(SignInput::Digest(d)),
        None => Err(KeyringError::BadRequest("give the message or its digest")),
    }
}

/// ReEncrypt's destination: the key named, or the source key when none is (a re-encryption
/// under the key's primary version).
fn destination_of(key: &str, destination_key: &str) -> String {
    if destination_key.is_empty() {
        key
    } else {
        destination_key
    }
    .to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// The largest answer each item can have, a success or an error, is within the bound
    /// `check_batch` computes from the items: so an accepted batch's answer fits.
    #[test]
    fn the_answer_bound_holds_for_the_largest_items() {
        let name = "n".repeat(128);
        let long_error = "é".repeat(1000);
        for ct_len in [0, 1, 33, 255, 256, 300, 4096, 65_569, 1 << 21, 3 << 20] {
            for n in [1, 7, 1000] {
                let ok = pb::BatchReEncryptResult {
                    result: Some(pb::batch_re_encrypt_result::Result::Ok(
                        pb::EncryptResponse {
                            ciphertext: vec![0xff; ct_len],
                            key_version: u32::MAX,
                        },
                    )),
                };
                let error = pb::BatchReEncryptResult {
                    result: Some(pb::batch_re_encrypt_result::Result::Error(pb::ItemError {
                        code: tonic::Code::Unauthenticated as i32,
                        message: cut(&long_error, MAX_ITEM_ERROR).to_owned(),
                    })),
                };
                for item in [ok, error] {
                    let answer = pb::BatchReEncryptResponse {
                        results: vec![item; n],
                        key: name.clone(),
                    };
                    let bound = answer_bound((0..n).map(|_| ct_len));
                    assert!(
                        answer.encoded_len() <= bound,
                        "{} > {bound} ({n} items of {ct_len})",
                        answer.encoded_len()
                    );
                }
            }
        }
    }

    #[test]
    fn error_messages_are_cut_on_a_character_boundary() {
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("aé", 3), "aé");
        let e = item_error(KeyringError::NotFound("k".repeat(128) + &"é".repeat(200)));
        assert!(e.message.len() <= MAX_ITEM_ERROR, "{}", e.message.len());
        assert!(e.message.starts_with("no key named"));
    }

    /// The documented edges (docs/api.md): 1000 items of 4097 bytes to encrypt fit, 4098
    /// do not; the same for 1000 ciphertexts of 4130 and 4131 bytes to decrypt.
    #[test]
    fn the_documented_edges() {
        let encrypt = |p: usize| check_batch(1000, (0..1000).map(|_| p + ciphertext::OVERHEAD));
        assert!(encrypt(4097).is_ok());
        assert!(matches!(
            encrypt(4098),
            Err(KeyringError::BatchTooLarge {
                bound: 4_195_256,
                max: 4_194_304
            })
        ));
        let decrypt = |c: usize| check_batch(1000, (0..1000).map(|_| c));
        assert!(decrypt(4130).is_ok());
        assert!(decrypt(4131).is_err());
        // A single item of the largest plaintext always fits.
        assert!(check_batch(1, std::iter::once(64 * 1024 + ciphertext::OVERHEAD)).is_ok());
        // 63 such items fit, 64 do not.
        let big = |n: usize| check_batch(n, (0..n).map(|_| 64 * 1024 + ciphertext::OVERHEAD));
        assert!(big(63).is_ok());
        assert!(big(64).is_err());
        // Small items count as an error message: 1000 of them always fit.
        assert!(check_batch(1000, (0..1000).map(|_| 0)).is_ok());
        assert!(check_batch(1001, (0..1001).map(|_| 0)).is_err());
        assert!(check_batch(0, std::iter::empty()).is_err());
    }
}
