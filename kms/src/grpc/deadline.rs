//! A call's deadline: the caller's `grpc-timeout`, answered `DEADLINE_EXCEEDED` by the
//! gate, with the one thing a caller needs to know to retry safely: whether the call's work
//! had begun.
//!
//! tonic drops a call whose `grpc-timeout` has passed and answers `CANCELLED: Timeout
//! expired`, whether or not the call had already committed; a client following the usual
//! advice ("cancelled: nothing was done") then does it twice. So the gate keeps the deadline
//! itself, [`MARGIN`] ahead of tonic's, and the call's work and the gate agree through
//! [`Deadline`] on which of them goes first:
//! - the work begins only before the deadline ([`Deadline::begin`]); past it, it refuses
//!   (`DEADLINE_EXCEEDED`, recorded: nothing was done);
//! - when the deadline passes first, the gate answers at once ([`Deadline::expire`]): *not
//!   begun* (nothing was done, and the work will not begin; the gate records the call) or
//!   *begun* (it may have completed: its own record says how, under its request id).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// How far ahead of the caller's deadline the gate answers, so that its answer, not
/// tonic's `CANCELLED`, is the one sent (tokio's timers fire in whole milliseconds).
pub(crate) const MARGIN: Duration = Duration::from_millis(1);

const WAITING: u8 = 0;
const BEGUN: u8 = 1;
/// The gate answered before the work began: the work must not begin, nor record.
const ABANDONED: u8 = 2;
/// The work found the deadline passed and refused (and records that).
const REFUSED: u8 = 3;

/// A call's deadline and how far its work got; one per call, shared by the gate and the
/// work (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct Deadline {
    at: Instant,
    progress: Arc<AtomicU8>,
}

/// What the work does about the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Begin {
    /// Before the deadline: do the work.
    Go,
    /// Past it: refuse the call, and record the refusal.
    Late,
    /// The gate has answered already: do nothing, record nothing.
    Abandoned,
}

/// What the gate found when the deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// The work had not begun and now will not: the gate records the call.
    NotBegun,
    /// The work refused for lateness itself (and records that): nothing was done.
    Refused,
    /// The work had begun: it may have completed.
    Begun,
}

impl Deadline {
    /// The deadline of a call whose request carries `grpc-timeout`, taken now (before
    /// tonic takes its own), [`MARGIN`] early.
    pub(crate) fn of(headers: &http::HeaderMap) -> Option<Self> {
        let timeout = parse_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
        let now = Instant::now();
        Some(Self {
            at: now + timeout.saturating_sub(MARGIN),
            progress: Arc::new(AtomicU8::new(WAITING)),
        })
    }

    /// When the gate answers.
    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// Called by the work as it begins; `min_left`: the time the work needs before the
    /// deadline (less left is late too).
    pub(crate) fn begin(&self, min_left: Duration) -> Begin {
        let to = if Instant::now() + min_left >= self.at {
            REFUSED
        } else {
            BEGUN
        };
        match self
            .progress
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) if to == BEGUN => Begin::Go,
            Ok(_) => Begin::Late,
            Err(_) => Begin::Abandoned,
        }
    }

    /// Called by the gate when the deadline passed before the answer.
    pub(crate) fn expire(&self) -> Expired {
        match self.progress.compare_exchange(
            WAITING,
            ABANDONED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Expired::NotBegun,
            Err(REFUSED) => Expired::Refused,
            Err(_) => Expired::Begun,
        }
    }
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), as the gRPC over HTTP/2
/// protocol defines it. Anything else is no deadline (as tonic reads it).
fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_as_the_protocol_defines_them() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("250u"), Some(Duration::from_micros(250)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "123456789S", "5s", "-5S", "5 S", "½S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }

    fn deadline(in_: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + in_,
            progress: Arc::new(AtomicU8::new(WAITING)),
        }
    }

    #[test]
    fn whoever_goes_first_decides() {
        let d = deadline(Duration::from_secs(60));
        assert_eq!(d.begin(Duration::ZERO), Begin::Go);
        assert_eq!(d.expire(), Expired::Begun);

        let d = deadline(Duration::from_secs(60));
        assert_eq!(d.expire(), Expired::NotBegun);
        assert_eq!(d.begin(Duration::ZERO), Begin::Abandoned);

        let d = deadline(Duration::ZERO);
        assert_eq!(d.begin(Duration::ZERO), Begin::Late);
        assert_eq!(d.expire(), Expired::Refused);
    }
}
