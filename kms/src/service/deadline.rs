//! A call's deadline, shared by the call's work and the front that answers when it passes,
//! so that the one thing a caller needs to know to retry safely is known: whether the
//! call's work had begun. The work begins only before the deadline ([`Deadline::begin`]);
//! past it, it refuses (`DEADLINE_EXCEEDED`, recorded: nothing was done). When the deadline
//! passes first, the front answers at once ([`Deadline::expire`]): *not begun* (nothing
//! was done, and the work will not begin; the front records the call) or *begun* (it may
//! have completed: its own record says how, under its request id). The gRPC front's use is
//! [`crate::grpc::deadline`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

const WAITING: u8 = 0;
const BEGUN: u8 = 1;
/// The front answered before the work began: the work must not begin, nor record.
const ABANDONED: u8 = 2;
/// The work found the deadline passed and refused (and records that).
const REFUSED: u8 = 3;

/// A call's deadline and how far its work got; one per call, shared by the front and the
/// work.
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
    /// The front has answered already: do nothing, record nothing.
    Abandoned,
}

/// What the front found when the deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// The work had not begun and now will not: the front records the call.
    NotBegun,
    /// The work refused for lateness itself (and records that): nothing was done.
    Refused,
    /// The work had begun: it may have completed.
    Begun,
}

impl Deadline {
    /// A deadline at `at`, nothing begun yet.
    pub(crate) fn new(at: Instant) -> Self {
        Self {
            at,
            progress: Arc::new(AtomicU8::new(WAITING)),
        }
    }

    /// When the front answers.
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

    /// Called by the front when the deadline passed before the answer.
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Begin, Deadline, Expired};
    use std::time::{Duration, Instant};

    fn deadline(in_: Duration) -> Deadline {
        Deadline::new(Instant::now() + in_)
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
