//! How a Vault request becomes a call of the service layer ([`crate::service`]): the one
//! door every request of every front passes (the access rule of its operation, the grants
//! on its key and associated data, the audit record written before the answer leaves, the
//! log line), and how its refusal becomes Vault's status code.

use std::sync::Arc;

use http::StatusCode;

use crate::access::tls::PeerInfo;
use crate::credentials::Credentials;
use crate::databases::{Databases, DatabasesError};
use crate::keyring::{Journal, Keyring, KeyringError};
use crate::secrets::{Secrets, SecretsError};
use crate::service::{
    Aad, Call, Caller, ErrorKind, Front, Idempotency, Meta, Op, Refusal, Served, Service,
    ServiceError,
};

/// The answer of a call, as the service layer carries it to the front: the JSON of Vault's
/// `data` object, and the status when it is not 200 (a batch with a failed item is 400, as
/// Vault answers it). Its `Debug` shows sizes only, and `data` (which may hold a plaintext)
/// is zeroized on drop.
#[derive(Default)]
pub(crate) struct Reply {
    /// The `data` object (JSON).
    pub data: Vec<u8>,
    /// The HTTP status, 0 for 200.
    pub status: u16,
    /// Vault's `warnings`.
    pub warnings: Vec<String>,
    /// The lease of a secret the answer hands out (Vault's `lease_id`, `lease_duration`,
    /// `renewable` beside `data`), if any.
    pub lease: Option<LeaseInfo>,
}

/// What Vault's envelope says of a lease: its id, the seconds left, whether it renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseInfo {
    /// The lease id.
    pub id: String,
    /// Seconds until it ends.
    pub duration: u64,
    /// Whether a renewal can extend it.
    pub renewable: bool,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("data", &format_args!("<{} bytes>", self.data.len()))
            .field("status", &self.status)
            .finish()
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

impl crate::service::Reply for Reply {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// The front sends no idempotency key: no change of its is answered from a first
    /// attempt.
    fn from_replay(_: &[u8]) -> Option<Self> {
        None
    }
}

impl Reply {
    /// A 200 answer of `data`.
    pub(crate) fn ok(data: &serde_json::Value) -> Self {
        Self {
            data: serde_json::to_vec(data).unwrap_or_default(),
            status: 0,
            warnings: Vec::new(),
            lease: None,
        }
    }

    /// With the lease of the secret it hands out.
    pub(crate) fn leased(mut self, lease: LeaseInfo) -> Self {
        self.lease = Some(lease);
        self
    }

    /// With Vault's warnings.
    pub(crate) fn warn(mut self, warnings: impl IntoIterator<Item = String>) -> Self {
        self.warnings.extend(warnings);
        self
    }

    /// With a status other than 200.
    pub(crate) fn status(mut self, status: StatusCode) -> Self {
        self.status = status.as_u16();
        self
    }
}

/// A call refused: Vault's status code, and the messages of its `errors`.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    /// The status code.
    pub status: StatusCode,
    /// The message (never a secret: the service layer's, or the front's own).
    pub message: String,
    /// The reason (`KEY_NOT_FOUND`, `NO_GRANT`, `INVALID_REQUEST`, ...).
    pub reason: &'static str,
    /// Whether the refusal has its audit record (a call's); the front records its own.
    pub recorded: bool,
}

impl Refused {
    /// A 400 of the front's own.
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            reason: "INVALID_REQUEST",
            recorded: false,
        }
    }

    /// Vault's 403.
    pub(crate) fn denied(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
            reason: "PERMISSION_DENIED",
            recorded: false,
        }
    }
}

impl From<super::vault::BadRequest> for Refused {
    fn from(b: super::vault::BadRequest) -> Self {
        Self::bad(b.0)
    }
}

/// Vault's status code for a refusal of the service layer: 400 for what the caller can fix
/// (bad input, state, a missing key), 403 for access, 429 for limits, 503 for a sealed or
/// uninitialised server and for faults to retry (HSM, store, audit log), 500 for the rest.
pub(crate) fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal.kind {
        ErrorKind::FailedPrecondition if refusal.reason == "NOT_INITIALIZED" => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::InvalidArgument
        | ErrorKind::FailedPrecondition
        | ErrorKind::AlreadyExists
        | ErrorKind::NotFound => StatusCode::BAD_REQUEST,
        ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => StatusCode::FORBIDDEN,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal | ErrorKind::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn refused(refusal: Refusal) -> Refused {
    refused_with(refusal, status_of)
}

/// A refusal of the service layer (recorded), with the status a mount gives its kind.
fn refused_with(refusal: Refusal, status: fn(&Refusal) -> StatusCode) -> Refused {
    Refused {
        status: status(&refusal),
        message: refusal.message,
        reason: refusal.reason,
        recorded: true,
    }
}

/// Vault's 503 when a refusal's record could not be written: nothing else is answered.
pub(crate) fn audit_unavailable() -> Refused {
    Refused {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the audit log is unavailable: try again".to_owned(),
        reason: "AUDIT_UNAVAILABLE",
        recorded: true,
    }
}

/// A keyed call: its operation, its key, the destination key of a re-encryption, the
/// version it names.
pub(crate) struct Keyed<'a> {
    /// The operation.
    pub op: Op,
    /// The key.
    pub key: &'a str,
    /// ReEncrypt's destination.
    pub destination: Option<&'a str>,
    /// The version named (0: none).
    pub version: u32,
}

/// The service-layer call of `op` by the caller of `peer`, through this front, of a
/// request of `input_bytes`.
fn call(service: &Service, peer: &PeerInfo, op: Op, input_bytes: usize) -> Call {
    Call::new(
        service,
        Caller {
            identity: Arc::clone(&peer.identity),
            peer: Some(peer.addr),
            front: Front::Http,
        },
        op,
        Meta {
            request_id: crate::service::request_id(None),
            input_bytes: input_bytes as u64,
            idempotency: Idempotency::None,
            answer_of: None,
            deadline: None,
            recorded: None,
            counted: false,
        },
    )
}

/// Runs `f` on the keyring as a call of `keyed` by the caller of `peer`: access rule,
/// grants (on the key, the destination and every associated data in `req`), audit record
/// before the answer, log line. The answer and its request id.
pub(crate) async fn keyed<Q: Aad + Send + 'static>(
    service: &Service,
    peer: &PeerInfo,
    input_bytes: usize,
    keyed: Keyed<'_>,
    req: Q,
    f: impl FnOnce(&Keyring, &dyn Journal, Q) -> Result<Served<Reply>, KeyringError> + Send + 'static,
) -> (Result<Reply, Refused>, String) {
    let mut c = call(service, peer, keyed.op, input_bytes).key(keyed.key);
    if let Some(d) = keyed.destination {
        c = c.destination(d);
    }
    let c = c.version(keyed.version);
    let answer = crate::service::with_keyring(service, c, req, move |k, c, q| f(k, c, q)).await;
    (answer.result.map_err(refused), answer.request_id)
}

/// How a secret path (or a listing's prefix) is checked for [`Call::secret`].
pub(crate) type PathCheck = fn(&str) -> Result<(), SecretsError>;

/// A call on the secrets engine: its operation, and the path (or prefix) it names with
/// that path's check (none for the engine's configuration).
pub(crate) struct OnSecret {
    /// The operation.
    pub op: Op,
    /// The path or prefix, and how it is checked.
    pub path: Option<(String, PathCheck)>,
    /// The versions the call asks for, recorded whatever its outcome.
    pub versions: Vec<u64>,
}

impl OnSecret {
    fn call(&self, service: &Service, peer: &PeerInfo, input_bytes: usize) -> Call {
        let c = call(service, peer, self.op, input_bytes);
        match &self.path {
            Some((path, check)) => c.secret(path, *check).secret_versions_asked(&self.versions),
            None => c,
        }
    }
}

/// Runs `f` on the secrets engine as a call of `on` by the caller of `peer`: access rule,
/// grant on the path, audit record before the answer, log line. The answer (a refusal with
/// the status `status` gives its kind: each mount maps kinds its own way) and its request
/// id.
pub(crate) async fn secret(
    service: &Service,
    peer: &PeerInfo,
    input_bytes: usize,
    on: OnSecret,
    status: fn(&Refusal) -> StatusCode,
    f: impl FnOnce(&Secrets, &Call) -> Result<Served<Reply>, SecretsError> + Send + 'static,
) -> (Result<Reply, Refused>, String) {
    let c = on.call(service, peer, input_bytes);
    let answer = crate::service::with_secrets(service, c, f).await;
    (
        answer.result.map_err(|r| refused_with(r, status)),
        answer.request_id,
    )
}

/// Runs `f` on the credentials engine as a call of `op` by the caller of `peer`, naming
/// `issuer` and the `audience` asked for: access rule, audit record (of the issuance or
/// its refusal) before the answer, log line.
pub(crate) async fn credential(
    service: &Service,
    peer: &PeerInfo,
    input_bytes: usize,
    op: Op,
    issuer: &str,
    audience: &str,
    f: impl FnOnce(&Credentials, &Keyring, &Call) -> Result<Served<Reply>, ServiceError>
    + Send
    + 'static,
) -> (Result<Reply, Refused>, String) {
    let c = call(service, peer, op, input_bytes)
        .credential(issuer)
        .credential_request("", audience);
    let answer = crate::service::with_credentials(service, c, f).await;
    (answer.result.map_err(refused), answer.request_id)
}

/// A call on the databases engine: its operation, and the connection, role and lease (or
/// lease prefix) it names (`""`: none), as its record names them.
#[derive(Debug, Clone)]
pub(crate) struct OnDatabase {
    /// The operation.
    pub op: Op,
    /// The connection named.
    pub connection: String,
    /// The role named.
    pub role: String,
    /// The lease (or prefix) named.
    pub lease: String,
}

impl OnDatabase {
    fn call(&self, service: &Service, peer: &PeerInfo, input_bytes: usize) -> Call {
        call(service, peer, self.op, input_bytes).database(
            &self.connection,
            &self.role,
            &self.lease,
        )
    }
}

/// Runs `f` on the databases engine as a call of `on` by the caller of `peer`: access rule
/// (the engine then keeps a role's principals and a lease's holder), audit record before
/// the answer, log line. The answer (a refusal with the status `status` gives its kind)
/// and its request id.
pub(crate) async fn database(
    service: &Service,
    peer: &PeerInfo,
    input_bytes: usize,
    on: &OnDatabase,
    status: fn(&Refusal) -> StatusCode,
    f: impl FnOnce(&Databases, &Call) -> Result<Served<Reply>, ServiceError> + Send + 'static,
) -> (Result<Reply, Refused>, String) {
    let c = on.call(service, peer, input_bytes);
    let answer = crate::service::with_databases(service, c, f).await;
    (
        answer.result.map_err(|r| refused_with(r, status)),
        answer.request_id,
    )
}

/// Records a request on the databases engine that the front refused before its call (a
/// body that is not JSON), as [`record_refusal`] records a keyed one: the access rule
/// first, so that a caller who may not make the call gets 403 whatever it sent.
pub(crate) async fn record_database_refusal(
    service: &Service,
    peer: &PeerInfo,
    on: &OnDatabase,
    input_bytes: usize,
) -> Result<(), Refused> {
    let c = on.call(service, peer, input_bytes);
    let answer =
        crate::service::with_databases(service, c, |_, _| -> Result<Served<Reply>, ServiceError> {
            Err(DatabasesError::BadRequest(FRONT_REFUSED.to_owned()).into())
        })
        .await;
    match answer.result {
        Err(r) => pre_call_refusal(r),
        Ok(_) => Ok(()),
    }
}

/// Records a request on a secret that the front refused before its call (parameters it
/// cannot read or kms does not offer), as [`record_refusal`] records a keyed one: through
/// the secrets engine, so that the access rule and the grant on the path come first.
pub(crate) async fn record_secret_refusal(
    service: &Service,
    peer: &PeerInfo,
    on: OnSecret,
    input_bytes: usize,
) -> Result<(), Refused> {
    let c = on.call(service, peer, input_bytes);
    let answer =
        crate::service::with_secrets(service, c, |_, _| -> Result<Served<Reply>, SecretsError> {
            Err(SecretsError::BadRequest(FRONT_REFUSED.to_owned()))
        })
        .await;
    match answer.result {
        Err(r) => pre_call_refusal(r),
        Ok(_) => Ok(()),
    }
}

/// Runs `f` as a call of `op` that touches no key (random bytes, a hash, a session token):
/// the same access check, record and log line as every call.
pub(crate) async fn unkeyed(
    service: &Service,
    peer: &PeerInfo,
    input_bytes: usize,
    op: Op,
    f: impl FnOnce() -> Result<Reply, Refused> + Send + 'static,
) -> (Result<Reply, Refused>, String) {
    // The front's own refusal, carried through the call so that its record says so.
    let front_refusal = Arc::new(std::sync::Mutex::new(None::<Refused>));
    let kept = Arc::clone(&front_refusal);
    let answer = crate::service::run(call(service, peer, op, input_bytes), move |_| {
        f().map(Served::new).map_err(|r| {
            let e = KeyringError::BadRequest(FRONT_REFUSED);
            *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            ServiceError::Keyring(e)
        })
    })
    .await;
    let result = answer.result.map_err(|r| {
        match front_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // Its message is the front's; the record was written.
            Some(own) if r.reason == "INVALID_REQUEST" => Refused {
                recorded: true,
                ..own
            },
            _ => refused(r),
        }
    });
    (result, answer.request_id)
}

/// What the record and the log say of a request the front refused inside its call.
const FRONT_REFUSED: &str = "the request's parameters are not valid";

/// A batch item's failure: its message (cut to [`MAX_ITEM_ERROR`] bytes; never a secret)
/// and its outcome as records spell it.
pub(crate) fn item_error(e: KeyringError) -> (String, &'static str) {
    let refusal = Refusal::from(&ServiceError::Keyring(e));
    let message = refusal.message.as_str();
    let mut end = message.len().min(MAX_ITEM_ERROR);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    (
        message.get(..end).unwrap_or_default().to_owned(),
        refusal.kind.name(),
    )
}

/// The longest message of a batch item's error, as gRPC's.
const MAX_ITEM_ERROR: usize = 256;

/// Records a request the front refused before its call (parameters it cannot read or kms
/// does not offer), under the operation and key its path names, as the gRPC gate records a
/// request tonic refused: one record, fail closed.
pub(crate) async fn record_refusal(
    service: &Service,
    peer: &PeerInfo,
    op: Op,
    key: Option<&str>,
    input_bytes: usize,
    refusal: &Refused,
) -> Result<(), Refused> {
    let mut c = call(service, peer, op, input_bytes);
    if let Some(k) = key {
        c = c.key(k);
    }
    // The front's message is the caller's; the record and the log say only that the
    // parameters were refused.
    let _ = refusal;
    // Through the keyring, as every keyed call: the access rule and the grants on the key
    // come first, so that a caller without the grant gets 403 whatever its parameters.
    let answer = crate::service::with_keyring(
        service,
        c,
        (),
        |_, _, ()| -> Result<Served<Reply>, KeyringError> {
            Err(KeyringError::BadRequest(FRONT_REFUSED))
        },
    )
    .await;
    match answer.result {
        Err(r) => pre_call_refusal(r),
        Ok(_) => Ok(()),
    }
}

/// What a refusal before the call answers, once its record says what the service layer
/// found: the audit log's fault (503) and the access rule, grants and certificate (403,
/// an expired certificate included) come first; anything else leaves the front's own 400.
fn pre_call_refusal(r: Refusal) -> Result<(), Refused> {
    match r.kind {
        _ if r.reason == "AUDIT_UNAVAILABLE" => Err(refused(r)),
        ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => Err(refused(r)),
        _ => Ok(()),
    }
}

/// The caller's principal is what every front names it.
pub(crate) fn principal(peer: &PeerInfo) -> &str {
    &peer.identity.principal
}

/// Whether the caller presented a certificate kms accepts.
pub(crate) fn authenticated(peer: &PeerInfo) -> bool {
    peer.identity.authenticated
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refusal(kind: ErrorKind, reason: &'static str) -> Refusal {
        Refusal {
            kind,
            reason,
            message: String::new(),
        }
    }

    /// Vault's status codes: 503 sealed or not initialised, 403 access, 400 what the caller
    /// can fix (a missing key included, as Vault's crypto paths answer), 429 limits.
    #[test]
    fn refusals_map_to_vaults_status_codes() {
        use ErrorKind as K;
        for (kind, reason, status) in [
            (K::Unavailable, "SEALED", 503),
            (K::FailedPrecondition, "NOT_INITIALIZED", 503),
            (K::Unavailable, "HSM_UNAVAILABLE", 503),
            (K::PermissionDenied, "NO_GRANT", 403),
            (K::Unauthenticated, "CERTIFICATE_EXPIRED", 403),
            (K::NotFound, "KEY_NOT_FOUND", 400),
            (K::InvalidArgument, "DECRYPTION_FAILED", 400),
            (K::FailedPrecondition, "VERSION_BELOW_MINIMUM", 400),
            (K::AlreadyExists, "KEY_EXISTS", 400),
            (K::ResourceExhausted, "BUDGET_EXHAUSTED", 429),
            (K::Internal, "INTERNAL", 500),
            (K::DataLoss, "STORE_TAMPERED", 500),
        ] {
            assert_eq!(
                status_of(&refusal(kind, reason)).as_u16(),
                status,
                "{reason}"
            );
        }
    }

    /// Before the call: a refusal of the grant or of an expired certificate is a 403, the
    /// audit log's fault a 503; the front's own 400 otherwise.
    #[test]
    fn a_refusal_before_the_call_puts_access_first() {
        use ErrorKind as K;
        for (kind, reason, answer) in [
            (K::PermissionDenied, "NO_GRANT", Some(403)),
            (K::Unauthenticated, "CERTIFICATE_EXPIRED", Some(403)),
            (K::Unavailable, "AUDIT_UNAVAILABLE", Some(503)),
            (K::InvalidArgument, "INVALID_REQUEST", None),
            (K::NotFound, "KEY_NOT_FOUND", None),
        ] {
            let got = pre_call_refusal(refusal(kind, reason))
                .err()
                .map(|r| r.status.as_u16());
            assert_eq!(got, answer, "{reason}");
        }
    }

    #[test]
    fn a_batch_items_error_is_bounded_and_named() {
        let (message, outcome) = item_error(KeyringError::NotFound("k".repeat(300)));
        assert!(message.len() <= MAX_ITEM_ERROR);
        assert_eq!(outcome, "NOT_FOUND");
        let (message, outcome) = item_error(KeyringError::DecryptionFailed);
        assert_eq!(message, "decryption failed");
        assert_eq!(outcome, "INVALID_ARGUMENT");
    }

    #[test]
    fn a_reply_shows_no_data_in_debug() {
        let r = Reply::ok(&serde_json::json!({ "plaintext": "c2VjcmV0" }));
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("c2VjcmV0") && shown.contains("bytes"),
            "{shown}"
        );
    }
}
