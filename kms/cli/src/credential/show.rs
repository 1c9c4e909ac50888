//! How `kms issuer` and `kms credential` print what the server answers: aligned text for
//! people (every cell made safe for a terminal), one JSON object for scripts. Only `jwt`
//! prints a token, on standard output.

use std::io::Write as _;

use kms_proto::v1 as pb;
use serde_json::{Value, json};

use crate::BoxError;
use crate::audit::{aligned, rfc3339};
use crate::show::duration_text;

/// An issuer as JSON: the proto's fields, by their names.
fn issuer_json(i: &pb::Issuer) -> Value {
    json!({
        "name": i.name,
        "key": i.key,
        "principals": i.principals,
        "audiences": i.audiences,
        "default_ttl_seconds": i.default_ttl_seconds,
        "max_ttl_seconds": i.max_ttl_seconds,
        "claims": i.claims,
        "delegators": i.delegators,
        "subjects": i.subjects,
        "issuer_url": i.issuer_url,
        "created_unix_ms": i.created_unix_ms,
        "created_by": i.created_by,
        "kind": kind_name(i.kind),
        "publish_ahead_seconds": i.publish_ahead_seconds,
        "signing_version": i.signing_version,
        "ca_certificates": i.ca_certificates.iter().map(|c| json!({
            "key_version": c.key_version,
            "chain_pem": c.chain_pem,
            "self_signed": c.self_signed,
        })).collect::<Vec<_>>(),
        "self_signed": i.self_signed,
        "ssh_principals": i.ssh_principals,
        "ssh_critical_options": i.ssh_critical_options,
        "ssh_extensions": i.ssh_extensions,
    })
}

/// A kind as `issuer create --kind` takes it.
fn kind_name(kind: i32) -> &'static str {
    match pb::CredentialKind::try_from(kind) {
        Ok(pb::CredentialKind::Jwt | pb::CredentialKind::Unspecified) => "jwt",
        Ok(pb::CredentialKind::X509) => "x509",
        Ok(pb::CredentialKind::SshUser) => "ssh-user",
        Ok(pb::CredentialKind::SshHost) => "ssh-host",
        Err(_) => "unknown",
    }
}

/// An issuer, one field a line.
pub(super) fn issuer(i: &pb::Issuer, json: bool) {
    if json {
        println!("{}", issuer_json(i));
        return;
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    let kind = pb::CredentialKind::try_from(i.kind).unwrap_or_default();
    let mut rows = vec![
        vec!["Name".to_owned(), i.name.clone()],
        vec!["Kind".to_owned(), kind_name(i.kind).to_owned()],
        vec!["Key".to_owned(), i.key.clone()],
        vec![
            "Signing version".to_owned(),
            match i.signing_version {
                0 => "none".to_owned(),
                v => v.to_string(),
            },
        ],
        vec![
            "Publish ahead".to_owned(),
            duration_text(i.publish_ahead_seconds.unwrap_or(0)),
        ],
        vec!["Principals".to_owned(), list(&i.principals)],
    ];
    if matches!(
        kind,
        pb::CredentialKind::Jwt | pb::CredentialKind::Unspecified
    ) {
        rows.push(vec!["Audiences".to_owned(), list(&i.audiences)]);
    }
    rows.extend([
        vec![
            "Default TTL".to_owned(),
            duration_text(i.default_ttl_seconds),
        ],
        vec!["Max TTL".to_owned(), duration_text(i.max_ttl_seconds)],
    ]);
    for (k, v) in &i.claims {
        rows.push(vec!["Claim".to_owned(), format!("{k}={v}")]);
    }
    rows.push(vec!["Delegators".to_owned(), list(&i.delegators)]);
    rows.push(vec!["Subjects".to_owned(), list(&i.subjects)]);
    if !i.issuer_url.is_empty() {
        rows.push(vec!["Issuer URL".to_owned(), i.issuer_url.clone()]);
    }
    if kind == pb::CredentialKind::X509 {
        rows.push(vec![
            "CA".to_owned(),
            if i.self_signed {
                "self-signed".to_owned()
            } else {
                "signed by an outside CA".to_owned()
            },
        ]);
        for c in &i.ca_certificates {
            let state = if c.chain_pem.is_empty() {
                "awaiting the outside CA's certificate"
            } else {
                "certified"
            };
            rows.push(vec![
                "CA certificate".to_owned(),
                format!("key version {}: {state}", c.key_version),
            ]);
        }
    }
    if matches!(
        kind,
        pb::CredentialKind::SshUser | pb::CredentialKind::SshHost
    ) {
        rows.push(vec!["SSH principals".to_owned(), list(&i.ssh_principals)]);
        for (k, v) in &i.ssh_critical_options {
            rows.push(vec!["SSH option".to_owned(), format!("{k}={v}")]);
        }
        if kind == pb::CredentialKind::SshUser {
            rows.push(vec!["SSH extensions".to_owned(), list(&i.ssh_extensions)]);
        }
    }
    rows.push(vec![
        "Created".to_owned(),
        format!("{} by {}", rfc3339(i.created_unix_ms), i.created_by),
    ]);
    print!("{}", aligned(&rows));
}

/// Every issuer: one JSON array, or a table with a header.
pub(super) fn issuers(issuers: &[pb::Issuer], json: bool) {
    if json {
        println!(
            "{}",
            Value::Array(issuers.iter().map(issuer_json).collect())
        );
        return;
    }
    let mut rows = vec![
        ["NAME", "KIND", "KEY", "AUDIENCES", "MAX TTL", "ISSUER URL"]
            .map(str::to_owned)
            .to_vec(),
    ];
    rows.extend(issuers.iter().map(|i| {
        vec![
            i.name.clone(),
            kind_name(i.kind).to_owned(),
            i.key.clone(),
            i.audiences.join(","),
            duration_text(i.max_ttl_seconds),
            i.issuer_url.clone(),
        ]
    }));
    print!("{}", aligned(&rows));
}

/// An issued token: alone on standard output, followed by a newline, or in JSON with what
/// the server says of it.
pub(super) fn issued(token: &str, r: &pb::IssueJwtResponse, json: bool) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = zeroize::Zeroizing::new(
            json!({
                "token": token,
                "jti": r.jti,
                "subject": r.subject,
                "expires_unix": r.expires_unix,
                "key_version": r.key_version,
                "kid": r.kid,
            })
            .to_string(),
        );
        writeln!(out, "{}", v.as_str())?;
    } else {
        writeln!(out, "{token}")?;
    }
    out.flush()?;
    Ok(())
}

/// What an SSH certificate says (written to `out`): on standard output, or on standard
/// error when the certificate went there.
pub(super) fn ssh_certificate(r: &pb::IssueSshResponse, out: &str, json: bool) {
    let text = if json {
        format!(
            "{}\n",
            json!({
                "serial": r.serial,
                "key_id": r.key_id,
                "principals": r.principals,
                "expires_unix": r.expires_unix,
                "key_version": r.key_version,
            })
        )
    } else {
        let mut rows = vec![
            vec!["Serial".to_owned(), r.serial.clone()],
            vec![
                "Key ID".to_owned(),
                crate::audit::printable(&r.key_id).into_owned(),
            ],
            vec!["Principals".to_owned(), r.principals.join(", ")],
            vec!["Valid before".to_owned(), time(r.expires_unix)],
            vec!["Key version".to_owned(), r.key_version.to_string()],
        ];
        if out != "-" {
            rows.insert(0, vec!["Certificate".to_owned(), out.to_owned()]);
        }
        aligned(&rows)
    };
    if out == "-" {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
}

/// An issued certificate (written to files): what the server says of it.
pub(super) fn issued_x509(r: &pb::IssueX509Response, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "spiffe_id": r.spiffe_id,
                "serial": r.serial,
                "expires_unix": r.expires_unix,
                "key_version": r.key_version,
            })
        );
        return;
    }
    let rows = vec![
        vec!["SPIFFE ID".to_owned(), r.spiffe_id.clone()],
        vec!["Serial".to_owned(), r.serial.clone()],
        vec!["Expires".to_owned(), time(r.expires_unix)],
        vec!["Key version".to_owned(), r.key_version.to_string()],
    ];
    print!("{}", aligned(&rows));
}

/// A Unix time in seconds as RFC 3339.
pub(super) fn time(secs: u64) -> String {
    rfc3339(secs.saturating_mul(1000))
}

/// A validation's answer: `valid` and what the token says, or `not valid: REASON`.
pub(super) fn validated(r: &pb::ValidateJwtResponse, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "valid": r.valid,
                "reason": r.reason,
                "subject": r.subject,
                "jti": r.jti,
                "expires_unix": r.expires_unix,
                "actor": r.actor,
            })
        );
        return;
    }
    if !r.valid {
        println!("not valid: {}", crate::audit::printable(&r.reason));
        return;
    }
    println!("valid");
    let mut rows = vec![
        vec!["Subject".to_owned(), r.subject.clone()],
        vec!["JTI".to_owned(), r.jti.clone()],
        vec!["Expires".to_owned(), time(r.expires_unix)],
    ];
    if !r.actor.is_empty() {
        rows.push(vec!["Actor".to_owned(), r.actor.clone()]);
    }
    print!("{}", aligned(&rows));
}
