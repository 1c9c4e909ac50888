//! `kms audit report`: the key-usage report as a table, JSON, CSV, or one self-contained
//! HTML page with a chart drawn as inline SVG (no script, nothing fetched).
//!
//! Every format carries the same rows: a summary per key; calls per key, version,
//! principal, operation and outcome, each with its own first and last call; refused calls
//! by principal, with the key or secret path they named; versions unused in the period; versions below the primary still
//! decrypting; the custodians' ceremonies; secrets read; credentials issued; database
//! logins per connection, role and principal, and the orphan logins reconcile dropped.

mod databases;

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use kms::audit::report::{Bucket, OTHER_KEYS, UsageReport, VersionRef};
use kms_proto::v1 as pb;
use tonic::transport::Channel;

use crate::audit::{aligned, audit_client, esc, output, rfc3339, write_csv};
use crate::{Answer as _, BoxError, RpcError};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// Aligned text.
    Table,
    /// JSON.
    Json,
    /// One row per line of every section, its section in the first column.
    Csv,
    /// One self-contained HTML file with a chart of use over time and the tables.
    Html,
}

/// `kms audit report`: the parts merged (repeated fields append, as audit.proto says),
/// then written in the chosen format.
pub async fn report(
    channel: Channel,
    request: pb::KeyUsageReportRequest,
    format: ReportFormat,
    out: &Option<PathBuf>,
) -> Result<ExitCode, BoxError> {
    let mut parts = audit_client(channel)
        .key_usage_report(request)
        .answer()
        .await?;
    let mut merged = pb::KeyUsageReportResponse::default();
    while let Some(part) = parts.message().await.map_err(RpcError)? {
        prost::Message::merge(&mut merged, prost::Message::encode_to_vec(&part).as_slice())?;
    }
    let generated = merged.generated_unix_ms;
    let report = kms::wire::report_from(merged);
    let mut w = output(out)?;
    match format {
        ReportFormat::Table => write!(w, "{}", table(&report))?,
        ReportFormat::Json => writeln!(w, "{}", serde_json::to_string_pretty(&report)?)?,
        ReportFormat::Csv => write_csv(&mut w, CSV_HEADER, &csv_rows(&report))?,
        ReportFormat::Html => write!(w, "{}", html(&report, generated))?,
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn period(r: &UsageReport) -> String {
    let mut text = format!(
        "{} to {}",
        r.since_ms.map_or("the first record".to_owned(), rfc3339),
        r.until_ms.map_or("now".to_owned(), rfc3339)
    );
    if let Some(k) = &r.key {
        text.push_str(&format!(", key {k}"));
    }
    if let Some(p) = &r.principal {
        text.push_str(&format!(", principal {p}"));
    }
    text
}

fn version_text(v: Option<u32>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

/// The sections, each as a header and rows of text: what the table, CSV and HTML show.
struct Sections {
    keys: Vec<Vec<String>>,
    usage: Vec<Vec<String>>,
    refused: Vec<Vec<String>>,
    unused: Vec<Vec<String>>,
    below: Vec<Vec<String>>,
    custody: Vec<Vec<String>>,
    secrets: Vec<Vec<String>>,
    credentials: Vec<Vec<String>>,
    databases: Vec<Vec<String>>,
    orphans: Vec<Vec<String>>,
}

const KEYS_HEADER: [&str; 7] = [
    "KEY",
    "OK",
    "FAILED",
    "REFUSED",
    "PRINCIPALS",
    "FIRST",
    "LAST",
];
const USAGE_HEADER: [&str; 8] = [
    "KEY",
    "VERSION",
    "PRINCIPAL",
    "OPERATION",
    "OUTCOME",
    "COUNT",
    "FIRST",
    "LAST",
];
const REFUSED_HEADER: [&str; 8] = [
    "PRINCIPAL",
    "OPERATION",
    "KEY",
    "SECRET",
    "OUTCOME",
    "COUNT",
    "FIRST",
    "LAST",
];
const UNUSED_HEADER: [&str; 3] = ["KEY", "VERSION", "STATE"];
const BELOW_HEADER: [&str; 4] = ["KEY", "VERSION", "STATE", "DECRYPTIONS"];
const CUSTODY_HEADER: [&str; 9] = [
    "SHARE SET",
    "SHARE",
    "PRINCIPAL",
    "OPERATION",
    "STEP",
    "OUTCOME",
    "COUNT",
    "FIRST",
    "LAST",
];

const SECRETS_HEADER: [&str; 6] = ["PATH", "VERSION", "PRINCIPAL", "READS", "FIRST", "LAST"];

const CREDENTIALS_HEADER: [&str; 9] = [
    "ISSUER",
    "KIND",
    "SUBJECT",
    "DELEGATOR",
    "KEY VERSION",
    "OUTCOME",
    "COUNT",
    "FIRST",
    "LAST",
];

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn sections(r: &UsageReport) -> Sections {
    let refs = |list: &[VersionRef], count: bool| -> Vec<Vec<String>> {
        list.iter()
            .map(|v| {
                let mut row = vec![v.key.clone(), v.version.to_string(), v.state.clone()];
                if count {
                    row.push(v.count.to_string());
                }
                row
            })
            .collect()
    };
    Sections {
        keys: r
            .keys
            .iter()
            .map(|k| {
                vec![
                    k.key.clone(),
                    k.ok.to_string(),
                    k.failed.to_string(),
                    k.refused.to_string(),
                    k.principals.to_string(),
                    rfc3339(k.first_ms),
                    rfc3339(k.last_ms),
                ]
            })
            .collect(),
        usage: r
            .usage
            .iter()
            .map(|u| {
                vec![
                    u.key.clone(),
                    version_text(u.version),
                    u.principal.clone(),
                    u.operation.clone(),
                    u.outcome.clone(),
                    u.span.count.to_string(),
                    rfc3339(u.span.first_ms),
                    rfc3339(u.span.last_ms),
                ]
            })
            .collect(),
        refused: r
            .refused
            .iter()
            .map(|f| {
                vec![
                    f.principal.clone(),
                    f.operation.clone(),
                    f.key.clone().unwrap_or_else(|| "-".to_owned()),
                    f.secret_path.clone().unwrap_or_else(|| "-".to_owned()),
                    f.outcome.clone(),
                    f.span.count.to_string(),
                    rfc3339(f.span.first_ms),
                    rfc3339(f.span.last_ms),
                ]
            })
            .collect(),
        unused: refs(&r.unused, false),
        below: refs(&r.decrypt_below_primary, true),
        custody: r
            .custody
            .iter()
            .map(|c| {
                vec![
                    dash(&c.share_set),
                    c.share_index
                        .map_or_else(|| "-".to_owned(), |i| i.to_string()),
                    c.principal.clone(),
                    c.operation.clone(),
                    dash(&c.step),
                    c.outcome.clone(),
                    c.span.count.to_string(),
                    rfc3339(c.span.first_ms),
                    rfc3339(c.span.last_ms),
                ]
            })
            .collect(),
        secrets: r
            .secret_reads
            .iter()
            .map(|s| {
                vec![
                    s.path.clone(),
                    s.version.to_string(),
                    s.principal.clone(),
                    s.span.count.to_string(),
                    rfc3339(s.span.first_ms),
                    rfc3339(s.span.last_ms),
                ]
            })
            .collect(),
        credentials: r
            .credentials
            .iter()
            .map(|c| {
                vec![
                    c.issuer.clone(),
                    c.kind.clone(),
                    dash(&c.subject),
                    c.actor.clone().unwrap_or_else(|| "-".to_owned()),
                    version_text(Some(c.key_version).filter(|v| *v != 0)),
                    c.outcome.clone(),
                    c.span.count.to_string(),
                    rfc3339(c.span.first_ms),
                    rfc3339(c.span.last_ms),
                ]
            })
            .collect(),
        databases: databases::rows(r),
        orphans: databases::orphan_rows(r),
    }
}

/// The section titles, in order, as the table and the HTML show them.
const TITLES: [&str; 10] = [
    "Per key",
    "Calls per key, version, principal, operation and outcome",
    "Refused calls, by principal",
    "Versions with no successful use in the period",
    "Versions below the primary still decrypting (re-encrypt their data before destroying them)",
    "Custodians' ceremonies (init, rekey, verify-share), by share set and share",
    "Secrets read, by path, version and principal (the last read: LAST)",
    "Credentials issued and refused, by issuer, subject, delegator, key version and outcome",
    "Database credentials, by connection, role and principal (kms: the server's own revocations; FORCED and IRREVOCABLE leases may have left their login behind)",
    "Logins no lease named, dropped by reconcile, by connection and role",
];

/// The report as aligned text.
pub fn table(r: &UsageReport) -> String {
    let s = sections(r);
    let mut out = format!("Key usage, {} ({} records)\n", period(r), r.records);
    let parts: [(&[&str], &Vec<Vec<String>>); 10] = [
        (&KEYS_HEADER, &s.keys),
        (&USAGE_HEADER, &s.usage),
        (&REFUSED_HEADER, &s.refused),
        (&UNUSED_HEADER, &s.unused),
        (&BELOW_HEADER, &s.below),
        (&CUSTODY_HEADER, &s.custody),
        (&SECRETS_HEADER, &s.secrets),
        (&CREDENTIALS_HEADER, &s.credentials),
        (&databases::DATABASES_HEADER, &s.databases),
        (&databases::ORPHANS_HEADER, &s.orphans),
    ];
    for (title, (header, rows)) in TITLES.iter().zip(parts) {
        out.push_str(&format!("\n{title}\n"));
        let mut all = vec![header.iter().map(|h| (*h).to_owned()).collect()];
        all.extend(rows.iter().cloned());
        out.push_str(&aligned(&all));
    }
    out
}

/// The CSV's columns: every section's, the section named first.
const CSV_HEADER: &[&str] = &[
    "section",
    "key",
    "version",
    "principal",
    "operation",
    "outcome",
    "count",
    "ok",
    "failed",
    "refused",
    "principals",
    "state",
    "first",
    "last",
    "share_set",
    "share_index",
    "step",
    "path",
    "issuer",
    "kind",
    "subject",
    "actor",
    // The database sections' (last, so the others' keep their places; report/databases.rs).
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

/// The report's CSV rows: every row of every section, its section in the first column and
/// each value under its own column.
fn csv_rows(r: &UsageReport) -> Vec<Vec<String>> {
    let row = |cells: &[(&str, String)]| -> Vec<String> {
        CSV_HEADER
            .iter()
            .map(|col| {
                cells
                    .iter()
                    .find(|(c, _)| c == col)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut rows = Vec::new();
    for k in &r.keys {
        rows.push(row(&[
            ("section", "key".into()),
            ("key", k.key.clone()),
            ("ok", k.ok.to_string()),
            ("failed", k.failed.to_string()),
            ("refused", k.refused.to_string()),
            ("principals", k.principals.to_string()),
            ("first", rfc3339(k.first_ms)),
            ("last", rfc3339(k.last_ms)),
        ]));
    }
    for u in &r.usage {
        rows.push(row(&[
            ("section", "usage".into()),
            ("key", u.key.clone()),
            (
                "version",
                u.version.map(|v| v.to_string()).unwrap_or_default(),
            ),
            ("principal", u.principal.clone()),
            ("operation", u.operation.clone()),
            ("outcome", u.outcome.clone()),
            ("count", u.span.count.to_string()),
            ("first", rfc3339(u.span.first_ms)),
            ("last", rfc3339(u.span.last_ms)),
        ]));
    }
    for f in &r.refused {
        rows.push(row(&[
            ("section", "refused".into()),
            ("key", f.key.clone().unwrap_or_default()),
            // The secret path shares the column of the secret reads' paths.
            ("path", f.secret_path.clone().unwrap_or_default()),
            ("principal", f.principal.clone()),
            ("operation", f.operation.clone()),
            ("outcome", f.outcome.clone()),
            ("count", f.span.count.to_string()),
            ("first", rfc3339(f.span.first_ms)),
            ("last", rfc3339(f.span.last_ms)),
        ]));
    }
    for (section, list) in [
        ("unused", &r.unused),
        ("below_primary", &r.decrypt_below_primary),
    ] {
        for v in list {
            rows.push(row(&[
                ("section", section.into()),
                ("key", v.key.clone()),
                ("version", v.version.to_string()),
                ("state", v.state.clone()),
                ("count", v.count.to_string()),
            ]));
        }
    }
    for c in &r.custody {
        rows.push(row(&[
            ("section", "custody".into()),
            ("share_set", c.share_set.clone()),
            (
                "share_index",
                c.share_index.map(|i| i.to_string()).unwrap_or_default(),
            ),
            ("principal", c.principal.clone()),
            ("operation", c.operation.clone()),
            ("step", c.step.clone()),
            ("outcome", c.outcome.clone()),
            ("count", c.span.count.to_string()),
            ("first", rfc3339(c.span.first_ms)),
            ("last", rfc3339(c.span.last_ms)),
        ]));
    }
    for s in &r.secret_reads {
        rows.push(row(&[
            ("section", "secret-reads".into()),
            ("path", s.path.clone()),
            ("version", s.version.to_string()),
            ("principal", s.principal.clone()),
            ("count", s.span.count.to_string()),
            ("first", rfc3339(s.span.first_ms)),
            ("last", rfc3339(s.span.last_ms)),
        ]));
    }
    for c in &r.credentials {
        rows.push(row(&[
            ("section", "credentials".into()),
            ("issuer", c.issuer.clone()),
            ("kind", c.kind.clone()),
            ("subject", c.subject.clone()),
            ("actor", c.actor.clone().unwrap_or_default()),
            ("version", c.key_version.to_string()),
            ("outcome", c.outcome.clone()),
            ("count", c.span.count.to_string()),
            ("first", rfc3339(c.span.first_ms)),
            ("last", rfc3339(c.span.last_ms)),
        ]));
    }
    rows.extend(databases::csv_rows(r, row));
    rows
}

/// HTML table rows (escaped), right-aligning the columns that hold numbers.
fn html_rows(rows: &[Vec<String>], numeric: &[usize]) -> String {
    let mut out = String::new();
    for row in rows {
        out.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            if numeric.contains(&i) {
                let _ = write!(out, "<td class=\"n\">{}</td>", esc(cell));
            } else {
                let _ = write!(out, "<td>{}</td>", esc(cell));
            }
        }
        out.push_str("</tr>\n");
    }
    out
}

/// The report as one self-contained HTML page: no network, no script, inline CSS, the
/// chart as inline SVG, and the tables.
pub fn html(r: &UsageReport, generated_ms: u64) -> String {
    let s = sections(r);
    let (chart, legend) = chart(r);
    fill(
        REPORT_TEMPLATE,
        &[
            ("period", esc(&period(r))),
            ("records", r.records.to_string()),
            ("generated", rfc3339(generated_ms)),
            ("bucket", crate::show::duration_text(r.bucket_ms / 1000)),
            ("chart", chart),
            ("legend", legend),
            ("keys", html_rows(&s.keys, &[1, 2, 3, 4])),
            ("usage", html_rows(&s.usage, &[5])),
            ("refused", html_rows(&s.refused, &[5])),
            ("unused", html_rows(&s.unused, &[])),
            ("below", html_rows(&s.below, &[3])),
            ("custody", html_rows(&s.custody, &[6])),
            ("secrets", html_rows(&s.secrets, &[1, 3])),
            ("credentials", html_rows(&s.credentials, &[4, 6])),
            (
                "databases",
                html_rows(&s.databases, &databases::DATABASES_NUMERIC),
            ),
            ("orphans", html_rows(&s.orphans, &[2])),
        ],
    )
}

/// The series colours (Tableau 10), the others' grey, and the refusals' red.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
];
const OTHERS_COLOUR: &str = "#999999";
const REFUSED_COLOUR: &str = "#d62728";

/// The chart's geometry (pixels).
const W: u64 = 900;
const H: u64 = 300;
const LEFT: u64 = 60;
const RIGHT: u64 = 10;
const TOP: u64 = 10;
const BOTTOM: u64 = 40;

/// The timeline as a chart: its buckets, its series (keys, in the report's order) and its
/// scale.
struct Chart<'r> {
    r: &'r UsageReport,
    starts: Vec<u64>,
    series: Vec<&'r str>,
    /// The tallest bar (at least 1).
    max: u64,
    /// The width each bucket gets.
    slot: f64,
}

impl<'r> Chart<'r> {
    fn new(r: &'r UsageReport) -> Self {
        let mut starts: Vec<u64> = r.timeline.iter().map(|b| b.start_ms).collect();
        starts.dedup();
        let mut series: Vec<&str> = Vec::new();
        for b in &r.timeline {
            if !series.contains(&b.key.as_str()) {
                series.push(&b.key);
            }
        }
        let mut chart = Chart {
            r,
            starts,
            series,
            max: 1,
            slot: 0.0,
        };
        chart.max = chart
            .starts
            .iter()
            .map(|s| chart.bucket(*s).map(|b| b.ok + b.refused).sum::<u64>())
            .max()
            .unwrap_or(0)
            .max(1);
        let n = chart.starts.len().max(1);
        chart.slot = (W - LEFT - RIGHT) as f64 / n as f64;
        chart
    }

    fn bucket(&self, start: u64) -> impl Iterator<Item = &'r Bucket> {
        self.r.timeline.iter().filter(move |b| b.start_ms == start)
    }

    fn colour(&self, key: &str) -> &'static str {
        if key == OTHER_KEYS {
            return OTHERS_COLOUR;
        }
        let i = self.series.iter().position(|s| *s == key).unwrap_or(0);
        COLOURS
            .get(i % COLOURS.len())
            .copied()
            .unwrap_or(OTHERS_COLOUR)
    }

    fn height(&self, count: u64) -> f64 {
        (H - TOP - BOTTOM) as f64 * count as f64 / self.max as f64
    }

    /// The SVG: axes, one stacked bar per bucket, the times under them.
    fn svg(&self) -> String {
        let base = (H - BOTTOM) as f64;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"calls per key over time\">\n"
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base}\" stroke=\"#888\"/>",
            W - RIGHT
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{base}\" font-size=\"11\" text-anchor=\"end\">0</text>",
            LEFT - 6,
            TOP + 10,
            self.max,
            LEFT - 6
        );
        if self.starts.is_empty() {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" font-size=\"14\" text-anchor=\"middle\">No calls in the period</text>",
                W / 2,
                H / 2
            );
        }
        for (i, start) in self.starts.iter().enumerate() {
            self.bar(&mut svg, i, *start);
        }
        self.time_labels(&mut svg);
        svg.push_str("</svg>");
        svg
    }

    /// Bucket `i`'s bar: each key's successful uses stacked, the refusals in red on top.
    fn bar(&self, svg: &mut String, i: usize, start: u64) {
        let width = (self.slot * 0.8).max(1.0);
        let x = LEFT as f64 + self.slot * i as f64 + (self.slot - width) / 2.0;
        let mut y = (H - BOTTOM) as f64;
        let when = rfc3339(start);
        let mut refused = 0;
        for b in self.bucket(start) {
            refused += b.refused;
            if b.ok == 0 {
                continue;
            }
            let h = self.height(b.ok);
            y -= h;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{h:.1}\" fill=\"{}\" data-key=\"{}\" data-ok=\"{}\"><title>{}: {} from {when}</title></rect>",
                self.colour(&b.key),
                esc(&b.key),
                b.ok,
                esc(&b.key),
                b.ok
            );
        }
        if refused > 0 {
            let h = self.height(refused);
            y -= h;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{h:.1}\" fill=\"{REFUSED_COLOUR}\" data-refused=\"{refused}\"><title>refused: {refused} from {when}</title></rect>"
            );
        }
    }

    /// Times under the first, middle and last bars, inside the chart's width.
    fn time_labels(&self, svg: &mut String) {
        let last = self.starts.len().saturating_sub(1);
        let mut labelled = Vec::new();
        for i in [0, self.starts.len() / 2, last] {
            if labelled.contains(&i) {
                continue;
            }
            labelled.push(i);
            let Some(start) = self.starts.get(i) else {
                continue;
            };
            let (offset, anchor) = if i == 0 {
                (0.1, "start")
            } else if i == last {
                (0.9, "end")
            } else {
                (0.5, "middle")
            };
            let x = LEFT as f64 + self.slot * (i as f64 + offset);
            let _ = writeln!(
                svg,
                "<text x=\"{x:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"{anchor}\">{}</text>",
                H - BOTTOM + 18,
                rfc3339(*start)
            );
        }
    }

    /// The legend (HTML): each series' colour and total of successful uses, and the
    /// refusals'.
    fn legend(&self) -> String {
        let mut legend = String::new();
        for key in &self.series {
            let total: u64 = self
                .r
                .timeline
                .iter()
                .filter(|b| b.key == *key)
                .map(|b| b.ok)
                .sum();
            let _ = writeln!(
                legend,
                "<span data-key=\"{}\"><span class=\"swatch\" style=\"background:{}\"></span>{}: {total}</span>",
                esc(key),
                self.colour(key),
                esc(key)
            );
        }
        let refused: u64 = self.r.timeline.iter().map(|b| b.refused).sum();
        let _ = writeln!(
            legend,
            "<span data-refused=\"{refused}\"><span class=\"swatch\" style=\"background:{REFUSED_COLOUR}\"></span>refused: {refused}</span>"
        );
        legend
    }
}

/// The timeline as stacked bars in inline SVG (one bar per bucket: each key's successful
/// uses stacked, refusals in red on top), and its legend (HTML) with each series' total.
fn chart(r: &UsageReport) -> (String, String) {
    let chart = Chart::new(r);
    (chart.svg(), chart.legend())
}

/// The HTML report's page: `{{name}}` marks where [`html`] puts each (escaped) value.
const REPORT_TEMPLATE: &str = include_str!("report.html");

/// `template` with every `{{name}}` replaced by its value, in one pass: a value that
/// itself contains `{{...}}` is never filled again. An unknown name is left as written.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some((before, after)) = rest.split_once("{{") {
        out.push_str(before);
        match after.split_once("}}") {
            Some((name, tail)) => {
                match values.iter().find(|(n, _)| *n == name) {
                    Some((_, v)) => out.push_str(v),
                    None => {
                        out.push_str("{{");
                        out.push_str(name);
                        out.push_str("}}");
                    }
                }
                rest = tail;
            }
            None => {
                out.push_str("{{");
                rest = after;
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use kms::audit::report::{
        CredentialRow, CustodyRow, KeySummary, RefusedRow, SecretReadRow, Span, UsageRow,
    };

    fn report() -> UsageReport {
        let span = Span {
            count: 3,
            first_ms: 1_000,
            last_ms: 2_000,
        };
        UsageReport {
            since_ms: None,
            until_ms: None,
            key: None,
            principal: None,
            records: 9,
            keys: vec![KeySummary {
                key: "payments".into(),
                ok: 3,
                failed: 0,
                refused: 1,
                principals: 2,
                first_ms: 1_000,
                last_ms: 2_000,
            }],
            usage: vec![UsageRow {
                key: "payments".into(),
                version: Some(1),
                principal: "spiffe://corp/app".into(),
                operation: "Encrypt".into(),
                outcome: "OK".into(),
                span,
            }],
            refused: vec![
                RefusedRow {
                    principal: "<script>".into(),
                    operation: "Decrypt".into(),
                    key: Some("payments".into()),
                    secret_path: None,
                    outcome: "PERMISSION_DENIED".into(),
                    span: Span { count: 1, ..span },
                },
                RefusedRow {
                    principal: "spiffe://corp/intruder".into(),
                    operation: "GetSecret".into(),
                    key: None,
                    secret_path: Some("=payments/<stripe>".into()),
                    outcome: "PERMISSION_DENIED".into(),
                    span: Span { count: 2, ..span },
                },
            ],
            unused: Vec::new(),
            decrypt_below_primary: Vec::new(),
            bucket_ms: 1_000,
            timeline: vec![
                Bucket {
                    start_ms: 1_000,
                    key: "payments".into(),
                    ok: 2,
                    refused: 0,
                },
                Bucket {
                    start_ms: 2_000,
                    key: "payments".into(),
                    ok: 1,
                    refused: 1,
                },
            ],
            custody: vec![CustodyRow {
                share_set: "0011223344556677".into(),
                share_index: Some(4),
                principal: "custodian-<b>".into(),
                operation: "VerifyShare".into(),
                step: String::new(),
                outcome: "OK".into(),
                span: Span { count: 1, ..span },
            }],
            secret_reads: vec![SecretReadRow {
                path: "payments/stripe".into(),
                version: 7,
                principal: "spiffe://corp/<app>".into(),
                span: Span { count: 2, ..span },
            }],
            credentials: vec![CredentialRow {
                issuer: "workloads".into(),
                kind: "jwt".into(),
                subject: "spiffe://corp/app".into(),
                actor: Some("=spiffe://corp/<ci>".into()),
                key_version: 2,
                outcome: "OK".into(),
                span: Span { count: 4, ..span },
            }],
            database_credentials: Vec::new(),
            orphan_logins: Vec::new(),
        }
    }

    #[test]
    fn the_template_is_filled_in_one_pass() {
        let values = [("a", "{{b}}".to_owned()), ("b", "B".to_owned())];
        assert_eq!(fill("x{{a}}y{{b}}z{{c}}", &values), "x{{b}}yBz{{c}}");
        assert_eq!(fill("open {{a", &values), "open {{a");
        let page = html(&report(), 0);
        assert!(!page.contains("{{"), "a placeholder was left: {page}");
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(!page.contains("<script"), "no script: {page}");
        assert!(page.contains("&lt;script&gt;"), "escaped: {page}");
    }

    #[test]
    fn every_format_carries_the_same_rows() {
        let r = report();
        let t = table(&r);
        assert!(t.contains("spiffe://corp/app"), "{t}");
        assert!(t.contains("Refused calls, by principal"), "{t}");
        let csv = csv_rows(&r);
        assert_eq!(csv.len(), 7, "{csv:?}");
        assert_eq!(csv[1][0], "usage");
        assert_eq!(csv[1][3], "spiffe://corp/app");
        let col = |name: &str| CSV_HEADER.iter().position(|c| *c == name).unwrap();
        assert_eq!(csv[2][0], "refused");
        assert_eq!(csv[2][col("key")], "payments");
        assert_eq!(csv[2][col("path")], "");
        // A refused secret call names its path (no key), in every format.
        let denied = &csv[3];
        assert_eq!(denied[0], "refused");
        assert_eq!(denied[col("operation")], "GetSecret");
        assert_eq!(denied[col("key")], "");
        assert_eq!(denied[col("path")], "=payments/<stripe>");
        assert_eq!(denied[col("count")], "2");
        let mut written = Vec::new();
        write_csv(&mut written, CSV_HEADER, &csv).unwrap();
        let written = String::from_utf8(written).unwrap();
        assert!(written.contains(",'=payments/<stripe>,"), "{written}");
        let line = t.lines().find(|l| l.contains("GetSecret")).unwrap();
        assert!(line.contains("  -  "), "no key: {line}");
        assert!(
            line.contains("=payments/<stripe>  PERMISSION_DENIED"),
            "{line}"
        );
        assert!(t.contains("KEY       SECRET"), "{t}");
        let custody = &csv[4];
        assert_eq!(custody[0], "custody");
        assert_eq!(custody[col("share_set")], "0011223344556677");
        assert_eq!(custody[col("share_index")], "4");
        assert_eq!(custody[col("operation")], "VerifyShare");
        assert!(t.contains("Custodians' ceremonies"), "{t}");
        assert!(t.contains("0011223344556677  4"), "{t}");
        let reads = &csv[5];
        assert_eq!(reads[0], "secret-reads");
        assert_eq!(reads[col("path")], "payments/stripe");
        assert_eq!(reads[col("version")], "7");
        assert_eq!(reads[col("count")], "2");
        assert_eq!(reads[col("last")], rfc3339(2_000));
        assert!(t.contains("Secrets read, by path"), "{t}");
        assert!(t.contains("payments/stripe  7"), "{t}");
        let issued = &csv[6];
        assert_eq!(issued[0], "credentials");
        assert_eq!(issued[col("issuer")], "workloads");
        assert_eq!(issued[col("kind")], "jwt");
        assert_eq!(issued[col("subject")], "spiffe://corp/app");
        assert_eq!(issued[col("actor")], "=spiffe://corp/<ci>");
        assert_eq!(issued[col("version")], "2");
        assert_eq!(issued[col("count")], "4");
        assert!(t.contains("Credentials issued and refused"), "{t}");
        assert!(
            t.contains("workloads  jwt   spiffe://corp/app  =spiffe://corp/<ci>  2"),
            "{t}"
        );
        assert!(written.contains(",'=spiffe://corp/<ci>"), "{written}");
        let page = html(&r, 0);
        assert!(page.contains("<td>custodian-&lt;b&gt;</td>"), "{page}");
        assert!(page.contains("<th>Key</th><th>Secret</th>"), "{page}");
        assert!(
            page.contains(
                "<td>-</td><td>=payments/&lt;stripe&gt;</td><td>PERMISSION_DENIED</td><td class=\"n\">2</td>"
            ),
            "{page}"
        );
        assert!(
            page.contains("<td>spiffe://corp/&lt;app&gt;</td>"),
            "{page}"
        );
        assert!(
            page.contains(
                "<td>workloads</td><td>jwt</td><td>spiffe://corp/app</td><td>=spiffe://corp/&lt;ci&gt;</td><td class=\"n\">2</td>"
            ),
            "{page}"
        );
        let (svg, legend) = chart(&r);
        assert_eq!(svg.matches("data-ok=").count(), 2, "{svg}");
        assert_eq!(svg.matches("data-refused=\"1\"").count(), 1, "{svg}");
        assert!(legend.contains("payments: 3") && legend.contains("refused: 1"));
        let empty = UsageReport {
            timeline: Vec::new(),
            ..report()
        };
        assert!(chart(&empty).0.contains("No calls in the period"));
    }
}
