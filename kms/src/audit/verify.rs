//! Re-walking the chain and checking its checkpoints: the same code for the server's
//! `VerifyAuditLog` and for `kms audit verify --export FILE` (offline, no server, no HSM).

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::report::{EXPORT_FORMAT, ExportHeader, ExportSeal};
use super::{AuditRecord, Checkpoint, GENESIS, Head, fingerprint};

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at sequence {seq}: {reason}")]
pub struct ChainError {
    /// The first bad sequence number.
    pub seq: u64,
    /// Why.
    pub reason: ChainBreak,
}

/// The ways a chain breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// The record's bytes do not hash to its stored hash, or do not parse, or it was
    /// replaced by another.
    #[error("record altered")]
    Altered,
    /// A sequence number is missing.
    #[error("record missing")]
    Missing,
    /// A record that does not follow its predecessor: inserted, or a duplicate.
    #[error("record inserted")]
    Inserted,
    /// The record is in the log, but not in its place.
    #[error("records out of order")]
    OutOfOrder,
    /// The chain is self-consistent but a signed checkpoint does not match it: records from
    /// the named sequence up to this checkpoint were rewritten and re-hashed.
    #[error("records rewritten: checkpoint {checkpoint} does not match the chain")]
    Rewritten {
        /// The checkpoint that does not match.
        checkpoint: u64,
    },
    /// A checkpoint's signature does not verify under the audit public key.
    #[error("checkpoint signature invalid")]
    CheckpointSignature,
    /// A checkpoint or the export's seal covers records the log does not have: its tail
    /// was cut.
    #[error("log truncated")]
    Truncated,
    /// The export's signed seal does not match the records it holds (their number, range,
    /// last hash or filter), or lines follow it.
    #[error("the export's signed seal does not match its records")]
    SealMismatch,
}

/// What an intact chain showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The last record.
    pub head: Head,
    /// Records walked.
    pub records: u64,
    /// Checkpoints whose signature and head were checked.
    pub checkpoints: u64,
    /// The last checkpoint's sequence number.
    pub last_checkpoint: Option<u64>,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// Whether `c` is signed by `public_key` (raw Ed25519) and names its fingerprint.
pub fn signed_by(c: &Checkpoint, public_key: &[u8]) -> bool {
    check_signature(c, Some(public_key))
}

fn check_signature(c: &Checkpoint, public_key: Option<&[u8]>) -> bool {
    let Some(public_key) = public_key else {
        return false;
    };
    c.key_fingerprint == fingerprint(public_key)
        && ed25519_verify(
            public_key,
            &c.signature,
            &Checkpoint::message(c.checkpoint, &c.head, c.time_ms, &c.key_fingerprint),
        )
}

/// Why an export could not be verified at all (as opposed to found altered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The first line is not an export header.
    #[error("not a kms audit export ({EXPORT_FORMAT}): its first line is not the header")]
    NotAnExport,
    /// Filtered by more than time: not a piece of the chain.
    #[error(
        "this export was filtered by key, principal, operation or outcome: only an export filtered by time alone is a piece of the chain that can be verified"
    )]
    Filtered,
    /// The header's public key is not hex.
    #[error("the export's checkpoint public key is not hex")]
    BadPublicKey,
    /// `--public-key` is neither a fingerprint nor a public key.
    #[error(
        "--public-key is neither a fingerprint (32 hex digits) nor a hex public key (64 hex digits)"
    )]
    BadTrustedKey,
}

/// What the offline verification of an export found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportVerdict {
    /// The chain is intact and a signature covers its last record: the export's seal, or a
    /// checkpoint. Exit 0.
    Anchored(ExportSummary),
    /// The chain is consistent, but nothing signed covers its last record (no seal, and no
    /// checkpoint at its end): a cut tail would not show. Not proof.
    NotAnchored(ExportSummary),
    /// The export's key is not the trusted one.
    KeyMismatch {
        /// The export's key's fingerprint.
        found: Option<String>,
        /// The trusted one.
        trusted: String,
    },
    /// Altered, cut or reordered: the first bad sequence number and why.
    Broken(ChainError),
}

/// The intact part of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The first sequence number it holds (1 for a whole log).
    pub first: u64,
    /// The chain walked.
    pub verified: Verified,
    /// Whether a valid seal covers exactly these records.
    pub sealed: bool,
    /// The checkpoint key's fingerprint, if the export names one.
    pub fingerprint: Option<String>,
    /// The hash the first record links to (genesis for a whole log): where an archive
    /// segment before it must end.
    pub start_hash: String,
}

impl ExportSummary {
    /// Whether the export holds no records.
    pub fn is_empty(&self) -> bool {
        self.first == 1 && self.verified.head.hash == GENESIS
    }
}

/// Verifies an export (JSON lines) with no server and no HSM: the header, the chain, every
/// checkpoint, and the seal. With `trusted` (a fingerprint or a hex public key), the
/// export's key must be that key; without it, the export's own key is used, which proves
/// consistency but not origin.
pub fn verify_export(text: &str, trusted: Option<&str>) -> Result<ExportVerdict, ExportError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: ExportHeader = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .filter(|h: &ExportHeader| h.format == EXPORT_FORMAT)
        .ok_or(ExportError::NotAnExport)?;
    if !header.contiguous {
        return Err(ExportError::Filtered);
    }
    let public_key = header
        .checkpoint_public_key
        .as_deref()
        .map(|hex| data_encoding::HEXLOWER.decode(hex.as_bytes()))
        .transpose()
        .map_err(|_| ExportError::BadPublicKey)?;
    let found = public_key.as_deref().map(fingerprint);
    if let Some(trusted) = trusted {
        let want = trusted_fingerprint(trusted)?;
        if found.as_deref() != Some(want.as_str()) {
            return Ok(ExportVerdict::KeyMismatch {
                found,
                trusted: want,
            });
        }
    }
    let Parts {
        records,
        checkpoints,
        seal,
        after_seal,
    } = Parts::sort(lines);
    // A time range starts inside the chain: from its first record's predecessor.
    let start = records
        .first()
        .and_then(|b| serde_json::from_slice::<AuditRecord>(b).ok())
        .filter(|r| r.seq > 1)
        .map_or_else(Head::genesis, |r| Head {
            seq: r.seq - 1,
            hash: r.prev_hash,
        });
    let first = start.seq + 1;
    let start_hash = start.hash.clone();
    let broken = |seq, reason| Ok(ExportVerdict::Broken(ChainError { seq, reason }));
    let verified = match verify_from(start, &records, &checkpoints, public_key.as_deref()) {
        Ok(v) => v,
        Err(e) => return Ok(ExportVerdict::Broken(e)),
    };
    // The header says where the export ends: a cut tail shows even past the last
    // checkpoint.
    if header.last_seq.is_some_and(|last| verified.head.seq < last) {
        return broken(verified.head.seq + 1, ChainBreak::Truncated);
    }
    let sealed = match &seal {
        None => false,
        Some(s) => {
            if let Err(e) = check_seal(s, &header, &verified, first, public_key.as_deref()) {
                return Ok(ExportVerdict::Broken(e));
            }
            if after_seal {
                return broken(verified.head.seq, ChainBreak::SealMismatch);
            }
            true
        }
    };
    let covered = verified.last_checkpoint == Some(verified.head.seq);
    let summary = ExportSummary {
        first,
        verified,
        sealed,
        fingerprint: found,
        start_hash,
    };
    Ok(if sealed || covered {
        ExportVerdict::Anchored(summary)
    } else {
        ExportVerdict::NotAnchored(summary)
    })
}

/// The fingerprint `--public-key` names: given as one (32 hex digits), or as the hex
/// public key itself (64 hex digits).
pub(crate) fn trusted_fingerprint(trusted: &str) -> Result<String, ExportError> {
    let trusted = trusted.trim().to_ascii_lowercase();
    match trusted.len() {
        64 => data_encoding::HEXLOWER
            .decode(trusted.as_bytes())
            .map(|k| fingerprint(&k))
            .map_err(|_| ExportError::BadTrustedKey),
        32 if trusted.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(trusted),
        _ => Err(ExportError::BadTrustedKey),
    }
}

/// An export's lines after the header, sorted by kind.
struct Parts<'a> {
    records: Vec<&'a [u8]>,
    checkpoints: Vec<Checkpoint>,
    /// The last seal line.
    seal: Option<ExportSeal>,
    /// Whether anything follows the first seal: a seal must be the export's last line.
    after_seal: bool,
}

impl<'a> Parts<'a> {
    fn sort(lines: impl Iterator<Item = &'a str>) -> Self {
        let mut parts = Parts {
            records: Vec::new(),
            checkpoints: Vec::new(),
            seal: None,
            after_seal: false,
        };
        for line in lines {
            if parts.seal.is_some() {
                parts.after_seal = true;
            }
            if let Ok(s) = serde_json::from_str::<ExportSeal>(line) {
                parts.seal = Some(s);
            } else if let Ok(c) = serde_json::from_str::<Checkpoint>(line) {
                parts.checkpoints.push(c);
            } else {
                parts.records.push(line.as_bytes());
            }
        }
        parts
    }
}

/// Checks an export's seal: signed by the export's key, and covering exactly the records
/// walked (count, first and last sequence, last hash) under the header's filter and time.
fn check_seal(
    seal: &ExportSeal,
    header: &ExportHeader,
    verified: &Verified,
    first: u64,
    public_key: Option<&[u8]>,
) -> Result<(), ChainError> {
    let range = &seal.export_seal;
    let fail = |seq, reason| Err(ChainError { seq, reason });
    if !seal_signed_by(seal, public_key) {
        return fail(verified.head.seq, ChainBreak::CheckpointSignature);
    }
    if range.last_seq.is_some_and(|l| l > verified.head.seq) {
        return fail(verified.head.seq + 1, ChainBreak::Truncated);
    }
    let any = verified.records > 0;
    let holds = range.records == verified.records
        && range.first_seq == any.then_some(first)
        && range.last_seq == any.then_some(verified.head.seq)
        && range.last_hash.as_deref() == any.then_some(verified.head.hash.as_str())
        && range.filter == header.filter
        && range.contiguous == header.contiguous
        && range.exported_at_ms == header.exported_at_ms;
    if !holds {
        return fail(verified.head.seq, ChainBreak::SealMismatch);
    }
    Ok(())
}

/// Whether an export seal is signed by `public_key` and names its fingerprint.
fn seal_signed_by(seal: &ExportSeal, public_key: Option<&[u8]>) -> bool {
    let Some(public_key) = public_key else {
        return false;
    };
    seal.export_seal.key_fingerprint == fingerprint(public_key)
        && ed25519_verify(public_key, &seal.signature, &seal.export_seal.message())
}

fn ed25519_verify(public_key: &[u8], signature_hex: &str, message: &[u8]) -> bool {
    let Ok(arr) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&arr) else {
        return false;
    };
    let Ok(sig_bytes) = data_encoding::HEXLOWER.decode(signature_hex.as_bytes()) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig_bytes) else {
        return false;
    };
    key.verify_strict(message, &sig).is_ok()
}

/// Parses the record after `head` and checks that it is that record: its own hash, its
/// sequence number (a gap is `Missing` or `OutOfOrder`, a repeat `Inserted`), and its link to
/// `head`. `seen` holds every sequence number the walk will meet.
fn next_record(head: &Head, bytes: &[u8], seen: &HashSet<u64>) -> Result<AuditRecord, ChainError> {
    let expected = head.seq + 1;
    let fail = |seq, reason| Err(ChainError { seq, reason });
    let Ok(r) = serde_json::from_slice::<AuditRecord>(bytes) else {
        return fail(expected, ChainBreak::Altered);
    };
    if r.compute_hash().ok().as_deref() != Some(r.hash.as_str()) {
        return fail(expected, ChainBreak::Altered);
    }
    if r.seq > expected {
        let reason = if seen.contains(&expected) {
            ChainBreak::OutOfOrder
        } else {
            ChainBreak::Missing
        };
        return fail(expected, reason);
    }
    if r.seq < expected {
        return fail(r.seq, ChainBreak::Inserted);
    }
    if r.prev_hash != head.hash {
        // Record `expected` is the real one (it names its predecessor's true hash), so the
        // record before it was replaced.
        return fail(head.seq.max(1), ChainBreak::Altered);
    }
    Ok(r)
}

/// Verifies a whole log from record 1: see [`verify_from`]. (The server starts from the end
/// of the archived prefix instead.)
#[cfg(test)]
pub(crate) fn verify_records(
    records: &[impl AsRef<[u8]>],
    checkpoints: &[Checkpoint],
    public_key: Option<&[u8]>,
) -> Result<Verified, ChainError> {
    verify_from(Head::genesis(), records, checkpoints, public_key)
}

/// Re-walks `records` (in the order given) from `start` (the record before the first, or
/// genesis), checks every checkpoint after `start` against the chain and under
/// `public_key`, and names the first sequence number where anything is wrong.
pub(crate) fn verify_from(
    start: Head,
    records: &[impl AsRef<[u8]>],
    checkpoints: &[Checkpoint],
    public_key: Option<&[u8]>,
) -> Result<Verified, ChainError> {
    let seen: HashSet<u64> = records
        .iter()
        .filter_map(|b| serde_json::from_slice::<SeqOnly>(b.as_ref()).ok())
        .map(|s| s.seq)
        .collect();
    let by_seq: BTreeMap<u64, &Checkpoint> = checkpoints
        .iter()
        .filter(|c| c.checkpoint > start.seq)
        .map(|c| (c.checkpoint, c))
        .collect();
    let fail = |seq, reason| Err(ChainError { seq, reason });
    let mut head = start.clone();
    let mut last_checkpoint = start.seq;
    let mut checked = 0;
    let mut walked = 0;
    for bytes in records {
        let r = next_record(&head, bytes.as_ref(), &seen)?;
        if let Some(c) = by_seq.get(&r.seq) {
            if !check_signature(c, public_key) {
                return fail(c.checkpoint, ChainBreak::CheckpointSignature);
            }
            if c.head != r.hash {
                return fail(
                    last_checkpoint + 1,
                    ChainBreak::Rewritten {
                        checkpoint: c.checkpoint,
                    },
                );
            }
            last_checkpoint = c.checkpoint;
            checked += 1;
        }
        head = Head {
            seq: r.seq,
            hash: r.hash,
        };
        walked += 1;
    }
    if let Some((&last, c)) = by_seq.last_key_value()
        && last > head.seq
    {
        if !check_signature(c, public_key) {
            return fail(last, ChainBreak::CheckpointSignature);
        }
        return fail(head.seq + 1, ChainBreak::Truncated);
    }
    Ok(Verified {
        head,
        records: walked,
        checkpoints: checked,
        last_checkpoint: (last_checkpoint > start.seq).then_some(last_checkpoint),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{event, records, unsigned_log};
    use super::*;
    use crate::store::RedbStore;

    fn signed(records: &[Vec<u8>], at: &[u64]) -> (Vec<Checkpoint>, Vec<u8>) {
        use ed25519_dalek::Signer as _;
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = key.verifying_key().to_bytes().to_vec();
        let cps = at
            .iter()
            .map(|&seq| {
                let r: AuditRecord =
                    serde_json::from_slice(&records[usize::try_from(seq - 1).unwrap()]).unwrap();
                let fp = fingerprint(&public);
                let sig = key.sign(&Checkpoint::message(seq, &r.hash, 5, &fp));
                Checkpoint {
                    checkpoint: seq,
                    head: r.hash,
                    time_ms: 5,
                    key_fingerprint: fp,
                    signature: data_encoding::HEXLOWER.encode(&sig.to_bytes()),
                }
            })
            .collect();
        (cps, public)
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());
        let log = unsigned_log(store.clone());
        for i in 0..10 {
            log.append(event(i)).unwrap();
        }
        let good = records(&store);
        let (cps, public) = signed(&good, &[4, 8]);
        let check = |v: &[Vec<u8>]| verify_records(v, &cps, Some(&public));
        let err = |seq, reason| ChainError { seq, reason };
        let ok = check(&good).unwrap();
        assert_eq!(
            (ok.head.seq, ok.checkpoints, ok.last_checkpoint),
            (10, 2, Some(8))
        );

        // One byte of record 4 altered (its principal).
        let mut altered = good.clone();
        altered[3] = String::from_utf8(altered[3].clone())
            .unwrap()
            .replace("anonymous", "anonymouz")
            .into_bytes();
        assert_eq!(check(&altered), Err(err(4, ChainBreak::Altered)));

        // Record 5 deleted.
        let mut deleted = good.clone();
        deleted.remove(4);
        assert_eq!(check(&deleted), Err(err(5, ChainBreak::Missing)));

        // Records 6 and 7 swapped.
        let mut swapped = good.clone();
        swapped.swap(5, 6);
        assert_eq!(check(&swapped), Err(err(6, ChainBreak::OutOfOrder)));

        // A record inserted after 2 (a copy of record 2, rehashed by a forger who cannot
        // rewrite everything after it).
        let mut inserted = good.clone();
        let mut forged: AuditRecord = serde_json::from_slice(&good[1]).unwrap();
        forged.event.principal = "someone".into();
        forged.seq = 3;
        forged.prev_hash = forged.hash.clone();
        forged.hash = forged.compute_hash().unwrap();
        inserted.insert(2, serde_json::to_vec(&forged).unwrap());
        assert_eq!(check(&inserted), Err(err(3, ChainBreak::Inserted)));

        // Record 3 replaced by a self-consistent forgery: record 4 no longer links.
        let mut replaced = good.clone();
        replaced[2] = serde_json::to_vec(&forged).unwrap();
        assert_eq!(check(&replaced), Err(err(3, ChainBreak::Altered)));

        // Everything from record 6 rewritten and re-hashed: only the checkpoint shows it.
        let mut rewritten = good[..5].to_vec();
        let mut prev: AuditRecord = serde_json::from_slice(&good[4]).unwrap();
        for bytes in &good[5..] {
            let mut r: AuditRecord = serde_json::from_slice(bytes).unwrap();
            r.event.outcome = "PERMISSION_DENIED".into();
            r.prev_hash = prev.hash.clone();
            r.hash = r.compute_hash().unwrap();
            rewritten.push(serde_json::to_vec(&r).unwrap());
            prev = r;
        }
        assert_eq!(
            check(&rewritten),
            Err(err(5, ChainBreak::Rewritten { checkpoint: 8 }))
        );

        // Tail cut below the last checkpoint.
        assert_eq!(check(&good[..7]), Err(err(8, ChainBreak::Truncated)));
        // Tail cut after it is not visible (the export's own checkpoint covers its end).
        assert_eq!(check(&good[..9]).unwrap().head.seq, 9);

        // A checkpoint whose signature is not the key's.
        let mut bad = cps.clone();
        bad[0].time_ms += 1;
        assert_eq!(
            verify_records(&good, &bad, Some(&public)),
            Err(err(4, ChainBreak::CheckpointSignature))
        );
        // Or checked against another key.
        assert_eq!(
            verify_records(&good, &cps, Some(&[9u8; 32])),
            Err(err(4, ChainBreak::CheckpointSignature))
        );

        // A range from record 5 verifies from its predecessor.
        let r4: AuditRecord = serde_json::from_slice(&good[3]).unwrap();
        let start = Head {
            seq: 4,
            hash: r4.hash,
        };
        let v = verify_from(start, &good[4..], &cps, Some(&public)).unwrap();
        assert_eq!((v.records, v.checkpoints), (6, 1));
    }

    /// An export of `records` with checkpoints at `at`, and its seal when `sealed`, as the
    /// server writes it (signed with the test key of [`signed`]).
    fn export_text(records: &[Vec<u8>], at: &[u64], sealed: bool) -> (String, String) {
        use super::super::report::{ExportRange, ExportSeal, Filter};
        use ed25519_dalek::Signer as _;
        let (cps, public) = signed(records, at);
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            exported_at_ms: 99,
            server_version: "test".into(),
            checkpoint_public_key: Some(data_encoding::HEXLOWER.encode(&public)),
            checkpoint_key_fingerprint: Some(fingerprint(&public)),
            filter: Filter::default(),
            contiguous: true,
            last_seq: None,
        };
        let mut lines = vec![serde_json::to_string(&header).unwrap()];
        for r in records {
            lines.push(String::from_utf8(r.clone()).unwrap());
            let seq = serde_json::from_slice::<AuditRecord>(r).unwrap().seq;
            if let Some(c) = cps.iter().find(|c| c.checkpoint == seq) {
                lines.push(serde_json::to_string(c).unwrap());
            }
        }
        if sealed {
            let last: AuditRecord = serde_json::from_slice(records.last().unwrap()).unwrap();
            let range = ExportRange {
                format: EXPORT_FORMAT.into(),
                exported_at_ms: 99,
                filter: Filter::default(),
                contiguous: true,
                records: records.len() as u64,
                first_seq: Some(1),
                last_seq: Some(last.seq),
                last_hash: Some(last.hash),
                key_fingerprint: fingerprint(&public),
            };
            let sig = key.sign(&range.message());
            lines.push(
                serde_json::to_string(&ExportSeal {
                    export_seal: range,
                    signature: data_encoding::HEXLOWER.encode(&sig.to_bytes()),
                })
                .unwrap(),
            );
        }
        (lines.join("\n"), fingerprint(&public))
    }

    #[test]
    fn an_export_is_proven_only_when_a_signature_covers_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("e.redb")).unwrap());
        let log = unsigned_log(store.clone());
        for i in 0..10 {
            log.append(event(i)).unwrap();
        }
        let good = records(&store);
        let anchored = |v: &ExportVerdict| matches!(v, ExportVerdict::Anchored(_));

        // Sealed: anchored, pinned or not, even with no checkpoint at the end.
        let (text, fp) = export_text(&good, &[4], true);
        assert!(anchored(&verify_export(&text, None).unwrap()));
        assert!(anchored(&verify_export(&text, Some(&fp)).unwrap()));
        // Pinned to another key: refused before anything else.
        assert!(matches!(
            verify_export(&text, Some("00112233445566778899aabbccddeeff")).unwrap(),
            ExportVerdict::KeyMismatch { .. }
        ));
        assert_eq!(
            verify_export(&text, Some("not hex")),
            Err(ExportError::BadTrustedKey)
        );

        // No seal: anchored only by a checkpoint at the last record.
        let (text, fp) = export_text(&good, &[4, 10], false);
        assert!(anchored(&verify_export(&text, Some(&fp)).unwrap()));
        let (text, fp) = export_text(&good, &[4], false);
        assert!(matches!(
            verify_export(&text, Some(&fp)).unwrap(),
            ExportVerdict::NotAnchored(_)
        ));

        // The review's cut: the last records gone, the seal kept: truncated.
        let (text, fp) = export_text(&good, &[4], true);
        let lines: Vec<&str> = text.lines().collect();
        let cut = [&lines[..lines.len() - 4], &lines[lines.len() - 1..]]
            .concat()
            .join("\n");
        assert_eq!(
            verify_export(&cut, Some(&fp)).unwrap(),
            ExportVerdict::Broken(ChainError {
                seq: 8,
                reason: ChainBreak::Truncated
            })
        );
        // A line after the seal, or a seal that names another count.
        let appended = format!("{text}\n{}", lines[1]);
        assert!(matches!(
            verify_export(&appended, Some(&fp)).unwrap(),
            ExportVerdict::Broken(ChainError {
                reason: ChainBreak::SealMismatch | ChainBreak::Inserted,
                ..
            })
        ));
        let forged = text.replace("\"records\":10", "\"records\":9");
        assert!(matches!(
            verify_export(&forged, Some(&fp)).unwrap(),
            ExportVerdict::Broken(ChainError {
                reason: ChainBreak::CheckpointSignature,
                ..
            })
        ));
        // Not an export at all.
        assert_eq!(verify_export("{}", None), Err(ExportError::NotAnExport));
    }
}
