//! The one writer thread: group commit of records (and the store writes they record), and
//! checkpoints.

use super::{
    AUDIT_SCHEMA, Arc, AtomicU64, AuditError, AuditEvent, AuditRecord, Checkpoint,
    CheckpointPolicy, Head, Instant, MAX_GROUP, Ordering, Receiver, RecvTimeoutError, Removal,
    Sha256, Signer, Store, StoreError, SyncSender, Table, Write, codec, now_ms, record_key,
};
use sha2::Digest;

/// Chains `records` after `head` at `time_ms` (sequence numbers, predecessor hashes,
/// times, hashes) and appends their stored form to `writes`; returns the new head.
fn chain(
    head: &Head,
    records: &mut [AuditRecord],
    time_ms: u64,
    writes: &mut Vec<Write>,
) -> Result<Head, AuditError> {
    let mut next = head.clone();
    for r in records {
        r.seq = next.seq + 1;
        r.prev_hash = std::mem::take(&mut next.hash);
        r.event.time_ms = time_ms;
        r.hash = String::new();
        // With `hash` empty, the record's JSON is the canonical form its hash covers.
        let canonical = serde_json::to_vec(&*r).map_err(|_| AuditError::Internal("encode"))?;
        r.hash = data_encoding::HEXLOWER.encode(&Sha256::digest(&canonical));
        writes.push(Write {
            table: Table::Audit,
            key: record_key(r.seq),
            value: codec::encode(r).map_err(|_| AuditError::Internal("encode"))?,
        });
        next = Head {
            seq: r.seq,
            hash: r.hash.clone(),
        };
    }
    Ok(next)
}

pub(super) struct Pending {
    pub(super) event: AuditEvent,
    pub(super) writes: Vec<Write>,
    pub(super) removals: Vec<Removal>,
    pub(super) reply: Reply,
}

/// Where a record's outcome goes: a thread that blocks on it, or a task that awaits it.
pub(super) enum Reply {
    Blocking(SyncSender<Result<u64, AuditError>>),
    Async(tokio::sync::oneshot::Sender<Result<u64, AuditError>>),
}

impl Reply {
    /// Hands over the outcome (a caller that went away no longer wants it).
    fn send(self, outcome: Result<u64, AuditError>) {
        match self {
            Reply::Blocking(s) => {
                let _ = s.send(outcome);
            }
            Reply::Async(s) => {
                let _ = s.send(outcome);
            }
        }
    }
}

pub(super) enum Msg {
    Append(Box<Pending>),
    Checkpoint(SyncSender<Option<Result<Checkpoint, AuditError>>>),
    /// Commit what is queued, then end the writer thread.
    Stop,
}

pub(super) struct Writer {
    pub(super) store: Arc<dyn Store>,
    pub(super) signer: Arc<Signer>,
    pub(super) policy: CheckpointPolicy,
    pub(super) head: Head,
    /// The last record's time: times never decrease along the chain.
    pub(super) last_time: u64,
    /// The last signed checkpoint, if any.
    pub(super) last_checkpoint: Option<Checkpoint>,
    pub(super) commits: Arc<AtomicU64>,
}

impl Writer {
    pub(super) fn run(mut self, receiver: Receiver<Msg>) {
        let mut since_checkpoint = Instant::now();
        loop {
            let first = if self.head.seq > self.covered() {
                let wait = self
                    .policy
                    .interval
                    .saturating_sub(since_checkpoint.elapsed());
                match receiver.recv_timeout(wait) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.checkpoint();
                        since_checkpoint = Instant::now();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match receiver.recv() {
                    Ok(m) => {
                        since_checkpoint = Instant::now();
                        m
                    }
                    Err(_) => break,
                }
            };
            let mut group = Vec::new();
            let mut asks = Vec::new();
            let mut stop = false;
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Append(p) => group.push(*p),
                    Msg::Checkpoint(reply) => asks.push(reply),
                    Msg::Stop => stop = true,
                }
                if group.len() < MAX_GROUP && !stop {
                    next = receiver.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            if stop {
                for reply in asks {
                    let _ = reply.send(None);
                }
                break;
            }
            let due = self.head.seq >= self.covered() + self.policy.every_records;
            if !asks.is_empty() || due {
                let made = self.checkpoint();
                since_checkpoint = Instant::now();
                for reply in asks {
                    let _ = reply.send(made.as_ref().map(|r| {
                        r.as_ref()
                            .cloned()
                            .map_err(|_| AuditError::Internal("checkpoint"))
                    }));
                }
            }
        }
    }

    fn commit(&mut self, mut group: Vec<Pending>) {
        let started = Instant::now();
        let removals: Vec<Removal> = group
            .iter()
            .flat_map(|p| p.removals.iter().cloned())
            .collect();
        // The changes the records record, in the group's order, then the records.
        let writes: Vec<Write> = group
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.writes))
            .collect();
        let mut records: Vec<AuditRecord> = group
            .iter_mut()
            .map(|p| AuditRecord {
                schema: AUDIT_SCHEMA,
                seq: 0,
                event: std::mem::take(&mut p.event),
                prev_hash: String::new(),
                hash: String::new(),
            })
            .collect();
        let mut changes = Some(writes);
        let (head, floor) = (&self.head, self.last_time);
        // What the commit chained after: the head it found, the new head, the time.
        let mut chained: Option<(Head, Head, u64)> = None;
        let mut failure: Option<AuditError> = None;
        let appended = self.store.append_with(
            Table::Audit,
            &mut |last| {
                // The head to continue from: ours, or the one servers sharing the store
                // appended since (read under the lock that keeps the chain whole).
                let based = match last {
                    None if head.seq == 0 => Ok((head.clone(), floor)),
                    Some((key, _)) if key == record_key(head.seq) => Ok((head.clone(), floor)),
                    Some((_, bytes)) => match codec::decode(&bytes) {
                        Some(r) if r.seq > head.seq => Ok((
                            Head {
                                seq: r.seq,
                                hash: r.hash,
                            },
                            floor.max(r.event.time_ms),
                        )),
                        _ => Err(AuditError::Corrupt),
                    },
                    None => Err(AuditError::Corrupt),
                };
                let mut writes = changes.take().unwrap_or_default();
                // The record's time is when it becomes durable, never before its
                // predecessor's: a time range is then a contiguous, verifiable part of the
                // chain.
                let built = based.and_then(|(base, floor)| {
                    let time_ms = now_ms().max(floor);
                    let next = chain(&base, &mut records, time_ms, &mut writes)?;
                    chained = Some((base, next, time_ms));
                    Ok(writes)
                });
                built.map_err(|e| {
                    failure = Some(e);
                    StoreError::Settings("the audit records could not be chained".into())
                })
            },
            &removals,
        );
        let written = match (appended, chained) {
            (Ok(()), Some(done)) => Ok(done),
            (Ok(()), None) => Err(AuditError::Internal("append")),
            (Err(e), _) => Err(failure.take().unwrap_or(AuditError::Unavailable(Some(e)))),
        };
        match written {
            Ok((base, next, time_ms)) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                let metrics = crate::metrics::metrics();
                metrics
                    .audit_commit_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.audit_records.inc_by(group.len() as u64);
                metrics.audit_commit_batch.observe(group.len() as f64);
                let first_seq = base.seq + 1;
                self.head = next;
                self.last_time = time_ms;
                for (i, p) in group.into_iter().enumerate() {
                    p.reply.send(Ok(first_seq + i as u64));
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), records = group.len(), "audit write failed: requests refused");
                crate::metrics::metrics()
                    .audit_write_failures
                    .inc_by(group.len() as u64);
                for p in group {
                    p.reply.send(Err(AuditError::Unavailable(None)));
                }
            }
        }
    }

    /// Signs and stores a checkpoint over the head, if there is anything new to cover.
    fn checkpoint(&mut self) -> Option<Result<Checkpoint, AuditError>> {
        if self.head.seq == 0 {
            return None;
        }
        match &self.last_checkpoint {
            // Nothing new: the last checkpoint still covers the head.
            Some(c) if c.checkpoint == self.head.seq => Some(Ok(c.clone())),
            _ => self.sign_and_store(),
        }
    }

    /// The sequence number the last checkpoint covers (0: none).
    fn covered(&self) -> u64 {
        self.last_checkpoint.as_ref().map_or(0, |c| c.checkpoint)
    }

    fn sign_and_store(&mut self) -> Option<Result<Checkpoint, AuditError>> {
        let signed = self.signer.checkpoint(&self.head)?;
        let stored = signed.and_then(|c| {
            let bytes = serde_json::to_vec(&c).map_err(|_| AuditError::Internal("encode"))?;
            self.store
                .write_all(&[Write {
                    table: Table::AuditCheckpoints,
                    key: record_key(c.checkpoint),
                    value: bytes,
                }])
                .map_err(|e| AuditError::Unavailable(Some(e)))?;
            Ok(c)
        });
        match &stored {
            Ok(c) => {
                self.last_checkpoint = Some(c.clone());
                tracing::debug!(seq = c.checkpoint, "audit checkpoint signed");
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(e), "audit checkpoint failed");
            }
        }
        Some(stored)
    }
}
