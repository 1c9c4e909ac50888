//! The Vault-compatible HTTPS front (`[http] listen`, docs/vault-transit.md): Vault's
//! Transit paths, its KV v2 paths ([`kv`]), its database engine and lease paths
//! ([`database`], [`leases`]: docs/vault-database.md), `sys/health`, `sys/seal-status`,
//! `auth/cert/login` and `auth/token/lookup-self`, so that programs written for Vault (hvac
//! scripts, SPIRE's `hashicorp_vault` KeyManager, the vault-kubernetes-kms plugin, `seal
//! "transit"`) work against kms unchanged.
//!
//! The front only translates: a request into the keyring operation of the same rule,
//! grants and audit record as its gRPC twin ([`call`]), the answer or refusal into Vault's
//! JSON and status codes ([`vault`]).
//!
//! **Architecture invariants:**
//! - The listener is the gRPC listener's twin (`access::tls::incoming`): the same
//!   certificate, client CA bundle, handshake limits and connection caps, the caller's
//!   identity fixed at the handshake. Only the ALPN protocol differs (`http/1.1`).
//! - The client certificate is the identity on every request. A caller without one gets
//!   `sys/health` and `sys/seal-status` (counted with the gRPC health probes, never
//!   recorded one by one) and a 403 for anything else, before its body is read.
//! - A session token (`X-Vault-Token`) adds nothing: it is checked against the certificate
//!   that obtained it and refused with any other ([`auth`]).
//! - No request or answer body (plaintext, ciphertext, associated data, token) reaches a
//!   log line, an error message or a record: only sizes.

mod auth;
mod call;
pub(crate) mod config;
mod database;
mod database_static;
mod identity;
mod keys;
mod kv;
mod leases;
mod transit;
mod vault;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::json;
use zeroize::Zeroizing;

use crate::access::limiter::Limits;
use crate::access::tls::{Admission, Conn, PeerInfo, Protocol, ServerTls};
use crate::grpc::gate::{FrontRefusal, GateState};
use crate::service::{Op, Service};
use call::{Refused, Reply};

/// The largest request body: gRPC's largest message (16 MiB) in base64, with room for the
/// JSON around it. (Vault's default is 32 MiB.) Each plaintext, message and associated
/// data within it is bounded by the keyring as on gRPC (64 KiB), a batch to 1000 items.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024 / 3 * 4 + 64 * 1024;

/// The header of Vault's session token.
const TOKEN_HEADER: &str = "x-vault-token";

/// What the front serves with.
pub(crate) struct Front {
    /// The service, as gRPC's.
    service: Service,
    /// The session tokens.
    tokens: Arc<auth::Tokens>,
    /// Where probes are counted, with gRPC's health probes.
    probes: Arc<GateState>,
    /// The protection of keys created here.
    key_protection: crate::keyring::model::Protection,
}

impl Front {
    /// A front over `service` with `[http]`'s `settings`.
    pub(crate) fn new(
        service: Service,
        settings: &config::HttpSettings,
        probes: Arc<GateState>,
    ) -> Self {
        Self {
            service,
            tokens: Arc::new(auth::Tokens::new(settings.token_ttl)),
            probes,
            key_protection: settings.key_protection,
        }
    }
}

/// An answer with a body: Vault's envelope around `data` (or `auth`), or a status alone.
pub(crate) enum Answer {
    /// `data` from a call.
    Data {
        /// The reply.
        reply: Reply,
        /// The request id.
        request_id: String,
        /// Vault's `mount_type`.
        mount_type: &'static str,
    },
    /// `auth` (a login).
    Auth {
        /// The auth object (it holds a token: zeroized when dropped).
        reply: Reply,
        /// The request id.
        request_id: String,
    },
    /// A body of its own (sys paths answer bare JSON) and its status.
    Raw(StatusCode, Vec<u8>),
    /// A public document (an issuer's discovery document, keys or CA certificates, the
    /// SPIFFE bundle) and its content type: 200, cacheable for [`PUBLIC_MAX_AGE`] seconds.
    Public(Vec<u8>, &'static str),
    /// `sys/health`'s answer: the status the caller asked for, and the outcome the
    /// server's state gives (`OK`, `UNAVAILABLE`), which is what is counted.
    Health {
        /// The status answered.
        status: StatusCode,
        /// The body.
        body: Vec<u8>,
        /// The outcome counted and in the metrics.
        outcome: &'static str,
    },
}

/// Binds the front's listener and says where (`kms http listening on ADDR`).
pub(crate) async fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("kms http listening on {local}");
    tracing::info!(addr = %local, "Vault-compatible HTTPS front listening");
    Ok(listener)
}

/// How long a client has to send a request's head (line and headers), from the connection
/// or the previous answer: a client that trickles them (slowloris) is cut off.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a client has to send a request's body once its head is read.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The most a connection buffers of a request's head (hyper's floor is 8 KiB): a head is a
/// line and a few headers, a token among them.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves the front on `listener` until `shutdown`, then lets each connection finish its
/// request in flight. Each connection speaks HTTP/1.1 only (hyper's `http1` builder: a
/// client that sends HTTP/2's preface is refused, so no stream limits need keeping here),
/// with [`HEADER_READ_TIMEOUT`] and [`MAX_HEAD_BYTES`] on every request head.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerTls>,
    limits: Limits,
    admission: Admission,
    front: Front,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tokio_stream::StreamExt as _;
    let mut incoming =
        crate::access::tls::incoming(listener, Some(tls), limits, admission, Protocol::Http1);
    let router = axum::Router::new()
        .fallback(handle)
        .with_state(Arc::new(front));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => break,
            next = incoming.next() => match next {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                // The accept loop ended: serve what is open until shutdown.
                None => {
                    (&mut shutdown).await;
                    break;
                }
            },
        };
        connections.spawn(connection(conn, router.clone(), stopping.clone()));
        // Reap the connections that ended, so that the set holds only open ones.
        while connections.try_join_next().is_some() {}
    }
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection: HTTP/1.1, each request handed to the router with what the
/// connection's handshake learnt, until the client closes it or the server stops.
async fn connection(
    conn: Conn,
    router: axum::Router,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let info = conn.info().clone();
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(info.clone()));
            let mut router = router.clone();
            async move { tower_service::Service::call(&mut router, request).await }
        });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
    let mut served = std::pin::pin!(served);
    // The guard `wait_for` returns is dropped here, not held across the shutdown's await.
    let stop = async move {
        let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
    };
    tokio::select! {
        _ = served.as_mut() => {}
        () = stop => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

/// Serves one request.
async fn handle(
    State(front): State<Arc<Front>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    request: axum::extract::Request,
) -> Response {
    let started = std::time::Instant::now();
    // While a call is in flight, its connection is not idle.
    let _in_flight = peer.activity.begin();
    let (parts, body) = request.into_parts();
    let head = parts.method == Method::HEAD;
    let path_bytes = parts.uri.path().len();
    let service = if parts.uri.path().starts_with("/v1/secret/") {
        "kms.v1.Secrets"
    } else if parts.uri.path().starts_with("/v1/database/")
        || parts.uri.path().starts_with("/v1/sys/leases/")
    {
        "kms.v1.Databases"
    } else {
        "kms.v1.KeyManagement"
    };
    let mut answer = route(&front, &peer, &parts, body).await;
    // What the front refused itself, before any call, is recorded and counted as the gRPC
    // gate records and counts a call no handler answered; a certificate holder's refusal
    // by a call (no grant, ...) counts against its limit, as on gRPC.
    if let Err((r, _)) = &mut answer {
        if !r.recorded {
            let code = code_label(r.status);
            if !front.probes.refused_at_front(&peer, path_bytes, code).await {
                *r = call::audit_unavailable();
            }
        } else if r.status == StatusCode::FORBIDDEN && call::authenticated(&peer) {
            front.probes.refused_by_front(&peer);
        }
    }
    let (status, op) = match &answer {
        Ok((a, op)) => (status_of(a), *op),
        Err((r, op)) => (r.status, *op),
    };
    let label = match &answer {
        // The server's state, not the status a caller chose.
        Ok((Answer::Health { outcome, .. }, _)) => outcome,
        _ => code_label(status),
    };
    crate::metrics::metrics().request(service, op, label, started.elapsed());
    let mut response = match answer {
        Ok((a, _)) => respond(a),
        Err((r, _)) => refusal(&r),
    };
    if head {
        *response.body_mut() = Body::empty();
    }
    response
}

fn status_of(a: &Answer) -> StatusCode {
    match a {
        Answer::Data { reply, .. } => status_of_reply(reply),
        Answer::Auth { .. } => StatusCode::OK,
        Answer::Raw(s, _) | Answer::Health { status: s, .. } => *s,
        Answer::Public(..) => StatusCode::OK,
    }
}

fn code_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "OK",
        400 => "INVALID_ARGUMENT",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        413 => "OUT_OF_RANGE",
        415 => "INVALID_ARGUMENT",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn respond(answer: Answer) -> Response {
    match answer {
        Answer::Data {
            reply,
            request_id,
            mount_type,
        } => {
            let status = status_of_reply(&reply);
            if status == StatusCode::NO_CONTENT {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = status;
                return r;
            }
            let data: serde_json::Value =
                serde_json::from_slice(&reply.data).unwrap_or(serde_json::Value::Null);
            let body = vault::leased_envelope(
                &request_id,
                Some(&data),
                None,
                &reply.warnings,
                mount_type,
                reply.lease.as_ref(),
            );
            json_response(status, body)
        }
        Answer::Auth { reply, request_id } => {
            let auth: serde_json::Value =
                serde_json::from_slice(&reply.data).unwrap_or(serde_json::Value::Null);
            json_response(
                StatusCode::OK,
                vault::envelope(&request_id, None, Some(&auth), &[], "cert"),
            )
        }
        Answer::Raw(status, body) | Answer::Health { status, body, .. } => {
            json_response(status, body)
        }
        Answer::Public(body, content_type) => {
            let mut r = json_response(StatusCode::OK, body);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_str(&format!("public, max-age={PUBLIC_MAX_AGE}"))
                    .unwrap_or(HeaderValue::from_static("no-store")),
            );
            r
        }
    }
}

/// The raw (not decoded) value of the first `name=` of a query string, if any.
pub(crate) fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// How long a verifier may cache an issuer's discovery document and keys, in seconds.
pub(crate) const PUBLIC_MAX_AGE: u64 = 60;

/// A public document of the credentials engine (open to everyone, counted with the
/// probes, never recorded one by one).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PublicDoc {
    /// A jwt issuer's OpenID discovery document.
    Discovery,
    /// A jwt issuer's JWKS.
    Keys,
    /// An x509 issuer's CA certificate that signs now (PEM): Vault's `pki/ca/pem`.
    CaPem,
    /// An x509 issuer's every CA certificate with its chain (PEM): Vault's `pki/ca_chain`.
    CaChain,
    /// Every issuer's keys and CA certificates as a SPIFFE bundle.
    SpiffeBundle,
    /// An ssh issuer's CA keys, an authorized_keys file: Vault's `ssh/public_key`.
    SshCaKeys,
}

impl PublicDoc {
    /// Its operation's name in the metrics.
    fn op(self) -> &'static str {
        match self {
            Self::Discovery => "IssuerDiscovery",
            Self::Keys => "IssuerKeys",
            Self::CaPem => "IssuerCaPem",
            Self::CaChain => "IssuerCaChain",
            Self::SpiffeBundle => "SpiffeBundle",
            Self::SshCaKeys => "IssuerSshCaKeys",
        }
    }
}

/// The content type of Vault's `pki/ca/pem` and `pki/ca_chain`.
const PEM_CHAIN: &str = "application/pem-certificate-chain";

/// A public document of issuer `name` (none for the SPIFFE bundle): 404 for an issuer
/// that is not one of the document's kind, 503 sealed.
async fn issuer_document(front: &Front, name: &str, doc: PublicDoc) -> Result<Answer, Refused> {
    let service = &front.service;
    let base = service.issuer_base.clone();
    if base.is_none() && matches!(doc, PublicDoc::Discovery | PublicDoc::Keys) {
        return Err(not_found());
    }
    let engines = service
        .seal
        .credentials()
        .and_then(|c| Ok((c, service.seal.keyring()?)));
    let Ok((credentials, keyring)) = engines else {
        return Err(Refused {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..Refused::bad("Vault is sealed")
        });
    };
    let name = name.to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        let keys = keyring.as_ref();
        let json = |v: serde_json::Value| {
            (
                serde_json::to_vec(&v).unwrap_or_default(),
                "application/json",
            )
        };
        let pem = |p: String| (p.into_bytes(), PEM_CHAIN);
        Ok(match doc {
            PublicDoc::Keys => json(credentials.jwks(keys, &name)?),
            PublicDoc::Discovery => {
                json(credentials.discovery(keys, base.as_deref().unwrap_or_default(), &name)?)
            }
            PublicDoc::CaPem => pem(credentials.ca_pem(keys, &name, true)?),
            PublicDoc::CaChain => pem(credentials.ca_pem(keys, &name, false)?),
            PublicDoc::SpiffeBundle => json(credentials.spiffe_bundle(keys, PUBLIC_MAX_AGE)?),
            PublicDoc::SshCaKeys => (
                credentials.ssh_ca_keys(keys, &name)?.into_bytes(),
                "text/plain; charset=utf-8",
            ),
        })
    })
    .await;
    use crate::credentials::CredentialsError as E;
    match answer {
        Ok(Ok((body, content_type))) => Ok(Answer::Public(body, content_type)),
        Ok(Err(E::IssuerNotFound(_) | E::WrongKind { .. } | E::NoCaCertificate)) => {
            Err(not_found())
        }
        Ok(Err(e)) => {
            tracing::error!(error = %crate::error_chain(&e), "an issuer's public document could not be made");
            Err(Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                ..Refused::bad("the issuer's keys cannot be read now")
            })
        }
        Err(_) => Err(Refused {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..Refused::bad("internal error")
        }),
    }
}

/// An issuer's public document, answered to anyone and counted with the probes (a 404
/// too: a refusal not recorded one by one).
async fn public_document(front: &Front, name: &str, doc: PublicDoc) -> Routed {
    let op = doc.op();
    let answer = issuer_document(front, name, doc).await;
    front.probes.count_probe(match &answer {
        Ok(_) => "OK",
        Err(r) if r.status == StatusCode::NOT_FOUND => "NOT_FOUND",
        Err(_) => "UNAVAILABLE",
    });
    match answer {
        Ok(a) => Ok((a, op)),
        Err(r) => Err((
            Refused {
                recorded: true,
                ..r
            },
            op,
        )),
    }
}

fn status_of_reply(reply: &Reply) -> StatusCode {
    if reply.status == 0 {
        return StatusCode::OK;
    }
    StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK)
}

/// Vault's error answer: `{"errors": [...]}` (empty for a 404 of what does not exist).
fn refusal(r: &Refused) -> Response {
    let messages: Vec<&str> = if r.message.is_empty() {
        Vec::new()
    } else {
        vec![r.message.as_str()]
    };
    json_response(r.status, vault::errors(&messages))
}

/// A request's answer and its operation's name (for the metrics), or its refusal.
type Routed = Result<(Answer, &'static str), (Refused, &'static str)>;

async fn route(front: &Front, peer: &PeerInfo, parts: &http::request::Parts, body: Body) -> Routed {
    let path = parts.uri.path();
    // A path outside `/v1/` is refused after the gate's rules, as any unknown path.
    let rest = path.strip_prefix("/v1/");
    let segments: Vec<&str> =
        rest.map_or_else(Vec::new, |r| r.trim_end_matches('/').split('/').collect());
    let method = if parts.method.as_str() == "LIST" {
        Method::GET
    } else {
        parts.method.clone()
    };
    let list = parts.method.as_str() == "LIST"
        || parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "list=true" || kv == "list=1"));
    let open = matches!(
        segments.as_slice(),
        ["sys", "health" | "seal-status"]
            | [
                "identity",
                "oidc",
                "provider",
                _,
                ".well-known",
                "openid-configuration" | "keys"
            ]
            | ["pki", _, "ca", "pem"]
            | ["pki", _, "ca_chain"]
            | ["identity", "spiffe", "bundle"]
            | ["ssh", _, "public_key"]
    );
    // The gRPC gate's rules before a call is read: limits on refused calls and on calls
    // without a certificate, which gets only the open paths.
    match front.probes.admit(peer, open, "<vault path>") {
        Ok(()) => {}
        Err(FrontRefusal::Unauthenticated) => {
            tracing::debug!(peer = %peer.addr, "HTTPS request without a client certificate refused");
            // Counted by the gate.
            let refused = Refused {
                recorded: true,
                ..Refused::denied("permission denied")
            };
            return Err((refused, "unauthenticated"));
        }
        Err(limited) => {
            let refused = limited_refusal(front, peer, path.len(), limited).await;
            return Err((refused, "limited"));
        }
    }
    if rest.is_none() {
        return Err((not_found(), "unknown"));
    }
    // Open to everyone: counted, not recorded one by one.
    if let ["sys", what @ ("health" | "seal-status")] = segments.as_slice() {
        if method != Method::GET && method != Method::HEAD {
            return Err((method_not_allowed(), "unknown"));
        }
        let answer = if *what == "health" {
            sys_health(front, parts.uri.query()).map_err(|r| (r, "Health"))?
        } else {
            sys_seal_status(front)
        };
        // Counted with the outcome of the server's state, never a status the caller chose.
        front.probes.count_probe(match &answer {
            Answer::Health { outcome, .. } => outcome,
            _ => "OK",
        });
        let op = if *what == "health" {
            "Health"
        } else {
            "SealStatus"
        };
        return Ok((answer, op));
    }
    // Issuers' public documents: open to everyone, counted with the probes.
    let public = match segments.as_slice() {
        [
            "identity",
            "oidc",
            "provider",
            name,
            ".well-known",
            "openid-configuration",
        ] => Some((*name, PublicDoc::Discovery)),
        ["identity", "oidc", "provider", name, ".well-known", "keys"] => {
            Some((*name, PublicDoc::Keys))
        }
        ["pki", name, "ca", "pem"] => Some((*name, PublicDoc::CaPem)),
        ["pki", name, "ca_chain"] => Some((*name, PublicDoc::CaChain)),
        ["identity", "spiffe", "bundle"] => Some(("", PublicDoc::SpiffeBundle)),
        // An ssh issuer's CA keys (Vault's path, the issuer being the mount `ssh/NAME`).
        ["ssh", name, "public_key"] => Some((*name, PublicDoc::SshCaKeys)),
        _ => None,
    };
    if let Some((name, doc)) = public {
        if method != Method::GET && method != Method::HEAD {
            return Err((method_not_allowed(), "unknown"));
        }
        return public_document(front, name, doc).await;
    }
    // Everything else needs a client certificate (`admit` refused it unread without one).
    if !call::authenticated(peer) {
        return Err((Refused::denied("permission denied"), "unauthenticated"));
    }
    if let Some(token) = parts.headers.get(TOKEN_HEADER) {
        let ok = token.to_str().ok().is_some_and(|t| {
            front
                .tokens
                .check(t, call::principal(peer), peer.certificate.as_ref())
                .is_some()
        });
        if !ok {
            return Err((
                Refused::denied(
                    "permission denied: the token is not valid for this client certificate",
                ),
                "token",
            ));
        }
    }
    let body = match read_body(body, &parts.headers).await {
        Ok(b) => b,
        Err(r) => return Err((r, "unknown")),
    };
    let size = body.len();
    let params = match vault::Params::parse(&body) {
        Ok(p) => p,
        Err(e) => {
            // Recorded as a refused call of the operation the path names, if any.
            let refused = Refused::bad(e.0);
            if let ["transit", path @ ..] = segments.as_slice()
                && let Some(op) = transit::operation(&method, path, list)
            {
                if let Err(first) = call::record_refusal(
                    &front.service,
                    peer,
                    op,
                    transit::key_of(path),
                    size,
                    &refused,
                )
                .await
                {
                    return Err((first, op.name()));
                }
                // Recorded as its call; counted as a refusal of the front.
                front.probes.refused_by_front(peer);
                let refused = Refused {
                    recorded: true,
                    ..refused
                };
                return Err((refused, op.name()));
            }
            if let ["secret", path @ ..] = segments.as_slice()
                && let Ok((kv, path)) = kv::route(&method, path, list)
            {
                let r = secret_refusal(front, peer, kv.on(&path), size, refused).await;
                return Err((r, kv.op().name()));
            }
            // The body is not JSON: the record names what the path names.
            if let Some(on) = database::on_of(&method, &segments, list) {
                let r = database::refusal(front, peer, &on, size, refused).await;
                return Err((r, on.op.name()));
            }
            return Err((refused, "unknown"));
        }
    };
    drop(body);
    match segments.as_slice() {
        ["auth", "cert", "login"] if is_write(&method) => {
            let r = login(front, peer, size).await;
            r.map(|a| (a, "CertLogin")).map_err(|e| (e, "CertLogin"))
        }
        ["auth", "token", "lookup-self"] if method == Method::GET || is_write(&method) => {
            let r = lookup_self(front, peer, &parts.headers, size).await;
            r.map(|a| (a, "LookupSelf")).map_err(|e| (e, "LookupSelf"))
        }
        ["transit", path @ ..] => {
            let op = transit::operation_of(&method, path, list, &params);
            let request = transit::Request {
                front,
                peer,
                size,
                params,
            };
            let answer = transit::serve(request, &method, path, list).await;
            let name = op.map_or("unknown", Op::name);
            match answer {
                Ok(a) => Ok((a, name)),
                Err(r) => {
                    // A request refused before its call (its parameters) is recorded here,
                    // as a call of its operation: the access rule first, as for any call.
                    if !r.recorded
                        && let Some(op) = op
                        && let Err(first) = call::record_refusal(
                            &front.service,
                            peer,
                            op,
                            transit::key_of(path),
                            size,
                            &r,
                        )
                        .await
                    {
                        return Err((first, name));
                    }
                    if !r.recorded && op.is_some() {
                        // Recorded as its call; counted as a refusal of the front.
                        front.probes.refused_by_front(peer);
                        return Err((
                            Refused {
                                recorded: true,
                                ..r
                            },
                            name,
                        ));
                    }
                    Err((r, name))
                }
            }
        }
        ["database", ..] | ["sys", "leases", ..] => {
            let request = database::Request {
                front,
                peer,
                size,
                params,
            };
            database::dispatch(request, &method, &segments, list).await
        }
        ["identity", "oidc", "token", name] => {
            let r = identity::token(front, peer, &method, name, parts.uri.query(), size).await;
            r.map(|a| (a, "IssueJwt")).map_err(|e| (e, "IssueJwt"))
        }
        ["secret", path @ ..] => {
            let (kv, path) = match kv::route(&method, path, list) {
                Ok(routed) => routed,
                Err(r) => return Err((r, "unknown")),
            };
            let name = kv.op().name();
            let on = kv.on(&path);
            let request = kv::Request {
                front,
                peer,
                size,
                params,
                query: parts.uri.query(),
                headers: &parts.headers,
            };
            match kv::serve(request, kv, path).await {
                Ok(a) => Ok((a, name)),
                Err(r) => Err((secret_refusal(front, peer, on, size, r).await, name)),
            }
        }
        _ => Err((not_found(), "unknown")),
    }
}

/// A request on a secret refused before its call (its parameters): recorded as a call of
/// its operation on its path, the access rule and the grant first (a caller without the
/// grant gets 403 whatever its parameters), and counted as a refusal of the front.
async fn secret_refusal(
    front: &Front,
    peer: &PeerInfo,
    on: call::OnSecret,
    size: usize,
    refused: Refused,
) -> Refused {
    if refused.recorded {
        return refused;
    }
    if let Err(first) = call::record_secret_refusal(&front.service, peer, on, size).await {
        return first;
    }
    front.probes.refused_by_front(peer);
    Refused {
        recorded: true,
        ..refused
    }
}

/// The answer to a caller over a limit of the gate: counted (and, for a certificate
/// holder, the first of its window recorded, as on gRPC); a caller without a certificate
/// over its limit of calls waits gRPC's delay first.
async fn limited_refusal(
    front: &Front,
    peer: &PeerInfo,
    path_bytes: usize,
    limited: FrontRefusal,
) -> Refused {
    let (wait, first) = match limited {
        FrontRefusal::HolderLimited { wait, first } => (wait, first),
        FrontRefusal::Limited(wait) | FrontRefusal::AnonymousLimited(wait) => (wait, false),
        FrontRefusal::Unauthenticated => (std::time::Duration::ZERO, false),
    };
    tokio::time::sleep(limited.delay()).await;
    if first && !front.probes.limited_at_front(peer, path_bytes).await {
        return call::audit_unavailable();
    }
    Refused {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "too many refused calls, or calls without a client certificate, from this address: try again in {} s",
            wait.as_secs().max(1)
        ),
        reason: "TOO_MANY_REFUSED_CALLS",
        // Counted by the gate (and the first of a window recorded).
        recorded: true,
    }
}

fn is_write(m: &Method) -> bool {
    *m == Method::POST || *m == Method::PUT
}

fn not_found() -> Refused {
    Refused {
        status: StatusCode::NOT_FOUND,
        message: "unsupported path".to_owned(),
        reason: "UNSUPPORTED_PATH",
        recorded: false,
    }
}

fn method_not_allowed() -> Refused {
    Refused {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "unsupported operation".to_owned(),
        reason: "UNSUPPORTED_OPERATION",
        recorded: false,
    }
}

/// The body, at most [`MAX_BODY`] bytes, kept zeroized.
async fn read_body(body: Body, headers: &HeaderMap) -> Result<Zeroizing<Vec<u8>>, Refused> {
    let too_large = || Refused {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the request body is larger than {MAX_BODY} bytes"),
        reason: "TOO_LARGE",
        recorded: false,
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY)
    {
        return Err(too_large());
    }
    let bytes =
        match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
            Ok(read) => read.map_err(|_| too_large())?,
            Err(_) => {
                return Err(Refused {
                    status: StatusCode::REQUEST_TIMEOUT,
                    message: format!(
                        "the request body was not sent within {} s",
                        BODY_READ_TIMEOUT.as_secs()
                    ),
                    reason: "REQUEST_TIMEOUT",
                    recorded: false,
                });
            }
        };
    Ok(Zeroizing::new(bytes.to_vec()))
}

/// `sys/health`'s status and the outcome counted: Vault's status codes (200 unsealed, 503
/// sealed, 501 not initialised, each replaceable by `activecode`, `sealedcode`,
/// `uninitcode`, 200 to 599: anything else is a 400, as Vault refuses it); the outcome is
/// the server's state's (`OK` unsealed, `UNAVAILABLE` otherwise), whatever code was asked.
fn health_status(
    initialized: bool,
    sealed: bool,
    query: Option<&str>,
) -> Result<(StatusCode, &'static str), Refused> {
    let (name, default, outcome) = if !initialized {
        ("uninitcode", StatusCode::NOT_IMPLEMENTED, "UNAVAILABLE")
    } else if sealed {
        ("sealedcode", StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
    } else {
        ("activecode", StatusCode::OK, "OK")
    };
    // Every code given is checked, whichever state applies now, so that a probe's
    // configuration is refused the day it is written, not the day the state changes.
    let mut status = default;
    for (k, v) in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.split_once('='))
    {
        let Some(known) = ["activecode", "sealedcode", "uninitcode"]
            .into_iter()
            .find(|n| *n == k)
        else {
            continue;
        };
        let code = v
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| Refused::bad(format!("{known}: a status code from 200 to 599")))?;
        if known == name {
            status = code;
        }
    }
    Ok((status, outcome))
}

/// `sys/health`: [`health_status`] and Vault's JSON.
fn sys_health(front: &Front, query: Option<&str>) -> Result<Answer, Refused> {
    let s = front.service.seal.status();
    let (status, outcome) = health_status(s.initialized, s.sealed, query)?;
    let body = json!({
        "initialized": s.initialized,
        "sealed": s.sealed,
        "standby": false,
        "performance_standby": false,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": crate::keyring::now(),
        "version": version(),
        "enterprise": false,
        "cluster_name": "",
        "cluster_id": "",
    });
    Ok(Answer::Health {
        status,
        body: serde_json::to_vec(&body).unwrap_or_default(),
        outcome,
    })
}

/// `sys/seal-status`: always 200, Vault's JSON (`t`, `n`, `progress`, the attempt's nonce).
fn sys_seal_status(front: &Front) -> Answer {
    let s = front.service.seal.status();
    let body = json!({
        "type": "shamir",
        "initialized": s.initialized,
        "sealed": s.sealed,
        "t": s.threshold,
        "n": s.shares,
        "progress": s.progress,
        "nonce": s.nonce.unwrap_or_default(),
        "version": version(),
        "build_date": "",
        "migration": false,
        "recovery_seal": false,
        "storage_type": "kms",
    });
    Answer::Raw(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn version() -> String {
    format!("kms-{}", env!("CARGO_PKG_VERSION"))
}

/// `auth/cert/login`: a session token for the caller's certificate (its principal and its
/// SHA-256), a call of `CertLogin`.
async fn login(front: &Front, peer: &PeerInfo, size: usize) -> Result<Answer, Refused> {
    let tokens = Arc::clone(&front.tokens);
    let principal = call::principal(peer).to_owned();
    let certificate = peer.certificate;
    let (reply, request_id) = call::unkeyed(&front.service, peer, size, Op::CertLogin, move || {
        let cert = certificate.ok_or_else(|| Refused::denied("permission denied"))?;
        let (token, session) = tokens.issue(&principal, cert).map_err(|e| Refused {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: e.to_string(),
            reason: "TOO_MANY_SESSIONS",
            recorded: false,
        })?;
        Ok(Reply::ok(&json!({
            "client_token": token.expose(),
            "accessor": session.accessor,
            "policies": ["default"],
            "token_policies": ["default"],
            "identity_policies": null,
            "metadata": { "principal": session.principal },
            "lease_duration": tokens.ttl().as_secs(),
            "renewable": false,
            "entity_id": "",
            "token_type": "service",
            "orphan": true,
            "mfa_requirement": null,
            "num_uses": 0,
        })))
    })
    .await;
    Ok(Answer::Auth {
        reply: reply?,
        request_id,
    })
}

/// `auth/token/lookup-self`: the session of the token given (with the certificate that
/// obtained it), a call of `LookupSelf`.
async fn lookup_self(
    front: &Front,
    peer: &PeerInfo,
    headers: &HeaderMap,
    size: usize,
) -> Result<Answer, Refused> {
    let token = headers.get(TOKEN_HEADER).and_then(|t| t.to_str().ok());
    let session = token.and_then(|t| {
        front
            .tokens
            .check(t, call::principal(peer), peer.certificate.as_ref())
            .map(|s| (Zeroizing::new(t.to_owned()), s))
    });
    let ttl = front.tokens.ttl().as_secs();
    let (reply, request_id) =
        call::unkeyed(&front.service, peer, size, Op::LookupSelf, move || {
            let (token, s) = session
                .ok_or_else(|| Refused::denied("permission denied: missing client token"))?;
            Ok(Reply::ok(&json!({
                "id": token.as_str(),
                "accessor": s.accessor,
                "policies": ["default"],
                "display_name": format!("cert-{}", s.principal),
                "meta": { "principal": s.principal },
                "path": "auth/cert/login",
                "creation_time": s.issued_at,
                "creation_ttl": ttl,
                "issue_time": s.issued_at,
                "ttl": s.ttl_left(),
                "explicit_max_ttl": 0,
                "expire_time": null,
                "num_uses": 0,
                "orphan": true,
                "renewable": false,
                "entity_id": "",
                "type": "service",
            })))
        })
        .await;
    Ok(Answer::Data {
        reply: reply?,
        request_id,
        mount_type: "token",
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The status a caller asks for is answered; the outcome counted is the server's state
    /// (a caller cannot put `UNAVAILABLE` into the health counts of a server that is up);
    /// a code outside 200..=599 is a 400, as Vault's.
    #[test]
    fn health_counts_the_state_not_the_code_asked() {
        let h = |init, sealed, q| health_status(init, sealed, q).map(|(s, o)| (s.as_u16(), o));
        assert_eq!(h(true, false, None).unwrap(), (200, "OK"));
        assert_eq!(h(true, false, Some("activecode=503")).unwrap(), (503, "OK"));
        assert_eq!(h(true, true, None).unwrap(), (503, "UNAVAILABLE"));
        assert_eq!(
            h(true, true, Some("sealedcode=200")).unwrap(),
            (200, "UNAVAILABLE")
        );
        assert_eq!(
            h(false, true, Some("uninitcode=204")).unwrap(),
            (204, "UNAVAILABLE")
        );
        assert_eq!(h(false, true, None).unwrap(), (501, "UNAVAILABLE"));
        for bad in [
            "activecode=100",
            "activecode=600",
            "activecode=x",
            "activecode=199",
        ] {
            let r = h(true, false, Some(bad)).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        // A code for another state is checked all the same (a probe's configuration is
        // refused when written, not when the state changes), and not used.
        assert_eq!(
            h(true, false, Some("sealedcode=100")).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(h(true, false, Some("sealedcode=204")).unwrap(), (200, "OK"));
    }
}
