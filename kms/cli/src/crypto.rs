//! The crypto commands (`kms encrypt|decrypt|reencrypt|datakey|sign|verify|public-key|
//! asymmetric-decrypt|mac|verify-mac`): one function each, and the input, output and associated data they share.
//!
//! Data comes from `--in FILE` or standard input and goes to `--out FILE` or standard
//! output, as bytes. With `--base64`, binary outputs (ciphertext, plaintext from decrypt,
//! signatures, MACs) are written base64, and binary inputs that are ours (ciphertexts,
//! signatures, MACs) are read base64. `verify` and `verify-mac` exit 0 when valid and 3 when
//! not (1 is an error).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::BoxError;
use crate::Answer as _;

/// The exit code of `verify` / `verify-mac` for an invalid signature or MAC.
const EXIT_INVALID: u8 = 3;

/// Input and output of the crypto commands.
#[derive(Debug, Args)]
pub(super) struct Io {
    /// Read the input from this file (default: standard input).
    #[arg(long = "in")]
    input: Option<PathBuf>,
    /// Write the output to this file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Binary outputs and inputs of ours in base64.
    #[arg(long)]
    base64: bool,
}

/// Associated data (encryption context).
#[derive(Debug, Args)]
pub(super) struct Aad {
    /// Associated data, as text.
    #[arg(long, conflicts_with = "aad_file")]
    aad: Option<String>,
    /// Associated data, from a file.
    #[arg(long)]
    aad_file: Option<PathBuf>,
}

/// The crypto commands.
#[derive(Debug, Subcommand)]
pub(super) enum CryptoCommand {
    /// Encrypt up to 64 KiB under a key's primary version.
    Encrypt {
        /// The key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        io: Io,
        #[command(flatten)]
        aad: Aad,
    },
    /// Decrypt a ciphertext.
    Decrypt {
        /// The key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        io: Io,
        #[command(flatten)]
        aad: Aad,
    },
    /// Re-encrypt a ciphertext under a key's primary version (or another key), without
    /// revealing the plaintext.
    Reencrypt {
        /// The key the ciphertext is under.
        #[arg(long)]
        key: String,
        /// The key to re-encrypt under (default: the same key).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        io: Io,
        #[command(flatten)]
        aad: Aad,
    },
    /// Decrypt what was encrypted with an RSA-OAEP key's public key (`kms public-key`), e.g.
    /// by `openssl pkeyutl -encrypt -pkeyopt rsa_padding_mode:oaep -pkeyopt
    /// rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256`.
    AsymmetricDecrypt {
        /// The key.
        #[arg(long)]
        key: String,
        /// The version whose public key encrypted (default: the primary).
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        io: Io,
    },
    /// Make a data key for envelope encryption; prints JSON with base64 fields.
    Datakey {
        /// The key that encrypts the data key.
        #[arg(long)]
        key: String,
        /// Data key length in bytes, 1..=64.
        #[arg(long, default_value_t = 32)]
        length: u32,
        /// Return only the encrypted data key.
        #[arg(long)]
        no_plaintext: bool,
        #[command(flatten)]
        aad: Aad,
    },
    /// Sign a message (or, with --digest, its SHA-256 digest, SHA-384 for P-384; not
    /// Ed25519). A message over 64 KiB is hashed here and its digest signed (ECDSA and RSA
    /// keys; Ed25519 keys sign messages of at most 64 KiB).
    Sign {
        /// The key.
        #[arg(long)]
        key: String,
        /// The input is a digest (SHA-256, 32 bytes; SHA-384, 48 bytes, for P-384), not the
        /// message.
        #[arg(long)]
        digest: bool,
        /// ECDSA: raw r|s instead of DER.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        io: Io,
    },
    /// Verify a signature (exit 0 valid, 3 invalid).
    Verify {
        /// The key.
        #[arg(long)]
        key: String,
        /// The signature file.
        #[arg(long)]
        signature: PathBuf,
        /// The version that signed (default: the primary).
        #[arg(long, default_value_t = 0)]
        version: u32,
        /// The input is a SHA-256 digest. (A message over 64 KiB is hashed here, as for
        /// sign.)
        #[arg(long)]
        digest: bool,
        #[command(flatten)]
        io: Io,
    },
    /// Print a signing key's public key (SubjectPublicKeyInfo PEM).
    PublicKey {
        /// The key.
        #[arg(long)]
        key: String,
        /// The version (default: the primary).
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Compute an HMAC.
    Mac {
        /// The key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        io: Io,
    },
    /// Verify an HMAC (exit 0 valid, 3 invalid).
    VerifyMac {
        /// The key.
        #[arg(long)]
        key: String,
        /// The MAC file.
        #[arg(long)]
        mac: PathBuf,
        /// The version that made it (default: the primary).
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        io: Io,
    },
}

fn b64(b: &[u8]) -> String {
    data_encoding::BASE64.encode(b)
}

fn read_input(path: &Option<PathBuf>) -> Result<Zeroizing<Vec<u8>>, BoxError> {
    let mut buf = Zeroizing::new(Vec::new());
    match path {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::File::open(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
                .read_to_end(&mut buf)?;
        }
        _ => {
            std::io::stdin().lock().read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}

/// Reads one of our binary values (ciphertext, signature, MAC), base64 when asked.
fn read_ours(bytes: &[u8], base64: bool) -> Result<Vec<u8>, BoxError> {
    if !base64 {
        return Ok(bytes.to_vec());
    }
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    data_encoding::BASE64
        .decode(&text)
        .map_err(|_| "the input is not valid base64".into())
}

fn write_output(io: &Io, bytes: &[u8]) -> Result<(), BoxError> {
    let encoded;
    let data: &[u8] = if io.base64 {
        encoded = format!("{}\n", b64(bytes));
        encoded.as_bytes()
    } else {
        bytes
    };
    match &io.out {
        Some(p) if p.as_os_str() != "-" => crate::create_private(p)
            .and_then(|mut f| f.write_all(data))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        _ => std::io::stdout().lock().write_all(data)?,
    }
    Ok(())
}

fn aad_bytes(aad: &Aad) -> Result<Vec<u8>, BoxError> {
    Ok(aad_value(aad)?.unwrap_or_default())
}

/// The associated data given, if any.
pub(super) fn aad_value(aad: &Aad) -> Result<Option<Vec<u8>>, BoxError> {
    match (&aad.aad, &aad.aad_file) {
        (Some(t), _) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(p)) => {
            Ok(Some(std::fs::read(p).map_err(|e| {
                format!("cannot read {}: {e}", p.display())
            })?))
        }
        (None, None) => Ok(None),
    }
}

fn sign_input(digest: bool, data: Vec<u8>) -> pb::sign_request::Input {
    if digest {
        pb::sign_request::Input::Digest(data)
    } else {
        pb::sign_request::Input::Message(data)
    }
}

/// Runs a crypto command.
pub(super) async fn run_crypto(
    channel: Channel,
    command: CryptoCommand,
) -> Result<ExitCode, BoxError> {
    let c = &mut KeyManagementClient::new(channel);
    match command {
        CryptoCommand::Encrypt { key, io, aad } => encrypt(c, key, &io, &aad).await,
        CryptoCommand::Decrypt { key, io, aad } => decrypt(c, key, &io, &aad).await,
        CryptoCommand::Reencrypt { key, to, io, aad } => reencrypt(c, key, to, &io, &aad).await,
        CryptoCommand::Datakey {
            key,
            length,
            no_plaintext,
            aad,
        } => datakey(c, key, length, no_plaintext, &aad).await,
        CryptoCommand::Sign {
            key,
            digest,
            raw,
            io,
        } => sign(c, key, digest, raw, &io).await,
        CryptoCommand::Verify {
            key,
            signature,
            version,
            digest,
            io,
        } => verify(c, key, &signature, version, digest, &io).await,
        CryptoCommand::PublicKey { key, version } => public_key(c, key, version).await,
        CryptoCommand::AsymmetricDecrypt { key, version, io } => {
            asymmetric_decrypt(c, key, version, &io).await
        }
        CryptoCommand::Mac { key, io } => mac(c, key, &io).await,
        CryptoCommand::VerifyMac {
            key,
            mac,
            version,
            io,
        } => verify_mac(c, key, &mac, version, &io).await,
    }
}

type Client = KeyManagementClient<Channel>;

async fn encrypt(c: &mut Client, key: String, io: &Io, aad: &Aad) -> Result<ExitCode, BoxError> {
    let pt = read_input(&io.input)?;
    let r = c
        .encrypt(pb::EncryptRequest {
            key,
            plaintext: pt.to_vec(),
            associated_data: aad_bytes(aad)?,
        })
        .answer()
        .await?;
    write_output(io, &r.ciphertext)?;
    Ok(ExitCode::SUCCESS)
}

async fn decrypt(c: &mut Client, key: String, io: &Io, aad: &Aad) -> Result<ExitCode, BoxError> {
    let ct = read_ours(&read_input(&io.input)?, io.base64)?;
    let r = c
        .decrypt(pb::DecryptRequest {
            key,
            ciphertext: ct,
            associated_data: aad_bytes(aad)?,
        })
        .answer()
        .await?;
    let pt = Zeroizing::new(r.plaintext);
    write_output(io, &pt)?;
    Ok(ExitCode::SUCCESS)
}

async fn reencrypt(
    c: &mut Client,
    key: String,
    to: Option<String>,
    io: &Io,
    aad: &Aad,
) -> Result<ExitCode, BoxError> {
    let ct = read_ours(&read_input(&io.input)?, io.base64)?;
    let r = c
        .re_encrypt(pb::ReEncryptRequest {
            key,
            ciphertext: ct,
            associated_data: aad_bytes(aad)?,
            destination_key: to.unwrap_or_default(),
        })
        .answer()
        .await?;
    write_output(io, &r.ciphertext)?;
    Ok(ExitCode::SUCCESS)
}

async fn datakey(
    c: &mut Client,
    key: String,
    length: u32,
    no_plaintext: bool,
    aad: &Aad,
) -> Result<ExitCode, BoxError> {
    let req = pb::GenerateDataKeyRequest {
        key,
        length_bytes: length,
        associated_data: aad_bytes(aad)?,
    };
    let v = if no_plaintext {
        let r = c.generate_data_key_without_plaintext(req).answer().await?;
        serde_json::json!({"ciphertext": b64(&r.ciphertext), "key_version": r.key_version})
    } else {
        let r = c.generate_data_key(req).answer().await?;
        let pt = Zeroizing::new(r.plaintext);
        serde_json::json!({
            "plaintext": b64(&pt),
            "ciphertext": b64(&r.ciphertext),
            "key_version": r.key_version,
        })
    };
    println!("{v}");
    Ok(ExitCode::SUCCESS)
}

/// The largest message the server signs or verifies itself (`MAX_MESSAGE`): above it, the
/// CLI sends the message's SHA-256 digest instead, as the AWS CLI does.
const MAX_SIGNED_MESSAGE: usize = 64 * 1024;

/// What to send for `data`: the digest when `--digest` says it is one, the digest of a
/// message over [`MAX_SIGNED_MESSAGE`] (ECDSA signs digests: SHA-256, or SHA-384 when
/// `sha384`), else the message. The second value says whether the digest was made here.
fn signed_input(digest: bool, data: &[u8], sha384: bool) -> (pb::sign_request::Input, bool) {
    if !digest && data.len() > MAX_SIGNED_MESSAGE {
        let hashed = if sha384 {
            <sha2::Sha384 as sha2::Digest>::digest(data).to_vec()
        } else {
            <sha2::Sha256 as sha2::Digest>::digest(data).to_vec()
        };
        return (pb::sign_request::Input::Digest(hashed), true);
    }
    (sign_input(digest, data.to_vec()), false)
}

/// Whether a refusal of a digest made here says the key wants SHA-384 (a P-384 key): the CLI
/// then sends the SHA-384 digest instead (it does not know the key's algorithm beforehand,
/// and a caller with a grant to sign may not read the key).
fn wants_sha384(e: &crate::RpcError, hashed_here: bool) -> bool {
    hashed_here
        && e.0.code() == tonic::Code::InvalidArgument
        && e.0.message().contains("SHA-384 digest")
}

/// The error of a sign or verify call. When the CLI sent the digest of a large input in its
/// place (`hashed_here`) and the key is Ed25519 (which signs the message itself), it says so
/// clearly; otherwise the server's answer as it is.
fn sign_error(e: crate::RpcError, hashed_here: bool, len: usize) -> BoxError {
    if hashed_here
        && e.0.code() == tonic::Code::InvalidArgument
        && e.0.message().contains("Ed25519")
    {
        return format!(
            "the input is {len} bytes: an Ed25519 key signs the message itself, at most {MAX_SIGNED_MESSAGE} bytes \
             (for larger inputs the CLI signs their SHA-256 digest, which ECDSA keys accept)"
        )
        .into();
    }
    e.into()
}

async fn sign(
    c: &mut Client,
    key: String,
    digest: bool,
    raw: bool,
    io: &Io,
) -> Result<ExitCode, BoxError> {
    let data = read_input(&io.input)?;
    let format = if raw {
        pb::SignatureFormat::Raw
    } else {
        pb::SignatureFormat::Default
    } as i32;
    let mut sha384 = false;
    let r = loop {
        let (input, hashed_here) = signed_input(digest, &data, sha384);
        let answer = c
            .sign(pb::SignRequest {
                key: key.clone(),
                input: Some(input),
                format,
            })
            .answer()
            .await;
        match answer {
            Err(e) if !sha384 && wants_sha384(&e, hashed_here) => sha384 = true,
            other => break other.map_err(|e| sign_error(e, hashed_here, data.len()))?,
        }
    };
    write_output(io, &r.signature)?;
    Ok(ExitCode::SUCCESS)
}

/// Reads a signature or MAC file (base64 when the I/O is).
fn read_ours_file(path: &std::path::Path, base64: bool) -> Result<Vec<u8>, BoxError> {
    read_ours(
        &std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        base64,
    )
}

/// Prints `valid` or `invalid`; the exit code says it too (scripts read it).
fn verdict(valid: bool) -> ExitCode {
    println!("{}", if valid { "valid" } else { "invalid" });
    if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}

async fn verify(
    c: &mut Client,
    key: String,
    signature: &std::path::Path,
    version: u32,
    digest: bool,
    io: &Io,
) -> Result<ExitCode, BoxError> {
    let data = read_input(&io.input)?;
    let sig = read_ours_file(signature, io.base64)?;
    let mut sha384 = false;
    let r = loop {
        let (input, hashed_here) = match signed_input(digest, &data, sha384) {
            (pb::sign_request::Input::Digest(d), hashed) => {
                (pb::verify_request::Input::Digest(d), hashed)
            }
            (pb::sign_request::Input::Message(m), hashed) => {
                (pb::verify_request::Input::Message(m), hashed)
            }
        };
        let answer = c
            .verify(pb::VerifyRequest {
                key: key.clone(),
                key_version: version,
                input: Some(input),
                signature: sig.clone(),
            })
            .answer()
            .await;
        match answer {
            Err(e) if !sha384 && wants_sha384(&e, hashed_here) => sha384 = true,
            other => break other.map_err(|e| sign_error(e, hashed_here, data.len()))?,
        }
    };
    Ok(verdict(r.valid))
}

async fn asymmetric_decrypt(
    c: &mut Client,
    key: String,
    version: u32,
    io: &Io,
) -> Result<ExitCode, BoxError> {
    let ct = read_ours(&read_input(&io.input)?, io.base64)?;
    let r = c
        .asymmetric_decrypt(pb::AsymmetricDecryptRequest {
            key,
            key_version: version,
            ciphertext: ct,
        })
        .answer()
        .await?;
    let pt = Zeroizing::new(r.plaintext);
    write_output(io, &pt)?;
    Ok(ExitCode::SUCCESS)
}

async fn public_key(c: &mut Client, key: String, version: u32) -> Result<ExitCode, BoxError> {
    let r = c
        .get_public_key(pb::GetPublicKeyRequest {
            key,
            key_version: version,
        })
        .answer()
        .await?;
    print!("{}", r.pem);
    Ok(ExitCode::SUCCESS)
}

async fn mac(c: &mut Client, key: String, io: &Io) -> Result<ExitCode, BoxError> {
    let data = read_input(&io.input)?;
    let r = c
        .mac(pb::MacRequest {
            key,
            message: data.to_vec(),
        })
        .answer()
        .await?;
    write_output(io, &r.mac)?;
    Ok(ExitCode::SUCCESS)
}

async fn verify_mac(
    c: &mut Client,
    key: String,
    mac: &std::path::Path,
    version: u32,
    io: &Io,
) -> Result<ExitCode, BoxError> {
    let data = read_input(&io.input)?;
    let tag = read_ours_file(mac, io.base64)?;
    let r = c
        .verify_mac(pb::VerifyMacRequest {
            key,
            key_version: version,
            message: data.to_vec(),
            mac: tag,
        })
        .answer()
        .await?;
    Ok(verdict(r.valid))
}
