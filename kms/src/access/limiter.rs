//! Limits per caller: failed unseal shares, refused calls, and the connection limits of
//! `[limits]`.
//!
//! Unseal needs a custodian's certificate, and each address may still fail
//! `max_failures` times in any `window`; after that its unseal calls are refused with
//! `RESOURCE_EXHAUSTED` until its oldest failure leaves the window. Successful shares do not
//! count. A failure is reserved *before* the share is tried and released if the share was
//! good ([`FailureLimiter::begin`]): check and record are one step, so concurrent tries
//! cannot exceed the limit. Per address rather than global, so that one address's
//! failures cannot lock the custodians out.
//!
//! [`RefusedLimiter`] counts refused calls (no certificate, no role or grant, malformed) in
//! fixed one-minute windows, per key: the gate keeps one for the callers without a
//! certificate, per [`Source`], and one for certificate holders, per [`Holder`] (source and
//! principal), so that a stranger's refusals never count against a certificate holder at
//! its source (a NAT, an IPv6 /64), nor one holder's against another's. Past its limit a
//! key's calls are refused before their body is read, and only counted (docs/audit.md).
//! [`CallLimiter`] counts the calls of callers without a certificate (`Status`, `WhoAmI`,
//! health) per source address in the same way; a certificate holder's calls never count
//! there.
//!
//! Every per-address limit counts a [`Source`]: an IPv4 address, or the /64 an IPv6 address
//! is in (one host or subscriber is usually given a whole /64, so counting single IPv6
//! addresses would give it 2^64 shares). [`ConnectionCaps`] are the bounds on established
//! connections, from `[limits]` and the process's open-file limit; [`Throttle`] keeps the
//! log lines that say a limit was reached to a few per minute.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::section::{ConfigError, within};

/// What a per-address limit counts: an IPv4 address, or the /64 of an IPv6 address (an
/// IPv4-mapped IPv6 address, as a dual-stack listener sees IPv4 peers, is its IPv4
/// address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Source(IpAddr);

impl Source {
    /// The source `ip` counts as.
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => Self(IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            ))),
        }
    }
}

impl std::fmt::Display for Source {
    /// `192.0.2.7`, or `2001:db8:1:2::/64`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// The limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsealLimit {
    /// Failures allowed per window.
    pub max_failures: u32,
    /// How far back failures count (a sliding window).
    pub window: Duration,
}

impl Default for UnsealLimit {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// The failure history of every address.
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    limit: UnsealLimit,
    failures: Mutex<HashMap<Source, VecDeque<Instant>>>,
}

/// Most addresses remembered; beyond it the oldest histories are dropped.
const MAX_ADDRESSES: usize = 10_000;

/// Makes room for `addr` in a per-address map that is full: drops the entries whose time
/// has passed and, if it is still full (many addresses at once), the entry whose `last`
/// use is oldest. The map never holds more than [`MAX_ADDRESSES`] addresses.
fn make_room<K: Clone + Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    addr: &K,
    live: impl Fn(&V) -> bool,
    last: impl Fn(&V) -> Option<Instant>,
) {
    if map.len() < MAX_ADDRESSES || map.contains_key(addr) {
        return;
    }
    map.retain(|_, v| live(v));
    if map.len() >= MAX_ADDRESSES
        && let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| last(v))
            .map(|(a, _)| a.clone())
    {
        map.remove(&oldest);
    }
}

impl FailureLimiter {
    /// A limiter.
    pub(crate) fn new(limit: UnsealLimit) -> Self {
        Self {
            limit,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Reserves a failure for a share `addr` is about to try, in the same step as the
    /// check: `Err(wait)` if `addr` has used up its failures (how long until it may try
    /// again). The reservation stands unless [`FailureTicket::succeeded`] releases it.
    pub(crate) fn begin(&self, addr: IpAddr, now: Instant) -> Result<FailureTicket<'_>, Duration> {
        let addr = Source::of(addr);
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.limit.window;
        make_room(
            &mut map,
            &addr,
            |h| h.back().is_some_and(|t| now.duration_since(*t) < window),
            |h| h.back().copied(),
        );
        let history = map.entry(addr).or_default();
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.limit.window)
        {
            history.pop_front();
        }
        if history.len() >= self.limit.max_failures as usize {
            let oldest = history.front().copied().unwrap_or(now);
            return Err(self.limit.window.saturating_sub(now.duration_since(oldest)));
        }
        history.push_back(now);
        Ok(FailureTicket {
            limiter: self,
            addr,
            at: now,
        })
    }
}

/// A failure reserved by [`FailureLimiter::begin`]: it counts unless released.
#[derive(Debug)]
#[must_use = "a ticket counts as a failure unless `succeeded` is called"]
pub(crate) struct FailureTicket<'a> {
    limiter: &'a FailureLimiter,
    addr: Source,
    at: Instant,
}

impl FailureTicket<'_> {
    /// The share was good (or the failure was the server's own): it does not count.
    pub(crate) fn succeeded(self) {
        let mut map = self
            .limiter
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(history) = map.get_mut(&self.addr)
            && let Some(i) = history.iter().rposition(|t| *t == self.at)
        {
            history.remove(i);
        }
    }
}

/// The connection and request limits of `[limits]` (docs/configuration.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to finish a TLS handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one address.
    pub max_handshakes_per_address: usize,
    /// Age at which a connection is asked to close (GOAWAY).
    pub max_connection_age: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// The largest request body from a caller without a client certificate.
    pub anonymous_max_request_bytes: usize,
    /// Refused calls per address per minute.
    pub refused_calls_per_minute: u32,
    /// Connections open at once, handshakes included; `None`: from the open-file limit
    /// ([`Limits::connection_caps`]).
    pub max_connections: Option<usize>,
    /// Connections open at once from one source.
    pub max_connections_per_address: usize,
    /// Connections without a client certificate open at once.
    pub max_anonymous_connections: usize,
    /// Connections without a client certificate open at once from one source.
    pub max_anonymous_connections_per_address: usize,
    /// How long a connection without a client certificate may stay without a call in
    /// flight; and how long such a call may take to be answered.
    pub anonymous_idle_timeout: Duration,
    /// Calls without a client certificate (`Status`, `WhoAmI`, health) per source per
    /// minute.
    pub anonymous_calls_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 256,
            max_handshakes_per_address: 16,
            max_connection_age: Duration::from_secs(600),
            max_concurrent_streams: 128,
            anonymous_max_request_bytes: 64 * 1024,
            refused_calls_per_minute: 120,
            max_connections: None,
            max_connections_per_address: 256,
            max_anonymous_connections: 128,
            max_anonymous_connections_per_address: 8,
            anonymous_idle_timeout: Duration::from_secs(10),
            anonymous_calls_per_minute: 600,
        }
    }
}

/// A limit that closed a connection or refused a call: named by its `[limits]` key, which
/// is also its label in `kms_limit_reached_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LimitKind {
    /// `max_handshakes`.
    Handshakes,
    /// `max_handshakes_per_address`.
    HandshakesPerAddress,
    /// `max_connections`.
    Connections,
    /// `max_connections_per_address`.
    ConnectionsPerAddress,
    /// `max_anonymous_connections`.
    AnonymousConnections,
    /// `max_anonymous_connections_per_address`.
    AnonymousConnectionsPerAddress,
    /// `anonymous_idle_timeout_seconds`.
    AnonymousIdle,
    /// `anonymous_calls_per_minute`.
    AnonymousCalls,
    /// `refused_calls_per_minute`.
    RefusedCalls,
}

impl LimitKind {
    /// Every kind (the metric's label values, all present from the start).
    pub(crate) const ALL: [Self; 9] = [
        Self::Handshakes,
        Self::HandshakesPerAddress,
        Self::Connections,
        Self::ConnectionsPerAddress,
        Self::AnonymousConnections,
        Self::AnonymousConnectionsPerAddress,
        Self::AnonymousIdle,
        Self::AnonymousCalls,
        Self::RefusedCalls,
    ];

    /// Its `[limits]` key.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Handshakes => "max_handshakes",
            Self::HandshakesPerAddress => "max_handshakes_per_address",
            Self::Connections => "max_connections",
            Self::ConnectionsPerAddress => "max_connections_per_address",
            Self::AnonymousConnections => "max_anonymous_connections",
            Self::AnonymousConnectionsPerAddress => "max_anonymous_connections_per_address",
            Self::AnonymousIdle => "anonymous_idle_timeout_seconds",
            Self::AnonymousCalls => "anonymous_calls_per_minute",
            Self::RefusedCalls => "refused_calls_per_minute",
        }
    }
}

impl crate::metrics::LimitLabel for LimitKind {
    fn label(self) -> &'static str {
        self.key()
    }
}

/// Open files kept for everything but client connections: the store, the HSM module's
/// files, the database pool, the metrics listener and its scrapes, logs, archive segments.
pub(crate) const FILES_RESERVED: u64 = 128;

/// The most connections the open-file limit alone allows by default (each costs memory
/// too: TLS and HTTP/2 buffers); `[limits] max_connections` sets more.
const MAX_DERIVED_CONNECTIONS: u64 = 4096;

/// The fewest connections a derived bound allows.
const MIN_CONNECTIONS: u64 = 16;

/// The bounds on established connections the accept loop enforces (each at most the total).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionCaps {
    /// Connections open at once, handshakes included.
    pub total: usize,
    /// From one source.
    pub per_address: usize,
    /// Without a client certificate.
    pub anonymous: usize,
    /// Without a client certificate, from one source.
    pub anonymous_per_address: usize,
    /// Whether `[limits] max_connections` leaves less than [`FILES_RESERVED`] of the
    /// open-file limit for the rest (worth a warning at start-up).
    pub over_open_files: bool,
}

impl Limits {
    /// The connection bounds under an open-file limit of `open_files` (`None`: unlimited or
    /// unknown). Unless `max_connections` is set, the total is the limit less
    /// [`FILES_RESERVED`], at least 16 and at most 4096; the other bounds are at most the
    /// total.
    pub(crate) fn connection_caps(&self, open_files: Option<u64>) -> ConnectionCaps {
        let room = open_files.map(|n| n.saturating_sub(FILES_RESERVED));
        let total = match self.max_connections {
            Some(n) => n,
            None => usize::try_from(
                room.unwrap_or(MAX_DERIVED_CONNECTIONS)
                    .clamp(MIN_CONNECTIONS, MAX_DERIVED_CONNECTIONS),
            )
            .unwrap_or(usize::MAX),
        };
        let anonymous = self.max_anonymous_connections.min(total);
        ConnectionCaps {
            total,
            per_address: self.max_connections_per_address.min(total),
            anonymous,
            anonymous_per_address: self.max_anonymous_connections_per_address.min(anonymous),
            over_open_files: room.is_some_and(|r| total as u64 > r),
        }
    }
}

/// The soft open-file limit in the text of `/proc/self/limits` (`None`: unlimited, or not
/// found).
pub(crate) fn open_file_limit(proc_limits: &str) -> Option<u64> {
    proc_limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Calls per source in fixed one-minute windows: [`CallLimiter::allow`] says whether one
/// more may go on.
#[derive(Debug)]
pub(crate) struct CallLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<HashMap<Source, (Instant, u32)>>,
}

impl CallLimiter {
    /// A limiter of `per_window` calls per `window`.
    pub(crate) fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a call from `addr`: `Err(wait)` when its source has used up its window (how
    /// long until the window ends).
    pub(crate) fn allow(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let source = Source::of(addr);
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window;
        make_room(
            &mut map,
            &source,
            |(start, _)| now.duration_since(*start) < window,
            |(start, _)| Some(*start),
        );
        let (start, calls) = map.entry(source).or_insert((now, 0));
        if now.duration_since(*start) >= window {
            *start = now;
            *calls = 0;
        }
        if *calls >= self.per_window {
            return Err(window.saturating_sub(now.duration_since(*start)));
        }
        *calls += 1;
        Ok(())
    }
}

/// Log lines said at most once per interval for each kind, so that a flood cannot fill the
/// log: [`Throttle::due`] says when one is due, and how many were not said since.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Throttle {
    /// One line of each kind per `every`.
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// An event of `kind` (one of a fixed set): `Some(n)` when a line is due, `n` the
    /// events of that kind since the last line that were not said.
    pub(crate) fn due(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(kind) {
            Some((at, unsaid)) if now.duration_since(*at) < self.every => {
                *unsaid += 1;
                None
            }
            Some((at, unsaid)) => {
                let n = *unsaid;
                *at = now;
                *unsaid = 0;
                Some(n)
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

/// A certificate holder at a source: what the limit on refused calls counts for a caller
/// with a certificate (or on the plaintext loopback listener).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Holder {
    /// Where it calls from.
    pub source: Source,
    /// Its principal, from its certificate.
    pub principal: String,
}

/// Refused calls per key (a [`Source`] or a [`Holder`]), in fixed one-minute windows.
#[derive(Debug)]
pub(crate) struct RefusedLimiter<K> {
    per_window: u32,
    window: Duration,
    state: Mutex<HashMap<K, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    refused: u32,
    /// Calls refused by the limit itself in this window.
    limited: u64,
    /// Calls refused by the limit past each window's first, since the last
    /// [`RefusedLimiter::take_limited`].
    untaken: u64,
}

impl Window {
    fn live(&self, now: Instant, window: Duration) -> bool {
        now.duration_since(self.start) < window
    }
}

/// What [`RefusedLimiter::check`] says of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go on.
    Allowed,
    /// Refused by the limit for `wait`; `first` if it is the first such call in this window
    /// (the others are counted until [`RefusedLimiter::take_limited`]).
    Limited {
        /// How long until the window ends.
        wait: Duration,
        /// Whether this is the window's first limited call.
        first: bool,
    },
}

impl<K: Clone + Eq + Hash> RefusedLimiter<K> {
    /// A limiter of `per_window` refusals per `window`.
    pub(crate) fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a call of `key` may go on.
    pub(crate) fn check(&self, key: &K, now: Instant) -> Verdict {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = map.get_mut(key) else {
            return Verdict::Allowed;
        };
        if !w.live(now, self.window) || w.refused < self.per_window {
            return Verdict::Allowed;
        }
        w.limited += 1;
        let first = w.limited == 1;
        if !first {
            w.untaken = w.untaken.saturating_add(1);
        }
        Verdict::Limited {
            wait: self.window.saturating_sub(now.duration_since(w.start)),
            first,
        }
    }

    /// Counts a refused call of `key`.
    pub(crate) fn refused(&self, key: &K, now: Instant) {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window;
        make_room(
            &mut map,
            key,
            |w| w.live(now, window) || w.untaken > 0,
            |w| Some(w.start),
        );
        let w = map.entry(key.clone()).or_insert(Window {
            start: now,
            refused: 0,
            limited: 0,
            untaken: 0,
        });
        if !w.live(now, window) {
            // A new window; what the limit refused in the last one is kept until taken.
            *w = Window {
                start: now,
                refused: 0,
                limited: 0,
                untaken: w.untaken,
            };
        }
        w.refused = w.refused.saturating_add(1);
    }

    /// The calls the limit refused past each window's first since the last call, per key
    /// (none: not listed); forgets the windows that ended.
    pub(crate) fn take_limited(&self, now: Instant) -> Vec<(K, u64)> {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = Vec::new();
        for (key, w) in map.iter_mut() {
            if w.untaken > 0 {
                taken.push((key.clone(), std::mem::take(&mut w.untaken)));
            }
        }
        let window = self.window;
        map.retain(|_, w| w.live(now, window));
        taken
    }
}

/// `[limits]`: what any one caller can make the server hold, read or record.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsConfig {
    /// Seconds a client has to finish its TLS handshake (default 5).
    pub handshake_timeout_seconds: Option<u64>,
    /// Handshakes in progress at once, from all addresses (default 256).
    pub max_handshakes: Option<usize>,
    /// Handshakes in progress at once from one address (default 16).
    pub max_handshakes_per_address: Option<usize>,
    /// Seconds after which a connection is asked to close (HTTP/2 GOAWAY; default 600): a
    /// removed CA or an expired certificate loses its open connections within this time.
    pub max_connection_age_seconds: Option<u64>,
    /// Concurrent calls (HTTP/2 streams) per connection (default 128).
    pub max_concurrent_streams: Option<u32>,
    /// The largest request from a caller without a client certificate, in bytes (default
    /// 65536).
    pub anonymous_max_request_bytes: Option<usize>,
    /// Refused calls (UNAUTHENTICATED, PERMISSION_DENIED, malformed) allowed per source
    /// address per minute before its calls are refused unread (default 120).
    pub refused_calls_per_minute: Option<u32>,
    /// Client connections open at once, handshakes included (default: the open-file limit
    /// less 128, at most 4096).
    pub max_connections: Option<usize>,
    /// Client connections open at once from one source address (default 256).
    pub max_connections_per_address: Option<usize>,
    /// Connections without a client certificate open at once (default 128).
    pub max_anonymous_connections: Option<usize>,
    /// Connections without a client certificate open at once from one source address
    /// (default 8).
    pub max_anonymous_connections_per_address: Option<usize>,
    /// Seconds a connection without a client certificate may go without a call in flight
    /// before it is closed, and a call of one may take to be answered (default 10).
    pub anonymous_idle_timeout_seconds: Option<u64>,
    /// Calls without a client certificate (Status, WhoAmI, health) per source address per
    /// minute (default 600).
    pub anonymous_calls_per_minute: Option<u32>,
}

/// `[unseal]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnsealConfig {
    /// Failed shares allowed per source address per window (default 5).
    pub max_failed_shares: Option<u32>,
    /// The window, in seconds (default 60).
    pub failure_window_seconds: Option<u64>,
}

impl LimitsConfig {
    pub(crate) fn validate(&self) -> Result<crate::access::limiter::Limits, ConfigError> {
        let d = crate::access::limiter::Limits::default();
        let bad = ConfigError::BadLimit;
        Ok(crate::access::limiter::Limits {
            handshake_timeout: Duration::from_secs(within(
                self.handshake_timeout_seconds,
                d.handshake_timeout.as_secs(),
                1..=60,
                bad("handshake_timeout_seconds (1..=60)"),
            )?),
            max_handshakes: within(
                self.max_handshakes,
                d.max_handshakes,
                1..=100_000,
                bad("max_handshakes (1..=100000)"),
            )?,
            max_handshakes_per_address: within(
                self.max_handshakes_per_address,
                d.max_handshakes_per_address,
                1..=100_000,
                bad("max_handshakes_per_address (1..=100000)"),
            )?,
            max_connection_age: Duration::from_secs(within(
                self.max_connection_age_seconds,
                d.max_connection_age.as_secs(),
                1..=30 * 86_400,
                bad("max_connection_age_seconds (1..=2592000)"),
            )?),
            max_concurrent_streams: within(
                self.max_concurrent_streams,
                d.max_concurrent_streams,
                1..=10_000,
                bad("max_concurrent_streams (1..=10000)"),
            )?,
            anonymous_max_request_bytes: within(
                self.anonymous_max_request_bytes,
                d.anonymous_max_request_bytes,
                1024..=16 * 1024 * 1024,
                bad("anonymous_max_request_bytes (1024..=16777216)"),
            )?,
            refused_calls_per_minute: within(
                self.refused_calls_per_minute,
                d.refused_calls_per_minute,
                1..=1_000_000,
                bad("refused_calls_per_minute (1..=1000000)"),
            )?,
            max_connections: self
                .max_connections
                .map(|n| {
                    within(
                        Some(n),
                        n,
                        16..=1_000_000,
                        bad("max_connections (16..=1000000)"),
                    )
                })
                .transpose()?,
            max_connections_per_address: within(
                self.max_connections_per_address,
                d.max_connections_per_address,
                1..=1_000_000,
                bad("max_connections_per_address (1..=1000000)"),
            )?,
            max_anonymous_connections: within(
                self.max_anonymous_connections,
                d.max_anonymous_connections,
                1..=1_000_000,
                bad("max_anonymous_connections (1..=1000000)"),
            )?,
            max_anonymous_connections_per_address: within(
                self.max_anonymous_connections_per_address,
                d.max_anonymous_connections_per_address,
                1..=1_000_000,
                bad("max_anonymous_connections_per_address (1..=1000000)"),
            )?,
            anonymous_idle_timeout: Duration::from_secs(within(
                self.anonymous_idle_timeout_seconds,
                d.anonymous_idle_timeout.as_secs(),
                1..=3600,
                bad("anonymous_idle_timeout_seconds (1..=3600)"),
            )?),
            anonymous_calls_per_minute: within(
                self.anonymous_calls_per_minute,
                d.anonymous_calls_per_minute,
                1..=1_000_000,
                bad("anonymous_calls_per_minute (1..=1000000)"),
            )?,
        })
    }
}

impl UnsealConfig {
    pub(crate) fn validate(&self) -> Result<crate::access::limiter::UnsealLimit, ConfigError> {
        let d = crate::access::limiter::UnsealLimit::default();
        Ok(crate::access::limiter::UnsealLimit {
            max_failures: within(
                self.max_failed_shares,
                d.max_failures,
                1..=1000,
                ConfigError::BadUnseal("max_failed_shares (1..=1000)"),
            )?,
            window: Duration::from_secs(within(
                self.failure_window_seconds,
                d.window.as_secs(),
                1..=86_400,
                ConfigError::BadUnseal("failure_window_seconds (1..=86400)"),
            )?),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn limits_failures_per_address_and_window() {
        let l = FailureLimiter::new(UnsealLimit {
            max_failures: 3,
            window: Duration::from_secs(60),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            // Failures: the tickets are kept.
            let _ticket = l.begin(a, t0 + Duration::from_secs(i)).unwrap();
        }
        let wait = l.begin(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        // Another address is not affected.
        l.begin(b, t0).unwrap().succeeded();
        // Once the oldest failure leaves the window, one more try is allowed.
        assert!(l.begin(a, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn check_and_record_are_one_step_and_successes_do_not_count() {
        let l = FailureLimiter::new(UnsealLimit {
            max_failures: 2,
            window: Duration::from_secs(60),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        // Good shares, any number of them.
        for _ in 0..10 {
            l.begin(a, t0).unwrap().succeeded();
        }
        // Two tries in flight at once hold both reservations: a third cannot start
        // before either ends (with a separate check and record, all three passed).
        let first = l.begin(a, t0).unwrap();
        let second = l.begin(a, t0).unwrap();
        assert!(l.begin(a, t0).is_err());
        first.succeeded();
        let _third = l.begin(a, t0).unwrap();
        drop(second);
        assert!(l.begin(a, t0).is_err());
    }

    #[test]
    fn many_addresses_at_once_never_grow_the_maps_past_their_bound() {
        let t0 = Instant::now();
        let failures = FailureLimiter::new(UnsealLimit::default());
        let refused = RefusedLimiter::new(3, Duration::from_secs(60));
        // All within the window: nothing is stale, so the oldest gives way. (One address
        // in each of as many /64s.)
        let addr_of = |i: u32| IpAddr::from(Ipv6Addr::from(u128::from(i) << 64 | 1));
        for i in 0..(MAX_ADDRESSES as u32 + 50) {
            let addr = addr_of(i);
            let _ticket = failures.begin(addr, t0 + Duration::from_millis(u64::from(i)));
            refused.refused(&Source::of(addr), t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(failures.failures.lock().unwrap().len(), MAX_ADDRESSES);
        assert_eq!(refused.state.lock().unwrap().len(), MAX_ADDRESSES);
        // The newest is kept, the oldest went.
        let newest = addr_of(MAX_ADDRESSES as u32 + 49);
        assert!(
            refused
                .state
                .lock()
                .unwrap()
                .contains_key(&Source::of(newest))
        );
        assert!(
            !refused
                .state
                .lock()
                .unwrap()
                .contains_key(&Source::of(addr_of(0)))
        );
    }

    #[test]
    fn refused_calls_are_limited_per_key_in_windows_and_counted_until_taken() {
        let l = RefusedLimiter::new(3, Duration::from_secs(60));
        let a = Source::of("10.0.0.1".parse().unwrap());
        let b = Source::of("10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check(&a, t0), Verdict::Allowed);
            l.refused(&a, t0);
        }
        let at = t0 + Duration::from_secs(20);
        assert_eq!(
            l.check(&a, at),
            Verdict::Limited {
                wait: Duration::from_secs(40),
                first: true
            }
        );
        for _ in 0..4 {
            assert!(matches!(
                l.check(&a, at),
                Verdict::Limited { first: false, .. }
            ));
        }
        assert_eq!(l.check(&b, at), Verdict::Allowed);
        // The calls past the window's first are counted until taken, once.
        assert_eq!(l.take_limited(at), vec![(a, 4)]);
        assert_eq!(l.take_limited(at), vec![]);
        l.check(&a, at);
        // The next window starts afresh; what the last one refused is kept until taken,
        // and a window that ended is forgotten once taken.
        let next = t0 + Duration::from_secs(60);
        assert_eq!(l.check(&a, next), Verdict::Allowed);
        l.refused(&a, next);
        assert_eq!(l.check(&a, next), Verdict::Allowed);
        assert_eq!(l.take_limited(next), vec![(a, 1)]);
        assert_eq!(l.state.lock().unwrap().len(), 1);
        assert!(l.take_limited(next + Duration::from_secs(60)).is_empty());
        assert!(l.state.lock().unwrap().is_empty());
    }

    /// Issue 24's second review: a stranger's refusals at a source made a certificate
    /// holder's calls there fail. The gate keeps the callers without a certificate (per
    /// source) and the holders (per source and principal) in two limiters; within the
    /// holders', each principal has its own window.
    #[test]
    fn each_holder_at_a_source_is_limited_by_its_own_refusals_only() {
        let l = RefusedLimiter::new(2, Duration::from_secs(60));
        let source = Source::of("2001:db8:1:2::1".parse().unwrap());
        let holder = |p: &str| Holder {
            source,
            principal: p.to_owned(),
        };
        let (app, admin) = (holder("spiffe://corp/app"), holder("spiffe://corp/admin"));
        let t0 = Instant::now();
        l.refused(&app, t0);
        l.refused(&app, t0);
        assert!(matches!(
            l.check(&app, t0),
            Verdict::Limited { first: true, .. }
        ));
        assert!(matches!(
            l.check(&app, t0),
            Verdict::Limited { first: false, .. }
        ));
        assert_eq!(l.check(&admin, t0), Verdict::Allowed);
        assert_eq!(l.take_limited(t0), vec![(app, 1)]);
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::7".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::7".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(Source::of(mapped), Source::of(v4));
        assert_eq!(Source::of(mapped).to_string(), "192.0.2.7");
        assert_ne!(
            Source::of(mapped),
            Source::of("::ffff:192.0.2.8".parse().unwrap())
        );
        // One /64's addresses share one limit.
        let l = RefusedLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        l.refused(&Source::of(a), t0);
        l.refused(&Source::of(b), t0);
        assert!(matches!(
            l.check(&Source::of(a), t0),
            Verdict::Limited { .. }
        ));
        assert_eq!(l.check(&Source::of(c), t0), Verdict::Allowed);
    }

    #[test]
    fn calls_are_limited_per_source_in_windows() {
        let l = CallLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            l.allow(a, t0).unwrap();
        }
        assert_eq!(
            l.allow(a, t0 + Duration::from_secs(15)),
            Err(Duration::from_secs(45))
        );
        l.allow(b, t0).unwrap();
        l.allow(a, t0 + Duration::from_secs(60)).unwrap();
    }

    #[test]
    fn connection_caps_follow_the_open_file_limit_unless_set() {
        let d = Limits::default();
        let caps = d.connection_caps(Some(1024));
        assert_eq!(
            caps,
            ConnectionCaps {
                total: 896,
                per_address: 256,
                anonymous: 128,
                anonymous_per_address: 8,
                over_open_files: false,
            }
        );
        // A large limit: at most 4096 unless set; none known: the same.
        assert_eq!(d.connection_caps(Some(1 << 20)).total, 4096);
        assert_eq!(d.connection_caps(None).total, 4096);
        // A tiny one: still 16, and every other bound within the total.
        let tiny = d.connection_caps(Some(100));
        assert_eq!((tiny.total, tiny.per_address, tiny.anonymous), (16, 16, 16));
        assert!(tiny.anonymous_per_address <= tiny.anonymous);
        // Set: taken as set, and said to be over the limit when it is.
        let set = Limits {
            max_connections: Some(2000),
            ..d
        };
        assert_eq!(set.connection_caps(Some(1024)).total, 2000);
        assert!(set.connection_caps(Some(1024)).over_open_files);
        assert!(!set.connection_caps(Some(4096)).over_open_files);
    }

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(open_file_limit(text), Some(1024));
        assert_eq!(
            open_file_limit(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        assert_eq!(open_file_limit(""), None);
    }

    #[test]
    fn log_lines_are_throttled_per_kind() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.due("a", t0), Some(0));
        assert_eq!(t.due("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(t.due("a", t0 + Duration::from_secs(2)), None);
        assert_eq!(t.due("b", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(t.due("a", t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(t.due("a", t0 + Duration::from_secs(11)), None);
    }
}
