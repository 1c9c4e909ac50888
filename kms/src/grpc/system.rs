//! `kms.v1.System`: init, unseal, seal, status.

use std::sync::Arc;

use kms_proto::v1 as pb;

use crate::wire::{init_pb, status_pb};
use tonic::{Request, Response, Status};

use super::{ApiError, Call, Ctx, Served, run};
use crate::seal::{InitOutput, SealError};

/// The service's name in audit records.
const SERVICE: &str = "kms.v1.System";

/// Whether an unseal error is a share that failed (rather than the server's own fault).
fn counts_as_failed_share(e: &SealError) -> bool {
    !matches!(
        e,
        SealError::Hsm(_)
            | SealError::Store(_)
            | SealError::Randomness
            | SealError::AuditUnavailable
            | SealError::AuditKeyMissing(_)
    )
}

/// The `kms.v1.System` service.
#[derive(Debug, Clone)]
pub(crate) struct SystemService {
    ctx: Ctx,
}

impl SystemService {
    /// A service over the seal.
    pub(crate) fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, operation: &'static str) -> Call {
        Call::new(&self.ctx, req, SERVICE, operation)
    }
}

type BackupStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::CreateBackupChunk, Status>> + Send>,
>;

/// The size of the parts a backup is streamed in.
const BACKUP_CHUNK: usize = 256 * 1024;

#[tonic::async_trait]
impl pb::system_server::System for SystemService {
    type CreateBackupStream = BackupStream;

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        let call = self.call(&request, "CreateBackup");
        let seal = Arc::clone(&self.ctx.seal);
        // The backup's own record, durable before the first byte.
        let check = Arc::clone(&seal);
        run(call, move |_| {
            if !check.can_sign() {
                return Err(ApiError::Backup(crate::backup::BackupError::NoSigner));
            }
            Ok(Served::new(()))
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut buffer = Vec::with_capacity(BACKUP_CHUNK);
            let sent = seal.backup(&mut |line| {
                buffer.extend_from_slice(line);
                if buffer.len() >= BACKUP_CHUNK {
                    let data = std::mem::replace(&mut buffer, Vec::with_capacity(BACKUP_CHUNK));
                    tx.blocking_send(Ok(pb::CreateBackupChunk { data }))
                        .map_err(|_| std::io::Error::other("the caller went away"))?;
                }
                Ok(())
            });
            match sent {
                Ok(_) => {
                    let _ = tx.blocking_send(Ok(pb::CreateBackupChunk { data: buffer }));
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "backup failed");
                    // Never a partial file that looks whole: the stream ends in an error.
                    let _ = tx.blocking_send(Err(Status::unavailable("the backup failed")));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        use prost::Message as _;
        let call = self.call(&request, "Init");
        let pb::InitRequest {
            shares,
            threshold,
            hsm_pin,
        } = request.into_inner();
        let pin = (!hsm_pin.is_empty()).then(|| secrecy::SecretString::from(hsm_pin));
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            // The seal record and Init's audit record commit together.
            let commit = |out: &InitOutput, writes| {
                c.commit(None, init_pb(out).encoded_len() as u64, None, writes)
                    .map_err(|_| SealError::AuditUnavailable)
            };
            let out = seal.init(shares, threshold, pin.as_ref(), &commit)?;
            Ok(Served::new(init_pb(&out)))
        })
        .await
    }

    async fn unseal(
        &self,
        request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let reset = request.get_ref().reset;
        let call = self.call(&request, if reset { "UnsealReset" } else { "Unseal" });
        let pb::UnsealRequest { share, nonce, .. } = request.into_inner();
        let share = zeroize::Zeroizing::new(share);
        let seal = Arc::clone(&self.ctx.seal);
        let limiter = Arc::clone(&self.ctx.unseal_limiter);
        run(call, move |c| {
            if reset {
                return Ok(Served::new(status_pb(&seal.reset()?)));
            }
            // Failed shares are limited per address. The failure is reserved before the
            // share is tried (check and record in one step) and released if it was good.
            let ticket = match c.peer() {
                Some(addr) => Some(
                    limiter
                        .begin(addr.ip(), std::time::Instant::now())
                        .map_err(ApiError::UnsealLimited)?,
                ),
                None => None,
            };
            let nonce = Some(nonce.as_str()).filter(|n| !n.is_empty());
            let result = seal.unseal(&share, nonce);
            if let Some(ticket) = ticket
                && !result.as_ref().is_err_and(counts_as_failed_share)
            {
                ticket.succeeded();
            }
            let status = result?;
            // If the record cannot be written, the share is not kept and an unseal that
            // completed is taken back.
            let undo_seal = Arc::clone(&seal);
            let completed = !status.sealed;
            Ok(Served::new(status_pb(&status)).undo(move || {
                let _ = if completed {
                    undo_seal.seal()
                } else {
                    undo_seal.reset()
                };
            }))
        })
        .await
    }

    /// Seals. The one call whose effect stands even when its record cannot be written:
    /// sealing only takes capability away, and an operator must be able to stop a server
    /// whose audit log is failing. The answer is then `UNAVAILABLE`, but the server is
    /// sealed.
    async fn seal(
        &self,
        request: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let call = self.call(&request, "Seal");
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |_| Ok(Served::new(status_pb(&seal.seal()?)))).await
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let call = self.call(&request, "Status");
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            let mut status = status_pb(&seal.status());
            // Status answers strangers too (probes, a custodian before their certificate
            // works); which host and address answered is for callers who are someone.
            if c.identity().principal == crate::policy::ANONYMOUS {
                status.server.clear();
            }
            Ok(Served::new(status))
        })
        .await
    }
}
