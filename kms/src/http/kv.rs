//! `/v1/secret/...`: Vault's KV version 2 paths, mounted at `secret/` only, each the
//! secrets engine's operation of the same rule, grant and record as its gRPC twin
//! (`grpc::secrets`; docs/vault-kv.md has the table).
//!
//! The front reads and checks the parameters (a value that is not a string is refused,
//! never converted: a version is names and string values), makes one call of
//! [`super::call::secret`], and writes Vault's JSON back. What a read, a listing or a
//! subkeys call does not find is Vault's `404 {"errors": []}`; a deleted or destroyed
//! version is Vault's 404 with its metadata (`data` null), recorded `NOT_FOUND`.

use std::collections::BTreeMap;

use http::{HeaderMap, Method, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::call::{OnSecret, PathCheck, Refused, Reply, secret};
use super::vault::{self, Params};
use super::{Answer, Front};
use crate::access::tls::PeerInfo;
use crate::secrets::model::{Metadata, Values, Version};
use crate::secrets::{Config, ConfigUpdate, MetadataUpdate, Patch, Secrets, SecretsError, path};
use crate::service::{Call, ErrorKind, Op, Refusal, Served};

/// The most names a listing answers: Vault's listings are not paged, so the engine's pages
/// are read one after the other up to this many.
const MAX_LISTED: usize = 100_000;

/// The media type of a PATCH (a JSON merge patch, RFC 7396), which Vault requires.
const MERGE_PATCH: &str = "application/merge-patch+json";

/// Vault's `mount_type` of a KV mount.
const MOUNT_TYPE: &str = "kv";

/// One request to a KV path.
pub(crate) struct Request<'a> {
    /// The front.
    pub front: &'a Front,
    /// Who is calling.
    pub peer: &'a PeerInfo,
    /// The body's size.
    pub size: usize,
    /// Its parameters.
    pub params: Params,
    /// The query string (`version`, `depth`).
    pub query: Option<&'a str>,
    /// The headers (a PATCH's `Content-Type`).
    pub headers: &'a HeaderMap,
}

/// What a KV path and method ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kv {
    /// `GET config`.
    ReadConfig,
    /// `POST config`.
    WriteConfig,
    /// `GET data/:path`.
    Read,
    /// `POST data/:path`.
    Write,
    /// `PATCH data/:path`.
    Patch,
    /// `DELETE data/:path`: the latest version.
    DeleteLatest,
    /// `POST delete/:path`.
    Delete,
    /// `POST undelete/:path`.
    Undelete,
    /// `POST destroy/:path`.
    Destroy,
    /// `GET metadata/:path`.
    ReadMetadata,
    /// `POST metadata/:path`.
    WriteMetadata,
    /// `PATCH metadata/:path`.
    PatchMetadata,
    /// `DELETE metadata/:path`.
    DeleteMetadata,
    /// `LIST metadata/:path` (or `GET ...?list=true`).
    List,
    /// `GET subkeys/:path`.
    Subkeys,
}

impl Kv {
    /// The service layer's operation.
    pub(crate) fn op(self) -> Op {
        match self {
            Self::ReadConfig => Op::GetSecretsConfig,
            Self::WriteConfig => Op::UpdateSecretsConfig,
            Self::Read => Op::GetSecret,
            Self::Write => Op::PutSecret,
            Self::Patch => Op::PatchSecret,
            Self::DeleteLatest | Self::Delete => Op::DeleteSecretVersions,
            Self::Undelete => Op::UndeleteSecretVersions,
            Self::Destroy => Op::DestroySecretVersions,
            Self::ReadMetadata => Op::GetSecretMetadata,
            Self::WriteMetadata | Self::PatchMetadata => Op::UpdateSecretMetadata,
            Self::DeleteMetadata => Op::DeleteSecret,
            Self::List => Op::ListSecrets,
            Self::Subkeys => Op::GetSecretSubkeys,
        }
    }

    /// The call's operation and the path its record names, as the gRPC service names it:
    /// none for reading the engine's configuration, `""` for changing it, the normalised
    /// prefix for a listing, the secret's path otherwise.
    pub(crate) fn on(self, path: &str) -> OnSecret {
        let named = |p: String, check: PathCheck| Some((p, check));
        let path = match self {
            Self::ReadConfig => None,
            Self::WriteConfig => named(String::new(), path::no_path),
            Self::List => named(path::listed(path), path::check_prefix),
            _ => named(path.to_owned(), path::check),
        };
        OnSecret {
            op: self.op(),
            path,
            versions: Vec::new(),
        }
    }
}

/// What a request on `secret/` asks (`segments`: its path after `secret/`), and the
/// secret's path; Vault's 404 for a path the mount does not have, 405 for a method the
/// path does not take.
pub(crate) fn route(
    method: &Method,
    segments: &[&str],
    list: bool,
) -> Result<(Kv, String), Refused> {
    let write = *method == Method::POST || *method == Method::PUT;
    let get = *method == Method::GET && !list;
    let list = *method == Method::GET && list;
    let patch = *method == Method::PATCH;
    let delete = *method == Method::DELETE;
    let (kv, rest): (Option<Kv>, &[&str]) = match segments {
        ["config"] => (
            if get {
                Some(Kv::ReadConfig)
            } else if write {
                Some(Kv::WriteConfig)
            } else {
                None
            },
            &[],
        ),
        ["metadata", rest @ ..] if list => (Some(Kv::List), rest),
        ["metadata"] => (None, &[]),
        ["metadata", rest @ ..] => (
            if get {
                Some(Kv::ReadMetadata)
            } else if write {
                Some(Kv::WriteMetadata)
            } else if patch {
                Some(Kv::PatchMetadata)
            } else if delete {
                Some(Kv::DeleteMetadata)
            } else {
                None
            },
            rest,
        ),
        ["data", rest @ ..] if !rest.is_empty() => (
            if get {
                Some(Kv::Read)
            } else if write {
                Some(Kv::Write)
            } else if patch {
                Some(Kv::Patch)
            } else if delete {
                Some(Kv::DeleteLatest)
            } else {
                None
            },
            rest,
        ),
        [which @ ("delete" | "undelete" | "destroy"), rest @ ..] if !rest.is_empty() => (
            write.then_some(match *which {
                "delete" => Kv::Delete,
                "undelete" => Kv::Undelete,
                _ => Kv::Destroy,
            }),
            rest,
        ),
        ["subkeys", rest @ ..] if !rest.is_empty() => (get.then_some(Kv::Subkeys), rest),
        _ => return Err(super::not_found()),
    };
    match kv {
        Some(kv) => Ok((kv, rest.join("/"))),
        None => Err(super::method_not_allowed()),
    }
}

/// Serves a KV request that [`route`] read.
pub(crate) async fn serve(req: Request<'_>, kv: Kv, path: String) -> Result<Answer, Refused> {
    match kv {
        Kv::ReadConfig => read_config(req).await,
        Kv::WriteConfig => write_config(req).await,
        Kv::Read => read(req, path).await,
        Kv::Write => write(req, path).await,
        Kv::Patch => patch(req, path).await,
        Kv::DeleteLatest | Kv::Delete | Kv::Undelete | Kv::Destroy => versions(req, kv, path).await,
        Kv::ReadMetadata => read_metadata(req, path).await,
        Kv::WriteMetadata | Kv::PatchMetadata => write_metadata(req, kv, path).await,
        Kv::DeleteMetadata => delete_metadata(req, path).await,
        Kv::List => list(req, path).await,
        Kv::Subkeys => subkeys(req, path).await,
    }
}

/// Vault's status code for a refusal on this mount: 404 for what does not exist (Transit
/// answers 400), 400 for what the caller can fix (check-and-set included, as Vault), 403
/// for access, 429 for limits, 503 for a sealed or uninitialised server and faults to
/// retry, 500 for the rest.
pub(crate) fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal.kind {
        ErrorKind::FailedPrecondition if refusal.reason == "NOT_INITIALIZED" => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        // Vault's answer to a patch of a secret whose current version is deleted.
        ErrorKind::FailedPrecondition if refusal.reason == "NOTHING_TO_PATCH" => {
            StatusCode::NOT_FOUND
        }
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition | ErrorKind::AlreadyExists => {
            StatusCode::BAD_REQUEST
        }
        ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => StatusCode::FORBIDDEN,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal | ErrorKind::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Vault answers what does not exist with a 404 and no message.
fn not_found_is_empty(r: Refused) -> Refused {
    match r.reason {
        "SECRET_NOT_FOUND" | "VERSION_NOT_FOUND" => Refused {
            message: String::new(),
            ..r
        },
        _ => r,
    }
}

/// One call on the secrets engine, and Vault's envelope around its answer (with the
/// warning on parameters the path does not know: then a 200, as Vault, rather than 204).
async fn run(
    req: &Request<'_>,
    kv: Kv,
    path: &str,
    f: impl FnOnce(&Secrets, &Call) -> Result<Served<Reply>, SecretsError> + Send + 'static,
) -> Result<Answer, Refused> {
    run_asking(req, kv, path, Vec::new(), f).await
}

/// [`run`], recording the versions the call asks for whatever its outcome.
async fn run_asking(
    req: &Request<'_>,
    kv: Kv,
    path: &str,
    versions: Vec<u64>,
    f: impl FnOnce(&Secrets, &Call) -> Result<Served<Reply>, SecretsError> + Send + 'static,
) -> Result<Answer, Refused> {
    let on = OnSecret {
        versions,
        ..kv.on(path)
    };
    let (result, request_id) =
        secret(&req.front.service, req.peer, req.size, on, status_of, f).await;
    let mut reply = result.map_err(not_found_is_empty)?;
    if let Some(w) = req.params.unread() {
        reply.warnings.push(w);
        if reply.status == StatusCode::NO_CONTENT.as_u16() {
            reply.status = 0;
        }
    }
    Ok(Answer::Data {
        reply,
        request_id,
        mount_type: MOUNT_TYPE,
    })
}

/// A 200 answer of `data`, serialised straight from the engine's types (no copy of a
/// value is left in an intermediate JSON tree; the reply zeroizes its bytes).
fn reply_of(data: &impl Serialize) -> Reply {
    Reply {
        data: serde_json::to_vec(data).unwrap_or_default(),
        status: 0,
        warnings: Vec::new(),
        lease: None,
    }
}

/// The answer to a read of a version: 200, or, for a deleted or destroyed one, Vault's 404
/// that carries its metadata, recorded `NOT_FOUND`.
fn answer_of_read(reply: Reply, live: bool) -> Served<Reply> {
    if live {
        Served::new(reply)
    } else {
        Served::new(reply.status(StatusCode::NOT_FOUND)).refused_as(ErrorKind::NotFound)
    }
}

/// A 204.
fn no_content() -> Served<Reply> {
    Served::new(Reply::ok(&Value::Null).status(StatusCode::NO_CONTENT))
}

/// `custom_metadata` as Vault shows it: `null` when there is none.
fn custom_json(custom: &BTreeMap<String, String>) -> Value {
    if custom.is_empty() {
        Value::Null
    } else {
        json!(custom)
    }
}

/// A time, or Vault's `""` for none.
fn time_or_empty(ms: Option<u64>) -> String {
    ms.map(|t| vault::rfc3339(t, true)).unwrap_or_default()
}

/// A version's metadata as Vault answers a read or a write.
fn version_json(version: u64, v: &Version, custom: &BTreeMap<String, String>) -> Value {
    json!({
        "created_time": vault::rfc3339(v.created_ms, true),
        "custom_metadata": custom_json(custom),
        "deletion_time": time_or_empty(v.deletion_ms),
        "destroyed": v.destroyed,
        "version": version,
    })
}

/// A secret's metadata as Vault answers `GET metadata/:path`.
fn metadata_json(m: &Metadata) -> Value {
    let versions: Map<String, Value> = m
        .versions
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                json!({
                    "created_time": vault::rfc3339(v.created_ms, true),
                    "deletion_time": time_or_empty(v.deletion_ms),
                    "destroyed": v.destroyed,
                }),
            )
        })
        .collect();
    json!({
        "cas_required": m.cas_required,
        "created_time": vault::rfc3339(m.created_ms, true),
        "current_version": m.current,
        "custom_metadata": custom_json(&m.custom),
        "delete_version_after": vault::go_duration(m.delete_version_after),
        "max_versions": m.max_versions,
        "oldest_version": m.oldest(),
        "updated_time": vault::rfc3339(m.updated_ms, true),
        "versions": versions,
    })
}

/// The engine's configuration as Vault answers `GET config`.
fn config_json(c: &Config) -> Value {
    json!({
        "cas_required": c.cas_required,
        "delete_version_after": vault::go_duration(c.delete_version_after),
        "max_versions": c.max_versions,
    })
}

/// The answer to a read of a version: its values (none when deleted or destroyed) and
/// its metadata.
#[derive(Serialize)]
struct VersionRead<'a> {
    data: Option<&'a BTreeMap<String, String>>,
    metadata: Value,
}

/// The answer to `subkeys/:path`: each name with `null` (every value is a string, a leaf).
#[derive(Serialize)]
struct SubkeysRead {
    subkeys: Option<BTreeMap<String, ()>>,
    metadata: Value,
}

/// The refusal of a value that is not a string. It names no value and no value's name.
fn not_strings(what: &str) -> Refused {
    Refused::bad(format!(
        "{what}: values must be strings (kms keeps a secret's values as strings: send a number, boolean, list or object as its JSON text)"
    ))
}

/// A version's values from `data`: an object of strings, none converted.
fn values_of(map: Map<String, Value>) -> Result<Values, Refused> {
    let mut values = Values::default();
    for (name, value) in map {
        match value {
            Value::String(s) => {
                values.0.insert(name, s);
            }
            _ => return Err(not_strings("data")),
        }
    }
    Ok(values)
}

/// A JSON merge patch of a version's values: a string sets a name, `null` removes it.
fn patch_of(map: Map<String, Value>) -> Result<Patch, Refused> {
    let mut patch = Patch::default();
    for (name, value) in map {
        match value {
            Value::String(s) => {
                patch.set.0.insert(name, s);
            }
            Value::Null => patch.remove.push(name),
            _ => return Err(not_strings("data")),
        }
    }
    Ok(patch)
}

/// `data`, which must be an object.
fn data_of(p: &mut Params) -> Result<Map<String, Value>, Refused> {
    match p.take("data") {
        None | Some(Value::Null) => Err(Refused::bad("no data provided")),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Refused::bad(
            "data: expected a JSON object of names and string values",
        )),
    }
}

/// `options.cas`, if given.
fn cas_of(p: &mut Params) -> Result<Option<u64>, Refused> {
    match p.take("options") {
        None | Some(Value::Null) => Ok(None),
        Some(options @ Value::Object(_)) => Ok(Params::item(options)?.u64("cas")?),
        Some(_) => Err(Refused::bad("options: expected a JSON object")),
    }
}

/// `custom_metadata`: names and string values (`null` values kept as removals when
/// `nulls`, for a merge patch).
fn custom_of(
    map: Map<String, Value>,
    nulls: bool,
) -> Result<BTreeMap<String, Option<String>>, Refused> {
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, Some(s))),
            Value::Null if nulls => Ok((k, None)),
            _ => Err(not_strings("custom_metadata")),
        })
        .collect()
}

/// `versions`: a list of version numbers (numbers or their decimal strings), or a string of
/// them separated by commas, as Vault's `TypeCommaIntSlice` reads it.
fn versions_of(p: &mut Params) -> Result<Vec<u64>, Refused> {
    let bad = || Refused::bad("versions: expected a list of version numbers");
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => s.trim().parse().map_err(|_| bad()),
        _ => Err(bad()),
    };
    let versions = match p.take("versions") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().map(number).collect::<Result<_, _>>()?,
        Some(Value::String(s)) => s
            .split(',')
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.trim().parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?,
        Some(n @ Value::Number(_)) => vec![number(&n)?],
        Some(_) => return Err(bad()),
    };
    if versions.is_empty() {
        return Err(Refused::bad("no version number provided"));
    }
    Ok(versions)
}

/// A non-negative integer of the query string (`version`, `depth`).
fn query_u64(query: Option<&str>, name: &'static str) -> Result<Option<u64>, Refused> {
    match super::query_value(query, name) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| Refused::bad(format!("{name}: expected a non-negative integer"))),
    }
}

/// `max_versions`, as the engine counts it.
fn max_versions_of(p: &mut Params) -> Result<Option<u32>, Refused> {
    p.u64("max_versions")?
        .map(|m| {
            u32::try_from(m).map_err(|_| {
                Refused::bad(format!(
                    "max_versions is at most {}",
                    crate::secrets::model::MAX_VERSIONS_LIMIT
                ))
            })
        })
        .transpose()
}

/// A PATCH must say it is a JSON merge patch, as Vault requires (415 otherwise).
fn check_merge_patch(headers: &HeaderMap) -> Result<(), Refused> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if given.is_some_and(|t| t.eq_ignore_ascii_case(MERGE_PATCH)) {
        return Ok(());
    }
    Err(Refused {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        message: format!("PATCH requires Content-Type: {MERGE_PATCH}"),
        reason: "UNSUPPORTED_MEDIA_TYPE",
        recorded: false,
    })
}

async fn read_config(req: Request<'_>) -> Result<Answer, Refused> {
    run(&req, Kv::ReadConfig, "", |s, _| {
        Ok(Served::new(Reply::ok(&config_json(&s.config()?))))
    })
    .await
}

async fn write_config(mut req: Request<'_>) -> Result<Answer, Refused> {
    let p = &mut req.params;
    let update = ConfigUpdate {
        max_versions: max_versions_of(p)?,
        cas_required: p.bool("cas_required")?,
        delete_version_after: p.seconds("delete_version_after")?,
    };
    run(&req, Kv::WriteConfig, "", move |s, c| {
        s.update_config(c, update)?;
        Ok(no_content())
    })
    .await
}

async fn read(req: Request<'_>, path: String) -> Result<Answer, Refused> {
    let version = query_u64(req.query, "version")?.unwrap_or(0);
    run_asking(&req, Kv::Read, &path.clone(), vec![version], move |s, _| {
        let read = s.read(&path, version)?;
        let metadata = version_json(read.version, &read.info, &read.custom);
        let reply = reply_of(&VersionRead {
            data: read.values.as_ref().map(|v| &v.0),
            metadata,
        });
        Ok(answer_of_read(reply, read.values.is_some()).secret_versions(vec![read.version]))
    })
    .await
}

async fn write(mut req: Request<'_>, path: String) -> Result<Answer, Refused> {
    let values = values_of(data_of(&mut req.params)?)?;
    let cas = cas_of(&mut req.params)?;
    run(&req, Kv::Write, &path.clone(), move |s, c| {
        let w = s.write(c, &path, values, cas)?;
        let custom = custom_shown(s, c, &path, w.custom)?;
        Ok(
            Served::new(Reply::ok(&version_json(w.version, &w.info, &custom)))
                .secret_versions(vec![w.version]),
        )
    })
    .await
}

async fn patch(mut req: Request<'_>, path: String) -> Result<Answer, Refused> {
    check_merge_patch(req.headers)?;
    let patch = patch_of(data_of(&mut req.params)?)?;
    let cas = cas_of(&mut req.params)?;
    run(&req, Kv::Patch, &path.clone(), move |s, c| {
        let w = s.patch(c, &path, patch, cas)?;
        let custom = custom_shown(s, c, &path, w.custom)?;
        Ok(
            Served::new(Reply::ok(&version_json(w.version, &w.info, &custom)))
                .secret_versions(vec![w.version]),
        )
    })
    .await
}

/// The custom metadata a write's answer shows: none unless the caller may read the
/// secret's metadata (`secret-write` alone does not allow that).
fn custom_shown(
    s: &Secrets,
    c: &Call,
    path: &str,
    custom: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, SecretsError> {
    let may = s.permits(
        &c.identity().principal,
        path,
        crate::policy::SecretOperation::SecretReadMetadata,
    )?;
    Ok(if may { custom } else { BTreeMap::new() })
}

/// `DELETE data/:path` (the latest version), `delete/`, `undelete/`, `destroy/`: 204.
async fn versions(mut req: Request<'_>, kv: Kv, path: String) -> Result<Answer, Refused> {
    let versions = match kv {
        Kv::DeleteLatest => Vec::new(),
        _ => versions_of(&mut req.params)?,
    };
    run_asking(&req, kv, &path.clone(), versions.clone(), move |s, c| {
        match kv {
            Kv::Undelete => s.undelete(c, &path, &versions)?,
            Kv::Destroy => s.destroy(c, &path, &versions)?,
            _ => s.delete(c, &path, &versions)?,
        };
        Ok(no_content())
    })
    .await
}

async fn read_metadata(req: Request<'_>, path: String) -> Result<Answer, Refused> {
    run(&req, Kv::ReadMetadata, &path.clone(), move |s, _| {
        Ok(Served::new(Reply::ok(&metadata_json(
            &s.read_metadata(&path)?,
        ))))
    })
    .await
}

/// `POST metadata/:path` (made if absent; only the fields given change, `custom_metadata`
/// replaced whole) and `PATCH` (a JSON merge patch of an existing secret's metadata: `null`
/// resets a field, `custom_metadata` is merged and a `null` value removes a name). 204.
async fn write_metadata(mut req: Request<'_>, kv: Kv, path: String) -> Result<Answer, Refused> {
    let merge = kv == Kv::PatchMetadata;
    if merge {
        check_merge_patch(req.headers)?;
    }
    let p = &mut req.params;
    let reset = |p: &Params, name| merge && p.is_null(name);
    let mut update = MetadataUpdate {
        max_versions: if reset(p, "max_versions") {
            Some(0)
        } else {
            max_versions_of(p)?
        },
        cas_required: if reset(p, "cas_required") {
            Some(false)
        } else {
            p.bool("cas_required")?
        },
        delete_version_after: if reset(p, "delete_version_after") {
            Some(0)
        } else {
            p.seconds("delete_version_after")?
        },
        custom: None,
        custom_patch: None,
        may_drop: false,
    };
    match p.take("custom_metadata") {
        None => {}
        Some(Value::Null) if merge => update.custom = Some(BTreeMap::new()),
        Some(Value::Null) => {}
        Some(Value::Object(map)) if merge => update.custom_patch = Some(custom_of(map, true)?),
        Some(Value::Object(map)) => {
            update.custom = Some(
                custom_of(map, false)?
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v?)))
                    .collect(),
            );
        }
        Some(_) => {
            return Err(Refused::bad(
                "custom_metadata: expected a JSON object of names and string values",
            ));
        }
    }
    run(&req, kv, &path.clone(), move |s, c| {
        let update = MetadataUpdate {
            may_drop: s.permits(
                &c.identity().principal,
                &path,
                crate::policy::SecretOperation::SecretDestroy,
            )?,
            ..update
        };
        s.update_metadata(c, &path, update, !merge)?;
        Ok(no_content())
    })
    .await
}

async fn delete_metadata(req: Request<'_>, path: String) -> Result<Answer, Refused> {
    run(&req, Kv::DeleteMetadata, &path.clone(), move |s, c| {
        s.delete_all(c, &path)?;
        Ok(no_content())
    })
    .await
}

/// Every name under the prefix (up to [`MAX_LISTED`]), read a page at a time; none is
/// Vault's 404.
async fn list(req: Request<'_>, path: String) -> Result<Answer, Refused> {
    let prefix = path::listed(&path);
    run(&req, Kv::List, &path, move |s, _| {
        let mut keys: Vec<String> = Vec::new();
        let mut token = String::new();
        loop {
            let page = s.list(&prefix, crate::secrets::list::MAX_PAGE, &token)?;
            keys.extend(page.keys);
            match page.next {
                Some(t) if keys.len() < MAX_LISTED => token = t,
                _ => break,
            }
        }
        keys.truncate(MAX_LISTED);
        if keys.is_empty() {
            return Err(SecretsError::NotFound);
        }
        Ok(Served::new(Reply::ok(&json!({ "keys": keys }))))
    })
    .await
}

async fn subkeys(req: Request<'_>, path: String) -> Result<Answer, Refused> {
    let version = query_u64(req.query, "version")?.unwrap_or(0);
    // Checked, and then of no effect: every value is a string, a leaf at depth 1.
    let _depth = query_u64(req.query, "depth")?;
    run(&req, Kv::Subkeys, &path.clone(), move |s, _| {
        let read = s.read(&path, version)?;
        let answer = SubkeysRead {
            subkeys: read
                .values
                .as_ref()
                .map(|v| v.0.keys().map(|k| (k.clone(), ())).collect()),
            metadata: version_json(read.version, &read.info, &read.custom),
        };
        Ok(answer_of_read(reply_of(&answer), read.values.is_some())
            .secret_versions(vec![read.version]))
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn params(body: &str) -> Params {
        Params::parse(body.as_bytes()).unwrap()
    }

    fn refusal(kind: ErrorKind, reason: &'static str) -> Refusal {
        Refusal {
            kind,
            reason,
            message: String::new(),
        }
    }

    /// The mount's status codes: 404 for what does not exist (and a patch with nothing to
    /// apply to), 400 for check-and-set and bad input, 403, 503 sealed or uninitialised.
    #[test]
    fn refusals_map_to_vaults_kv_status_codes() {
        use ErrorKind as K;
        for (kind, reason, status) in [
            (K::NotFound, "SECRET_NOT_FOUND", 404),
            (K::NotFound, "VERSION_NOT_FOUND", 404),
            (K::FailedPrecondition, "NOTHING_TO_PATCH", 404),
            (K::FailedPrecondition, "CAS_MISMATCH", 400),
            (K::FailedPrecondition, "CAS_REQUIRED", 400),
            (K::InvalidArgument, "TOO_LARGE", 400),
            (K::InvalidArgument, "INVALID_SECRET_PATH", 400),
            (K::PermissionDenied, "NO_GRANT", 403),
            (K::Unauthenticated, "CERTIFICATE_EXPIRED", 403),
            (K::Unavailable, "SEALED", 503),
            (K::FailedPrecondition, "NOT_INITIALIZED", 503),
            (K::DataLoss, "STORE_TAMPERED", 500),
        ] {
            assert_eq!(
                status_of(&refusal(kind, reason)).as_u16(),
                status,
                "{reason}"
            );
        }
        let gone = not_found_is_empty(Refused {
            status: StatusCode::NOT_FOUND,
            message: "no secret at this path".to_owned(),
            reason: "SECRET_NOT_FOUND",
            recorded: true,
        });
        assert_eq!(gone.message, "");
    }

    #[test]
    fn paths_and_methods_route_as_vaults() {
        let r = |m: Method, p: &str, list: bool| {
            let segments: Vec<&str> = p.split('/').collect();
            route(&m, &segments, list).map_err(|e| e.status.as_u16())
        };
        assert_eq!(
            r(Method::GET, "config", false),
            Ok((Kv::ReadConfig, String::new()))
        );
        assert_eq!(r(Method::POST, "config", false).unwrap().0, Kv::WriteConfig);
        assert_eq!(
            r(Method::GET, "data/a/b", false),
            Ok((Kv::Read, "a/b".to_owned()))
        );
        assert_eq!(r(Method::PUT, "data/a", false).unwrap().0, Kv::Write);
        assert_eq!(r(Method::PATCH, "data/a", false).unwrap().0, Kv::Patch);
        assert_eq!(
            r(Method::DELETE, "data/a", false).unwrap().0,
            Kv::DeleteLatest
        );
        assert_eq!(r(Method::POST, "destroy/a", false).unwrap().0, Kv::Destroy);
        assert_eq!(
            r(Method::POST, "undelete/a", false).unwrap().0,
            Kv::Undelete
        );
        assert_eq!(
            r(Method::GET, "metadata", true),
            Ok((Kv::List, String::new()))
        );
        assert_eq!(
            r(Method::GET, "metadata/app", true),
            Ok((Kv::List, "app".to_owned()))
        );
        assert_eq!(
            r(Method::PATCH, "metadata/a", false).unwrap().0,
            Kv::PatchMetadata
        );
        assert_eq!(r(Method::GET, "subkeys/a", false).unwrap().0, Kv::Subkeys);
        // Methods a path does not take: 405; paths the mount does not have: 404.
        assert_eq!(r(Method::DELETE, "config", false), Err(405));
        assert_eq!(r(Method::GET, "data/a", true), Err(405));
        assert_eq!(r(Method::GET, "delete/a", false), Err(405));
        assert_eq!(r(Method::GET, "metadata", false), Err(405));
        assert_eq!(r(Method::PATCH, "subkeys/a", false), Err(405));
        assert_eq!(r(Method::GET, "data", false), Err(404));
        assert_eq!(r(Method::GET, "export/a", false), Err(404));
        assert_eq!(r(Method::GET, "config/x", false), Err(404));
        // What a record names: the normalised prefix of a listing, "" for the config's change.
        let on = Kv::List.on("app");
        assert_eq!(on.op, Op::ListSecrets);
        assert_eq!(on.path.unwrap().0, "app/");
        assert_eq!(Kv::WriteConfig.on("").path.unwrap().0, "");
        assert!(Kv::ReadConfig.on("").path.is_none());
        assert_eq!(Kv::DeleteLatest.op(), Op::DeleteSecretVersions);
    }

    /// A version's answer is Vault's, with times to the millisecond and `custom_metadata`
    /// null when empty; values are strings, nothing converted.
    #[test]
    fn answers_have_vaults_shapes() {
        let v = Version {
            created_ms: 1_796_613_746_123,
            deletion_ms: None,
            destroyed: false,
            stored_bytes: Some(64),
        };
        let shown = version_json(3, &v, &BTreeMap::new());
        assert_eq!(
            shown,
            json!({
                "created_time": "2026-12-07T03:22:26.123Z",
                "custom_metadata": null,
                "deletion_time": "",
                "destroyed": false,
                "version": 3,
            })
        );
        let mut m = Metadata::new(1_796_613_746_000);
        m.current = 2;
        m.delete_version_after = 3600;
        m.custom.insert("owner".to_owned(), "ops".to_owned());
        m.versions.insert(
            2,
            Version {
                deletion_ms: Some(1_796_613_747_500),
                ..v
            },
        );
        let shown = metadata_json(&m);
        assert_eq!(shown["current_version"], 2);
        assert_eq!(shown["oldest_version"], 2);
        assert_eq!(shown["delete_version_after"], "1h0m0s");
        assert_eq!(shown["custom_metadata"], json!({"owner": "ops"}));
        assert_eq!(
            shown["versions"]["2"],
            json!({
                "created_time": "2026-12-07T03:22:26.123Z",
                "deletion_time": "2026-12-07T03:22:27.500Z",
                "destroyed": false,
            })
        );
        let config = config_json(&Config::default());
        assert_eq!(
            config,
            json!({"cas_required": false, "delete_version_after": "0s", "max_versions": 10})
        );
        // A read: `data` and `metadata`; a deleted version's `data` is null.
        let values = values_of(
            params(r#"{"data": {"k": "v"}}"#)
                .take("data")
                .unwrap()
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
        let read: Value = serde_json::from_slice(
            &reply_of(&VersionRead {
                data: Some(&values.0),
                metadata: json!({}),
            })
            .data,
        )
        .unwrap();
        assert_eq!(read, json!({"data": {"k": "v"}, "metadata": {}}));
        let gone: Value = serde_json::from_slice(
            &reply_of(&VersionRead {
                data: None,
                metadata: json!({}),
            })
            .data,
        )
        .unwrap();
        assert_eq!(gone, json!({"data": null, "metadata": {}}));
        let sub: Value = serde_json::from_slice(
            &reply_of(&SubkeysRead {
                subkeys: Some([("a".to_owned(), ())].into_iter().collect()),
                metadata: json!({}),
            })
            .data,
        )
        .unwrap();
        assert_eq!(sub, json!({"subkeys": {"a": null}, "metadata": {}}));
    }

    #[test]
    fn values_must_be_strings_and_are_never_echoed() {
        for bad in [
            r#"{"data": {"n": 1}}"#,
            r#"{"data": {"b": true}}"#,
            r#"{"data": {"o": {"x": "hunter2"}}}"#,
            r#"{"data": {"l": ["hunter2"]}}"#,
            r#"{"data": {"z": null}}"#,
        ] {
            let e = data_of(&mut params(bad)).and_then(values_of).err().unwrap();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.message.contains("values must be strings"), "{bad}");
            assert!(!e.message.contains("hunter2"), "{bad}");
        }
        assert_eq!(
            data_of(&mut params("{}")).err().unwrap().message,
            "no data provided"
        );
        assert!(data_of(&mut params(r#"{"data": "x"}"#)).is_err());
    }

    /// A merge patch sets what is a string and removes what is null; anything else is
    /// refused.
    #[test]
    fn a_merge_patch_sets_and_removes() {
        let p =
            patch_of(data_of(&mut params(r#"{"data": {"a": "1", "b": null}}"#)).unwrap()).unwrap();
        assert_eq!(p.set.0.get("a").map(String::as_str), Some("1"));
        assert_eq!(p.remove, ["b"]);
        assert!(patch_of(data_of(&mut params(r#"{"data": {"a": 1}}"#)).unwrap()).is_err());
        let custom = custom_of(
            params(r#"{"c": {"x": "1", "y": null}}"#)
                .take("c")
                .unwrap()
                .as_object()
                .unwrap()
                .clone(),
            true,
        )
        .unwrap();
        assert_eq!(custom.get("x"), Some(&Some("1".to_owned())));
        assert_eq!(custom.get("y"), Some(&None));
        let map = params(r#"{"c": {"y": null}}"#).take("c").unwrap();
        assert!(custom_of(map.as_object().unwrap().clone(), false).is_err());
        let mut h = HeaderMap::new();
        assert_eq!(
            check_merge_patch(&h).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(check_merge_patch(&h).is_err());
        h.insert(
            header::CONTENT_TYPE,
            "application/merge-patch+json; charset=utf-8"
                .parse()
                .unwrap(),
        );
        assert!(check_merge_patch(&h).is_ok());
    }

    #[test]
    fn parameters_are_read_as_vaults() {
        assert_eq!(
            versions_of(&mut params(r#"{"versions": [1, "2"]}"#)).unwrap(),
            [1, 2]
        );
        assert_eq!(
            versions_of(&mut params(r#"{"versions": "3,4"}"#)).unwrap(),
            [3, 4]
        );
        assert_eq!(versions_of(&mut params(r#"{"versions": 5}"#)).unwrap(), [5]);
        assert_eq!(
            versions_of(&mut params("{}")).unwrap_err().message,
            "no version number provided"
        );
        assert!(versions_of(&mut params(r#"{"versions": [-1]}"#)).is_err());
        assert_eq!(
            cas_of(&mut params(r#"{"options": {"cas": 2}}"#)).unwrap(),
            Some(2)
        );
        assert_eq!(cas_of(&mut params(r#"{"options": {}}"#)).unwrap(), None);
        assert!(cas_of(&mut params(r#"{"options": 1}"#)).is_err());
        assert_eq!(
            query_u64(Some("version=3&depth=1"), "version").unwrap(),
            Some(3)
        );
        assert_eq!(
            query_u64(Some("version=3&depth=1"), "depth").unwrap(),
            Some(1)
        );
        assert_eq!(query_u64(None, "version").unwrap(), None);
        assert!(query_u64(Some("version=x"), "version").is_err());
        assert!(max_versions_of(&mut params(r#"{"max_versions": 4294967296}"#)).is_err());
    }
}
