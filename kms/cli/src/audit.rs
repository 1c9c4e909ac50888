//! `kms audit export|report|verify`: the auditors' commands.
//!
//! `verify` exits 0 only when the log is intact, 3 when it is not (naming the first bad
//! sequence number and why), 1 on any other error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Subcommand, ValueEnum};
use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use tonic::transport::Channel;

use super::{BoxError, RpcError};
use crate::Answer as _;
use kms::audit::AuditRecord;
use kms::audit::report::{UsageReport, VersionRef};
use kms::audit::verify::{ChainError, ExportSummary, ExportVerdict, verify_export};

/// Exit code of `verify` when the log is not intact.
pub const NOT_INTACT: u8 = 3;

/// Exit code of `verify --export` when the chain is consistent but no signature covers its
/// last record: nothing proves that its tail was not cut.
pub const NOT_ANCHORED: u8 = 4;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// JSON lines: a header, the records verbatim, and the signed checkpoints (verifiable
    /// offline with `kms audit verify --export`).
    Jsonl,
    /// One row per record, for spreadsheets (not verifiable).
    Csv,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// Aligned text.
    Table,
    /// JSON.
    Json,
    /// One row per key version, operation and outcome.
    Csv,
    /// One self-contained HTML file with a chart of use over time and the tables.
    Html,
}

/// `kms audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Export audit records (the export is itself audited).
    Export {
        /// jsonl or csv.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// From this time (RFC 3339, e.g. 2026-11-23T00:00:00Z), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339), exclusive.
        #[arg(long)]
        until: Option<String>,
        /// Only records about this key.
        #[arg(long)]
        key: Option<String>,
        /// Only records of this principal.
        #[arg(long)]
        principal: Option<String>,
        /// Only this operation (e.g. Decrypt).
        #[arg(long)]
        operation: Option<String>,
        /// Only this outcome (OK, or a gRPC code name such as PERMISSION_DENIED).
        #[arg(long)]
        outcome: Option<String>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Key-usage report: per key and version, operations, outcomes, principals, first and
    /// last use; unused versions; versions below the primary still decrypting.
    Report {
        /// From this time (RFC 3339), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339), exclusive.
        #[arg(long)]
        until: Option<String>,
        /// table, json, csv or html.
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify the hash chain and every checkpoint signature: on the server, or offline
    /// against an export (no server, no HSM). Exit 0 only when intact, 3 when not.
    Verify {
        /// Verify this JSONL export offline.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Offline: the checkpoint key you trust (its fingerprint, or the public key in
        /// hex); without it the key in the export is used and its fingerprint printed.
        #[arg(long, requires = "export")]
        public_key: Option<String>,
    },
}

/// The largest message the audit client accepts: parts are about 1 MiB, but a record
/// stored before names were bounded can be larger, and an export must still carry it.
const MAX_AUDIT_MESSAGE: usize = 64 * 1024 * 1024;

fn audit_client(channel: Channel) -> AuditClient<Channel> {
    AuditClient::new(channel).max_decoding_message_size(MAX_AUDIT_MESSAGE)
}

fn ms(text: &Option<String>, what: &str) -> Result<u64, BoxError> {
    match text {
        None => Ok(0),
        Some(t) => {
            let at = humantime::parse_rfc3339_weak(t).map_err(|_| {
                format!("--{what} {t:?} is not an RFC 3339 time such as 2026-11-23T09:00:00Z")
            })?;
            let d = at
                .duration_since(UNIX_EPOCH)
                .map_err(|_| format!("--{what} is before 1970"))?;
            Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }
    }
}

/// A Unix time in ms as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn output(out: &Option<PathBuf>) -> Result<Box<dyn Write>, BoxError> {
    Ok(match out {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        )),
        _ => Box::new(std::io::BufWriter::new(std::io::stdout())),
    })
}

/// Runs `kms audit ...`. `connect` is called only by the commands that need the server.
pub async fn run<F, Fut>(command: AuditCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        AuditCommand::Export {
            format,
            since,
            until,
            key,
            principal,
            operation,
            outcome,
            out,
        } => {
            let filter = pb::AuditFilter {
                since_unix_ms: ms(&since, "since")?,
                until_unix_ms: ms(&until, "until")?,
                key: key.unwrap_or_default(),
                principal: principal.unwrap_or_default(),
                operation: operation.unwrap_or_default(),
                outcome: outcome.unwrap_or_default(),
            };
            export(connect().await?, filter, format, &out).await
        }
        AuditCommand::Report {
            since,
            until,
            format,
            out,
        } => {
            let request = pb::KeyUsageReportRequest {
                since_unix_ms: ms(&since, "since")?,
                until_unix_ms: ms(&until, "until")?,
            };
            report(connect().await?, request, format, &out).await
        }
        AuditCommand::Verify {
            export: Some(path),
            public_key,
        } => verify_offline(&path, public_key.as_deref()),
        AuditCommand::Verify { export: None, .. } => verify_online(connect().await?).await,
    }
}

/// `kms audit export`: the stream's lines as JSONL, or its records as CSV rows.
async fn export(
    channel: Channel,
    filter: pb::AuditFilter,
    format: ExportFormat,
    out: &Option<PathBuf>,
) -> Result<ExitCode, BoxError> {
    let mut stream = audit_client(channel)
        .export_audit_log(pb::ExportAuditLogRequest {
            filter: Some(filter),
        })
        .answer()
        .await?;
    let mut w = output(out)?;
    let mut csv: Option<Vec<Vec<String>>> = matches!(format, ExportFormat::Csv).then(Vec::new);
    let mut count = 0u64;
    while let Some(chunk) = stream.message().await.map_err(RpcError)? {
        for line in chunk.lines {
            match &mut csv {
                None => writeln!(w, "{line}")?,
                Some(rows) => {
                    if let Ok(r) = serde_json::from_str::<AuditRecord>(&line) {
                        count += 1;
                        rows.push(csv_row(&r));
                    }
                }
            }
        }
    }
    if let Some(rows) = csv {
        write_csv(&mut w, CSV_HEADER, &rows)?;
        eprintln!("{count} records");
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `kms audit report`: the parts merged (repeated fields append, as audit.proto says),
/// then written in the chosen format.
async fn report(
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
        ReportFormat::Csv => write_csv(&mut w, REPORT_CSV_HEADER, &report_rows(&report))?,
        ReportFormat::Html => write!(w, "{}", html(&report, generated))?,
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

const REPORT_CSV_HEADER: &[&str] = &[
    "key",
    "version",
    "operation",
    "outcome",
    "count",
    "principals",
    "first_use",
    "last_use",
];

/// The report's CSV rows: one per key version, operation and outcome.
fn report_rows(report: &UsageReport) -> Vec<Vec<String>> {
    report
        .usage
        .iter()
        .flat_map(|u| {
            u.counts.iter().map(|c| {
                vec![
                    u.key.clone(),
                    u.version.map(|v| v.to_string()).unwrap_or_default(),
                    c.operation.clone(),
                    c.outcome.clone(),
                    c.count.to_string(),
                    u.principals.join(" "),
                    rfc3339(u.first_use_ms),
                    rfc3339(u.last_use_ms),
                ]
            })
        })
        .collect()
}

/// `kms audit verify` on the server: its verdict, exit 0 or [`NOT_INTACT`].
async fn verify_online(channel: Channel) -> Result<ExitCode, BoxError> {
    let r = audit_client(channel)
        .verify_audit_log(pb::VerifyAuditLogRequest {})
        .answer()
        .await?;
    println!("{}", r.message);
    if !r.checkpoint_key_fingerprint.is_empty() {
        println!(
            "checkpoint key fingerprint: {}",
            r.checkpoint_key_fingerprint
        );
    }
    if r.intact {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("first bad sequence: {} ({})", r.first_bad_seq, r.reason);
        Ok(ExitCode::from(NOT_INTACT))
    }
}

/// Verifies a JSONL export with no server and no HSM ([`verify_export`]). Exit codes: 0
/// intact and anchored (a signature covers the last record), [`NOT_INTACT`] altered, cut,
/// or signed by another key than the trusted one, [`NOT_ANCHORED`] consistent but not
/// covered by a signature (not proof), 1 not an export.
fn verify_offline(path: &Path, trusted: Option<&str>) -> Result<ExitCode, BoxError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let verdict = verify_export(&text, trusted).map_err(|e| format!("{}: {e}", path.display()))?;
    let summary = |s: &ExportSummary| {
        let v = &s.verified;
        let mut text = format!(
            "{} records (sequence {} to {}), {} checkpoint(s) verified",
            v.records, s.first, v.head.seq, v.checkpoints
        );
        if s.sealed {
            text.push_str(", the export's signed seal covers exactly these records");
        }
        if s.is_empty() {
            text.push_str("; the export holds no records");
        }
        if let Some(f) = &s.fingerprint {
            text.push_str(&format!("\ncheckpoint key fingerprint: {f}"));
        }
        if trusted.is_none() {
            text.push_str(
                "\n(checked against the key the export names: pin the fingerprint recorded at init with --public-key to prove its origin)",
            );
        }
        text
    };
    match verdict {
        ExportVerdict::Anchored(s) => {
            println!("intact: {}", summary(&s));
            Ok(ExitCode::SUCCESS)
        }
        ExportVerdict::NotAnchored(s) => {
            let why = match s.verified.last_checkpoint {
                Some(c) => format!(
                    "records after {c} are covered by no signature, and the export has no valid seal"
                ),
                None => "no signed checkpoint and no valid seal".to_owned(),
            };
            println!(
                "NOT ANCHORED: the chain is consistent, but {why}: a cut tail would not show. {}",
                summary(&s)
            );
            Ok(ExitCode::from(NOT_ANCHORED))
        }
        ExportVerdict::KeyMismatch { found, trusted } => {
            println!(
                "NOT INTACT: the export's checkpoint key ({}) is not the key you trust ({trusted})",
                found.as_deref().unwrap_or("none")
            );
            Ok(ExitCode::from(NOT_INTACT))
        }
        ExportVerdict::Broken(ChainError { seq, reason }) => {
            println!("NOT INTACT: first bad sequence {seq}: {reason}");
            Ok(ExitCode::from(NOT_INTACT))
        }
    }
}

const CSV_HEADER: &[&str] = &[
    "seq",
    "time",
    "request_id",
    "principal",
    "peer",
    "service",
    "operation",
    "key",
    "key_version",
    "destination_key",
    "destination_key_version",
    "outcome",
    "input_bytes",
    "output_bytes",
    "batch_items",
    "batch_outcomes",
    "grant",
    "hash",
];

fn csv_row(r: &AuditRecord) -> Vec<String> {
    let e = &r.event;
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_default();
    vec![
        r.seq.to_string(),
        rfc3339(e.time_ms),
        e.request_id.clone(),
        e.principal.clone(),
        e.peer.clone(),
        e.service.clone(),
        e.operation.clone(),
        e.key.clone().unwrap_or_default(),
        opt(e.key_version),
        e.destination_key.clone().unwrap_or_default(),
        opt(e.destination_key_version),
        e.outcome.clone(),
        e.input_bytes.to_string(),
        e.output_bytes.to_string(),
        e.batch
            .as_ref()
            .map(|b| b.items.to_string())
            .unwrap_or_default(),
        e.batch
            .as_ref()
            .map(|b| {
                b.outcomes
                    .iter()
                    .map(|(o, n)| format!("{o}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default(),
        e.grant
            .as_ref()
            .map(|g| {
                format!(
                    "{} {} {}{}",
                    g.id,
                    g.principal,
                    g.operations.join(","),
                    if g.associated_data_constrained {
                        " aad-constrained"
                    } else {
                        ""
                    }
                )
            })
            .unwrap_or_default(),
        r.hash.clone(),
    ]
}

/// A CSV cell that a spreadsheet will not run as a formula: a cell starting with `=`, `+`,
/// `-`, `@`, a tab or a carriage return gets a leading `'` (OWASP's advice on CSV
/// injection). Names in the log are bounded and checked, but principals, filters and older
/// records are the callers' words.
pub fn csv_cell(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{cell}").into()
    } else {
        cell.into()
    }
}

/// Text safe to print on a terminal: control characters and the invisible Unicode format
/// characters (bidirectional overrides, zero-width characters) are written as `\u{..}`,
/// so no cell can move the cursor, recolour the screen or reorder what an auditor reads.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = kms::policy::is_invisible;
    if !text.chars().any(hidden) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if hidden(c) {
                format!("\\u{{{:x}}}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn write_csv(w: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> Result<(), BoxError> {
    let mut c = csv::Writer::from_writer(w);
    c.write_record(header)?;
    for row in rows {
        c.write_record(row.iter().map(|cell| csv_cell(cell).into_owned()))?;
    }
    c.flush()?;
    Ok(())
}

fn period(r: &UsageReport) -> String {
    format!(
        "{} to {}",
        r.since_ms.map_or("the first record".to_owned(), rfc3339),
        r.until_ms.map_or("now".to_owned(), rfc3339)
    )
}

fn version_text(v: Option<u32>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

/// The report as aligned text.
pub fn table(r: &UsageReport) -> String {
    let mut out = format!("Key usage, {} ({} records)\n\n", period(r), r.records);
    let mut rows = vec![
        [
            "KEY",
            "VERSION",
            "OPERATION",
            "OUTCOME",
            "COUNT",
            "PRINCIPALS",
            "FIRST USE",
            "LAST USE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for u in &r.usage {
        for c in &u.counts {
            rows.push(vec![
                u.key.clone(),
                version_text(u.version),
                c.operation.clone(),
                c.outcome.clone(),
                c.count.to_string(),
                u.principals.len().to_string(),
                rfc3339(u.first_use_ms),
                rfc3339(u.last_use_ms),
            ]);
        }
    }
    out.push_str(&aligned(&rows));
    out.push_str("\nVersions with no successful use in the period\n");
    let mut rows = vec![["KEY", "VERSION", "STATE"].map(str::to_owned).to_vec()];
    rows.extend(
        r.unused
            .iter()
            .map(|v| vec![v.key.clone(), v.version.to_string(), v.state.clone()]),
    );
    out.push_str(&aligned(&rows));
    out.push_str("\nVersions below the primary still decrypting (re-encrypt their data before destroying them)\n");
    let mut rows = vec![
        ["KEY", "VERSION", "STATE", "DECRYPTIONS"]
            .map(str::to_owned)
            .to_vec(),
    ];
    rows.extend(r.decrypt_below_primary.iter().map(|v| {
        vec![
            v.key.clone(),
            v.version.to_string(),
            v.state.clone(),
            v.count.to_string(),
        ]
    }));
    out.push_str(&aligned(&rows));
    out
}

fn aligned(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The report as one self-contained HTML page: no network, inline CSS, an inline script
/// that draws the chart (SVG) from the embedded data, and the tables.
pub fn html(r: &UsageReport, generated_ms: u64) -> String {
    let data = serde_json::to_string(&r.timeline)
        .unwrap_or_else(|_| "[]".to_owned())
        .replace("</", "<\\/");
    let mut usage = String::new();
    for u in &r.usage {
        for c in &u.counts {
            usage.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&u.key),
                version_text(u.version),
                esc(&c.operation),
                esc(&c.outcome),
                c.count,
                esc(&u.principals.join(", ")),
                rfc3339(u.first_use_ms),
                rfc3339(u.last_use_ms),
            ));
        }
    }
    let refs = |list: &[VersionRef], count: bool| -> String {
        list.iter()
            .map(|v| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td>{}</tr>\n",
                    esc(&v.key),
                    v.version,
                    esc(&v.state),
                    if count {
                        format!("<td class=\"n\">{}</td>", v.count)
                    } else {
                        String::new()
                    }
                )
            })
            .collect()
    };
    fill(
        REPORT_TEMPLATE,
        &[
            ("period", esc(&period(r))),
            ("records", r.records.to_string()),
            ("generated", rfc3339(generated_ms)),
            (
                "bucket",
                esc(&humantime::format_duration(Duration::from_millis(r.bucket_ms)).to_string()),
            ),
            ("usage", usage),
            ("unused", refs(&r.unused, false)),
            ("below", refs(&r.decrypt_below_primary, true)),
            ("data", data),
        ],
    )
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
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_never_start_a_formula() {
        for bad in ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(csv_cell(bad), format!("'{bad}"), "{bad:?}");
        }
        assert_eq!(csv_cell("payments"), "payments");
        assert_eq!(csv_cell(""), "");
        let mut out = Vec::new();
        write_csv(
            &mut out,
            &["a", "b"],
            &[vec!["=HYPERLINK(\"x\")".into(), "ok".into()]],
        )
        .expect("csv");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text, "a,b\n\"'=HYPERLINK(\"\"x\"\")\",ok\n");
    }

    #[test]
    fn the_template_is_filled_in_one_pass() {
        let values = [("a", "{{b}}".to_owned()), ("b", "B".to_owned())];
        assert_eq!(fill("x{{a}}y{{b}}z{{c}}", &values), "x{{b}}yBz{{c}}");
        assert_eq!(fill("open {{a", &values), "open {{a");
        let report = UsageReport {
            since_ms: None,
            until_ms: None,
            records: 0,
            usage: Vec::new(),
            unused: Vec::new(),
            decrypt_below_primary: Vec::new(),
            bucket_ms: 60_000,
            timeline: Vec::new(),
        };
        let page = html(&report, 0);
        assert!(!page.contains("{{"), "a placeholder was left: {page}");
        assert!(page.starts_with("<!DOCTYPE html>"));
    }

    #[test]
    fn table_cells_cannot_drive_the_terminal() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\u{202e}y\n"), "x\\u{202e}y\\u{a}");
        let t = aligned(&[vec!["K".into()], vec!["\u{1b}]0;owned\u{7}".into()]]);
        assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t:?}");
    }
}
