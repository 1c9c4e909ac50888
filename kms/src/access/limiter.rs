//! The rate limit on failed unseal shares, per source address.
//!
//! Unseal needs no role (the share is the credential), so anyone who reaches the port can
//! try shares. Each address may fail `max_failures` times in any `window`; after that its
//! unseal calls are refused with `RESOURCE_EXHAUSTED` until its oldest failure leaves the
//! window. Successful shares do not count. Per address rather than global, so that a
//! stranger's guessing cannot lock the custodians out.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsealLimit {
    /// Failures allowed per window.
    pub max_failures: u32,
    /// The window.
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
pub struct FailureLimiter {
    limit: UnsealLimit,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// Most addresses remembered; beyond it the oldest histories are dropped.
const MAX_ADDRESSES: usize = 10_000;

impl FailureLimiter {
    /// A limiter.
    pub fn new(limit: UnsealLimit) -> Self {
        Self {
            limit,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` if `addr` has used up its failures: how long until it may try again.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(history) = map.get_mut(&addr) else {
            return Ok(());
        };
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.limit.window)
        {
            history.pop_front();
        }
        if history.len() < self.limit.max_failures as usize {
            return Ok(());
        }
        let oldest = history.front().copied().unwrap_or(now);
        Err(self.limit.window.saturating_sub(now.duration_since(oldest)))
    }

    /// Records a failed share from `addr`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&addr) {
            let window = self.limit.window;
            map.retain(|_, h| h.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let history = map.entry(addr).or_default();
        history.push_back(now);
        while history.len() > self.limit.max_failures as usize {
            history.pop_front();
        }
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
            assert!(l.check(a, t0).is_ok(), "failure {i}");
            l.failed(a, t0 + Duration::from_secs(i));
        }
        let wait = l.check(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        // Another address is not affected.
        assert!(l.check(b, t0).is_ok());
        // Once the oldest failure leaves the window, one more try is allowed.
        assert!(l.check(a, t0 + Duration::from_secs(60)).is_ok());
    }
}
