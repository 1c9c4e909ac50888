//! `/v1/database/static-roles/:name`, `static-creds/:name`, `rotate-role/:name`: Vault's
//! static roles over the databases engine's (`databases::statics`): an existing login whose
//! password kms sets at once, then every `rotation_period`, and serves to the static
//! role's principals (kms's own field: Vault's policies are kms's principals).
//!
//! Vault's `rotation_schedule`, `rotation_window`, `self_managed_password`,
//! `skip_import_rotation` = false and a `credential_type` other than `password` are refused
//! with a 400 that says why, never ignored.

use serde::Serialize;
use serde_json::{Value, json};

use super::call::Reply;
use super::database::{Handled, bad, count, no_content, principals_or, statements};
use super::vault::Params;
use crate::databases::statics::StaticRole;
use crate::databases::{Databases, DatabasesError};
use crate::keyring::now;
use crate::service::Call;

/// A time in Unix seconds as RFC 3339, as Vault writes `last_vault_rotation`.
fn rfc3339(secs: u64) -> String {
    super::vault::rfc3339(secs.saturating_mul(1000), false)
}

/// `POST static-roles/:name`: creates a static role (its login's password set at once), or
/// changes what the request gives of one.
pub(crate) fn write(db: &Databases, c: &Call, name: &str, p: &mut Params) -> Handled {
    let old = match db.static_role(name) {
        Ok(r) => Some(r),
        Err(DatabasesError::RoleNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    for (field, why) in [
        (
            "rotation_schedule",
            "kms rotates every rotation_period from the last rotation",
        ),
        ("rotation_window", "kms rotates every rotation_period"),
        (
            "self_managed_password",
            "kms sets the password with the connection's root login",
        ),
    ] {
        p.refuse(field, why)?;
    }
    if p.bool("skip_import_rotation")? == Some(true) {
        return Err(bad(
            "skip_import_rotation is not supported: kms sets the login's password when the static role is written, so that it knows it",
        ));
    }
    match p.str("credential_type")? {
        None => {}
        Some(t) if t == "password" => {}
        Some(_) => return Err(bad("credential_type: only \"password\"")),
    }
    let given = |v: Option<String>, old: Option<&str>| v.or(old.map(str::to_owned));
    let connection = given(
        p.str("db_name")?,
        old.as_ref().map(|o| o.connection.as_str()),
    )
    .ok_or_else(|| bad("db_name: required (the connection's name)"))?;
    let username = given(
        p.str("username")?,
        old.as_ref().map(|o| o.username.as_str()),
    )
    .ok_or_else(|| bad("username: required (the existing login's name)"))?;
    let period = p
        .seconds("rotation_period")?
        .or(old.as_ref().map(|o| o.period))
        .unwrap_or(0);
    let rotation = statements(p, "rotation_statements")?
        .or(old.as_ref().map(|o| o.rotation.clone()))
        .unwrap_or_default();
    let password_length = count(p, "password_length")?
        .or(old.as_ref().map(|o| o.password_length))
        .unwrap_or(0);
    let principals = principals_or(p, old.as_ref().map(|o| o.principals.as_slice()))?;
    let role = StaticRole {
        name: name.to_owned(),
        connection,
        username,
        period,
        rotation,
        password_length,
        principals,
        ..StaticRole::blank()
    };
    db.put_static_role(c, role, &c.identity().principal)?;
    Ok((no_content(), None))
}

/// `GET static-roles/:name`, as Vault answers it (never the password), with kms's fields.
pub(crate) fn read(db: &Databases, name: &str) -> Handled {
    let r = db.static_role(name)?;
    let data: Value = json!({
        "db_name": r.connection,
        "username": r.username,
        "rotation_period": r.period,
        "rotation_statements": r.rotation,
        "credential_type": "password",
        "last_vault_rotation": rfc3339(r.last_rotated),
        "next_vault_rotation": rfc3339(r.next_rotation),
        "principals": r.principals.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "password_length": r.password_length,
        "last_error": r.last_error,
    });
    Ok((Reply::ok(&data), None))
}

/// `DELETE static-roles/:name`: 204, also when there was none (as Vault).
pub(crate) fn delete(db: &Databases, c: &Call, name: &str) -> Handled {
    match db.delete_static_role(c, name) {
        Ok(()) => Ok((no_content(), None)),
        Err(DatabasesError::RoleNotFound(_)) => {
            Ok((no_content(), Some(crate::service::ErrorKind::NotFound)))
        }
        Err(e) => Err(e.into()),
    }
}

/// A static login's credentials, serialised straight into the reply's bytes (zeroized
/// when dropped).
#[derive(Serialize)]
struct StaticCreds<'a> {
    username: &'a str,
    password: &'a str,
    last_vault_rotation: String,
    rotation_period: u64,
    ttl: u64,
}

/// `GET static-creds/:name`: the login and its password in force (a principal the static
/// role names).
pub(crate) fn creds(db: &Databases, c: &Call, name: &str) -> Handled {
    let r = db.static_credentials(&c.identity().principal, name)?;
    let reply = Reply {
        data: serde_json::to_vec(&StaticCreds {
            username: &r.username,
            password: r.password.expose(),
            last_vault_rotation: rfc3339(r.last_rotated),
            rotation_period: r.period,
            ttl: r.next_rotation.saturating_sub(now()),
        })
        .unwrap_or_default(),
        status: 0,
        warnings: Vec::new(),
        lease: None,
    };
    Ok((reply, None))
}
