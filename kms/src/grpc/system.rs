//! `kms.v1.System`: init, unseal, seal, status.

use std::sync::Arc;

use kms_proto::v1 as pb;

use crate::access::limiter::FailureLimiter;
use crate::audit::CeremonySummary;
use crate::wire::{init_pb, rekey_step_pb, status_pb, verified_pb};
use tonic::{Request, Response, Status};

use super::run;
use crate::seal::{InitOutput, SealError};
use crate::service::{Call, Op, Served, Service, ServiceError};

/// Whether an unseal error is a share that failed (rather than the server's own fault).
fn counts_as_failed_share(e: &SealError) -> bool {
    !matches!(
        e,
        SealError::Hsm(_)
            | SealError::Store(_)
            | SealError::Randomness
            | SealError::AuditUnavailable
            | SealError::AuditKeyMissing(_)
            | SealError::ShareSealing
            | SealError::RecordChanged
            | SealError::RecordNotAuthentic
            | SealError::RecordKeyMissing(_)
    )
}

/// Runs `f`, which tries a share, under the limit on failed shares per address (unseal,
/// rekey and verify-share count together). The failure is reserved before the share is
/// tried (check and record in one step) and released if it was good.
fn limited<T>(
    c: &Call,
    limiter: &FailureLimiter,
    f: impl FnOnce() -> Result<T, SealError>,
) -> Result<T, ServiceError> {
    let ticket = match c.peer() {
        Some(addr) => Some(
            limiter
                .begin(addr.ip(), std::time::Instant::now())
                .map_err(ServiceError::UnsealLimited)?,
        ),
        None => None,
    };
    let result = f();
    if let Some(ticket) = ticket
        && !result.as_ref().is_err_and(counts_as_failed_share)
    {
        ticket.succeeded();
    }
    Ok(result?)
}

/// What a ceremony's record says of the share it was given: the share set and index the
/// share names, if it can be read (never the share).
fn share_summary(share: &str, step: &str) -> CeremonySummary {
    let parsed = kms_unseal::Share::parse(share).ok();
    CeremonySummary {
        share_set: parsed
            .as_ref()
            .map(|s| s.share_set().to_string())
            .unwrap_or_default(),
        share_index: parsed.as_ref().map(kms_unseal::Share::index),
        step: step.to_owned(),
        ..CeremonySummary::default()
    }
}

/// The `kms.v1.System` service.
#[derive(Debug, Clone)]
pub(crate) struct SystemService {
    ctx: Service,
}

impl SystemService {
    /// A service over the seal.
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op) -> Call {
        super::call(&self.ctx, req, op)
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
        let call = self.call(&request, Op::CreateBackup);
        let seal = Arc::clone(&self.ctx.seal);
        // The backup's own record, durable before the first byte.
        let check = Arc::clone(&seal);
        run(call, move |_| {
            if !check.can_sign() {
                return Err(ServiceError::Backup(crate::backup::BackupError::NoSigner));
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
                    let _ = tx.blocking_send(Err(super::status(
                        tonic::Code::Unavailable,
                        "BACKUP_FAILED",
                        "the backup failed",
                    )));
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
        let call = self.call(&request, Op::Init);
        let pb::InitRequest {
            shares,
            threshold,
            hsm_pin,
            recipients,
        } = request.into_inner();
        let pin = (!hsm_pin.is_empty()).then(|| secrecy::SecretString::from(hsm_pin));
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            // The seal record and Init's audit record commit together.
            let commit = |out: &InitOutput, writes| {
                let ceremony = CeremonySummary {
                    share_set: out.share_set_id.to_string(),
                    new_shares: u8::try_from(out.shares.len()).ok(),
                    new_threshold: Some(out.threshold),
                    recipients: recipients.iter().map(|r| r.trim().to_owned()).collect(),
                    ..CeremonySummary::default()
                };
                c.commit(
                    None,
                    init_pb(out).encoded_len() as u64,
                    None,
                    Some(ceremony),
                    writes,
                )
                .map_err(|_| SealError::AuditUnavailable)
            };
            let out = seal.init(shares, threshold, pin.as_ref(), &recipients, &commit)?;
            Ok(Served::new(init_pb(&out)))
        })
        .await
    }

    async fn unseal(
        &self,
        request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let reset = request.get_ref().reset;
        let call = self.call(&request, if reset { Op::UnsealReset } else { Op::Unseal });
        let pb::UnsealRequest { share, nonce, .. } = request.into_inner();
        let share = zeroize::Zeroizing::new(share);
        let seal = Arc::clone(&self.ctx.seal);
        let limiter = Arc::clone(&self.ctx.unseal_limiter);
        run(call, move |c| {
            if reset {
                return Ok(Served::new(status_pb(&seal.reset()?)));
            }
            let nonce = Some(nonce.as_str()).filter(|n| !n.is_empty());
            let status = limited(c, &limiter, || seal.unseal(&share, nonce))?;
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

    async fn rekey_init(
        &self,
        request: Request<pb::RekeyInitRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let call = self.call(&request, Op::RekeyInit);
        let pb::RekeyInitRequest {
            shares,
            threshold,
            recipients,
        } = request.into_inner();
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |_| {
            let status = seal.rekey_init(shares, threshold, &recipients)?;
            let ceremony = status.rekey.as_ref().map(|r| CeremonySummary {
                share_set: status
                    .share_set_id
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                step: "started".to_owned(),
                new_share_set: r.new_share_set_id.to_string(),
                new_shares: Some(r.new_shares),
                new_threshold: Some(r.new_threshold),
                // Checked by rekey_init: age recipients, nothing else.
                recipients: recipients.iter().map(|r| r.trim().to_owned()).collect(),
                ..CeremonySummary::default()
            });
            let undo_seal = Arc::clone(&seal);
            let mut served = Served::new(status_pb(&status)).undo(move || {
                undo_seal.rekey_forget();
            });
            if let Some(c) = ceremony {
                served = served.ceremony(c);
            }
            Ok(served)
        })
        .await
    }

    async fn rekey_submit(
        &self,
        request: Request<pb::RekeySubmitRequest>,
    ) -> Result<Response<pb::RekeySubmitResponse>, Status> {
        let call = self.call(&request, Op::RekeySubmit);
        let pb::RekeySubmitRequest { share, nonce } = request.into_inner();
        let share = zeroize::Zeroizing::new(share);
        let given = share_summary(&share, "share");
        let index = given.share_index;
        let call = call.ceremony(given);
        let seal = Arc::clone(&self.ctx.seal);
        let limiter = Arc::clone(&self.ctx.unseal_limiter);
        run(call, move |c| {
            let nonce = Some(nonce.as_str()).filter(|n| !n.is_empty());
            let commit = |summary: CeremonySummary, writes| {
                let summary = CeremonySummary {
                    share_index: index,
                    ..summary
                };
                c.commit(None, 0, None, Some(summary), writes)
                    .map_err(|_| SealError::AuditUnavailable)
            };
            let step = limited(c, &limiter, || seal.rekey_submit(&share, nonce, &commit))?;
            Ok(Served::new(rekey_step_pb(&step)))
        })
        .await
    }

    async fn rekey_cancel(
        &self,
        request: Request<pb::RekeyCancelRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let call = self.call(&request, Op::RekeyCancel);
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            let commit = |summary, writes| {
                c.commit(None, 0, None, Some(summary), writes)
                    .map_err(|_| SealError::AuditUnavailable)
            };
            let (status, _) = seal.rekey_cancel(&commit)?;
            Ok(Served::new(status_pb(&status)))
        })
        .await
    }

    async fn verify_share(
        &self,
        request: Request<pb::VerifyShareRequest>,
    ) -> Result<Response<pb::VerifyShareResponse>, Status> {
        let call = self.call(&request, Op::VerifyShare);
        let share = zeroize::Zeroizing::new(request.into_inner().share);
        let call = call.ceremony(share_summary(&share, ""));
        let seal = Arc::clone(&self.ctx.seal);
        let limiter = Arc::clone(&self.ctx.unseal_limiter);
        run(call, move |c| {
            let verified = limited(c, &limiter, || seal.verify_share(&share))?;
            Ok(Served::new(verified_pb(&verified)))
        })
        .await
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let call = self.call(&request, Op::RotateMasterKey);
        let adopt = request.into_inner().adopt_label;
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            let commit = |summary, writes| {
                c.commit(None, 0, None, Some(summary), writes)
                    .map_err(|_| SealError::AuditUnavailable)
            };
            let adopt = Some(adopt.as_str()).filter(|a| !a.is_empty());
            let r = seal.rotate_master_key(adopt, &commit)?;
            Ok(Served::new(pb::RotateMasterKeyResponse {
                master_key_label: r.label,
                master_key_id: r.id,
                previous_master_key_label: r.previous_label,
                previous_master_key_id: r.previous_id,
                previous_destroyed: r.previous_destroyed,
            }))
        })
        .await
    }

    async fn take_over(
        &self,
        request: Request<pb::TakeOverRequest>,
    ) -> Result<Response<pb::TakeOverResponse>, Status> {
        let call = self.call(&request, Op::TakeOver);
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            let commit = |summary, writes| {
                c.commit(None, 0, None, Some(summary), writes)
                    .map_err(|_| SealError::AuditUnavailable)
            };
            let done = seal.take_over(&commit)?;
            Ok(Served::new(pb::TakeOverResponse {
                instance_id: done.instance,
                adopted_instance_ids: done.adopted,
                owns_untagged: done.untagged,
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
        let call = self.call(&request, Op::Seal);
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |_| Ok(Served::new(status_pb(&seal.seal()?)))).await
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::SealStatus>, Status> {
        let call = self.call(&request, Op::Status);
        let seal = Arc::clone(&self.ctx.seal);
        run(call, move |c| {
            let mut status = status_pb(&seal.status());
            // Status answers strangers too (probes, a custodian before their certificate
            // works); which host and address answered is for callers who are someone.
            if c.identity().principal == crate::policy::ANONYMOUS {
                status.server.clear();
                status.rekey = None;
                status.instance_id.clear();
                status.restored_from_instance_ids.clear();
            }
            Ok(Served::new(status))
        })
        .await
    }
}
