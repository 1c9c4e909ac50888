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
use crate::report::{ReportFormat, report};
use kms::audit::AuditRecord;
use kms::audit::history::{HistoryBreak, verify_history};
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
    /// Key-usage report: a summary per key; calls per key, version, principal, operation
    /// and outcome, each with its own first and last call; refused calls by principal;
    /// unused versions; versions below the primary still decrypting; a timeline.
    Report {
        /// From this time (RFC 3339), inclusive.
        #[arg(long, conflicts_with = "period")]
        since: Option<String>,
        /// Up to this time (RFC 3339), exclusive.
        #[arg(long)]
        until: Option<String>,
        /// The last PERIOD up to now (e.g. 30d, 12h): instead of --since.
        #[arg(long, value_parser = humantime::parse_duration)]
        period: Option<Duration>,
        /// Only calls naming this key.
        #[arg(long)]
        key: Option<String>,
        /// Only calls of this principal.
        #[arg(long)]
        principal: Option<String>,
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
        /// Offline, with --export of the live log: the archive directory of `[audit]`
        /// retention. Verifies every segment, that they and the live log follow each other
        /// from record 1, and that every removal the chain records has its segment here.
        #[arg(long, requires = "export")]
        archive: Option<PathBuf>,
    },
}

/// The largest message the audit client accepts: parts are about 1 MiB, but a record
/// stored before names were bounded can be larger, and an export must still carry it.
const MAX_AUDIT_MESSAGE: usize = 64 * 1024 * 1024;

pub(crate) fn audit_client(channel: Channel) -> AuditClient<Channel> {
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

pub(crate) fn output(out: &Option<PathBuf>) -> Result<Box<dyn Write>, BoxError> {
    Ok(match out {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufWriter::new(
            crate::create_private(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
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
            period,
            key,
            principal,
            format,
            out,
        } => {
            let since_unix_ms = match period {
                Some(p) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    let from = now.checked_sub(p).unwrap_or_default();
                    u64::try_from(from.as_millis()).unwrap_or(u64::MAX).max(1)
                }
                None => ms(&since, "since")?,
            };
            let request = pb::KeyUsageReportRequest {
                since_unix_ms,
                until_unix_ms: ms(&until, "until")?,
                key: key.unwrap_or_default(),
                principal: principal.unwrap_or_default(),
            };
            report(connect().await?, request, format, &out).await
        }
        AuditCommand::Verify {
            export: Some(path),
            public_key,
            archive: Some(dir),
        } => verify_history_offline(&path, &dir, public_key.as_deref()),
        AuditCommand::Verify {
            export: Some(path),
            public_key,
            archive: None,
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

/// `kms audit verify --export LIVE --archive DIR`: the whole history (the library's
/// [`verify_history`]). Exit 0 intact and anchored, [`NOT_ANCHORED`] when nothing signed
/// covers the live log's last record, [`NOT_INTACT`] otherwise; 1 when a file is unreadable.
fn verify_history_offline(
    live: &Path,
    dir: &Path,
    trusted: Option<&str>,
) -> Result<ExitCode, BoxError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let mut segments = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("audit-") && name.ends_with(".jsonl") {
            segments.push((name, read(&path)?));
        }
    }
    let live_text = read(live)?;
    let live_name = live.display().to_string();
    match verify_history(&segments, (&live_name, &live_text), trusted) {
        Ok(h) => {
            let last = h.live.verified.head.seq;
            let archived = h.segments.last().map_or(0, |(_, _, l)| *l);
            let text = format!(
                "records 1 to {last}: {} in {} archive segment(s), {} in the live log, every removal archived",
                archived,
                h.segments.len(),
                h.live.verified.records
            );
            if h.anchored {
                println!("intact: {text}");
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "NOT ANCHORED: {text}; but no signature covers the live log's last record: a cut tail would not show"
                );
                Ok(ExitCode::from(NOT_ANCHORED))
            }
        }
        Err(HistoryBreak::Unreadable { file, error }) => Err(format!("{file}: {error}").into()),
        Err(e) => {
            println!("NOT INTACT: {e}");
            Ok(ExitCode::from(NOT_INTACT))
        }
    }
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

pub(crate) fn write_csv(
    w: &mut dyn Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> Result<(), BoxError> {
    let mut c = csv::Writer::from_writer(w);
    c.write_record(header)?;
    for row in rows {
        c.write_record(row.iter().map(|cell| csv_cell(cell).into_owned()))?;
    }
    c.flush()?;
    Ok(())
}

pub(crate) fn aligned(rows: &[Vec<String>]) -> String {
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

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
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
    fn table_cells_cannot_drive_the_terminal() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\u{202e}y\n"), "x\\u{202e}y\\u{a}");
        let t = aligned(&[vec!["K".into()], vec!["\u{1b}]0;owned\u{7}".into()]]);
        assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t:?}");
    }
}
