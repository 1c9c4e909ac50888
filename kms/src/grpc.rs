//! The gRPC edge: protobuf types in, domain calls, protobuf types out.
//!
//! Architecture invariant: this is the one place where errors become `tonic::Status`
//! ([`to_status`]), and the one place in `kms` where protobuf types are built or read. The
//! log line for every call is written here: the RPC, the outcome and the error's chain,
//! never a request or response body.

use std::sync::Arc;

use kms_proto::v1 as pb;
use tonic::{Code, Request, Response, Status};

use crate::seal::{SealError, SealManager, SealStatus};

/// Maps a seal error to a gRPC status: `FAILED_PRECONDITION` for the lifecycle,
/// `INVALID_ARGUMENT` for bad input (shares, numbers), `UNAVAILABLE` for HSM and store
/// faults, `DATA_LOSS` for a corrupt store.
pub fn to_status(err: &SealError) -> Status {
    let code = match err {
        SealError::NotInitialized
        | SealError::AlreadyInitialized
        | SealError::Sealed
        | SealError::AttemptMismatch
        | SealError::UnsafeMasterKey(_)
        | SealError::SharesPinRejected(_)
        | SealError::PinModeMismatch { .. } => Code::FailedPrecondition,
        SealError::BadParameters(_)
        | SealError::MalformedShare(_)
        | SealError::WrongShareSet { .. }
        | SealError::WrongThreshold { .. }
        | SealError::DuplicateShare { .. }
        | SealError::WrongQuorum
        | SealError::PinRequired
        | SealError::PinNotExpected
        | SealError::InitPinRejected(_) => Code::InvalidArgument,
        SealError::RootKeyUnwrap | SealError::CorruptRecord => Code::DataLoss,
        SealError::Hsm(_) | SealError::Store(_) | SealError::Randomness => Code::Unavailable,
        // `SealError` is ours and exhaustive here; new variants must be placed above.
    };
    let message = match code {
        Code::Unavailable => format!("unavailable: {err}"),
        _ => err.to_string(),
    };
    Status::new(code, message)
}

/// Writes the error and its whole source chain (PKCS#11 return codes included) to the log.
fn log_error(rpc: &'static str, err: &SealError, code: Code) {
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    if code == Code::Unavailable || code == Code::DataLoss || code == Code::Internal {
        tracing::error!(rpc, code = ?code, error = %chain, "request failed");
    } else {
        tracing::warn!(rpc, code = ?code, error = %chain, "request refused");
    }
}

fn status_pb(s: &SealStatus) -> pb::SealStatus {
    pb::SealStatus {
        initialized: s.initialized,
        sealed: s.sealed,
        threshold: u32::from(s.threshold),
        shares: u32::from(s.shares),
        progress: u32::from(s.progress),
        nonce: s.nonce.clone().unwrap_or_default(),
        share_set_id: s.share_set_id.map(|i| i.to_string()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hsm_pin_in_shares: s.pin_in_shares,
    }
}

/// The `kms.v1.System` service.
#[derive(Debug, Clone)]
pub struct SystemService {
    seal: Arc<SealManager>,
}

impl SystemService {
    /// A service over `seal`.
    pub fn new(seal: Arc<SealManager>) -> Self {
        Self { seal }
    }

    /// Runs a blocking seal call off the async runtime, logs its outcome, maps its error.
    async fn run<T: Send + 'static>(
        &self,
        rpc: &'static str,
        f: impl FnOnce(&SealManager) -> Result<T, SealError> + Send + 'static,
    ) -> Result<T, Status> {
        let seal = Arc::clone(&self.seal);
        let result = tokio::task::spawn_blocking(move || f(&seal))
            .await
            .map_err(|_| Status::internal("internal error"))?;
        match result {
            Ok(v) => {
                tracing::info!(rpc, code = "OK", "request served");
                Ok(v)
            }
            Err(e) => {
                let status = to_status(&e);
                log_error(rpc, &e, status.code());
                Err(status)
            }
        }
    }
}

#[tonic::async_trait]
impl pb::system_server::System for SystemService {
    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let pb::InitRequest {
            shares,
            threshold,
            hsm_pin,
        } = request.into_inner();
        let pin = (!hsm_pin.is_empty()).then(|| secrecy::SecretString::from(hsm_pin));
        let out = self
            .run("System/Init", move |s| {
                s.init(shares, threshold, pin.as_ref())
            })
            .await?;
        Ok(Response::new(pb::InitResponse {
            shares: out.shares.iter().map(|s| s.as_str().to_owned()).collect(),
            share_set_id: out.share_set_id.to_string(),
            threshold: u32::from(out.threshold),
        }))
    }

    async fn unseal(
        &self,
        request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let pb::UnsealRequest {
            share,
            reset,
            nonce,
        } = request.into_inner();
        let share = zeroize::Zeroizing::new(share);
        let status = if reset {
            self.run("System/Unseal(reset)", |s| s.reset()).await?
        } else {
            self.run("System/Unseal", move |s| {
                let nonce = Some(nonce.as_str()).filter(|n| !n.is_empty());
                s.unseal(&share, nonce)
            })
            .await?
        };
        Ok(Response::new(status_pb(&status)))
    }

    async fn seal(
        &self,
        _request: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let status = self.run("System/Seal", |s| s.seal()).await?;
        Ok(Response::new(status_pb(&status)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let status = self.run("System/Status", |s| Ok(s.status())).await?;
        Ok(Response::new(status_pb(&status)))
    }
}
