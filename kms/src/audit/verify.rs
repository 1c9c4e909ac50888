//! Re-walking the chain and checking its checkpoints: the same code for the server's
//! `VerifyAuditLog` and for `kms audit verify --export FILE` (offline, no server, no HSM).

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::{AuditRecord, Checkpoint, Head, fingerprint};

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
    /// A checkpoint covers records the log does not have: its tail was cut.
    #[error("log truncated after the last checkpoint")]
    Truncated,
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
    let Ok(arr) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&arr) else {
        return false;
    };
    let Ok(sig_bytes) = data_encoding::HEXLOWER.decode(c.signature.as_bytes()) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig_bytes) else {
        return false;
    };
    c.key_fingerprint == fingerprint(public_key)
        && key
            .verify_strict(
                &Checkpoint::message(c.checkpoint, &c.head, c.time_ms, &c.key_fingerprint),
                &sig,
            )
            .is_ok()
}

/// Verifies a whole log from record 1: see [`verify_from`].
pub fn verify_records(
    records: &[impl AsRef<[u8]>],
    checkpoints: &[Checkpoint],
    public_key: Option<&[u8]>,
) -> Result<Verified, ChainError> {
    verify_from(Head::genesis(), records, checkpoints, public_key)
}

/// Re-walks `records` (in the order given) from `start` (the record before the first, or
/// genesis), checks every checkpoint after `start` against the chain and under
/// `public_key`, and names the first sequence number where anything is wrong.
pub fn verify_from(
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
        let expected = head.seq + 1;
        let Ok(r) = serde_json::from_slice::<AuditRecord>(bytes.as_ref()) else {
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
            // Record `expected` is the real one (it names its predecessor's true hash), so
            // the record before it was replaced.
            return fail(head.seq.max(1), ChainBreak::Altered);
        }
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
}
