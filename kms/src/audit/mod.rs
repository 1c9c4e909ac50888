//! The audit log: a hash-chained, durable record of every request, written with group
//! commit, and signed checkpoints over it.
//!
//! Each record carries its sequence number and the hash of the record before it; its own
//! hash is SHA-256 over its canonical JSON (which includes that previous hash). Removing,
//! inserting, altering or reordering a record breaks the chain at a sequence number that
//! `verify::verify_from` names. Every `checkpoint_every` records or `checkpoint_interval`
//! the writer signs a [`Checkpoint`] (sequence, chain head, time) with an Ed25519 key held
//! in the HSM, so that someone who can write the disk cannot rewrite the chain and its
//! hashes unseen, nor cut its tail.
//!
//! Appending is group-committed: callers hand their event (and, for a request that changes
//! state, that change's store writes) to one writer thread and wait; the writer takes every
//! event that is waiting (up to `MAX_GROUP`), chains them, writes them with their changes
//! in **one** durable transaction, and only then answers each caller. Under load many
//! records share one fsync; no caller is answered before its record is on disk. If the
//! write fails, every caller of that group gets [`AuditError::Unavailable`], none of their
//! changes is stored, and the chain head does not move (fail closed: the caller must not
//! answer with a result).
//!
//! Records hold no plaintext, ciphertext, key, share, PIN or associated data: only the
//! fields of [`AuditEvent`].

pub mod archive;
mod codec;
pub(crate) mod config;
pub mod history;
pub mod report;
mod signer;
mod system;
pub mod verify;
mod writer;

pub use signer::Signer;
use writer::{Msg, Pending, Reply, Writer};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hsm::{Hsm, HsmError, HsmKeyKind, KeyHandle};
use crate::store::{Follow, Removal, Store, StoreError, Table, Write};

/// The audit log, by zero-padded sequence number.
pub const AUDIT: Table = Table::log("audit");
/// Signed audit checkpoints, by the zero-padded sequence number they cover.
pub const AUDIT_CHECKPOINTS: Table = Table::new("audit_checkpoints", Follow::Never);
/// The audit log's tables, in the order a backup writes them.
pub const TABLES: &[Table] = &[AUDIT, AUDIT_CHECKPOINTS];

/// The most records one commit takes.
pub(crate) const MAX_GROUP: usize = 1024;
/// The audit record schema.
pub(crate) const AUDIT_SCHEMA: u32 = 1;
/// The previous hash of record 1.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The domain separation prefix of a signed checkpoint.
pub(crate) const CHECKPOINT_CONTEXT: &str = "kms-audit-checkpoint/v1";
/// The principal of what the server does by itself (automatic rotation, destruction).
pub(crate) const SYSTEM_PRINCIPAL: &str = "kms";
/// Records read from the store at a time by [`AuditLog::each_record`].
const READ_PAGE: usize = 512;

/// What happened, as the caller of [`AuditLog::append`] describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Unix time in milliseconds at which the record was made durable (set by the log).
    pub time_ms: u64,
    /// The request id (the caller's `x-request-id`, or one the server made).
    pub request_id: String,
    /// Who asked.
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
    /// ReEncrypt's destination key.
    pub destination_key: Option<String>,
    /// ReEncrypt's destination version.
    pub destination_key_version: Option<u32>,
    /// `OK` or the gRPC code name (e.g. `INVALID_ARGUMENT`).
    pub outcome: String,
    /// Request payload bytes (the encoded protobuf message).
    pub input_bytes: u64,
    /// Response payload bytes (the encoded protobuf message; 0 on error).
    pub output_bytes: u64,
    /// For batch requests: the items and their outcomes.
    pub batch: Option<BatchSummary>,
    /// For CreateGrant and RevokeGrant: the grant. (Absent from records written before
    /// grants existed, so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantSummary>,
    /// For ArchiveSegment: the records archived and removed from the store. (Absent from
    /// every other record, so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived: Option<ArchivedRange>,
    /// For the custodians' ceremonies (rekey, verify-share): which share set and share.
    /// (Absent from every other record, so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceremony: Option<CeremonySummary>,
    /// A change retried with the idempotency key of one already made (docs/api.md,
    /// "Retries and idempotency"), answered with that first answer, nothing changed again:
    /// the request id of the attempt that made the change. (Absent from every other record,
    /// so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
    /// The front the call came through, when it is not the gRPC API (`http`: the
    /// Vault-compatible HTTPS API). (Absent from every gRPC call's record, as from every
    /// record written before there were other fronts, so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<String>,
    /// For the secrets engine's calls: the secret's path (or a grant's path pattern) and
    /// the versions concerned, never a value. (Absent from every other record, so their
    /// hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretSummary>,
    /// For the credentials engine's calls: the issuer, and of a token issued its subject,
    /// audience, delegator, id and expiry, never its text. (Absent from every other record,
    /// so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialSummary>,
    /// For the databases engine's calls: the connection, role, lease and login name, never
    /// a password. (Absent from every other record, so their hashes are unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSummary>,
}

/// What a call of the databases engine (or its revocations) concerned, in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSummary {
    /// The connection.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connection: String,
    /// The role.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// The lease (or, for a revocation by prefix, the prefix).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease_id: String,
    /// The login's name (never its password).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// Whom the lease was issued to (in the records of what the server did to it by
    /// itself, whose principal is kms's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder: String,
    /// When the lease ends, Unix seconds (0: none issued or renewed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires: u64,
    /// How many leases the call revoked or scheduled (by prefix, or removing a role or
    /// connection).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leases: u64,
    /// The record of a lease was dropped without its login being dropped (`force`), or a
    /// lease was marked irrevocable.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// Why the database refused (its error code and message; never a password).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// What a call of the credentials engine concerned, in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CredentialSummary {
    /// The issuer.
    pub issuer: String,
    /// What it issued: `jwt`, `x509`, `ssh_user`, `ssh_host` (empty in records of calls
    /// that issue nothing, and in those made before kinds).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// The token's subject (empty when none was issued).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// Its audience.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub audience: String,
    /// Who asked on the subject's behalf, if not the subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Its `jti`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// Its expiry, Unix seconds (0 when none was issued).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires: u64,
    /// The key version that signed it (0 when none was issued).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub key_version: u32,
    /// An SSH certificate's principals (the user or host names it is valid for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a call of the secrets engine concerned, in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SecretSummary {
    /// The path (a prefix for a listing, a path pattern for a grant; empty for the
    /// engine's configuration).
    pub path: String,
    /// The versions read, written, deleted, undeleted or destroyed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<u64>,
    /// The versions dropped past `max_versions` by the change (their values removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<u64>,
}

/// What a custodians' ceremony call concerned, in its record: share sets, share indexes and
/// numbers, never a share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CeremonySummary {
    /// The share set of the share given (as the share names it), or the server's current
    /// share set when no share was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub share_set: String,
    /// The index of the share given (1..=255), when one was given and could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_index: Option<u8>,
    /// A rekey's step: `started`, `share`, `made` (the new shares made and handed out,
    /// pending verification), `verify` (a new share checked), `committed` (the new share
    /// set replaced the old one), `cancelled`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub step: String,
    /// A rekey's new share set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub new_share_set: String,
    /// A rekey's new share count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_shares: Option<u8>,
    /// A rekey's new threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_threshold: Option<u8>,
    /// The age recipients the new shares were sealed to, in share order (public keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// A master key rotation's new key: `label/CKA_ID (hex)`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub master_key: String,
    /// The instance identity (hex) a restored copy took, an upgrade gave, or a take-over
    /// kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// A restore's backup: its SHA-256 (hex), as the backup's trailer names it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup_sha256: String,
}

/// Records archived to a segment file and removed from the store, named in the record of
/// their removal: what an auditor needs to find the segment and check it is the one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ArchivedRange {
    /// The segment's first record.
    pub first_seq: u64,
    /// Its last record.
    pub last_seq: u64,
    /// Its last record's hash: the next record (still in the store) links to it.
    pub last_hash: String,
    /// The segment's file name in the archive directory.
    pub file: String,
}

/// A grant made or revoked, in its record (never its associated data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GrantSummary {
    /// The grant's id.
    pub id: String,
    /// The grantee.
    pub principal: String,
    /// The operations, e.g. `encrypt`.
    pub operations: Vec<String>,
    /// Whether it allows only one associated data.
    pub associated_data_constrained: bool,
}

impl AuditEvent {
    /// What the server (or `kms dev`) did by itself, successfully: no request, no peer.
    pub fn internal(principal: &str, service: &str, operation: &str) -> Self {
        Self {
            principal: principal.to_owned(),
            service: service.to_owned(),
            operation: operation.to_owned(),
            outcome: "OK".to_owned(),
            ..Self::default()
        }
    }
}

/// A batch request's items, in its one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BatchSummary {
    /// How many items.
    pub items: u64,
    /// Items per outcome (`OK`, `INVALID_ARGUMENT`, ...).
    pub outcomes: BTreeMap<String, u64>,
    /// Successful items per key version.
    pub versions: BTreeMap<u32, u64>,
}

/// A stored record: the event, its place in the chain, and its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Schema version.
    pub schema: u32,
    /// 1, 2, ...
    pub seq: u64,
    /// What the call was, as its handler described it.
    pub event: AuditEvent,
    /// The hash of record `seq - 1` (hex), or `GENESIS`.
    pub prev_hash: String,
    /// SHA-256 of this record's canonical JSON with `hash` empty (hex).
    pub hash: String,
}

impl AuditRecord {
    /// What a reader passes on for stored bytes that do not parse (sequence 0).
    pub(crate) fn unreadable() -> Self {
        Self {
            schema: 0,
            seq: 0,
            event: AuditEvent::default(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// The hash this record should carry.
    pub(crate) fn compute_hash(&self) -> Result<String, AuditError> {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).map_err(|_| AuditError::Internal("encode"))?;
        Ok(data_encoding::HEXLOWER.encode(&Sha256::digest(&bytes)))
    }
}

/// A signed statement that the chain's record `seq` has hash `head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The sequence number it covers (every record up to it).
    pub checkpoint: u64,
    /// The hash of record `checkpoint`.
    pub head: String,
    /// Unix time of signing, milliseconds.
    pub time_ms: u64,
    /// The signing key's fingerprint ([`fingerprint`]).
    pub key_fingerprint: String,
    /// Ed25519 signature over [`Checkpoint::message`] (hex).
    pub signature: String,
}

impl Checkpoint {
    /// The signed bytes: context, sequence, head, time and key fingerprint, one per line.
    pub fn message(seq: u64, head: &str, time_ms: u64, key_fingerprint: &str) -> Vec<u8> {
        format!("{CHECKPOINT_CONTEXT}\n{seq}\n{head}\n{time_ms}\n{key_fingerprint}").into_bytes()
    }
}

/// A public key's fingerprint: the first 16 bytes of its SHA-256, hex.
pub fn fingerprint(public_key: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(Sha256::digest(public_key).get(..16).unwrap_or_default())
}

/// The store key of record `seq`: zero-padded so key order is sequence order.
pub(crate) fn record_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    /// The HSM refused to sign a checkpoint.
    #[error("the audit checkpoint could not be signed")]
    Sign(#[source] HsmError),
    /// The stored chain's tail does not connect to its last signed checkpoint: nothing is
    /// signed over it (see [`AuditLog::open`]).
    #[error(
        "refusing to sign: the stored audit chain does not connect to its last signed checkpoint ({checkpoint}); first bad record {seq}"
    )]
    TailBroken {
        /// The last checkpoint.
        checkpoint: u64,
        /// The first record that does not connect.
        seq: u64,
    },
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// When to sign checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many records.
    pub every_records: u64,
    /// Or after this long, when there are records since the last one.
    pub interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_records: 1000,
            interval: Duration::from_secs(60),
        }
    }
}

/// A submitted record's outcome: its sequence number once durable ([`AuditLog::submit`]).
pub(crate) struct Receipt(Option<tokio::sync::oneshot::Receiver<Result<u64, AuditError>>>);

impl Receipt {
    /// Waits until the record is durable (or its write failed).
    pub(crate) async fn durable(self) -> Result<u64, AuditError> {
        match self.0 {
            Some(answer) => answer.await.map_err(|_| AuditError::Unavailable(None))?,
            None => Err(AuditError::Unavailable(None)),
        }
    }
}

/// The audit log's appending end. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    sender: SyncSender<Msg>,
    commits: Arc<AtomicU64>,
    store: Arc<dyn Store>,
    signer: Arc<Signer>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
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
    /// The last record's hash, or `GENESIS`.
    pub hash: String,
}

impl Head {
    /// The head of an empty log.
    pub(crate) fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// Reads the last stored record.
fn last_record(store: &dyn Store) -> Result<Option<AuditRecord>, AuditError> {
    match store
        .last(crate::audit::AUDIT)
        .map_err(|e| AuditError::Unavailable(Some(e)))?
    {
        None => Ok(None),
        Some((_, bytes)) => codec::decode(&bytes).map(Some).ok_or(AuditError::Corrupt),
    }
}

/// Whether the stored chain from the checkpoint `cp` to the head (`head_seq`) is intact and
/// connects to it: the record `cp` covers hashes to `cp.head`, and each record after it
/// hashes right and names its predecessor. `Ok(Err(seq))` names the first record that
/// does not (the checkpoint's own, when the log was cut below it). Reads only the tail.
fn tail_connects(
    store: &dyn Store,
    cp: &Checkpoint,
    head_seq: u64,
) -> Result<Result<(), u64>, AuditError> {
    if cp.checkpoint > head_seq {
        return Ok(Err(head_seq + 1));
    }
    let mut expected = cp.checkpoint;
    let mut prev: Option<String> = None;
    while expected <= head_seq {
        let page = store
            .range(crate::audit::AUDIT, &record_key(expected), 512)
            .map_err(|e| AuditError::Unavailable(Some(e)))?;
        if page.is_empty() {
            return Ok(Err(expected));
        }
        for (key, bytes) in page {
            let Some(r) = codec::decode(&bytes) else {
                return Ok(Err(expected));
            };
            let hashed = r.compute_hash().ok().as_deref() == Some(r.hash.as_str());
            let linked = match &prev {
                None => r.hash == cp.head,
                Some(p) => &r.prev_hash == p,
            };
            if key != record_key(expected) || r.seq != expected || !hashed || !linked {
                return Ok(Err(expected));
            }
            prev = Some(r.hash);
            expected += 1;
            if expected > head_seq {
                break;
            }
        }
    }
    Ok(Ok(()))
}

/// Reads the head of the stored chain.
pub fn head(store: &dyn Store) -> Result<Head, AuditError> {
    Ok(last_record(store)?.map_or_else(Head::genesis, |r| Head {
        seq: r.seq,
        hash: r.hash,
    }))
}

impl AuditLog {
    /// Opens the log on `store`, continuing its chain, and starts the writer thread (which
    /// stops when the last `AuditLog` clone is dropped).
    pub fn open(
        store: Arc<dyn Store>,
        signer: Arc<Signer>,
        policy: CheckpointPolicy,
    ) -> Result<Self, AuditError> {
        let last = last_record(store.as_ref())?;
        let last_time = last.as_ref().map_or(0, |r| r.event.time_ms);
        let start = last.map_or_else(Head::genesis, |r| Head {
            seq: r.seq,
            hash: r.hash,
        });
        let last_checkpoint = store
            .last(crate::audit::AUDIT_CHECKPOINTS)
            .map_err(|e| AuditError::Unavailable(Some(e)))?
            .and_then(|(_, bytes)| serde_json::from_slice::<Checkpoint>(&bytes).ok());
        if let Some(cp) = &last_checkpoint
            && let Err(seq) = tail_connects(store.as_ref(), cp, start.seq)?
        {
            tracing::error!(
                checkpoint = cp.checkpoint,
                first_bad = seq,
                "the stored audit chain does not connect to its last signed checkpoint: it was altered or cut. No checkpoint or export will be signed until it is restored; run `kms audit verify`"
            );
            signer.refuse(cp.checkpoint, seq);
        }
        let (sender, receiver) = sync_channel::<Msg>(4 * MAX_GROUP);
        let commits = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            store: Arc::clone(&store),
            signer: Arc::clone(&signer),
            policy,
            head: start,
            last_time,
            last_checkpoint,
            commits: Arc::clone(&commits),
        };
        let handle = std::thread::Builder::new()
            .name("kms-audit".into())
            .spawn(move || writer.run(receiver))
            .map_err(|_| AuditError::Internal("cannot start the audit writer"))?;
        Ok(Self {
            sender,
            commits,
            store,
            signer,
            writer: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// Commits what is queued, ends the writer thread and waits for it. Appends after this
    /// fail (`Unavailable`). The server calls it when it stops, so that the thread, which
    /// holds the HSM through the checkpoint signer, is gone before the process exits: a
    /// PKCS#11 module finalised (or still in use) by a thread racing `exit` crashed SoftHSM
    /// at exit. Idempotent.
    pub fn stop(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = self.sender.send(Msg::Stop);
            if handle.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        }
    }

    /// How many durable commits the writer has made (each holds one or more records).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The head of the stored chain (its last record).
    pub(crate) fn stored_head(&self) -> Result<Head, AuditError> {
        head(self.store.as_ref())
    }

    /// Calls `f` with every stored record up to sequence `upto`, in order, page by page
    /// (the log is never read whole), until `f` returns false. A record that does not parse
    /// is passed on as [`AuditRecord::unreadable`] with its bytes (the verifier names it).
    pub(crate) fn each_record(
        &self,
        upto: u64,
        f: impl FnMut(&[u8], &AuditRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.each_record_from(1, upto, f)
    }

    /// As [`AuditLog::each_record`], from sequence `from` (the first stored record at or
    /// after it) to `upto`.
    pub(crate) fn each_record_from(
        &self,
        from: u64,
        upto: u64,
        mut f: impl FnMut(&[u8], &AuditRecord) -> bool,
    ) -> Result<(), StoreError> {
        let mut next = from;
        while next <= upto {
            let page = self
                .store
                .range(crate::audit::AUDIT, &record_key(next), READ_PAGE)?;
            if page.is_empty() {
                break;
            }
            for (key, bytes) in &page {
                let at = key.parse::<u64>().unwrap_or(next);
                if at > upto {
                    return Ok(());
                }
                next = at + 1;
                let r = codec::decode(bytes);
                let line = codec::line(bytes, r.as_ref());
                let r = r.unwrap_or_else(AuditRecord::unreadable);
                if !f(&line, &r) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Every stored record as its JSON line, in order (the whole log: for verification).
    pub(crate) fn all_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .store
            .scan(crate::audit::AUDIT)?
            .into_iter()
            .map(|(_, v)| codec::line_of(&v))
            .collect())
    }

    /// Every stored checkpoint that parses, in order.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        Ok(self
            .store
            .scan(crate::audit::AUDIT_CHECKPOINTS)?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// The checkpoint signer.
    pub fn signer(&self) -> &Arc<Signer> {
        &self.signer
    }

    /// Appends an event; returns its sequence number once it is durable. Blocking: call it
    /// from a blocking context.
    pub fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        self.append_with(event, Vec::new())
    }

    /// Appends an event and makes `writes` durable in the same transaction: both or
    /// neither. Blocking.
    pub fn append_with(&self, event: AuditEvent, writes: Vec<Write>) -> Result<u64, AuditError> {
        self.append_removing(event, writes, Vec::new())
    }

    /// As [`AuditLog::append_with`], and removes `removals` in the same transaction.
    pub(crate) fn append_removing(
        &self,
        event: AuditEvent,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<u64, AuditError> {
        let (reply, answer) = sync_channel(1);
        self.sender
            .send(Msg::Append(Box::new(Pending {
                event,
                writes,
                removals,
                reply: Reply::Blocking(reply),
            })))
            .map_err(|_| AuditError::Unavailable(None))?;
        answer.recv().map_err(|_| AuditError::Unavailable(None))?
    }

    /// Hands an event to the writer without waiting: the [`Receipt`] says when it is
    /// durable. Once this returns, the record is written (or its group fails) whether or
    /// not anyone awaits the receipt, so a caller that goes away mid-call leaves no gap.
    /// Never blocks an async worker: when the writer's queue is full (it is far behind),
    /// a blocking thread waits for room.
    pub(crate) fn submit(&self, event: AuditEvent) -> Receipt {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let msg = Msg::Append(Box::new(Pending {
            event,
            writes: Vec::new(),
            removals: Vec::new(),
            reply: Reply::Async(reply),
        }));
        let queued = match self.sender.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(msg)) => {
                let sender = self.sender.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        // Dropping the handle detaches the task: it runs to the end.
                        drop(rt.spawn_blocking(move || sender.send(msg)));
                        true
                    }
                    // Not on a runtime: this thread may block.
                    Err(_) => sender.send(msg).is_ok(),
                }
            }
            Err(TrySendError::Disconnected(_)) => false,
        };
        Receipt(queued.then_some(answer))
    }

    /// Signs a checkpoint over the current head now (if there is a record since the last
    /// one); `None` when the signing key is not available. Blocking.
    pub fn checkpoint(&self) -> Option<Result<Checkpoint, AuditError>> {
        let (reply, answer) = sync_channel(1);
        self.sender.send(Msg::Checkpoint(reply)).ok()?;
        answer.recv().ok()?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
pub(crate) mod tests {
    use super::*;
    use crate::store::RedbStore;

    pub(crate) fn event(i: u64) -> AuditEvent {
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
            ..AuditEvent::default()
        }
    }

    pub(crate) fn records(store: &RedbStore) -> Vec<Vec<u8>> {
        store
            .scan(crate::audit::AUDIT)
            .unwrap()
            .into_iter()
            .map(|(_, v)| codec::line_of(&v))
            .collect()
    }

    /// A log with no HSM: its signer never has a key, so it makes no checkpoints.
    pub(crate) fn unsigned_log(store: Arc<RedbStore>) -> AuditLog {
        AuditLog::open(
            store,
            Arc::new(Signer::disabled()),
            CheckpointPolicy::default(),
        )
        .unwrap()
    }

    #[test]
    fn concurrent_appends_share_commits_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());
        let log = unsigned_log(store.clone());
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
        let report = verify::verify_records(&all, &[], None).unwrap();
        assert_eq!(report.head.seq, 640);
        // Reopening continues the chain.
        drop(log);
        let log = unsigned_log(store.clone());
        assert_eq!(log.append(event(9999)).unwrap(), 641);
        assert_eq!(
            verify::verify_records(&records(&store), &[], None)
                .unwrap()
                .head
                .seq,
            641
        );
    }

    /// A store written by an earlier version holds JSON records: the log continues its
    /// chain in the compact form, and the whole chain, both forms, verifies.
    #[test]
    fn a_chain_of_json_records_continues_in_the_compact_form() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());
        let mut prev = GENESIS.to_owned();
        for seq in 1..=3 {
            let mut r = AuditRecord {
                schema: AUDIT_SCHEMA,
                seq,
                event: event(seq),
                prev_hash: prev.clone(),
                hash: String::new(),
            };
            r.hash = r.compute_hash().unwrap();
            prev.clone_from(&r.hash);
            let json = serde_json::to_vec(&r).unwrap();
            store
                .put(crate::audit::AUDIT, &record_key(seq), &json)
                .unwrap();
        }
        let log = unsigned_log(store.clone());
        assert_eq!(log.append(event(4)).unwrap(), 4);
        assert_eq!(log.append(event(5)).unwrap(), 5);
        let stored = store.scan(crate::audit::AUDIT).unwrap();
        assert!(stored[..3].iter().all(|(_, v)| v[0] == b'{'));
        assert!(stored[3..].iter().all(|(_, v)| v[0] == 2));
        let report = verify::verify_records(&records(&store), &[], None).unwrap();
        assert_eq!(report.head.seq, 5);
        assert_eq!(log.stored_head().unwrap(), report.head);
    }

    #[test]
    fn a_change_commits_with_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());
        let log = unsigned_log(store.clone());
        let seq = log
            .append_with(
                event(1),
                vec![Write {
                    table: crate::keyring::KEYS,
                    key: "k".into(),
                    value: b"v".to_vec(),
                }],
            )
            .unwrap();
        assert_eq!(seq, 1);
        assert_eq!(
            store.get(crate::keyring::KEYS, "k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(records(&store).len(), 1);
    }
}
