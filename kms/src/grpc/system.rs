//! `kms.v1.System`: init, unseal, seal, status.

use std::sync::Arc;

use kms_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{ApiError, run};
use crate::seal::{SealManager, SealStatus};

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

    /// Runs a blocking seal call through [`super::run`].
    async fn run<T: Send + 'static>(
        &self,
        rpc: &'static str,
        f: impl FnOnce(&SealManager) -> Result<T, crate::seal::SealError> + Send + 'static,
    ) -> Result<T, Status> {
        let seal = Arc::clone(&self.seal);
        run(rpc, String::new(), move || f(&seal).map_err(ApiError::from)).await
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
