//! The gRPC front: protobuf types in, service-layer calls, protobuf types out.
//!
//! Architecture invariants: this module is the one place where errors become
//! `tonic::Status` ([`to_status`], from the service layer's [`Refusal`]), and, with
//! [`crate::wire`] (which holds every conversion), the one place in the library where
//! protobuf types are built or read. A handler only translates: it names the call's
//! [`Op`] and what it is about, hands the work to [`crate::service`] (which checks access,
//! writes the audit record before the answer leaves, and logs), and turns the
//! [`Answer`] into a response ([`respond`]) with the request id in its metadata. The gate
//! ([`gate`]) is this front's own layer: what it refuses unread, what it counts, the
//! deadline it keeps ([`deadline`]).

mod access;
mod audit;
mod credentials;
mod databases;
pub(crate) mod deadline;
pub(crate) mod gate;
mod keys;
mod secrets;
mod system;

pub(crate) use access::AccessService;
pub(crate) use audit::AuditService;
pub(crate) use credentials::CredentialsService;
pub(crate) use databases::DatabasesService;
pub(crate) use keys::KeyManagementService;
pub(crate) use secrets::SecretsService;
pub(crate) use system::SystemService;

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::access::Need;
use crate::access::tls::PeerInfo;
use crate::keyring::Change;
use crate::service::{
    Answer, Call, Caller, ErrorKind, Front, Idempotency, Meta, Op, Refusal, Reply, Service,
    ServiceError,
};

/// The metadata key of the request id (given by the caller or made by the server, and
/// returned in the response's metadata either way).
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// The metadata key of a change's idempotency key (docs/api.md, "Retries and
/// idempotency"): a change sent again with the same key by the same caller is answered from
/// the first attempt.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The metadata an answer from a first attempt carries (`true`).
pub(crate) const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Every protobuf answer is a service-layer reply: its size is its encoding's, and a
/// retried change's answer is decoded from the first attempt's ([`answer_of`]).
impl<M: prost::Message + Default + Send + 'static> Reply for M {
    fn size(&self) -> u64 {
        self.encoded_len() as u64
    }

    fn from_replay(bytes: &[u8]) -> Option<Self> {
        M::decode(bytes).ok()
    }
}

/// A change's answer as this front encodes it: the `Key` or `Grant` message.
fn answer_of(change: Change<'_>) -> Vec<u8> {
    use prost::Message as _;
    match change {
        Change::Key(meta) => crate::wire::key_pb(meta).encode_to_vec(),
        Change::Grant(g) => crate::wire::grant_pb(g).encode_to_vec(),
    }
}

/// The operation a gRPC method is, by service and method name: our RPCs are named after
/// the operations they are, and the standard health service's methods are its probes.
/// `None`: a method of ours that no operation is (it falls to the admin role), or another
/// service (reflection).
pub(crate) fn op_of(service: &str, method: &str) -> Option<Op> {
    Op::ALL
        .iter()
        .copied()
        .find(|op| op.group().record_name() == service && op.name() == method)
        .filter(|op| *op != Op::UnsealReset && !op.grpc_has_none())
}

/// The rule of a gRPC method ([`Op::need`]); anything that is not one of the operations
/// (server reflection, a method no handler answers) needs the admin role: closed until
/// someone opens it.
pub(crate) fn need_of(service: &str, method: &str) -> Need {
    op_of(service, method).map_or(Need::Role(crate::access::Role::Admin), Op::need)
}

/// A call of `op`, described from the request's connection (the identity fixed at its
/// handshake) and metadata.
pub(crate) fn call<T: prost::Message>(service: &Service, req: &Request<T>, op: Op) -> Call {
    let peer_info = req.extensions().get::<PeerInfo>();
    // Without connect info (never, from our listener) the caller is no one: only Status is
    // open to it.
    let identity = peer_info.map_or_else(
        || {
            std::sync::Arc::new(crate::access::Identity {
                tls: false,
                ..crate::access::Identity::anonymous()
            })
        },
        |p| std::sync::Arc::clone(&p.identity),
    );
    let given_key = req.metadata().get(IDEMPOTENCY_KEY);
    let idempotency =
        match given_key.map(|v| v.to_str().ok().filter(|k| crate::service::is_token(k))) {
            None => Idempotency::None,
            Some(None) => Idempotency::Bad,
            Some(Some(key)) if op.is_retried_change() => Idempotency::Given {
                key: key.to_owned(),
                request: zeroize::Zeroizing::new(req.get_ref().encode_to_vec()),
            },
            Some(Some(_)) => Idempotency::None,
        };
    Call::new(
        service,
        Caller {
            identity,
            peer: peer_info.map(|p| p.addr),
            front: Front::Grpc,
        },
        op,
        Meta {
            request_id: crate::service::request_id(
                req.metadata().get(REQUEST_ID).and_then(|v| v.to_str().ok()),
            ),
            input_bytes: req.get_ref().encoded_len() as u64,
            idempotency,
            answer_of: Some(answer_of),
            deadline: req.extensions().get::<deadline::Deadline>().cloned(),
            recorded: req.extensions().get::<crate::service::Recorded>().cloned(),
            counted: req.extensions().get::<gate::Counted>().is_some(),
        },
    )
}

/// The request id from the HTTP headers (for the gate, before tonic's request exists):
/// the caller's, if it is a sane token, else a fresh random one.
pub(crate) fn request_id_of(headers: &http::HeaderMap) -> String {
    crate::service::request_id(headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()))
}

/// The response to a call: its reply or its status, each with the request id in its
/// metadata, and a first attempt's answer marked as such.
pub(crate) fn respond<R>(answer: Answer<R>) -> Result<Response<R>, Status> {
    let id = MetadataValue::try_from(answer.request_id.as_str()).ok();
    match answer.result {
        Ok(reply) => {
            let mut response = Response::new(reply);
            if let Some(v) = id {
                response.metadata_mut().insert(REQUEST_ID, v);
            }
            if answer.replayed {
                response
                    .metadata_mut()
                    .insert(IDEMPOTENT_REPLAYED, MetadataValue::from_static("true"));
            }
            Ok(response)
        }
        Err(refusal) => {
            let mut status = refused(&refusal);
            if let Some(v) = id {
                status.metadata_mut().insert(REQUEST_ID, v);
            }
            Err(status)
        }
    }
}

/// The gRPC code of an error kind.
pub(crate) fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
    }
}

/// The status of a refusal, with its reason.
pub(crate) fn refused(refusal: &Refusal) -> Status {
    status(
        code_of(refusal.kind),
        refusal.reason,
        refusal.message.clone(),
    )
}

/// The status a caller sees for an error.
pub(crate) fn to_status(err: &ServiceError) -> Status {
    refused(&Refusal::from(err))
}

/// The domain of every `google.rpc.ErrorInfo` the server attaches.
pub(crate) const ERROR_DOMAIN: &str = "kms";

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

/// The answer to a call whose audit record could not be written.
pub(crate) fn audit_unavailable() -> Status {
    refused(&Refusal::audit_unavailable())
}

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

/// [`crate::service::run`], answered as gRPC answers.
async fn run<R: Reply>(
    call: Call,
    f: impl FnOnce(&Call) -> Result<crate::service::Served<R>, ServiceError> + Send + 'static,
) -> Result<Response<R>, Status> {
    respond(crate::service::run(call, f).await)
}

/// [`crate::service::run_at`], answered as gRPC answers.
async fn run_at<R: Reply>(
    place: crate::service::Place,
    call: Call,
    f: impl FnOnce(&Call) -> Result<crate::service::Served<R>, ServiceError> + Send + 'static,
) -> Result<Response<R>, Status> {
    respond(crate::service::run_at(place, call, f).await)
}

/// [`crate::service::with_keyring`], answered as gRPC answers.
async fn with_keyring<Q: crate::service::Aad + Send + 'static, R: Reply>(
    service: &Service,
    call: Call,
    req: Q,
    f: impl FnOnce(
        &crate::keyring::Keyring,
        &Call,
        Q,
    ) -> Result<crate::service::Served<R>, crate::keyring::KeyringError>
    + Send
    + 'static,
) -> Result<Response<R>, Status> {
    respond(crate::service::with_keyring(service, call, req, f).await)
}
