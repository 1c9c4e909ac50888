//! The kms gRPC API: the generated tonic/prost types and services.
//!
//! Architecture invariant: this is the only crate that knows protobuf types. The server
//! converts them to domain types at the edge (`kms::grpc`).
//!
//! Messages that carry secrets (shares) have a `Debug` that prints lengths, not contents.

#![forbid(unsafe_code)]

/// Version 1 of the API, package `kms.v1`.
pub mod v1 {
    #![allow(
        missing_docs,
        clippy::all,
        clippy::unwrap_used,
        clippy::indexing_slicing
    )]
    tonic::include_proto!("kms.v1");

    impl core::fmt::Debug for InitRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("InitRequest")
                .field("shares", &self.shares)
                .field("threshold", &self.threshold)
                .field("hsm_pin", &"<redacted>")
                .finish()
        }
    }

    impl core::fmt::Debug for InitResponse {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("InitResponse")
                .field(
                    "shares",
                    &format_args!("<{} shares redacted>", self.shares.len()),
                )
                .field("share_set_id", &self.share_set_id)
                .field("threshold", &self.threshold)
                .finish()
        }
    }

    impl core::fmt::Debug for UnsealRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("UnsealRequest")
                .field("share", &"<redacted>")
                .field("reset", &self.reset)
                .field("nonce", &self.nonce)
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{InitRequest, InitResponse, UnsealRequest};

    #[test]
    fn debug_redacts_shares() {
        let req = UnsealRequest {
            share: "kms1-SECRETSHARE".into(),
            reset: false,
            nonce: "ab".into(),
        };
        let resp = InitResponse {
            shares: vec!["kms1-SECRETSHARE".into()],
            share_set_id: "00".into(),
            threshold: 2,
        };
        let init = InitRequest {
            shares: 3,
            threshold: 2,
            hsm_pin: "SECRETPIN".into(),
        };
        let printed = format!("{req:?} {resp:?} {init:?}");
        assert!(!printed.contains("SECRETPIN"), "{printed}");
        assert!(!printed.contains("SECRETSHARE"), "{printed}");
        assert!(printed.contains("redacted"));
    }
}
