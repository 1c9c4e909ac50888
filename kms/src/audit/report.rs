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

/// One count in a [`VersionUsage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCount {
    /// e.g. `Encrypt`.
    pub operation: String,
    /// e.g. `OK`.
    pub outcome: String,
    /// How many.
    pub count: u64,
}

/// A key version's use in the period. `version` is `None` for requests that named the key
/// but failed before a version was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionUsage {
    /// The key's name, as the requests named it.
    pub key: String,
    /// The version number (for usage: `None` when a call failed before one was chosen).
    pub version: Option<u32>,
    /// Counts per operation and outcome.
    pub counts: Vec<UsageCount>,
    /// Distinct principals.
    pub principals: Vec<String>,
    /// First use (Unix ms).
    pub first_use_ms: u64,
    /// Last use (Unix ms).
    pub last_use_ms: u64,
}

/// A key version named in a list of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRef {
    /// The key's name, as the requests named it.
    pub key: String,
    /// The version number (for usage: `None` when a call failed before one was chosen).
    pub version: u32,
    /// Its state now (e.g. `ENABLED`).
    pub state: String,
    /// How many uses (for "decrypt below primary": successful decryptions).
    pub count: u64,
}

/// Successful uses of a key in one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// The bucket's start (Unix ms).
    pub start_ms: u64,
    /// The key's name, as the requests named it.
    pub key: String,
    /// Successful operations.
    pub count: u64,
}

/// The key-usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The period's start (Unix ms), if bounded.
    pub since_ms: Option<u64>,
    /// The period's end (Unix ms), if bounded.
    pub until_ms: Option<u64>,
    /// Records read in the period.
    pub records: u64,
    /// Use per key and version.
    pub usage: Vec<VersionUsage>,
    /// Live versions (not destroyed) with no successful use (a cryptographic operation,
    /// not administration) in the period.
    pub unused: Vec<VersionRef>,
    /// Versions below the primary that still decrypted successfully in the period: their
    /// data has not been re-encrypted yet.
    pub decrypt_below_primary: Vec<VersionRef>,
    /// The timeline's bucket width (ms).
    pub bucket_ms: u64,
    /// Successful operations per key per bucket.
    pub timeline: Vec<Bucket>,
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

#[derive(Default)]
struct Acc {
    counts: BTreeMap<(String, String), u64>,
    principals: BTreeSet<String>,
    first: u64,
    last: u64,
}

impl Acc {
    fn add(&mut self, op: &str, outcome: &str, n: u64, principal: &str, t: u64) {
        *self
            .counts
            .entry((op.to_owned(), outcome.to_owned()))
            .or_default() += n;
        self.principals.insert(principal.to_owned());
        self.first = if self.first == 0 {
            t
        } else {
            self.first.min(t)
        };
        self.last = self.last.max(t);
    }
}

/// Operations that decrypt with the version they name.
const DECRYPTS: &[&str] = &["Decrypt", "BatchDecrypt", "ReEncrypt"];

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
    "CreateGrant",
    "RevokeGrant",
];

/// Builds a [`UsageReport`] from the records of a period, one at a time.
pub(crate) struct UsageBuilder {
    filter: Filter,
    records: u64,
    acc: BTreeMap<(String, Option<u32>), Acc>,
    /// (key, ok ops) per time.
    events: Vec<(u64, String, u64)>,
}

impl UsageBuilder {
    /// A report over the time range of `filter`.
    pub(crate) fn new(filter: Filter) -> Self {
        Self {
            filter,
            records: 0,
            acc: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    /// Counts one record (records outside the period are ignored).
    pub(crate) fn add(&mut self, e: &AuditEvent) {
        if !self.filter.matches(e) {
            return;
        }
        self.records += 1;
        let t = e.time_ms;
        let Some(key) = &e.key else {
            return;
        };
        let mut ok = 0;
        match &e.batch {
            Some(b) => {
                for (&v, &n) in &b.versions {
                    self.acc.entry((key.clone(), Some(v))).or_default().add(
                        &e.operation,
                        "OK",
                        n,
                        &e.principal,
                        t,
                    );
                    ok += n;
                }
                for (outcome, &n) in b.outcomes.iter().filter(|(o, _)| *o != "OK") {
                    self.acc.entry((key.clone(), None)).or_default().add(
                        &e.operation,
                        outcome,
                        n,
                        &e.principal,
                        t,
                    );
                }
                if e.outcome != "OK" {
                    self.acc.entry((key.clone(), None)).or_default().add(
                        &e.operation,
                        &e.outcome,
                        1,
                        &e.principal,
                        t,
                    );
                }
            }
            None => {
                self.acc
                    .entry((key.clone(), e.key_version))
                    .or_default()
                    .add(&e.operation, &e.outcome, 1, &e.principal, t);
                if e.outcome == "OK" && !ADMIN.contains(&e.operation.as_str()) {
                    ok += 1;
                }
                if let Some(dest) = &e.destination_key {
                    self.acc
                        .entry((dest.clone(), e.destination_key_version))
                        .or_default()
                        .add("ReEncryptTo", &e.outcome, 1, &e.principal, t);
                    if e.outcome == "OK" && dest != key {
                        self.events.push((t, dest.clone(), 1));
                    }
                }
            }
        }
        if ok > 0 {
            self.events.push((t, key.clone(), ok));
        }
    }

    /// The report, given the keys as they are now.
    pub(crate) fn finish(self, keys: &[KeyInfo]) -> UsageReport {
        let (unused, below) = self.findings(keys);
        let (bucket_ms, buckets) = self.timeline();
        UsageReport {
            since_ms: self.filter.since_ms,
            until_ms: self.filter.until_ms,
            records: self.records,
            usage: self
                .acc
                .into_iter()
                .map(|((key, version), a)| VersionUsage {
                    key,
                    version,
                    counts: a
                        .counts
                        .into_iter()
                        .map(|((operation, outcome), count)| UsageCount {
                            operation,
                            outcome,
                            count,
                        })
                        .collect(),
                    principals: a.principals.into_iter().collect(),
                    first_use_ms: a.first,
                    last_use_ms: a.last,
                })
                .collect(),
            unused,
            decrypt_below_primary: below,
            bucket_ms,
            timeline: buckets,
        }
    }

    /// OK uses (administration aside) of one key version, of `ops` only when given.
    fn ok_uses(&self, key: &str, v: u32, ops: Option<&[&str]>) -> u64 {
        self.acc.get(&(key.to_owned(), Some(v))).map_or(0, |a| {
            a.counts
                .iter()
                .filter(|((op, outcome), _)| {
                    outcome == "OK"
                        && !ADMIN.contains(&op.as_str())
                        && ops.is_none_or(|ops| ops.contains(&op.as_str()))
                })
                .map(|(_, n)| n)
                .sum()
        })
    }

    /// The versions never used (destroyed ones aside), and the versions below their key's
    /// primary that still decrypt, with how often.
    fn findings(&self, keys: &[KeyInfo]) -> (Vec<VersionRef>, Vec<VersionRef>) {
        let mut unused = Vec::new();
        let mut below = Vec::new();
        for k in keys {
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

    /// OK uses per key in buckets of a readable width over the report's period.
    fn timeline(&self) -> (u64, Vec<Bucket>) {
        let (lo, hi) = match (self.events.first(), self.events.last()) {
            (Some(a), Some(b)) => (
                self.filter.since_ms.unwrap_or(a.0),
                self.filter.until_ms.unwrap_or(b.0 + 1),
            ),
            _ => (0, 0),
        };
        let bucket_ms = bucket_width(hi.saturating_sub(lo));
        let mut buckets: BTreeMap<(u64, String), u64> = BTreeMap::new();
        for (t, key, n) in &self.events {
            let start = lo + (t.saturating_sub(lo) / bucket_ms) * bucket_ms;
            *buckets.entry((start, key.clone())).or_default() += n;
        }
        let buckets = buckets
            .into_iter()
            .map(|((start_ms, key), count)| Bucket {
                start_ms,
                key,
                count,
            })
            .collect();
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
mod tests {
    use super::*;
    use crate::audit::BatchSummary;

    fn ev(t: u64, op: &str, key: &str, v: Option<u32>, outcome: &str, who: &str) -> AuditEvent {
        AuditEvent {
            time_ms: t,
            principal: who.into(),
            operation: op.into(),
            key: Some(key.into()),
            key_version: v,
            outcome: outcome.into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn counts_unused_and_decrypt_below_primary() {
        let mut b = UsageBuilder::new(Filter {
            since_ms: Some(1000),
            ..Filter::default()
        });
        b.add(&ev(500, "Encrypt", "a", Some(1), "OK", "x")); // before the period
        b.add(&ev(1000, "Encrypt", "a", Some(2), "OK", "x"));
        b.add(&ev(2000, "Encrypt", "a", Some(2), "OK", "y"));
        b.add(&ev(3000, "Decrypt", "a", Some(1), "OK", "y"));
        b.add(&ev(3500, "Decrypt", "a", None, "INVALID_ARGUMENT", "z"));
        b.add(&ev(3600, "RotateKey", "b", Some(1), "OK", "admin")); // not a use
        b.add(&AuditEvent {
            batch: Some(BatchSummary {
                items: 3,
                outcomes: [("OK".to_owned(), 2), ("INVALID_ARGUMENT".to_owned(), 1)].into(),
                versions: [(2, 2)].into(),
            }),
            ..ev(4000, "BatchEncrypt", "a", None, "OK", "x")
        });
        let keys = [
            KeyInfo {
                name: "a".into(),
                primary: 2,
                versions: vec![(1, "ENABLED".into()), (2, "ENABLED".into())],
            },
            KeyInfo {
                name: "b".into(),
                primary: 1,
                versions: vec![(1, "ENABLED".into())],
            },
        ];
        let r = b.finish(&keys);
        assert_eq!(r.records, 6);
        let v2 = r
            .usage
            .iter()
            .find(|u| u.key == "a" && u.version == Some(2))
            .unwrap();
        let count = |op: &str| {
            v2.counts
                .iter()
                .find(|c| c.operation == op && c.outcome == "OK")
                .unwrap()
                .count
        };
        assert_eq!((count("Encrypt"), count("BatchEncrypt")), (2, 2));
        assert_eq!(v2.principals, vec!["x".to_owned(), "y".to_owned()]);
        assert_eq!((v2.first_use_ms, v2.last_use_ms), (1000, 4000));
        let failed = r
            .usage
            .iter()
            .find(|u| u.key == "a" && u.version.is_none())
            .unwrap();
        assert_eq!(failed.counts.iter().map(|c| c.count).sum::<u64>(), 2);
        assert_eq!(
            r.unused
                .iter()
                .map(|u| (u.key.as_str(), u.version))
                .collect::<Vec<_>>(),
            vec![("b", 1)]
        );
        assert_eq!(r.decrypt_below_primary.len(), 1);
        assert_eq!(
            (
                r.decrypt_below_primary[0].version,
                r.decrypt_below_primary[0].count
            ),
            (1, 1)
        );
        assert_eq!(r.timeline.iter().map(|b| b.count).sum::<u64>(), 5);
        assert_eq!(r.bucket_ms, 1000);
    }
}
