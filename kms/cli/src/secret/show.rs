//! How `kms secret` prints what the server answers: aligned text for people (every cell
//! made safe for a terminal), one JSON object for scripts. Only `get` prints values.

use kms_proto::v1 as pb;
use serde_json::{Value, json};

use crate::audit::{aligned, printable, rfc3339};
use crate::show::duration_text;

/// A Unix time in ms as RFC 3339; 0 (none) as "-".
fn time(ms: i64) -> String {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map_or_else(|| "-".to_owned(), rfc3339)
}

/// A version as JSON.
pub(super) fn version_json(v: &pb::SecretVersion) -> Value {
    json!({
        "version": v.version,
        "create_time": v.create_time,
        "deletion_time": v.deletion_time,
        "deleted": v.deleted,
        "destroyed": v.destroyed,
    })
}

/// What a version is now: live, deleted, destroyed, or live until its deletion time.
fn state(v: &pb::SecretVersion) -> String {
    if v.destroyed {
        "destroyed".to_owned()
    } else if v.deleted {
        format!("deleted {}", time(v.deletion_time))
    } else if v.deletion_time > 0 {
        format!("live until {}", time(v.deletion_time))
    } else {
        "live".to_owned()
    }
}

/// A version written by `put` or `patch`.
pub(super) fn written(path: &str, v: &pb::SecretVersion, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "path": path,
                "version": v.version,
                "create_time": v.create_time,
                "deletion_time": v.deletion_time,
                "deleted": v.deleted,
                "destroyed": v.destroyed,
            })
        );
    } else {
        println!(
            "Secret {}: version {} written ({}).",
            printable(path),
            v.version,
            state(v)
        );
    }
}

/// A version read by `get`, with its values.
pub(super) fn read(path: &str, r: &pb::GetSecretResponse, json: bool) {
    let v = r.version.unwrap_or_default();
    if json {
        println!(
            "{}",
            json!({
                "path": path,
                "version": version_json(&v),
                "custom_metadata": r.custom_metadata,
                "data": r.data,
            })
        );
        return;
    }
    let mut rows = vec![
        vec!["Path".to_owned(), path.to_owned()],
        vec!["Version".to_owned(), v.version.to_string()],
        vec!["Created".to_owned(), time(v.create_time)],
    ];
    if v.deletion_time > 0 {
        rows.push(vec!["Deletion time".to_owned(), time(v.deletion_time)]);
    }
    for (k, val) in &r.custom_metadata {
        rows.push(vec!["Custom".to_owned(), format!("{k}={val}")]);
    }
    print!("{}", aligned(&rows));
    println!();
    let mut data = vec![vec!["Key".to_owned(), "Value".to_owned()]];
    data.extend(r.data.iter().map(|(k, val)| vec![k.clone(), val.clone()]));
    print!("{}", aligned(&data));
}

/// A secret's metadata as JSON.
fn metadata_json(m: &pb::SecretMetadata) -> Value {
    json!({
        "path": m.path,
        "current_version": m.current_version,
        "oldest_version": m.oldest_version,
        "max_versions": m.max_versions,
        "cas_required": m.cas_required,
        "delete_version_after_seconds": m.delete_version_after_seconds,
        "custom_metadata": m.custom_metadata,
        "create_time": m.create_time,
        "update_time": m.update_time,
        "versions": m.versions.iter().map(version_json).collect::<Vec<_>>(),
    })
}

/// A secret's metadata: never a value.
pub(super) fn metadata(m: &pb::SecretMetadata, json: bool) {
    if json {
        println!("{}", metadata_json(m));
        return;
    }
    let engine = |n: u64, text: String| {
        if n == 0 {
            "0 (the engine's)".to_owned()
        } else {
            text
        }
    };
    let mut rows = vec![
        vec!["Path".to_owned(), m.path.clone()],
        vec!["Current version".to_owned(), m.current_version.to_string()],
        vec!["Oldest version".to_owned(), m.oldest_version.to_string()],
        vec![
            "Max versions".to_owned(),
            engine(u64::from(m.max_versions), m.max_versions.to_string()),
        ],
        vec!["CAS required".to_owned(), m.cas_required.to_string()],
        vec![
            "Delete version after".to_owned(),
            engine(
                m.delete_version_after_seconds,
                duration_text(m.delete_version_after_seconds),
            ),
        ],
        vec!["Created".to_owned(), time(m.create_time)],
        vec!["Updated".to_owned(), time(m.update_time)],
    ];
    for (k, v) in &m.custom_metadata {
        rows.push(vec!["Custom".to_owned(), format!("{k}={v}")]);
    }
    for v in &m.versions {
        rows.push(vec![
            format!("Version {}", v.version),
            format!("created {}, {}", time(v.create_time), state(v)),
        ]);
    }
    print!("{}", aligned(&rows));
}

/// The engine's configuration.
pub(super) fn config(c: &pb::SecretsConfig, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "max_versions": c.max_versions,
                "cas_required": c.cas_required,
                "delete_version_after_seconds": c.delete_version_after_seconds,
            })
        );
        return;
    }
    let delete_after = if c.delete_version_after_seconds == 0 {
        "0 (never)".to_owned()
    } else {
        duration_text(c.delete_version_after_seconds)
    };
    print!(
        "{}",
        aligned(&[
            vec!["Max versions".to_owned(), c.max_versions.to_string()],
            vec!["CAS required".to_owned(), c.cas_required.to_string()],
            vec!["Delete version after".to_owned(), delete_after],
        ])
    );
}

/// `secret-read`, ...; `unknown` for a value this CLI does not know.
fn operation_name(v: i32) -> &'static str {
    kms::policy::SecretOperation::ALL
        .into_iter()
        .find(|o| kms::wire::secret_operation_pb(*o) as i32 == v)
        .map_or("unknown", kms::policy::SecretOperation::name)
}

/// A grant on secrets as JSON.
pub(super) fn grant_json(g: &pb::SecretGrant) -> Value {
    json!({
        "id": g.id,
        "path": g.path,
        "principal": g.principal,
        "operations": g.operations.iter().map(|o| operation_name(*o)).collect::<Vec<_>>(),
        "create_time": g.create_time,
        "created_by": g.created_by,
    })
}

/// A grant on secrets, one line: id, pattern, grantee, operations.
pub(super) fn grant_line(g: &pb::SecretGrant) -> Vec<String> {
    let ops: Vec<&str> = g.operations.iter().map(|o| operation_name(*o)).collect();
    vec![
        g.id.clone(),
        g.path.clone(),
        g.principal.clone(),
        ops.join(","),
    ]
}
