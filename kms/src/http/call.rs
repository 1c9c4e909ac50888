//! How a Transit request becomes a call: the one door every keyed request of this front
//! passes, the same as gRPC's (the access rule of its operation, the grants on its key and
//! associated data, the audit record written before the answer leaves, the log line), and
//! how its refusal becomes Vault's status code.

use http::StatusCode;

use crate::access::tls::PeerInfo;
use crate::grpc::{Aad, Ctx, Served};
use crate::keyring::{Journal, Keyring, KeyringError};

/// The answer of a call, as the call machinery carries it to the front: the JSON of Vault's
/// `data` object, and the status when it is not 200 (a batch with a failed item is 400, as
/// Vault answers it). Its `Debug` shows sizes only: `data` may hold a plaintext.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub(crate) struct Reply {
    /// The `data` object (JSON).
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    /// The HTTP status, 0 for 200.
    #[prost(uint32, tag = "2")]
    pub status: u32,
    /// Vault's `warnings`.
    #[prost(string, repeated, tag = "3")]
    pub warnings: Vec<String>,
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

impl Reply {
    /// A 200 answer of `data`.
    pub(crate) fn ok(data: &serde_json::Value) -> Self {
        Self {
            data: serde_json::to_vec(data).unwrap_or_default(),
            status: 0,
            warnings: Vec::new(),
        }
    }

    /// With Vault's warnings.
    pub(crate) fn warn(mut self, warnings: impl IntoIterator<Item = String>) -> Self {
        self.warnings.extend(warnings);
        self
    }

    /// With a status other than 200.
    pub(crate) fn status(mut self, status: StatusCode) -> Self {
        self.status = u32::from(status.as_u16());
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
    /// The service layer's reason (`KEY_NOT_FOUND`, `NO_GRANT`, ...), when it refused.
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

/// The reason of every `google.rpc.ErrorInfo` the call machinery attaches.
fn reason(status: &tonic::Status) -> &'static str {
    use tonic_types::StatusExt as _;
    // The reasons the front acts on; any other is only a code.
    let given = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    [
        "NOT_INITIALIZED",
        "SEALED",
        "KEY_NOT_FOUND",
        "NO_GRANT",
        "KEY_EXISTS",
    ]
    .into_iter()
    .find(|r| *r == given)
    .unwrap_or("")
}

/// Vault's status code for a refusal of the call machinery: 400 for what the caller can fix
/// (bad input, state, a missing key), 403 for access, 429 for limits, 503 for a sealed or
/// uninitialised server and for faults to retry (HSM, store, audit log), 500 for the rest.
fn refused(status: &tonic::Status) -> Refused {
    use tonic::Code;
    let reason = reason(status);
    let code = match status.code() {
        Code::FailedPrecondition if reason == "NOT_INITIALIZED" => StatusCode::SERVICE_UNAVAILABLE,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::NotFound => StatusCode::BAD_REQUEST,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Refused {
        status: code,
        message: status.message().to_owned(),
        reason,
        recorded: true,
    }
}

/// A keyed call: its operation (the gRPC method of the same rule and record), its key,
/// the destination key of a re-encryption, the version it names, the request's size.
pub(crate) struct Keyed<'a> {
    /// The operation's name (`Encrypt`, `BatchDecrypt`, `CreateKey`, ...).
    pub op: &'static str,
    /// The key.
    pub key: &'a str,
    /// ReEncrypt's destination.
    pub destination: Option<&'a str>,
    /// The version named (0: none).
    pub version: u32,
}

/// The service's name of keyed calls in records and rules.
const KEYS: &str = "kms.v1.KeyManagement";

/// Runs `f` on the keyring as a call of `keyed` by the caller of `peer`: access rule,
/// grants (on the key, the destination and every associated data in `req`), audit record
/// before the answer, log line. The answer and its request id.
pub(crate) async fn keyed<Q: Aad + Send + 'static>(
    ctx: &Ctx,
    peer: &PeerInfo,
    input_bytes: usize,
    keyed: Keyed<'_>,
    req: Q,
    f: impl FnOnce(&Keyring, &dyn Journal, Q) -> Result<Served<Reply>, KeyringError> + Send + 'static,
) -> (Result<Reply, Refused>, String) {
    // The call machinery reads the caller and the request's size off a tonic request.
    let mut request = tonic::Request::new(Sized(input_bytes));
    request.extensions_mut().insert(peer.clone());
    let mut call = crate::grpc::Call::new(ctx, &request, KEYS, keyed.op).key(keyed.key);
    if let Some(d) = keyed.destination {
        call = call.destination(d);
    }
    let call = call.version(keyed.version);
    match crate::grpc::with_keyring(ctx, call, req, move |k, c, q| f(k, c, q)).await {
        Ok(response) => {
            let id = request_id(response.metadata());
            (Ok(response.into_inner()), id)
        }
        Err(status) => (Err(refused(&status)), request_id(status.metadata())),
    }
}

fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get(crate::grpc::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// A request of `n` bytes, as the call machinery measures requests (`encoded_len`).
#[derive(Clone, Copy, Default)]
struct Sized(usize);

impl std::fmt::Debug for Sized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

impl prost::Message for Sized {
    fn encode_raw(&self, _: &mut impl bytes::BufMut) {}
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0
    }
    fn clear(&mut self) {
        self.0 = 0;
    }
}

/// Records a call that touches no key (a login, a token lookup, random bytes, a hash) as
/// the gRPC front records its calls: one record before the answer, fail closed.
pub(crate) async fn record(
    ctx: &Ctx,
    peer: &PeerInfo,
    (service, op): (&'static str, &'static str),
    key: Option<&str>,
    input_bytes: usize,
    outcome: Result<usize, &Refused>,
) -> Result<String, Refused> {
    let request_id = crate::grpc::request_id_of(&http::HeaderMap::new());
    let event = crate::audit::AuditEvent {
        request_id: request_id.clone(),
        principal: peer.identity.principal.clone(),
        peer: peer.addr.to_string(),
        service: service.to_owned(),
        operation: op.to_owned(),
        // A name that is not one is recorded as its size only, as gRPC's.
        key: key.map(|k| {
            if crate::keyring::model::check_name(k).is_ok() {
                k.to_owned()
            } else {
                crate::grpc::invalid_name(k)
            }
        }),
        outcome: match outcome {
            Ok(_) => "OK".to_owned(),
            Err(r) if r.status == StatusCode::FORBIDDEN => "PERMISSION_DENIED".to_owned(),
            Err(_) => "INVALID_ARGUMENT".to_owned(),
        },
        input_bytes: input_bytes as u64,
        output_bytes: outcome.map_or(0, |n| n as u64),
        ..Default::default()
    };
    match ctx.audit.submit(event).durable().await {
        Ok(_) => Ok(request_id),
        Err(e) => {
            tracing::error!(rpc = %format!("{service}/{op}"), error = %crate::error_chain(&e), "audit record not written: answer withheld");
            Err(Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: crate::grpc::AUDIT_UNAVAILABLE.to_owned(),
                reason: "AUDIT_UNAVAILABLE",
                // Not to be tried again.
                recorded: true,
            })
        }
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

/// A batch item's failure: its message (cut to [`MAX_ITEM_ERROR`] bytes; never a secret)
/// and its outcome as records spell it.
pub(crate) fn item_error(e: KeyringError) -> (String, &'static str) {
    let e = crate::grpc::ApiError::Keyring(e);
    let status = crate::grpc::to_status(&e);
    let message = status.message();
    let mut end = message.len().min(MAX_ITEM_ERROR);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    (
        message.get(..end).unwrap_or_default().to_owned(),
        crate::grpc::code_name(crate::grpc::code_of(&e)),
    )
}

/// The longest message of a batch item's error, as gRPC's.
const MAX_ITEM_ERROR: usize = 256;
