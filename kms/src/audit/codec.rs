//! How a record is stored: a compact binary form of exactly the fields of its JSON form.
//!
//! The JSON form (docs/audit.md) is what a record *is*: its hash is SHA-256 over its
//! canonical JSON, exports and archive segments are JSON lines, and offline verification
//! reads nothing else. The store holds the same fields in [postcard]'s wire format (varints,
//! length-prefixed strings, fields in declaration order), with the two hashes as 32 raw
//! bytes and the strings that repeat on every record written small: a request id of 32
//! lowercase hex digits as its 16 bytes, a peer address as 6 or 18 bytes, a service or
//! method name from [`NAMES`] as its index, an outcome as its gRPC code. Decoding gives
//! back exactly the record that was encoded (a property test checks it), so its JSON and
//! its hash are unchanged: a stored record costs about a third of its JSON.
//!
//! Records stored before this form (JSON, first byte `{`) are read as they are, and so are
//! the few records stored as JSON still (a custodians' ceremony, whose summary the compact
//! form has no field for).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{AUDIT_SCHEMA, ArchivedRange, AuditEvent, AuditRecord, BatchSummary, GrantSummary};

/// The first byte of a compact record (a JSON record's is `{`).
const COMPACT: u8 = 2;

/// Service and method names stored as their index. **Append only**: a stored record names
/// an entry by its place in this list (a test pins the list).
pub(crate) const NAMES: &[&str] = &[
    // Services.
    "kms.v1.KeyManagement",
    "kms.v1.System",
    "kms.v1.Audit",
    "kms.v1.Access",
    "kms.Gate",
    "kms.internal",
    "kms.Audit",
    "kms.dev",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    // Methods and internal operations.
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "Sign",
    "Verify",
    "GetPublicKey",
    "Mac",
    "VerifyMac",
    "BatchEncrypt",
    "BatchDecrypt",
    "BatchSign",
    "CreateKey",
    "GetKey",
    "ListKeys",
    "RotateKey",
    "UpdateKey",
    "EnableKeyVersion",
    "DisableKeyVersion",
    "ScheduleKeyVersionDestruction",
    "CancelKeyVersionDestruction",
    "WhoAmI",
    "CreateGrant",
    "RevokeGrant",
    "ListGrants",
    "ExportAuditLog",
    "KeyUsageReport",
    "VerifyAuditLog",
    "Init",
    "Unseal",
    "UnsealReset",
    "Seal",
    "Status",
    "HealthChecks",
    "RateLimited",
    "AutoRotateKey",
    "DestroyKeyVersion",
    "ArchiveSegment",
    "Check",
    "Watch",
    "ServerReflectionInfo",
    "AsymmetricDecrypt",
    "GetImportParameters",
    "ImportKeyMaterial",
    "ExpireImportParameters",
    "BatchReEncrypt",
];

/// gRPC code names by code: the outcome of almost every record.
const OUTCOMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A string from a small known set: its index, or the text.
#[derive(Serialize, Deserialize)]
enum Known<'a> {
    Index(u8),
    Text(&'a str),
}

impl<'a> Known<'a> {
    fn of(text: &'a str, set: &[&str]) -> Self {
        set.iter()
            .position(|n| *n == text)
            .and_then(|i| u8::try_from(i).ok())
            .map_or(Known::Text(text), Known::Index)
    }

    fn text(&self, set: &[&'a str]) -> Option<&'a str> {
        match self {
            Known::Index(i) => set.get(usize::from(*i)).copied(),
            Known::Text(t) => Some(t),
        }
    }
}

/// A request id: the 16 bytes of one the server made (32 lowercase hex digits), or the text
/// a caller gave.
#[derive(Serialize, Deserialize)]
enum RequestId<'a> {
    Hex([u8; 16]),
    Text(&'a str),
}

/// A peer address: IPv4 or IPv6 with its port, or the text (empty for none).
#[derive(Serialize, Deserialize)]
enum Peer<'a> {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
    Text(&'a str),
}

#[derive(Serialize, Deserialize)]
struct Compact<'a> {
    seq: u64,
    time_ms: u64,
    #[serde(borrow)]
    request_id: RequestId<'a>,
    principal: &'a str,
    #[serde(borrow)]
    peer: Peer<'a>,
    #[serde(borrow)]
    service: Known<'a>,
    #[serde(borrow)]
    operation: Known<'a>,
    #[serde(borrow)]
    key: Option<&'a str>,
    key_version: Option<u32>,
    #[serde(borrow)]
    destination_key: Option<&'a str>,
    destination_key_version: Option<u32>,
    #[serde(borrow)]
    outcome: Known<'a>,
    input_bytes: u64,
    output_bytes: u64,
    batch: Option<BatchSummary>,
    grant: Option<GrantSummary>,
    archived: Option<ArchivedRange>,
    prev_hash: [u8; 32],
    hash: [u8; 32],
}

fn hash_bytes(hex: &str) -> Option<[u8; 32]> {
    let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?;
    bytes.try_into().ok()
}

fn request_id(id: &str) -> RequestId<'_> {
    data_encoding::HEXLOWER
        .decode(id.as_bytes())
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map_or(RequestId::Text(id), RequestId::Hex)
}

fn peer(text: &str) -> Peer<'_> {
    // Only an address that prints back exactly as given is stored as bytes.
    match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.to_string() == text => Peer::V4(a.ip().octets(), a.port()),
        Ok(SocketAddr::V6(a))
            if a.to_string() == text && a.flowinfo() == 0 && a.scope_id() == 0 =>
        {
            Peer::V6(a.ip().octets(), a.port())
        }
        _ => Peer::Text(text),
    }
}

/// The stored form of `r`: compact, or its JSON if it has a field the compact form cannot
/// hold exactly (a hash that is not 64 lowercase hex digits, another schema: never for a
/// record the writer made).
pub(crate) fn encode(r: &AuditRecord) -> Result<Vec<u8>, serde_json::Error> {
    let e = &r.event;
    let hashes = hash_bytes(&r.prev_hash).zip(hash_bytes(&r.hash));
    // A ceremony's record (a few a year), and a retry answered from its first answer, are
    // stored as their JSON: the compact form has no place for the summary or the flag.
    let compact_fits = r.schema == AUDIT_SCHEMA
        && e.ceremony.is_none()
        && e.replay_of.is_none()
        && e.front.is_none()
        && e.secret.is_none()
        && e.credential.is_none()
        && e.database.is_none();
    let Some((prev_hash, hash)) = hashes.filter(|_| compact_fits) else {
        return serde_json::to_vec(r);
    };
    let compact = Compact {
        seq: r.seq,
        time_ms: e.time_ms,
        request_id: request_id(&e.request_id),
        principal: &e.principal,
        peer: peer(&e.peer),
        service: Known::of(&e.service, NAMES),
        operation: Known::of(&e.operation, NAMES),
        key: e.key.as_deref(),
        key_version: e.key_version,
        destination_key: e.destination_key.as_deref(),
        destination_key_version: e.destination_key_version,
        outcome: Known::of(&e.outcome, &OUTCOMES),
        input_bytes: e.input_bytes,
        output_bytes: e.output_bytes,
        batch: e.batch.clone(),
        grant: e.grant.clone(),
        archived: e.archived.clone(),
        prev_hash,
        hash,
    };
    let mut out = vec![COMPACT];
    match postcard::to_extend(&compact, out) {
        Ok(v) => {
            out = v;
            Ok(out)
        }
        Err(_) => serde_json::to_vec(r),
    }
}

/// A stored record, in either form; `None` if it is neither.
pub(crate) fn decode(bytes: &[u8]) -> Option<AuditRecord> {
    match bytes.split_first() {
        Some((&COMPACT, rest)) => {
            let c: Compact<'_> = postcard::from_bytes(rest).ok()?;
            let hex = |h: &[u8; 32]| data_encoding::HEXLOWER.encode(h);
            Some(AuditRecord {
                schema: AUDIT_SCHEMA,
                seq: c.seq,
                event: AuditEvent {
                    time_ms: c.time_ms,
                    request_id: match c.request_id {
                        RequestId::Hex(b) => data_encoding::HEXLOWER.encode(&b),
                        RequestId::Text(t) => t.to_owned(),
                    },
                    principal: c.principal.to_owned(),
                    peer: match c.peer {
                        Peer::V4(ip, port) => SocketAddr::from((ip, port)).to_string(),
                        Peer::V6(ip, port) => SocketAddr::from((ip, port)).to_string(),
                        Peer::Text(t) => t.to_owned(),
                    },
                    service: c.service.text(NAMES)?.to_owned(),
                    operation: c.operation.text(NAMES)?.to_owned(),
                    key: c.key.map(str::to_owned),
                    key_version: c.key_version,
                    destination_key: c.destination_key.map(str::to_owned),
                    destination_key_version: c.destination_key_version,
                    outcome: c.outcome.text(&OUTCOMES)?.to_owned(),
                    input_bytes: c.input_bytes,
                    output_bytes: c.output_bytes,
                    batch: c.batch,
                    grant: c.grant,
                    archived: c.archived,
                    ceremony: None,
                    replay_of: None,
                    front: None,
                    secret: None,
                    credential: None,
                    database: None,
                },
                prev_hash: hex(&c.prev_hash),
                hash: hex(&c.hash),
            })
        }
        _ => serde_json::from_slice(bytes).ok(),
    }
}

/// [`line`] of stored bytes, decoding them here.
pub(crate) fn line_of(bytes: &[u8]) -> Vec<u8> {
    line(bytes, decode(bytes).as_ref())
}

/// A stored record as a line of an export or archive segment: its JSON (a JSON record as
/// stored, byte for byte). Bytes that are neither form pass through as they are, for the
/// verifier to name.
pub(crate) fn line(bytes: &[u8], decoded: Option<&AuditRecord>) -> Vec<u8> {
    match (bytes.first(), decoded) {
        (Some(&COMPACT), Some(r)) => serde_json::to_vec(r).unwrap_or_else(|_| bytes.to_vec()),
        _ => bytes.to_vec(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    fn record(event: AuditEvent) -> AuditRecord {
        let mut r = AuditRecord {
            schema: AUDIT_SCHEMA,
            seq: 41,
            event,
            prev_hash: data_encoding::HEXLOWER.encode(&Sha256::digest(b"prev")),
            hash: String::new(),
        };
        r.hash = r.compute_hash().unwrap();
        r
    }

    #[test]
    fn a_typical_record_is_a_third_of_its_json() {
        let mut e = super::super::tests::event(1);
        e.time_ms = 1_790_000_000_000;
        e.request_id = "0123456789abcdef0123456789abcdef".into();
        e.principal = "spiffe://example.org/payments-api".into();
        e.peer = "10.1.2.3:54321".into();
        e.input_bytes = 1061;
        e.output_bytes = 1073;
        let r = record(e);
        let stored = encode(&r).unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        assert!(stored.len() < 170, "{} bytes", stored.len());
        assert!(
            stored.len() * 3 < json.len() + 60,
            "{} vs {}",
            stored.len(),
            json.len()
        );
        let back = decode(&stored).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.compute_hash().unwrap(), r.hash);
        assert_eq!(line(&stored, Some(&back)), json);
    }

    #[test]
    fn json_records_are_read_and_exported_as_stored() {
        let r = record(super::super::tests::event(2));
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode(&json).unwrap(), r);
        assert_eq!(line(&json, Some(&r)), json);
        // What is neither form is not a record, and passes through for the verifier.
        assert!(decode(b"\x02\xff\xff").is_none());
        assert!(decode(b"").is_none());
        assert_eq!(line(b"\x02\xff", None), b"\x02\xff");
    }

    #[test]
    fn a_record_the_compact_form_cannot_hold_is_stored_as_json() {
        let mut r = record(super::super::tests::event(3));
        r.prev_hash = "not hex".into();
        assert_eq!(encode(&r).unwrap(), serde_json::to_vec(&r).unwrap());
    }

    /// The names are stored by index: changing or reordering an entry would change what
    /// every stored record says. Only appending is allowed (then update the count here).
    #[test]
    fn the_name_table_only_grows() {
        let digest = Sha256::digest(NAMES[..53].join("\n").as_bytes());
        assert_eq!(
            data_encoding::HEXLOWER.encode(&digest),
            "6db4e3ca11b63f0bab032ee843da3cb125340b07f7bfc309a06b49f7da6b34da",
            "NAMES changed below entry 53: append new names instead"
        );
        assert!(NAMES.len() <= 256);
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,40}",
            "[0-9a-f]{32}",
            Just("127.0.0.1:8200".to_owned()),
            Just("[::1]:443".to_owned()),
            Just("[fe80::1%2]:443".to_owned()),
            Just("010.0.0.1:1".to_owned()),
            Just("Encrypt".to_owned()),
            Just("OK".to_owned()),
        ]
    }

    proptest! {
        /// Whatever the fields, decoding gives back the record: its JSON and hash unchanged.
        #[test]
        fn decoding_gives_back_the_record(
            seq in any::<u64>(), time_ms in any::<u64>(),
            strings in proptest::collection::vec(text(), 6),
            key in proptest::option::of(text()), version in any::<Option<u32>>(),
            sizes in any::<(u64, u64)>(),
            batch in any::<bool>(),
        ) {
            let event = AuditEvent {
                time_ms,
                request_id: strings[0].clone(),
                principal: strings[1].clone(),
                peer: strings[2].clone(),
                service: strings[3].clone(),
                operation: strings[4].clone(),
                outcome: strings[5].clone(),
                key: key.clone(),
                key_version: version,
                destination_key: key,
                destination_key_version: version,
                input_bytes: sizes.0,
                output_bytes: sizes.1,
                batch: batch.then(|| BatchSummary {
                    items: 3,
                    outcomes: [("OK".to_owned(), 2), ("NOT_FOUND".to_owned(), 1)].into(),
                    versions: [(1, 2)].into(),
                }),
                ..AuditEvent::default()
            };
            let mut r = record(event);
            r.seq = seq;
            let stored = encode(&r).unwrap();
            prop_assert_eq!(stored[0], COMPACT);
            let back = decode(&stored).unwrap();
            prop_assert_eq!(&back, &r);
            prop_assert_eq!(line(&stored, Some(&back)), serde_json::to_vec(&r).unwrap());
        }
    }
}
