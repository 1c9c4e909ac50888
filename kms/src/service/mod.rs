//! The service layer: the life of a call, whatever front it came through.
//!
//! A front (the gRPC API in [`crate::grpc`]; the others to come) only translates: it reads
//! who is calling ([`Caller`]), what they ask (an [`Op`] on a resource, with the request's
//! [`Meta`]) and hands the work to [`run`] or [`with_keyring`]; it turns the [`Answer`]
//! (its own reply, or a transport-neutral [`Refusal`]) back into its wire format. Below
//! this layer nothing knows a transport: no tonic, axum or hyper type crosses it.
//! Above it, nothing decides access, writes an audit record or maps an engine's error.
//!
//! **Architecture invariant:** every call of every front passes [`run_at`]: the access
//! decision ([`Op::need`], [`crate::access::check`], the grants in [`with_keyring`]), the
//! audit record written before the answer leaves (fail closed), the log line, the error
//! kind and reason ([`error`]).

mod call;
pub(crate) mod deadline;
mod error;
mod op;

use std::sync::Arc;

pub(crate) use call::{
    Aad, Answer, Call, Idempotency, Meta, Place, Recorded, Reply, Served, run, run_at,
    with_credentials, with_databases, with_keyring, with_secrets,
};
pub(crate) use error::{ErrorKind, Refusal, ServiceError};
pub(crate) use op::Op;

use crate::access::limiter::FailureLimiter;
use crate::access::{Identity, Roles};
use crate::audit::AuditLog;
use crate::seal::SealManager;

/// What every call works with, whatever its front.
#[derive(Debug, Clone)]
pub(crate) struct Service {
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
    /// The HTTPS front's URL as clients reach it, which credential issuers publish their
    /// keys under (`None`: no HTTPS front, and no issuer issues).
    pub issuer_base: Option<Arc<str>>,
}

/// The front a call came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    /// Our gRPC API (`kms.v1.*`).
    Grpc,
    /// The Vault-compatible HTTPS API.
    Http,
    /// The Kubernetes KMS v2 plugin's unix socket.
    Kubernetes,
}

impl Front {
    /// The front's name in audit records (`front`): none for gRPC, the front of every record
    /// written before there were others, so that its records are as they were.
    pub(crate) fn record_name(self) -> Option<&'static str> {
        match self {
            Self::Grpc => None,
            Self::Http => Some("http"),
            Self::Kubernetes => Some("kubernetes"),
        }
    }
}

/// Who is calling, as its front authenticated it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The identity fixed at the TLS handshake (principal, whether a certificate named it,
    /// its end of validity).
    pub identity: Arc<Identity>,
    /// The caller's address.
    pub peer: Option<std::net::SocketAddr>,
    /// The front it called through.
    pub front: Front,
}

/// Whether `s` is a sane token for a request id or an idempotency key: 1 to 128 of
/// `[A-Za-z0-9-_.:]`.
pub(crate) fn is_token(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A request id: the caller's, if it is a sane token, else a fresh random one.
pub(crate) fn request_id(given: Option<&str>) -> String {
    match given.filter(|s| is_token(s)) {
        Some(s) => s.to_owned(),
        None => {
            let mut id = [0u8; 16];
            let _ = getrandom::fill(&mut id);
            data_encoding::HEXLOWER.encode(&id)
        }
    }
}
