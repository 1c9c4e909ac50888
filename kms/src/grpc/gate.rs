//! The gate in front of every call: a tower layer over the HTTP/2 request, before tonic
//! reads or decodes its body.
//!
//! - A caller without a client certificate calling anything but `Status`, `WhoAmI` or health
//!   is refused `UNAUTHENTICATED` here, unread: a stranger cannot make the server decode (or
//!   log, or record) a large request. Its other requests are limited to
//!   `[limits] anonymous_max_request_bytes`.
//! - **Every call of a caller without a certificate**, served or refused, is counted, never
//!   recorded one by one (a stranger could otherwise fill the disk with them): per source
//!   ([`Source`]: IPv6 by /64), method and outcome, and each count is recorded a minute (and
//!   at shutdown) as one record of that method and outcome, principal `anonymous`, the
//!   source as its peer, the count in its `batch` ([`Tally`]). A minute's records are
//!   bounded: past [`MAX_COUNTED_SOURCES`] sources or [`MAX_COUNTED_ROWS`] counts, the calls
//!   are counted under the peer [`OTHER_SOURCES`], and a method the API does not define is
//!   counted as [`UNKNOWN_METHOD`]. The handler of a counted call knows it ([`Counted`]) and
//!   writes no record. Health probes are counted with everyone's (below).
//! - Refused calls are counted ([`RefusedLimiter`]) per source for callers without a
//!   certificate, and per source and principal ([`Holder`]) for certificate holders, so that
//!   neither counts against the other; past `refused_calls_per_minute` a key's calls are
//!   refused `RESOURCE_EXHAUSTED`, unread. A caller without a certificate has those counted
//!   as above. A certificate holder's first such call of each window is recorded; the others
//!   are counted, and each holder's count is recorded as one record under its principal
//!   (`kms.Gate/RateLimited`, the count in its `batch`) a minute (and at shutdown)
//!   (docs/audit.md). A certificate holder's own refusals are recorded one by one.
//! - Calls that no handler recorded (tonic refused them: oversized, malformed, unknown
//!   method; or the handler panicked) are recorded here, with the status tonic gave. The
//!   answer waits for the record; if it cannot be written the answer is
//!   `UNAVAILABLE: audit log unavailable`.
//!
//! - The standard health service (`grpc.health.v1.Health`) is open to callers without a
//!   certificate (load balancers have none) and its probes are not recorded one by one:
//!   they are counted, and the count is recorded as one `kms.Gate/HealthChecks` record a
//!   minute (and at shutdown) with the count per outcome in its `batch`.
//! - Every call from a caller without a certificate that is not refused for want of one
//!   (`Status`, `WhoAmI`, health) counts against its source's `anonymous_calls_per_minute`;
//!   past it the calls are refused `RESOURCE_EXHAUSTED`, unread, a second later, so a client
//!   cannot make the server refuse as fast as it sends. Such a call must be answered within
//!   `anonymous_idle_timeout`, and while it is in flight its connection is not idle
//!   (`tls::Activity`).
//! - The standard services without a handler of ours (health, reflection) have their rule
//!   (`access::need`) checked here: reflection needs the admin role.
//! - Every call is counted and timed for the metrics (`kms_requests_total`,
//!   `kms_request_duration_seconds`), by service, method and status code; the time runs to
//!   the answer's headers (for a stream, to its start).
//!
//! Every text from the request that reaches a record is bounded: the service must be one of
//! ours, the method a short identifier; anything else is recorded as a placeholder that
//! gives only its size.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::{Code, Status};

use super::deadline::{Deadline, Expired};
use super::{audit_unavailable, code_name, status};
use crate::access::limiter::{
    CallLimiter, Holder, LimitKind, Limits, RefusedLimiter, Source, Throttle, Verdict,
};
use crate::access::tls::{CallInFlight, LIMIT_LOG_EVERY, PeerInfo};
use crate::access::{Denied, Roles};
use crate::audit::{AuditEvent, AuditLog, BatchSummary};
use crate::service::Recorded;

mod front;
pub(crate) use front::FrontRefusal;

/// The services the server answers; a path naming another is recorded as a placeholder.
pub(crate) const SERVICES: &[&str] = &[
    "kms.v1.System",
    "kms.v1.KeyManagement",
    "kms.v1.Audit",
    "kms.v1.Access",
    "kms.v1.Secrets",
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

/// Sources counted apart in one interval; the calls of any more are counted together, under
/// the peer [`OTHER_SOURCES`] (so an interval's records are bounded whatever the number of
/// addresses calling).
const MAX_COUNTED_SOURCES: usize = 1000;

/// Counts (source, method, outcome) kept apart in one interval; past it, a source's calls of
/// a method and outcome it had no count of yet are counted under [`OTHER_SOURCES`] (so that
/// 1,000 sources calling every method cannot make an interval's records many more).
const MAX_COUNTED_ROWS: usize = 2 * MAX_COUNTED_SOURCES;

/// The method of a counted call to a method the server does not answer (its path is
/// caller text; counted apart, its variants would be unbounded).
const UNKNOWN_METHOD: &str = "<unknown method>";

/// The service of a counted call to a service the server does not answer.
const UNKNOWN_SERVICE: &str = "<unknown service>";

/// How long a call over `anonymous_calls_per_minute` waits for its refusal: a source can
/// then make the server refuse at most its open streams' worth of calls a second
/// (`max_concurrent_streams` on each of its `max_anonymous_connections_per_address`).
const ANONYMOUS_LIMITED_DELAY: Duration = Duration::from_secs(1);

/// The peer of the count of the sources past [`MAX_COUNTED_SOURCES`].
const OTHER_SOURCES: &str = "other addresses";

/// Put on a request by the gate when the call is counted (a caller without a certificate;
/// see the module docs): its handler writes no record of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counted;

/// What the gate shares between connections.
#[derive(Debug)]
pub(crate) struct GateState {
    audit: AuditLog,
    roles: Arc<Roles>,
    /// Refused calls of callers without a certificate, per source.
    refused_anonymous: RefusedLimiter<Source>,
    /// Refused calls of certificate holders, per source and principal.
    refused_holders: RefusedLimiter<Holder>,
    anonymous_calls: CallLimiter,
    anonymous_max_bytes: usize,
    anonymous_timeout: Duration,
    /// Health probes since the last summary record, by outcome.
    probes: Mutex<BTreeMap<String, u64>>,
    /// Calls without a certificate since the last summary records.
    counted: Mutex<Tally>,
    log: Throttle,
}

/// What a count of calls without a certificate is kept under: the source (`None`: past
/// [`MAX_COUNTED_SOURCES`] or [`MAX_COUNTED_ROWS`]), the service and method (the server's
/// own names, or [`UNKNOWN_SERVICE`], [`UNKNOWN_METHOD`]) and the outcome (a gRPC code name).
type Row = (Option<Source>, &'static str, &'static str, &'static str);

/// Calls without a certificate counted per source, method and outcome.
#[derive(Debug, Default)]
struct Tally {
    calls: BTreeMap<Row, u64>,
    sources: HashSet<Source>,
    /// Rows with a source.
    apart: usize,
}

impl Tally {
    /// Counts a call of `rpc` from `source` that got `outcome`: under its source if it is one
    /// of the interval's first [`MAX_COUNTED_SOURCES`] and its row one of the first
    /// [`MAX_COUNTED_ROWS`], else with the others.
    fn add(&mut self, source: Source, rpc: Rpc, outcome: &'static str) {
        let row = (Some(source), rpc.service, rpc.method, outcome);
        let known = self.calls.contains_key(&row);
        let apart = known
            || (self.apart < MAX_COUNTED_ROWS
                && (self.sources.contains(&source)
                    || (self.sources.len() < MAX_COUNTED_SOURCES && self.sources.insert(source))));
        let row = if apart {
            if !known {
                self.apart += 1;
            }
            row
        } else {
            (None, rpc.service, rpc.method, outcome)
        };
        *self.calls.entry(row).or_default() += 1;
    }
}

/// A method as counts name it: the server's own names for a method it answers, else a
/// placeholder (a fixed set, so counts are bounded whatever paths callers send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rpc {
    service: &'static str,
    method: &'static str,
}

impl Rpc {
    fn of(service: &str, method: &str) -> Self {
        match crate::metrics::known_rpc(service, method) {
            Some((service, method)) => Self { service, method },
            None => Self {
                service: SERVICES
                    .iter()
                    .find(|s| **s == service)
                    .copied()
                    .unwrap_or(UNKNOWN_SERVICE),
                method: UNKNOWN_METHOD,
            },
        }
    }
}

/// A caller without a client certificate: every call counted under its source and method
/// (health probes with everyone's), never recorded one by one.
#[derive(Debug, Clone, Copy)]
struct Stranger {
    /// Where it calls from.
    source: Source,
    /// Its address.
    ip: IpAddr,
    /// The method it calls.
    rpc: Rpc,
}

/// Who is calling, as the gate limits and records it.
#[derive(Debug, Clone)]
enum Caller {
    /// Without a client certificate.
    Anonymous(Stranger),
    /// With a certificate (or `loopback` on the plaintext listener): recorded one by one.
    Holder(Holder),
    /// No connect info (never, from our listener).
    Unknown,
}

impl GateState {
    /// A gate recording into `audit`, with the per-caller limits of `limits`.
    pub(crate) fn new(audit: AuditLog, roles: Arc<Roles>, limits: &Limits) -> Self {
        let minute = Duration::from_secs(60);
        Self {
            audit,
            roles,
            refused_anonymous: RefusedLimiter::new(limits.refused_calls_per_minute, minute),
            refused_holders: RefusedLimiter::new(limits.refused_calls_per_minute, minute),
            anonymous_calls: CallLimiter::new(limits.anonymous_calls_per_minute, minute),
            anonymous_max_bytes: limits.anonymous_max_request_bytes,
            anonymous_timeout: limits.anonymous_idle_timeout,
            probes: Mutex::new(BTreeMap::new()),
            counted: Mutex::new(Tally::default()),
            log: Throttle::new(LIMIT_LOG_EVERY),
        }
    }

    pub(crate) fn count_probe(&self, outcome: &str) {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        *probes.entry(outcome.to_owned()).or_default() += 1;
    }

    /// Counts a call of a caller without a certificate that got `outcome` (a probe with the
    /// probes).
    fn count(&self, source: Source, rpc: Rpc, outcome: &'static str) {
        if rpc.service == HEALTH {
            self.count_probe(outcome);
            return;
        }
        self.counted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(source, rpc, outcome);
    }

    /// Whether a call of `caller` may go on past the limit on refused calls.
    fn refused_check(&self, caller: &Caller, now: Instant) -> Verdict {
        match caller {
            Caller::Anonymous(s) => self.refused_anonymous.check(&s.source, now),
            Caller::Holder(holder) => self.refused_holders.check(holder, now),
            Caller::Unknown => Verdict::Allowed,
        }
    }

    /// Counts a refused call of `caller`.
    fn refused(&self, caller: &Caller) {
        let now = Instant::now();
        match caller {
            Caller::Anonymous(s) => self.refused_anonymous.refused(&s.source, now),
            Caller::Holder(holder) => self.refused_holders.refused(holder, now),
            Caller::Unknown => {}
        }
    }

    /// Records what was counted since the last call: the health probes as one record
    /// (`kms.Gate/HealthChecks`, the count per outcome in its `batch`), the calls without a
    /// certificate as one record per source, method and outcome, and the calls the limit on
    /// refused calls refused each certificate holder (past its window's first) as one
    /// `kms.Gate/RateLimited` record under its principal (see the module docs); nothing when
    /// there were none. The server calls it every minute and at shutdown.
    pub(crate) async fn record_counts(&self) {
        let now = Instant::now();
        let outcomes = std::mem::take(&mut *self.probes.lock().unwrap_or_else(|p| p.into_inner()));
        let tally = std::mem::take(&mut *self.counted.lock().unwrap_or_else(|p| p.into_inner()));
        let limited = self.refused_holders.take_limited(now);
        // Those of callers without a certificate are in the tally already.
        let _ = self.refused_anonymous.take_limited(now);
        let mut events = Vec::new();
        let items: u64 = outcomes.values().sum();
        if items > 0 {
            events.push(AuditEvent {
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
            });
        }
        for ((source, service, operation, outcome), n) in tally.calls {
            events.push(count_event(
                crate::policy::ANONYMOUS,
                source.map_or_else(|| OTHER_SOURCES.to_owned(), |s| s.to_string()),
                service,
                operation,
                outcome,
                n,
            ));
        }
        let limited_calls: u64 = limited.iter().map(|(_, n)| n).sum();
        if limited_calls > 0 {
            tracing::warn!(
                holders = limited.len(),
                calls = limited_calls,
                "calls of certificate holders refused by the limit on refused calls were counted, not recorded one by one"
            );
        }
        for (holder, n) in limited {
            events.push(count_event(
                &holder.principal,
                holder.source.to_string(),
                GATE,
                "RateLimited",
                code_name(Code::ResourceExhausted),
                n,
            ));
        }
        // Handed over together, so that they share durable commits.
        let receipts: Vec<_> = events
            .into_iter()
            .map(|e| {
                let rpc = format!("{}/{}", e.service, e.operation);
                (rpc, self.audit.submit(e))
            })
            .collect();
        for (rpc, receipt) in receipts {
            if receipt.durable().await.is_err() {
                tracing::error!(rpc, "audit record of counted calls not written");
            }
        }
    }

    /// Counts (and at most every [`LIMIT_LOG_EVERY`] per limit logs) a call of a caller
    /// without a certificate from `source` refused by `limit`.
    fn anonymous_limited(&self, limit: LimitKind, source: Source) {
        crate::metrics::metrics().limit_reached(limit);
        let key = limit.key();
        if let Some(unsaid) = self.log.due(key, Instant::now()) {
            tracing::warn!(
                limit = key,
                peer = %source,
                refused_since_last_line = unsaid,
                "calls without a client certificate over a per-address limit are refused (RESOURCE_EXHAUSTED) and counted"
            );
        }
    }
}

/// The record of `n` calls counted together (see the module docs): no request of its own,
/// so no request id, key or sizes; outcome `outcome`, and `n` in its `batch`.
fn count_event(
    principal: &str,
    peer: String,
    service: &str,
    operation: &str,
    outcome: &str,
    n: u64,
) -> AuditEvent {
    AuditEvent {
        principal: principal.to_owned(),
        peer,
        service: service.to_owned(),
        operation: operation.to_owned(),
        outcome: outcome.to_owned(),
        batch: Some(BatchSummary {
            items: n,
            outcomes: [(outcome.to_owned(), n)].into(),
            versions: Default::default(),
        }),
        ..AuditEvent::default()
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

/// Whether a call counts against its address's refused calls: denied, refused by tonic
/// before any handler ran (oversized, malformed, unknown method), or begun after its
/// deadline (nothing done, but recorded: see `expired`). Business errors (a bad share, a
/// failed decryption) do not count: the handlers answer and record those.
fn is_refusal(code: Code, handled: bool) -> bool {
    match code {
        Code::Unauthenticated | Code::PermissionDenied | Code::DeadlineExceeded => true,
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

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the ready one serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = Arc::clone(&self.state);
        // The request id the handler, the record and every answer carry: the caller's if it
        // is a sane token, else a fresh one put in its place.
        let request_id = super::request_id_of(req.headers());
        let id_value = http::HeaderValue::try_from(request_id.as_str()).ok();
        if let Some(v) = &id_value {
            req.headers_mut().insert(super::REQUEST_ID, v.clone());
        }
        // Taken now, before tonic takes its own: see `deadline`. Not for a caller without a
        // certificate: its calls (Status, WhoAmI, health) change nothing, are counted rather
        // than recorded, and have their own limits and timeout, which a deadline must not
        // cut short.
        let stranger = req
            .extensions()
            .get::<PeerInfo>()
            .is_some_and(|p| p.identity.tls && !p.identity.authenticated);
        let deadline = super::deadline::of(req.headers()).filter(|_| !stranger);
        if let Some(d) = &deadline {
            req.extensions_mut().insert(d.clone());
        }
        Box::pin(async move {
            let started = Instant::now();
            let (service, method) = rpc_of(req.uri().path());
            let mut response = match deadline {
                None => pass(inner, Arc::clone(&state), req, &service, &method).await?,
                Some(d) => {
                    let on_expiry = Expiry::of(&req, &service, &method, &request_id);
                    tokio::select! {
                        biased;
                        r = pass(inner, Arc::clone(&state), req, &service, &method) => r?,
                        () = tokio::time::sleep_until(d.at().into()) => expired(&state, &d, on_expiry),
                    }
                }
            };
            if let Some(v) = id_value {
                response.headers_mut().entry(super::REQUEST_ID).or_insert(v);
            }
            with_error_info(&mut response);
            let code = status_of(&response).map_or("OK", code_name);
            crate::metrics::metrics().request(&service, &method, code, started.elapsed());
            Ok(response)
        })
    }
}

/// What the gate records of a call whose deadline passed before its work began, and whom
/// it counts that against.
struct Expiry {
    event: AuditEvent,
    /// The certificate holder calling (none: no connect info).
    holder: Option<Holder>,
}

impl Expiry {
    fn of(req: &http::Request<Body>, service: &str, method: &str, request_id: &str) -> Self {
        let peer = req.extensions().get::<PeerInfo>();
        Self {
            event: AuditEvent {
                request_id: request_id.to_owned(),
                principal: peer.map_or_else(
                    || crate::policy::ANONYMOUS.to_owned(),
                    |p| p.identity.principal.clone(),
                ),
                peer: peer.map(|p| p.addr.to_string()).unwrap_or_default(),
                service: service.to_owned(),
                operation: method.to_owned(),
                outcome: code_name(Code::DeadlineExceeded).to_owned(),
                ..AuditEvent::default()
            },
            holder: peer.map(|p| Holder {
                source: Source::of(p.addr.ip()),
                principal: p.identity.principal.clone(),
            }),
        }
    }
}

/// The answer when the caller's deadline passed before the call's answer: says whether the
/// work had begun (see [`super::deadline`]). Given at once, before tonic's own timeout: a
/// call whose work never began is recorded without waiting for the record, which tells of
/// nothing done, and counts as a refused call of its caller, so that a caller cannot have
/// such records written faster than `refused_calls_per_minute` (past it, its calls are
/// refused unread and counted).
fn expired(state: &GateState, deadline: &Deadline, on_expiry: Expiry) -> http::Response<Body> {
    let expired = deadline.expire();
    let message = match expired {
        Expired::NotBegun | Expired::Refused => {
            "the call's deadline passed before it began: nothing was done"
        }
        Expired::Begun => {
            "the call's deadline passed while it ran: it may have completed; its x-request-id \
             is in the audit log with its outcome (docs/api.md)"
        }
    };
    if expired != Expired::Begun
        && let Some(holder) = on_expiry.holder.clone()
    {
        state.refused(&Caller::Holder(holder));
    }
    if expired == Expired::NotBegun {
        if on_expiry.event.service == HEALTH {
            state.count_probe(code_name(Code::DeadlineExceeded));
        } else {
            drop(state.audit.submit(on_expiry.event));
        }
    }
    status(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", message).into_http()
}

/// Every error answer carries a `google.rpc.ErrorInfo`: one tonic made itself (a request
/// too large, an unknown method, a malformed body) gets one naming its code.
fn with_error_info(response: &mut http::Response<Body>) {
    if response.headers().contains_key("grpc-status-details-bin") {
        return;
    }
    let Some(found) = Status::from_header_map(response.headers()) else {
        return;
    };
    let reason = match found.code() {
        Code::Ok => return,
        Code::OutOfRange | Code::ResourceExhausted => "REQUEST_TOO_LARGE",
        Code::Unimplemented => "UNKNOWN_METHOD",
        Code::Cancelled => "CANCELLED",
        _ => "REQUEST_REFUSED",
    };
    let _ = status(found.code(), reason, found.message()).add_header(response.headers_mut());
}

/// The gate's work on one call (see the module docs): the refusals it makes itself, then
/// the call, then its record when no handler of ours made one (or its count).
async fn pass<S>(
    inner: S,
    state: Arc<GateState>,
    req: http::Request<Body>,
    service: &str,
    method: &str,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let peer = req.extensions().get::<PeerInfo>().cloned();
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
    let Some(peer) = peer else {
        if let Some(refusal) = refuse(&state, &Caller::Unknown, None, &event).await {
            return Ok(refusal);
        }
        return served(inner, &state, req, event, &Caller::Unknown).await;
    };
    let ip = peer.addr.ip();
    let source = Source::of(ip);
    if peer.identity.tls && !peer.identity.authenticated {
        let stranger = Stranger {
            source,
            ip,
            rpc: Rpc::of(service, method),
        };
        // Its call is in flight on its connection (which is not idle meanwhile) until
        // answered.
        let in_flight = peer.activity.begin();
        return anonymous(inner, &state, req, event, stranger, in_flight).await;
    }
    let caller = Caller::Holder(Holder {
        source,
        principal: peer.identity.principal.clone(),
    });
    if let Some(refusal) = refuse(&state, &caller, Some(&peer), &event).await {
        return Ok(refusal);
    }
    served(inner, &state, req, event, &caller).await
}

/// A call of a caller without a certificate: refused or served, and counted, never
/// recorded one by one (see the module docs).
async fn anonymous<S>(
    inner: S,
    state: &GateState,
    mut req: http::Request<Body>,
    event: AuditEvent,
    stranger: Stranger,
    in_flight: CallInFlight,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let Stranger { source, ip, rpc } = stranger;
    let now = Instant::now();
    if let Verdict::Limited { wait, .. } = state.refused_anonymous.check(&source, now) {
        state.anonymous_limited(LimitKind::RefusedCalls, source);
        state.count(source, rpc, code_name(Code::ResourceExhausted));
        return Ok(status(
            Code::ResourceExhausted,
            "TOO_MANY_REFUSED_CALLS",
            format!(
                "too many refused calls from this address: try again in {} s",
                wait.as_secs().max(1)
            ),
        )
        .into_http());
    }
    if super::need_of(&event.service, &event.operation).needs_certificate() {
        state.refused_anonymous.refused(&source, now);
        state.count(source, rpc, code_name(Code::Unauthenticated));
        return Ok(super::to_status(&Denied::Unauthenticated.into()).into_http());
    }
    // Past here: `Status`, `WhoAmI` or health.
    if let Err(wait) = state.anonymous_calls.allow(ip, now) {
        state.anonymous_limited(LimitKind::AnonymousCalls, source);
        state.count(source, rpc, code_name(Code::ResourceExhausted));
        let status = status(
            Code::ResourceExhausted,
            "TOO_MANY_ANONYMOUS_CALLS",
            format!(
                "too many calls without a client certificate from this address: try again in {} s",
                wait.as_secs().max(1)
            ),
        );
        // The refusal comes after a while: a client that waits for its answers (HTTP/2
        // lets it have only `max_concurrent_streams` calls open per connection) cannot make
        // the server refuse calls as fast as it can send them.
        tokio::time::sleep(ANONYMOUS_LIMITED_DELAY.min(wait)).await;
        return Ok(status.into_http());
    }
    let limit = state.anonymous_max_bytes;
    let body = std::mem::replace(req.body_mut(), Body::empty());
    *req.body_mut() = Body::new(Limited::new(body, limit));
    req.extensions_mut().insert(Counted);
    let timeout = state.anonymous_timeout;
    let caller = Caller::Anonymous(stranger);
    let response =
        match tokio::time::timeout(timeout, served(inner, state, req, event, &caller)).await {
            Ok(response) => response?,
            Err(_) => {
                let status = status(
                    Code::DeadlineExceeded,
                    "ANONYMOUS_CALL_TIMEOUT",
                    format!(
                        "a call without a client certificate must be answered within {} s",
                        timeout.as_secs()
                    ),
                );
                state.count(source, rpc, code_name(status.code()));
                status.into_http()
            }
        };
    // The call is in flight until its answer has been sent (a health Watch: until it
    // ends).
    Ok(response.map(|body| Body::new(InFlightBody::new(body, in_flight))))
}

/// The call, then its record when no handler of ours made one, or its count (a caller
/// without a certificate, or a health probe).
async fn served<S>(
    mut inner: S,
    state: &GateState,
    mut req: http::Request<Body>,
    event: AuditEvent,
    caller: &Caller,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let probe = event.service == HEALTH;
    let recorded = Recorded::default();
    req.extensions_mut().insert(recorded.clone());
    if probe {
        // Counted, recorded in aggregate by `record_counts`.
        recorded.set();
    }
    let response = inner.call(req).await?;
    let code = status_of(&response);
    // A probe's answer (NOT_FOUND for an unknown service) is the health service's business,
    // not a refusal: `recorded` is set for probes.
    if code.is_some_and(|c| is_refusal(c, recorded.get())) {
        state.refused(caller);
    }
    let outcome = code.map_or("OK", code_name);
    if let Caller::Anonymous(s) = caller {
        // Counted whether a handler ran or tonic refused it, recorded by `record_counts`.
        state.count(s.source, s.rpc, outcome);
        return Ok(response);
    }
    if probe {
        state.count_probe(outcome);
    }
    if recorded.get() {
        return Ok(response);
    }
    // No handler of ours recorded this call: tonic refused it, a handler panicked, or it is
    // a reflection stream. A reflection stream whose answer began (its status comes at its
    // end) is recorded as admitted: `OK`.
    let reflection = [REFLECTION, REFLECTION_V1ALPHA].contains(&event.service.as_str());
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
        Ok(audit_unavailable().into_http())
    }
}

/// The answer when the gate refuses a certificate holder's call itself, unread: over its
/// limit of refused calls, or short of the rule of a service that has no handler of ours
/// (health, reflection). `None`: the call goes on.
async fn refuse(
    state: &GateState,
    caller: &Caller,
    peer: Option<&PeerInfo>,
    event: &AuditEvent,
) -> Option<http::Response<Body>> {
    if let Verdict::Limited { wait, first } = state.refused_check(caller, Instant::now()) {
        let status = status(
            Code::ResourceExhausted,
            "TOO_MANY_REFUSED_CALLS",
            format!(
                "too many refused calls from this address: try again in {} s",
                wait.as_secs().max(1)
            ),
        );
        crate::metrics::metrics().limit_reached(LimitKind::RefusedCalls);
        if first {
            if let Caller::Holder(holder) = caller {
                tracing::warn!(
                    peer = %holder.source,
                    principal = %holder.principal,
                    "refused calls over the limit: this caller's further calls from this address are refused unread for the rest of the minute, and counted"
                );
            }
            return Some(answer(state, event.clone(), status).await);
        }
        return Some(status.into_http());
    }
    if [HEALTH, REFLECTION, REFLECTION_V1ALPHA].contains(&event.service.as_str())
        && let Some(identity) = peer.map(|p| &p.identity)
        && let Err(denied) = crate::access::check(
            super::need_of(&event.service, &event.operation),
            identity,
            &state.roles,
            i64::try_from(crate::keyring::now()).unwrap_or(i64::MAX),
        )
    {
        state.refused(caller);
        let status = super::to_status(&denied.into());
        return Some(answer(state, event.clone(), status).await);
    }
    None
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
        audit_unavailable().into_http()
    }
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
                        return Poll::Ready(Some(Err(status(
                            Code::ResourceExhausted,
                            "REQUEST_TOO_LARGE",
                            format!(
                                "a request without a client certificate is limited to {} bytes",
                                this.limit
                            ),
                        ))));
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

/// A response body that holds its call in flight on its connection until it is done.
struct InFlightBody {
    inner: Body,
    _call: CallInFlight,
}

impl InFlightBody {
    fn new(inner: Body, call: CallInFlight) -> Self {
        Self { inner, _call: call }
    }
}

impl http_body::Body for InFlightBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
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

    /// However many addresses call, and whatever they call, an interval's counts (and so
    /// its records) are bounded: the sources past the first thousand, and the rows past the
    /// first two thousand, are counted together; paths the server does not answer are one
    /// method.
    #[test]
    fn counts_are_per_source_method_and_outcome_and_bounded() {
        let mut tally = Tally::default();
        let v4 = |i: u32| Source::of(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        let status = Rpc::of("kms.v1.System", "Status");
        let list = Rpc::of("kms.v1.KeyManagement", "ListKeys");
        for i in 0..(MAX_COUNTED_SOURCES as u32 + 500) {
            tally.add(v4(i), status, "OK");
            tally.add(v4(i), list, "UNAUTHENTICATED");
        }
        tally.add(v4(0), status, "RESOURCE_EXHAUSTED");
        // Another address of a counted IPv6 /64 is that source.
        let a = Source::of("2001:db8::1".parse().unwrap());
        let b = Source::of("2001:db8::2".parse().unwrap());
        assert_eq!(a, b);
        // Every row is taken: a counted source's new method or outcome goes with the others.
        assert_eq!(tally.apart, MAX_COUNTED_ROWS);
        assert_eq!(
            tally.calls[&(Some(v4(0)), "kms.v1.System", "Status", "OK")],
            1
        );
        assert!(!tally.calls.contains_key(&(
            Some(v4(0)),
            "kms.v1.System",
            "Status",
            "RESOURCE_EXHAUSTED"
        )));
        assert_eq!(
            tally.calls[&(None, "kms.v1.System", "Status", "RESOURCE_EXHAUSTED")],
            1
        );
        assert_eq!(tally.calls[&(None, "kms.v1.System", "Status", "OK")], 500);
        assert_eq!(
            tally.calls[&(None, "kms.v1.KeyManagement", "ListKeys", "UNAUTHENTICATED")],
            500
        );
        assert_eq!(tally.calls.len(), MAX_COUNTED_ROWS + 3);
        // A caller's made-up paths are one method: counted, bounded.
        let mut tally = Tally::default();
        for path in ["Exfiltrate", "Exfiltrate2", "<invalid method, 9 bytes>"] {
            tally.add(
                v4(1),
                Rpc::of("kms.v1.KeyManagement", path),
                "UNAUTHENTICATED",
            );
        }
        tally.add(v4(1), Rpc::of("evil.Service", "Encrypt"), "UNAUTHENTICATED");
        assert_eq!(
            tally.calls,
            BTreeMap::from([
                (
                    (
                        Some(v4(1)),
                        UNKNOWN_SERVICE,
                        UNKNOWN_METHOD,
                        "UNAUTHENTICATED"
                    ),
                    1
                ),
                (
                    (
                        Some(v4(1)),
                        "kms.v1.KeyManagement",
                        UNKNOWN_METHOD,
                        "UNAUTHENTICATED"
                    ),
                    3
                ),
            ])
        );
    }
}
