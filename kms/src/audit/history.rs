//! The whole history, offline: archive segments and the live log's export together.
//!
//! Retention removes the oldest records from the store only once they are in a segment
//! (docs/audit.md). An auditor proves the whole history with the segments and an export of
//! the live log: every segment verifies alone (chain, checkpoints, seal, the trusted key),
//! the segments follow each other from record 1 with no gap, each links to the one before
//! (its first record names the previous segment's last hash), the live export starts right
//! after the last segment and links to it, and every removal the chain records
//! (`ArchiveSegment`) names a segment that is there, with the same range and last hash:
//! nothing was removed unarchived.

use std::collections::BTreeMap;

use super::verify::{ExportError, ExportSummary, ExportVerdict, verify_export};
use super::{ArchivedRange, AuditRecord, GENESIS};

/// What the whole history verified to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The segments, in order: (file name, first, last).
    pub segments: Vec<(String, u64, u64)>,
    /// The live export's summary.
    pub live: ExportSummary,
    /// Whether a signature covers the live export's last record (its seal or a
    /// checkpoint): without it, a cut tail of the live log would not show.
    pub anchored: bool,
}

/// Why the history does not verify. Each names the file and the sequence numbers at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryBreak {
    /// A file is not an export, or is filtered.
    #[error("{file}: {error}")]
    Unreadable {
        /// The file.
        file: String,
        /// Why.
        error: ExportError,
    },
    /// A segment (or the live export) does not verify alone.
    #[error("{file}: {why}")]
    Broken {
        /// The file.
        file: String,
        /// What its verification said.
        why: String,
    },
    /// Records missing between two segments, or between the last one and the live log.
    #[error("records {from} to {to} are in no segment and not in the live log ({file} starts at {to_next})", to_next = to + 1)]
    Gap {
        /// The first missing record.
        from: u64,
        /// The last missing record.
        to: u64,
        /// The file that starts after the gap.
        file: String,
    },
    /// A segment (or the live export) does not link to the one before: its first record
    /// names another predecessor.
    #[error(
        "{file} does not follow the segment before it: its first record links to another chain"
    )]
    DoesNotLink {
        /// The file.
        file: String,
    },
    /// The chain records a removal whose segment is not there (or is another one).
    #[error("records {} to {} were removed from the store (archived as {}), and no segment here holds them with that last hash", .0.first_seq, .0.last_seq, .0.file)]
    Unarchived(ArchivedRange),
}

/// Verifies archive segments (`(file name, text)`, in any order) and the live log's export
/// together. `trusted`: a fingerprint or hex public key every file must be signed by.
pub fn verify_history(
    segments: &[(String, String)],
    live: (&str, &str),
    trusted: Option<&str>,
) -> Result<History, HistoryBreak> {
    let mut checked = Vec::new();
    for (file, text) in segments {
        let summary = match verify_one(file, text, trusted)? {
            (s, true) => s,
            (_, false) => {
                return Err(HistoryBreak::Broken {
                    file: file.clone(),
                    why: "NOT ANCHORED: no valid seal covers its last record".to_owned(),
                });
            }
        };
        checked.push((file.clone(), summary, removals(text)));
    }
    checked.sort_by_key(|(_, s, _)| s.first);
    let (live_file, live_text) = live;
    let (live_summary, anchored) = verify_one(live_file, live_text, trusted)?;
    // The chain from record 1: each part follows and links to the one before.
    let mut next = 1;
    let mut link = GENESIS.to_owned();
    let mut holds: BTreeMap<u64, (u64, String, String)> = BTreeMap::new();
    let live_name = live_file.to_owned();
    let mut parts: Vec<(&String, &ExportSummary)> =
        checked.iter().map(|(f, s, _)| (f, s)).collect();
    if !live_summary.is_empty() {
        parts.push((&live_name, &live_summary));
    }
    for (file, s) in parts {
        if s.first > next {
            return Err(HistoryBreak::Gap {
                from: next,
                to: s.first - 1,
                file: file.clone(),
            });
        }
        if s.first < next || s.start_hash != link {
            return Err(HistoryBreak::DoesNotLink { file: file.clone() });
        }
        holds.insert(
            s.first,
            (
                s.verified.head.seq,
                s.verified.head.hash.clone(),
                file.clone(),
            ),
        );
        next = s.verified.head.seq + 1;
        link.clone_from(&s.verified.head.hash);
    }
    // Every removal the chain records names a segment that is here.
    let recorded = checked
        .iter()
        .flat_map(|(_, _, r)| r.iter().cloned())
        .chain(removals(live_text));
    for r in recorded {
        let here = holds.get(&r.first_seq).is_some_and(|(last, hash, file)| {
            *last == r.last_seq && *hash == r.last_hash && *file == r.file
        });
        if !here {
            return Err(HistoryBreak::Unarchived(r));
        }
    }
    Ok(History {
        segments: checked
            .iter()
            .map(|(f, s, _)| (f.clone(), s.first, s.verified.head.seq))
            .collect(),
        live: live_summary,
        anchored,
    })
}

/// One file verified alone: its summary and whether it is anchored.
fn verify_one(
    file: &str,
    text: &str,
    trusted: Option<&str>,
) -> Result<(ExportSummary, bool), HistoryBreak> {
    let broken = |why: String| HistoryBreak::Broken {
        file: file.to_owned(),
        why,
    };
    match verify_export(text, trusted) {
        Err(error) => Err(HistoryBreak::Unreadable {
            file: file.to_owned(),
            error,
        }),
        Ok(ExportVerdict::Anchored(s)) => Ok((s, true)),
        Ok(ExportVerdict::NotAnchored(s)) => Ok((s, false)),
        Ok(ExportVerdict::KeyMismatch { found, trusted }) => Err(broken(format!(
            "signed by {}, not by the key you trust ({trusted})",
            found.as_deref().unwrap_or("no key")
        ))),
        Ok(ExportVerdict::Broken(e)) => Err(broken(e.to_string())),
    }
}

/// The removals (`ArchiveSegment` records) in an export's records.
fn removals(text: &str) -> Vec<ArchivedRange> {
    text.lines()
        .filter(|l| l.contains("\"archived\""))
        .filter_map(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .filter_map(|r| r.event.archived)
        .collect()
}
