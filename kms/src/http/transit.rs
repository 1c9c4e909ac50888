//! `/v1/transit/...`: Vault's Transit paths, each translated into the keyring operation of
//! the same rule and record as its gRPC twin (docs/vault-transit.md has the table).
//!
//! Parameters are read and checked here (what kms does not offer is refused with a 400,
//! never ignored); a request that asks for a specific key version is checked against the
//! key inside the call. Every keyed request is one call of [`super::call::keyed`].

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::call::{Keyed, Refused, Reply, item_error, keyed};
use super::vault::{self, BadRequest, Params};
use super::{Answer, Front};
use crate::access::tls::PeerInfo;
use crate::audit::BatchSummary;
use crate::keyring::material::{SignInput, SignatureEncoding};
use crate::keyring::model::{Algorithm, KeyMeta, VersionState};
use crate::keyring::{Journal, KeyUpdate, Keyring, KeyringError, NewKey};
use crate::service::{Aad, Op, Served};

/// The most items in one `batch_input`, as gRPC's batches.
const MAX_BATCH: usize = 1000;

/// The most random bytes one request may ask for.
const MAX_RANDOM: u64 = 128 * 1024;

/// The label that keeps Vault's `deletion_allowed` with the key (authenticated with its
/// record, like every label).
pub(crate) const DELETION_ALLOWED: &str = "vault.deletion_allowed";

/// The days a version scheduled for destruction by `DELETE transit/keys/:name` waits, as
/// gRPC's default.
const DESTRUCTION_DAYS: u32 = 7;

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
        ["keys"] | ["keys", ""] if list => list_keys(req).await,
        ["keys", name] if post => create_key(req, name).await,
        ["keys", name] if *method == Method::GET => read_key(req, name).await,
        ["keys", name] if *method == Method::DELETE => delete_key(req, name).await,
        ["keys", name, "config"] if post => configure_key(req, name).await,
        ["keys", name, "rotate"] if post => rotate_key(req, name).await,
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
        ["export", ..] | ["backup", ..] | ["keys", _, "trim"] => Err(Refused::bad(
            "kms does not export keys or back them up through Transit: key material never leaves kms",
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

/// A key's answer to `GET transit/keys/:name`, as Vault's.
fn key_data(k: &Keyring, meta: &KeyMeta) -> Value {
    let algorithm = meta.algorithm;
    let mut keys = serde_json::Map::new();
    for v in &meta.versions {
        if matches!(v.state, VersionState::Destroyed { .. }) {
            continue;
        }
        let entry = if algorithm.is_asymmetric() {
            let public_key = k
                .public_key(&meta.name, v.version)
                .ok()
                .map(|(pem, _)| public_key_text(algorithm, &pem))
                .unwrap_or_default();
            json!({
                "name": vault::version_key_name(algorithm),
                "public_key": public_key,
                "creation_time": rfc3339(v.created_at),
            })
        } else {
            json!(v.created_at)
        };
        keys.insert(v.version.to_string(), entry);
    }
    let signing = algorithm.purpose() == crate::keyring::model::Purpose::SignVerify;
    let encryption = algorithm == Algorithm::Aes256Gcm;
    json!({
        "name": meta.name,
        "type": vault::type_name(algorithm),
        "keys": keys,
        "latest_version": meta.primary,
        "min_available_version": 0,
        "min_decryption_version": meta.min_decryption_version,
        "min_encryption_version": 0,
        "deletion_allowed": deletion_allowed(meta),
        "derived": false,
        "exportable": false,
        "allow_plaintext_backup": false,
        "imported_key": meta.origin == crate::keyring::model::Origin::External,
        "auto_rotate_period": meta.rotation_period.unwrap_or(0),
        "supports_encryption": encryption,
        "supports_decryption": encryption,
        "supports_derivation": false,
        "supports_signing": signing,
    })
}

fn deletion_allowed(meta: &KeyMeta) -> bool {
    meta.labels
        .get(DELETION_ALLOWED)
        .is_some_and(|v| v == "true")
}

/// A public key as Vault shows it: PEM (SubjectPublicKeyInfo), but Ed25519 as the base64
/// of its 32 bytes.
fn public_key_text(algorithm: Algorithm, pem: &str) -> String {
    if algorithm != Algorithm::Ed25519 {
        return pem.to_owned();
    }
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    data_encoding::BASE64
        .decode(body.as_bytes())
        .ok()
        .and_then(|der| {
            der.len()
                .checked_sub(32)
                .and_then(|i| der.get(i..).map(vault::base64))
        })
        .unwrap_or_default()
}

/// Unix seconds as RFC 3339 (UTC).
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A keyed call with no associated data.
async fn call(
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

async fn list_keys(req: Request<'_>) -> Result<Answer, Refused> {
    let answer = call(&req, Op::ListKeys, "", 0, |k, _| {
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = k.list_keys(1000, &token)?;
            names.extend(page.into_iter().map(|m| m.name));
            match next {
                Some(t) if names.len() < 100_000 => token = t,
                _ => break,
            }
        }
        if names.is_empty() {
            return Err(KeyringError::NotFound(String::new()));
        }
        Ok(Served::new(Reply::ok(&json!({ "keys": names }))))
    })
    .await;
    not_found_is_empty(answer)
}

/// Vault answers a read of what does not exist with a 404 and no message.
fn not_found_is_empty(answer: Result<Answer, Refused>) -> Result<Answer, Refused> {
    match answer {
        Err(r) if r.reason == "KEY_NOT_FOUND" => Err(Refused {
            status: StatusCode::NOT_FOUND,
            message: String::new(),
            reason: r.reason,
            recorded: r.recorded,
        }),
        other => other,
    }
}

async fn create_key(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let p = &mut req.params;
    let key_type = p.str("type")?.unwrap_or_else(|| "aes256-gcm96".to_owned());
    let algorithm = vault::algorithm_of(&key_type)?;
    p.refuse(
        "convergent_encryption",
        "convergent encryption is not offered by kms",
    )?;
    p.refuse("derived", "derived keys are not offered by kms")?;
    p.refuse("exportable", "kms keys never leave kms")?;
    p.refuse("allow_plaintext_backup", "kms keys never leave kms")?;
    p.refuse("managed_key_name", "kms keys live in its own HSM")?;
    p.refuse("managed_key_id", "kms keys live in its own HSM")?;
    p.refuse("context", "derived keys are not offered by kms")?;
    match p.u64("key_size")? {
        None | Some(0) => {}
        Some(32) if algorithm == Algorithm::HmacSha256 => {}
        Some(_) => {
            return Err(Refused::bad(
                "key_size: kms HMAC keys are 32 bytes (HMAC-SHA256); other types take no key_size",
            ));
        }
    }
    let rotation_period = p.seconds("auto_rotate_period")?.filter(|s| *s != 0);
    let protection = req.front.key_protection;
    let key = name.to_owned();
    call(&req, Op::CreateKey, name, 0, move |k, j| {
        let created = k.create_key(
            NewKey {
                name: key.clone(),
                algorithm,
                protection,
                rotation_period,
                labels: BTreeMap::new(),
                origin: crate::keyring::model::Origin::Generated,
            },
            j,
        );
        let (meta, warning) = match created {
            Ok(meta) => (meta, None),
            // As Vault: a key that exists is answered, with a warning, and not changed.
            Err(KeyringError::AlreadyExists(_)) => {
                (k.get_key(&key)?, Some(format!("key {key} already existed")))
            }
            Err(e) => return Err(e),
        };
        Ok(Served::new(Reply::ok(&key_data(k, &meta)).warn(warning)).version(meta.primary))
    })
    .await
}

async fn read_key(req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let key = name.to_owned();
    not_found_is_empty(
        call(&req, Op::GetKey, name, 0, move |k, _| {
            let meta = k.get_key(&key)?;
            Ok(Served::new(Reply::ok(&key_data(k, &meta))))
        })
        .await,
    )
}

async fn rotate_key(req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let key = name.to_owned();
    call(&req, Op::RotateKey, name, 0, move |k, j| {
        let meta = k.rotate_key(&key, j)?;
        Ok(Served::new(Reply::ok(&key_data(k, &meta))).version(meta.primary))
    })
    .await
}

async fn configure_key(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let p = &mut req.params;
    p.refuse("exportable", "kms keys never leave kms")?;
    p.refuse("allow_plaintext_backup", "kms keys never leave kms")?;
    p.refuse(
        "min_encryption_version",
        "kms encrypts and signs with the latest version only",
    )?;
    let min_decryption_version = p
        .u64("min_decryption_version")?
        .filter(|v| *v != 0)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let deletion = p.bool("deletion_allowed")?;
    let rotation = p.seconds("auto_rotate_period")?;
    let key = name.to_owned();
    call(&req, Op::UpdateKey, name, 0, move |k, j| {
        let labels = match deletion {
            None => None,
            Some(allowed) => {
                let mut labels = k.get_key(&key)?.labels;
                if allowed {
                    labels.insert(DELETION_ALLOWED.to_owned(), "true".to_owned());
                } else {
                    labels.remove(DELETION_ALLOWED);
                }
                Some(labels)
            }
        };
        let update = KeyUpdate {
            rotation_period: rotation.map(|s| Some(s).filter(|s| *s != 0)),
            min_decryption_version,
            labels,
        };
        let meta = k.update_key(&key, update, j)?;
        Ok(Served::new(Reply::ok(&key_data(k, &meta))).version(meta.primary))
    })
    .await
}

/// `DELETE transit/keys/:name`, once `deletion_allowed`: every version but the primary is
/// scheduled for destruction (the usual 7 days, as `kms key destroy`), and the primary,
/// which kms never destroys while it is the primary, is disabled: the key serves nothing
/// from then on. 204, as Vault's.
async fn delete_key(req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let key = name.to_owned();
    call(&req, Op::ScheduleKeyVersionDestruction, name, 0, move |k, j| {
        let meta = k.get_key(&key)?;
        if !deletion_allowed(&meta) {
            return Err(KeyringError::NotAllowed(
                "deletion is not allowed for this key: set deletion_allowed with transit/keys/:name/config first",
            ));
        }
        for v in &meta.versions {
            let live = matches!(v.state, VersionState::Enabled | VersionState::Disabled);
            if !live {
                continue;
            }
            if v.version == meta.primary {
                if v.state == VersionState::Enabled {
                    k.disable_version(&key, v.version, j)?;
                }
            } else {
                k.schedule_destruction(&key, v.version, DESTRUCTION_DAYS, j)?;
            }
        }
        Ok(Served::new(Reply::ok(&Value::Null).status(StatusCode::NO_CONTENT)))
    })
    .await
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
    let op = if batch.single {
        Op::ReEncrypt
    } else {
        Op::BatchReEncrypt
    };
    let aads = aads_of(&batch, |(i, _)| &i.aad);
    let key = name.to_owned();
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
            each(batch, |(i, version)| {
                latest_only(k, &key, *version)?;
                let made = k.reencrypt(&key, &i.ciphertext, &i.aad, Some(&key))?;
                Ok((
                    json!({
                        "ciphertext": vault::prefixed(made.version, &made.ciphertext, false),
                        "key_version": made.version,
                    }),
                    made.source_version,
                ))
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

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
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

    #[test]
    fn ed25519_public_keys_are_the_raw_32_bytes() {
        let der_prefix = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        let mut der = der_prefix.to_vec();
        der.extend([7u8; 32]);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            vault::base64(&der)
        );
        assert_eq!(
            public_key_text(Algorithm::Ed25519, &pem),
            vault::base64(&[7u8; 32])
        );
        assert_eq!(public_key_text(Algorithm::EcdsaP256Sha256, &pem), pem);
    }
}
