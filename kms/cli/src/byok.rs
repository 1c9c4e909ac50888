//! `kms key import-parameters` and `kms key import`: bring your own key (docs/byok.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kms::keyring::Wrapping;
use kms::keyring::wrap;
use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::BoxError;
use crate::Answer as _;

type Client = KeyManagementClient<Channel>;

/// The file names `import-parameters` writes.
const WRAPPING_KEY_FILE: &str = "wrapping-key.pem";
const TOKEN_FILE: &str = "import-token.bin";

/// Where `kms key import` gets the material.
pub(super) enum Source {
    /// Plain material: wrapped here with fresh import parameters.
    Material(PathBuf),
    /// Material wrapped elsewhere, its token, and (EC, Ed25519) its public key.
    Wrapped {
        wrapped: PathBuf,
        token: PathBuf,
        public_key: Option<PathBuf>,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, BoxError> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()).into())
}

/// Writes the import parameters of `name` to `out`.
pub(super) async fn import_parameters(
    c: &mut Client,
    name: String,
    out: &Path,
    valid_for: Option<u64>,
) -> Result<ExitCode, BoxError> {
    let valid_for_seconds =
        u32::try_from(valid_for.unwrap_or(0)).map_err(|_| "--valid-for is at most 24h")?;
    let p = c
        .get_import_parameters(pb::GetImportParametersRequest {
            key: name.clone(),
            valid_for_seconds,
        })
        .answer()
        .await?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot make {}: {e}", out.display()))?;
    let write = |file: &str, bytes: &[u8]| {
        let path = out.join(file);
        std::fs::write(&path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(WRAPPING_KEY_FILE, p.wrapping_public_key_pem.as_bytes())?;
    write(TOKEN_FILE, &p.import_token)?;
    println!(
        "Wrapping key  {} (RSA 4096; wrap with RSA_AES_KEY_WRAP_SHA_256 or RSAES_OAEP_SHA_256)",
        out.join(WRAPPING_KEY_FILE).display()
    );
    println!("Import token  {}", out.join(TOKEN_FILE).display());
    println!(
        "Valid until   {}",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(p.expire_time).unwrap_or(0))
        )
    );
    println!(
        "Then          kms key import {name} --wrapped FILE --token {}",
        out.join(TOKEN_FILE).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Imports material into `name`; the key as it is after.
pub(super) async fn import(
    c: &mut Client,
    name: String,
    source: Source,
    wrapping: Wrapping,
) -> Result<pb::Key, BoxError> {
    let (import_token, wrapped_material, public_key_pem) = match source {
        Source::Material(path) => {
            let key = c
                .get_key(pb::GetKeyRequest { name: name.clone() })
                .answer()
                .await?;
            let algorithm = kms::wire::algorithm_from_pb(key.algorithm)
                .ok_or("the server named an algorithm this CLI does not know")?;
            let material = wrap::material_bytes(&Zeroizing::new(read(&path)?))?;
            let public = wrap::material_public_pem(algorithm, &material)?;
            let p = c
                .get_import_parameters(pb::GetImportParametersRequest {
                    key: name.clone(),
                    valid_for_seconds: 0,
                })
                .answer()
                .await?;
            let wrapped = wrap::wrap(&p.wrapping_public_key_pem, wrapping, &material)?;
            (p.import_token, wrapped, public.unwrap_or_default())
        }
        Source::Wrapped {
            wrapped,
            token,
            public_key,
        } => {
            let public = match public_key {
                Some(p) => String::from_utf8(read(&p)?)
                    .map_err(|_| format!("{} is not a PEM file", p.display()))?,
                None => String::new(),
            };
            (read(&token)?, read(&wrapped)?, public)
        }
    };
    Ok(c.import_key_material(pb::ImportKeyMaterialRequest {
        key: name,
        import_token,
        wrapping_algorithm: match wrapping {
            Wrapping::RsaAesKeyWrapSha256 => pb::WrappingAlgorithm::RsaAesKeyWrapSha256,
            Wrapping::RsaesOaepSha256 => pb::WrappingAlgorithm::RsaesOaepSha256,
        } as i32,
        wrapped_material,
        public_key_pem,
    })
    .answer()
    .await?)
}
