//! How `kms db` and `kms lease` print what the server answers: aligned text for people
//! (every cell made safe for a terminal), JSON for scripts. Only `creds` prints a
//! password, on standard output.

use std::io::Write as _;

use kms_proto::v1 as pb;
use serde_json::{Value, json};

use crate::BoxError;
use crate::audit::{aligned, rfc3339};
use crate::show::duration_text;

/// A Unix time in seconds as RFC 3339.
fn time(secs: u64) -> String {
    rfc3339(secs.saturating_mul(1000))
}

/// A list as one cell.
fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(", ")
    }
}

/// A connection as JSON: the proto's fields, by their names (it has no password).
fn connection_json(c: &pb::DatabaseConnection) -> Value {
    json!({
        "name": c.name,
        "plugin": c.plugin,
        "connection_url": c.connection_url,
        "username": c.username,
        "allowed_roles": c.allowed_roles,
        "ca_pem": c.ca_pem,
        "max_open_connections": c.max_open_connections,
        "root_rotated_unix": c.root_rotated_unix,
        "created_unix_ms": c.created_unix_ms,
        "created_by": c.created_by,
    })
}

/// A connection, one field a line.
pub(super) fn connection(c: &pb::DatabaseConnection, json: bool) {
    if json {
        println!("{}", connection_json(c));
        return;
    }
    let rows = vec![
        vec!["Name".to_owned(), c.name.clone()],
        vec!["Plugin".to_owned(), c.plugin.clone()],
        vec!["URL".to_owned(), c.connection_url.clone()],
        vec!["Root login".to_owned(), c.username.clone()],
        vec!["Allowed roles".to_owned(), list(&c.allowed_roles)],
        vec![
            "TLS".to_owned(),
            if c.ca_pem.is_empty() {
                "no CA given (sslmode=disable)".to_owned()
            } else {
                "required, to the CA given".to_owned()
            },
        ],
        vec![
            "Max open connections".to_owned(),
            c.max_open_connections.to_string(),
        ],
        vec![
            "Root rotated".to_owned(),
            match c.root_rotated_unix {
                0 => "never".to_owned(),
                t => time(t),
            },
        ],
        vec![
            "Created".to_owned(),
            format!("{} by {}", rfc3339(c.created_unix_ms), c.created_by),
        ],
    ];
    print!("{}", aligned(&rows));
}

/// Every connection: one JSON array, or a table with a header.
pub(super) fn connections(connections: &[pb::DatabaseConnection], json: bool) {
    if json {
        println!(
            "{}",
            Value::Array(connections.iter().map(connection_json).collect())
        );
        return;
    }
    let mut rows = vec![
        ["NAME", "ROOT LOGIN", "ALLOWED ROLES", "URL"]
            .map(str::to_owned)
            .to_vec(),
    ];
    rows.extend(connections.iter().map(|c| {
        vec![
            c.name.clone(),
            c.username.clone(),
            c.allowed_roles.join(","),
            c.connection_url.clone(),
        ]
    }));
    print!("{}", aligned(&rows));
}

/// A role as JSON: the proto's fields, by their names.
fn role_json(r: &pb::DatabaseRole) -> Value {
    json!({
        "name": r.name,
        "connection": r.connection,
        "creation_statements": r.creation_statements,
        "revocation_statements": r.revocation_statements,
        "renew_statements": r.renew_statements,
        "default_ttl_seconds": r.default_ttl_seconds,
        "max_ttl_seconds": r.max_ttl_seconds,
        "username_template": r.username_template,
        "password_length": r.password_length,
        "principals": r.principals,
        "created_unix_ms": r.created_unix_ms,
        "created_by": r.created_by,
    })
}

/// A role, one field a line (a statement a line).
pub(super) fn role(r: &pb::DatabaseRole, json: bool) {
    if json {
        println!("{}", role_json(r));
        return;
    }
    let mut rows = vec![
        vec!["Name".to_owned(), r.name.clone()],
        vec!["Connection".to_owned(), r.connection.clone()],
        vec!["Principals".to_owned(), list(&r.principals)],
        vec![
            "Default TTL".to_owned(),
            duration_text(r.default_ttl_seconds),
        ],
        vec!["Max TTL".to_owned(), duration_text(r.max_ttl_seconds)],
        vec!["Username template".to_owned(), r.username_template.clone()],
        vec!["Password length".to_owned(), r.password_length.to_string()],
    ];
    let statements = |rows: &mut Vec<Vec<String>>, name: &str, v: &[String], none: &str| {
        if v.is_empty() {
            rows.push(vec![name.to_owned(), none.to_owned()]);
        }
        for s in v {
            rows.push(vec![name.to_owned(), s.clone()]);
        }
    };
    statements(&mut rows, "Creation", &r.creation_statements, "-");
    statements(
        &mut rows,
        "Revocation",
        &r.revocation_statements,
        "kms's default (end sessions, REASSIGN OWNED, DROP OWNED, DROP ROLE)",
    );
    statements(
        &mut rows,
        "Renewal",
        &r.renew_statements,
        "kms's default (VALID UNTIL the new expiry)",
    );
    rows.push(vec![
        "Created".to_owned(),
        format!("{} by {}", rfc3339(r.created_unix_ms), r.created_by),
    ]);
    print!("{}", aligned(&rows));
}

/// Every role: one JSON array, or a table with a header.
pub(super) fn roles(roles: &[pb::DatabaseRole], json: bool) {
    if json {
        println!("{}", Value::Array(roles.iter().map(role_json).collect()));
        return;
    }
    let mut rows = vec![
        ["NAME", "CONNECTION", "DEFAULT TTL", "MAX TTL", "PRINCIPALS"]
            .map(str::to_owned)
            .to_vec(),
    ];
    rows.extend(roles.iter().map(|r| {
        vec![
            r.name.clone(),
            r.connection.clone(),
            duration_text(r.default_ttl_seconds),
            duration_text(r.max_ttl_seconds),
            r.principals.join(","),
        ]
    }));
    print!("{}", aligned(&rows));
}

/// Issued credentials: JSON shaped as Vault's answer (`lease_id`, `lease_duration`,
/// `renewable`, `data.username`, `data.password`; the two also at the top level), or the
/// fields a line with a reminder that the password is shown once.
pub(super) fn creds(
    r: &pb::GetDatabaseCredentialsResponse,
    password: &str,
    json: bool,
) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = zeroize::Zeroizing::new(
            json!({
                "lease_id": r.lease_id,
                "lease_duration": r.lease_duration_seconds,
                "renewable": r.renewable,
                "expires_unix": r.expires_unix,
                "username": r.username,
                "password": password,
                "data": {
                    "username": r.username,
                    "password": password,
                },
            })
            .to_string(),
        );
        writeln!(out, "{}", v.as_str())?;
    } else {
        let rows = vec![
            vec!["Lease ID".to_owned(), r.lease_id.clone()],
            vec![
                "Lease duration".to_owned(),
                duration_text(r.lease_duration_seconds),
            ],
            vec!["Expires".to_owned(), time(r.expires_unix)],
            vec!["Renewable".to_owned(), r.renewable.to_string()],
            vec!["Username".to_owned(), r.username.clone()],
        ];
        write!(out, "{}", aligned(&rows))?;
        // The password is not put through `aligned`'s copies (it is of [A-Za-z0-9-]): its
        // label is padded as `aligned` pads the others.
        let width = rows
            .iter()
            .filter_map(|r| r.first())
            .map(|c| c.chars().count())
            .chain(["Password".len()])
            .max()
            .unwrap_or(0);
        writeln!(out, "{:<width$}  {password}", "Password")?;
        writeln!(
            out,
            "\nThe password is shown once: kms keeps no copy. The login is dropped when the \
             lease ends (`kms lease renew` extends it, `kms lease revoke` ends it now)."
        )?;
    }
    out.flush()?;
    Ok(())
}

/// A lease's state as text.
fn state_name(state: i32) -> &'static str {
    match pb::LeaseState::try_from(state) {
        Ok(pb::LeaseState::Active) => "active",
        Ok(pb::LeaseState::Revoking) => "revoking",
        Ok(pb::LeaseState::Irrevocable) => "irrevocable",
        Ok(pb::LeaseState::Unspecified) | Err(_) => "unknown",
    }
}

/// A lease as JSON: the proto's fields, by their names, the state as text.
fn lease_json(l: &pb::Lease) -> Value {
    json!({
        "lease_id": l.lease_id,
        "role": l.role,
        "connection": l.connection,
        "username": l.username,
        "principal": l.principal,
        "issued_unix": l.issued_unix,
        "expires_unix": l.expires_unix,
        "max_expires_unix": l.max_expires_unix,
        "last_renewal_unix": l.last_renewal_unix,
        "renewable": l.renewable,
        "state": state_name(l.state),
        "revocation_attempts": l.revocation_attempts,
        "last_error": l.last_error,
        "next_attempt_unix": l.next_attempt_unix,
    })
}

/// A lease, one field a line.
pub(super) fn lease(l: &pb::Lease, json: bool) {
    if json {
        println!("{}", lease_json(l));
        return;
    }
    let mut rows = vec![
        vec!["Lease ID".to_owned(), l.lease_id.clone()],
        vec!["State".to_owned(), state_name(l.state).to_owned()],
        vec!["Role".to_owned(), l.role.clone()],
        vec!["Connection".to_owned(), l.connection.clone()],
        vec!["Username".to_owned(), l.username.clone()],
        vec!["Issued to".to_owned(), l.principal.clone()],
        vec!["Issued".to_owned(), time(l.issued_unix)],
        vec!["Expires".to_owned(), time(l.expires_unix)],
        vec!["Renewable until".to_owned(), time(l.max_expires_unix)],
        vec![
            "Last renewal".to_owned(),
            match l.last_renewal_unix {
                0 => "never".to_owned(),
                t => time(t),
            },
        ],
        vec!["Renewable".to_owned(), l.renewable.to_string()],
    ];
    if l.revocation_attempts > 0 {
        rows.push(vec![
            "Revocation attempts".to_owned(),
            l.revocation_attempts.to_string(),
        ]);
        rows.push(vec!["Last error".to_owned(), l.last_error.clone()]);
        if l.next_attempt_unix > 0 {
            rows.push(vec!["Next attempt".to_owned(), time(l.next_attempt_unix)]);
        }
    }
    print!("{}", aligned(&rows));
}

/// Leases: one JSON array, or a table with a header.
pub(super) fn leases(leases: &[pb::Lease], json: bool) {
    if json {
        println!("{}", Value::Array(leases.iter().map(lease_json).collect()));
        return;
    }
    let mut rows = vec![
        ["LEASE ID", "STATE", "USERNAME", "ISSUED TO", "EXPIRES"]
            .map(str::to_owned)
            .to_vec(),
    ];
    rows.extend(leases.iter().map(|l| {
        vec![
            l.lease_id.clone(),
            state_name(l.state).to_owned(),
            l.username.clone(),
            l.principal.clone(),
            time(l.expires_unix),
        ]
    }));
    print!("{}", aligned(&rows));
}
