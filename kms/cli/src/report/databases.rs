//! The report's database sections as the table, the CSV and the HTML show them: logins per
//! connection, role and principal, and the orphan logins the reconcile pass dropped.
//!
//! Every string here is the callers' (principals, the roles and lease prefixes they named,
//! the database's error texts): the table prints them through `aligned`, the CSV through
//! `write_csv` (formulas neutralised) and the HTML through `esc`, as every other section.

use kms::audit::report::UsageReport;
use kms::audit::report::databases::DatabaseRow;

use crate::audit::rfc3339;

use super::dash;

/// The database credentials' columns in the table and the HTML.
pub(super) const DATABASES_HEADER: [&str; 14] = [
    "CONNECTION",
    "ROLE",
    "PRINCIPAL",
    "ISSUED",
    "RENEWED",
    "REVOKED",
    "EXPIRED",
    "FORCED",
    "IRREVOCABLE",
    "SCHEDULED",
    "REFUSED",
    "FIRST",
    "LAST",
    "LAST ERROR",
];

/// The columns of [`DATABASES_HEADER`] that hold numbers (right-aligned in the HTML).
pub(super) const DATABASES_NUMERIC: [usize; 7] = [3, 4, 5, 6, 7, 8, 9];

/// The orphan logins' columns.
pub(super) const ORPHANS_HEADER: [&str; 5] = ["CONNECTION", "ROLE", "DROPPED", "FIRST", "LAST"];

/// Refusals by outcome, `PERMISSION_DENIED 2, UNAVAILABLE 1` (`-` when none).
fn refused_text(d: &DatabaseRow) -> String {
    if d.refused.is_empty() {
        return "-".to_owned();
    }
    d.refused
        .iter()
        .map(|o| format!("{} {}", o.outcome, o.count))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The database credentials' rows, as [`DATABASES_HEADER`] names their cells.
pub(super) fn rows(r: &UsageReport) -> Vec<Vec<String>> {
    r.database_credentials
        .iter()
        .map(|d| {
            vec![
                dash(&d.connection),
                dash(&d.role),
                d.principal.clone(),
                d.issued.to_string(),
                d.renewed.to_string(),
                d.revoked.to_string(),
                d.expired.to_string(),
                d.forced.to_string(),
                d.irrevocable.to_string(),
                d.scheduled.to_string(),
                refused_text(d),
                rfc3339(d.span.first_ms),
                rfc3339(d.span.last_ms),
                dash(&d.last_error),
            ]
        })
        .collect()
}

/// The orphan logins' rows, as [`ORPHANS_HEADER`] names their cells.
pub(super) fn orphan_rows(r: &UsageReport) -> Vec<Vec<String>> {
    r.orphan_logins
        .iter()
        .map(|o| {
            vec![
                o.connection.clone(),
                dash(&o.role),
                o.span.count.to_string(),
                rfc3339(o.span.first_ms),
                rfc3339(o.span.last_ms),
            ]
        })
        .collect()
}

/// Both sections' CSV rows, each made by `row` from its (column, value) cells.
pub(super) fn csv_rows(
    r: &UsageReport,
    row: impl Fn(&[(&str, String)]) -> Vec<String>,
) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for d in &r.database_credentials {
        rows.push(row(&[
            ("section", "database-credentials".into()),
            ("connection", d.connection.clone()),
            ("role", d.role.clone()),
            ("principal", d.principal.clone()),
            ("issued", d.issued.to_string()),
            ("renewed", d.renewed.to_string()),
            ("revoked", d.revoked.to_string()),
            ("expired", d.expired.to_string()),
            ("forced", d.forced.to_string()),
            ("irrevocable", d.irrevocable.to_string()),
            ("scheduled", d.scheduled.to_string()),
            ("refused", d.refused_total().to_string()),
            (
                "refused_by_outcome",
                d.refused
                    .iter()
                    .map(|o| format!("{}={}", o.outcome, o.count))
                    .collect::<Vec<_>>()
                    .join(";"),
            ),
            ("error", d.last_error.clone()),
            ("count", d.span.count.to_string()),
            ("first", rfc3339(d.span.first_ms)),
            ("last", rfc3339(d.span.last_ms)),
        ]));
    }
    for o in &r.orphan_logins {
        rows.push(row(&[
            ("section", "orphan-logins".into()),
            ("connection", o.connection.clone()),
            ("role", o.role.clone()),
            ("count", o.span.count.to_string()),
            ("first", rfc3339(o.span.first_ms)),
            ("last", rfc3339(o.span.last_ms)),
        ]));
    }
    rows
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use kms::audit::report::Span;
    use kms::audit::report::databases::{DatabaseRow, OrphanLoginRow, OutcomeCount};
    use kms_proto::v1 as pb;

    use super::super::{CSV_HEADER, html, table};
    use super::UsageReport;
    use crate::audit::{rfc3339, write_csv};

    /// The CSV's columns for these sections that no other section has: the last of
    /// `CSV_HEADER`, so the other sections' keep their places.
    const CSV_COLUMNS: [&str; 11] = [
        "connection",
        "role",
        "issued",
        "renewed",
        "revoked",
        "expired",
        "forced",
        "irrevocable",
        "scheduled",
        "refused_by_outcome",
        "error",
    ];

    /// A hostile principal, as a caller's certificate may name one.
    const FORMULA: &str = "=cmd|' /C calc'!A0";

    fn report() -> UsageReport {
        let row = |principal: &str, last_error: &str| DatabaseRow {
            connection: "main".into(),
            role: "readonly".into(),
            principal: principal.into(),
            issued: 0,
            renewed: 0,
            revoked: 0,
            expired: 0,
            forced: 0,
            irrevocable: 0,
            scheduled: 0,
            refused: Vec::new(),
            last_error: last_error.into(),
            span: Span {
                count: 1,
                first_ms: 1_000,
                last_ms: 2_000,
            },
        };
        UsageReport {
            database_credentials: vec![
                DatabaseRow {
                    issued: 3,
                    renewed: 1,
                    revoked: 1,
                    refused: vec![
                        OutcomeCount {
                            outcome: "PERMISSION_DENIED".into(),
                            count: 2,
                        },
                        OutcomeCount {
                            outcome: "UNAVAILABLE".into(),
                            count: 1,
                        },
                    ],
                    span: Span {
                        count: 8,
                        first_ms: 1_000,
                        last_ms: 3_000,
                    },
                    ..row(FORMULA, "")
                },
                DatabaseRow {
                    expired: 4,
                    irrevocable: 1,
                    ..row("kms", "<script>alert(1)</script>")
                },
                DatabaseRow {
                    connection: String::new(),
                    forced: 2,
                    scheduled: 7,
                    ..row("<script>x</script>", "=HYPERLINK(\"x\")")
                },
            ],
            orphan_logins: vec![OrphanLoginRow {
                connection: "main".into(),
                role: "readonly".into(),
                span: Span {
                    count: 2,
                    first_ms: 4_000,
                    last_ms: 5_000,
                },
            }],
            ..kms::wire::report_from(pb::KeyUsageReportResponse::default())
        }
    }

    #[test]
    fn the_table_shows_each_count_and_the_refusals_by_outcome() {
        let t = table(&report());
        assert!(
            t.contains("\nDatabase credentials, by connection, role and principal"),
            "{t}"
        );
        assert!(
            t.contains("\nLogins no lease named, dropped by reconcile"),
            "{t}"
        );
        let line = |who: &str| {
            let cell = format!("  {who}  ");
            t.lines().find(|l| l.contains(&cell)).unwrap().to_owned()
        };
        let cells = |who: &str| {
            let l = line(who);
            let rest = l.split_once(who).unwrap().1.to_owned();
            rest.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert!(line(FORMULA).starts_with("main"), "{t}");
        assert_eq!(
            cells(FORMULA),
            [
                "3",
                "1",
                "1",
                "0",
                "0",
                "0",
                "0",
                "PERMISSION_DENIED 2, UNAVAILABLE 1",
                rfc3339(1_000).as_str(),
                rfc3339(3_000).as_str(),
                "-"
            ]
        );
        assert_eq!(cells("kms")[..7], ["0", "0", "0", "4", "0", "1", "0"]);
        assert_eq!(cells("kms")[7], "-");
        assert_eq!(cells("kms")[10], "<script>alert(1)</script>");
        // No connection: a dash.
        assert!(line("<script>x</script>").starts_with('-'), "{t}");
        assert_eq!(
            cells("<script>x</script>")[..7],
            ["0", "0", "0", "0", "2", "0", "7"]
        );
        let orphans = t.split("dropped by reconcile").nth(1).unwrap();
        assert!(orphans.contains("DROPPED"), "{orphans}");
        let orphan = orphans.lines().find(|l| l.starts_with("main")).unwrap();
        let orphan: Vec<&str> = orphan.split_whitespace().collect();
        assert_eq!(
            orphan,
            [
                "main",
                "readonly",
                "2",
                rfc3339(4_000).as_str(),
                rfc3339(5_000).as_str()
            ]
        );
    }

    #[test]
    fn csv_rows_put_each_value_in_its_column_and_neutralise_formulas() {
        assert_eq!(
            CSV_HEADER[CSV_HEADER.len() - CSV_COLUMNS.len()..],
            CSV_COLUMNS
        );
        let r = report();
        let rows = super::super::csv_rows(&r);
        assert_eq!(rows.len(), 4, "{rows:?}");
        let col = |name: &str| CSV_HEADER.iter().position(|c| *c == name).unwrap();
        let first = &rows[0];
        for (name, value) in [
            ("section", "database-credentials"),
            ("connection", "main"),
            ("role", "readonly"),
            ("principal", FORMULA),
            ("issued", "3"),
            ("renewed", "1"),
            ("revoked", "1"),
            ("expired", "0"),
            ("forced", "0"),
            ("irrevocable", "0"),
            ("scheduled", "0"),
            ("refused", "3"),
            ("refused_by_outcome", "PERMISSION_DENIED=2;UNAVAILABLE=1"),
            ("error", ""),
            ("count", "8"),
        ] {
            assert_eq!(first[col(name)], value, "{name}");
        }
        assert_eq!(first[col("first")], rfc3339(1_000));
        assert_eq!(first[col("last")], rfc3339(3_000));
        assert_eq!(rows[1][col("expired")], "4");
        assert_eq!(rows[1][col("irrevocable")], "1");
        assert_eq!(rows[2][col("forced")], "2");
        assert_eq!(rows[2][col("scheduled")], "7");
        assert_eq!(rows[2][col("connection")], "");
        let orphan = &rows[3];
        assert_eq!(orphan[col("section")], "orphan-logins");
        assert_eq!(
            (
                orphan[col("connection")].as_str(),
                orphan[col("role")].as_str(),
                orphan[col("count")].as_str()
            ),
            ("main", "readonly", "2")
        );
        let mut written = Vec::new();
        write_csv(&mut written, CSV_HEADER, &rows).unwrap();
        let written = String::from_utf8(written).unwrap();
        assert!(written.contains(",'=cmd|' /C calc'!A0,"), "{written}");
        assert!(
            written.contains(",\"'=HYPERLINK(\"\"x\"\")\"\n"),
            "{written}"
        );
        assert!(
            !written.contains(",=cmd") && !written.contains(",=HYPERLINK"),
            "{written}"
        );
    }

    #[test]
    fn html_escapes_every_cell() {
        let page = html(&report(), 0);
        assert!(
            page.contains("<table id=\"database-credentials\">"),
            "{page}"
        );
        assert!(
            page.contains(
                "<tr><td>main</td><td>readonly</td><td>=cmd|&#39; /C calc&#39;!A0</td><td class=\"n\">3</td><td class=\"n\">1</td><td class=\"n\">1</td>"
            ),
            "{page}"
        );
        assert!(
            page.contains("<td>PERMISSION_DENIED 2, UNAVAILABLE 1</td>"),
            "{page}"
        );
        assert!(
            page.contains("<td>&lt;script&gt;alert(1)&lt;/script&gt;</td></tr>"),
            "{page}"
        );
        assert!(
            page.contains("<td>-</td><td>readonly</td><td>&lt;script&gt;x&lt;/script&gt;</td>"),
            "{page}"
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(
            page.contains("<tr><td>main</td><td>readonly</td><td class=\"n\">2</td>"),
            "{page}"
        );
    }
}
