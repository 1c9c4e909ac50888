//! `kms-echo`: the transport ceiling for `kms-load`.
//!
//! The same tonic and rustls stack as kms, the same `kms.v1.KeyManagement` service and
//! message sizes, mTLS with a required client certificate, but no crypto, no audit, no
//! keyring: each call answers at once with a response of the size kms would send (an AES-GCM
//! ciphertext is the plaintext plus 28 bytes of nonce and tag, plus the format's header). What
//! kms reaches against it, in the same run, is the ratio that matters.
//!
//! ```text
//! kms-echo --listen 127.0.0.1:8300 --cert server.pem --cert-key server-key.pem --client-ca ca.pem
//! ```
//! It prints `kms-echo listening on ADDR` and serves until killed.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kms_proto::v1 as pb;
use kms_proto::v1::key_management_server::{KeyManagement, KeyManagementServer};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(
    name = "kms-echo",
    about = "The transport ceiling: kms's API with no work behind it"
)]
struct Args {
    /// Where to listen (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    cert_key: PathBuf,
    /// The CA that signs client certificates: a client certificate is required, as by kms.
    #[arg(long)]
    client_ca: PathBuf,
}

/// The bytes kms's ciphertext adds to a plaintext: format byte, version, nonce and tag
/// (docs/formats.md).
const CIPHERTEXT_OVERHEAD: usize = 33;

struct Echo;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "kms-echo answers only the calls kms-load makes",
    ))
}

#[tonic::async_trait]
impl KeyManagement for Echo {
    async fn create_key(
        &self,
        _: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn get_key(&self, _: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        unimplemented()
    }
    async fn rotate_key(
        &self,
        _: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn update_key(
        &self,
        _: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn enable_key_version(
        &self,
        _: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn disable_key_version(
        &self,
        _: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn schedule_key_version_destruction(
        &self,
        _: Request<pb::ScheduleKeyVersionDestructionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn cancel_key_version_destruction(
        &self,
        _: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn encrypt(
        &self,
        r: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let n = r.get_ref().plaintext.len();
        Ok(Response::new(pb::EncryptResponse {
            ciphertext: vec![0x42; n + CIPHERTEXT_OVERHEAD],
            key_version: 1,
        }))
    }
    async fn decrypt(
        &self,
        r: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let n = r.get_ref().ciphertext.len();
        Ok(Response::new(pb::DecryptResponse {
            plaintext: vec![0x42; n.saturating_sub(CIPHERTEXT_OVERHEAD)],
            key_version: 1,
        }))
    }
    async fn re_encrypt(
        &self,
        _: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        unimplemented()
    }
    async fn generate_data_key(
        &self,
        r: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let n = r.get_ref().length_bytes as usize;
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext: vec![0x42; n],
            ciphertext: vec![0x42; n + CIPHERTEXT_OVERHEAD],
            key_version: 1,
        }))
    }
    async fn generate_data_key_without_plaintext(
        &self,
        _: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        unimplemented()
    }
    async fn sign(
        &self,
        _: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        // An ECDSA P-256 signature in DER is about 71 bytes.
        Ok(Response::new(pb::SignResponse {
            signature: vec![0x42; 71],
            key_version: 1,
        }))
    }
    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        unimplemented()
    }
    async fn get_public_key(
        &self,
        _: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        unimplemented()
    }
    async fn get_import_parameters(
        &self,
        _: Request<pb::GetImportParametersRequest>,
    ) -> Result<Response<pb::GetImportParametersResponse>, Status> {
        unimplemented()
    }
    async fn import_key_material(
        &self,
        _: Request<pb::ImportKeyMaterialRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        unimplemented()
    }
    async fn asymmetric_decrypt(
        &self,
        _: Request<pb::AsymmetricDecryptRequest>,
    ) -> Result<Response<pb::AsymmetricDecryptResponse>, Status> {
        unimplemented()
    }
    async fn mac(&self, _: Request<pb::MacRequest>) -> Result<Response<pb::MacResponse>, Status> {
        Ok(Response::new(pb::MacResponse {
            mac: vec![0x42; 32],
            key_version: 1,
        }))
    }
    async fn verify_mac(
        &self,
        _: Request<pb::VerifyMacRequest>,
    ) -> Result<Response<pb::VerifyMacResponse>, Status> {
        unimplemented()
    }
    async fn batch_encrypt(
        &self,
        r: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        let results = r
            .get_ref()
            .items
            .iter()
            .map(|i| pb::BatchEncryptResult {
                result: Some(pb::batch_encrypt_result::Result::Ok(pb::EncryptResponse {
                    ciphertext: vec![0x42; i.plaintext.len() + CIPHERTEXT_OVERHEAD],
                    key_version: 1,
                })),
            })
            .collect();
        Ok(Response::new(pb::BatchEncryptResponse { results }))
    }
    async fn batch_decrypt(
        &self,
        _: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        unimplemented()
    }
    async fn batch_sign(
        &self,
        _: Request<pb::BatchSignRequest>,
    ) -> Result<Response<pb::BatchSignResponse>, Status> {
        unimplemented()
    }
    async fn batch_re_encrypt(
        &self,
        _: Request<pb::BatchReEncryptRequest>,
    ) -> Result<Response<pb::BatchReEncryptResponse>, Status> {
        unimplemented()
    }
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                std::fs::read(&args.cert)?,
                std::fs::read(&args.cert_key)?,
            ))
            .client_ca_root(Certificate::from_pem(std::fs::read(&args.client_ca)?));
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("kms-echo listening on {}", listener.local_addr()?);
        // TCP_NODELAY, as kms sets on every connection: without it a 1 KiB answer waits for
        // the peer's delayed ACK (about 40 ms), and the ceiling would be a floor.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        Server::builder()
            .tls_config(tls)?
            .add_service(KeyManagementServer::new(Echo).max_decoding_message_size(16 * 1024 * 1024))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
