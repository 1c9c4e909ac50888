//! TLS on the listener: rustls (ring provider, TLS 1.3 only) with client-certificate
//! authentication, reloaded without a restart, and the caller's [`Identity`] fixed at the
//! handshake.
//!
//! The accept loop ([`incoming`]) does the handshakes itself rather than through tonic's
//! `ServerTlsConfig`, for two reasons: each handshake uses the configuration current at
//! that moment (so a reloaded certificate or CA bundle applies to the next connection), and
//! the principal is read from the certificate once per connection and handed to every
//! request on it ([`PeerInfo`], tonic's connect info). A handshake that fails (untrusted
//! CA, expired or not yet valid, a certificate not for client authentication, a
//! certificate with no usable name) never reaches the services; it is logged with the peer
//! address and the reason.
//!
//! Certificates without a client certificate are accepted at the handshake (custodians
//! unseal with a share, anyone may ask for status); [`super::check`] refuses them
//! everything else.
//!
//! The accept loop bounds what connections hold ([`ConnectionCaps`], docs/access.md):
//! handshakes in progress (in all, per address, in time); established connections in all
//! and per source address ([`super::limiter::Source`]: IPv6 by /64), counted from `accept`
//! to close; and, far lower, connections without a client certificate, which are also
//! closed once they have had no call in flight for `anonymous_idle_timeout`
//! ([`Activity`]). A connection over a bound is closed at once, counted in
//! `kms_limit_reached_total`, and said in the log at most once per limit every
//! [`LIMIT_LOG_EVERY`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

use super::Identity;
use super::limiter::{ConnectionCaps, LimitKind, Limits, Source, Throttle};

/// The `[tls]` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA bundle client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("tls.{what}: cannot read {path}: {source}")]
    Pem {
        /// `cert`, `key` or `client_ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parse or I/O error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The private key can be read (or written) by others, written by its group, or read
    /// through a group that is not the server's: whoever reads it can pose as the server to
    /// every client, whoever writes it can swap the server's identity.
    #[error(
        "tls.key: {path} is open to others than the server (mode {mode:03o}): no bit for others, no write for its group, and read by its group only if that is the server's group: `chmod 640` (owner root, group the server's) or `chmod 600`"
    )]
    KeyTooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A PEM file holds no certificate.
    #[error("tls.{what}: {path} holds no certificate")]
    Empty {
        /// `cert` or `client_ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file holds something that is not a usable certificate.
    #[error("tls.{what}: {path}: {reason}")]
    Certificate {
        /// `cert` or `client_ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("tls: {0}")]
    Rustls(String),
}

mod files;

use files::{certificates, private_key};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a server configuration from the files.
pub(crate) fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates("cert", &files.cert)?;
    if let Some(leaf) = chain.first() {
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Certificate {
                what: "cert",
                path: files.cert.clone(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if !cert.validity().is_valid() {
            return Err(TlsError::Certificate {
                what: "cert",
                path: files.cert.clone(),
                reason: format!(
                    "the server certificate is not valid now (valid {} to {})",
                    cert.validity().not_before,
                    cert.validity().not_after
                ),
            });
        }
    }
    let key = private_key(&files.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates("client_ca", &files.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Certificate {
            what: "client_ca",
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Certificate {
                what: "client_ca",
                path: files.client_ca.clone(),
                reason: e.to_string(),
            })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed TLS 1.3 session skips client certificate
    // verification and keeps the identity of its first handshake, so a client whose CA was
    // removed from the bundle (or whose name rules changed) could go on connecting with a
    // cached session. Every connection does a full handshake against the current bundle.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// What identifies a file's content without reading it: a changed stamp means reload.
type Stamp = Vec<Option<(std::time::SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.client_ca]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

/// The server's TLS configuration, swapped whole on reload.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamp: Mutex<Stamp>,
}

impl ServerTls {
    /// Loads the files.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(config),
            stamp: Mutex::new(stamp),
        })
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The current configuration for a listener of `protocol` (only ALPN differs).
    fn current_for(&self, protocol: Protocol) -> Arc<rustls::ServerConfig> {
        let config = self.current();
        match protocol {
            Protocol::Grpc => config,
            Protocol::Http1 => {
                let mut config = (*config).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(config)
            }
        }
    }

    /// Reloads the files if `force` or if any of them changed. A configuration that does
    /// not load is logged and the old one kept: a half-written file never takes the
    /// listener down. Returns whether a new configuration took effect.
    pub fn reload(&self, force: bool) -> bool {
        let now = stamp(&self.files);
        {
            let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if !force && *last == now {
                return false;
            }
            *last = now;
        }
        match server_config(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                tracing::info!(
                    cert = %self.files.cert.display(),
                    client_ca = %self.files.client_ca.display(),
                    "TLS certificate and client CA bundle reloaded"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "TLS reload failed: still serving the previous certificate and CA bundle");
                false
            }
        }
    }

    /// Reloads on SIGHUP, and whenever a file changes (checked every `poll`). Runs until
    /// aborted.
    pub(crate) async fn watch(self: Arc<Self>, poll: Duration) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            if forced {
                tracing::info!("SIGHUP: reloading the TLS files");
            }
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || me.reload(forced)).await;
        }
    }
}

/// Why a verified certificate still names no principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    /// Not parseable (rustls accepted it, so this is unexpected).
    #[error("the certificate does not parse")]
    Unparseable,
    /// More than one URI SAN (a SPIFFE SVID has exactly one).
    #[error("the certificate has more than one URI SAN")]
    ManyUris,
    /// A URI SAN that is not a SPIFFE ID.
    #[error("the certificate's URI SAN is not a SPIFFE ID (spiffe://trust-domain/path)")]
    NotSpiffe,
    /// No URI SAN and no (single, usable) subject CN.
    #[error("the certificate has neither a URI SAN nor a single subject CN")]
    NoName,
    /// A subject CN that is empty, too long, or holds control or invisible characters.
    #[error("the certificate's subject CN is empty, longer than 256 bytes, or unprintable")]
    Reserved,
}

/// The principal a client certificate names, and the end of its validity: the URI SAN
/// (exactly one, `spiffe://`), else the subject CN (exactly one).
pub(crate) fn principal_of(der: &[u8]) -> Result<(String, i64), NameError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| NameError::Unparseable)?;
    let not_after = cert.validity().not_after.timestamp();
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(NameError::Unparseable),
    };
    let name = match uris.as_slice() {
        [uri] if is_spiffe_id(uri) => (*uri).to_owned(),
        [_] => return Err(NameError::NotSpiffe),
        [] => {
            let mut cns = cert.subject().iter_common_name();
            let cn = match (cns.next(), cns.next()) {
                (Some(cn), None) => cn.as_str().map_err(|_| NameError::NoName)?,
                _ => return Err(NameError::NoName),
            };
            // Its own namespace: a CN can never pass for a SPIFFE ID (nor for `anonymous`
            // or `loopback`), whatever the CA wrote into it.
            if cn.is_empty()
                || cn.len() > MAX_CN_LEN
                || cn
                    .chars()
                    .any(|c| c.is_whitespace() && c != ' ' || crate::policy::is_invisible(c))
            {
                return Err(NameError::Reserved);
            }
            format!("{CN_PREFIX}{cn}")
        }
        _ => return Err(NameError::ManyUris),
    };
    Ok((name, not_after))
}

/// The prefix of principals named by a certificate's subject CN (no URI SAN):
/// `cn:payments`. SPIFFE IDs, `anonymous` and `loopback` never start with it.
pub(crate) const CN_PREFIX: &str = "cn:";

/// The longest subject CN taken as a name (X.520's upper bound is 64).
const MAX_CN_LEN: usize = 256;

/// Whether `uri` is a SPIFFE ID as the SPIFFE standard spells it: `spiffe://`, a trust
/// domain of `[a-z0-9.-_]`, and path segments of `[A-Za-z0-9.-_]`, no `.`/`..` segment, no
/// query, fragment, port or user info; at most 2048 bytes. Only printable ASCII gets in.
pub(crate) fn is_spiffe_id(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("spiffe://") else {
        return false;
    };
    if uri.len() > 2048 {
        return false;
    }
    let (domain, path) = rest
        .split_once('/')
        .map_or((rest, None), |(d, p)| (d, Some(p)));
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    let path_ok = path.is_none_or(|p| {
        p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        })
    });
    domain_ok && path_ok
}

/// What every request on a connection knows of it (tonic's connect info).
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Who it is.
    pub identity: Arc<Identity>,
    /// The client certificate's SHA-256 (binds the HTTPS front's session tokens to it).
    pub certificate: Option<[u8; 32]>,
    /// The calls in flight on the connection (the gate keeps it).
    pub activity: Arc<Activity>,
}

/// The calls in flight on one connection, and when the last one ended: what tells an idle
/// connection from a busy one (a connection without a certificate is closed when idle).
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last call.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// A call begins; it is in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> CallInFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallInFlight(Arc::clone(self))
    }

    /// When the connection became idle (no call in flight since), or `None` while a call
    /// is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.last_end_ms.load(Ordering::Acquire);
        Some(self.opened + Duration::from_millis(ms))
    }
}

/// One call in flight on a connection ([`Activity::begin`]).
#[derive(Debug)]
pub(crate) struct CallInFlight(Arc<Activity>);

impl Drop for CallInFlight {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One accepted connection: plaintext (loopback only) or TLS. Past its hard deadline
/// (the maximum age plus a grace for calls in flight, [`Limits`]) every read and write
/// fails, which closes it whatever the peer does; the same once a connection without a
/// certificate has been idle for `anonymous_idle_timeout`. It holds its place in the
/// connection count until dropped.
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    info: PeerInfo,
    deadline: Pin<Box<tokio::time::Sleep>>,
    idle: Option<IdleTimer>,
    _slot: ConnSlot,
}

/// The idle timeout of a connection without a certificate.
#[derive(Debug)]
struct IdleTimer {
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Conn {
    /// What every request on this connection knows of it.
    pub(crate) fn info(&self) -> &PeerInfo {
        &self.info
    }

    fn new(io: Io, info: PeerInfo, limits: &Limits, slot: ConnSlot) -> Self {
        let idle = slot.anonymous.then(|| IdleTimer {
            timeout: limits.anonymous_idle_timeout,
            timer: Box::pin(tokio::time::sleep(limits.anonymous_idle_timeout)),
        });
        Self {
            io,
            info,
            deadline: Box::pin(tokio::time::sleep(
                limits.max_connection_age + CONNECTION_AGE_GRACE,
            )),
            idle,
            _slot: slot,
        }
    }

    /// `Err` once the deadline has passed, or the connection has been idle too long (and
    /// the wakers registered until then).
    fn expired(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection is older than its maximum age and grace",
            ));
        }
        let Some(idle) = &mut self.idle else {
            return Ok(());
        };
        while idle.timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            match self.info.activity.idle_since() {
                Some(since) if since.elapsed() >= idle.timeout => {
                    crate::metrics::metrics().limit_reached(LimitKind::AnonymousIdle);
                    tracing::debug!(peer = %self.info.addr, "connection without a certificate closed: idle");
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "a connection without a client certificate was idle too long",
                    ));
                }
                Some(since) => {
                    let left = idle.timeout.saturating_sub(since.elapsed());
                    idle.timer.as_mut().reset(now + left);
                }
                None => idle.timer.as_mut().reset(now + idle.timeout),
            }
        }
        Ok(())
    }
}

/// How long calls in flight may go on after a connection reached its maximum age and was
/// asked to close (GOAWAY); then it is closed.
pub(crate) const CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Handshakes in progress, in all and per source. A connection over the per-source limit is
/// closed at once rather than queued: a peer holding idle connections can occupy only its
/// own share, and only for the handshake timeout. When every slot is taken, a newcomer
/// whose source would still hold fewer than the source holding the most takes the oldest
/// slot of that source, whose handshake is closed; otherwise it is closed at once. So a
/// few sources cannot hold every slot: to keep a newcomer out, every slot must be held by
/// a source holding no more than the newcomer's would, which takes `max_handshakes`
/// sources (IPv6 /64s) between them, not `max_handshakes / max_handshakes_per_address`.
/// (The oldest: an honest handshake takes milliseconds, so the oldest of a source holding
/// many is the likeliest to be idle.)
#[derive(Debug)]
struct Handshakes {
    limits: Limits,
    state: Mutex<HandshakeState>,
}

#[derive(Debug, Default)]
struct HandshakeState {
    total: usize,
    /// The next slot's id.
    next: u64,
    /// Each source's handshakes in progress, oldest first: the slot's id, and the sender
    /// whose drop closes its handshake.
    per: HashMap<Source, VecDeque<(u64, oneshot::Sender<()>)>>,
    /// (slots held, source) for every source in `per`: the source holding the most is last.
    by_count: BTreeSet<(usize, Source)>,
}

impl HandshakeState {
    /// Sets `source`'s entry in `by_count` from `old` slots to `new`.
    fn recount(&mut self, source: Source, old: usize, new: usize) {
        self.by_count.remove(&(old, source));
        if new > 0 {
            self.by_count.insert((new, source));
        }
    }

    /// Closes the oldest handshake of `source`.
    fn evict(&mut self, source: Source) {
        let Some(queue) = self.per.get_mut(&source) else {
            return;
        };
        let held = queue.len();
        // Dropping the sender closes the handshake (its task is waiting on the receiver).
        drop(queue.pop_front());
        if queue.is_empty() {
            self.per.remove(&source);
        }
        self.total = self.total.saturating_sub(1);
        self.recount(source, held, held.saturating_sub(1));
    }
}

/// One handshake in progress; counted until dropped (or closed to make room).
#[derive(Debug)]
struct HandshakeSlot {
    owner: Arc<Handshakes>,
    source: Source,
    id: u64,
}

impl Handshakes {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::new(HandshakeState::default()),
        }
    }

    /// A slot for a handshake from `ip`, and the receiver that resolves if the slot is taken
    /// back to make room for a newcomer; or the limit that closes the connection.
    fn begin(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(HandshakeSlot, oneshot::Receiver<()>), LimitKind> {
        let source = Source::of(ip);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = state.per.get(&source).map_or(0, VecDeque::len);
        if mine >= self.limits.max_handshakes_per_address {
            return Err(LimitKind::HandshakesPerAddress);
        }
        if state.total >= self.limits.max_handshakes {
            match state.by_count.last().copied() {
                Some((most, holder)) if most > mine + 1 => {
                    state.evict(holder);
                    // Counted as a connection the limit closed.
                    crate::metrics::metrics().limit_reached(LimitKind::Handshakes);
                }
                _ => return Err(LimitKind::Handshakes),
            }
        }
        let id = state.next;
        state.next += 1;
        let (close, closed) = oneshot::channel();
        state.per.entry(source).or_default().push_back((id, close));
        state.total += 1;
        state.recount(source, mine, mine + 1);
        Ok((
            HandshakeSlot {
                owner: Arc::clone(self),
                source,
                id,
            },
            closed,
        ))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut state = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = state.per.get_mut(&self.source) else {
            return;
        };
        let held = queue.len();
        // Not found: it was closed to make room, and is no longer counted.
        let Some(i) = queue.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        queue.remove(i);
        if queue.is_empty() {
            state.per.remove(&self.source);
        }
        state.total = state.total.saturating_sub(1);
        state.recount(self.source, held, held.saturating_sub(1));
    }
}

/// Takes one from `source`'s count, forgetting it at zero.
fn release(per: &mut HashMap<Source, usize>, source: Source) {
    if let Some(n) = per.get_mut(&source) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per.remove(&source);
        }
    }
}

/// How often at most each limit is said in the log while it closes connections.
pub(crate) const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Established connections (from `accept` to close, handshakes included), in all and per
/// source, and those without a client certificate.
#[derive(Debug)]
struct Connections {
    caps: ConnectionCaps,
    state: Mutex<Counts>,
    log: Throttle,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per: HashMap<Source, usize>,
    anonymous: usize,
    anonymous_per: HashMap<Source, usize>,
}

/// One open connection's place in [`Connections`]; given back on drop.
#[derive(Debug)]
struct ConnSlot {
    owner: Arc<Connections>,
    source: Source,
    anonymous: bool,
}

impl Connections {
    fn new(caps: ConnectionCaps) -> Self {
        Self {
            caps,
            state: Mutex::new(Counts::default()),
            log: Throttle::new(LIMIT_LOG_EVERY),
        }
    }

    /// A place for a connection just accepted from `ip`, if the bounds allow it.
    fn open(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, LimitKind> {
        let source = Source::of(ip);
        let mut c = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per.get(&source).copied().unwrap_or(0);
        if c.total >= self.caps.total {
            return Err(LimitKind::Connections);
        }
        if mine >= self.caps.per_address {
            return Err(LimitKind::ConnectionsPerAddress);
        }
        c.total += 1;
        c.per.insert(source, mine + 1);
        gauges(&c);
        Ok(ConnSlot {
            owner: Arc::clone(self),
            source,
            anonymous: false,
        })
    }

    /// Makes `slot` a connection without a certificate, if the bounds on those allow it.
    fn anonymous(&self, slot: &mut ConnSlot) -> Result<(), LimitKind> {
        let mut c = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.anonymous_per.get(&slot.source).copied().unwrap_or(0);
        if c.anonymous >= self.caps.anonymous {
            return Err(LimitKind::AnonymousConnections);
        }
        if mine >= self.caps.anonymous_per_address {
            return Err(LimitKind::AnonymousConnectionsPerAddress);
        }
        c.anonymous += 1;
        c.anonymous_per.insert(slot.source, mine + 1);
        slot.anonymous = true;
        gauges(&c);
        Ok(())
    }

    /// Counts and (at most every [`LIMIT_LOG_EVERY`] per limit) logs a connection from
    /// `addr` closed by `limit`.
    fn closed(&self, limit: LimitKind, addr: SocketAddr) {
        crate::metrics::metrics().limit_reached(limit);
        let bound = match limit {
            LimitKind::Connections => Some(self.caps.total),
            LimitKind::ConnectionsPerAddress => Some(self.caps.per_address),
            LimitKind::AnonymousConnections => Some(self.caps.anonymous),
            LimitKind::AnonymousConnectionsPerAddress => Some(self.caps.anonymous_per_address),
            LimitKind::Handshakes
            | LimitKind::HandshakesPerAddress
            | LimitKind::AnonymousIdle
            | LimitKind::AnonymousCalls
            | LimitKind::RefusedCalls => None,
        };
        if let Some(unsaid) = self.log.due(limit.key(), Instant::now()) {
            tracing::warn!(
                limit = limit.key(),
                bound,
                peer = %addr,
                closed_since_last_line = unsaid,
                "connection limit reached: connections over it are closed at once (docs/access.md)"
            );
        }
    }
}

/// The gauges of open connections.
fn gauges(c: &Counts) {
    let m = crate::metrics::metrics();
    m.connections
        .set(i64::try_from(c.total).unwrap_or(i64::MAX));
    m.anonymous_connections
        .set(i64::try_from(c.anonymous).unwrap_or(i64::MAX));
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        release(&mut c.per, self.source);
        if self.anonymous {
            c.anonymous = c.anonymous.saturating_sub(1);
            release(&mut c.anonymous_per, self.source);
        }
        gauges(&c);
    }
}

/// Runs one TLS handshake, within `timeout`, and names its caller: anonymous without a
/// client certificate. `None` (logged) when the handshake fails, times out, or the client
/// certificate names no principal kms accepts.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Option<(TlsStream<TcpStream>, Identity, Option<[u8; 32]>)> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(peer = %addr, reason = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::warn!(peer = %addr, "TLS handshake timed out");
            return None;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let identity = match leaf.map(|c| principal_of(c)) {
        None => Identity::anonymous(),
        Some(Ok((principal, not_after))) => Identity {
            principal,
            authenticated: true,
            tls: true,
            not_after: Some(not_after),
        },
        Some(Err(e)) => {
            tracing::warn!(peer = %addr, reason = %e, "client certificate refused");
            return None;
        }
    };
    let certificate = leaf.map(|c| Sha256::digest(c.as_ref()).into());
    Some((stream, identity, certificate))
}

/// The bounds on handshakes and connections that every listener of the server shares.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    handshakes: Arc<Handshakes>,
    connections: Arc<Connections>,
}

impl Admission {
    /// The bounds of `limits` and `caps`, none taken yet.
    pub(crate) fn new(limits: Limits, caps: ConnectionCaps) -> Self {
        Self {
            handshakes: Arc::new(Handshakes::new(limits)),
            connections: Arc::new(Connections::new(caps)),
        }
    }
}

/// What a listener speaks, which its TLS handshake announces (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// gRPC: HTTP/2 (`h2`).
    Grpc,
    /// The Vault-compatible HTTPS front: `http/1.1`, what Vault's clients speak.
    Http1,
}

/// Accepts connections on `listener` (TLS with `tls`, else plaintext) and yields each
/// once its handshake succeeded and its caller is known. Handshakes are bounded by
/// `limits` (in all, per address, and in time), established connections by `caps`.
/// Runs until the receiver is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: Limits,
    admission: Admission,
    protocol: Protocol,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let Admission {
        handshakes,
        connections,
    } = admission;
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: wait a little rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            // Closed at once (dropping the socket) when over a bound: a stranger's
            // connections cannot take the files the store, the HSM and everyone else need.
            let mut slot = match connections.open(addr.ip()) {
                Ok(slot) => slot,
                Err(limit) => {
                    connections.closed(limit, addr);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let Some(tls) = &tls else {
                let conn = Conn::new(
                    Io::Plain(tcp),
                    PeerInfo {
                        addr,
                        identity: Arc::new(Identity::loopback()),
                        certificate: None,
                        activity: Arc::new(Activity::new()),
                    },
                    &limits,
                    slot,
                );
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let (handshake_slot, taken_back) = match handshakes.begin(addr.ip()) {
                Ok(h) => h,
                Err(limit) => {
                    // The limits say why, not the log, which a flood would fill.
                    crate::metrics::metrics().limit_reached(limit);
                    tracing::debug!(peer = %addr, "connection closed: too many handshakes in progress");
                    continue;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current_for(protocol));
            let timeout = limits.handshake_timeout;
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                let shaken = tokio::select! {
                    shaken = handshake(acceptor, tcp, addr, timeout) => shaken,
                    _ = taken_back => {
                        tracing::debug!(peer = %addr, "handshake closed to make room for another source's");
                        return;
                    }
                };
                let Some((stream, identity, certificate)) = shaken else {
                    return;
                };
                drop(handshake_slot);
                if !identity.authenticated
                    && let Err(limit) = connections.anonymous(&mut slot)
                {
                    connections.closed(limit, addr);
                    return;
                }
                let conn = Conn::new(
                    Io::Tls(Box::new(stream)),
                    PeerInfo {
                        addr,
                        identity: Arc::new(identity),
                        certificate,
                        activity: Arc::new(Activity::new()),
                    },
                    &limits,
                    slot,
                );
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    /// The second review of issue 24: 16 sources holding 16 idle connections each held all
    /// 256 slots. Now, with every slot taken, a newcomer from a source holding fewer takes
    /// the oldest slot of the source holding the most; sources that hold as many as any
    /// other are refused, and no source passes its own limit.
    #[test]
    fn a_full_table_makes_room_for_a_source_holding_fewer() {
        let handshakes = Arc::new(Handshakes::new(Limits {
            max_handshakes: 4,
            max_handshakes_per_address: 3,
            ..Limits::default()
        }));
        let (a, b, c, d) = (ip(1), ip(2), ip(3), ip(4));
        let mut a_slots: Vec<_> = (0..3).map(|_| handshakes.begin(a).unwrap()).collect();
        assert_eq!(
            handshakes.begin(a).unwrap_err(),
            LimitKind::HandshakesPerAddress
        );
        let b_slot = handshakes.begin(b).unwrap();
        // Full. C holds none: it takes A's oldest, whose handshake is told to close.
        let c_slot = handshakes.begin(c).unwrap();
        assert!(a_slots[0].1.try_recv().is_err());
        assert!(
            a_slots[1]
                .1
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        // A would hold as many as it does now, B and C as many as A: refused.
        assert_eq!(handshakes.begin(a).unwrap_err(), LimitKind::Handshakes);
        assert_eq!(handshakes.begin(b).unwrap_err(), LimitKind::Handshakes);
        assert_eq!(handshakes.begin(c).unwrap_err(), LimitKind::Handshakes);
        // D holds none: A's next oldest goes.
        let d_slot = handshakes.begin(d).unwrap();
        assert!(a_slots[1].1.try_recv().is_err());
        // Each source holds one: nobody makes room for a fifth.
        assert_eq!(handshakes.begin(ip(5)).unwrap_err(), LimitKind::Handshakes);
        // A slot closed to make room is not given back twice.
        drop(a_slots.remove(0));
        drop(a_slots.remove(0));
        assert_eq!(handshakes.state.lock().unwrap().total, 4);
        drop((a_slots, b_slot, c_slot, d_slot));
        let state = handshakes.state.lock().unwrap();
        assert_eq!(state.total, 0);
        assert!(state.per.is_empty() && state.by_count.is_empty());
    }
}
