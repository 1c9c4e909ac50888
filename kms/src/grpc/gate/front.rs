//! The gate's rules for calls that come through another front than gRPC (the HTTPS
//! front): the same limits, counted in the same [`GateState`].

use std::time::{Duration, Instant};

use tonic::Code;

use super::{ANONYMOUS_LIMITED_DELAY, Caller, GateState, Rpc, append, code_name};
use crate::access::limiter::{Holder, LimitKind, Source, Verdict};
use crate::access::tls::PeerInfo;
use crate::audit::AuditEvent;

impl GateState {
    /// Whether a call that came through another front (the HTTPS front) may go on, by the
    /// rules a gRPC call meets here before it is read: a caller over its limit of refused
    /// calls is refused; a caller without a certificate is refused unless the call is
    /// `open` (health, seal status), and its open calls count against
    /// `anonymous_calls_per_minute`. A caller without a certificate's refusals are counted
    /// (never recorded one by one) under `operation`.
    pub(crate) fn admit(
        &self,
        peer: &PeerInfo,
        open: bool,
        operation: &'static str,
    ) -> Result<(), FrontRefusal> {
        let now = Instant::now();
        let source = Source::of(peer.addr.ip());
        if !peer.identity.tls || peer.identity.authenticated {
            let caller = Caller::Holder(Holder {
                source,
                principal: peer.identity.principal.clone(),
            });
            if let Verdict::Limited { wait, first } = self.refused_check(&caller, now) {
                crate::metrics::metrics().limit_reached(LimitKind::RefusedCalls);
                // As on gRPC: the first of each window is recorded, the others counted.
                return Err(FrontRefusal::HolderLimited { wait, first });
            }
            return Ok(());
        }
        let rpc = Rpc {
            service: "kms.v1.KeyManagement",
            method: operation,
        };
        if let Verdict::Limited { wait, .. } = self.refused_anonymous.check(&source, now) {
            self.anonymous_limited(LimitKind::RefusedCalls, source);
            self.count(source, rpc, code_name(Code::ResourceExhausted));
            return Err(FrontRefusal::Limited(wait));
        }
        if !open {
            self.refused_anonymous.refused(&source, now);
            self.count(source, rpc, code_name(Code::Unauthenticated));
            return Err(FrontRefusal::Unauthenticated);
        }
        if let Err(wait) = self.anonymous_calls.allow(peer.addr.ip(), now) {
            self.anonymous_limited(LimitKind::AnonymousCalls, source);
            self.count(source, rpc, code_name(Code::ResourceExhausted));
            return Err(FrontRefusal::AnonymousLimited(wait));
        }
        Ok(())
    }

    /// Records a refusal the other front made itself, before any call of the service
    /// layer (an unknown path, a method or body it does not take, a token that is not the
    /// caller's, ...), and counts it against the caller's limit of refused calls, as the
    /// gRPC gate records and counts a call no handler answered. A certificate holder's
    /// refusal is one record: service `kms.Http`, operation `Refused`, the path as
    /// `<path, N bytes>` in `key` (never the path itself), `front` = `http`, the canonical
    /// code as outcome; a caller without a certificate's is counted in the aggregate.
    /// Whether the answer may go: `false` when the record could not be written (fail
    /// closed: the caller gets `UNAVAILABLE` instead).
    pub(crate) async fn refused_at_front(
        &self,
        peer: &PeerInfo,
        path_bytes: usize,
        outcome: &'static str,
    ) -> bool {
        let source = Source::of(peer.addr.ip());
        if peer.identity.tls && !peer.identity.authenticated {
            self.refused_anonymous.refused(&source, Instant::now());
            self.count(
                source,
                Rpc {
                    service: FRONT_SERVICE,
                    method: FRONT_REFUSED,
                },
                outcome,
            );
            return true;
        }
        self.refused_by_front(peer);
        append(&self.audit, front_event(peer, path_bytes, outcome)).await
    }

    /// Records the first refusal of a window of a certificate holder over its limit of
    /// refused calls (the others are counted, as on gRPC). Whether the answer may go.
    pub(crate) async fn limited_at_front(&self, peer: &PeerInfo, path_bytes: usize) -> bool {
        append(
            &self.audit,
            front_event(peer, path_bytes, code_name(Code::ResourceExhausted)),
        )
        .await
    }

    /// Counts a refusal (no role, no grant) of a certificate holder's call that came
    /// through another front, against its limit of refused calls.
    pub(crate) fn refused_by_front(&self, peer: &PeerInfo) {
        self.refused(&Caller::Holder(Holder {
            source: Source::of(peer.addr.ip()),
            principal: peer.identity.principal.clone(),
        }));
    }
}

/// The service and operation of a refusal the other front made before any call.
pub(crate) const FRONT_SERVICE: &str = "kms.Http";
/// See [`FRONT_SERVICE`].
pub(crate) const FRONT_REFUSED: &str = "Refused";

/// The record of a refusal the HTTPS front made itself: the path by its size only.
fn front_event(peer: &PeerInfo, path_bytes: usize, outcome: &'static str) -> AuditEvent {
    AuditEvent {
        request_id: crate::service::request_id(None),
        principal: peer.identity.principal.clone(),
        peer: peer.addr.to_string(),
        service: FRONT_SERVICE.to_owned(),
        operation: FRONT_REFUSED.to_owned(),
        key: Some(format!("<path, {path_bytes} bytes>")),
        outcome: outcome.to_owned(),
        front: Some("http".to_owned()),
        ..AuditEvent::default()
    }
}

/// Why [`GateState::admit`] refused a call of another front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrontRefusal {
    /// No client certificate, and the call needs one.
    Unauthenticated,
    /// A caller without a certificate over its limit of refused calls (counted): try
    /// again after this long.
    Limited(Duration),
    /// A caller without a certificate over `anonymous_calls_per_minute` (counted): refuse
    /// after [`ANONYMOUS_LIMITED_DELAY`], as gRPC does.
    AnonymousLimited(Duration),
    /// A certificate holder over its limit of refused calls; `first` of its window (to be
    /// recorded, as on gRPC, the others counted).
    HolderLimited {
        /// Try again after this long.
        wait: Duration,
        /// The first of the window.
        first: bool,
    },
}

impl FrontRefusal {
    /// How long to wait before answering this refusal: gRPC's delay for a caller without
    /// a certificate over its limit of calls, so that it cannot make the server refuse
    /// calls as fast as it sends them.
    pub(crate) fn delay(&self) -> Duration {
        match self {
            Self::AnonymousLimited(wait) => ANONYMOUS_LIMITED_DELAY.min(*wait),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller without a certificate over its limit of calls waits gRPC's delay before
    /// its refusal (never longer than its wait); no other refusal waits.
    #[test]
    fn only_an_anonymous_caller_over_its_limit_waits() {
        let long = Duration::from_secs(30);
        assert_eq!(
            FrontRefusal::AnonymousLimited(long).delay(),
            ANONYMOUS_LIMITED_DELAY
        );
        assert_eq!(
            FrontRefusal::AnonymousLimited(Duration::from_millis(10)).delay(),
            Duration::from_millis(10)
        );
        assert_eq!(FrontRefusal::Limited(long).delay(), Duration::ZERO);
        assert_eq!(
            FrontRefusal::HolderLimited {
                wait: long,
                first: true
            }
            .delay(),
            Duration::ZERO
        );
        assert_eq!(FrontRefusal::Unauthenticated.delay(), Duration::ZERO);
    }
}
