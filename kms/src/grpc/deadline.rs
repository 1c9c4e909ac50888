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

use std::time::{Duration, Instant};

pub(crate) use crate::service::deadline::{Deadline, Expired};

/// How far ahead of the caller's deadline the gate answers, so that its answer, not
/// tonic's `CANCELLED`, is the one sent (tokio's timers fire in whole milliseconds).
pub(crate) const MARGIN: Duration = Duration::from_millis(1);

/// The deadline of a call whose request carries `grpc-timeout`, taken now (before tonic
/// takes its own), [`MARGIN`] early.
pub(crate) fn of(headers: &http::HeaderMap) -> Option<Deadline> {
    let timeout = parse_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Deadline::new(
        Instant::now() + timeout.saturating_sub(MARGIN),
    ))
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_timeout;
    use std::time::Duration;

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
}
