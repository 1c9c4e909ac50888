//! The usage report's builder, over records made in the tests.

use super::databases::DatabaseRow;
use super::{
    AuditEvent, Filter, KeyInfo, OTHER_KEYS, REFUSALS, RefusedRow, Span, TOP_KEYS, UsageBuilder,
    bucket_width,
};
use crate::audit::{BatchSummary, DatabaseSummary};

/// A credential row's kind, subject, delegator, key version, outcome, count and last.
type CredentialCells<'a> = (&'a str, &'a str, Option<&'a str>, u32, &'a str, u64, u64);

fn ev(t: u64, op: &str, key: &str, v: Option<u32>, outcome: &str, who: &str) -> AuditEvent {
    AuditEvent {
        time_ms: t,
        principal: who.into(),
        operation: op.into(),
        key: Some(key.into()),
        key_version: v,
        outcome: outcome.into(),
        ..AuditEvent::default()
    }
}

/// Issuances and refusals are counted per issuer, kind, subject, delegator, key
/// version and outcome; other calls of the credentials engine are not issuances.
#[test]
fn credentials_are_counted_per_issuer_subject_version_and_outcome() {
    let issued = |t, op: &str, subject: &str, actor: Option<&str>, v, kind: &str, outcome: &str| {
        AuditEvent {
            time_ms: t,
            principal: actor.unwrap_or(subject).into(),
            operation: op.into(),
            outcome: outcome.into(),
            credential: Some(crate::audit::CredentialSummary {
                issuer: "workloads".into(),
                kind: kind.into(),
                subject: subject.into(),
                actor: actor.map(Into::into),
                key_version: v,
                ..Default::default()
            }),
            ..AuditEvent::default()
        }
    };
    let mut b = UsageBuilder::new(Filter::default());
    b.add(&issued(
        1,
        "IssueJwt",
        "spiffe://a/app",
        None,
        1,
        "jwt",
        "OK",
    ));
    b.add(&issued(
        4,
        "IssueJwt",
        "spiffe://a/app",
        None,
        1,
        "jwt",
        "OK",
    ));
    b.add(&issued(
        2,
        "IssueJwt",
        "spiffe://a/app",
        None,
        2,
        "jwt",
        "OK",
    ));
    b.add(&issued(
        3,
        "IssueJwt",
        "spiffe://a/app",
        Some("spiffe://a/ci"),
        2,
        "jwt",
        "OK",
    ));
    b.add(&issued(
        5,
        "IssueSsh",
        "spiffe://a/app",
        None,
        0,
        "",
        "PERMISSION_DENIED",
    ));
    b.add(&issued(
        6,
        "IssueX509",
        "spiffe://a/app",
        None,
        3,
        "x509",
        "OK",
    ));
    b.add(&issued(7, "RevokeJwt", "", None, 0, "", "OK"));
    let mut asked_for_itself = issued(9, "IssueJwt", "", None, 0, "", "NOT_FOUND");
    asked_for_itself.principal = "spiffe://a/other".into();
    b.add(&asked_for_itself);
    b.add(&issued(8, "ValidateJwt", "", None, 0, "", "OK"));
    let r = b.finish(&[]);
    let rows: Vec<CredentialCells<'_>> = r
        .credentials
        .iter()
        .map(|c| {
            (
                c.kind.as_str(),
                c.subject.as_str(),
                c.actor.as_deref(),
                c.key_version,
                c.outcome.as_str(),
                c.span.count,
                c.span.last_ms,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("jwt", "spiffe://a/app", None, 1, "OK", 2, 4),
            ("jwt", "spiffe://a/app", None, 2, "OK", 1, 2),
            (
                "jwt",
                "spiffe://a/app",
                Some("spiffe://a/ci"),
                2,
                "OK",
                1,
                3
            ),
            ("jwt", "spiffe://a/other", None, 0, "NOT_FOUND", 1, 9),
            ("ssh", "spiffe://a/app", None, 0, "PERMISSION_DENIED", 1, 5),
            ("x509", "spiffe://a/app", None, 3, "OK", 1, 6),
        ]
    );
    assert!(r.credentials.iter().all(|c| c.issuer == "workloads"));
}

/// Secret reads are counted per path, version and principal, with the last read; other
/// secret calls and failed reads are not reads.
#[test]
fn secret_reads_are_counted_per_path_version_and_principal() {
    let read = |t: u64, path: &str, v: u64, outcome: &str, who: &str, op: &str| AuditEvent {
        time_ms: t,
        principal: who.into(),
        operation: op.into(),
        outcome: outcome.into(),
        secret: Some(crate::audit::SecretSummary {
            path: path.into(),
            versions: vec![v],
            dropped: Vec::new(),
        }),
        ..AuditEvent::default()
    };
    let mut b = UsageBuilder::new(Filter::default());
    b.add(&read(1, "db/pw", 2, "OK", "app", "GetSecret"));
    b.add(&read(5, "db/pw", 2, "OK", "app", "GetSecret"));
    b.add(&read(3, "db/pw", 1, "OK", "app", "GetSecret"));
    b.add(&read(4, "db/pw", 2, "OK", "other", "GetSecret"));
    b.add(&read(6, "db/pw", 2, "NOT_FOUND", "app", "GetSecret"));
    b.add(&read(7, "db/pw", 3, "OK", "app", "PutSecret"));
    let r = b.finish(&[]);
    let rows: Vec<_> = r
        .secret_reads
        .iter()
        .map(|s| {
            (
                s.path.as_str(),
                s.version,
                s.principal.as_str(),
                s.span.count,
                s.span.last_ms,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("db/pw", 1, "app", 1, 3),
            ("db/pw", 2, "app", 2, 5),
            ("db/pw", 2, "other", 1, 4),
        ]
    );
}

/// A refused secret call names its path in the refused section, aggregated by it, and
/// makes no per-key summary or timeline entry (those are about keys).
#[test]
fn a_refused_secret_call_names_its_path_and_no_key() {
    let denied = |t: u64, path: &str, op: &str| AuditEvent {
        time_ms: t,
        principal: "mallory".into(),
        operation: op.into(),
        outcome: "PERMISSION_DENIED".into(),
        secret: Some(crate::audit::SecretSummary {
            path: path.into(),
            ..Default::default()
        }),
        ..AuditEvent::default()
    };
    let mut b = UsageBuilder::new(Filter::default());
    b.add(&denied(1000, "db/pw", "GetSecret"));
    b.add(&denied(2000, "db/pw", "GetSecret"));
    b.add(&denied(3000, "payments/stripe", "GetSecret"));
    // The engine's configuration has no path: no secret named.
    b.add(&denied(4000, "", "ConfigureSecrets"));
    let r = b.finish(&[]);
    assert_eq!(
        r.refused
            .iter()
            .map(|f| (
                f.operation.as_str(),
                f.key.as_deref(),
                f.secret_path.as_deref(),
                f.span.count,
                f.span.last_ms
            ))
            .collect::<Vec<_>>(),
        [
            ("ConfigureSecrets", None, None, 1, 4000),
            ("GetSecret", None, Some("db/pw"), 2, 2000),
            ("GetSecret", None, Some("payments/stripe"), 1, 3000),
        ]
    );
    assert!(r.keys.is_empty(), "{:?}", r.keys);
    assert!(r.timeline.is_empty(), "{:?}", r.timeline);
    assert!(r.usage.is_empty() && r.secret_reads.is_empty());
    // A report of an older server (no path) still reads.
    let old: RefusedRow = serde_json::from_str(
        r#"{"principal":"p","operation":"Decrypt","key":"a","outcome":"PERMISSION_DENIED","count":1,"first_ms":1,"last_ms":1}"#,
    )
    .unwrap();
    assert_eq!(old.secret_path, None);
}

/// A BatchReEncrypt record counts its source versions read under its key and the
/// ciphertexts it made under its destination (`ReEncryptTo`), as ReEncrypt does.
#[test]
fn a_batch_reencryption_counts_on_both_keys() {
    let mut b = UsageBuilder::new(Filter::default());
    b.add(&AuditEvent {
        destination_key: Some("b".into()),
        destination_key_version: Some(1),
        batch: Some(BatchSummary {
            items: 5,
            outcomes: [("OK".to_owned(), 4), ("INVALID_ARGUMENT".to_owned(), 1)].into(),
            versions: [(1, 1), (2, 3)].into(),
        }),
        ..ev(1000, "BatchReEncrypt", "a", None, "OK", "mover")
    });
    let r = b.finish(&keys());
    let count = |key: &str, v: Option<u32>, op: &str, outcome: &str| {
        r.usage
            .iter()
            .find(|u| u.key == key && u.version == v && u.operation == op && u.outcome == outcome)
            .map(|u| u.span.count)
    };
    assert_eq!(count("a", Some(1), "BatchReEncrypt", "OK"), Some(1));
    assert_eq!(count("a", Some(2), "BatchReEncrypt", "OK"), Some(3));
    assert_eq!(
        count("a", None, "BatchReEncrypt", "INVALID_ARGUMENT"),
        Some(1)
    );
    assert_eq!(count("b", Some(1), "ReEncryptTo", "OK"), Some(4));
    let b_key = r.keys.iter().find(|k| k.key == "b").unwrap();
    assert_eq!(b_key.ok, 4);
    // Version 1 of `a`, below its primary, was still read.
    assert_eq!(
        r.decrypt_below_primary
            .iter()
            .map(|v| (v.key.as_str(), v.version, v.count))
            .collect::<Vec<_>>(),
        [("a", 1, 1)]
    );
}

fn keys() -> [KeyInfo; 2] {
    [
        KeyInfo {
            name: "a".into(),
            primary: 2,
            versions: vec![(1, "ENABLED".into()), (2, "ENABLED".into())],
        },
        KeyInfo {
            name: "b".into(),
            primary: 1,
            versions: vec![(1, "ENABLED".into())],
        },
    ]
}

#[test]
fn rows_are_per_principal_with_their_own_times() {
    let mut b = UsageBuilder::new(Filter {
        since_ms: Some(1000),
        ..Filter::default()
    });
    b.add(&ev(500, "Encrypt", "a", Some(1), "OK", "x")); // before the period
    b.add(&ev(1000, "CreateKey", "a", Some(1), "OK", "admin"));
    b.add(&ev(1000, "Encrypt", "a", Some(2), "OK", "x"));
    b.add(&ev(2000, "Encrypt", "a", Some(2), "OK", "y"));
    b.add(&ev(2500, "Encrypt", "a", Some(2), "OK", "x"));
    b.add(&ev(3000, "Decrypt", "a", Some(1), "OK", "y"));
    b.add(&ev(3500, "Decrypt", "a", None, "INVALID_ARGUMENT", "z"));
    b.add(&ev(3600, "RotateKey", "b", Some(1), "OK", "admin")); // not a use
    b.add(&ev(
        3700,
        "Decrypt",
        "a",
        None,
        "PERMISSION_DENIED",
        "mallory",
    ));
    // Seven calls without a certificate, counted in one record (the gate's).
    b.add(&AuditEvent {
        operation: "ListGrants".into(),
        outcome: "UNAUTHENTICATED".into(),
        principal: "anonymous".into(),
        time_ms: 3800,
        batch: Some(BatchSummary {
            items: 7,
            outcomes: [("UNAUTHENTICATED".to_owned(), 7)].into(),
            versions: Default::default(),
        }),
        ..AuditEvent::default()
    });
    b.add(&AuditEvent {
        batch: Some(BatchSummary {
            items: 3,
            outcomes: [("OK".to_owned(), 2), ("INVALID_ARGUMENT".to_owned(), 1)].into(),
            versions: [(2, 2)].into(),
        }),
        ..ev(4000, "BatchEncrypt", "a", None, "OK", "x")
    });
    let r = b.finish(&keys());
    assert_eq!(r.records, 10);
    let row = |key: &str, v: Option<u32>, who: &str, op: &str, outcome: &str| {
        r.usage
            .iter()
            .find(|u| {
                u.key == key
                    && u.version == v
                    && u.principal == who
                    && u.operation == op
                    && u.outcome == outcome
            })
            .map(|u| u.span)
    };
    // Each row has its own count and times: x's encryptions are not y's.
    let span = |count, first_ms, last_ms| Span {
        count,
        first_ms,
        last_ms,
    };
    assert_eq!(
        row("a", Some(2), "x", "Encrypt", "OK"),
        Some(span(2, 1000, 2500))
    );
    assert_eq!(
        row("a", Some(2), "y", "Encrypt", "OK"),
        Some(span(1, 2000, 2000))
    );
    assert_eq!(
        row("a", Some(1), "y", "Decrypt", "OK"),
        Some(span(1, 3000, 3000))
    );
    assert_eq!(
        row("a", Some(2), "x", "BatchEncrypt", "OK"),
        Some(span(2, 4000, 4000))
    );
    assert_eq!(
        row("a", None, "x", "BatchEncrypt", "INVALID_ARGUMENT"),
        Some(span(1, 4000, 4000))
    );
    // The admin created the key; the admin never decrypted.
    assert_eq!(
        row("a", Some(1), "admin", "CreateKey", "OK"),
        Some(span(1, 1000, 1000))
    );
    assert!(
        r.usage
            .iter()
            .all(|u| u.principal != "admin" || !u.operation.contains("crypt"))
    );
    // Refusals are in their own section, not among the uses.
    assert!(
        r.usage
            .iter()
            .all(|u| !REFUSALS.contains(&u.outcome.as_str()))
    );
    assert_eq!(
        r.refused
            .iter()
            .map(|f| (
                f.principal.as_str(),
                f.operation.as_str(),
                f.key.as_deref(),
                f.span.count
            ))
            .collect::<Vec<_>>(),
        vec![
            ("anonymous", "ListGrants", None, 7),
            ("mallory", "Decrypt", Some("a"), 1)
        ]
    );
    // The summary per key, busiest first.
    let a = &r.keys[0];
    assert_eq!(
        (a.key.as_str(), a.ok, a.failed, a.refused, a.principals),
        ("a", 7, 2, 1, 5)
    );
    assert_eq!((a.first_ms, a.last_ms), (1000, 4000));
    assert_eq!((r.keys[1].key.as_str(), r.keys[1].ok), ("b", 1));
    // Unused and below the primary.
    assert_eq!(
        r.unused
            .iter()
            .map(|u| (u.key.as_str(), u.version))
            .collect::<Vec<_>>(),
        vec![("b", 1)]
    );
    assert_eq!(
        r.decrypt_below_primary
            .iter()
            .map(|v| (v.key.as_str(), v.version, v.count))
            .collect::<Vec<_>>(),
        vec![("a", 1, 1)]
    );
    // The timeline: uses (4 Encrypt/BatchEncrypt calls = 5 items, 1 Decrypt) and the
    // refusal, in 1 s buckets from the period's start, every bucket present.
    assert_eq!(r.bucket_ms, 1000);
    assert_eq!(r.timeline.iter().map(|b| b.ok).sum::<u64>(), 6);
    assert_eq!(r.timeline.iter().map(|b| b.refused).sum::<u64>(), 1);
    let starts: Vec<u64> = r.timeline.iter().map(|b| b.start_ms).collect();
    assert_eq!(starts, vec![1000, 2000, 3000, 4000]);
}

#[test]
fn the_timeline_names_the_busiest_keys_and_sums_the_others() {
    let mut b = UsageBuilder::new(Filter::default());
    // Key k{i} is used i+1 times, all in the same minute.
    for i in 0..12u64 {
        for _ in 0..=i {
            b.add(&ev(
                60_000 + i,
                "Encrypt",
                &format!("k{i}"),
                Some(1),
                "OK",
                "x",
            ));
        }
    }
    let r = b.finish(&[]);
    let names: Vec<&str> = r.timeline.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(names.len(), TOP_KEYS + 1, "{names:?}");
    assert_eq!(names[0], "k11");
    assert_eq!(names[TOP_KEYS - 1], "k4");
    assert_eq!(names[TOP_KEYS], OTHER_KEYS);
    // The four quietest keys: 1 + 2 + 3 + 4 uses.
    assert_eq!(r.timeline[TOP_KEYS].ok, 10);
    assert_eq!(r.timeline.iter().map(|b| b.ok).sum::<u64>(), 78);
    // A filtered report covers its key only.
    let mut b = UsageBuilder::new(Filter {
        key: Some("k3".into()),
        ..Filter::default()
    });
    for i in 0..12u64 {
        b.add(&ev(
            60_000 + i,
            "Encrypt",
            &format!("k{i}"),
            Some(1),
            "OK",
            "x",
        ));
    }
    let r = b.finish(&keys());
    assert_eq!(r.records, 1);
    assert_eq!(r.key.as_deref(), Some("k3"));
    assert!(r.unused.is_empty(), "keys a and b are outside the filter");
}

#[test]
fn bucket_widths_follow_the_period() {
    assert_eq!(bucket_width(30_000), 1_000);
    assert_eq!(bucket_width(3_600_000), 60_000);
    assert_eq!(bucket_width(86_400_000), 3_600_000);
    assert_eq!(bucket_width(30 * 86_400_000), 86_400_000);
}

/// A record of the databases engine: `principal`'s `op` on (connection, role, lease).
fn db(t: u64, op: &str, who: &str, outcome: &str, d: DatabaseSummary) -> AuditEvent {
    AuditEvent {
        time_ms: t,
        principal: who.into(),
        service: "kms.v1.Databases".into(),
        operation: op.into(),
        outcome: outcome.into(),
        database: Some(d),
        ..AuditEvent::default()
    }
}

/// A record the server wrote by itself about a lease of `readonly` on `main`.
fn db_internal(t: u64, op: &str, d: DatabaseSummary) -> AuditEvent {
    AuditEvent {
        time_ms: t,
        database: Some(d),
        ..AuditEvent::internal("kms", "kms.internal", op)
    }
}

/// What a lease's records say: connection `main`, role `readonly`.
fn lease(n: u32) -> DatabaseSummary {
    DatabaseSummary {
        connection: "main".into(),
        role: "readonly".into(),
        lease_id: format!("database/creds/readonly/lease{n}"),
        username: format!("v-app-readonly-{n}"),
        expires: 1_000 + u64::from(n),
        ..DatabaseSummary::default()
    }
}

/// A row's (issued, renewed, revoked, expired, forced, irrevocable, scheduled).
fn db_counts(r: &DatabaseRow) -> [u64; 7] {
    [
        r.issued,
        r.renewed,
        r.revoked,
        r.expired,
        r.forced,
        r.irrevocable,
        r.scheduled,
    ]
}

/// Database credentials are counted per connection, role and principal: issuances,
/// renewals, revocations, the server's own revocations under `kms`, forced and irrevocable
/// leases with the database's last error, refused issuances by outcome, revocations by
/// prefix; orphan logins per connection and role. Lookups and administration count for
/// nothing here.
#[test]
fn database_credentials_are_counted_per_connection_role_and_principal() {
    let app = "spiffe://corp/app";
    let admin = "spiffe://corp/admin";
    let mallory = "spiffe://corp/mallory";
    let asked = |role: &str, lease: &str| DatabaseSummary {
        role: role.into(),
        lease_id: lease.into(),
        ..DatabaseSummary::default()
    };
    let mut b = UsageBuilder::new(Filter::default());
    b.add(&db(1_000, "GetDatabaseCredentials", app, "OK", lease(1)));
    b.add(&db(2_000, "GetDatabaseCredentials", app, "OK", lease(2)));
    b.add(&db(2_500, "RenewLease", app, "OK", lease(1)));
    b.add(&db(3_000, "RevokeLease", app, "OK", lease(1)));
    b.add(&db(
        3_500,
        "RevokeLease",
        admin,
        "OK",
        DatabaseSummary {
            forced: true,
            error: "ERROR: role \"v-app-readonly-2\" cannot be dropped (2BP01)".into(),
            ..lease(2)
        },
    ));
    b.add(&db_internal(4_000, "RevokeExpiredLease", lease(3)));
    b.add(&db_internal(4_100, "RevokeExpiredLease", lease(4)));
    b.add(&db_internal(
        4_200,
        "MarkLeaseIrrevocable",
        DatabaseSummary {
            forced: true,
            error: "ERROR: permission denied to drop role (42501)".into(),
            ..lease(5)
        },
    ));
    // Removing the role with force revoked one more.
    b.add(&db_internal(4_300, "RevokeLease", lease(6)));
    // A record that names the lease's holder goes on the holder's row.
    b.add(&db_internal(
        4_350,
        "RevokeExpiredLease",
        DatabaseSummary {
            holder: app.into(),
            ..lease(7)
        },
    ));
    for t in [4_400, 4_500] {
        b.add(&db_internal(
            t,
            "DropOrphanLogin",
            DatabaseSummary {
                connection: "main".into(),
                role: "readonly".into(),
                username: "v-app-readonly-x".into(),
                ..DatabaseSummary::default()
            },
        ));
    }
    // Refused and failed issuances name the role as the caller gave it, no connection.
    for (t, who, outcome) in [
        (5_000, mallory, "PERMISSION_DENIED"),
        (5_100, app, "UNAVAILABLE"),
        (5_200, mallory, "PERMISSION_DENIED"),
        (5_250, mallory, "INVALID_ARGUMENT"),
    ] {
        b.add(&db(
            t,
            "GetDatabaseCredentials",
            who,
            outcome,
            asked("readonly", ""),
        ));
    }
    // Revocations by prefix: of one role, and of every role.
    b.add(&db(
        5_300,
        "RevokeLeasePrefix",
        admin,
        "OK",
        DatabaseSummary {
            leases: 7,
            ..asked("", "database/creds/readonly/")
        },
    ));
    b.add(&db(
        5_400,
        "RevokeLeasePrefix",
        admin,
        "OK",
        DatabaseSummary {
            leases: 3,
            ..asked("", "database/creds/")
        },
    ));
    // Not counted here: lookups, lists, administration, a refused renewal.
    b.add(&db(5_500, "LookupLease", app, "OK", lease(2)));
    b.add(&db(
        5_600,
        "ListLeases",
        admin,
        "OK",
        DatabaseSummary::default(),
    ));
    b.add(&db(
        5_700,
        "PutDatabaseRole",
        admin,
        "OK",
        asked("readonly", ""),
    ));
    b.add(&db(
        5_800,
        "RenewLease",
        mallory,
        "NOT_FOUND",
        asked("", "database/creds/readonly/lease1"),
    ));
    let r = b.finish(&[]);
    assert_eq!(r.records, 22);
    let rows: Vec<(&str, &str, &str, [u64; 7])> = r
        .database_credentials
        .iter()
        .map(|d| {
            (
                d.connection.as_str(),
                d.role.as_str(),
                d.principal.as_str(),
                db_counts(d),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("", "", admin, [0, 0, 0, 0, 0, 0, 3]),
            ("", "readonly", admin, [0, 0, 0, 0, 0, 0, 7]),
            ("", "readonly", app, [0; 7]),
            ("", "readonly", mallory, [0; 7]),
            ("main", "readonly", "kms", [0, 0, 1, 2, 0, 1, 0]),
            ("main", "readonly", admin, [0, 0, 0, 0, 1, 0, 0]),
            ("main", "readonly", app, [2, 1, 1, 1, 0, 0, 0]),
        ]
    );
    let row = |connection: &str, principal: &str| {
        r.database_credentials
            .iter()
            .find(|d| {
                d.connection == connection && d.role == "readonly" && d.principal == principal
            })
            .unwrap()
    };
    let refused = |d: &DatabaseRow| {
        d.refused
            .iter()
            .map(|o| (o.outcome.clone(), o.count))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        refused(row("", mallory)),
        [
            ("INVALID_ARGUMENT".to_owned(), 1),
            ("PERMISSION_DENIED".to_owned(), 2)
        ]
    );
    assert_eq!(row("", mallory).refused_total(), 3);
    assert_eq!(refused(row("", app)), [("UNAVAILABLE".to_owned(), 1)]);
    // Each row its own times and records.
    assert_eq!(
        row("main", app).span,
        Span {
            count: 5,
            first_ms: 1_000,
            last_ms: 4_350
        }
    );
    assert_eq!(
        row("main", "kms").span,
        Span {
            count: 4,
            first_ms: 4_000,
            last_ms: 4_300
        }
    );
    // The database's words, for the lease that may have left a login behind.
    assert_eq!(
        row("main", "kms").last_error,
        "ERROR: permission denied to drop role (42501)"
    );
    assert_eq!(
        row("main", admin).last_error,
        "ERROR: role \"v-app-readonly-2\" cannot be dropped (2BP01)"
    );
    assert_eq!(row("main", app).last_error, "");
    let orphans: Vec<(&str, &str, Span)> = r
        .orphan_logins
        .iter()
        .map(|o| (o.connection.as_str(), o.role.as_str(), o.span))
        .collect();
    assert_eq!(
        orphans,
        [(
            "main",
            "readonly",
            Span {
                count: 2,
                first_ms: 4_400,
                last_ms: 4_500
            }
        )]
    );
    // The refusals are also among the refused calls, by principal.
    let denied: Vec<(&str, &str, u64)> = r
        .refused
        .iter()
        .map(|f| (f.principal.as_str(), f.operation.as_str(), f.span.count))
        .collect();
    assert_eq!(denied, [(mallory, "GetDatabaseCredentials", 2)]);
    // No key was named: no key summary, no timeline.
    assert!(r.keys.is_empty() && r.timeline.is_empty(), "{r:?}");
}

/// A long error is kept bounded; a report filtered by key has no database rows.
#[test]
fn database_errors_are_bounded_and_a_key_filter_leaves_them_out() {
    let mut b = UsageBuilder::new(Filter::default());
    b.add(&db_internal(
        1,
        "MarkLeaseIrrevocable",
        DatabaseSummary {
            forced: true,
            error: "é".repeat(5_000),
            ..lease(1)
        },
    ));
    let r = b.finish(&[]);
    let kept = &r.database_credentials[0].last_error;
    assert_eq!(kept.chars().count(), 203, "{kept}");
    assert!(kept.starts_with("éé") && kept.ends_with("é..."), "{kept}");
    let mut b = UsageBuilder::new(Filter {
        key: Some("payments".into()),
        ..Filter::default()
    });
    b.add(&db(
        1,
        "GetDatabaseCredentials",
        "spiffe://corp/app",
        "OK",
        lease(1),
    ));
    let r = b.finish(&[]);
    assert_eq!(r.records, 0);
    assert!(r.database_credentials.is_empty());
}

/// A hundred thousand issuances to one principal make one row, not one entry per lease.
#[test]
fn database_rows_hold_no_state_per_lease() {
    let mut b = UsageBuilder::new(Filter::default());
    for n in 0..100_000u32 {
        b.add(&db(
            u64::from(n),
            "GetDatabaseCredentials",
            "spiffe://corp/app",
            "OK",
            lease(n),
        ));
        if n % 2 == 0 {
            b.add(&db_internal(
                u64::from(n) + 1,
                "RevokeExpiredLease",
                lease(n),
            ));
        }
    }
    assert_eq!(b.databases.len(), 2);
    let r = b.finish(&[]);
    assert_eq!(r.records, 150_000);
    let counts: Vec<(&str, u64, u64, u64)> = r
        .database_credentials
        .iter()
        .map(|d| (d.principal.as_str(), d.issued, d.expired, d.span.count))
        .collect();
    assert_eq!(
        counts,
        [
            ("kms", 0, 50_000, 50_000),
            ("spiffe://corp/app", 100_000, 0, 100_000)
        ]
    );
}
