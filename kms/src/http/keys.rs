//! `/v1/transit/keys/...`: Vault's key administration (list, create, read, configure,
//! rotate, delete), each the keyring change of the same rule and record as its gRPC twin.

use std::collections::BTreeMap;

use http::StatusCode;
use serde_json::{Value, json};

use super::Answer;
use super::call::{Refused, Reply};
use super::transit::{Request, call};
use super::vault;
use crate::keyring::model::{Algorithm, KeyMeta, VersionState};
use crate::keyring::{KeyUpdate, Keyring, KeyringError, NewKey};
use crate::service::{Op, Served};

/// The label that keeps Vault's `deletion_allowed` with the key (authenticated with its
/// record, like every label).
pub(crate) const DELETION_ALLOWED: &str = "vault.deletion_allowed";

/// The days a version scheduled for destruction by `DELETE transit/keys/:name` waits, as
/// gRPC's default.
const DESTRUCTION_DAYS: u32 = 7;

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
                "creation_time": vault::rfc3339(v.created_at.saturating_mul(1000), false),
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

pub(super) async fn list_keys(req: Request<'_>) -> Result<Answer, Refused> {
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

pub(super) async fn create_key(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
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

pub(super) async fn read_key(req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let key = name.to_owned();
    not_found_is_empty(
        call(&req, Op::GetKey, name, 0, move |k, _| {
            let meta = k.get_key(&key)?;
            Ok(Served::new(Reply::ok(&key_data(k, &meta))))
        })
        .await,
    )
}

pub(super) async fn rotate_key(req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let key = name.to_owned();
    call(&req, Op::RotateKey, name, 0, move |k, j| {
        let meta = k.rotate_key(&key, j)?;
        Ok(Served::new(Reply::ok(&key_data(k, &meta))).version(meta.primary))
    })
    .await
}

pub(super) async fn configure_key(mut req: Request<'_>, name: &str) -> Result<Answer, Refused> {
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
///
/// Each version's change is its own call, with its own record naming its version
/// (`DisableKeyVersion` for the primary, `ScheduleKeyVersionDestruction` for the others), as
/// a client changing them one by one over gRPC would leave; the first that fails stops the
/// rest and is the answer (what was done before it stays done, and is recorded: a
/// destruction can be cancelled for 7 days). Which versions to name is read from the
/// keyring unrecorded; each call checks the caller's role and `deletion_allowed` itself
/// before it changes anything, so the answer to a caller without the role, or for a
/// missing key, is the same as if nothing had been read.
pub(super) async fn delete_key(req: Request<'_>, name: &str) -> Result<Answer, Refused> {
    let listed = req
        .front
        .service
        .seal
        .keyring()
        .ok()
        .and_then(|k| k.get_key(name).ok());
    let mut plan: Vec<(Op, u32)> = listed
        .iter()
        .flat_map(|meta| {
            meta.versions
                .iter()
                .filter(|v| matches!(v.state, VersionState::Enabled | VersionState::Disabled))
                .filter_map(|v| {
                    if v.version != meta.primary {
                        Some((Op::ScheduleKeyVersionDestruction, v.version))
                    } else if v.state == VersionState::Enabled {
                        Some((Op::DisableKeyVersion, v.version))
                    } else {
                        None
                    }
                })
        })
        .collect();
    // The primary first: the key stops serving before anything is scheduled.
    plan.sort_by_key(|(op, _)| *op != Op::DisableKeyVersion);
    if plan.is_empty() {
        // A missing key, a caller without the role, deletion not allowed, or nothing left
        // to do: one call that names no version, which says which.
        plan.push((Op::ScheduleKeyVersionDestruction, 0));
    }
    let mut answer = None;
    for (op, version) in plan {
        let key = name.to_owned();
        answer = Some(
            call(&req, op, name, version, move |k, j| {
                let meta = k.get_key(&key)?;
                if !deletion_allowed(&meta) {
                    return Err(KeyringError::NotAllowed(
                        "deletion is not allowed for this key: set deletion_allowed with transit/keys/:name/config first",
                    ));
                }
                match op {
                    Op::DisableKeyVersion => {
                        k.disable_version(&key, version, j)?;
                    }
                    _ if version != 0 => {
                        k.schedule_destruction(&key, version, DESTRUCTION_DAYS, j)?;
                    }
                    _ => {}
                }
                Ok(Served::new(
                    Reply::ok(&Value::Null).status(StatusCode::NO_CONTENT),
                ))
            })
            .await?,
        );
    }
    answer.ok_or_else(|| Refused {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "internal error".to_owned(),
        reason: "INTERNAL",
        recorded: false,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
