//! `/v1/transit/...`: Vault's Transit paths, each translated into the keyring operation of
//! the same rule and record as its gRPC twin (docs/vault-transit.md has the table).
//!
//! Parameters are read and checked here (what kms does not offer is refused with a 400,
//! never ignored); a request that asks for a specific key version is checked against the
//! key inside the call. Every keyed request is one call of [`super::call::keyed`].

use http::{Method, StatusCode};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::call::{Keyed, Refused, Reply, item_error, keyed};
use super::vault::{self, BadRequest, Params};
use super::{Answer, Front};
use crate::access::tls::PeerInfo;
use crate::audit::BatchSummary;
use crate::keyring::material::{SignInput, SignatureEncoding};
use crate::keyring::model::Algorithm;
use crate::keyring::{Journal, Keyring, KeyringError};
use crate::service::{Aad, Op, Served};

/// The most items in one `batch_input`, as gRPC's batches.
const MAX_BATCH: usize = 1000;

/// The largest answer to a batch: gRPC's (`MAX_BATCH_ANSWER`, 4 MiB, what a gRPC client
/// reads by default) in base64, with room for the JSON around it, so that a batch is
/// refused here when its gRPC twin would be. A batch whose answer could be larger is
/// refused before any item is done.
const MAX_BATCH_ANSWER: usize = 4 * 1024 * 1024 / 3 * 4 + 64 * 1024;

/// What one item's answer adds to its output in base64, at most: the JSON of its result
/// (`{"ciphertext": "vault:v4294967295:...", "key_version": 4294967295, "reference": ""}`).
const ITEM_FRAMING: usize = 128;

/// An item's error message is at most this long (`call::item_error`).
const MAX_ITEM_ERROR: usize = 256;

/// The largest signature (RSA-4096), as gRPC's bound counts it.
const MAX_SIGNATURE: usize = 512;

/// The largest MAC (HMAC-SHA-512).
const MAX_MAC: usize = 64;

/// Refuses a batch whose answer could be larger than [`MAX_BATCH_ANSWER`], before any item
/// is done, as gRPC's `check_batch`: each item counts as the base64 of its largest output
/// (`output`: the raw bytes; an error message if larger), its reference (JSON-escaped, at
/// most six bytes a byte) and [`ITEM_FRAMING`].
fn check_answer<T>(b: &Batch<T>, output: impl Fn(&T) -> usize) -> Result<(), Refused> {
    if b.single {
        return Ok(());
    }
    let bound = b.items.iter().fold(0usize, |sum, (item, reference)| {
        let raw = item.as_ref().map_or(0, &output).max(MAX_ITEM_ERROR);
        sum.saturating_add(raw.div_ceil(3).saturating_mul(4))
            .saturating_add(reference.len().saturating_mul(6))
            .saturating_add(ITEM_FRAMING)
    });
    if bound > MAX_BATCH_ANSWER {
        return Err(Refused::bad(format!(
            "batch_input: the answer could be {bound} bytes, over the {MAX_BATCH_ANSWER} a batch answer may have: split the batch"
        )));
    }
    Ok(())
}

/// The most random bytes one request may ask for.
const MAX_RANDOM: u64 = 128 * 1024;

/// One request to a Transit path.
pub(crate) struct Request<'a> {
    /// The front.
    pub front: &'a Front,
    /// Who is calling.
    pub peer: &'a PeerInfo,
    /// The body's size.
    pub size: usize,
    /// Its parameters.
    pub params: Params,
}

/// The operation a Transit path and method are, for the record of a request refused
/// before its call (malformed parameters); `None` for a path that is not one.
pub(crate) fn operation(method: &Method, path: &[&str], list: bool) -> Option<Op> {
    let post = *method == Method::POST || *method == Method::PUT;
    Some(match path {
        ["keys"] | ["keys", ""] if list => Op::ListKeys,
        ["keys", _] if post => Op::CreateKey,
        ["keys", _] if *method == Method::GET => Op::GetKey,
        ["keys", _] if *method == Method::DELETE => Op::ScheduleKeyVersionDestruction,
        ["keys", _, "config"] if post => Op::UpdateKey,
        ["keys", _, "rotate"] if post => Op::RotateKey,
        ["encrypt", _] if post => Op::Encrypt,
        ["decrypt", _] if post => Op::Decrypt,
        ["rewrap", _] if post => Op::ReEncrypt,
        ["datakey", "plaintext", _] if post => Op::GenerateDataKey,
        ["datakey", "wrapped", _] if post => Op::GenerateDataKeyWithoutPlaintext,
        ["sign", _] | ["sign", _, _] if post => Op::Sign,
        ["verify", _] | ["verify", _, _] if post => Op::Verify,
        ["hmac", _] | ["hmac", _, _] if post => Op::Mac,
        ["random"] | ["random", _] | ["random", _, _] if post => Op::Random,
        ["hash"] | ["hash", _] if post => Op::Hash,
        _ => return None,
    })
}

/// The operation of a request refused before its call, exactly as its call would be: a
/// `verify` with `hmac` (in the request or a batch item) is `VerifyMac`, whose grant is
/// `verify-mac`.
pub(crate) fn operation_of(
    method: &Method,
    path: &[&str],
    list: bool,
    params: &Params,
) -> Option<Op> {
    match operation(method, path, list)? {
        Op::Verify if params.names_mac() => Some(Op::VerifyMac),
        op => Some(op),
    }
}

/// The key a Transit path names, if any.
pub(crate) fn key_of<'a>(path: &[&'a str]) -> Option<&'a str> {
    match path {
        ["keys", name, ..] | ["datakey", _, name] => Some(name),
        [
            "encrypt" | "decrypt" | "rewrap" | "sign" | "verify" | "hmac",
            name,
            ..,
        ] => Some(name),
        _ => None,
    }
}

/// Serves a Transit path.
pub(crate) async fn serve(
    req: Request<'_>,
    method: &Method,
    path: &[&str],
    list: bool,
) -> Result<Answer, Refused> {
    let post = *method == Method::POST || *method == Method::PUT;
    match path {
        ["keys"] | ["keys", ""] if list => super::keys::list_keys(req).await,
        ["keys", name] if post => super::keys::create_key(req, name).await,
        ["keys", name] if *method == Method::GET => super::keys::read_key(req, name).await,
        ["keys", name] if *method == Method::DELETE => super::keys::delete_key(req, name).await,
        ["keys", name, "config"] if post => super::keys::configure_key(req, name).await,
        ["keys", name, "rotate"] if post => super::keys::rotate_key(req, name).await,
        ["encrypt", name] if post => encrypt(req, name).await,
        ["decrypt", name] if post => decrypt(req, name).await,
        ["rewrap", name] if post => rewrap(req, name).await,
        ["datakey", kind @ ("plaintext" | "wrapped"), name] if post => {
            data_key(req, name, *kind == "plaintext").await
        }
        ["sign", name] if post => sign(req, name, None).await,
        ["sign", name, hash] if post => sign(req, name, Some(hash)).await,
        ["verify", name] if post => verify(req, name, None).await,
        ["verify", name, hash] if post => verify(req, name, Some(hash)).await,
        ["hmac", name] if post => hmac(req, name, None).await,
        ["hmac", name, algorithm] if post => hmac(req, name, Some(algorithm)).await,
        ["random"] if post => random(req, None, None).await,
        ["random", one] if post => {
            if one.bytes().all(|b| b.is_ascii_digit()) {
                random(req, None, Some(one)).await
            } else {
                random(req, Some(one), None).await
            }
        }
        ["random", source, bytes] if post => random(req, Some(source), Some(bytes)).await,
        ["hash"] if post => hash(req, None).await,
        ["hash", algorithm] if post => hash(req, Some(algorithm)).await,
        ["export", ..] | ["backup", ..] => Err(Refused::bad(
            "kms does not export keys or back them up through Transit: key material never leaves kms",
        )),
        ["keys", _, "trim"] => Err(Refused::bad(
            "kms does not trim keys through Transit: schedule old versions for destruction with kms key schedule-destroy",
        )),
        ["restore", ..] | ["keys", _, "import" | "import_version"] | ["wrapping_key"] => {
            Err(Refused::bad(
                "kms does not import keys through Transit: use kms key import (docs/byok.md)",
            ))
        }
        ["cache-config"] | ["config", ..] => Err(Refused::bad(
            "kms has no Transit engine configuration to read or change",
        )),
        _ => Err(Refused {
            status: StatusCode::NOT_FOUND,
            message: "unsupported path".to_owned(),
            reason: "UNSUPPORTED_PATH",
            recorded: false,
        }),
    }
}

/// Per-item associated data, which a constrained grant must match.
struct Aads(Vec<Zeroizing<Vec<u8>>>);

impl Aad for Aads {
    fn aads(&self) -> Vec<&[u8]> {
        self.0.iter().map(|a| a.as_slice()).collect()
    }
}

/// A keyed call with no associated data.
pub(super) async fn call(
    req: &Request<'_>,
    op: Op,
    name: &str,
    version: u32,
    f: impl FnOnce(&Keyring, &dyn Journal) -> Result<Served<Reply>, KeyringError> + Send + 'static,
) -> Result<Answer, Refused> {
    call_with(req, op, name, version, Aads(Vec::new()), move |k, j, _| {
        f(k, j)
    })
    .await
}

/// A keyed call whose request carries associated data.
async fn call_with(
    req: &Request<'_>,
    op: Op,
    name: &str,
    version: u32,
    aads: Aads,
    f: impl FnOnce(&Keyring, &dyn Journal, Aads) -> Result<Served<Reply>, KeyringError> + Send + 'static,
) -> Result<Answer, Refused> {
    let (result, request_id) = keyed(
        &req.front.service,
        req.peer,
        req.size,
        Keyed {
            op,
            key: name,
            destination: None,
            version,
        },
        aads,
        f,
    )
    .await;
    let mut reply = result?;
    if let Some(w) = req.params.unread() {
        reply.warnings.push(w);
    }
    Ok(Answer::Data {
        reply,
        request_id,
        mount_type: "transit",
    })
}

/// A batch's items (each parsed, or why it could not be), their references, and the
/// status of a batch with a failed item (Vault's `partial_failure_response_code`).
struct Batch<T> {
    items: Vec<(Result<T, String>, String)>,
    partial_failure: Option<StatusCode>,
    single: bool,
}

/// The items of a request: its `batch_input`, or the request itself as one item.
fn batch<T>(
    p: &mut Params,
    mut parse: impl FnMut(&mut Params) -> Result<T, BadRequest>,
) -> Result<Batch<T>, Refused> {
    let partial_failure = match p.u64("partial_failure_response_code")? {
        None => None,
        Some(c) => Some(
            u16::try_from(c)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| (100..=599).contains(&c.as_u16()))
                .ok_or_else(|| Refused::bad("partial_failure_response_code: not a status code"))?,
        ),
    };
    let Some(items) = p.list("batch_input")? else {
        return Ok(Batch {
            items: vec![(parse(p).map_err(|e| e.0), String::new())],
            partial_failure,
            single: true,
        });
    };
    if items.is_empty() {
        return Err(Refused::bad("missing batch input to process"));
    }
    if items.len() > MAX_BATCH {
        return Err(Refused::bad(format!(
            "batch_input: at most {MAX_BATCH} items"
        )));
    }
    let items = items
        .into_iter()
        .map(|item| {
            let mut item = match Params::item(item) {
                Ok(i) => i,
                Err(e) => return (Err(e.0), String::new()),
            };
            let reference = item.str("reference").ok().flatten().unwrap_or_default();
            (parse(&mut item).map_err(|e| e.0), reference)
        })
        .collect();
    Ok(Batch {
        items,
        partial_failure,
        single: false,
    })
}

/// Runs `f` on each item of a batch inside its call: the `batch_results` (or, for a
/// request of one item, its result or its refusal), the status, and the record's summary.
fn each<T>(
    batch: Batch<T>,
    mut f: impl FnMut(&T) -> Result<(Value, u32), KeyringError>,
) -> Result<Served<Reply>, KeyringError> {
    if batch.single {
        let item = batch.items.into_iter().next().map(|(i, _)| i);
        let item = match item {
            Some(Ok(i)) => i,
            // A parameter that is not one, caught inside the call so that it is recorded.
            Some(Err(_)) | None => return Err(KeyringError::BadRequest(BAD_PARAMETERS)),
        };
        let (value, version) = f(&item)?;
        return Ok(Served::new(Reply::ok(&value)).version(version));
    }
    let mut summary = BatchSummary::default();
    let mut failed = false;
    let mut succeeded = false;
    let results: Vec<Value> = batch
        .items
        .iter()
        .map(|(item, reference)| {
            summary.items += 1;
            let result = match item {
                Ok(i) => f(i).map_err(item_error),
                Err(message) => Err((message.clone(), "INVALID_ARGUMENT")),
            };
            match result {
                Ok((mut value, version)) => {
                    succeeded = true;
                    *summary.versions.entry(version).or_default() += 1;
                    *summary.outcomes.entry("OK".to_owned()).or_default() += 1;
                    if let Value::Object(m) = &mut value {
                        m.insert("reference".to_owned(), json!(reference));
                    }
                    value
                }
                Err((message, outcome)) => {
                    failed = true;
                    *summary.outcomes.entry(outcome.to_owned()).or_default() += 1;
                    json!({ "error": message, "reference": reference })
                }
            }
        })
        .collect();
    let mut reply = Reply::ok(&json!({ "batch_results": results }));
    if failed {
        let status = match batch.partial_failure {
            Some(code) if succeeded => code,
            _ => StatusCode::BAD_REQUEST,
        };
        reply = reply.status(status);
    }
    Ok(Served::new(reply).batch(summary))
}

/// What a single request whose parameters did not parse is refused with, inside its call
/// (the message of the parse is the front's, given when the call is refused before).
const BAD_PARAMETERS: &str = "the request's parameters are not valid";

/// Refuses, before the call, a single request whose parameters do not parse (the record
/// of the refusal is written by the front).
fn single_ok<T>(b: &Batch<T>) -> Result<(), Refused> {
    if b.single
        && let Some((Err(message), _)) = b.items.first()
    {
        return Err(Refused::bad(message.clone()));
    }
    Ok(())
}

/// The key version an item asks for: 0 or the key's latest (kms encrypts, signs and MACs
/// with the latest only).
fn latest_only(k: &Keyring, name: &str, asked: u32) -> Result<(), KeyringError> {
    if asked != 0 && asked != k.get_key(name)?.primary {
        return Err(KeyringError::BadRequest(
            "key_version: kms encrypts, signs and MACs with the latest version only",
        ));
    }
    Ok(())
}

struct EncryptItem {
    plaintext: Zeroizing<Vec<u8>>,
    aad: Zeroizing<Vec<u8>>,
    version: u32,
}

fn no_derivation(p: &mut Params) -> Result<(), BadRequest> {
    p.refuse("context", "derived keys are not offered by kms")?;
    p.refuse("nonce", "convergent encryption is not offered by kms")
}

fn associated_data(p: &mut Params) -> Result<Zeroizing<Vec<u8>>, BadRequest> {
    Ok(p.base64("associated_data")?.unwrap_or_default())
}

async fn encrypt(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let p = &mut req.params;
    p.refuse(
        "convergent_encryption",
        "convergent encryption is not offered by kms",
    )?;
    if let Some(t) = p.str("type")?
        && t != "aes256-gcm96"
    {
        return Err(Refused::bad(
            "type: kms creates keys with transit/keys/:name only (encrypt does not create one), and encrypts with aes256-gcm96",
        ));
    }
    let batch = batch(p, |p| {
        no_derivation(p)?;
        Ok(EncryptItem {
            plaintext: p
                .base64("plaintext")?
                .ok_or_else(|| BadRequest::from("missing plaintext to encrypt"))?,
            aad: associated_data(p)?,
            version: p.version("key_version")?,
        })
    })?;
    single_ok(&batch)?;
    check_answer(&batch, |i| {
        i.plaintext
            .len()
            .saturating_add(crate::keyring::ciphertext::OVERHEAD)
    })?;
    let op = if batch.single {
        Op::Encrypt
    } else {
        Op::BatchEncrypt
    };
    let aads = aads_of(&batch, |i| &i.aad);
    let key = name.to_owned();
    call_with(&req, op, name, 0, aads, move |k, _, _| {
        each(batch, |i| {
            latest_only(k, &key, i.version)?;
            let (ct, v) = k.encrypt(&key, &i.plaintext, &i.aad)?;
            Ok((
                json!({ "ciphertext": vault::prefixed(v, &ct, false), "key_version": v }),
                v,
            ))
        })
    })
    .await
}

fn aads_of<T>(b: &Batch<T>, f: impl Fn(&T) -> &Zeroizing<Vec<u8>>) -> Aads {
    Aads(
        b.items
            .iter()
            .filter_map(|(i, _)| i.as_ref().ok())
            .map(|i| f(i).clone())
            .collect(),
    )
}

struct DecryptItem {
    ciphertext: Vec<u8>,
    aad: Zeroizing<Vec<u8>>,
}

fn decrypt_item(p: &mut Params) -> Result<DecryptItem, BadRequest> {
    no_derivation(p)?;
    let ct = p
        .str("ciphertext")?
        .ok_or_else(|| BadRequest::from("missing ciphertext to decrypt"))?;
    Ok(DecryptItem {
        ciphertext: vault::ciphertext(&ct)?,
        aad: associated_data(p)?,
    })
}

async fn decrypt(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let batch = batch(&mut req.params, decrypt_item)?;
    single_ok(&batch)?;
    check_answer(&batch, |i| i.ciphertext.len())?;
    let op = if batch.single {
        Op::Decrypt
    } else {
        Op::BatchDecrypt
    };
    let aads = aads_of(&batch, |i| &i.aad);
    let key = name.to_owned();
    call_with(&req, op, name, 0, aads, move |k, _, _| {
        each(batch, |i| {
            let (pt, v) = k.decrypt(&key, &i.ciphertext, &i.aad)?;
            Ok((json!({ "plaintext": vault::base64(&pt) }), v))
        })
    })
    .await
}

/// `rewrap`: ReEncrypt from the key to its latest version (reencrypt-from and
/// reencrypt-to grants on the key).
async fn rewrap(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let batch = batch(&mut req.params, |p| {
        let version = p.version("key_version")?;
        let item = decrypt_item(p)?;
        Ok((item, version))
    })?;
    single_ok(&batch)?;
    // The new ciphertext is as long as the old one, plus its prefix's version digits.
    check_answer(&batch, |(i, _)| i.ciphertext.len())?;
    let op = if batch.single {
        Op::ReEncrypt
    } else {
        Op::BatchReEncrypt
    };
    let aads = aads_of(&batch, |(i, _)| &i.aad);
    let key = name.to_owned();
    let single = batch.single;
    let (result, request_id) = keyed(
        &req.front.service,
        req.peer,
        req.size,
        Keyed {
            op,
            key: name,
            destination: Some(name),
            version: 0,
        },
        aads,
        move |k, _, _| {
            // The version a single rewrap wrote under, for its record (as gRPC's
            // ReEncrypt records its destination version).
            let mut written = 0;
            let served = each(batch, |(i, version)| {
                latest_only(k, &key, *version)?;
                let made = k.reencrypt(&key, &i.ciphertext, &i.aad, Some(&key))?;
                written = made.version;
                Ok((
                    json!({
                        "ciphertext": vault::prefixed(made.version, &made.ciphertext, false),
                        "key_version": made.version,
                    }),
                    made.source_version,
                ))
            })?;
            Ok(if single {
                served.destination(key, written)
            } else {
                served
            })
        },
    )
    .await;
    let mut reply = result?;
    reply.warnings.extend(req.params.unread());
    Ok(Answer::Data {
        reply,
        request_id,
        mount_type: "transit",
    })
}

async fn data_key(mut req: Request<'_>, name: &str, plaintext: bool) -> Result<Answer, Refused> {
    let p = &mut req.params;
    no_derivation(p)?;
    let len = match p.u64("bits")? {
        None | Some(256) => 32,
        Some(128) => 16,
        Some(512) => 64,
        Some(_) => return Err(Refused::bad("bits: 128, 256 or 512")),
    };
    let op = if plaintext {
        Op::GenerateDataKey
    } else {
        Op::GenerateDataKeyWithoutPlaintext
    };
    let key = name.to_owned();
    call(&req, op, name, 0, move |k, _| {
        let (dk, ct, v) = k.generate_data_key(&key, len, &[])?;
        let mut data = json!({ "ciphertext": vault::prefixed(v, &ct, false), "key_version": v });
        if plaintext && let Value::Object(m) = &mut data {
            m.insert("plaintext".to_owned(), json!(vault::base64(&dk)));
        }
        Ok(Served::new(Reply::ok(&data)).version(v))
    })
    .await
}

/// How a signature is asked for: the hash, whether the input is its digest, the RSA
/// scheme asked (if any), JWS marshaling.
#[derive(Clone)]
struct SignParams {
    hash: String,
    prehashed: bool,
    rsa_scheme: Option<String>,
    jws: bool,
}

fn sign_params(p: &mut Params, path_hash: Option<&str>) -> Result<SignParams, BadRequest> {
    p.refuse("context", "derived keys are not offered by kms")?;
    let hash = match path_hash {
        Some(h) => h.to_owned(),
        None => p
            .str("hash_algorithm")?
            .unwrap_or_else(|| "sha2-256".to_owned()),
    };
    let jws = match p.str("marshaling_algorithm")?.as_deref() {
        None | Some("asn1") => false,
        Some("jws") => true,
        Some(_) => return Err("marshaling_algorithm: asn1 or jws".into()),
    };
    let rsa_scheme = p.str("signature_algorithm")?;
    if let Some(s) = &rsa_scheme
        && !matches!(s.as_str(), "pss" | "pkcs1v15")
    {
        return Err("signature_algorithm: pss or pkcs1v15".into());
    }
    match p.str("salt_length")?.as_deref() {
        None | Some("auto" | "hash" | "32") => {}
        Some(_) => {
            return Err(
                "salt_length: kms PSS signatures use a salt of the hash's length (32 bytes): auto, hash or 32"
                    .into(),
            );
        }
    }
    Ok(SignParams {
        hash,
        prehashed: p.bool("prehashed")?.unwrap_or(false),
        rsa_scheme,
        jws,
    })
}

/// Checks what a signature request asks of the key: its one hash (none for Ed25519), its
/// RSA scheme, a digest only where kms signs digests.
fn check_signing(algorithm: Algorithm, s: &SignParams) -> Result<(), KeyringError> {
    match vault::hash_of(algorithm) {
        // Ed25519 signs the message itself, whatever hash is named (as Vault).
        None if s.prehashed => {
            return Err(KeyringError::BadRequest(
                "prehashed: ed25519 signs messages, not digests",
            ));
        }
        None => {}
        Some(h) if h == s.hash => {}
        Some("sha2-384") => {
            return Err(KeyringError::BadRequest(
                "hash_algorithm: this ecdsa-p384 key signs with sha2-384 only",
            ));
        }
        Some(_) => {
            return Err(KeyringError::BadRequest(
                "hash_algorithm: this key signs with sha2-256 only",
            ));
        }
    }
    if let (Some(scheme), Some(asked)) = (vault::rsa_scheme(algorithm), s.rsa_scheme.as_deref()) {
        let same = matches!(
            (scheme, asked),
            (crate::keyring::model::RsaScheme::Pss, "pss")
                | (crate::keyring::model::RsaScheme::Pkcs1, "pkcs1v15")
        );
        if !same {
            return Err(KeyringError::BadRequest(
                "signature_algorithm: a kms RSA key signs with the one scheme it was created with (rsa-* keys made through Transit: pkcs1v15)",
            ));
        }
    }
    Ok(())
}

fn sign_input(prehashed: bool, input: &[u8]) -> SignInput<'_> {
    if prehashed {
        SignInput::Digest(input)
    } else {
        SignInput::Message(input)
    }
}

async fn sign(
    mut req: Request<'_>,
    name: &str,
    path_hash: Option<&str>,
) -> Result<Answer, Refused> {
    let p = &mut req.params;
    let s = sign_params(p, path_hash)?;
    let version = p.version("key_version")?;
    let batch = batch(p, |p| {
        p.refuse("context", "derived keys are not offered by kms")?;
        p.base64("input")?
            .ok_or_else(|| BadRequest::from("missing input to sign"))
    })?;
    single_ok(&batch)?;
    check_answer(&batch, |_| MAX_SIGNATURE)?;
    let op = if batch.single {
        Op::Sign
    } else {
        Op::BatchSign
    };
    let key = name.to_owned();
    call(&req, op, name, 0, move |k, _| {
        let algorithm = k.get_key(&key)?.algorithm;
        check_signing(algorithm, &s)?;
        latest_only(k, &key, version)?;
        let encoding = if s.jws {
            SignatureEncoding::Raw
        } else {
            SignatureEncoding::Der
        };
        each(batch, |input| {
            let (sig, v) = k.sign(&key, sign_input(s.prehashed, input), encoding)?;
            Ok((
                json!({ "signature": vault::prefixed(v, &sig, s.jws), "key_version": v }),
                v,
            ))
        })
    })
    .await
}

/// What one verification checks: a signature or a MAC, of a version, over an input.
struct VerifyItem {
    input: Zeroizing<Vec<u8>>,
    version: u32,
    value: Zeroizing<Vec<u8>>,
}

async fn verify(
    mut req: Request<'_>,
    name: &str,
    path_hash: Option<&str>,
) -> Result<Answer, Refused> {
    let p = &mut req.params;
    let s = sign_params(p, path_hash)?;
    // A MAC is verified when `hmac` is given (in the request, or in every batch item).
    let mut mac = None::<bool>;
    let batch = batch(p, |p| {
        let input = p
            .base64("input")?
            .ok_or_else(|| BadRequest::from("missing input to verify"))?;
        let (is_mac, text) = match (p.str("signature")?, p.str("hmac")?) {
            (Some(sig), None) => (false, sig),
            (None, Some(h)) => (true, h),
            _ => return Err("give one of signature or hmac".into()),
        };
        if *mac.get_or_insert(is_mac) != is_mac {
            return Err("a batch verifies signatures or MACs, not both".into());
        }
        let (version, value) = vault::unprefix(
            &text,
            if is_mac { "hmac" } else { "signature" },
            s.jws && !is_mac,
        )?;
        Ok(VerifyItem {
            input,
            version,
            value,
        })
    })?;
    single_ok(&batch)?;
    check_answer(&batch, |_| 0)?;
    let is_mac = mac.unwrap_or(false);
    if is_mac && !matches!(s.hash.as_str(), "sha2-256") {
        return Err(Refused::bad("algorithm: kms HMAC keys use sha2-256 only"));
    }
    let op = if is_mac { Op::VerifyMac } else { Op::Verify };
    let version = match batch.items.as_slice() {
        [(Ok(i), _)] if batch.single => i.version,
        _ => 0,
    };
    let key = name.to_owned();
    call(&req, op, name, version, move |k, _| {
        if !is_mac {
            check_signing(k.get_key(&key)?.algorithm, &s)?;
        }
        each(batch, |i| {
            let valid = if is_mac {
                k.verify_mac(&key, i.version, &i.input, &i.value)?
            } else {
                k.verify(&key, i.version, sign_input(s.prehashed, &i.input), &i.value)?
            };
            Ok((json!({ "valid": valid }), i.version))
        })
    })
    .await
}

async fn hmac(
    mut req: Request<'_>,
    name: &str,
    path_algorithm: Option<&str>,
) -> Result<Answer, Refused> {
    let p = &mut req.params;
    let algorithm = match path_algorithm {
        Some(a) => Some(a.to_owned()),
        None => p.str("algorithm")?,
    };
    if !matches!(algorithm.as_deref(), None | Some("sha2-256")) {
        return Err(Refused::bad("algorithm: kms HMAC keys use sha2-256 only"));
    }
    let version = p.version("key_version")?;
    let batch = batch(p, |p| {
        p.base64("input")?
            .ok_or_else(|| BadRequest::from("missing input for HMAC"))
    })?;
    single_ok(&batch)?;
    check_answer(&batch, |_| MAX_MAC)?;
    let key = name.to_owned();
    call(&req, Op::Mac, name, 0, move |k, _| {
        latest_only(k, &key, version)?;
        each(batch, |input| {
            let (mac, v) = k.mac(&key, input)?;
            Ok((json!({ "hmac": vault::prefixed(v, &mac, false) }), v))
        })
    })
    .await
}

/// A request that touches no key: a call of `op` whose work is `f`.
async fn unkeyed(
    req: &Request<'_>,
    op: Op,
    f: impl FnOnce() -> Result<Value, Refused> + Send + 'static,
) -> Result<Answer, Refused> {
    let (result, request_id) =
        super::call::unkeyed(&req.front.service, req.peer, req.size, op, move || {
            f().map(|d| Reply::ok(&d))
        })
        .await;
    let mut reply = result?;
    reply.warnings.extend(req.params.unread());
    Ok(Answer::Data {
        reply,
        request_id,
        mount_type: "transit",
    })
}

/// `random`: bytes from the platform's CSPRNG.
async fn random(
    mut req: Request<'_>,
    source: Option<&str>,
    path_bytes: Option<&str>,
) -> Result<Answer, Refused> {
    let asked = (|| {
        let p = &mut req.params;
        match source {
            None | Some("platform") => {}
            Some("seal" | "all") => {
                return Err(Refused::bad(
                    "source: kms serves random bytes from the platform source only",
                ));
            }
            Some(_) => return Err(Refused::bad("source: platform, seal or all")),
        }
        let n = match path_bytes {
            Some(b) => b.parse().map_err(|_| Refused::bad("bytes: not a number"))?,
            None => p.u64("bytes")?.unwrap_or(32),
        };
        if !(1..=MAX_RANDOM).contains(&n) {
            return Err(Refused::bad(format!("bytes: 1 to {MAX_RANDOM}")));
        }
        let hex = match p.str("format")?.as_deref() {
            None | Some("base64") => false,
            Some("hex") => true,
            Some(_) => return Err(Refused::bad("format: base64 or hex")),
        };
        Ok((usize::try_from(n).unwrap_or(0), hex))
    })();
    unkeyed(&req, Op::Random, move || {
        let (n, hex) = asked?;
        let mut bytes = Zeroizing::new(vec![0u8; n]);
        getrandom::fill(bytes.as_mut_slice()).map_err(|_| Refused {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "no randomness available".to_owned(),
            reason: "RANDOMNESS_UNAVAILABLE",
            recorded: false,
        })?;
        let text = if hex {
            data_encoding::HEXLOWER.encode(&bytes)
        } else {
            vault::base64(&bytes)
        };
        Ok(json!({ "random_bytes": text }))
    })
    .await
}

/// `hash`: a SHA-2 digest of the input.
async fn hash(mut req: Request<'_>, path_algorithm: Option<&str>) -> Result<Answer, Refused> {
    let asked = (|| {
        let p = &mut req.params;
        let algorithm = match path_algorithm {
            Some(a) => a.to_owned(),
            None => p.str("algorithm")?.unwrap_or_else(|| "sha2-256".to_owned()),
        };
        let input = p
            .base64("input")?
            .ok_or_else(|| Refused::bad("missing input to hash"))?;
        if input.len() > crate::keyring::MAX_MESSAGE {
            return Err(Refused::bad(format!(
                "input: at most {} bytes to hash",
                crate::keyring::MAX_MESSAGE
            )));
        }
        let base64 = match p.str("format")?.as_deref() {
            None | Some("hex") => false,
            Some("base64") => true,
            Some(_) => return Err(Refused::bad("format: hex or base64")),
        };
        Ok((algorithm, input, base64))
    })();
    unkeyed(&req, Op::Hash, move || {
        use sha2::Digest as _;
        let (algorithm, input, base64) = asked?;
        let sum: Vec<u8> = match algorithm.as_str() {
            "sha2-224" => sha2::Sha224::digest(&*input).to_vec(),
            "sha2-256" => sha2::Sha256::digest(&*input).to_vec(),
            "sha2-384" => sha2::Sha384::digest(&*input).to_vec(),
            "sha2-512" => sha2::Sha512::digest(&*input).to_vec(),
            "sha3-224" | "sha3-256" | "sha3-384" | "sha3-512" => {
                return Err(Refused::bad(
                    "algorithm: kms does not offer SHA-3: sha2-224, sha2-256, sha2-384 or sha2-512",
                ));
            }
            _ => {
                return Err(Refused::bad(
                    "algorithm: sha2-224, sha2-256, sha2-384 or sha2-512",
                ));
            }
        };
        let text = if base64 {
            vault::base64(&sum)
        } else {
            data_encoding::HEXLOWER.encode(&sum)
        };
        Ok(json!({ "sum": text }))
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A verification of a MAC is `VerifyMac` (grant `verify-mac`) before its call as in
    /// it, whether `hmac` is in the request or in its batch's items.
    /// A batch whose answer could be over the bound is refused before any item is done, as
    /// gRPC's: 1000 encryptions of 4 KiB fit, of 4.5 KiB do not.
    #[test]
    fn a_batch_answer_is_bounded() {
        let of = |n: usize, len: usize| Batch {
            items: (0..n).map(|_| (Ok(len), String::new())).collect(),
            partial_failure: None,
            single: false,
        };
        let overhead = crate::keyring::ciphertext::OVERHEAD;
        let encrypt = |b: &Batch<usize>| check_answer(b, |l| l + overhead);
        assert!(encrypt(&of(1000, 4096)).is_ok());
        let r = encrypt(&of(1000, 4608)).unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.message.contains("split the batch"), "{}", r.message);
        // One item is bounded by the keyring's limits, not here.
        let one = Batch {
            single: true,
            ..of(1, 1 << 30)
        };
        assert!(encrypt(&one).is_ok());
        // A long reference counts.
        let refs = Batch {
            items: (0..1000).map(|_| (Ok(0), "r".repeat(1000))).collect(),
            partial_failure: None,
            single: false,
        };
        assert!(check_answer(&refs, |_| 0).is_err());
    }

    #[test]
    fn a_mac_verification_is_verify_mac_before_its_call() {
        let post = Method::POST;
        let of = |body: &[u8]| {
            let p = Params::parse(body).unwrap();
            operation_of(&post, &["verify", "k"], false, &p)
        };
        assert_eq!(of(br#"{"hmac": "x", "input": "!"}"#), Some(Op::VerifyMac));
        assert_eq!(
            of(br#"{"batch_input": [{"hmac": "x", "input": "!"}]}"#),
            Some(Op::VerifyMac)
        );
        assert_eq!(of(br#"{"signature": "x", "input": "!"}"#), Some(Op::Verify));
    }

    #[test]
    fn every_path_names_its_operation() {
        let post = Method::POST;
        assert_eq!(
            operation(&post, &["encrypt", "k"], false),
            Some(Op::Encrypt)
        );
        assert_eq!(operation(&Method::GET, &["keys"], true), Some(Op::ListKeys));
        assert_eq!(
            operation(&Method::GET, &["keys", "k"], false),
            Some(Op::GetKey)
        );
        assert_eq!(
            operation(&post, &["sign", "k", "sha2-256"], false),
            Some(Op::Sign)
        );
        assert_eq!(
            operation(&post, &["datakey", "wrapped", "k"], false),
            Some(Op::GenerateDataKeyWithoutPlaintext)
        );
        assert_eq!(operation(&Method::GET, &["encrypt", "k"], false), None);
        assert_eq!(operation(&post, &["nope"], false), None);
    }

    #[test]
    fn signing_checks_the_keys_one_hash_and_scheme() {
        let s = |hash: &str, prehashed: bool, scheme: Option<&str>| SignParams {
            hash: hash.to_owned(),
            prehashed,
            rsa_scheme: scheme.map(str::to_owned),
            jws: false,
        };
        assert!(check_signing(Algorithm::EcdsaP256Sha256, &s("sha2-256", true, None)).is_ok());
        assert!(check_signing(Algorithm::EcdsaP256Sha256, &s("sha2-384", false, None)).is_err());
        assert!(check_signing(Algorithm::EcdsaP384Sha384, &s("sha2-384", true, None)).is_ok());
        assert!(check_signing(Algorithm::EcdsaP384Sha384, &s("sha2-256", false, None)).is_err());
        assert!(check_signing(Algorithm::Ed25519, &s("sha2-512", false, None)).is_ok());
        assert!(check_signing(Algorithm::Ed25519, &s("sha2-256", true, None)).is_err());
        let rsa = Algorithm::RsaSignPkcs12048Sha256;
        assert!(check_signing(rsa, &s("sha2-256", true, Some("pkcs1v15"))).is_ok());
        assert!(check_signing(rsa, &s("sha2-256", true, Some("pss"))).is_err());
        assert!(check_signing(rsa, &s("sha2-256", false, None)).is_ok());
        assert!(
            check_signing(
                Algorithm::RsaSignPss2048Sha256,
                &s("sha2-256", false, Some("pss"))
            )
            .is_ok()
        );
    }
}
