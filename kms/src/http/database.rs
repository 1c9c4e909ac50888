//! `/v1/database/...`: Vault's database secrets engine, mounted at `database/` (Vault's
//! default mount), each path the databases engine's operation of the same rule and record
//! as its gRPC twin (`grpc::databases`; docs/vault-database.md has the table).
//!
//! The front reads the parameters inside the call, once the access rule has passed (a
//! caller who may not make the call gets 403 whatever it sent), so that a parameter kms
//! refuses is recorded as a refusal of that call. A parameter Vault would honour and kms
//! does not offer (`root_rotation_statements`, `password_policy`, `rollback_statements`,
//! ...) is refused with a 400 that says so, never ignored; one Vault does not know is
//! named in the answer's warnings, as Vault names it.
//!
//! No password (a root password given, a login's password issued) reaches a log line, an
//! error message or a record: the engine keeps them out of its errors, and the front
//! writes them only into the answer's bytes, which are zeroized when dropped.

use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use super::call::{self, LeaseInfo, OnDatabase, Refused, Reply};
use super::vault::{BadRequest, Params};
use super::{Answer, Front};
use crate::access::tls::PeerInfo;
use crate::databases::model::{self, Connection, Role, Secret};
use crate::databases::{Databases, DatabasesError};
use crate::service::{Call, ErrorKind, Op, Refusal, Served, ServiceError};

/// Vault's `mount_type` of the mount.
pub(crate) const MOUNT_TYPE: &str = "database";

/// Vault's name of the one database plugin kms offers.
pub(crate) const POSTGRESQL_PLUGIN: &str = "postgresql-database-plugin";

/// The most names a listing answers (Vault's listings are not paged).
pub(crate) const MAX_LISTED: usize = 100_000;

/// One request to a path of the mount (or of `sys/leases`).
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

/// What a path of the mount and its method ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// `POST config/:name`.
    WriteConfig,
    /// `GET config/:name`.
    ReadConfig,
    /// `DELETE config/:name`.
    DeleteConfig,
    /// `LIST config`.
    ListConfig,
    /// `POST rotate-root/:name`.
    RotateRoot,
    /// `POST roles/:name`.
    WriteRole,
    /// `GET roles/:name`.
    ReadRole,
    /// `DELETE roles/:name`.
    DeleteRole,
    /// `LIST roles`.
    ListRoles,
    /// `GET creds/:name`.
    Creds,
    /// `POST static-roles/:name`.
    WriteStaticRole,
    /// `GET static-roles/:name`.
    ReadStaticRole,
    /// `DELETE static-roles/:name`.
    DeleteStaticRole,
    /// `LIST static-roles`.
    ListStaticRoles,
    /// `GET static-creds/:name`.
    StaticCreds,
    /// `POST rotate-role/:name`.
    RotateRole,
}

impl Path {
    /// The service layer's operation.
    pub(crate) fn op(self) -> Op {
        match self {
            Self::WriteConfig => Op::PutDatabaseConnection,
            Self::ReadConfig => Op::GetDatabaseConnection,
            Self::DeleteConfig => Op::DeleteDatabaseConnection,
            Self::ListConfig => Op::ListDatabaseConnections,
            Self::RotateRoot => Op::RotateDatabaseRoot,
            Self::WriteRole => Op::PutDatabaseRole,
            Self::ReadRole => Op::GetDatabaseRole,
            Self::DeleteRole => Op::DeleteDatabaseRole,
            Self::ListRoles => Op::ListDatabaseRoles,
            Self::Creds => Op::GetDatabaseCredentials,
            Self::WriteStaticRole => Op::PutDatabaseStaticRole,
            Self::ReadStaticRole => Op::GetDatabaseStaticRole,
            Self::DeleteStaticRole => Op::DeleteDatabaseStaticRole,
            Self::ListStaticRoles => Op::ListDatabaseStaticRoles,
            Self::StaticCreds => Op::GetDatabaseStaticCredentials,
            Self::RotateRole => Op::RotateDatabaseStaticRole,
        }
    }

    /// The call's operation and what its record names: the connection of a `config/`
    /// or `rotate-root/` path, the role of a `roles/` or `creds/` path (with the
    /// connection the body names, for a role written).
    pub(crate) fn on(self, name: &str, params: &mut Params) -> OnDatabase {
        let (connection, role) = match self {
            Self::WriteConfig | Self::ReadConfig | Self::DeleteConfig | Self::RotateRoot => {
                (name.to_owned(), String::new())
            }
            Self::WriteRole | Self::WriteStaticRole => (
                params.str("db_name").ok().flatten().unwrap_or_default(),
                name.to_owned(),
            ),
            Self::ReadRole
            | Self::DeleteRole
            | Self::Creds
            | Self::ReadStaticRole
            | Self::DeleteStaticRole
            | Self::StaticCreds
            | Self::RotateRole => (String::new(), name.to_owned()),
            Self::ListConfig | Self::ListRoles | Self::ListStaticRoles => {
                (String::new(), String::new())
            }
        };
        OnDatabase {
            op: self.op(),
            connection,
            role,
            lease: String::new(),
        }
    }

    /// Whether what the path names not existing is Vault's 404 (a read or a listing) rather
    /// than a 400.
    fn absent_is_404(self) -> bool {
        matches!(
            self,
            Self::ReadConfig
                | Self::ReadRole
                | Self::ListConfig
                | Self::ListRoles
                | Self::ReadStaticRole
                | Self::ListStaticRoles
                | Self::StaticCreds
        )
    }
}

/// What a request on `database/` asks (`segments`: its path after `database/`), and the
/// name it names; Vault's 404 for a path the mount does not have, 405 for a method the
/// path does not take, and a 400 for Vault's paths kms does not offer.
pub(crate) fn route(
    method: &Method,
    segments: &[&str],
    list: bool,
) -> Result<(Path, String), Refused> {
    let write = *method == Method::POST || *method == Method::PUT;
    let get = *method == Method::GET && !list;
    let list = *method == Method::GET && list;
    let delete = *method == Method::DELETE;
    let (path, name) = match segments {
        ["config"] => (list.then_some(Path::ListConfig), ""),
        ["roles"] => (list.then_some(Path::ListRoles), ""),
        ["config", name] => (
            if get {
                Some(Path::ReadConfig)
            } else if write {
                Some(Path::WriteConfig)
            } else if delete {
                Some(Path::DeleteConfig)
            } else {
                None
            },
            *name,
        ),
        ["roles", name] => (
            if get {
                Some(Path::ReadRole)
            } else if write {
                Some(Path::WriteRole)
            } else if delete {
                Some(Path::DeleteRole)
            } else {
                None
            },
            *name,
        ),
        ["rotate-root", name] => (write.then_some(Path::RotateRoot), *name),
        ["creds", name] => (get.then_some(Path::Creds), *name),
        ["reset", _] => {
            return Err(Refused::bad(
                "database/reset is not offered by kms: it runs no plugin process to restart; its connections to a database are made again whenever the connection's configuration changes (write config/:name again)",
            ));
        }
        ["static-roles"] => (list.then_some(Path::ListStaticRoles), ""),
        ["static-roles", name] => (
            if get {
                Some(Path::ReadStaticRole)
            } else if write {
                Some(Path::WriteStaticRole)
            } else if delete {
                Some(Path::DeleteStaticRole)
            } else {
                None
            },
            *name,
        ),
        ["static-creds", name] => (get.then_some(Path::StaticCreds), *name),
        ["rotate-role", name] => (write.then_some(Path::RotateRole), *name),
        _ => return Err(super::not_found()),
    };
    match path {
        Some(p) => Ok((p, name.to_owned())),
        None => Err(super::method_not_allowed()),
    }
}

/// Vault's status code for a refusal on the mount: what does not exist is a 404 for a
/// read or a listing, a 400 otherwise (an unknown role asked for credentials, as Vault);
/// the rest as every mount ([`call::status_of`]).
fn status_404(refusal: &Refusal) -> StatusCode {
    match refusal.kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        _ => call::status_of(refusal),
    }
}

/// An answer of a handler run inside a call: the reply, and the outcome its record says
/// when it is not `OK` (a removal of what was not there, answered 204 as Vault).
pub(crate) type Handled = Result<(Reply, Option<ErrorKind>), ServiceError>;

/// Runs `handler` as one call of `on` (the parameters read inside it, after the access
/// rule), and wraps its answer in Vault's envelope with the warning on parameters the path
/// does not know (then a 200 rather than a 204, as Vault).
pub(crate) async fn run(
    req: Request<'_>,
    on: &OnDatabase,
    absent_is_404: bool,
    handler: impl FnOnce(&Databases, &Call, &mut Params) -> Handled + Send + 'static,
) -> Result<Answer, Refused> {
    let status: fn(&Refusal) -> StatusCode = if absent_is_404 {
        status_404
    } else {
        call::status_of
    };
    let mut params = req.params;
    let (result, request_id) = call::database(
        &req.front.service,
        req.peer,
        req.size,
        on,
        status,
        move |db, c| {
            let (mut reply, outcome) = handler(db, c, &mut params)?;
            if let Some(w) = params.unread() {
                reply.warnings.push(w);
                if reply.status == StatusCode::NO_CONTENT.as_u16() {
                    reply.status = 0;
                }
            }
            Ok(match outcome {
                Some(kind) => Served::new(reply).refused_as(kind),
                None => Served::new(reply),
            })
        },
    )
    .await;
    // Vault answers what does not exist with a 404 and no message.
    let reply = result.map_err(|r| {
        if r.status == StatusCode::NOT_FOUND {
            Refused {
                message: String::new(),
                ..r
            }
        } else {
            r
        }
    })?;
    Ok(Answer::Data {
        reply,
        request_id,
        mount_type: MOUNT_TYPE,
    })
}

/// A request on the mount or `sys/leases` refused before its call (a body that is not
/// JSON): recorded as a call of its operation, the access rule first (a caller who may not
/// make it gets 403 whatever it sent), and counted as a refusal of the front.
pub(crate) async fn refusal(
    front: &Front,
    peer: &PeerInfo,
    on: &OnDatabase,
    size: usize,
    refused: Refused,
) -> Refused {
    if refused.recorded {
        return refused;
    }
    if let Err(first) = call::record_database_refusal(&front.service, peer, on, size).await {
        return first;
    }
    front.probes.refused_by_front(peer);
    Refused {
        recorded: true,
        ..refused
    }
}

/// The call a request on `database/` or `sys/leases/` (`segments`: its path after
/// `/v1/`) makes, if its path and method name one: what the record of a refusal before the
/// call (a body that is not JSON) names.
pub(crate) fn on_of(method: &Method, segments: &[&str], list: bool) -> Option<OnDatabase> {
    let mut none = Params::empty();
    match segments {
        ["database", path @ ..] => route(method, path, list)
            .ok()
            .map(|(p, name)| p.on(&name, &mut none)),
        ["sys", "leases", path @ ..] => super::leases::route(method, path, list)
            .ok()
            .map(|(p, given)| p.on(&given, &mut none)),
        _ => None,
    }
}

/// Serves a request on `database/` or `sys/leases/` (`segments`: its path after `/v1/`):
/// its answer and its operation's name (for the metrics), or its refusal.
pub(crate) async fn dispatch(
    req: Request<'_>,
    method: &Method,
    segments: &[&str],
    list: bool,
) -> super::Routed {
    match segments {
        ["database", path @ ..] => {
            let (path, name) = route(method, path, list).map_err(|r| (r, "unknown"))?;
            let op = path.op().name();
            serve(req, path, name)
                .await
                .map(|a| (a, op))
                .map_err(|r| (r, op))
        }
        ["sys", "leases", path @ ..] => {
            let (path, given) =
                super::leases::route(method, path, list).map_err(|r| (r, "unknown"))?;
            let op = path.op().name();
            super::leases::serve(req, path, given)
                .await
                .map(|a| (a, op))
                .map_err(|r| (r, op))
        }
        _ => Err((super::not_found(), "unknown")),
    }
}

/// Serves a request that [`route`] read.
pub(crate) async fn serve(req: Request<'_>, path: Path, name: String) -> Result<Answer, Refused> {
    let mut req = req;
    let on = path.on(&name, &mut req.params);
    let absent_is_404 = path.absent_is_404();
    run(req, &on, absent_is_404, move |db, c, p| match path {
        Path::WriteConfig => write_config(db, c, &name, p),
        Path::ReadConfig => Ok((Reply::ok(&connection_json(&db.connection(&name)?)), None)),
        Path::DeleteConfig => gone(db.delete_connection(c, &name, false)),
        Path::ListConfig => listing(db.connections()?.into_iter().map(|c| c.name)),
        Path::RotateRoot => {
            db.rotate_root(c, &name)?;
            Ok((no_content(), None))
        }
        Path::WriteRole => write_role(db, c, &name, p),
        Path::ReadRole => Ok((Reply::ok(&role_json(&db.role(&name)?)), None)),
        Path::DeleteRole => gone(db.delete_role(c, &name, false)),
        Path::ListRoles => listing(db.roles()?.into_iter().map(|r| r.name)),
        Path::Creds => creds(db, c, &name),
        Path::WriteStaticRole => super::database_static::write(db, c, &name, p),
        Path::ReadStaticRole => super::database_static::read(db, &name),
        Path::DeleteStaticRole => super::database_static::delete(db, c, &name),
        Path::ListStaticRoles => listing(db.static_roles()?.into_iter().map(|r| r.name)),
        Path::StaticCreds => super::database_static::creds(db, c, &name),
        Path::RotateRole => {
            db.rotate_static_role(c, &name)?;
            Ok((no_content(), None))
        }
    })
    .await
}

/// A 204.
pub(crate) fn no_content() -> Reply {
    Reply::ok(&Value::Null).status(StatusCode::NO_CONTENT)
}

/// The answer to a removal: 204, also when there was nothing to remove (Vault's answer),
/// then recorded `NOT_FOUND`.
fn gone(removed: Result<u64, DatabasesError>) -> Handled {
    match removed {
        Ok(_) => Ok((no_content(), None)),
        Err(DatabasesError::ConnectionNotFound(_) | DatabasesError::RoleNotFound(_)) => {
            Ok((no_content(), Some(ErrorKind::NotFound)))
        }
        Err(e) => Err(e.into()),
    }
}

/// Vault's listing: `keys`, sorted; none is Vault's 404.
fn listing(names: impl Iterator<Item = String>) -> Handled {
    let mut keys: Vec<String> = names.take(MAX_LISTED).collect();
    if keys.is_empty() {
        return Err(DatabasesError::ConnectionNotFound(String::new()).into());
    }
    keys.sort();
    Ok((Reply::ok(&json!({ "keys": keys })), None))
}

pub(crate) fn bad(message: impl Into<String>) -> ServiceError {
    DatabasesError::BadRequest(message.into()).into()
}

impl From<BadRequest> for ServiceError {
    fn from(b: BadRequest) -> Self {
        DatabasesError::BadRequest(b.0).into()
    }
}

/// A list of strings given as a JSON list, or as one string of comma-separated items
/// (Vault's `TypeCommaStringSlice`: `allowed_roles`, kms's `principals`).
pub(crate) fn comma_list(
    p: &mut Params,
    name: &'static str,
) -> Result<Option<Vec<String>>, ServiceError> {
    let not_list = || {
        bad(format!(
            "{name}: expected a list of strings or a comma-separated string"
        ))
    };
    match p.take(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.trim().to_owned()),
                _ => Err(not_list()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(not_list()),
    }
}

/// SQL statements given as a JSON list of strings, or as one string (Vault's
/// `TypeStringSlice`; a string may hold several statements separated by `;`). A statement
/// that is base64 (Vault's plugins decode it) is refused: kms runs statements as given.
pub(crate) fn statements(
    p: &mut Params,
    name: &'static str,
) -> Result<Option<Vec<String>>, ServiceError> {
    let not_list = || {
        bad(format!(
            "{name}: expected a list of SQL statements or a string"
        ))
    };
    let list = match p.take(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(not_list()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(not_list()),
    };
    if list.iter().any(|s| looks_base64(s)) {
        return Err(bad(format!(
            "{name}: a statement is base64: kms runs statements as given; send the SQL itself"
        )));
    }
    Ok(Some(list))
}

/// Whether `s` reads as base64 of something (no SQL statement does: it has spaces).
fn looks_base64(s: &str) -> bool {
    let t = s.trim();
    t.len() >= 8 && !t.contains(char::is_whitespace) && super::vault::decode_base64(t).is_some()
}

/// Refuses a list parameter that is given and not empty.
fn refuse_list(p: &mut Params, name: &'static str, why: &str) -> Result<(), ServiceError> {
    match p.take(name) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(()),
        Some(_) => Err(bad(format!("{name} is not supported: {why}"))),
    }
}

/// A count that kms keeps as a `u32`.
/// A role's `principals`, as given (comma-separated or a list), or the `old` definition's
/// when the request names none (an update keeps what it does not name, as Vault's does).
pub(crate) fn principals_or(
    p: &mut Params,
    old: Option<&[crate::policy::Pattern]>,
) -> Result<Vec<crate::policy::Pattern>, ServiceError> {
    Ok(match comma_list(p, "principals")? {
        Some(list) => crate::databases::model::principals(&list)?,
        None => old.map(<[_]>::to_vec).unwrap_or_default(),
    })
}

pub(crate) fn count(p: &mut Params, name: &'static str) -> Result<Option<u32>, ServiceError> {
    p.u64(name)?
        .map(|n| u32::try_from(n).map_err(|_| bad(format!("{name}: too large"))))
        .transpose()
}

/// `POST config/:name`: creates a connection, or changes what the request gives of one
/// (what it does not give is kept, as Vault's update).
fn write_config(db: &Databases, c: &Call, name: &str, p: &mut Params) -> Handled {
    let old = match db.connection(name) {
        Ok(conn) => Some(conn),
        Err(DatabasesError::ConnectionNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let plugin = match p.str("plugin_name")? {
        Some(n) if n == POSTGRESQL_PLUGIN || n == model::POSTGRESQL => model::POSTGRESQL,
        Some(_) => {
            return Err(bad(format!(
                "plugin_name: kms offers {POSTGRESQL_PLUGIN} only"
            )));
        }
        None if old.is_some() => model::POSTGRESQL,
        None => {
            return Err(bad(format!("plugin_name: required ({POSTGRESQL_PLUGIN})")));
        }
    };
    p.refuse("plugin_version", "kms runs one built-in PostgreSQL client")?;
    refuse_list(
        p,
        "root_rotation_statements",
        "kms rotates the root password with ALTER ROLE CURRENT_USER WITH PASSWORD",
    )?;
    p.refuse(
        "password_policy",
        "kms makes passwords of a role's password_length (20 to 100) from letters, digits and -",
    )?;
    p.refuse(
        "disable_escaping",
        "kms percent-encodes the root credentials into connection_url",
    )?;
    p.refuse(
        "username_template",
        "kms sets it per role (roles/:name username_template, with {{role}}, {{caller}}, {{random}}, {{unix_time}})",
    )?;
    p.refuse(
        "max_idle_connections",
        "kms keeps up to max_open_connections open",
    )?;
    if p.seconds("max_connection_lifetime")?.is_some_and(|s| s > 0) {
        return Err(bad(
            "max_connection_lifetime is not supported: kms reuses a connection until it fails or the configuration changes",
        ));
    }
    for (name, why) in [
        (
            "tls_certificate",
            "kms does not log in with a client certificate",
        ),
        (
            "private_key",
            "kms does not log in with a client certificate",
        ),
        ("auth_type", "kms logs in with a password"),
        ("service_account_json", "kms logs in with a password"),
        (
            "use_private_ip",
            "kms connects to the host of connection_url",
        ),
    ] {
        p.refuse(name, why)?;
    }
    match p.str("password_authentication")? {
        None => {}
        Some(a) if a == "password" => {}
        Some(_) => {
            return Err(bad(
                "password_authentication: only \"password\" (kms sends a login's password in its CREATE ROLE; the server hashes it)",
            ));
        }
    }
    let verify = p.bool("verify_connection")?.unwrap_or(true);
    let given = |v: Option<String>, old: Option<&str>| v.or(old.map(str::to_owned));
    let url = given(
        p.str("connection_url")?,
        old.as_ref().map(|o| o.url.as_str()),
    )
    .ok_or_else(|| {
        bad("connection_url: required (postgresql://{{username}}:{{password}}@host:5432/db)")
    })?;
    let username = given(
        p.str("username")?,
        old.as_ref().map(|o| o.username.as_str()),
    )
    .unwrap_or_default();
    // Empty: the stored one is kept.
    let password = Secret::new(p.str("password")?.unwrap_or_default());
    let allowed_roles = match comma_list(p, "allowed_roles")? {
        Some(r) => r,
        None => old
            .as_ref()
            .map(|o| o.allowed_roles.clone())
            .unwrap_or_default(),
    };
    let max_open = count(p, "max_open_connections")?
        .or(old.as_ref().map(|o| o.max_open))
        .unwrap_or(0);
    let ca_pem =
        given(p.str("tls_ca")?, old.as_ref().map(|o| o.ca_pem.as_str())).unwrap_or_default();
    let conn = Connection {
        schema: model::SCHEMA,
        name: name.to_owned(),
        plugin: plugin.to_owned(),
        url,
        username,
        password,
        pending_password: None,
        allowed_roles,
        ca_pem,
        max_open,
        root_rotated: 0,
        created_ms: 0,
        created_by: String::new(),
    };
    db.put_connection(c, conn, !verify, &c.identity().principal)?;
    Ok((no_content(), None))
}

/// A connection as Vault's `GET config/:name` answers it (never its password).
fn connection_json(conn: &Connection) -> Value {
    let mut details = json!({
        "connection_url": conn.url,
        "username": conn.username,
        "max_open_connections": conn.max_open,
    });
    if !conn.ca_pem.is_empty()
        && let Some(d) = details.as_object_mut()
    {
        d.insert("tls_ca".to_owned(), json!(conn.ca_pem));
    }
    json!({
        "allowed_roles": conn.allowed_roles,
        "connection_details": details,
        "password_policy": "",
        "plugin_name": POSTGRESQL_PLUGIN,
        "plugin_version": "",
        "root_credentials_rotate_statements": [],
    })
}

/// `POST roles/:name`: creates a role, or changes what the request gives of one.
fn write_role(db: &Databases, c: &Call, name: &str, p: &mut Params) -> Handled {
    let old = match db.role(name) {
        Ok(r) => Some(r),
        Err(DatabasesError::RoleNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    refuse_list(
        p,
        "rollback_statements",
        "kms runs creation_statements in one transaction, which PostgreSQL rolls back whole",
    )?;
    match p.str("credential_type")? {
        None => {}
        Some(t) if t == "password" => {}
        Some(_) => return Err(bad("credential_type: only \"password\"")),
    }
    match p.take("credential_config") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => {
            return Err(bad(
                "credential_config is not supported: a password's length is the role's password_length",
            ));
        }
    }
    let connection = match (p.str("db_name")?, &old) {
        (Some(n), _) => n,
        (None, Some(o)) => o.connection.clone(),
        (None, None) => return Err(bad("db_name: required (the connection's name)")),
    };
    let kept = |given: Option<Vec<String>>, old: Option<&Vec<String>>| {
        given.or(old.cloned()).unwrap_or_default()
    };
    let creation = kept(
        statements(p, "creation_statements")?,
        old.as_ref().map(|o| &o.creation),
    );
    let revocation = kept(
        statements(p, "revocation_statements")?,
        old.as_ref().map(|o| &o.revocation),
    );
    let renew = kept(
        statements(p, "renew_statements")?,
        old.as_ref().map(|o| &o.renew),
    );
    let default_ttl = p
        .seconds("default_ttl")?
        .or(old.as_ref().map(|o| o.default_ttl))
        .unwrap_or(0);
    let max_ttl = p
        .seconds("max_ttl")?
        .or(old.as_ref().map(|o| o.max_ttl))
        .unwrap_or(0);
    let principals = principals_or(p, old.as_ref().map(|o| o.principals.as_slice()))?;
    let username_template = p
        .str("username_template")?
        .or(old.as_ref().map(|o| o.username_template.clone()))
        .unwrap_or_default();
    let password_length = count(p, "password_length")?
        .or(old.as_ref().map(|o| o.password_length))
        .unwrap_or(0);
    let role = Role {
        schema: model::SCHEMA,
        name: name.to_owned(),
        connection,
        creation,
        revocation,
        renew,
        default_ttl,
        max_ttl,
        username_template,
        password_length,
        principals,
        created_ms: 0,
        created_by: String::new(),
    };
    db.put_role(c, role, &c.identity().principal)?;
    Ok((no_content(), None))
}

/// A role as Vault's `GET roles/:name` answers it, with kms's own fields.
fn role_json(r: &Role) -> Value {
    json!({
        "db_name": r.connection,
        "creation_statements": r.creation,
        "revocation_statements": r.revocation,
        "renew_statements": r.renew,
        "rollback_statements": [],
        "default_ttl": r.default_ttl,
        "max_ttl": r.max_ttl,
        "credential_type": "password",
        "principals": r.principals.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "username_template": r.username_template,
        "password_length": r.password_length,
    })
}

/// A login's credentials, serialised straight into the reply's bytes (which are zeroized
/// when dropped): no copy is left in an intermediate JSON tree.
#[derive(Serialize)]
struct Credentials<'a> {
    username: &'a str,
    password: &'a str,
}

/// `GET creds/:name`: a new login for the caller, under a lease.
fn creds(db: &Databases, c: &Call, role: &str) -> Handled {
    let issued = db.issue(c, &c.identity().principal, role, 0)?;
    let l = &issued.lease;
    let reply = Reply {
        data: serde_json::to_vec(&Credentials {
            username: &l.username,
            password: &issued.password,
        })
        .unwrap_or_default(),
        status: 0,
        warnings: Vec::new(),
        lease: None,
    }
    .leased(LeaseInfo {
        id: l.id.clone(),
        duration: l.expires.saturating_sub(l.issued),
        renewable: !l.irrevocable && l.expires < l.max_expires,
    });
    Ok((reply, None))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn params(body: &str) -> Params {
        Params::parse(body.as_bytes()).unwrap()
    }

    #[test]
    fn paths_route_to_their_operations() {
        let ok = |m: &str, segs: &[&str], list: bool| {
            route(&Method::from_bytes(m.as_bytes()).unwrap(), segs, list)
                .map(|(p, n)| (p.op(), n))
                .map_err(|r| r.status.as_u16())
        };
        assert_eq!(
            ok("POST", &["config", "pg"], false),
            Ok((Op::PutDatabaseConnection, "pg".into()))
        );
        assert_eq!(
            ok("PUT", &["config", "pg"], false),
            Ok((Op::PutDatabaseConnection, "pg".into()))
        );
        assert_eq!(
            ok("GET", &["config"], true),
            Ok((Op::ListDatabaseConnections, String::new()))
        );
        assert_eq!(
            ok("GET", &["roles", "r"], false),
            Ok((Op::GetDatabaseRole, "r".into()))
        );
        assert_eq!(
            ok("GET", &["creds", "r"], false),
            Ok((Op::GetDatabaseCredentials, "r".into()))
        );
        assert_eq!(
            ok("POST", &["rotate-root", "pg"], false),
            Ok((Op::RotateDatabaseRoot, "pg".into()))
        );
        assert_eq!(ok("GET", &["config"], false), Err(405));
        assert_eq!(ok("POST", &["creds", "r"], false), Err(405));
        assert_eq!(ok("GET", &["nothing"], false), Err(404));
        assert_eq!(ok("GET", &["config", "a", "b"], false), Err(404));
        assert_eq!(ok("POST", &["reset", "pg"], false), Err(400));
        assert_eq!(
            ok("POST", &["static-roles", "x"], false),
            Ok((Op::PutDatabaseStaticRole, "x".into()))
        );
        assert_eq!(
            ok("GET", &["static-roles"], true),
            Ok((Op::ListDatabaseStaticRoles, String::new()))
        );
        assert_eq!(
            ok("GET", &["static-creds", "x"], false),
            Ok((Op::GetDatabaseStaticCredentials, "x".into()))
        );
        assert_eq!(
            ok("POST", &["rotate-role", "x"], false),
            Ok((Op::RotateDatabaseStaticRole, "x".into()))
        );
        assert_eq!(ok("GET", &["rotate-role", "x"], false), Err(405));
    }

    #[test]
    fn lists_read_as_vault_reads_them() {
        let mut p = params(r#"{"a": "x, y,,z", "b": ["p", " q "], "c": 3, "d": null}"#);
        assert_eq!(
            comma_list(&mut p, "a").unwrap(),
            Some(vec!["x".into(), "y".into(), "z".into()])
        );
        assert_eq!(
            comma_list(&mut p, "b").unwrap(),
            Some(vec!["p".into(), "q".into()])
        );
        assert!(comma_list(&mut p, "c").is_err());
        assert_eq!(comma_list(&mut p, "d").unwrap(), None);
        let mut p = params(
            r#"{"one": "CREATE ROLE \"{{name}}\"; GRANT x TO \"{{name}}\";", "many": ["A B", "C D"], "b64": ["Q1JFQVRFIFJPTEU="], "bad": [1]}"#,
        );
        assert_eq!(statements(&mut p, "one").unwrap().unwrap().len(), 1);
        assert_eq!(statements(&mut p, "many").unwrap().unwrap().len(), 2);
        assert!(statements(&mut p, "b64").is_err());
        assert!(statements(&mut p, "bad").is_err());
        let mut p = params(r#"{"e": [], "f": ["x"], "g": ""}"#);
        assert!(refuse_list(&mut p, "e", "").is_ok());
        assert!(refuse_list(&mut p, "f", "").is_err());
        assert!(refuse_list(&mut p, "g", "").is_ok());
    }

    #[test]
    fn a_connection_shows_no_password() {
        let conn = Connection {
            schema: 1,
            name: "pg".into(),
            plugin: model::POSTGRESQL.into(),
            url: "postgresql://{{username}}:{{password}}@h/db".into(),
            username: "root".into(),
            password: Secret::new("root-password-77".into()),
            pending_password: Some(Secret::new("pending-password-88".into())),
            allowed_roles: vec!["r".into()],
            ca_pem: String::new(),
            max_open: 4,
            root_rotated: 0,
            created_ms: 0,
            created_by: String::new(),
        };
        let shown = connection_json(&conn).to_string();
        assert!(!shown.contains("password-77") && !shown.contains("password-88"));
        let v = connection_json(&conn);
        assert_eq!(v["plugin_name"], POSTGRESQL_PLUGIN);
        assert_eq!(v["connection_details"]["username"], "root");
        assert_eq!(v["allowed_roles"], json!(["r"]));
    }
}
