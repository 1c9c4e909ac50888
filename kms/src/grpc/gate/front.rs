//! The gate's rules for calls that come through another front than gRPC (the HTTPS
//! front): the same limits, counted in the same [`GateState`].

use std::time::{Duration, Instant};

use tonic::Code;

use super::{Caller, GateState, Rpc, code_name};
use crate::access::limiter::{Holder, LimitKind, Source, Verdict};
use crate::access::tls::PeerInfo;

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
            if let Verdict::Limited { wait, .. } = self.refused_check(&caller, now) {
                crate::metrics::metrics().limit_reached(LimitKind::RefusedCalls);
                return Err(FrontRefusal::Limited(wait));
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
            return Err(FrontRefusal::Limited(wait));
        }
        Ok(())
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

/// Why [`GateState::admit`] refused a call of another front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrontRefusal {
    /// No client certificate, and the call needs one.
    Unauthenticated,
    /// Over a limit: try again after this long.
    Limited(Duration),
}
