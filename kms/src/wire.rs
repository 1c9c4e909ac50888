//! Every conversion between protobuf messages and domain types, both ways, in one place
//! (rust-analyzer's `to_proto` / `from_proto`): the gRPC services and the `kms` command
//! line both use it. `*_pb` makes a message from a domain value; `*_from` reads one, and a
//! value the domain does not know is a typed bad request.

use kms_proto::v1 as pb;

use crate::audit::report::databases::{DatabaseRow, OrphanLoginRow, OutcomeCount};
use crate::audit::report::{
    Bucket, CredentialRow, CustodyRow, Filter, KeySummary, RefusedRow, SecretReadRow, Span,
    UsageReport, UsageRow, VersionRef,
};
use crate::keyring::grants::Grant;
use crate::keyring::material::SignatureEncoding;
use crate::keyring::model::{Algorithm, KeyMeta, Origin, Protection, Purpose, VersionState};
use crate::keyring::{KeyringError, Wrapping};
use crate::policy::Operation;
use crate::seal::{InitOutput, RekeyStep, SealStatus, VerifiedShare};

/// The message of an audit filter whose `since` is not before its `until`.
pub(crate) const SINCE_BEFORE_UNTIL: &str = "since must be before until";

/// The longest text filter (key, principal, operation, outcome) an auditor may give: the
/// filter is echoed in the export's header.
const MAX_FILTER_LEN: usize = 2048;

/// Unix seconds as the API carries them.
fn secs(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// A key as the API shows it (states as `KeyVersionState`, times in Unix seconds).
pub(crate) fn key_pb(m: &KeyMeta) -> pb::Key {
    pb::Key {
        name: m.name.clone(),
        purpose: match m.purpose {
            Purpose::EncryptDecrypt => pb::Purpose::EncryptDecrypt,
            Purpose::SignVerify => pb::Purpose::SignVerify,
            Purpose::Mac => pb::Purpose::Mac,
            Purpose::AsymmetricDecrypt => pb::Purpose::AsymmetricDecrypt,
        } as i32,
        algorithm: algorithm_pb(m.algorithm) as i32,
        protection_level: protection_pb(m.protection) as i32,
        primary_version: m.primary,
        min_decryption_version: m.min_decryption_version,
        rotation_period_seconds: m.rotation_period.unwrap_or(0),
        next_rotation_time: m.next_rotation_at.map(secs).unwrap_or(0),
        labels: m.labels.clone().into_iter().collect(),
        versions: m
            .versions
            .iter()
            .map(|v| {
                let (state, destroy_time, destroyed_time) = match v.state {
                    VersionState::Enabled => (pb::KeyVersionState::Enabled, 0, 0),
                    VersionState::Disabled => (pb::KeyVersionState::Disabled, 0, 0),
                    VersionState::ScheduledForDestruction { destroy_at } => (
                        pb::KeyVersionState::ScheduledForDestruction,
                        secs(destroy_at),
                        0,
                    ),
                    VersionState::Destroyed { destroyed_at } => {
                        (pb::KeyVersionState::Destroyed, 0, secs(destroyed_at))
                    }
                };
                pb::KeyVersion {
                    origin: origin_pb(v.origin) as i32,
                    version: v.version,
                    state: state as i32,
                    create_time: secs(v.created_at),
                    destroy_time,
                    destroyed_time,
                }
            })
            .collect(),
        create_time: secs(m.created_at),
        origin: origin_pb(m.origin) as i32,
        pending_import: m.versions.is_empty(),
    }
}

/// An API wrapping algorithm; unspecified is a bad request.
pub(crate) fn wrapping_from(v: i32) -> Result<Wrapping, KeyringError> {
    match pb::WrappingAlgorithm::try_from(v) {
        Ok(pb::WrappingAlgorithm::RsaAesKeyWrapSha256) => Ok(Wrapping::RsaAesKeyWrapSha256),
        Ok(pb::WrappingAlgorithm::RsaesOaepSha256) => Ok(Wrapping::RsaesOaepSha256),
        _ => Err(KeyringError::BadRequest(
            "wrapping_algorithm must be RSA_AES_KEY_WRAP_SHA_256 or RSAES_OAEP_SHA_256",
        )),
    }
}

/// An origin as the API spells it.
fn origin_pb(o: Origin) -> pb::KeyOrigin {
    match o {
        Origin::Generated => pb::KeyOrigin::Generated,
        Origin::External => pb::KeyOrigin::External,
    }
}

/// An API origin (unspecified: GENERATED).
pub(crate) fn origin_from(v: i32) -> Result<Origin, KeyringError> {
    match pb::KeyOrigin::try_from(v) {
        Ok(pb::KeyOrigin::Unspecified | pb::KeyOrigin::Generated) => Ok(Origin::Generated),
        Ok(pb::KeyOrigin::External) => Ok(Origin::External),
        Err(_) => Err(KeyringError::BadRequest(
            "origin must be GENERATED or EXTERNAL",
        )),
    }
}

/// An algorithm as the API spells it (the enum value of the same name).
pub fn algorithm_pb(a: Algorithm) -> pb::Algorithm {
    pb::Algorithm::from_str_name(a.name()).unwrap_or(pb::Algorithm::Unspecified)
}

/// The algorithm an API value names, if any.
pub fn algorithm_from_pb(v: i32) -> Option<Algorithm> {
    algorithm_from(v).ok()
}

/// An API algorithm; unspecified or unknown is a bad request.
pub(crate) fn algorithm_from(v: i32) -> Result<Algorithm, KeyringError> {
    Algorithm::ALL
        .into_iter()
        .find(|a| v != 0 && algorithm_pb(*a) as i32 == v)
        .ok_or(KeyringError::BadRequest(
            "algorithm must be one of AES_256_GCM, ED25519, ECDSA_P256_SHA256, ECDSA_P384_SHA384, HMAC_SHA256, RSA_SIGN_PSS_{2048,3072,4096}_SHA256, RSA_SIGN_PKCS1_{2048,3072,4096}_SHA256, RSA_DECRYPT_OAEP_{2048,3072,4096}_SHA256",
        ))
}

/// A protection level as the API spells it.
pub fn protection_pb(p: Protection) -> pb::ProtectionLevel {
    match p {
        Protection::Software => pb::ProtectionLevel::Software,
        Protection::Hsm => pb::ProtectionLevel::Hsm,
    }
}

/// An API protection level (unspecified: SOFTWARE).
pub(crate) fn protection_from(v: i32) -> Result<Protection, KeyringError> {
    match pb::ProtectionLevel::try_from(v) {
        Ok(pb::ProtectionLevel::Unspecified | pb::ProtectionLevel::Software) => {
            Ok(Protection::Software)
        }
        Ok(pb::ProtectionLevel::Hsm) => Ok(Protection::Hsm),
        Err(_) => Err(KeyringError::BadRequest(
            "protection_level must be SOFTWARE or HSM",
        )),
    }
}

/// An API signature format: DER (the default) or raw `r | s` (ECDSA).
pub(crate) fn signature_encoding_from(v: i32) -> Result<SignatureEncoding, KeyringError> {
    match pb::SignatureFormat::try_from(v) {
        Ok(pb::SignatureFormat::Default) => Ok(SignatureEncoding::Der),
        Ok(pb::SignatureFormat::Raw) => Ok(SignatureEncoding::Raw),
        Err(_) => Err(KeyringError::BadRequest("unknown signature format")),
    }
}

/// An operation as the API spells it.
pub fn operation_pb(o: Operation) -> pb::Operation {
    match o {
        Operation::Encrypt => pb::Operation::Encrypt,
        Operation::Decrypt => pb::Operation::Decrypt,
        Operation::ReencryptFrom => pb::Operation::ReencryptFrom,
        Operation::ReencryptTo => pb::Operation::ReencryptTo,
        Operation::Reencrypt => pb::Operation::Reencrypt,
        Operation::GenerateDataKey => pb::Operation::GenerateDataKey,
        Operation::Sign => pb::Operation::Sign,
        Operation::Verify => pb::Operation::Verify,
        Operation::GetPublicKey => pb::Operation::GetPublicKey,
        Operation::Mac => pb::Operation::Mac,
        Operation::VerifyMac => pb::Operation::VerifyMac,
    }
}

/// An API operation; an unknown or unspecified one is a bad request.
pub fn operation_from(v: i32) -> Result<Operation, KeyringError> {
    Ok(match pb::Operation::try_from(v) {
        Ok(pb::Operation::Encrypt) => Operation::Encrypt,
        Ok(pb::Operation::Decrypt) => Operation::Decrypt,
        Ok(pb::Operation::ReencryptFrom) => Operation::ReencryptFrom,
        Ok(pb::Operation::ReencryptTo) => Operation::ReencryptTo,
        Ok(pb::Operation::Reencrypt) => {
            return Err(KeyringError::BadRequest(
                "the operation reencrypt was split: grant reencrypt-from on the source key and reencrypt-to on the destination key",
            ));
        }
        Ok(pb::Operation::GenerateDataKey) => Operation::GenerateDataKey,
        Ok(pb::Operation::Sign) => Operation::Sign,
        Ok(pb::Operation::Verify) => Operation::Verify,
        Ok(pb::Operation::GetPublicKey) => Operation::GetPublicKey,
        Ok(pb::Operation::Mac) => Operation::Mac,
        Ok(pb::Operation::VerifyMac) => Operation::VerifyMac,
        Ok(pb::Operation::Unspecified) | Err(_) => {
            return Err(KeyringError::BadRequest(
                "unknown operation: use encrypt, decrypt, reencrypt-from, reencrypt-to, generate-data-key, sign, verify, get-public-key, mac, verify-mac",
            ));
        }
    })
}

/// A grant as the API shows it (never the associated data, only whether it is constrained).
pub(crate) fn grant_pb(g: &Grant) -> pb::Grant {
    pb::Grant {
        id: g.id.clone(),
        key: g.key.clone(),
        principal: g.principal.to_string(),
        operations: g
            .operations
            .iter()
            .map(|o| operation_pb(*o) as i32)
            .collect(),
        requires_associated_data: g.associated_data_mac.is_some(),
        create_time: i64::try_from(g.created_at).unwrap_or(i64::MAX),
        created_by: g.created_by.clone(),
    }
}

/// Init's answer: the shares, once.
pub(crate) fn init_pb(out: &InitOutput) -> pb::InitResponse {
    pb::InitResponse {
        shares: out.shares.iter().map(|s| s.as_str().to_owned()).collect(),
        share_set_id: out.share_set_id.to_string(),
        threshold: u32::from(out.threshold),
        audit_key_fingerprint: out.audit_key_fingerprint.clone(),
        shares_sealed: out.sealed,
        master_key_reused: out.master_key_reused,
        master_key_label: out.master_key_label.clone(),
        master_key_id: out.master_key_id.clone().unwrap_or_default(),
    }
}

/// A rekey submission's answer: the status, and the new shares once.
pub(crate) fn rekey_step_pb(step: &RekeyStep) -> pb::RekeySubmitResponse {
    pb::RekeySubmitResponse {
        status: Some(status_pb(&step.status)),
        shares: step
            .new_shares
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        shares_sealed: step.sealed,
        recipients: step.recipients.clone(),
        committed_share_set_id: step.committed.map(|s| s.to_string()).unwrap_or_default(),
    }
}

/// verify-share's answer.
pub(crate) fn verified_pb(v: &VerifiedShare) -> pb::VerifyShareResponse {
    pb::VerifyShareResponse {
        share_set_id: v.share_set.to_string(),
        share_index: u32::from(v.index),
        threshold: u32::from(v.threshold),
    }
}

/// The seal status as the API shows it.
pub(crate) fn status_pb(s: &SealStatus) -> pb::SealStatus {
    pb::SealStatus {
        initialized: s.initialized,
        sealed: s.sealed,
        threshold: u32::from(s.threshold),
        shares: u32::from(s.shares),
        progress: u32::from(s.progress),
        nonce: s.nonce.clone().unwrap_or_default(),
        share_set_id: s.share_set_id.map(|i| i.to_string()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hsm_pin_in_shares: s.pin_in_shares,
        server: crate::node::identity().to_owned(),
        hsm_available: s.hsm_available,
        instance_id: s.instance.clone().unwrap_or_default(),
        restored_from_instance_ids: s.restored_from.clone(),
        rekey: s.rekey.as_ref().map(|r| pb::RekeyProgress {
            phase: if r.verifying {
                "verifying"
            } else {
                "collecting"
            }
            .to_owned(),
            nonce: r.nonce.clone(),
            new_share_set_id: r.new_share_set_id.to_string(),
            new_shares: u32::from(r.new_shares),
            new_threshold: u32::from(r.new_threshold),
            progress: u32::from(r.progress),
            required: u32::from(r.required),
            sealed_to_recipients: r.sealed_to_recipients,
        }),
    }
}

/// An audit filter, checked: bounded printable texts, `since` before `until`; empty fields match everything.
pub(crate) fn filter_from(f: Option<pb::AuditFilter>) -> Result<Filter, KeyringError> {
    let f = f.unwrap_or_default();
    // The filter is echoed in the export's header: bounded and printable.
    for t in [&f.key, &f.principal, &f.operation, &f.outcome] {
        if t.len() > MAX_FILTER_LEN || t.chars().any(char::is_control) {
            return Err(KeyringError::BadRequest(
                "a filter is longer than 2048 bytes or holds control characters",
            ));
        }
    }
    let text = |s: String| Some(s).filter(|s| !s.is_empty());
    let filter = Filter {
        since_ms: Some(f.since_unix_ms).filter(|t| *t != 0),
        until_ms: Some(f.until_unix_ms).filter(|t| *t != 0),
        key: text(f.key),
        principal: text(f.principal),
        operation: text(f.operation),
        outcome: text(f.outcome),
    };
    if let (Some(s), Some(u)) = (filter.since_ms, filter.until_ms)
        && s >= u
    {
        return Err(KeyringError::BadRequest(SINCE_BEFORE_UNTIL));
    }
    Ok(filter)
}

/// The usage report as one message (the service streams it in parts).
pub(crate) fn report_pb(r: UsageReport) -> pb::KeyUsageReportResponse {
    let vref = |v: VersionRef| pb::VersionRef {
        key: v.key,
        version: v.version,
        state: v.state,
        count: v.count,
    };
    pb::KeyUsageReportResponse {
        since_unix_ms: r.since_ms.unwrap_or(0),
        until_unix_ms: r.until_ms.unwrap_or(0),
        key: r.key.unwrap_or_default(),
        principal: r.principal.unwrap_or_default(),
        records: r.records,
        keys: r
            .keys
            .into_iter()
            .map(|k| pb::KeySummary {
                key: k.key,
                ok: k.ok,
                failed: k.failed,
                refused: k.refused,
                principals: k.principals,
                first_unix_ms: k.first_ms,
                last_unix_ms: k.last_ms,
            })
            .collect(),
        rows: r
            .usage
            .into_iter()
            .map(|u| pb::UsageRow {
                key: u.key,
                version: u.version.unwrap_or(0),
                principal: u.principal,
                operation: u.operation,
                outcome: u.outcome,
                count: u.span.count,
                first_unix_ms: u.span.first_ms,
                last_unix_ms: u.span.last_ms,
            })
            .collect(),
        refused: r
            .refused
            .into_iter()
            .map(|f| pb::RefusedCalls {
                principal: f.principal,
                operation: f.operation,
                key: f.key.unwrap_or_default(),
                outcome: f.outcome,
                secret_path: f.secret_path.unwrap_or_default(),
                count: f.span.count,
                first_unix_ms: f.span.first_ms,
                last_unix_ms: f.span.last_ms,
            })
            .collect(),
        unused: r.unused.into_iter().map(vref).collect(),
        decrypt_below_primary: r.decrypt_below_primary.into_iter().map(vref).collect(),
        bucket_ms: r.bucket_ms,
        timeline: r
            .timeline
            .into_iter()
            .map(|b| pb::UsageBucket {
                start_unix_ms: b.start_ms,
                key: b.key,
                ok: b.ok,
                refused: b.refused,
            })
            .collect(),
        generated_unix_ms: crate::audit::now_ms(),
        custody: r
            .custody
            .into_iter()
            .map(|c| pb::CustodyRow {
                share_set_id: c.share_set,
                share_index: c.share_index.map_or(0, u32::from),
                principal: c.principal,
                operation: c.operation,
                step: c.step,
                outcome: c.outcome,
                count: c.span.count,
                first_unix_ms: c.span.first_ms,
                last_unix_ms: c.span.last_ms,
            })
            .collect(),
        secret_reads: r
            .secret_reads
            .into_iter()
            .map(|s| pb::SecretReadRow {
                path: s.path,
                version: s.version,
                principal: s.principal,
                count: s.span.count,
                first_unix_ms: s.span.first_ms,
                last_unix_ms: s.span.last_ms,
            })
            .collect(),
        credentials: r
            .credentials
            .into_iter()
            .map(|c| pb::CredentialRow {
                issuer: c.issuer,
                kind: c.kind,
                subject: c.subject,
                actor: c.actor.unwrap_or_default(),
                key_version: c.key_version,
                outcome: c.outcome,
                count: c.span.count,
                first_unix_ms: c.span.first_ms,
                last_unix_ms: c.span.last_ms,
            })
            .collect(),
        database_credentials: r
            .database_credentials
            .into_iter()
            .map(|d| pb::DatabaseCredentialRow {
                connection: d.connection,
                role: d.role,
                principal: d.principal,
                issued: d.issued,
                renewed: d.renewed,
                revoked: d.revoked,
                expired: d.expired,
                forced: d.forced,
                irrevocable: d.irrevocable,
                scheduled: d.scheduled,
                refused: d
                    .refused
                    .into_iter()
                    .map(|o| pb::OutcomeCount {
                        outcome: o.outcome,
                        count: o.count,
                    })
                    .collect(),
                last_error: d.last_error,
                count: d.span.count,
                first_unix_ms: d.span.first_ms,
                last_unix_ms: d.span.last_ms,
            })
            .collect(),
        orphan_logins: r
            .orphan_logins
            .into_iter()
            .map(|o| pb::OrphanLoginRow {
                connection: o.connection,
                role: o.role,
                count: o.span.count,
                first_unix_ms: o.span.first_ms,
                last_unix_ms: o.span.last_ms,
            })
            .collect(),
    }
}

/// The usage report a client merged from the streamed parts (the inverse of
/// `report_pb`, but for `generated_unix_ms`, which the report does not keep).
pub fn report_from(r: pb::KeyUsageReportResponse) -> UsageReport {
    let vref = |v: pb::VersionRef| VersionRef {
        key: v.key,
        version: v.version,
        state: v.state,
        count: v.count,
    };
    let span = |count, first_ms, last_ms| Span {
        count,
        first_ms,
        last_ms,
    };
    let text = |s: String| Some(s).filter(|s| !s.is_empty());
    UsageReport {
        since_ms: Some(r.since_unix_ms).filter(|t| *t != 0),
        until_ms: Some(r.until_unix_ms).filter(|t| *t != 0),
        key: text(r.key),
        principal: text(r.principal),
        records: r.records,
        keys: r
            .keys
            .into_iter()
            .map(|k| KeySummary {
                key: k.key,
                ok: k.ok,
                failed: k.failed,
                refused: k.refused,
                principals: k.principals,
                first_ms: k.first_unix_ms,
                last_ms: k.last_unix_ms,
            })
            .collect(),
        usage: r
            .rows
            .into_iter()
            .map(|u| UsageRow {
                key: u.key,
                version: Some(u.version).filter(|v| *v != 0),
                principal: u.principal,
                operation: u.operation,
                outcome: u.outcome,
                span: span(u.count, u.first_unix_ms, u.last_unix_ms),
            })
            .collect(),
        refused: r
            .refused
            .into_iter()
            .map(|f| RefusedRow {
                principal: f.principal,
                operation: f.operation,
                key: text(f.key),
                secret_path: text(f.secret_path),
                outcome: f.outcome,
                span: span(f.count, f.first_unix_ms, f.last_unix_ms),
            })
            .collect(),
        unused: r.unused.into_iter().map(vref).collect(),
        decrypt_below_primary: r.decrypt_below_primary.into_iter().map(vref).collect(),
        bucket_ms: r.bucket_ms,
        timeline: r
            .timeline
            .into_iter()
            .map(|b| Bucket {
                start_ms: b.start_unix_ms,
                key: b.key,
                ok: b.ok,
                refused: b.refused,
            })
            .collect(),
        custody: r
            .custody
            .into_iter()
            .map(|c| CustodyRow {
                share_set: c.share_set_id,
                share_index: u8::try_from(c.share_index).ok().filter(|i| *i != 0),
                principal: c.principal,
                operation: c.operation,
                step: c.step,
                outcome: c.outcome,
                span: span(c.count, c.first_unix_ms, c.last_unix_ms),
            })
            .collect(),
        secret_reads: r
            .secret_reads
            .into_iter()
            .map(|s| SecretReadRow {
                path: s.path,
                version: s.version,
                principal: s.principal,
                span: span(s.count, s.first_unix_ms, s.last_unix_ms),
            })
            .collect(),
        credentials: r
            .credentials
            .into_iter()
            .map(|c| CredentialRow {
                issuer: c.issuer,
                kind: c.kind,
                subject: c.subject,
                actor: Some(c.actor).filter(|a| !a.is_empty()),
                key_version: c.key_version,
                outcome: c.outcome,
                span: span(c.count, c.first_unix_ms, c.last_unix_ms),
            })
            .collect(),
        database_credentials: r
            .database_credentials
            .into_iter()
            .map(|d| DatabaseRow {
                connection: d.connection,
                role: d.role,
                principal: d.principal,
                issued: d.issued,
                renewed: d.renewed,
                revoked: d.revoked,
                expired: d.expired,
                forced: d.forced,
                irrevocable: d.irrevocable,
                scheduled: d.scheduled,
                refused: d
                    .refused
                    .into_iter()
                    .map(|o| OutcomeCount {
                        outcome: o.outcome,
                        count: o.count,
                    })
                    .collect(),
                last_error: d.last_error,
                span: span(d.count, d.first_unix_ms, d.last_unix_ms),
            })
            .collect(),
        orphan_logins: r
            .orphan_logins
            .into_iter()
            .map(|o| OrphanLoginRow {
                connection: o.connection,
                role: o.role,
                span: span(o.count, o.first_unix_ms, o.last_unix_ms),
            })
            .collect(),
    }
}

/// A secret operation as the API names it.
pub fn secret_operation_pb(o: crate::policy::SecretOperation) -> pb::SecretOperation {
    use crate::policy::SecretOperation as S;
    match o {
        S::SecretRead => pb::SecretOperation::Read,
        S::SecretWrite => pb::SecretOperation::Write,
        S::SecretList => pb::SecretOperation::List,
        S::SecretDelete => pb::SecretOperation::Delete,
        S::SecretDestroy => pb::SecretOperation::Destroy,
        S::SecretReadMetadata => pb::SecretOperation::ReadMetadata,
    }
}

/// A secret operation from the API; unspecified or unknown values are refused.
pub(crate) fn secret_operation_from(
    v: i32,
) -> Result<crate::policy::SecretOperation, crate::secrets::SecretsError> {
    use crate::policy::SecretOperation as S;
    match pb::SecretOperation::try_from(v) {
        Ok(pb::SecretOperation::Read) => Ok(S::SecretRead),
        Ok(pb::SecretOperation::Write) => Ok(S::SecretWrite),
        Ok(pb::SecretOperation::List) => Ok(S::SecretList),
        Ok(pb::SecretOperation::Delete) => Ok(S::SecretDelete),
        Ok(pb::SecretOperation::Destroy) => Ok(S::SecretDestroy),
        Ok(pb::SecretOperation::ReadMetadata) => Ok(S::SecretReadMetadata),
        Ok(pb::SecretOperation::Unspecified) | Err(_) => Err(
            crate::secrets::SecretsError::BadRequest(format!("unknown secret operation {v}")),
        ),
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A version as the metadata lists it, at `now_ms`.
pub(crate) fn secret_version_pb(
    version: u64,
    v: &crate::secrets::model::Version,
    now_ms: u64,
) -> pb::SecretVersion {
    pb::SecretVersion {
        version,
        create_time: ms(v.created_ms),
        deletion_time: v.deletion_ms.map_or(0, ms),
        destroyed: v.destroyed,
        deleted: v.state(now_ms) == crate::secrets::model::State::Deleted,
    }
}

/// A secret's metadata.
pub(crate) fn secret_metadata_pb(
    path: &str,
    m: &crate::secrets::model::Metadata,
    now_ms: u64,
) -> pb::SecretMetadata {
    pb::SecretMetadata {
        path: path.to_owned(),
        current_version: m.current,
        oldest_version: m.oldest(),
        max_versions: m.max_versions,
        cas_required: m.cas_required,
        delete_version_after_seconds: m.delete_version_after,
        custom_metadata: m.custom.clone(),
        create_time: ms(m.created_ms),
        update_time: ms(m.updated_ms),
        versions: m
            .versions
            .iter()
            .map(|(n, v)| secret_version_pb(*n, v, now_ms))
            .collect(),
    }
}

/// The secrets engine's configuration.
pub(crate) fn secrets_config_pb(c: &crate::secrets::Config) -> pb::SecretsConfig {
    pb::SecretsConfig {
        max_versions: c.max_versions,
        cas_required: c.cas_required,
        delete_version_after_seconds: c.delete_version_after,
    }
}

/// A grant on secrets.
pub(crate) fn secret_grant_pb(g: &crate::secrets::SecretGrant) -> pb::SecretGrant {
    pb::SecretGrant {
        id: g.id.clone(),
        path: g.path.as_str().to_owned(),
        principal: g.principal.to_string(),
        operations: g
            .operations
            .iter()
            .map(|o| secret_operation_pb(*o) as i32)
            .collect(),
        create_time: ms(g.created_ms),
        created_by: g.created_by.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused call's key and secret path cross the wire both ways; empty is none.
    #[test]
    fn refused_rows_keep_their_key_and_secret_path() {
        let refused = |key: Option<&str>, path: Option<&str>| RefusedRow {
            principal: "mallory".into(),
            operation: "GetSecret".into(),
            key: key.map(Into::into),
            secret_path: path.map(Into::into),
            outcome: "PERMISSION_DENIED".into(),
            span: Span {
                count: 2,
                first_ms: 1,
                last_ms: 3,
            },
        };
        let report = UsageReport {
            since_ms: None,
            until_ms: None,
            key: None,
            principal: None,
            records: 3,
            keys: Vec::new(),
            usage: Vec::new(),
            refused: vec![
                refused(None, Some("db/pw")),
                refused(Some("payments"), None),
                refused(None, None),
            ],
            unused: Vec::new(),
            decrypt_below_primary: Vec::new(),
            bucket_ms: 1000,
            timeline: Vec::new(),
            custody: Vec::new(),
            secret_reads: Vec::new(),
            credentials: vec![CredentialRow {
                issuer: "workloads".into(),
                kind: "jwt".into(),
                subject: "spiffe://a/app".into(),
                actor: Some("spiffe://a/ci".into()),
                key_version: 2,
                outcome: "OK".into(),
                span: Span {
                    count: 3,
                    first_ms: 1,
                    last_ms: 5,
                },
            }],
            database_credentials: vec![DatabaseRow {
                connection: "main".into(),
                role: "readonly".into(),
                principal: "spiffe://a/app".into(),
                issued: 4,
                renewed: 3,
                revoked: 2,
                expired: 1,
                forced: 5,
                irrevocable: 6,
                scheduled: 7,
                refused: vec![
                    OutcomeCount {
                        outcome: "PERMISSION_DENIED".into(),
                        count: 8,
                    },
                    OutcomeCount {
                        outcome: "UNAVAILABLE".into(),
                        count: 9,
                    },
                ],
                last_error: "role is in use".into(),
                span: Span {
                    count: 45,
                    first_ms: 2,
                    last_ms: 6,
                },
            }],
            orphan_logins: vec![OrphanLoginRow {
                connection: "main".into(),
                role: "readonly".into(),
                span: Span {
                    count: 2,
                    first_ms: 3,
                    last_ms: 4,
                },
            }],
        };
        let pb = report_pb(report.clone());
        let refused: Vec<(&str, u64)> = pb
            .database_credentials
            .iter()
            .flat_map(|d| d.refused.iter().map(|o| (o.outcome.as_str(), o.count)))
            .collect();
        assert_eq!(refused, [("PERMISSION_DENIED", 8), ("UNAVAILABLE", 9)]);
        let orphans: Vec<u64> = pb.orphan_logins.iter().map(|o| o.count).collect();
        assert_eq!(orphans, [2]);
        let paths: Vec<&str> = pb.refused.iter().map(|f| f.secret_path.as_str()).collect();
        assert_eq!(paths, ["db/pw", "", ""]);
        assert_eq!(report_from(pb), report);
    }

    /// Every algorithm has its API value, and that value comes back as the same algorithm.
    #[test]
    fn every_algorithm_maps_both_ways() {
        for a in Algorithm::ALL {
            let v = algorithm_pb(a);
            assert_ne!(v, pb::Algorithm::Unspecified, "{a:?}");
            assert_eq!(algorithm_from(v as i32).ok(), Some(a));
        }
        assert!(algorithm_from(0).is_err());
        assert!(algorithm_from(999).is_err());
    }
}
