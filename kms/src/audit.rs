//! The audit log: a hash-chained, durable record of every request, written with group
//! commit.
//!
//! Each record carries its sequence number and the hash of the record before it; its own
//! hash is SHA-256 over its canonical JSON (which includes that previous hash). Removing,
//! inserting, altering or reordering a record breaks the chain at a sequence number that
//! [`verify_chain`] names.
//!
//! Appending is group-committed: callers hand their event to one writer thread and wait;
//! the writer takes every event that is waiting (up to [`MAX_GROUP`]), chains them, writes
//! them in **one** durable transaction, and only then answers each caller. Under load many
//! records share one fsync; no caller is answered before its record is on disk. If the write
//! fails, every caller of that group gets [`AuditError::Unavailable`] and the chain head does
//! not move (fail closed: the caller must not act).
//!
//! Records hold no plaintext, ciphertext, key, share, PIN or associated data: only the
//! fields of [`AuditEvent`].
//!
//! Wiring into every RPC, signed checkpoints, export and reports are the next steps (issue 4).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError, Table};

/// The most records one commit takes.
pub const MAX_GROUP: usize = 1024;
/// The audit record schema.
pub const AUDIT_SCHEMA: u32 = 1;
/// The previous hash of record 1.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the caller of [`AuditLog::append`] describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// The request id.
    pub request_id: String,
    /// Who asked (`anonymous` until access control exists).
    pub principal: String,
    /// The peer address.
    pub peer: String,
    /// e.g. `kms.v1.KeyManagement`.
    pub service: String,
    /// e.g. `Encrypt`.
    pub operation: String,
    /// The key name, if any.
    pub key: Option<String>,
    /// The key version, if any.
    pub key_version: Option<u32>,
    /// `OK` or the gRPC code name.
    pub outcome: String,
    /// Request payload bytes.
    pub input_bytes: u64,
    /// Response payload bytes.
    pub output_bytes: u64,
}

/// A stored record: the event, its place in the chain, and its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Schema version.
    pub schema: u32,
    /// 1, 2, ...
    pub seq: u64,
    /// The event.
    pub event: AuditEvent,
    /// The hash of record `seq - 1` (hex), or [`GENESIS`].
    pub prev_hash: String,
    /// SHA-256 of this record's canonical JSON with `hash` empty (hex).
    pub hash: String,
}

impl AuditRecord {
    fn compute_hash(&self) -> Result<String, AuditError> {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).map_err(|_| AuditError::Internal("encode"))?;
        Ok(data_encoding::HEXLOWER.encode(&Sha256::digest(&bytes)))
    }
}

/// The store key of record `seq`: zero-padded so key order is sequence order.
pub fn record_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Why appending failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The record could not be made durable: the request must fail.
    #[error("audit log unavailable")]
    Unavailable(#[source] Option<StoreError>),
    /// The stored log is unreadable at start-up.
    #[error("the audit log's last record is unreadable")]
    Corrupt,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

struct Pending {
    event: AuditEvent,
    reply: SyncSender<Result<u64, AuditError>>,
}

/// The audit log's appending end. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    sender: SyncSender<Pending>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

/// The chain head: the last sequence number and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// 0 for an empty log.
    pub seq: u64,
    /// The last record's hash, or [`GENESIS`].
    pub hash: String,
}

/// Reads the head of the stored chain.
pub fn head(store: &dyn Store) -> Result<Head, AuditError> {
    match store
        .last(Table::Audit)
        .map_err(|e| AuditError::Unavailable(Some(e)))?
    {
        None => Ok(Head {
            seq: 0,
            hash: GENESIS.to_owned(),
        }),
        Some((_, bytes)) => {
            let r: AuditRecord = serde_json::from_slice(&bytes).map_err(|_| AuditError::Corrupt)?;
            Ok(Head {
                seq: r.seq,
                hash: r.hash,
            })
        }
    }
}

impl AuditLog {
    /// Opens the log on `store`, continuing its chain, and starts the writer thread (which
    /// stops when the last `AuditLog` clone is dropped).
    pub fn open(store: Arc<dyn Store>) -> Result<Self, AuditError> {
        let start = head(store.as_ref())?;
        let (sender, receiver) = sync_channel::<Pending>(4 * MAX_GROUP);
        let commits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        std::thread::Builder::new()
            .name("kms-audit".into())
            .spawn(move || writer(store, receiver, start, &counter))
            .map_err(|_| AuditError::Internal("cannot start the audit writer"))?;
        Ok(Self { sender, commits })
    }

    /// How many durable commits the writer has made (each holds one or more records).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Appends an event; returns its sequence number once it is durable. Blocking: call it
    /// from a blocking context.
    pub fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (reply, answer) = sync_channel(1);
        self.sender
            .send(Pending { event, reply })
            .map_err(|_| AuditError::Unavailable(None))?;
        answer.recv().map_err(|_| AuditError::Unavailable(None))?
    }
}

fn writer(store: Arc<dyn Store>, receiver: Receiver<Pending>, mut head: Head, commits: &AtomicU64) {
    while let Ok(first) = receiver.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let mut next = head.clone();
        let mut entries = Vec::with_capacity(group.len());
        let mut failed = false;
        for p in &group {
            let mut r = AuditRecord {
                schema: AUDIT_SCHEMA,
                seq: next.seq + 1,
                event: p.event.clone(),
                prev_hash: next.hash.clone(),
                hash: String::new(),
            };
            match r.compute_hash().and_then(|h| {
                r.hash = h;
                serde_json::to_vec(&r).map_err(|_| AuditError::Internal("encode"))
            }) {
                Ok(bytes) => {
                    entries.push((record_key(r.seq), bytes));
                    next = Head {
                        seq: r.seq,
                        hash: r.hash,
                    };
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let written = if failed {
            Err(AuditError::Internal("encode"))
        } else {
            store
                .put_batch(Table::Audit, &entries)
                .map_err(|e| AuditError::Unavailable(Some(e)))
        };
        match written {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
                let first_seq = head.seq + 1;
                head = next;
                for (i, p) in group.into_iter().enumerate() {
                    let _ = p.reply.send(Ok(first_seq + i as u64));
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), records = group.len(), "audit write failed: requests refused");
                for p in group {
                    let _ = p.reply.send(Err(AuditError::Unavailable(None)));
                }
            }
        }
    }
}

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
    /// The record's bytes do not hash to its stored hash, or do not parse.
    #[error("record altered")]
    Altered,
    /// A sequence number is missing.
    #[error("record missing")]
    Missing,
    /// A record that does not follow its predecessor (inserted or reordered).
    #[error("record inserted or out of order")]
    Inserted,
}

/// Re-walks a chain of stored records, in order. Returns the head it reached.
pub fn verify_chain<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Result<Head, ChainError> {
    let mut head = Head {
        seq: 0,
        hash: GENESIS.to_owned(),
    };
    for bytes in records {
        let expected = head.seq + 1;
        let r: AuditRecord = serde_json::from_slice(bytes).map_err(|_| ChainError {
            seq: expected,
            reason: ChainBreak::Altered,
        })?;
        if r.compute_hash().ok().as_deref() != Some(r.hash.as_str()) {
            return Err(ChainError {
                seq: r.seq,
                reason: ChainBreak::Altered,
            });
        }
        if r.seq > expected && r.prev_hash != head.hash {
            return Err(ChainError {
                seq: expected,
                reason: ChainBreak::Missing,
            });
        }
        if r.seq != expected || r.prev_hash != head.hash {
            return Err(ChainError {
                seq: r.seq.min(expected),
                reason: ChainBreak::Inserted,
            });
        }
        head = Head {
            seq: r.seq,
            hash: r.hash,
        };
    }
    Ok(head)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            time_ms: i,
            request_id: format!("req-{i}"),
            principal: "anonymous".into(),
            peer: "127.0.0.1:1".into(),
            service: "kms.v1.KeyManagement".into(),
            operation: "Encrypt".into(),
            key: Some("payments".into()),
            key_version: Some(1),
            outcome: "OK".into(),
            input_bytes: 10,
            output_bytes: 43,
        }
    }

    fn records(store: &RedbStore) -> Vec<Vec<u8>> {
        store
            .scan(Table::Audit)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn concurrent_appends_share_commits_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());
        let log = AuditLog::open(store.clone()).unwrap();
        let threads: Vec<_> = (0..32)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|i| log.append(event(t * 100 + i)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=640).collect::<Vec<_>>(), "unique and contiguous");
        // Group commit: 32 writers waiting on one fsync share it.
        assert!(
            log.commits() < 320,
            "{} commits for 640 records",
            log.commits()
        );
        let all = records(&store);
        assert_eq!(all.len(), 640);
        let head = verify_chain(all.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(head.seq, 640);
        // Reopening continues the chain.
        drop(log);
        let log = AuditLog::open(store.clone()).unwrap();
        assert_eq!(log.append(event(9999)).unwrap(), 641);
        assert_eq!(
            verify_chain(records(&store).iter().map(Vec::as_slice))
                .unwrap()
                .seq,
            641
        );
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());
        let log = AuditLog::open(store.clone()).unwrap();
        for i in 0..10 {
            log.append(event(i)).unwrap();
        }
        let good = records(&store);
        let check = |v: &[Vec<u8>]| verify_chain(v.iter().map(Vec::as_slice));
        assert!(check(&good).is_ok());

        // One byte of record 4 altered (its principal).
        let mut altered = good.clone();
        let text = String::from_utf8(altered[3].clone())
            .unwrap()
            .replace("anonymous", "anonymouz");
        altered[3] = text.into_bytes();
        assert_eq!(
            check(&altered).unwrap_err(),
            ChainError {
                seq: 4,
                reason: ChainBreak::Altered
            }
        );

        // Record 5 deleted.
        let mut deleted = good.clone();
        deleted.remove(4);
        assert_eq!(
            check(&deleted).unwrap_err(),
            ChainError {
                seq: 5,
                reason: ChainBreak::Missing
            }
        );

        // Records 6 and 7 swapped.
        let mut swapped = good.clone();
        swapped.swap(5, 6);
        assert_eq!(check(&swapped).unwrap_err().seq, 6);

        // A record inserted after 2 (a copy of record 2, rehashed by a forger who cannot
        // rewrite everything after it).
        let mut inserted = good.clone();
        let mut forged: AuditRecord = serde_json::from_slice(&good[1]).unwrap();
        forged.event.principal = "someone".into();
        forged.seq = 3;
        forged.prev_hash = forged.hash.clone();
        forged.hash = forged.compute_hash().unwrap();
        inserted.insert(2, serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            check(&inserted).unwrap_err(),
            ChainError {
                seq: 3,
                reason: ChainBreak::Inserted
            }
        );

        // Truncation alone is not visible in the chain (the signed checkpoints will show it).
        let truncated = good[..7].to_vec();
        assert_eq!(check(&truncated).unwrap().seq, 7);
    }
}
