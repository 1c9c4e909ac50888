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
//! [`RefusedLimiter`] counts refused calls (no certificate, no role or grant, malformed) per
//! source address in fixed one-minute windows; past its limit an address's calls are
//! refused before their body is read, and only counted (docs/audit.md).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// Most addresses remembered; beyond it the oldest histories are dropped.
const MAX_ADDRESSES: usize = 10_000;

/// Makes room for `addr` in a per-address map that is full: drops the entries whose time
/// has passed and, if it is still full (many addresses at once), the entry whose `last`
/// use is oldest. The map never holds more than [`MAX_ADDRESSES`] addresses.
fn make_room<V>(
    map: &mut HashMap<IpAddr, V>,
    addr: IpAddr,
    live: impl Fn(&V) -> bool,
    last: impl Fn(&V) -> Option<Instant>,
) {
    if map.len() < MAX_ADDRESSES || map.contains_key(&addr) {
        return;
    }
    map.retain(|_, v| live(v));
    if map.len() >= MAX_ADDRESSES
        && let Some(oldest) = map.iter().min_by_key(|(_, v)| last(v)).map(|(a, _)| *a)
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
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.limit.window;
        make_room(
            &mut map,
            addr,
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
    addr: IpAddr,
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
        }
    }
}

/// Refused calls per source address, in fixed one-minute windows.
#[derive(Debug)]
pub(crate) struct RefusedLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    refused: u32,
    /// Calls refused by the limit itself in this window.
    limited: u64,
}

/// What [`RefusedLimiter::check`] says of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go on. `Some(n)`: the address's previous window ended with `n` calls refused by the
    /// limit that were only counted (record that count now).
    Allowed(Option<u64>),
    /// Refused by the limit for `wait`; `first` if it is the first such call in this window
    /// (record it), else only counted.
    Limited {
        /// How long until the window ends.
        wait: Duration,
        /// Whether this is the window's first limited call.
        first: bool,
    },
}

impl RefusedLimiter {
    /// A limiter of `per_window` refusals per `window`.
    pub(crate) fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a call from `addr` may go on.
    pub(crate) fn check(&self, addr: IpAddr, now: Instant) -> Verdict {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = map.get_mut(&addr) else {
            return Verdict::Allowed(None);
        };
        if now.duration_since(w.start) >= self.window {
            let counted = w.limited;
            map.remove(&addr);
            return Verdict::Allowed(Some(counted).filter(|n| *n > 1).map(|n| n - 1));
        }
        if w.refused < self.per_window {
            return Verdict::Allowed(None);
        }
        w.limited += 1;
        Verdict::Limited {
            wait: self.window.saturating_sub(now.duration_since(w.start)),
            first: w.limited == 1,
        }
    }

    /// Counts a refused call from `addr`.
    pub(crate) fn refused(&self, addr: IpAddr, now: Instant) {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window;
        make_room(
            &mut map,
            addr,
            |w| now.duration_since(w.start) < window,
            |w| Some(w.start),
        );
        let w = map.entry(addr).or_insert(Window {
            start: now,
            refused: 0,
            limited: 0,
        });
        w.refused = w.refused.saturating_add(1);
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
        // All within the window: nothing is stale, so the oldest gives way.
        for i in 0..(MAX_ADDRESSES as u32 + 50) {
            let addr = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i)));
            let _ticket = failures.begin(addr, t0 + Duration::from_millis(u64::from(i)));
            refused.refused(addr, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(failures.failures.lock().unwrap().len(), MAX_ADDRESSES);
        assert_eq!(refused.state.lock().unwrap().len(), MAX_ADDRESSES);
        // The newest is kept, the oldest went.
        let newest = IpAddr::from(std::net::Ipv6Addr::from(u128::from(
            MAX_ADDRESSES as u32 + 49,
        )));
        assert!(refused.state.lock().unwrap().contains_key(&newest));
        assert!(
            !refused
                .state
                .lock()
                .unwrap()
                .contains_key(&IpAddr::from(std::net::Ipv6Addr::from(0u128)))
        );
    }

    #[test]
    fn refused_calls_are_limited_per_address_in_windows() {
        let l = RefusedLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check(a, t0), Verdict::Allowed(None));
            l.refused(a, t0);
        }
        let at = t0 + Duration::from_secs(20);
        assert_eq!(
            l.check(a, at),
            Verdict::Limited {
                wait: Duration::from_secs(40),
                first: true
            }
        );
        for _ in 0..4 {
            assert!(matches!(
                l.check(a, at),
                Verdict::Limited { first: false, .. }
            ));
        }
        assert_eq!(l.check(b, at), Verdict::Allowed(None));
        // The next window starts afresh and reports the 4 calls that were only counted.
        assert_eq!(
            l.check(a, t0 + Duration::from_secs(60)),
            Verdict::Allowed(Some(4))
        );
        assert_eq!(
            l.check(a, t0 + Duration::from_secs(61)),
            Verdict::Allowed(None)
        );
    }
}
