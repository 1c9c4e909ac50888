//! What can go wrong in a call, said once for every front: the error
//! ([`ServiceError`]), its transport-neutral kind ([`ErrorKind`], the canonical error
//! codes that gRPC and Google's HTTP APIs share, and that audit records have always
//! spelled outcomes with), its stable machine-readable reason ([`reason_of`]) and the
//! message a caller sees ([`Refusal`]). Each front maps a kind to its own status (the gRPC
//! front to a `tonic::Code`, the HTTP front to a status code) in one match.

use crate::access::Denied;
use crate::credentials::CredentialsError;
use crate::databases::DatabasesError;
use crate::keyring::KeyringError;
use crate::seal::SealError;
use crate::secrets::SecretsError;

/// Any error a call can end with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {
    /// From the seal.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// From the keyring.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// From the secrets engine.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// From the credentials engine.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// From the databases engine.
    #[error(transparent)]
    Databases(#[from] DatabasesError),

    /// The audit log could not be read.
    #[error("the audit log could not be read")]
    AuditRead(#[source] crate::store::StoreError),
    /// The caller may not make this call.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// A backup could not be made.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// Too many failed unseal shares from the caller's address.
    #[error(
        "too many failed unseal shares from this address: try again in {} s",
        .0.as_secs().max(1)
    )]
    UnsealLimited(std::time::Duration),
    /// The caller's idempotency key is not a token.
    #[error(
        "the idempotency-key must be 1 to 128 characters of A-Z a-z 0-9 - _ . : (nothing was done)"
    )]
    BadIdempotencyKey,
    /// The call hands out shares once and the caller's deadline leaves it too little time:
    /// nothing was done.
    #[error(
        "this call hands out shares once, and needs at least {0} s before its deadline: nothing was done (call it without a deadline, or a longer one)"
    )]
    DeadlineTooShort(u64),
    /// The caller's deadline passed before the call began: nothing was done.
    #[error("the call's deadline passed before it began: nothing was done")]
    DeadlineExceeded,
}

/// The kind of a failed call, whatever its transport: the canonical codes (google.rpc.Code)
/// that audit records spell outcomes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// Bad input, including the opaque "decryption failed".
    InvalidArgument,
    /// The caller's deadline passed.
    DeadlineExceeded,
    /// No such key, version or grant.
    NotFound,
    /// The key exists.
    AlreadyExists,
    /// The caller lacks a role or grant.
    PermissionDenied,
    /// Too many of something (failed shares, a key's budget).
    ResourceExhausted,
    /// The lifecycle or the state does not allow it.
    FailedPrecondition,
    /// A bug.
    Internal,
    /// Sealed, or an HSM, store or audit fault: retry.
    Unavailable,
    /// The store was altered or is corrupt.
    DataLoss,
    /// No certificate, or an expired one.
    Unauthenticated,
}

impl ErrorKind {
    /// The canonical name, as audit records spell an outcome (`INVALID_ARGUMENT`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

/// The kind of an error: `UNAVAILABLE` for a sealed server (it will be unsealed:
/// retry), `FAILED_PRECONDITION` for lifecycle and state (uninitialised, wrong purpose,
/// version not enabled), `INVALID_ARGUMENT` for bad input
/// (including the opaque "decryption failed"), `NOT_FOUND`, `ALREADY_EXISTS`,
/// `RESOURCE_EXHAUSTED`, `UNAVAILABLE` for HSM, store and audit faults, `DATA_LOSS` for a
/// store that was altered or is corrupt.
pub(crate) fn kind_of(err: &ServiceError) -> ErrorKind {
    match err {
        ServiceError::Seal(e) => seal_kind(e),
        ServiceError::Keyring(e) => keyring_kind(e),
        ServiceError::Secrets(e) => secrets_kind(e),
        ServiceError::Credentials(e) => credentials_kind(e),
        ServiceError::Databases(e) => databases_kind(e),
        ServiceError::AuditRead(_) => ErrorKind::Unavailable,
        ServiceError::Denied(Denied::Unauthenticated | Denied::Expired) => {
            ErrorKind::Unauthenticated
        }
        ServiceError::Denied(_) => ErrorKind::PermissionDenied,
        ServiceError::UnsealLimited(_) => ErrorKind::ResourceExhausted,
        ServiceError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        ServiceError::BadIdempotencyKey | ServiceError::DeadlineTooShort(_) => {
            ErrorKind::InvalidArgument
        }
        ServiceError::Backup(crate::backup::BackupError::NoSigner) => ErrorKind::FailedPrecondition,
        ServiceError::Backup(_) => ErrorKind::Unavailable,
    }
}

fn seal_kind(e: &SealError) -> ErrorKind {
    match e {
        // Every restart comes up sealed, and a quorum unseals it: retry (as UNAVAILABLE
        // tells standard retry policies to), as for a server that is starting.
        SealError::Sealed => ErrorKind::Unavailable,
        SealError::NotInitialized
        | SealError::AlreadyInitialized
        | SealError::AttemptMismatch
        | SealError::UnsafeMasterKey { .. }
        | SealError::SharesPinRejected(_)
        | SealError::PinModeMismatch { .. }
        | SealError::NoRekey
        | SealError::RekeyInProgress(_)
        | SealError::RecordChanged
        | SealError::NoCommitments
        | SealError::NothingToTakeOver
        | SealError::SameMasterKey => ErrorKind::FailedPrecondition,
        SealError::BadParameters(_)
        | SealError::MalformedShare(_)
        | SealError::WrongShareSet { .. }
        | SealError::WrongThreshold { .. }
        | SealError::DuplicateShare { .. }
        | SealError::UnknownShare { .. }
        | SealError::WrongQuorum
        | SealError::PinRequired
        | SealError::PinNotExpected
        | SealError::InitPinRejected(_)
        | SealError::RetiredShareSet { .. }
        | SealError::NotNewShare { .. }
        | SealError::RecipientCount { .. }
        | SealError::BadRecipient { .. }
        | SealError::BadLabel => ErrorKind::InvalidArgument,
        SealError::RootKeyUnwrap
        | SealError::CorruptRecord
        | SealError::RecordNotAuthentic
        | SealError::RecordKeyMissing(_) => ErrorKind::DataLoss,
        SealError::Keyring(k) => keyring_kind(k),
        SealError::Hsm(_)
        | SealError::Store(_)
        | SealError::Randomness
        | SealError::AuditUnavailable
        | SealError::AuditKeyMissing(_)
        | SealError::ShareSealing => ErrorKind::Unavailable,
    }
}

fn keyring_kind(e: &KeyringError) -> ErrorKind {
    match e {
        KeyringError::BadName
        | KeyringError::BadPattern(_)
        | KeyringError::BadLabels
        | KeyringError::BadRequest(_)
        | KeyringError::TooLarge { .. }
        | KeyringError::TooManyItems { .. }
        | KeyringError::IdempotencyKeyReused
        | KeyringError::BatchTooLarge { .. }
        | KeyringError::DecryptionFailed => ErrorKind::InvalidArgument,
        KeyringError::AlreadyExists(_) => ErrorKind::AlreadyExists,
        KeyringError::NotFound(_)
        | KeyringError::VersionNotFound { .. }
        | KeyringError::GrantNotFound(_) => ErrorKind::NotFound,
        KeyringError::WrongPurpose { .. }
        | KeyringError::VersionNotEnabled { .. }
        | KeyringError::BelowMinimum { .. }
        | KeyringError::NotAllowed(_)
        | KeyringError::PendingImport(_) => ErrorKind::FailedPrecondition,
        KeyringError::Exhausted { .. } => ErrorKind::ResourceExhausted,
        KeyringError::Tampered(_) | KeyringError::HsmKeyMissing => ErrorKind::DataLoss,
        KeyringError::Hsm(_)
        | KeyringError::Store(_)
        | KeyringError::KeyBehind(_)
        | KeyringError::Behind
        | KeyringError::Randomness
        | KeyringError::AuditUnavailable => ErrorKind::Unavailable,
        KeyringError::Internal(_) | KeyringError::Replayed => ErrorKind::Internal,
    }
}

/// An error's machine-readable reason (`google.rpc.ErrorInfo.reason`, docs/api.md), so
/// clients need not match messages. UPPER_SNAKE_CASE, stable: a reason is never renamed.
/// A refusal for want of a grant says `NO_GRANT` whether or not the key exists.
pub(crate) fn reason_of(err: &ServiceError) -> &'static str {
    match err {
        ServiceError::Seal(e) => seal_reason(e),
        ServiceError::Keyring(e) => keyring_reason(e),
        ServiceError::Secrets(e) => secrets_reason(e),
        ServiceError::Credentials(e) => credentials_reason(e),
        ServiceError::Databases(e) => databases_reason(e),
        ServiceError::AuditRead(_) => "AUDIT_UNAVAILABLE",
        ServiceError::Denied(d) => match d {
            Denied::Unauthenticated => "NO_CLIENT_CERTIFICATE",
            Denied::Expired => "CERTIFICATE_EXPIRED",
            Denied::Role { .. } => "NO_ROLE",
            Denied::Grant { .. } | Denied::SecretGrant { .. } => "NO_GRANT",
            Denied::NotTls => "TLS_REQUIRED",
        },
        ServiceError::Backup(crate::backup::BackupError::NoSigner) => "NO_AUDIT_SIGNER",
        ServiceError::Backup(_) => "BACKUP_FAILED",
        ServiceError::UnsealLimited(_) => "TOO_MANY_FAILED_SHARES",
        ServiceError::DeadlineExceeded => "DEADLINE_EXCEEDED",
        ServiceError::BadIdempotencyKey => "INVALID_IDEMPOTENCY_KEY",
        ServiceError::DeadlineTooShort(_) => "DEADLINE_TOO_SHORT",
    }
}

fn seal_reason(e: &SealError) -> &'static str {
    match e {
        SealError::NotInitialized => "NOT_INITIALIZED",
        SealError::AlreadyInitialized => "ALREADY_INITIALIZED",
        SealError::Sealed => "SEALED",
        SealError::AttemptMismatch => "UNSEAL_ATTEMPT_MISMATCH",
        SealError::UnsafeMasterKey { .. } => "UNSAFE_MASTER_KEY",
        SealError::SharesPinRejected(_) | SealError::InitPinRejected(_) => "HSM_PIN_REJECTED",
        SealError::PinModeMismatch { .. } => "PIN_MODE_MISMATCH",
        SealError::NoRekey => "NO_REKEY",
        SealError::RekeyInProgress(_) => "REKEY_IN_PROGRESS",
        SealError::RecordChanged => "SEAL_RECORD_CHANGED",
        SealError::NoCommitments => "NO_SHARE_COMMITMENTS",
        SealError::NothingToTakeOver => "NOTHING_TO_TAKE_OVER",
        SealError::SameMasterKey => "SAME_MASTER_KEY",
        SealError::BadParameters(_) => "INVALID_SHARE_PARAMETERS",
        SealError::MalformedShare(_) => "MALFORMED_SHARE",
        SealError::WrongShareSet { .. } => "WRONG_SHARE_SET",
        SealError::WrongThreshold { .. } => "WRONG_THRESHOLD",
        SealError::DuplicateShare { .. } => "DUPLICATE_SHARE",
        SealError::UnknownShare { .. } => "UNKNOWN_SHARE",
        SealError::WrongQuorum => "WRONG_QUORUM",
        SealError::PinRequired => "HSM_PIN_REQUIRED",
        SealError::PinNotExpected => "HSM_PIN_NOT_EXPECTED",
        SealError::RetiredShareSet { .. } => "RETIRED_SHARE_SET",
        SealError::NotNewShare { .. } => "NOT_A_NEW_SHARE",
        SealError::RecipientCount { .. } => "RECIPIENT_COUNT",
        SealError::BadRecipient { .. } => "INVALID_RECIPIENT",
        SealError::BadLabel => "INVALID_LABEL",
        SealError::RootKeyUnwrap => "ROOT_KEY_UNWRAP_FAILED",
        SealError::CorruptRecord => "SEAL_RECORD_CORRUPT",
        SealError::RecordNotAuthentic => "SEAL_RECORD_NOT_AUTHENTIC",
        SealError::RecordKeyMissing(_) => "SEAL_RECORD_KEY_MISSING",
        SealError::Keyring(k) => keyring_reason(k),
        SealError::Hsm(_) => "HSM_UNAVAILABLE",
        SealError::Store(_) => "STORE_UNAVAILABLE",
        SealError::Randomness => "RANDOMNESS_UNAVAILABLE",
        SealError::AuditUnavailable => "AUDIT_UNAVAILABLE",
        SealError::AuditKeyMissing(_) => "AUDIT_KEY_MISSING",
        SealError::ShareSealing => "SHARE_SEALING_FAILED",
    }
}

fn keyring_reason(e: &KeyringError) -> &'static str {
    match e {
        KeyringError::BadName => "INVALID_KEY_NAME",
        KeyringError::BadPattern(_) => "INVALID_PATTERN",
        KeyringError::BadLabels => "INVALID_LABELS",
        KeyringError::BadRequest(_) => "INVALID_REQUEST",
        KeyringError::TooLarge { .. } => "TOO_LARGE",
        KeyringError::TooManyItems { .. } => "TOO_MANY_ITEMS",
        KeyringError::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
        KeyringError::DecryptionFailed => "DECRYPTION_FAILED",
        KeyringError::AlreadyExists(_) => "KEY_EXISTS",
        KeyringError::NotFound(_) => "KEY_NOT_FOUND",
        KeyringError::VersionNotFound { .. } => "VERSION_NOT_FOUND",
        KeyringError::GrantNotFound(_) => "GRANT_NOT_FOUND",
        KeyringError::WrongPurpose { .. } => "WRONG_PURPOSE",
        KeyringError::VersionNotEnabled { .. } => "VERSION_NOT_ENABLED",
        KeyringError::BelowMinimum { .. } => "VERSION_BELOW_MINIMUM",
        KeyringError::NotAllowed(_) => "NOT_ALLOWED",
        KeyringError::PendingImport(_) => "IMPORT_PENDING",
        KeyringError::Exhausted { .. } => "BUDGET_EXHAUSTED",
        KeyringError::Tampered(_) => "STORE_TAMPERED",
        KeyringError::HsmKeyMissing => "HSM_KEY_MISSING",
        KeyringError::Hsm(_) => "HSM_UNAVAILABLE",
        KeyringError::Store(_) => "STORE_UNAVAILABLE",
        KeyringError::KeyBehind(_) | KeyringError::Behind => "KEYRING_BEHIND",
        KeyringError::Randomness => "RANDOMNESS_UNAVAILABLE",
        KeyringError::AuditUnavailable => "AUDIT_UNAVAILABLE",
        KeyringError::Internal(_) | KeyringError::Replayed => "INTERNAL",
        KeyringError::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
    }
}

fn secrets_kind(e: &SecretsError) -> ErrorKind {
    match e {
        SecretsError::BadPath(_)
        | SecretsError::BadPattern(_)
        | SecretsError::BadRequest(_)
        | SecretsError::TooLarge { .. }
        | SecretsError::PatchTooLarge { .. } => ErrorKind::InvalidArgument,
        SecretsError::SettingsLost => ErrorKind::FailedPrecondition,
        SecretsError::CasRequired
        | SecretsError::CasMismatch { .. }
        | SecretsError::NothingToPatch => ErrorKind::FailedPrecondition,
        SecretsError::NotFound
        | SecretsError::VersionNotFound(_)
        | SecretsError::VersionDeleted(_)
        | SecretsError::VersionDestroyed(_)
        | SecretsError::GrantNotFound(_) => ErrorKind::NotFound,
        SecretsError::Tampered(_) => ErrorKind::DataLoss,
        SecretsError::DropNeedsDestroy(_) => ErrorKind::PermissionDenied,
        SecretsError::Store(_) | SecretsError::AuditUnavailable | SecretsError::Randomness => {
            ErrorKind::Unavailable
        }
        SecretsError::Internal(_) => ErrorKind::Internal,
    }
}

fn credentials_kind(e: &CredentialsError) -> ErrorKind {
    match e {
        CredentialsError::BadRequest(_)
        | CredentialsError::SshKey(_)
        | CredentialsError::BadCsr(_)
        | CredentialsError::BadCaChain(_) => ErrorKind::InvalidArgument,
        CredentialsError::IssuerNotFound(_) => ErrorKind::NotFound,
        CredentialsError::IssuerExists(_) => ErrorKind::AlreadyExists,
        CredentialsError::WrongKind { .. } => ErrorKind::FailedPrecondition,
        CredentialsError::Denied(_) => ErrorKind::PermissionDenied,
        CredentialsError::KeyUnusable(_)
        | CredentialsError::NoHttpsFront
        | CredentialsError::NoCaCertificate => ErrorKind::FailedPrecondition,
        CredentialsError::Tampered(_) => ErrorKind::DataLoss,
        CredentialsError::Keyring(k) => keyring_kind(k),
        CredentialsError::Store(_)
        | CredentialsError::AuditUnavailable
        | CredentialsError::Randomness => ErrorKind::Unavailable,
        CredentialsError::Internal(_) => ErrorKind::Internal,
    }
}

fn databases_kind(e: &DatabasesError) -> ErrorKind {
    match e {
        DatabasesError::BadRequest(_) => ErrorKind::InvalidArgument,
        DatabasesError::ConnectionNotFound(_)
        | DatabasesError::RoleNotFound(_)
        | DatabasesError::LeaseNotFound(_) => ErrorKind::NotFound,
        DatabasesError::Denied(_) => ErrorKind::PermissionDenied,
        DatabasesError::Precondition(_) | DatabasesError::Refused(_) => {
            ErrorKind::FailedPrecondition
        }
        DatabasesError::Tampered(_) => ErrorKind::DataLoss,
        DatabasesError::Busy(_)
        | DatabasesError::Unavailable { .. }
        | DatabasesError::Unreachable { .. }
        | DatabasesError::Store(_)
        | DatabasesError::AuditUnavailable
        | DatabasesError::Randomness => ErrorKind::Unavailable,
        DatabasesError::Internal(_) => ErrorKind::Internal,
    }
}

fn databases_reason(e: &DatabasesError) -> &'static str {
    match e {
        DatabasesError::BadRequest(_) => "INVALID_REQUEST",
        DatabasesError::ConnectionNotFound(_) => "CONNECTION_NOT_FOUND",
        DatabasesError::RoleNotFound(_) => "ROLE_NOT_FOUND",
        DatabasesError::LeaseNotFound(_) => "LEASE_NOT_FOUND",
        DatabasesError::Denied(_) => "NOT_ALLOWED_BY_ROLE",
        DatabasesError::Precondition(_) => "FAILED_PRECONDITION",
        DatabasesError::Refused(_) => "DATABASE_REFUSED",
        DatabasesError::Busy(_) => "LEASE_BUSY",
        DatabasesError::Unavailable { .. } | DatabasesError::Unreachable { .. } => {
            "DATABASE_UNAVAILABLE"
        }
        DatabasesError::Tampered(_) => "STORE_TAMPERED",
        DatabasesError::Store(_) => "STORE_UNAVAILABLE",
        DatabasesError::AuditUnavailable => "AUDIT_UNAVAILABLE",
        DatabasesError::Randomness => "RANDOMNESS_UNAVAILABLE",
        DatabasesError::Internal(_) => "INTERNAL",
    }
}

fn credentials_reason(e: &CredentialsError) -> &'static str {
    match e {
        CredentialsError::BadRequest(_) => "INVALID_REQUEST",
        CredentialsError::SshKey(_) => "INVALID_SSH_PUBLIC_KEY",
        CredentialsError::IssuerNotFound(_) => "ISSUER_NOT_FOUND",
        CredentialsError::IssuerExists(_) => "ISSUER_EXISTS",
        CredentialsError::WrongKind { .. } => "WRONG_ISSUER_KIND",
        CredentialsError::Denied(_) => "NOT_ALLOWED_BY_ISSUER",
        CredentialsError::KeyUnusable(_) => "KEY_CANNOT_SIGN",
        CredentialsError::NoHttpsFront => "NO_HTTPS_FRONT",
        CredentialsError::BadCsr(_) => "BAD_CSR",
        CredentialsError::BadCaChain(_) => "BAD_CA_CERTIFICATE",
        CredentialsError::NoCaCertificate => "NO_CA_CERTIFICATE",
        CredentialsError::Tampered(_) => "STORE_TAMPERED",
        CredentialsError::Keyring(k) => keyring_reason(k),
        CredentialsError::Store(_) => "STORE_UNAVAILABLE",
        CredentialsError::AuditUnavailable => "AUDIT_UNAVAILABLE",
        CredentialsError::Randomness => "RANDOMNESS_UNAVAILABLE",
        CredentialsError::Internal(_) => "INTERNAL",
    }
}

fn secrets_reason(e: &SecretsError) -> &'static str {
    match e {
        SecretsError::BadPath(_) => "INVALID_SECRET_PATH",
        SecretsError::BadPattern(_) => "INVALID_PATTERN",
        SecretsError::BadRequest(_) => "INVALID_REQUEST",
        SecretsError::TooLarge { .. } | SecretsError::PatchTooLarge { .. } => "TOO_LARGE",
        SecretsError::SettingsLost => "SETTINGS_LOST",
        SecretsError::CasRequired => "CAS_REQUIRED",
        SecretsError::CasMismatch { .. } => "CAS_MISMATCH",
        SecretsError::NothingToPatch => "NOTHING_TO_PATCH",
        SecretsError::NotFound => "SECRET_NOT_FOUND",
        SecretsError::VersionNotFound(_) => "VERSION_NOT_FOUND",
        SecretsError::VersionDeleted(_) => "VERSION_DELETED",
        SecretsError::VersionDestroyed(_) => "VERSION_DESTROYED",
        SecretsError::GrantNotFound(_) => "GRANT_NOT_FOUND",
        SecretsError::Tampered(_) => "STORE_TAMPERED",
        SecretsError::DropNeedsDestroy(_) => "NO_GRANT",
        SecretsError::Store(_) => "STORE_UNAVAILABLE",
        SecretsError::AuditUnavailable => "AUDIT_UNAVAILABLE",
        SecretsError::Randomness => "RANDOMNESS_UNAVAILABLE",
        SecretsError::Internal(_) => "INTERNAL",
    }
}

/// What a caller is told of a failed call: its kind, its reason and a message that is
/// never a secret (an internal error says only "internal error").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The kind, which the front maps to its status.
    pub kind: ErrorKind,
    /// The stable reason ([`reason_of`]).
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

impl Refusal {
    /// The answer to a call whose audit record could not be written.
    pub(crate) fn audit_unavailable() -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            reason: "AUDIT_UNAVAILABLE",
            message: AUDIT_UNAVAILABLE.to_owned(),
        }
    }

    /// The answer to a call that failed in a way no error names (its work panicked).
    pub(crate) fn internal() -> Self {
        Self {
            kind: ErrorKind::Internal,
            reason: "INTERNAL",
            message: "internal error".to_owned(),
        }
    }
}

impl From<&ServiceError> for Refusal {
    fn from(err: &ServiceError) -> Self {
        let kind = kind_of(err);
        let message = match kind {
            _ if is_audit_failure(err) => AUDIT_UNAVAILABLE.to_owned(),
            _ if matches!(err, ServiceError::Seal(SealError::Sealed)) => err.to_string(),
            ErrorKind::Unavailable => format!("unavailable: {err}"),
            ErrorKind::Internal => "internal error".to_owned(),
            _ => err.to_string(),
        };
        Self {
            kind,
            reason: reason_of(err),
            message,
        }
    }
}

/// Whether the error is the audit log's failure (whose own line was logged already).
pub(crate) fn is_audit_failure(err: &ServiceError) -> bool {
    matches!(
        err,
        ServiceError::Seal(SealError::AuditUnavailable)
            | ServiceError::Seal(SealError::Keyring(KeyringError::AuditUnavailable))
            | ServiceError::Keyring(KeyringError::AuditUnavailable)
            | ServiceError::Secrets(SecretsError::AuditUnavailable)
            | ServiceError::Credentials(CredentialsError::AuditUnavailable)
            | ServiceError::Databases(DatabasesError::AuditUnavailable)
    )
}

/// The message of every call refused because its audit record could not be written.
pub(crate) const AUDIT_UNAVAILABLE: &str = "audit log unavailable";

/// Writes the error and its whole source chain (PKCS#11 return codes included) to the log.
pub(crate) fn log_error(rpc: &str, key: &str, err: &ServiceError, kind: ErrorKind) {
    let chain = crate::error_chain(err);
    let code = kind.name();
    // A sealed server refusing calls is its state, not a fault.
    let fault = !matches!(err, ServiceError::Seal(SealError::Sealed));
    if fault
        && matches!(
            kind,
            ErrorKind::Unavailable | ErrorKind::DataLoss | ErrorKind::Internal
        )
    {
        tracing::error!(rpc, key, code, error = %chain, "request failed");
    } else {
        tracing::warn!(rpc, key, code, error = %chain, "request refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every engine's audit failure is the one refusal callers see (`audit log
    /// unavailable`, its reason), whatever engine's commit failed.
    #[test]
    fn every_engines_audit_failure_reads_the_same() {
        for err in [
            ServiceError::Keyring(KeyringError::AuditUnavailable),
            ServiceError::Secrets(SecretsError::AuditUnavailable),
            ServiceError::Credentials(CredentialsError::AuditUnavailable),
            ServiceError::Databases(DatabasesError::AuditUnavailable),
        ] {
            assert!(is_audit_failure(&err), "{err:?}");
            let r = Refusal::from(&err);
            assert_eq!(
                (r.reason, r.message.as_str()),
                ("AUDIT_UNAVAILABLE", AUDIT_UNAVAILABLE)
            );
        }
    }
}
