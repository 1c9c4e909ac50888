//! What auditors read: export filters and lines, and the key-usage report.
//!
//! The export is JSON lines: one `ExportHeader`, then the stored records verbatim in
//! sequence order, each signed [`super::Checkpoint`] right after the record it covers, and
//! last an `ExportSeal` signed by the HSM audit key over exactly what the export holds. Records'
//! times are stamped by the writer when they become durable, so they never decrease along
//! the chain and a time range is a contiguous, verifiable part of it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::AuditEvent;

pub mod databases;

/// The export format's name.
pub(crate) const EXPORT_FORMAT: &str = "kms-audit-export/v1";

/// Which records an export or report covers. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filter {
    /// From this Unix time (ms), inclusive.
    pub since_ms: Option<u64>,
    /// Up to this Unix time (ms), exclusive.
    pub until_ms: Option<u64>,
    /// The key (as the key or ReEncrypt's destination).
    pub key: Option<String>,
    /// Only this caller's records (the exact principal).
    pub principal: Option<String>,
    /// The operation, e.g. `Encrypt`.
    pub operation: Option<String>,
    /// The outcome, e.g. `OK` or `PERMISSION_DENIED`.
    pub outcome: Option<String>,
}

impl Filter {
    /// Whether the record's time is in range.
    pub(crate) fn in_time(&self, time_ms: u64) -> bool {
        self.since_ms.is_none_or(|s| time_ms >= s) && self.until_ms.is_none_or(|u| time_ms < u)
    }

    /// Whether the event matches every filter.
    pub(crate) fn matches(&self, e: &AuditEvent) -> bool {
        self.in_time(e.time_ms)
            && self
                .key
                .as_ref()
                .is_none_or(|k| e.key.as_ref() == Some(k) || e.destination_key.as_ref() == Some(k))
            && self.principal.as_ref().is_none_or(|p| &e.principal == p)
            && self.operation.as_ref().is_none_or(|o| &e.operation == o)
            && self.outcome.as_ref().is_none_or(|o| &e.outcome == o)
    }

    /// Whether only time is filtered: then the export is a contiguous piece of the chain
    /// and can be verified.
    pub(crate) fn is_contiguous(&self) -> bool {
        self.key.is_none()
            && self.principal.is_none()
            && self.operation.is_none()
            && self.outcome.is_none()
    }
}

/// The first line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportHeader {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// When it was made (Unix ms).
    pub exported_at_ms: u64,
    /// The server's version.
    pub server_version: String,
    /// The checkpoint public key (Ed25519, raw 32 bytes, hex), if the server is
    /// initialised.
    pub checkpoint_public_key: Option<String>,
    /// Its fingerprint.
    pub checkpoint_key_fingerprint: Option<String>,
    /// The filter it was made with.
    pub filter: Filter,
    /// Whether the records are a contiguous piece of the chain (no filter but time).
    pub contiguous: bool,
    /// The last sequence number the export holds (set when no `until` bounds it): a cut
    /// tail is then detectable even where no checkpoint covers it.
    pub last_seq: Option<u64>,
}

/// What an export's seal states, signed by the HSM audit key: exactly which records the
/// export holds. With it, cutting the export's tail (or its head, or changing its filter)
/// shows offline, even for a time range that ends between two checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportRange {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// The header's `exported_at_ms`.
    pub exported_at_ms: u64,
    /// The filter it was made with.
    pub filter: Filter,
    /// Whether the records are a contiguous piece of the chain.
    pub contiguous: bool,
    /// How many records it holds.
    pub records: u64,
    /// The first record's sequence number (none: no records).
    pub first_seq: Option<u64>,
    /// The last record's sequence number.
    pub last_seq: Option<u64>,
    /// The last record's hash.
    pub last_hash: Option<String>,
    /// The signing key's fingerprint.
    pub key_fingerprint: String,
}

impl ExportRange {
    /// The signed bytes: the context and the range's JSON (its fields in declaration order).
    pub(crate) fn message(&self) -> Vec<u8> {
        let mut m = format!("{EXPORT_SEAL_CONTEXT}\n").into_bytes();
        m.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        m
    }
}

/// The domain of an export seal's signature.
pub(crate) const EXPORT_SEAL_CONTEXT: &str = "kms-audit-export-seal/v1";

/// The last line of an export: its [`ExportRange`] and the Ed25519 signature over
/// [`ExportRange::message`] (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportSeal {
    /// What is signed.
    pub export_seal: ExportRange,
    /// The signature (hex).
    pub signature: String,
}

/// When something was first and last seen, and how often.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// How many calls.
    pub count: u64,
    /// The first (Unix ms).
    pub first_ms: u64,
    /// The last (Unix ms).
    pub last_ms: u64,
}

impl Span {
    fn add(&mut self, n: u64, t: u64) {
        self.first_ms = if self.count == 0 {
            t
        } else {
            self.first_ms.min(t)
        };
        self.last_ms = self.last_ms.max(t);
        self.count += n;
    }
}

/// Calls that named a key version, by one principal, for one operation, with one outcome:
/// the row an auditor reads ("who decrypted with payments v1, how often, from when to
/// when"). Refused calls are not here but in [`RefusedRow`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The key's name, as the requests named it.
    pub key: String,
    /// The version; `None` when the call failed before one was chosen.
    pub version: Option<u32>,
    /// Who called.
    pub principal: String,
    /// e.g. `Decrypt`; `ReEncryptTo` on a re-encryption's destination key.
    pub operation: String,
    /// `OK`, or the gRPC code name of the failure.
    pub outcome: String,
    /// How many, and this row's own first and last call.
    #[serde(flatten)]
    pub span: Span,
}

/// One key's calls in the period, for the summary at the top of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    /// The key's name, as the requests named it.
    pub key: String,
    /// Calls answered `OK` (uses and administration).
    pub ok: u64,
    /// Calls that failed (bad input, a wrong ciphertext, a disabled version, ...).
    pub failed: u64,
    /// Calls refused (no grant, no certificate).
    pub refused: u64,
    /// Distinct principals that called it, refused or not.
    pub principals: u64,
    /// The first and last call of any kind.
    pub first_ms: u64,
    /// The last call.
    pub last_ms: u64,
}

/// Calls refused (`PERMISSION_DENIED`, `UNAUTHENTICATED`) by principal, operation, key and
/// secret path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRow {
    /// Who was refused (`anonymous` without a certificate).
    pub principal: String,
    /// What they asked, e.g. `Decrypt`.
    pub operation: String,
    /// The key the call named, if any.
    pub key: Option<String>,
    /// The secret path the call named, if any, as its record holds it (a bounded
    /// placeholder when the caller sent an invalid path). A refused secret call counts
    /// here only: the per-key summaries and the timeline are about keys. (Absent from
    /// reports of servers before it.)
    #[serde(default)]
    pub secret_path: Option<String>,
    /// `PERMISSION_DENIED` or `UNAUTHENTICATED`.
    pub outcome: String,
    /// How many, first and last.
    #[serde(flatten)]
    pub span: Span,
}

/// A key version named in a list of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRef {
    /// The key's name.
    pub key: String,
    /// The version number.
    pub version: u32,
    /// Its state now (e.g. `ENABLED`).
    pub state: String,
    /// How many uses (for "decrypt below primary": successful decryptions).
    pub count: u64,
}

/// One key's calls in one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// The bucket's start (Unix ms).
    pub start_ms: u64,
    /// The key's name, or [`OTHER_KEYS`] for the keys past the busiest [`TOP_KEYS`].
    pub key: String,
    /// Successful uses (administration aside).
    pub ok: u64,
    /// Refused calls.
    pub refused: u64,
}

/// How many keys the timeline shows by name; the rest are summed as [`OTHER_KEYS`].
pub const TOP_KEYS: usize = 8;

/// The timeline's name for the keys past the busiest [`TOP_KEYS`].
pub const OTHER_KEYS: &str = "(other keys)";

/// The key-usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The period's start (Unix ms), if bounded.
    pub since_ms: Option<u64>,
    /// The period's end (Unix ms), if bounded.
    pub until_ms: Option<u64>,
    /// The key the report was limited to, if any.
    pub key: Option<String>,
    /// The principal the report was limited to, if any.
    pub principal: Option<String>,
    /// Records read in the period (and filters).
    pub records: u64,
    /// One summary per key, busiest first.
    pub keys: Vec<KeySummary>,
    /// Calls per key, version, principal, operation and outcome (refusals aside).
    pub usage: Vec<UsageRow>,
    /// Refused calls, by principal.
    pub refused: Vec<RefusedRow>,
    /// Live versions (not destroyed) with no successful use (a cryptographic operation,
    /// not administration) in the period.
    pub unused: Vec<VersionRef>,
    /// Versions below the primary that still decrypted successfully in the period: their
    /// data has not been re-encrypted yet.
    pub decrypt_below_primary: Vec<VersionRef>,
    /// The timeline's bucket width (ms): a minute, an hour, a day... from the period.
    pub bucket_ms: u64,
    /// Uses and refusals per key per bucket, every bucket of the period present (zeros
    /// included) for the keys shown.
    pub timeline: Vec<Bucket>,
    /// The custodians' ceremonies: per share set, share, principal, operation, step and
    /// outcome. (Absent from reports of servers before it.)
    #[serde(default)]
    pub custody: Vec<CustodyRow>,
    /// Secrets read: per path, version and principal, with the first and last read.
    /// (Absent from reports of servers before the secrets engine.)
    #[serde(default)]
    pub secret_reads: Vec<SecretReadRow>,
    /// Credentials issued and refused: per issuer, kind, subject, delegator, key version
    /// and outcome. (Absent from reports of servers before the credentials engine.)
    #[serde(default)]
    pub credentials: Vec<CredentialRow>,
    /// Database credentials: per connection, role and principal, the logins issued,
    /// renewed, revoked, expired, forced, marked irrevocable and refused. (Absent from
    /// reports of servers before the databases engine.)
    #[serde(default)]
    pub database_credentials: Vec<databases::DatabaseRow>,
    /// Logins no lease named, dropped by the reconcile pass, per connection and role.
    /// (Absent from reports of servers before the databases engine.)
    #[serde(default)]
    pub orphan_logins: Vec<databases::OrphanLoginRow>,
}

/// Issuances (or refusals) of one issuer's credentials of one kind to one subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRow {
    /// The issuer.
    pub issuer: String,
    /// `jwt`, `x509`, `ssh_user`, `ssh_host` (`ssh` for a refused SSH request).
    pub kind: String,
    /// Whom the credential names (empty for a refusal that named none).
    pub subject: String,
    /// The delegator who asked, if any.
    pub actor: Option<String>,
    /// The key version that signed (0 for refusals).
    pub key_version: u32,
    /// `OK` or the gRPC code name.
    pub outcome: String,
    /// How many, the first and the last (`count`, `first_ms`, `last_ms`, as the usage
    /// rows').
    #[serde(flatten)]
    pub span: Span,
}

/// The operations that issue credentials, and the kind each issues when its record names
/// none (a refusal).
const ISSUANCES: [(&str, &str); 3] = [
    ("IssueJwt", "jwt"),
    ("IssueX509", "x509"),
    ("IssueSsh", "ssh"),
];

/// Successful reads of one secret's version by one principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretReadRow {
    /// The secret's path.
    pub path: String,
    /// The version read.
    pub version: u64,
    /// Who read it.
    pub principal: String,
    /// How many reads, the first and the last.
    pub span: Span,
}

/// Ceremony calls of one share set, share, principal, operation, step and outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyRow {
    /// The share set the share belonged to (or the server's, when none was given).
    pub share_set: String,
    /// The share's index, if a share was given and read.
    pub share_index: Option<u8>,
    /// Who.
    pub principal: String,
    /// e.g. `VerifyShare`.
    pub operation: String,
    /// A rekey's step, empty otherwise.
    pub step: String,
    /// `OK` or the gRPC code name.
    pub outcome: String,
    /// How many, first and last.
    pub span: Span,
}

/// A key as the report needs it: its versions' states and its primary.
#[derive(Debug, Clone)]
pub(crate) struct KeyInfo {
    /// The key's name, as records name it.
    pub name: String,
    /// The primary version.
    pub primary: u32,
    /// Each version and its state name.
    pub versions: Vec<(u32, String)>,
}

/// Operations that decrypt with the version they name.
const DECRYPTS: &[&str] = &[
    "Decrypt",
    "BatchDecrypt",
    "ReEncrypt",
    "BatchReEncrypt",
    "AsymmetricDecrypt",
];

/// Outcomes that are refusals rather than failures.
const REFUSALS: &[&str] = &["PERMISSION_DENIED", "UNAUTHENTICATED"];

/// Operations that administer a key rather than use it: counted in the tables, but not
/// as use (a version that was only created or rotated to is unused).
const ADMIN: &[&str] = &[
    "CreateKey",
    "GetKey",
    "ListKeys",
    "RotateKey",
    "UpdateKey",
    "EnableKeyVersion",
    "DisableKeyVersion",
    "ScheduleKeyVersionDestruction",
    "CancelKeyVersionDestruction",
    "AutoRotateKey",
    "DestroyKeyVersion",
    "GetImportParameters",
    "ImportKeyMaterial",
    "ExpireImportParameters",
    "CreateGrant",
    "RevokeGrant",
];

/// (key, version, principal, operation, outcome).
type RowKey = (String, Option<u32>, String, String, String);
/// (principal, operation, key, secret path, outcome).
type RefusedKey = (String, String, Option<String>, Option<String>, String);
/// (share set, share index, principal, operation, step, outcome).
type CustodyKey = (String, Option<u8>, String, String, String, String);
/// (path, version, principal).
type SecretReadKey = (String, u64, String);
/// (issuer, kind, subject, actor, key version, outcome).
type CredentialKey = (String, String, String, Option<String>, u32, String);

/// Builds a [`UsageReport`] from the records of a period, one at a time.
pub(crate) struct UsageBuilder {
    filter: Filter,
    records: u64,
    rows: BTreeMap<RowKey, Span>,
    refused: BTreeMap<RefusedKey, Span>,
    custody: BTreeMap<CustodyKey, Span>,
    secret_reads: BTreeMap<SecretReadKey, Span>,
    credentials: BTreeMap<CredentialKey, Span>,
    databases: databases::DatabaseTally,
    /// (time, key, successful uses, refusals).
    events: Vec<(u64, String, u64, u64)>,
}

impl UsageBuilder {
    /// A report over the records `filter` matches (its time range, key and principal).
    pub(crate) fn new(filter: Filter) -> Self {
        Self {
            filter,
            records: 0,
            rows: BTreeMap::new(),
            refused: BTreeMap::new(),
            custody: BTreeMap::new(),
            secret_reads: BTreeMap::new(),
            credentials: BTreeMap::new(),
            databases: databases::DatabaseTally::default(),
            events: Vec::new(),
        }
    }

    fn row(
        &mut self,
        key: &str,
        version: Option<u32>,
        e: &AuditEvent,
        op: &str,
        outcome: &str,
        n: u64,
    ) {
        self.rows
            .entry((
                key.to_owned(),
                version,
                e.principal.clone(),
                op.to_owned(),
                outcome.to_owned(),
            ))
            .or_default()
            .add(n, e.time_ms);
    }

    /// Counts one record (records the filter does not match are ignored).
    pub(crate) fn add(&mut self, e: &AuditEvent) {
        if !self.filter.matches(e) {
            return;
        }
        self.records += 1;
        let t = e.time_ms;
        if let Some(c) = &e.ceremony {
            self.custody
                .entry((
                    c.share_set.clone(),
                    c.share_index,
                    e.principal.clone(),
                    e.operation.clone(),
                    c.step.clone(),
                    e.outcome.clone(),
                ))
                .or_default()
                .add(1, t);
        }
        if let Some(s) = &e.secret
            && e.operation == "GetSecret"
            && e.outcome == "OK"
        {
            for v in &s.versions {
                self.secret_reads
                    .entry((s.path.clone(), *v, e.principal.clone()))
                    .or_default()
                    .add(1, t);
            }
        }
        if let (Some(c), Some((_, kind))) = (
            &e.credential,
            ISSUANCES.iter().find(|(op, _)| *op == e.operation),
        ) {
            let kind = if c.kind.is_empty() {
                kind
            } else {
                c.kind.as_str()
            };
            // A request that named no subject asked for the caller itself.
            let subject = if c.subject.is_empty() {
                &e.principal
            } else {
                &c.subject
            };
            self.credentials
                .entry((
                    c.issuer.clone(),
                    (*kind).to_owned(),
                    subject.clone(),
                    c.actor.clone(),
                    c.key_version,
                    e.outcome.clone(),
                ))
                .or_default()
                .add(1, t);
        }
        self.databases.add(e);
        if REFUSALS.contains(&e.outcome.as_str()) {
            // A record of calls counted together (callers without a certificate; no key)
            // stands for its batch's calls.
            let calls = match (&e.key, &e.batch) {
                (None, Some(b)) => b.items,
                _ => 1,
            };
            // A secret call names its path (empty for the engine's configuration: no secret).
            let secret_path = e
                .secret
                .as_ref()
                .map(|s| s.path.clone())
                .filter(|p| !p.is_empty());
            self.refused
                .entry((
                    e.principal.clone(),
                    e.operation.clone(),
                    e.key.clone(),
                    secret_path,
                    e.outcome.clone(),
                ))
                .or_default()
                .add(calls, t);
            // Only a key feeds the timeline; a refused secret call is in `refused` only.
            if let Some(key) = &e.key {
                self.events.push((t, key.clone(), 0, 1));
            }
            return;
        }
        let Some(key) = &e.key else {
            return;
        };
        let mut ok = 0;
        match &e.batch {
            Some(b) => {
                for (&v, &n) in &b.versions {
                    self.row(key, Some(v), e, &e.operation, "OK", n);
                    ok += n;
                }
                for (outcome, &n) in b.outcomes.iter().filter(|(o, _)| *o != "OK") {
                    self.row(key, None, e, &e.operation, outcome, n);
                }
                if e.outcome != "OK" {
                    self.row(key, None, e, &e.operation, &e.outcome, 1);
                }
                // BatchReEncrypt: its successful items made ciphertexts under the
                // destination (its version, when the record names one).
                if let Some(dest) = &e.destination_key
                    && e.outcome == "OK"
                {
                    let made = b.outcomes.get("OK").copied().unwrap_or(0);
                    if made > 0 {
                        self.row(
                            dest,
                            e.destination_key_version,
                            e,
                            "ReEncryptTo",
                            "OK",
                            made,
                        );
                        if dest != key {
                            self.events.push((t, dest.clone(), made, 0));
                        }
                    }
                }
            }
            None => {
                self.row(key, e.key_version, e, &e.operation, &e.outcome, 1);
                if e.outcome == "OK" && !ADMIN.contains(&e.operation.as_str()) {
                    ok += 1;
                }
                if let Some(dest) = &e.destination_key {
                    self.row(
                        dest,
                        e.destination_key_version,
                        e,
                        "ReEncryptTo",
                        &e.outcome,
                        1,
                    );
                    if e.outcome == "OK" && dest != key {
                        self.events.push((t, dest.clone(), 1, 0));
                    }
                }
            }
        }
        if ok > 0 {
            self.events.push((t, key.clone(), ok, 0));
        }
    }

    /// The report, given the keys as they are now.
    pub(crate) fn finish(self, keys: &[KeyInfo]) -> UsageReport {
        let (unused, below) = self.findings(keys);
        let (bucket_ms, timeline) = self.timeline();
        let summaries = self.summaries();
        let (database_credentials, orphan_logins) = self.databases.finish();
        UsageReport {
            since_ms: self.filter.since_ms,
            until_ms: self.filter.until_ms,
            key: self.filter.key.clone(),
            principal: self.filter.principal.clone(),
            records: self.records,
            keys: summaries,
            usage: self
                .rows
                .into_iter()
                .map(
                    |((key, version, principal, operation, outcome), span)| UsageRow {
                        key,
                        version,
                        principal,
                        operation,
                        outcome,
                        span,
                    },
                )
                .collect(),
            refused: self
                .refused
                .into_iter()
                .map(
                    |((principal, operation, key, secret_path, outcome), span)| RefusedRow {
                        principal,
                        operation,
                        key,
                        secret_path,
                        outcome,
                        span,
                    },
                )
                .collect(),
            unused,
            decrypt_below_primary: below,
            bucket_ms,
            timeline,
            custody: self
                .custody
                .into_iter()
                .map(
                    |((share_set, share_index, principal, operation, step, outcome), span)| {
                        CustodyRow {
                            share_set,
                            share_index,
                            principal,
                            operation,
                            step,
                            outcome,
                            span,
                        }
                    },
                )
                .collect(),
            secret_reads: self
                .secret_reads
                .into_iter()
                .map(|((path, version, principal), span)| SecretReadRow {
                    path,
                    version,
                    principal,
                    span,
                })
                .collect(),
            credentials: self
                .credentials
                .into_iter()
                .map(
                    |((issuer, kind, subject, actor, key_version, outcome), span)| CredentialRow {
                        issuer,
                        kind,
                        subject,
                        actor,
                        key_version,
                        outcome,
                        span,
                    },
                )
                .collect(),
            database_credentials,
            orphan_logins,
        }
    }

    /// One summary per key (OK, failed, refused, distinct principals, first and last),
    /// busiest first.
    fn summaries(&self) -> Vec<KeySummary> {
        let mut summaries: BTreeMap<String, (KeySummary, BTreeSet<String>, Span)> = BTreeMap::new();
        let mut add =
            |key: &str, principal: &str, span: &Span, ok: u64, failed: u64, refused: u64| {
                let (s, who, all) = summaries.entry(key.to_owned()).or_insert_with(|| {
                    (
                        KeySummary {
                            key: key.to_owned(),
                            ok: 0,
                            failed: 0,
                            refused: 0,
                            principals: 0,
                            first_ms: 0,
                            last_ms: 0,
                        },
                        BTreeSet::new(),
                        Span::default(),
                    )
                });
                s.ok += ok;
                s.failed += failed;
                s.refused += refused;
                who.insert(principal.to_owned());
                if all.count == 0 {
                    *all = *span;
                } else {
                    all.count += span.count;
                    all.first_ms = all.first_ms.min(span.first_ms);
                    all.last_ms = all.last_ms.max(span.last_ms);
                }
            };
        for ((key, _, principal, _, outcome), span) in &self.rows {
            let ok = outcome == "OK";
            add(
                key,
                principal,
                span,
                if ok { span.count } else { 0 },
                if ok { 0 } else { span.count },
                0,
            );
        }
        // Keys only: a refused secret call (its path aside) makes no key summary.
        for ((principal, _, key, _, _), span) in &self.refused {
            if let Some(key) = key {
                add(key, principal, span, 0, 0, span.count);
            }
        }
        let mut out: Vec<KeySummary> = summaries
            .into_values()
            .map(|(mut s, who, all)| {
                s.principals = who.len() as u64;
                s.first_ms = all.first_ms;
                s.last_ms = all.last_ms;
                s
            })
            .collect();
        out.sort_by(|a, b| {
            (b.ok + b.failed + b.refused)
                .cmp(&(a.ok + a.failed + a.refused))
                .then_with(|| a.key.cmp(&b.key))
        });
        out
    }

    /// OK uses (administration aside) of one key version, of `ops` only when given.
    fn ok_uses(&self, key: &str, v: u32, ops: Option<&[&str]>) -> u64 {
        self.rows
            .iter()
            .filter(|((k, version, _, op, outcome), _)| {
                k == key
                    && *version == Some(v)
                    && outcome == "OK"
                    && !ADMIN.contains(&op.as_str())
                    && ops.is_none_or(|ops| ops.contains(&op.as_str()))
            })
            .map(|(_, span)| span.count)
            .sum()
    }

    /// The versions never used (destroyed ones aside), and the versions below their key's
    /// primary that still decrypt, with how often. Only keys the report covers (all, or the
    /// one its filter names).
    fn findings(&self, keys: &[KeyInfo]) -> (Vec<VersionRef>, Vec<VersionRef>) {
        let mut unused = Vec::new();
        let mut below = Vec::new();
        for k in keys
            .iter()
            .filter(|k| self.filter.key.as_ref().is_none_or(|f| *f == k.name))
        {
            for (v, state) in &k.versions {
                let at = |count| VersionRef {
                    key: k.name.clone(),
                    version: *v,
                    state: state.clone(),
                    count,
                };
                if state != "DESTROYED" && self.ok_uses(&k.name, *v, None) == 0 {
                    unused.push(at(0));
                }
                let decrypts = self.ok_uses(&k.name, *v, Some(DECRYPTS));
                if *v < k.primary && decrypts > 0 {
                    below.push(at(decrypts));
                }
            }
        }
        (unused, below)
    }

    /// Uses and refusals per key in buckets of a readable width over the period: the
    /// busiest [`TOP_KEYS`] keys by name, the rest as [`OTHER_KEYS`], every bucket present.
    fn timeline(&self) -> (u64, Vec<Bucket>) {
        let (lo, hi) = match (self.events.first(), self.events.last()) {
            (Some(a), Some(b)) => (
                self.filter.since_ms.unwrap_or(a.0),
                self.filter.until_ms.unwrap_or(b.0 + 1),
            ),
            _ => (0, 0),
        };
        let bucket_ms = bucket_width(hi.saturating_sub(lo));
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, key, ok, refused) in &self.events {
            *totals.entry(key).or_default() += ok + refused;
        }
        let mut ranked: Vec<(&str, u64)> = totals.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let shown: Vec<&str> = ranked.iter().take(TOP_KEYS).map(|(k, _)| *k).collect();
        let others = ranked.len() > TOP_KEYS;
        let mut series: Vec<&str> = shown.clone();
        if others {
            series.push(OTHER_KEYS);
        }
        let starts: Vec<u64> = if self.events.is_empty() {
            Vec::new()
        } else {
            (lo..hi.max(lo + 1))
                .step_by(usize::try_from(bucket_ms).unwrap_or(usize::MAX))
                .collect()
        };
        let mut counts: BTreeMap<(u64, &str), (u64, u64)> = BTreeMap::new();
        for (t, key, ok, refused) in &self.events {
            let start = lo + (t.saturating_sub(lo) / bucket_ms) * bucket_ms;
            let name = if shown.contains(&key.as_str()) {
                key.as_str()
            } else {
                OTHER_KEYS
            };
            let c = counts.entry((start, name)).or_default();
            c.0 += ok;
            c.1 += refused;
        }
        let mut buckets = Vec::with_capacity(starts.len() * series.len());
        for start in starts {
            for key in &series {
                let (ok, refused) = counts.get(&(start, *key)).copied().unwrap_or_default();
                buckets.push(Bucket {
                    start_ms: start,
                    key: (*key).to_owned(),
                    ok,
                    refused,
                });
            }
        }
        (bucket_ms, buckets)
    }
}

/// A readable bucket width giving at most about 60 buckets over `span` ms.
fn bucket_width(span: u64) -> u64 {
    const WIDTHS: &[u64] = &[
        1_000,
        10_000,
        60_000,
        300_000,
        900_000,
        3_600_000,
        21_600_000,
        86_400_000,
        604_800_000,
    ];
    WIDTHS
        .iter()
        .copied()
        .find(|w| span / w <= 60)
        .unwrap_or(2_592_000_000)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
