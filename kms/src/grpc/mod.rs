//! The gRPC edge: protobuf types in, domain calls, protobuf types out.
//!
//! Architecture invariants: this module is the one place where errors become
//! `tonic::Status` ([`to_status`]), and, with [`crate::wire`] (which holds every
//! conversion), the one place in the library where protobuf types are built or read. Every call goes through `run`, which writes the call's audit record
//! (see [`crate::audit`]) before the answer leaves: a call whose record cannot be written
//! fails with `UNAVAILABLE: audit log unavailable` and returns no result. Calls that change
//! stored state write their change and their record in one transaction ([`Call`] is the
//! keyring's [`Journal`]). The log line for every call is written here too: the RPC, the
//! key, the outcome and the error's chain, never a request or response body.

mod access;
mod audit;
pub(crate) mod deadline;
pub(crate) mod gate;
mod keys;
mod system;

pub(crate) use access::AccessService;
pub(crate) use audit::AuditService;
pub(crate) use keys::KeyManagementService;
pub(crate) use system::SystemService;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::access::limiter::FailureLimiter;
use crate::access::tls::PeerInfo;
use crate::access::{Denied, Identity, Need, Roles};
use crate::audit::{AuditEvent, AuditLog, BatchSummary, GrantSummary};
use crate::keyring::{Change, Journal, Keyring, KeyringError};
use crate::seal::{SealError, SealManager};

/// What every service works with.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The seal, and through it the keyring.
    pub seal: Arc<SealManager>,
    /// The audit log.
    pub audit: AuditLog,
    /// `[roles]`.
    pub roles: Arc<Roles>,
    /// The limit on failed unseal shares.
    pub unseal_limiter: Arc<FailureLimiter>,
    /// The level of the line each served call writes (`[log] requests`).
    pub request_log: tracing::Level,
}

/// The metadata key of the request id (given by the caller or made by the server, and
/// returned in the response's metadata either way).
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Any error a service can return.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// From the seal.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// From the keyring.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
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

/// The gRPC code of an error: `UNAVAILABLE` for a sealed server (it will be unsealed:
/// retry), `FAILED_PRECONDITION` for lifecycle and state (uninitialised, wrong purpose,
/// version not enabled), `INVALID_ARGUMENT` for bad input
/// (including the opaque "decryption failed"), `NOT_FOUND`, `ALREADY_EXISTS`,
/// `RESOURCE_EXHAUSTED`, `UNAVAILABLE` for HSM, store and audit faults, `DATA_LOSS` for a
/// store that was altered or is corrupt.
pub(crate) fn code_of(err: &ApiError) -> Code {
    match err {
        ApiError::Seal(e) => seal_code(e),
        ApiError::Keyring(e) => keyring_code(e),
        ApiError::AuditRead(_) => Code::Unavailable,
        ApiError::Denied(Denied::Unauthenticated | Denied::Expired) => Code::Unauthenticated,
        ApiError::Denied(_) => Code::PermissionDenied,
        ApiError::UnsealLimited(_) => Code::ResourceExhausted,
        ApiError::DeadlineExceeded => Code::DeadlineExceeded,
        ApiError::BadIdempotencyKey | ApiError::DeadlineTooShort(_) => Code::InvalidArgument,
        ApiError::Backup(crate::backup::BackupError::NoSigner) => Code::FailedPrecondition,
        ApiError::Backup(_) => Code::Unavailable,
    }
}

fn seal_code(e: &SealError) -> Code {
    match e {
        // Every restart comes up sealed, and a quorum unseals it: retry (as UNAVAILABLE
        // tells standard retry policies to), as for a server that is starting.
        SealError::Sealed => Code::Unavailable,
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
        | SealError::SameMasterKey => Code::FailedPrecondition,
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
        | SealError::BadLabel => Code::InvalidArgument,
        SealError::RootKeyUnwrap
        | SealError::CorruptRecord
        | SealError::RecordNotAuthentic
        | SealError::RecordKeyMissing(_) => Code::DataLoss,
        SealError::Keyring(k) => keyring_code(k),
        SealError::Hsm(_)
        | SealError::Store(_)
        | SealError::Randomness
        | SealError::AuditUnavailable
        | SealError::AuditKeyMissing(_)
        | SealError::ShareSealing => Code::Unavailable,
    }
}

fn keyring_code(e: &KeyringError) -> Code {
    match e {
        KeyringError::BadName
        | KeyringError::BadPattern(_)
        | KeyringError::BadLabels
        | KeyringError::BadRequest(_)
        | KeyringError::TooLarge { .. }
        | KeyringError::TooManyItems { .. }
        | KeyringError::IdempotencyKeyReused
        | KeyringError::BatchTooLarge { .. }
        | KeyringError::DecryptionFailed => Code::InvalidArgument,
        KeyringError::AlreadyExists(_) => Code::AlreadyExists,
        KeyringError::NotFound(_)
        | KeyringError::VersionNotFound { .. }
        | KeyringError::GrantNotFound(_) => Code::NotFound,
        KeyringError::WrongPurpose { .. }
        | KeyringError::VersionNotEnabled { .. }
        | KeyringError::BelowMinimum { .. }
        | KeyringError::NotAllowed(_)
        | KeyringError::PendingImport(_) => Code::FailedPrecondition,
        KeyringError::Exhausted { .. } => Code::ResourceExhausted,
        KeyringError::Tampered(_) | KeyringError::HsmKeyMissing => Code::DataLoss,
        KeyringError::Hsm(_)
        | KeyringError::Store(_)
        | KeyringError::KeyBehind(_)
        | KeyringError::Behind
        | KeyringError::Randomness
        | KeyringError::AuditUnavailable => Code::Unavailable,
        KeyringError::Internal(_) | KeyringError::Replayed => Code::Internal,
    }
}

/// The domain of every `google.rpc.ErrorInfo` the server attaches.
pub(crate) const ERROR_DOMAIN: &str = "kms";

/// An error's machine-readable reason (`google.rpc.ErrorInfo.reason`, docs/api.md), so
/// clients need not match messages. UPPER_SNAKE_CASE, stable: a reason is never renamed.
/// A refusal for want of a grant says `NO_GRANT` whether or not the key exists.
pub(crate) fn reason_of(err: &ApiError) -> &'static str {
    match err {
        ApiError::Seal(e) => seal_reason(e),
        ApiError::Keyring(e) => keyring_reason(e),
        ApiError::AuditRead(_) => "AUDIT_UNAVAILABLE",
        ApiError::Denied(d) => match d {
            Denied::Unauthenticated => "NO_CLIENT_CERTIFICATE",
            Denied::Expired => "CERTIFICATE_EXPIRED",
            Denied::Role { .. } => "NO_ROLE",
            Denied::Grant { .. } => "NO_GRANT",
            Denied::NotTls => "TLS_REQUIRED",
        },
        ApiError::Backup(crate::backup::BackupError::NoSigner) => "NO_AUDIT_SIGNER",
        ApiError::Backup(_) => "BACKUP_FAILED",
        ApiError::UnsealLimited(_) => "TOO_MANY_FAILED_SHARES",
        ApiError::DeadlineExceeded => "DEADLINE_EXCEEDED",
        ApiError::BadIdempotencyKey => "INVALID_IDEMPOTENCY_KEY",
        ApiError::DeadlineTooShort(_) => "DEADLINE_TOO_SHORT",
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

/// A status with its `google.rpc.ErrorInfo` (reason, domain [`ERROR_DOMAIN`]) in
/// `grpc-status-details-bin`, as every error the server answers carries one.
pub(crate) fn status(code: Code, reason: &str, message: impl Into<String>) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            reason,
            ERROR_DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        ),
    )
}

fn is_audit_failure(err: &ApiError) -> bool {
    matches!(
        err,
        ApiError::Seal(SealError::AuditUnavailable)
            | ApiError::Seal(SealError::Keyring(KeyringError::AuditUnavailable))
            | ApiError::Keyring(KeyringError::AuditUnavailable)
    )
}

/// The status a caller sees: the code, and the error's own message (never a secret; an
/// internal error says only "internal error").
pub(crate) fn to_status(err: &ApiError) -> Status {
    let code = code_of(err);
    let message = match code {
        _ if is_audit_failure(err) => AUDIT_UNAVAILABLE.to_owned(),
        _ if matches!(err, ApiError::Seal(SealError::Sealed)) => err.to_string(),
        Code::Unavailable => format!("unavailable: {err}"),
        Code::Internal => "internal error".to_owned(),
        _ => err.to_string(),
    };
    status(code, reason_of(err), message)
}

/// The answer to a call whose audit record could not be written.
pub(crate) fn audit_unavailable() -> Status {
    status(Code::Unavailable, "AUDIT_UNAVAILABLE", AUDIT_UNAVAILABLE)
}

/// The message of every call refused because its audit record could not be written.
pub(crate) const AUDIT_UNAVAILABLE: &str = "audit log unavailable";

/// A gRPC code's canonical name, as audit records spell outcomes.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Writes the error and its whole source chain (PKCS#11 return codes included) to the log.
fn log_error(rpc: &str, key: &str, err: &ApiError, code: Code) {
    let chain = crate::error_chain(err);
    // A sealed server refusing calls is its state, not a fault.
    let fault = !matches!(err, ApiError::Seal(SealError::Sealed));
    if fault && matches!(code, Code::Unavailable | Code::DataLoss | Code::Internal) {
        tracing::error!(rpc, key, code = ?code, error = %chain, "request failed");
    } else {
        tracing::warn!(rpc, key, code = ?code, error = %chain, "request refused");
    }
}

/// A request id: the caller's, if it is a sane token, else a fresh random one.
fn request_id<T>(req: &Request<T>) -> String {
    request_id_from(req.metadata().get(REQUEST_ID).and_then(|v| v.to_str().ok()))
}

/// The request id from the HTTP headers (for the gate, before tonic's request exists):
/// the caller's, if it is a sane token, else a fresh random one.
pub(crate) fn request_id_of(headers: &http::HeaderMap) -> String {
    request_id_from(headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()))
}

/// Whether `s` is a sane token for a request id or an idempotency key: 1 to 128 of
/// `[A-Za-z0-9-_.:]`.
fn is_token(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn request_id_from(given: Option<&str>) -> String {
    let given = given.filter(|s| is_token(s));
    match given {
        Some(s) => s.to_owned(),
        None => {
            let mut id = [0u8; 16];
            let _ = getrandom::fill(&mut id);
            data_encoding::HEXLOWER.encode(&id)
        }
    }
}

/// One call being served: who made it, what it needs, what its audit record will say, and
/// whether that was written yet.
pub(crate) struct Call {
    log: AuditLog,
    event: AuditEvent,
    recorded: AtomicBool,
    identity: Arc<Identity>,
    peer: Option<std::net::SocketAddr>,
    need: Need,
    roles: Arc<Roles>,
    bad_name: bool,
    /// The gate's flag: set once this call's record is this handler's to write.
    gate: Option<gate::Recorded>,
    /// The gate counts this call (a caller without a certificate's Status or WhoAmI): no
    /// record of its own.
    counted: bool,
    /// The level of the "request served" line.
    request_log: tracing::Level,
    /// The caller's deadline, shared with the gate ([`deadline`]).
    deadline: Option<deadline::Deadline>,
    /// A change the caller may retry with its idempotency key, once the keyring is known.
    retry: Option<Retry>,
    /// The caller sent an idempotency key that is not one.
    bad_idempotency_key: bool,
}

/// The changes a retry with the same idempotency key answers from the first attempt
/// (docs/api.md, "Retries and idempotency"): each answers a `Key` or a `Grant`, built from
/// what it committed.
pub(crate) const RETRIED_CHANGES: &[&str] = &[
    "CreateKey",
    "RotateKey",
    "UpdateKey",
    "EnableKeyVersion",
    "DisableKeyVersion",
    "ScheduleKeyVersionDestruction",
    "CancelKeyVersionDestruction",
    "ImportKeyMaterial",
    "CreateGrant",
    "RevokeGrant",
];

/// The metadata key of a change's idempotency key (docs/api.md, "Retries and
/// idempotency"): a change sent again with the same key by the same caller is answered from
/// the first attempt.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The metadata an answer from a first attempt carries (`true`).
pub(crate) const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// What a change sent with an idempotency key needs to be made once.
struct Retry {
    /// Where its first answer is kept ([`crate::keyring::requests::record_key`]).
    record_key: String,
    /// The request's protobuf, which a retry must repeat.
    request: zeroize::Zeroizing<Vec<u8>>,
    /// The keyring, known once the call runs ([`with_keyring`]).
    keyring: std::sync::OnceLock<Arc<Keyring>>,
    /// The first attempt's answer and request id, when this call is a retry of it.
    answer: std::sync::Mutex<Option<(Vec<u8>, String)>>,
}

/// What the log and the audit record say instead of a name that is not one: its size only.
pub(crate) fn invalid_name(name: &str) -> String {
    format!("<invalid name, {} bytes>", name.len())
}

impl Call {
    /// A call of `service`/`operation`, described from the request's connection (the
    /// identity fixed at its handshake) and metadata. Its [`Need`] is
    /// [`crate::access::need`]'s.
    pub(crate) fn new<T: prost::Message>(
        ctx: &Ctx,
        req: &Request<T>,
        service: &'static str,
        operation: &'static str,
    ) -> Self {
        let peer_info = req.extensions().get::<PeerInfo>();
        // Without connect info (never, from our listener) the caller is no one: only
        // Status is open to it.
        let identity = peer_info.map_or_else(
            || {
                Arc::new(Identity {
                    tls: false,
                    ..Identity::anonymous()
                })
            },
            |p| Arc::clone(&p.identity),
        );
        let peer = peer_info.map(|p| p.addr);
        let request_id = request_id(req);
        let given_key = req.metadata().get(IDEMPOTENCY_KEY);
        let idempotency_key = given_key
            .and_then(|v| v.to_str().ok())
            .filter(|k| is_token(k));
        let bad_idempotency_key = given_key.is_some() && idempotency_key.is_none();
        let retry = idempotency_key
            .filter(|_| RETRIED_CHANGES.contains(&operation))
            .map(|key| Retry {
                record_key: crate::keyring::requests::record_key(&identity.principal, key),
                request: zeroize::Zeroizing::new(req.get_ref().encode_to_vec()),
                keyring: std::sync::OnceLock::new(),
                answer: std::sync::Mutex::new(None),
            });
        Self {
            log: ctx.audit.clone(),
            event: AuditEvent {
                request_id,
                principal: identity.principal.clone(),
                peer: peer.map(|a| a.to_string()).unwrap_or_default(),
                service: service.to_owned(),
                operation: operation.to_owned(),
                input_bytes: req.get_ref().encoded_len() as u64,
                ..AuditEvent::default()
            },
            recorded: AtomicBool::new(false),
            identity,
            peer,
            need: crate::access::need(service, operation),
            roles: Arc::clone(&ctx.roles),
            bad_name: false,
            gate: req.extensions().get::<gate::Recorded>().cloned(),
            counted: req.extensions().get::<gate::Counted>().is_some(),
            request_log: ctx.request_log,
            deadline: req.extensions().get::<deadline::Deadline>().cloned(),
            retry,
            bad_idempotency_key,
        }
    }

    /// Who is calling.
    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The caller's address.
    pub(crate) fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// The caller's roles.
    pub(crate) fn roles(&self) -> std::collections::BTreeSet<crate::access::Role> {
        self.roles.of(&self.identity)
    }

    /// Names the key the call is about. A name that is not one (too long, or characters a
    /// key name cannot have) is recorded and logged as a bounded placeholder, never as
    /// given, and the call is refused with `INVALID_ARGUMENT` once its caller is known.
    pub(crate) fn key(mut self, key: &str) -> Self {
        self.event.key = self.checked_name(key);
        self
    }

    /// Names ReEncrypt's destination key (whose grant is checked too); checked as
    /// [`Call::key`] checks.
    pub(crate) fn destination(mut self, key: &str) -> Self {
        self.event.destination_key = self.checked_name(key);
        self
    }

    fn checked_name(&mut self, key: &str) -> Option<String> {
        if key.is_empty() {
            return None;
        }
        if crate::keyring::model::check_name(key).is_ok() {
            return Some(key.to_owned());
        }
        self.bad_name = true;
        Some(invalid_name(key))
    }

    /// `service/operation`, for log lines.
    fn rpc(&self) -> String {
        format!("{}/{}", self.event.service, self.event.operation)
    }

    /// What a custodians' ceremony call concerns (the share it was given), for its record
    /// whatever the outcome.
    pub(crate) fn ceremony(mut self, c: crate::audit::CeremonySummary) -> Self {
        self.event.ceremony = Some(c);
        self
    }

    /// Names the key version the call is about (0: none).
    pub(crate) fn version(mut self, version: u32) -> Self {
        self.event.key_version = Some(version).filter(|v| *v != 0);
        self
    }

    /// Writes this call's record now, with outcome OK, `output_bytes`, and `writes` in the
    /// same transaction.
    fn commit(
        &self,
        version: Option<u32>,
        output_bytes: u64,
        grant: Option<(String, GrantSummary)>,
        ceremony: Option<crate::audit::CeremonySummary>,
        writes: Vec<crate::store::Write>,
    ) -> Result<(), crate::audit::AuditError> {
        let ceremony = ceremony.or_else(|| self.event.ceremony.clone());
        let (key, grant) = match grant {
            Some((key, g)) => (Some(key), Some(g)),
            None => (self.event.key.clone(), None),
        };
        let event = AuditEvent {
            outcome: "OK".to_owned(),
            key,
            key_version: self.event.key_version.or(version),
            output_bytes,
            grant,
            ceremony,
            ..self.event.clone()
        };
        if let Some(g) = &self.gate {
            g.set();
        }
        self.log.append_with(event, writes)?;
        self.recorded.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Journal for Call {
    fn commit(
        &self,
        change: Change<'_>,
        writes: Vec<crate::store::Write>,
    ) -> Result<(), KeyringError> {
        use prost::Message as _;
        let answer = match change {
            Change::Key(meta) => crate::wire::key_pb(meta).encode_to_vec(),
            Change::Grant(g) => crate::wire::grant_pb(g).encode_to_vec(),
        };
        let size = answer.len() as u64;
        let mut writes = writes;
        if let Some(write) = self.first_answer(&answer)? {
            writes.push(write);
        }
        let (version, grant) = match change {
            Change::Key(meta) => (Some(meta.primary), None),
            Change::Grant(g) => (
                None,
                Some((
                    g.key.clone(),
                    GrantSummary {
                        id: g.id.clone(),
                        principal: g.principal.to_string(),
                        operations: g.operations.iter().map(|o| o.name().to_owned()).collect(),
                        associated_data_constrained: g.associated_data_mac.is_some(),
                    },
                )),
            ),
        };
        Call::commit(self, version, size, grant, None, writes)
            .map_err(|_| KeyringError::AuditUnavailable)
    }

    fn admit(&self) -> Result<(), KeyringError> {
        let Some(retry) = &self.retry else {
            return Ok(());
        };
        let Some(keyring) = retry.keyring.get() else {
            return Ok(());
        };
        let Some(first) = keyring.request_record(&retry.record_key, now_ms())? else {
            return Ok(());
        };
        let request = keyring.request_mac(&self.event.operation, &retry.request)?;
        let same = first.operation == self.event.operation
            && subtle::ConstantTimeEq::ct_eq(first.request.as_bytes(), request.as_bytes()).into();
        if !same {
            return Err(KeyringError::IdempotencyKeyReused);
        }
        let answer = data_encoding::BASE64
            .decode(first.answer.as_bytes())
            .map_err(|_| KeyringError::Tampered(format!("request record {}", retry.record_key)))?;
        *retry
            .answer
            .lock()
            .map_err(|_| KeyringError::Internal("retry"))? = Some((answer, first.request_id));
        Err(KeyringError::Replayed)
    }
}

impl Call {
    /// The write that keeps `answer` as the first answer of this change, when the caller
    /// sent an idempotency key.
    fn first_answer(&self, answer: &[u8]) -> Result<Option<crate::store::Write>, KeyringError> {
        let Some(retry) = &self.retry else {
            return Ok(None);
        };
        let Some(keyring) = retry.keyring.get() else {
            return Ok(None);
        };
        let record = crate::keyring::requests::RequestRecord {
            operation: self.event.operation.clone(),
            request: keyring.request_mac(&self.event.operation, &retry.request)?,
            answer: data_encoding::BASE64.encode(answer),
            request_id: self.event.request_id.clone(),
            at_ms: now_ms(),
        };
        keyring.request_write(&retry.record_key, &record).map(Some)
    }

    /// The first attempt's answer and request id, when this call is a retry of a change
    /// made already.
    fn replayed_answer(&self) -> Option<(Vec<u8>, String)> {
        self.retry
            .as_ref()
            .and_then(|r| r.answer.lock().ok()?.take())
    }
}

/// The time in Unix milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A successful call's response and what its record says about it.
pub(crate) struct Served<R> {
    response: R,
    version: Option<u32>,
    destination: Option<(String, u32)>,
    batch: Option<BatchSummary>,
    ceremony: Option<crate::audit::CeremonySummary>,
    undo: Option<Box<dyn FnOnce() + Send>>,
    replay_of: Option<String>,
}

impl<R> Served<R> {
    /// A response.
    pub(crate) fn new(response: R) -> Self {
        Self {
            response,
            version: None,
            destination: None,
            batch: None,
            ceremony: None,
            undo: None,
            replay_of: None,
        }
    }

    /// What a custodians' ceremony step did, for its record.
    pub(crate) fn ceremony(mut self, c: crate::audit::CeremonySummary) -> Self {
        self.ceremony = Some(c);
        self
    }

    /// What takes back an in-memory effect (unseal progress) if the record cannot be
    /// written.
    pub(crate) fn undo(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.undo = Some(Box::new(f));
        self
    }

    /// The key version used.
    pub(crate) fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    /// ReEncrypt's destination key and version.
    pub(crate) fn destination(mut self, key: String, v: u32) -> Self {
        self.destination = Some((key, v));
        self
    }

    /// A batch's items.
    pub(crate) fn batch(mut self, b: BatchSummary) -> Self {
        self.batch = Some(b);
        self
    }
}

/// The time a call's work needs before the caller's deadline to begin: the calls that hand
/// out shares once (an answer cut off by the deadline after they committed is a keyring
/// no one can unseal) need [`SHARES_MIN_TIME_LEFT`]; others nothing.
fn min_time_left(operation: &str) -> std::time::Duration {
    if ["Init", "RekeySubmit"].contains(&operation) {
        SHARES_MIN_TIME_LEFT
    } else {
        std::time::Duration::ZERO
    }
}

/// See [`min_time_left`].
const SHARES_MIN_TIME_LEFT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a call's work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// On a blocking thread: it may wait on the HSM or the store.
    Blocking,
    /// On the async worker that polls the call: in-process crypto of a microsecond or
    /// two, where a hop to another thread and back would cost more than the work.
    InProcess,
}

/// The largest request whose crypto runs on the async worker: one item of the largest
/// plaintext or message and its fields. A bigger one (a batch of many megabytes, up to the
/// 16 MiB a caller may send) is milliseconds of AES-GCM, which would stall every other
/// call on that worker: it runs on a blocking thread.
const IN_PROCESS_MAX_INPUT: u64 = crate::keyring::MAX_PLAINTEXT as u64 + 16 * 1024;

/// Runs a blocking call off the async runtime, writes its audit record, logs its outcome,
/// maps its error. The answer leaves only after the record is durable.
pub(crate) async fn run<R: prost::Message + Send + 'static>(
    call: Call,
    f: impl FnOnce(&Call) -> Result<Served<R>, ApiError> + Send + 'static,
) -> Result<Response<R>, Status> {
    run_at(Place::Blocking, call, f).await
}

/// As [`run`], with the work at `place`. Either way the record is handed to the writer
/// before the first await after the work, so a caller that goes away cannot leave work
/// done and unrecorded; then the answer waits, without holding a thread, until the record
/// is durable.
async fn run_at<R: prost::Message + Send + 'static>(
    place: Place,
    call: Call,
    f: impl FnOnce(&Call) -> Result<Served<R>, ApiError> + Send + 'static,
) -> Result<Response<R>, Status> {
    // Kept apart: a panic in the work loses `call`, and its status carries the id too.
    let request_id = call.event.request_id.clone();
    let work = move || {
        // The work begins only before the caller's deadline; once the gate has answered it
        // (see `deadline`), it does nothing and records nothing.
        let min_left = min_time_left(&call.event.operation);
        let late = match call.deadline.as_ref().map(|d| d.begin(min_left)) {
            Some(deadline::Begin::Abandoned) => return None,
            Some(deadline::Begin::Late) => Some(
                if call
                    .deadline
                    .as_ref()
                    .is_some_and(|d| std::time::Instant::now() < d.at())
                {
                    ApiError::DeadlineTooShort(min_left.as_secs())
                } else {
                    ApiError::DeadlineExceeded
                },
            ),
            Some(deadline::Begin::Go) | None => None,
        };
        let result = crate::access::check(
            call.need,
            &call.identity,
            &call.roles,
            i64::try_from(crate::keyring::now()).unwrap_or(i64::MAX),
        )
        .map_err(ApiError::from)
        .and_then(|()| {
            if call.bad_name {
                return Err(KeyringError::BadName.into());
            }
            if call.bad_idempotency_key {
                return Err(ApiError::BadIdempotencyKey);
            }
            if let Some(late) = late {
                return Err(late);
            }
            f(&call)
        });
        let settled = settle(&call, result);
        Some((call, settled))
    };
    let done = match place {
        Place::InProcess => Ok(work()),
        Place::Blocking => tokio::task::spawn_blocking(work).await,
    };
    let mut replayed = false;
    let answer = match done {
        Ok(Some((call, settled))) => {
            replayed = settled.replayed;
            deliver(&call, settled).await
        }
        // The gate answered the caller already.
        Ok(None) => Err(to_status(&ApiError::DeadlineExceeded)),
        Err(_) => Err(status(Code::Internal, "INTERNAL", "internal error")),
    };
    let id = MetadataValue::try_from(request_id.as_str()).ok();
    match answer {
        Ok(response) => {
            let mut response = Response::new(response);
            if let Some(v) = id {
                response.metadata_mut().insert(REQUEST_ID, v);
            }
            if replayed {
                response
                    .metadata_mut()
                    .insert(IDEMPOTENT_REPLAYED, MetadataValue::from_static("true"));
            }
            Ok(response)
        }
        Err(mut status) => {
            if let Some(v) = id {
                status.metadata_mut().insert(REQUEST_ID, v);
            }
            Err(status)
        }
    }
}

/// A call's outcome with its record handed to the writer (if a commit had not written
/// it already).
struct Settled<R> {
    answer: Result<R, Status>,
    receipt: Option<crate::audit::Receipt>,
    undo: Option<Box<dyn FnOnce() + Send>>,
    refused_for_audit: bool,
    /// The answer is the first attempt's (an idempotent retry).
    replayed: bool,
}

/// Records the outcome (unless a commit already did) and turns it into the answer.
/// Does not wait for the record: [`deliver`] does.
fn settle<R: prost::Message>(call: &Call, result: Result<Served<R>, ApiError>) -> Settled<R> {
    let key = call.event.key.as_deref().unwrap_or_default();
    let mut event = call.event.clone();
    let mut undo = None;
    let mut replayed = false;
    let refused_for_audit = result.as_ref().is_err_and(is_audit_failure);
    let answer = match result {
        Ok(served) => {
            undo = served.undo;
            event.outcome = "OK".to_owned();
            event.key_version = served.version.or(event.key_version);
            if let Some((k, v)) = served.destination {
                event.destination_key = Some(k);
                event.destination_key_version = Some(v);
            }
            event.batch = served.batch;
            replayed = served.replay_of.is_some();
            event.replay_of = served.replay_of;
            if served.ceremony.is_some() {
                event.ceremony = served.ceremony;
            }
            event.output_bytes = served.response.encoded_len() as u64;
            Ok(served.response)
        }
        Err(e) => {
            let code = code_of(&e);
            log_error(&call.rpc(), key, &e, code);
            event.outcome = code_name(code).to_owned();
            Err(to_status(&e))
        }
    };
    if let Some(g) = &call.gate {
        g.set();
    }
    // A change that committed its record with it is recorded; a failure after that commit
    // gets its own record too, so the log never shows OK for an answer that was an error.
    // A call the gate counts has no record of its own.
    let receipt = (!call.counted && (!call.recorded.load(Ordering::Relaxed) || answer.is_err()))
        .then(|| call.log.submit(event));
    Settled {
        answer,
        receipt,
        undo,
        refused_for_audit,
        replayed,
    }
}

/// Waits until the call's record is durable, then gives its answer; if the record could
/// not be written, takes back what can be taken back and withholds the answer.
async fn deliver<R>(call: &Call, settled: Settled<R>) -> Result<R, Status> {
    let Settled {
        answer,
        receipt,
        undo,
        refused_for_audit,
        replayed: _,
    } = settled;
    let key = call.event.key.as_deref().unwrap_or_default();
    if let Some(receipt) = receipt
        && let Err(e) = receipt.durable().await
    {
        if !refused_for_audit {
            tracing::error!(rpc = %call.rpc(), key, error = %crate::error_chain(&e), "audit record not written: answer withheld");
        }
        if let Some(undo) = undo {
            undo();
        }
        return Err(audit_unavailable());
    }
    if answer.is_ok() {
        // Fields are built only when the line is written.
        if call.request_log == tracing::Level::INFO {
            tracing::info!(rpc = %call.rpc(), key = %key, code = "OK", "request served");
        } else {
            tracing::debug!(rpc = %call.rpc(), key = %key, code = "OK", "request served");
        }
    }
    answer
}

/// The associated data a request carries, which a constrained grant must match.
pub(crate) trait Aad {
    /// Every associated data in the request (one per batch item).
    fn aads(&self) -> Vec<&[u8]> {
        Vec::new()
    }
}

/// Runs `f` on the keyring (or fails with sealed / not initialised). A call that needs a
/// grant is checked here, before `f`, against every key it names (its key and, for
/// ReEncrypt, its destination) and every associated data in `req`.
pub(crate) async fn with_keyring<
    Q: Aad + Send + 'static,
    R: prost::Message + Default + Send + 'static,
>(
    ctx: &Ctx,
    call: Call,
    req: Q,
    f: impl FnOnce(&Keyring, &Call, Q) -> Result<Served<R>, KeyringError> + Send + 'static,
) -> Result<Response<R>, Status> {
    // Crypto calls on in-process keys, up to `IN_PROCESS_MAX_INPUT` bytes, run on the async
    // worker; bigger ones, HSM keys, administration (which commits to the store) and a
    // sealed server run on a blocking thread. (A crypto call may still wait on the store,
    // rarely: when it reserves the next block of its key's nonce budget, or rotates the key
    // at 3/4 of it.)
    let keyring = ctx.seal.keyring();
    let place = match &keyring {
        Ok(k)
            if matches!(call.need, Need::Grant(_))
                && call.event.input_bytes <= IN_PROCESS_MAX_INPUT
                && [&call.event.key, &call.event.destination_key]
                    .into_iter()
                    .flatten()
                    .all(|name| k.runs_in_process(name)) =>
        {
            Place::InProcess
        }
        _ => Place::Blocking,
    };
    run_at(place, call, move |c| {
        let keyring = keyring?;
        if let Need::Grant(on_key) = c.need {
            let aads = req.aads();
            // ReEncrypt: reencrypt-from on the source, reencrypt-to on the destination.
            let keys = [
                (c.event.key.as_deref(), on_key),
                (c.event.destination_key.as_deref(), on_key.on_destination()),
            ];
            for (key, operation) in keys
                .into_iter()
                .filter_map(|(k, o)| Some((k?, o)))
                .chain(c.event.key.is_none().then_some(("", on_key)))
            {
                if !keyring.permits(&c.identity.principal, key, operation, &aads)? {
                    return Err(Denied::Grant {
                        principal: c.identity.principal.clone(),
                        operation,
                        key: key.to_owned(),
                    }
                    .into());
                }
            }
        }
        if let Some(retry) = &c.retry {
            let _ = retry.keyring.set(Arc::clone(&keyring));
        }
        match f(&keyring, c, req) {
            // A retry of a change made already: the first attempt's answer.
            Err(KeyringError::Replayed) => {
                let (answer, first) = c
                    .replayed_answer()
                    .ok_or(KeyringError::Internal("replayed answer"))?;
                let response = R::decode(answer.as_slice())
                    .map_err(|_| KeyringError::Internal("replayed answer"))?;
                Ok(Served {
                    replay_of: Some(first),
                    ..Served::new(response)
                })
            }
            other => Ok(other?),
        }
    })
    .await
}
