//! Retention: the oldest records leave the store for archive segments, never unarchived.
//!
//! A segment is a file in the archive directory, `audit-FIRST-LAST.jsonl` (sequence numbers,
//! zero-padded): an export of exactly those records (header, records verbatim, the
//! checkpoints that cover them, and last a seal signed in the HSM over exactly what it
//! holds), so `kms audit verify --export` checks one alone and `--archive` checks all of them
//! with the live log. Archiving one segment:
//!
//! 1. the file is written beside its final name, synced, renamed, and the directory synced;
//! 2. `archive_command`, if configured, is run with the file's path and must exit 0 (it
//!    ships the segment elsewhere);
//! 3. only then are the records (and their checkpoints) removed from the store, in the same
//!    transaction as a record of the removal (`kms.Audit/ArchiveSegment`, naming the
//!    segment's range, last hash and file) and the store's note of where the archived
//!    prefix ends.
//!
//! A crash between 1 and 3 leaves the records in the store and a segment file that the
//! next run writes again (same name, same records). Nothing is archived unsigned: without
//! the HSM audit key (a server whose PIN is in the shares, sealed), retention waits.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::report::{EXPORT_FORMAT, ExportHeader, ExportRange, Filter};
use super::{
    ArchivedRange, AuditEvent, AuditLog, Checkpoint, Head, SYSTEM_PRINCIPAL, fingerprint, now_ms,
    record_key,
};
use crate::store::{Removal, StoreError, Write};

/// Where the store notes the end of the archived prefix (a [`Head`] as JSON).
const ARCHIVED_KEY: &str = "audit_archived";

/// `[audit]` retention: which records leave the store, and where they go.
#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    /// Records older than this are archived.
    pub max_age: Option<Duration>,
    /// At most this many records stay in the store; older ones are archived.
    pub max_records: Option<u64>,
    /// Records per segment.
    pub segment_records: u64,
    /// Where segments are written.
    pub archive_dir: PathBuf,
    /// A program (and its arguments) run with each segment's path appended; it must exit 0
    /// before the segment's records are removed.
    pub command: Option<Vec<String>>,
    /// How often retention runs.
    pub check_every: Duration,
}

/// Why a segment was not archived (its records stay in the store).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// The store could not be read or written.
    #[error("the audit store")]
    Store(#[from] StoreError),
    /// The segment file could not be written.
    #[error("cannot write the archive segment {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The archive command failed or could not run.
    #[error("the archive command failed for {path}: {why}")]
    Command {
        /// The segment it was given.
        path: PathBuf,
        /// Its exit status or the error starting it.
        why: String,
    },
    /// The HSM audit key is not available to seal the segment.
    #[error(
        "the audit key is not available to seal the segment (the server is sealed and its PIN is in the shares)"
    )]
    Unsigned,
    /// The seal could not be signed, or the record of the removal written.
    #[error("the audit log")]
    Audit(#[from] super::AuditError),
}

impl AuditLog {
    /// Where the archived prefix ends (genesis when nothing was archived): the live log's
    /// first record links to it.
    pub(crate) fn archived(&self) -> Result<Head, StoreError> {
        Ok(self
            .store
            .get(crate::store::SYSTEM, ARCHIVED_KEY)?
            .and_then(|b| serde_json::from_slice::<ArchivedHead>(&b).ok())
            .map_or_else(Head::genesis, |a| Head {
                seq: a.seq,
                hash: a.hash,
            }))
    }

    /// Archives every full segment that `policy` says has left the retention window (and
    /// a last, partial one once its oldest record is a day past the window), at most
    /// `max_segments` per call. Returns the segments archived. Blocking.
    pub fn archive_due(
        &self,
        policy: &RetentionPolicy,
        max_segments: usize,
    ) -> Result<Vec<ArchivedRange>, ArchiveError> {
        let mut done = Vec::new();
        while done.len() < max_segments {
            let Some((first, last)) = self.next_segment(policy, now_ms())? else {
                break;
            };
            done.push(self.archive_segment(policy, first, last)?);
        }
        Ok(done)
    }

    /// The next segment to archive, if one is due: from the first stored record.
    fn next_segment(
        &self,
        policy: &RetentionPolicy,
        now: u64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(first) = self.first_stored()? else {
            return Ok(None);
        };
        let Ok(head) = self.stored_head() else {
            return Ok(None);
        };
        let head = head.seq;
        let by_count = policy
            .max_records
            .map_or(0, |keep| head.saturating_sub(keep));
        let cutoff = policy
            .max_age
            .map(|age| now.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)));
        let full_end = first.saturating_add(policy.segment_records - 1);
        // The last record older than the cutoff, looking no further than one segment.
        let mut by_age = 0;
        let mut oldest = None;
        if let Some(cutoff) = cutoff {
            self.each_record_from(first, full_end, |_, r| {
                oldest.get_or_insert(r.event.time_ms);
                if r.event.time_ms < cutoff {
                    by_age = r.seq;
                    true
                } else {
                    false
                }
            })?;
        }
        let due = by_count.max(by_age);
        if due < first {
            return Ok(None);
        }
        if due >= full_end {
            return Ok(Some((first, full_end)));
        }
        // A partial segment: only by age, and only once it has waited a day (so a quiet
        // server archives daily rather than a few records every check).
        let waited = cutoff.zip(oldest).is_some_and(|(c, o)| o + DAY_MS < c);
        Ok((by_age >= first && waited).then_some((first, by_age)))
    }

    /// The first record still in the store.
    fn first_stored(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .store
            .range(crate::audit::AUDIT, "", 1)?
            .first()
            .and_then(|(k, _)| k.parse().ok()))
    }

    /// Writes records `first..=last` to their segment, runs the archive command, then
    /// removes them with the record of their removal.
    fn archive_segment(
        &self,
        policy: &RetentionPolicy,
        first: u64,
        last: u64,
    ) -> Result<ArchivedRange, ArchiveError> {
        let file = format!("audit-{first:020}-{last:020}.jsonl");
        let path = policy.archive_dir.join(&file);
        let (text, last_hash) = self.segment_text(first, last)?;
        write_synced(&path, text.as_bytes()).map_err(|source| ArchiveError::File {
            path: path.clone(),
            source,
        })?;
        if let Some(command) = &policy.command {
            run_command(command, &path)?;
        }
        let range = ArchivedRange {
            first_seq: first,
            last_seq: last,
            last_hash: last_hash.clone(),
            file,
        };
        let event = AuditEvent {
            key: None,
            archived: Some(range.clone()),
            ..AuditEvent::internal(SYSTEM_PRINCIPAL, "kms.Audit", "ArchiveSegment")
        };
        let note = serde_json::to_vec(&ArchivedHead {
            seq: last,
            hash: last_hash,
        })
        .map_err(|_| super::AuditError::Internal("encode"))?;
        self.append_removing(
            event,
            vec![Write {
                table: crate::store::SYSTEM,
                key: ARCHIVED_KEY.to_owned(),
                value: note,
            }],
            vec![
                Removal {
                    table: crate::audit::AUDIT,
                    from: record_key(first),
                    to: record_key(last),
                },
                Removal {
                    table: crate::audit::AUDIT_CHECKPOINTS,
                    from: String::new(),
                    to: record_key(last),
                },
            ],
        )?;
        crate::metrics::metrics()
            .audit_archived_records
            .inc_by(last - first + 1);
        tracing::info!(first, last, file = %range.file, "audit records archived and removed from the store");
        Ok(range)
    }

    /// The segment's lines (an export of exactly `first..=last`, sealed) and its last hash.
    fn segment_text(&self, first: u64, last: u64) -> Result<(String, String), ArchiveError> {
        let public_key = self.signer.public_key().ok_or(ArchiveError::Unsigned)?;
        let checkpoints: std::collections::BTreeMap<u64, Checkpoint> = self
            .checkpoints()?
            .into_iter()
            .filter(|c| (first..=last).contains(&c.checkpoint))
            .map(|c| (c.checkpoint, c))
            .collect();
        let exported_at_ms = now_ms();
        let header = ExportHeader {
            format: EXPORT_FORMAT.to_owned(),
            exported_at_ms,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            checkpoint_public_key: Some(data_encoding::HEXLOWER.encode(&public_key)),
            checkpoint_key_fingerprint: Some(fingerprint(&public_key)),
            filter: Filter::default(),
            contiguous: true,
            last_seq: Some(last),
        };
        let mut text = serde_json::to_string(&header).unwrap_or_default();
        text.push('\n');
        let mut count = 0;
        let mut last_hash = String::new();
        self.each_record_from(first, last, |bytes, r| {
            text.push_str(&String::from_utf8_lossy(bytes));
            text.push('\n');
            if let Some(c) = checkpoints.get(&r.seq)
                && let Ok(line) = serde_json::to_string(c)
            {
                text.push_str(&line);
                text.push('\n');
            }
            count += 1;
            last_hash.clone_from(&r.hash);
            true
        })?;
        if count != last - first + 1 {
            return Err(super::AuditError::Internal(
                "a record to archive is missing from the store",
            )
            .into());
        }
        let seal = self
            .signer
            .seal_export(ExportRange {
                format: EXPORT_FORMAT.to_owned(),
                exported_at_ms,
                filter: Filter::default(),
                contiguous: true,
                records: count,
                first_seq: Some(first),
                last_seq: Some(last),
                last_hash: Some(last_hash.clone()),
                key_fingerprint: String::new(),
            })
            .ok_or(ArchiveError::Unsigned)??;
        text.push_str(&serde_json::to_string(&seal).unwrap_or_default());
        text.push('\n');
        Ok((text, last_hash))
    }
}

/// A day in milliseconds.
const DAY_MS: u64 = 86_400_000;

/// The store's note of where the archived prefix ends.
#[derive(serde::Serialize, serde::Deserialize)]
struct ArchivedHead {
    seq: u64,
    hash: String,
}

/// Writes `bytes` to `path` durably: a temporary file beside it (0600), synced, renamed
/// over `path`, and the directory synced.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Runs the archive command with the segment's path; it must exit 0.
fn run_command(command: &[String], path: &Path) -> Result<(), ArchiveError> {
    let fail = |why: String| ArchiveError::Command {
        path: path.to_owned(),
        why,
    };
    let (program, args) = command
        .split_first()
        .ok_or_else(|| fail("no program".to_owned()))?;
    let status = std::process::Command::new(program)
        .args(args)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(status.to_string()))
    }
}
