//! Envelope encryption with kms, in Rust: a file of any size encrypted locally under its
//! own data key (the same pattern and file as `examples/python/envelope.py`; docs/api.md,
//! "Envelope encryption").
//!
//! ```text
//! cargo run -p kms-proto --example envelope -- encrypt --key KEY --context CONTEXT IN OUT
//! cargo run -p kms-proto --example envelope -- decrypt --key KEY --context CONTEXT IN OUT
//! ```
//! Connection: `KMS_ADDR` (`https://host:port`), `KMS_CACERT`, `KMS_CLIENT_CERT`,
//! `KMS_CLIENT_KEY`, as for the kms CLI.
//!
//! - One data key per object: `GenerateDataKey(key, 32 bytes, associated_data = CONTEXT)`
//!   gives the data key and the same key wrapped under KEY; the data key is used, then
//!   zeroized; only the wrapped one is stored, beside the data (in OUT's header).
//! - AES-256-GCM in chunks of 1 MiB: chunk `i` has the nonce `u64be(i) | u32be(final)` and
//!   the associated data `CONTEXT | u64be(i) | final`, so a chunk moved, dropped, or a file
//!   cut short at a chunk boundary fails to decrypt.
//! - CONTEXT is bound on both layers: kms opens the wrapped key only with it, and every
//!   chunk carries it.
//! - Decrypting asks kms to `Decrypt` the wrapped key (a `decrypt` grant on KEY). The output
//!   goes to `OUT.partial`, renamed to OUT only once every chunk was authentic.
//!
//! The file: `"KMSENV1\0" | u16be(len(wrapped key)) | wrapped key | u32be(chunk size) |
//! chunks`, each the size of its plaintext + 16 (the tag); every chunk but the last is full.

use std::fs::File;
use std::io::{Read, Write};
use std::process::ExitCode;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"KMSENV1\0";
const CHUNK: usize = 1024 * 1024;
const TAG: usize = 16;

type Error = Box<dyn std::error::Error>;

/// Why a file is refused: it is not authentic (tampered, reordered, truncated, another
/// object's, another context).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(why: impl Into<String>) -> Error {
    Box::new(Refused(why.into()))
}

fn nonce(i: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    let (index, flag) = n.split_at_mut(8);
    index.copy_from_slice(&i.to_be_bytes());
    flag.copy_from_slice(&u32::from(last).to_be_bytes());
    n
}

fn chunk_aad(context: &[u8], i: u64, last: bool) -> Vec<u8> {
    [context, &i.to_be_bytes(), &[u8::from(last)]].concat()
}

/// `n` bytes, or fewer only at the end of the input.
fn read_full(r: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut out)?;
    Ok(out)
}

async fn connect() -> Result<KeyManagementClient<Channel>, Error> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let read = |name: &str| -> Result<Vec<u8>, Error> { Ok(std::fs::read(var(name)?)?) };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("KMS_CACERT")?))
        .identity(Identity::from_pem(
            read("KMS_CLIENT_CERT")?,
            read("KMS_CLIENT_KEY")?,
        ));
    let channel = Channel::from_shared(var("KMS_ADDR")?)?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(KeyManagementClient::new(channel))
}

async fn encrypt(
    kms: &mut KeyManagementClient<Channel>,
    key: &str,
    context: &[u8],
    input: &str,
    output: &str,
) -> Result<(), Error> {
    // One data key for this object, bound to its context.
    let dk = kms
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: key.to_owned(),
            length_bytes: 32,
            associated_data: context.to_vec(),
        })
        .await?
        .into_inner();
    let data_key = Zeroizing::new(dk.plaintext);
    let aead = Aes256Gcm::new_from_slice(&data_key).map_err(|_| "a data key of 32 bytes")?;
    drop(data_key);
    let wrapped = dk.ciphertext;
    let partial = format!("{output}.partial");
    let result = (|| -> Result<(), Error> {
        let mut fin = File::open(input)?;
        let mut fout = File::create(&partial)?;
        fout.write_all(MAGIC)?;
        fout.write_all(&u16::try_from(wrapped.len())?.to_be_bytes())?;
        fout.write_all(&wrapped)?;
        fout.write_all(&u32::try_from(CHUNK)?.to_be_bytes())?;
        let (mut i, mut cur) = (0u64, read_full(&mut fin, CHUNK)?);
        loop {
            let next = read_full(&mut fin, CHUNK)?;
            let last = next.is_empty();
            let aad = chunk_aad(context, i, last);
            let sealed = aead
                .encrypt(
                    &nonce(i, last).into(),
                    Payload {
                        msg: &cur,
                        aad: &aad,
                    },
                )
                .map_err(|_| "AES-GCM encryption failed")?;
            fout.write_all(&sealed)?;
            if last {
                break;
            }
            (i, cur) = (i + 1, next);
        }
        fout.sync_all()?;
        std::fs::rename(&partial, output)?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&partial);
    result
}

async fn decrypt(
    kms: &mut KeyManagementClient<Channel>,
    key: &str,
    context: &[u8],
    input: &str,
    output: &str,
) -> Result<(), Error> {
    let mut fin = File::open(input)?;
    if read_full(&mut fin, MAGIC.len())? != MAGIC {
        return Err(refused("not an envelope file"));
    }
    let n: [u8; 2] = read_full(&mut fin, 2)?
        .try_into()
        .map_err(|_| refused("truncated header"))?;
    let wrapped = read_full(&mut fin, usize::from(u16::from_be_bytes(n)))?;
    let chunk: [u8; 4] = read_full(&mut fin, 4)?
        .try_into()
        .map_err(|_| refused("truncated header"))?;
    let chunk = usize::try_from(u32::from_be_bytes(chunk))?;
    if wrapped.len() != usize::from(u16::from_be_bytes(n)) || chunk == 0 || chunk > 64 * CHUNK {
        return Err(refused("malformed header"));
    }
    // kms opens the wrapped key only under KEY and with the same context.
    let dk = match kms
        .decrypt(pb::DecryptRequest {
            key: key.to_owned(),
            ciphertext: wrapped,
            associated_data: context.to_vec(),
        })
        .await
    {
        Ok(r) => Zeroizing::new(r.into_inner().plaintext),
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            return Err(refused(format!(
                "the data key does not open: {}",
                s.message()
            )));
        }
        Err(s) => return Err(s.into()),
    };
    let aead = Aes256Gcm::new_from_slice(&dk).map_err(|_| refused("not a 32-byte data key"))?;
    drop(dk);
    let partial = format!("{output}.partial");
    let result = (|| -> Result<(), Error> {
        let mut fout = File::create(&partial)?;
        let (mut i, mut cur) = (0u64, read_full(&mut fin, chunk + TAG)?);
        if cur.is_empty() {
            return Err(refused("truncated: no chunk"));
        }
        loop {
            let next = read_full(&mut fin, chunk + TAG)?;
            let last = next.is_empty();
            let aad = chunk_aad(context, i, last);
            let plain = Zeroizing::new(
                aead.decrypt(
                    &nonce(i, last).into(),
                    Payload {
                        msg: &cur,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    refused(format!(
                        "chunk {i} is not authentic (tampered, moved or truncated)"
                    ))
                })?,
            );
            fout.write_all(&plain)?;
            if last {
                break;
            }
            (i, cur) = (i + 1, next);
        }
        fout.sync_all()?;
        std::fs::rename(&partial, output)?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&partial);
    result
}

/// `encrypt|decrypt --key KEY --context CONTEXT IN OUT`.
fn parse(args: &[String]) -> Option<(&str, &str, &str, &str, &str)> {
    match args {
        [mode, k, key, c, context, input, output]
            if k == "--key" && c == "--context" && (mode == "encrypt" || mode == "decrypt") =>
        {
            Some((mode, key, context, input, output))
        }
        _ => None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, key, context, input, output)) = parse(&args) else {
        eprintln!("usage: envelope encrypt|decrypt --key KEY --context CONTEXT IN OUT");
        return ExitCode::from(64);
    };
    let result = async {
        let mut kms = connect().await?;
        if mode == "encrypt" {
            encrypt(&mut kms, key, context.as_bytes(), input, output).await
        } else {
            decrypt(&mut kms, key, context.as_bytes(), input, output).await
        }
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Refused>() => {
            eprintln!("refused: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
