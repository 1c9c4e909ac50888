//! The gate in front of every call: a tower layer over the HTTP/2 request, before tonic
//! reads or decodes its body.
//!
//! - A caller without a client certificate calling anything but `Status` or `WhoAmI` is
//!   refused `UNAUTHENTICATED` here, unread: a stranger cannot make the server decode (or
//!   log, or record) a large request. Its other requests are limited to
//!   `[limits] anonymous_max_request_bytes`.
//! - Refused calls are counted per source address ([`RefusedLimiter`]); past
//!   `refused_calls_per_minute` an address's calls are refused `RESOURCE_EXHAUSTED`, unread.
//!   The first such call of each minute is recorded; the others are only counted, and the
//!   count is recorded as one record (`kms.Gate/RateLimited`, with the count in its `batch`)
//!   when the address calls again after the minute (docs/audit.md).
//! - Calls that no handler recorded (tonic refused them: oversized, malformed, unknown
//!   method; or the handler panicked) are recorded here, with the status tonic gave. The
//!   answer waits for the record; if it cannot be written the answer is
//!   `UNAVAILABLE: audit log unavailable`.
//!
//! - The standard health service (`grpc.health.v1.Health`) is open to callers without a
//!   certificate (load balancers have none) and its probes are not recorded one by one:
//!   they are counted, and the count is recorded as one `kms.Gate/HealthChecks` record a
//!   minute (and at shutdown) with the count per outcome in its `batch`.
//! - The standard services without a handler of ours (health, reflection) have their rule
//!   (`access::need`) checked here: reflection needs the admin role.
//! - Every call is counted and timed for the metrics (`kms_requests_total`,
//!   `kms_request_duration_seconds`), by service, method and status code; the time runs to
//!   the answer's headers (for a stream, to its start).
//!
//! Every text from the request that reaches a record is bounded: the service must be one of
//! ours, the method a short identifier; anything else is recorded as a placeholder that
//! gives only its size.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::{Code, Status};

use super::{AUDIT_UNAVAILABLE, code_name};
use crate::access::limiter::{RefusedLimiter, Verdict};
use crate::access::tls::PeerInfo;
use crate::access::{Denied, Roles};
use crate::audit::{AuditEvent, AuditLog, BatchSummary};

/// The services the server answers; a path naming another is recorded as a placeholder.
pub(crate) const SERVICES: &[&str] = &[
    "kms.v1.System",
    "kms.v1.KeyManagement",
    "kms.v1.Audit",
    "kms.v1.Access",
    HEALTH,
    REFLECTION,
    REFLECTION_V1ALPHA,
];

/// The standard gRPC health service.
pub(crate) const HEALTH: &str = "grpc.health.v1.Health";
/// The standard server reflection service, and its older name (which grpcio-reflection and
/// older grpcurl versions call).
pub(crate) const REFLECTION: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The service name of the gate's own summary records.
const GATE: &str = "kms.Gate";

/// Set by a handler's [`super::Call`] once it has taken charge of the call's record; the
/// gate records the calls for which it is still unset.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorded(Arc<AtomicBool>);

impl Recorded {
    /// The handler will record (or has recorded) this call.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the gate shares between connections.
#[derive(Debug)]
pub(crate) struct GateState {
    audit: AuditLog,
    roles: Arc<Roles>,
    refused: RefusedLimiter,
    anonymous_max_bytes: usize,
    /// Health probes since the last summary record, by outcome.
    probes: Mutex<BTreeMap<String, u64>>,
}

impl GateState {
    /// A gate recording into `audit`, allowing `refused_per_minute` refused calls per
    /// address per minute and `anonymous_max_bytes` per request without a certificate.
    pub(crate) fn new(
        audit: AuditLog,
        roles: Arc<Roles>,
        refused_per_minute: u32,
        anonymous_max_bytes: usize,
    ) -> Self {
        Self {
            audit,
            roles,
            refused: RefusedLimiter::new(refused_per_minute, Duration::from_secs(60)),
            anonymous_max_bytes,
            probes: Mutex::new(BTreeMap::new()),
        }
    }

    fn count_probe(&self, outcome: &str) {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        *probes.entry(outcome.to_owned()).or_default() += 1;
    }

    /// Records the health probes counted since the last call as one record
    /// (`kms.Gate/HealthChecks`, the count per outcome in its `batch`); nothing when there
    /// were none. The server calls it every minute and at shutdown.
    pub(crate) async fn record_probes(&self) {
        let outcomes = std::mem::take(&mut *self.probes.lock().unwrap_or_else(|p| p.into_inner()));
        let items: u64 = outcomes.values().sum();
        if items == 0 {
            return;
        }
        let event = AuditEvent {
            principal: crate::audit::SYSTEM_PRINCIPAL.to_owned(),
            service: GATE.to_owned(),
            operation: "HealthChecks".to_owned(),
            outcome: code_name(Code::Ok).to_owned(),
            batch: Some(BatchSummary {
                items,
                outcomes,
                versions: Default::default(),
            }),
            ..AuditEvent::default()
        };
        append(&self.audit, event).await;
    }
}

/// The layer: `Server::builder().layer(GateLayer::new(state))`.
#[derive(Debug, Clone)]
pub(crate) struct GateLayer(Arc<GateState>);

impl GateLayer {
    /// A layer over shared state.
    pub(crate) fn new(state: Arc<GateState>) -> Self {
        Self(state)
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            state: Arc::clone(&self.0),
        }
    }
}

/// The gate service (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Gate<S> {
    inner: S,
    state: Arc<GateState>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The service and method a request path names, bounded for records and logs.
fn rpc_of(path: &str) -> (String, String) {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", path));
    let service = if SERVICES.contains(&service) {
        service.to_owned()
    } else {
        format!("<unknown service, {} bytes>", service.len())
    };
    let method =
        if (1..=64).contains(&method.len()) && method.bytes().all(|b| b.is_ascii_alphanumeric()) {
            method.to_owned()
        } else {
            format!("<invalid method, {} bytes>", method.len())
        };
    (service, method)
}

/// The gRPC status of a response that carries it in its headers (every refusal tonic or a
/// handler makes before a body); `None` for a response whose status comes in trailers.
fn status_of(response: &http::Response<Body>) -> Option<Code> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Whether a call counts against its address's refused calls: denied, or refused by tonic
/// before any handler ran (oversized, malformed, unknown method). Business errors (a bad
/// share, a failed decryption) do not count: the handlers answer and record those.
fn is_refusal(code: Code, handled: bool) -> bool {
    match code {
        Code::Unauthenticated | Code::PermissionDenied => true,
        Code::Ok => false,
        _ => !handled,
    }
}

impl<S> tower_service::Service<http::Request<Body>> for Gate<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the ready one serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            let started = Instant::now();
            let (service, method) = rpc_of(req.uri().path());
            let response = pass(inner, state, req, &service, &method).await?;
            let code = status_of(&response).map_or("OK", code_name);
            crate::metrics::metrics().request(&service, &method, code, started.elapsed());
            Ok(response)
        })
    }
}

/// The gate's work on one call (see the module docs): the refusals it makes itself, then
/// the call, then its record when no handler of ours made one.
async fn pass<S>(
    mut inner: S,
    state: Arc<GateState>,
    mut req: http::Request<Body>,
    service: &str,
    method: &str,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let peer = req.extensions().get::<PeerInfo>().cloned();
    let ip = peer.as_ref().map(|p| p.addr.ip());
    let anonymous = peer
        .as_ref()
        .is_some_and(|p| p.identity.tls && !p.identity.authenticated);
    let event = AuditEvent {
        request_id: super::request_id_of(req.headers()),
        principal: peer.as_ref().map_or_else(
            || crate::policy::ANONYMOUS.to_owned(),
            |p| p.identity.principal.clone(),
        ),
        peer: peer
            .as_ref()
            .map(|p| p.addr.to_string())
            .unwrap_or_default(),
        service: service.to_owned(),
        operation: method.to_owned(),
        ..AuditEvent::default()
    };
    if let Some(refusal) = refuse(&state, peer.as_ref(), &event, anonymous).await {
        return Ok(refusal);
    }
    if anonymous {
        let limit = state.anonymous_max_bytes;
        let body = std::mem::replace(req.body_mut(), Body::empty());
        *req.body_mut() = Body::new(Limited::new(body, limit));
    }
    let recorded = Recorded::default();
    req.extensions_mut().insert(recorded.clone());
    let probe = service == HEALTH;
    if probe {
        // Counted, recorded in aggregate by `record_probes`.
        recorded.set();
    }
    let response = inner.call(req).await?;
    let code = status_of(&response);
    // A probe's answer (NOT_FOUND for an unknown service) is the health service's business,
    // not a refusal: `recorded` is set for probes.
    if code.is_some_and(|c| is_refusal(c, recorded.get())) {
        refused(&state, ip);
    }
    if probe {
        state.count_probe(code.map_or("OK", code_name));
    }
    if recorded.get() {
        return Ok(response);
    }
    // No handler of ours recorded this call: tonic refused it, a handler panicked, or it is
    // a reflection stream. A reflection stream whose answer began (its status comes at its
    // end) is recorded as admitted: `OK`.
    let reflection = [REFLECTION, REFLECTION_V1ALPHA].contains(&service);
    let outcome = match code {
        Some(c) => code_name(c),
        None if reflection => code_name(Code::Ok),
        None => "UNKNOWN",
    }
    .to_owned();
    let event = AuditEvent { outcome, ..event };
    if append(&state.audit, event).await {
        Ok(response)
    } else {
        Ok(Status::unavailable(AUDIT_UNAVAILABLE).into_http())
    }
}

/// The answer when the gate refuses the call itself, unread: over the address's limit of
/// refused calls, without a certificate where one is needed, or short of the rule of a
/// service that has no handler of ours (health, reflection). `None`: the call goes on.
async fn refuse(
    state: &GateState,
    peer: Option<&PeerInfo>,
    event: &AuditEvent,
    anonymous: bool,
) -> Option<http::Response<Body>> {
    let ip = peer.map(|p| p.addr.ip());
    if let Some(ip) = ip {
        match state.refused.check(ip, Instant::now()) {
            Verdict::Allowed(None) => {}
            Verdict::Allowed(Some(counted)) => {
                summary(state, event, counted).await;
            }
            Verdict::Limited { wait, first } => {
                let status = Status::resource_exhausted(format!(
                    "too many refused calls from this address: try again in {} s",
                    wait.as_secs().max(1)
                ));
                if first {
                    tracing::warn!(peer = %ip, "refused calls over the limit: further calls from this address are refused unread for the rest of the minute");
                    return Some(answer(state, event.clone(), status).await);
                }
                return Some(status.into_http());
            }
        }
    }
    let need = crate::access::need(&event.service, &event.operation);
    if anonymous && need.needs_certificate() {
        refused(state, ip);
        let status = Status::unauthenticated(crate::access::Denied::Unauthenticated.to_string());
        return Some(answer(state, event.clone(), status).await);
    }
    if [HEALTH, REFLECTION, REFLECTION_V1ALPHA].contains(&event.service.as_str())
        && let Some(identity) = peer.map(|p| &p.identity)
        && let Err(denied) = crate::access::check(
            need,
            identity,
            &state.roles,
            i64::try_from(crate::keyring::now()).unwrap_or(i64::MAX),
        )
    {
        refused(state, ip);
        let status = match denied {
            Denied::Unauthenticated | Denied::Expired => {
                Status::unauthenticated(denied.to_string())
            }
            _ => Status::permission_denied(denied.to_string()),
        };
        return Some(answer(state, event.clone(), status).await);
    }
    None
}

fn refused(state: &GateState, ip: Option<IpAddr>) {
    if let Some(ip) = ip {
        state.refused.refused(ip, Instant::now());
    }
}

/// Records `event` with `status`'s outcome and answers `status` (or `UNAVAILABLE` when the
/// record cannot be written).
async fn answer(state: &GateState, event: AuditEvent, status: Status) -> http::Response<Body> {
    let event = AuditEvent {
        outcome: code_name(status.code()).to_owned(),
        ..event
    };
    if append(&state.audit, event).await {
        status.into_http()
    } else {
        Status::unavailable(AUDIT_UNAVAILABLE).into_http()
    }
}

/// The one record of the calls from an address that the limit refused without recording
/// them one by one.
async fn summary(state: &GateState, event: &AuditEvent, counted: u64) {
    let code = code_name(Code::ResourceExhausted).to_owned();
    let event = AuditEvent {
        service: GATE.to_owned(),
        operation: "RateLimited".to_owned(),
        outcome: code.clone(),
        batch: Some(BatchSummary {
            items: counted,
            outcomes: [(code, counted)].into(),
            versions: Default::default(),
        }),
        ..event.clone()
    };
    tracing::warn!(peer = %event.peer, calls = counted, "calls refused by the rate limit were counted, not recorded one by one");
    append(&state.audit, event).await;
}

/// Appends without holding a thread; whether the record is durable.
async fn append(log: &AuditLog, event: AuditEvent) -> bool {
    let rpc = format!("{}/{}", event.service, event.operation);
    match log.submit(event).durable().await {
        Ok(_) => true,
        Err(_) => {
            tracing::error!(rpc, "audit record not written: answer withheld");
            false
        }
    }
}

/// A request body cut off at `limit` bytes with `RESOURCE_EXHAUSTED` (which tonic passes
/// on as the call's status).
struct Limited {
    inner: Body,
    left: usize,
    limit: usize,
}

impl Limited {
    fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            left: limit,
            limit,
        }
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > this.left {
                        return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                            "a request without a client certificate is limited to {} bytes",
                            this.limit
                        )))));
                    }
                    this.left -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_bounded_before_they_are_recorded() {
        assert_eq!(
            rpc_of("/kms.v1.System/Status"),
            ("kms.v1.System".into(), "Status".into())
        );
        assert_eq!(
            rpc_of("/kms.v1.KeyManagement/Exfiltrate"),
            ("kms.v1.KeyManagement".into(), "Exfiltrate".into())
        );
        let long = format!("/{}/{}", "x".repeat(5000), "y".repeat(100));
        assert_eq!(
            rpc_of(&long),
            (
                "<unknown service, 5000 bytes>".into(),
                "<invalid method, 100 bytes>".into()
            )
        );
        assert_eq!(
            rpc_of("/kms.v1.System/Sta\u{1b}tus"),
            ("kms.v1.System".into(), "<invalid method, 7 bytes>".into())
        );
        assert_eq!(rpc_of("nothing").0, "<unknown service, 0 bytes>");
    }
}
