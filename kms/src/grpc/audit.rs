//! `kms.v1.Audit`: export, key-usage report, verification. Each call is itself audited
//! before it answers (an export: before its first line).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use kms_proto::v1 as pb;

use crate::wire::{SINCE_BEFORE_UNTIL, filter_from, key_pb, report_pb};
use tonic::{Request, Response, Status};

use super::run;
use crate::audit::report::{
    EXPORT_FORMAT, ExportHeader, ExportRange, Filter, KeyInfo, UsageBuilder,
};
use crate::audit::verify::{ChainBreak, signed_by, verify_from};
use crate::audit::{AuditLog, Checkpoint, fingerprint};
use crate::keyring::KeyringError;
use crate::service::{Call, Op, Served, Service, ServiceError};

/// Lines per streamed chunk.
const CHUNK: usize = 256;

/// The `kms.v1.Audit` service.
#[derive(Debug, Clone)]
pub(crate) struct AuditService {
    ctx: Service,
}

impl AuditService {
    /// A service over the audit log (and the seal, for the keyring and the public key).
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op) -> Call {
        super::call(&self.ctx, req, op)
    }
}

fn reason_name(b: ChainBreak) -> &'static str {
    match b {
        ChainBreak::Altered => "altered",
        ChainBreak::Missing => "missing",
        ChainBreak::Inserted => "inserted",
        ChainBreak::OutOfOrder => "out_of_order",
        ChainBreak::Rewritten { .. } => "rewritten",
        ChainBreak::CheckpointSignature => "checkpoint_signature",
        ChainBreak::Truncated => "truncated",
        ChainBreak::SealMismatch => "seal_mismatch",
    }
}

type ExportStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportAuditLogChunk, Status>> + Send>>;
type ReportStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::KeyUsageReportResponse, Status>> + Send>>;

/// The most bytes of repeated fields in one streamed part of the report or the export
/// (well under gRPC's usual 4 MiB limit on a message, whatever the log holds).
const PART_BYTES: usize = 1024 * 1024;

/// Splits a report into parts of at most about [`PART_BYTES`]: the first holds the scalar
/// fields, each holds some of the repeated ones, in order. Merging the parts (protobuf merge:
/// repeated fields append) gives the report back.
fn report_parts(
    mut full: pb::KeyUsageReportResponse,
    limit: usize,
) -> Vec<pb::KeyUsageReportResponse> {
    use prost::Message as _;
    let keys = std::mem::take(&mut full.keys);
    let rows = std::mem::take(&mut full.rows);
    let refused = std::mem::take(&mut full.refused);
    let unused = std::mem::take(&mut full.unused);
    let below = std::mem::take(&mut full.decrypt_below_primary);
    let timeline = std::mem::take(&mut full.timeline);
    let custody = std::mem::take(&mut full.custody);
    let secret_reads = std::mem::take(&mut full.secret_reads);
    let credentials = std::mem::take(&mut full.credentials);
    let database_credentials = std::mem::take(&mut full.database_credentials);
    let orphan_logins = std::mem::take(&mut full.orphan_logins);
    let mut parts = Vec::new();
    let mut size = full.encoded_len();
    let mut current = full;
    // Starts a new part if `item_len` more bytes would not fit in this one (an item larger
    // than the limit gets a part of its own).
    let mut room = |current: &mut pb::KeyUsageReportResponse, size: &mut usize, item_len: usize| {
        let needed = item_len + 8;
        if *size + needed > limit && *size > 0 {
            parts.push(std::mem::take(current));
            *size = 0;
        }
        *size += needed;
    };
    for k in keys {
        room(&mut current, &mut size, k.encoded_len());
        current.keys.push(k);
    }
    for u in rows {
        room(&mut current, &mut size, u.encoded_len());
        current.rows.push(u);
    }
    for r in refused {
        room(&mut current, &mut size, r.encoded_len());
        current.refused.push(r);
    }
    for v in unused {
        room(&mut current, &mut size, v.encoded_len());
        current.unused.push(v);
    }
    for v in below {
        room(&mut current, &mut size, v.encoded_len());
        current.decrypt_below_primary.push(v);
    }
    for b in timeline {
        room(&mut current, &mut size, b.encoded_len());
        current.timeline.push(b);
    }
    for c in custody {
        room(&mut current, &mut size, c.encoded_len());
        current.custody.push(c);
    }
    for s in secret_reads {
        room(&mut current, &mut size, s.encoded_len());
        current.secret_reads.push(s);
    }
    for c in credentials {
        room(&mut current, &mut size, c.encoded_len());
        current.credentials.push(c);
    }
    for d in database_credentials {
        room(&mut current, &mut size, d.encoded_len());
        current.database_credentials.push(d);
    }
    for o in orphan_logins {
        room(&mut current, &mut size, o.encoded_len());
        current.orphan_logins.push(o);
    }
    parts.push(current);
    parts
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    type ExportAuditLogStream = ExportStream;
    type KeyUsageReportStream = ReportStream;

    async fn export_audit_log(
        &self,
        request: Request<pb::ExportAuditLogRequest>,
    ) -> Result<Response<Self::ExportAuditLogStream>, Status> {
        // The record names no key even when the export is filtered by one: reading the
        // log is not a use of the key.
        let call = self.call(&request, Op::ExportAuditLog);
        let requested = request.into_inner().filter;
        let filter = filter_from(requested.clone());
        // The export's own record, durable before the first line.
        let checked = filter.as_ref().map(|_| ()).map_err(|e| match e {
            KeyringError::BadRequest(m) => KeyringError::BadRequest(m),
            _ => KeyringError::BadRequest(SINCE_BEFORE_UNTIL),
        });
        run(call, move |_| {
            checked?;
            Ok(Served::new(()))
        })
        .await?;
        let filter = filter.map_err(|e| {
            super::status(
                tonic::Code::InvalidArgument,
                "INVALID_FILTER",
                e.to_string(),
            )
        })?;
        let log = self.ctx.audit.clone();
        let public_key = self.ctx.seal.audit_public_key();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let result = export(&log, public_key, &filter, &tx);
            if let Err(e) = result {
                tracing::error!(error = %crate::error_chain(&e), "audit export failed");
                let _ = tx.blocking_send(Err(super::status(
                    tonic::Code::Unavailable,
                    "AUDIT_UNAVAILABLE",
                    "the audit log could not be read",
                )));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn key_usage_report(
        &self,
        request: Request<pb::KeyUsageReportRequest>,
    ) -> Result<Response<Self::KeyUsageReportStream>, Status> {
        let call = self.call(&request, Op::KeyUsageReport);
        let r = request.into_inner();
        let seal = Arc::clone(&self.ctx.seal);
        let log = self.ctx.audit.clone();
        let report = run(call, move |_| {
            let filter = filter_from(Some(pb::AuditFilter {
                since_unix_ms: r.since_unix_ms,
                until_unix_ms: r.until_unix_ms,
                key: r.key,
                principal: r.principal,
                ..pb::AuditFilter::default()
            }))?;
            let keyring = seal.keyring()?;
            let keys: Vec<KeyInfo> = keyring
                .all_keys()?
                .into_iter()
                .map(|m| {
                    // The states as the API names them (ENABLED, ...).
                    let key = key_pb(&m);
                    KeyInfo {
                        versions: key
                            .versions
                            .iter()
                            .map(|v| (v.version, v.state().as_str_name().to_owned()))
                            .collect(),
                        name: key.name,
                        primary: key.primary_version,
                    }
                })
                .collect();
            let mut builder = UsageBuilder::new(filter);
            let upto = log
                .stored_head()
                .map_err(|_| KeyringError::AuditUnavailable)?
                .seq;
            log.each_record(upto, |_, r| {
                builder.add(&r.event);
                true
            })
            .map_err(ServiceError::AuditRead)?;
            Ok(Served::new(report_pb(builder.finish(&keys))))
        })
        .await?;
        // Recorded (with the whole report's size) before the first part leaves.
        let (metadata, report, extensions) = report.into_parts();
        let parts = report_parts(report, PART_BYTES).into_iter().map(Ok);
        let mut response: Response<Self::KeyUsageReportStream> =
            Response::new(Box::pin(tokio_stream::iter(parts)));
        *response.metadata_mut() = metadata;
        *response.extensions_mut() = extensions;
        Ok(response)
    }

    async fn verify_audit_log(
        &self,
        request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let call = self.call(&request, Op::VerifyAuditLog);
        let seal = Arc::clone(&self.ctx.seal);
        let log = self.ctx.audit.clone();
        run(call, move |_| {
            let public_key = seal.audit_public_key();
            // A checkpoint signed now, by the HSM, must verify under the stored public key:
            // a public key swapped on disk (with checkpoints re-signed to match) shows here.
            let fresh = log.checkpoint().and_then(Result::ok);
            let records = log.all_records().map_err(ServiceError::AuditRead)?;
            let cps = log.checkpoints().map_err(ServiceError::AuditRead)?;
            // Records archived by retention left the store: the chain is walked from the
            // end of the archived prefix, as the store noted it with their removal.
            let start = log.archived().map_err(ServiceError::AuditRead)?;
            let archived = start.seq;
            let mut response = pb::VerifyAuditLogResponse {
                checkpoint_key_fingerprint: public_key
                    .as_deref()
                    .map(fingerprint)
                    .unwrap_or_default(),
                ..pb::VerifyAuditLogResponse::default()
            };
            if let (Some(c), Some(pk)) = (&fresh, &public_key)
                && !signed_by(c, pk)
            {
                response.reason = "key_mismatch".into();
                response.first_bad_seq = c.checkpoint;
                response.message =
                    "the stored audit public key is not the HSM signing key's: the seal record was altered".into();
                return Ok(Served::new(response));
            }
            match verify_from(start, &records, &cps, public_key.as_deref()) {
                Ok(v) => {
                    response.intact = true;
                    response.records = v.records;
                    response.checkpoints = v.checkpoints;
                    response.last_checkpoint_seq = v.last_checkpoint.unwrap_or(0);
                    response.message = format!(
                        "intact: {} records, {} checkpoint(s) verified",
                        v.records, v.checkpoints
                    );
                    if archived > 0 {
                        response.message.push_str(&format!(
                            " (records 1 to {archived} are archived: verify them with the live log, `kms audit verify --export LIVE --archive DIR`)"
                        ));
                    }
                }
                Err(e) => {
                    response.records = records.len() as u64;
                    response.first_bad_seq = e.seq;
                    response.reason = reason_name(e.reason).into();
                    response.message = e.to_string();
                }
            }
            Ok(Served::new(response))
        })
        .await
    }
}

/// Streams the export: header, then records (and, for a contiguous export, checkpoints).
fn export(
    log: &AuditLog,
    public_key: Option<Vec<u8>>,
    filter: &Filter,
    tx: &tokio::sync::mpsc::Sender<Result<pb::ExportAuditLogChunk, Status>>,
) -> Result<(), ServiceError> {
    let (header, upto, cps) = begin_export(log, public_key, filter)?;
    let contiguous = header.contiguous;
    let mut lines = vec![serde_json::to_string(&header).unwrap_or_default()];
    let mut bytes_held = 0;
    let mut open = true;
    let mut flush = |lines: &mut Vec<String>| {
        if !lines.is_empty() {
            let chunk = pb::ExportAuditLogChunk {
                lines: std::mem::take(lines),
            };
            open = tx.blocking_send(Ok(chunk)).is_ok();
        }
        open
    };
    let mut range = ExportRange {
        format: EXPORT_FORMAT.to_owned(),
        exported_at_ms: header.exported_at_ms,
        filter: filter.clone(),
        contiguous,
        records: 0,
        first_seq: None,
        last_seq: None,
        last_hash: None,
        key_fingerprint: String::new(),
    };
    log.each_record(upto, |bytes, r| {
        if filter.matches(&r.event) || r.seq == 0 {
            range.records += 1;
            range.first_seq.get_or_insert(r.seq);
            range.last_seq = Some(r.seq);
            range.last_hash = Some(r.hash.clone());
            bytes_held += bytes.len();
            lines.push(String::from_utf8_lossy(bytes).into_owned());
            if let Some(c) = cps.get(&r.seq)
                && let Ok(line) = serde_json::to_string(c)
            {
                lines.push(line);
            }
        }
        if lines.len() < CHUNK && bytes_held < PART_BYTES {
            return true;
        }
        bytes_held = 0;
        flush(&mut lines)
    })
    .map_err(ServiceError::AuditRead)?;
    // The seal: exactly these records, signed by the HSM key, as the last line.
    lines.extend(seal_line(log, range));
    flush(&mut lines);
    Ok(())
}

/// The export's header, the sequence number it ends at, and (for a contiguous export) the
/// checkpoints to interleave, by the record they cover.
fn begin_export(
    log: &AuditLog,
    public_key: Option<Vec<u8>>,
    filter: &Filter,
) -> Result<(ExportHeader, u64, BTreeMap<u64, Checkpoint>), ServiceError> {
    // Sign a checkpoint over the head (which includes this export's record) so that the
    // export ends with one; it covers exactly the records exported.
    let fresh = log.checkpoint().and_then(Result::ok);
    let upto = match &fresh {
        Some(c) => c.checkpoint,
        None => {
            log.stored_head()
                .map_err(|_| ServiceError::Keyring(KeyringError::AuditUnavailable))?
                .seq
        }
    };
    let contiguous = filter.is_contiguous();
    let cps: BTreeMap<u64, Checkpoint> = if contiguous {
        log.checkpoints()
            .map_err(ServiceError::AuditRead)?
            .into_iter()
            .map(|c| (c.checkpoint, c))
            .collect()
    } else {
        Default::default()
    };
    let header = ExportHeader {
        format: EXPORT_FORMAT.to_owned(),
        exported_at_ms: crate::audit::now_ms(),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        checkpoint_public_key: public_key
            .as_deref()
            .map(|p| data_encoding::HEXLOWER.encode(p)),
        checkpoint_key_fingerprint: public_key.as_deref().map(fingerprint),
        filter: filter.clone(),
        contiguous,
        last_seq: (contiguous && filter.until_ms.is_none()).then_some(upto),
    };
    Ok((header, upto, cps))
}

/// The export's last line: its seal, signed in the HSM. `None` (logged) when the audit
/// key is not available or signing failed: the export then verifies as not anchored.
fn seal_line(log: &AuditLog, range: ExportRange) -> Option<String> {
    match log.signer().seal_export(range) {
        Some(Ok(seal)) => Some(serde_json::to_string(&seal).unwrap_or_default()),
        Some(Err(e)) => {
            tracing::error!(error = %crate::error_chain(&e), "audit export not sealed: offline verification will say it is not anchored");
            None
        }
        None => {
            tracing::warn!(
                "audit export not sealed: the audit key is not available (the PIN is in the shares and the server is sealed)"
            );
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn report_parts_are_bounded_and_merge_back_to_the_report() {
        let row = |i: u32| pb::UsageRow {
            key: format!("key-{i}"),
            version: 1,
            principal: format!("spiffe://corp/app-{i}"),
            operation: "Encrypt".into(),
            outcome: "OK".into(),
            count: u64::from(i),
            first_unix_ms: 1,
            last_unix_ms: 2,
        };
        let full = pb::KeyUsageReportResponse {
            since_unix_ms: 5,
            records: 77,
            rows: (0..5000).map(row).collect(),
            keys: (0..500)
                .map(|i| pb::KeySummary {
                    key: format!("key-{i}"),
                    ok: 3,
                    ..Default::default()
                })
                .collect(),
            refused: (0..500)
                .map(|i| pb::RefusedCalls {
                    principal: format!("p{i}"),
                    operation: "Decrypt".into(),
                    outcome: "PERMISSION_DENIED".into(),
                    count: 1,
                    ..Default::default()
                })
                .collect(),
            key: "key-1".into(),
            unused: (0..300)
                .map(|i| pb::VersionRef {
                    key: format!("k{i}"),
                    version: 2,
                    state: "ENABLED".into(),
                    count: 0,
                })
                .collect(),
            timeline: (0..2000)
                .map(|i| pb::UsageBucket {
                    start_unix_ms: i,
                    key: "k".into(),
                    ok: 1,
                    refused: 2,
                })
                .collect(),
            secret_reads: (0..2000)
                .map(|i| pb::SecretReadRow {
                    path: format!("app/db-{i}"),
                    version: 1,
                    principal: "spiffe://corp/app".into(),
                    count: 1,
                    ..Default::default()
                })
                .collect(),
            credentials: (0..2000)
                .map(|i| pb::CredentialRow {
                    issuer: "workloads".into(),
                    kind: "jwt".into(),
                    subject: format!("spiffe://corp/app-{i}"),
                    key_version: 1,
                    outcome: "OK".into(),
                    count: 1,
                    ..Default::default()
                })
                .collect(),
            database_credentials: (0..2000)
                .map(|i| pb::DatabaseCredentialRow {
                    connection: "main".into(),
                    role: "readonly".into(),
                    principal: format!("spiffe://corp/app-{i}"),
                    issued: 3,
                    refused: vec![pb::OutcomeCount {
                        outcome: "PERMISSION_DENIED".into(),
                        count: 1,
                    }],
                    last_error: "x".repeat(40),
                    count: 4,
                    ..Default::default()
                })
                .collect(),
            orphan_logins: (0..2000)
                .map(|i| pb::OrphanLoginRow {
                    connection: format!("db-{i}"),
                    role: "readonly".into(),
                    count: 1,
                    ..Default::default()
                })
                .collect(),
            bucket_ms: 60_000,
            generated_unix_ms: 9,
            ..Default::default()
        };
        let limit = 64 * 1024;
        let parts = report_parts(full.clone(), limit);
        assert!(parts.len() > 5, "{}", parts.len());
        let mut merged = pb::KeyUsageReportResponse::default();
        for p in &parts {
            assert!(p.encoded_len() <= limit, "{}", p.encoded_len());
            merged.merge(p.encode_to_vec().as_slice()).unwrap();
        }
        assert_eq!(merged, full);
        // A small report is one part.
        let small = pb::KeyUsageReportResponse {
            records: 1,
            ..Default::default()
        };
        assert_eq!(report_parts(small.clone(), limit), vec![small]);
    }
}
