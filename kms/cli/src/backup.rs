//! `kms backup create|restore`: an online snapshot of the store into one signed file, and
//! its restore, offline, into an empty store of either backend (docs/operations.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::system_client::SystemClient;
use tonic::transport::Channel;

use crate::{Answer, BoxError, RpcError};

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup of the running server's whole store (admin role): a consistent
    /// snapshot, written to FILE (mode 0600) and checked before it is kept.
    Create {
        /// Where to write it; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into the empty store that a configuration names, with no server
    /// running on it. The file is checked whole (checksum, the audit key's signature) before
    /// anything is written. The restored server comes up sealed: unseal it with the shares
    /// of the backup's time.
    Restore {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// The server's configuration (its `[storage]` table names the target).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a backup file without restoring it.
    Check {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
    },
}

/// Runs `kms backup ...`. `connect` is called only by `create`.
pub async fn run<F, Fut>(command: BackupCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        BackupCommand::Create { out } => create(connect().await?, &out).await,
        BackupCommand::Restore { input, config } => {
            let config = kms::config::Config::load(&config)?;
            let store = config.storage.open()?;
            let done =
                tokio::task::spawn_blocking(move || kms::backup::restore(&input, store.as_ref()))
                    .await??;
            println!(
                "restored {} entries (backup of {} by {}, sha256 {}); start the server and unseal it",
                done.entries,
                crate::audit::rfc3339(done.created_unix_ms),
                done.server,
                done.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Check { input } => {
            let done = tokio::task::spawn_blocking(move || kms::backup::check(&input)).await??;
            println!(
                "intact: {} entries, made {} by {}, sha256 {}",
                done.entries,
                crate::audit::rfc3339(done.created_unix_ms),
                done.server,
                done.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Streams the backup into `out`.partial (0600, new), checks it whole, then renames it.
async fn create(channel: Channel, out: &Path) -> Result<ExitCode, BoxError> {
    if out.exists() {
        return Err(format!("{} exists: choose a new file", out.display()).into());
    }
    let partial = out.with_extension("partial");
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| format!("cannot write {}: {e}", partial.display()))?
    };
    let written = async {
        let mut w = std::io::BufWriter::new(file);
        let mut stream = SystemClient::new(channel)
            .max_decoding_message_size(8 << 20)
            .create_backup(pb::CreateBackupRequest {})
            .answer()
            .await?;
        while let Some(chunk) = stream.message().await.map_err(RpcError)? {
            w.write_all(&chunk.data)?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let path = partial.clone();
        let checked = tokio::task::spawn_blocking(move || kms::backup::check(&path)).await??;
        Ok::<_, BoxError>(checked)
    }
    .await;
    let checked = match written {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out)?;
    println!(
        "backup written to {}: {} entries, sha256 {}",
        out.display(),
        checked.entries,
        checked.sha256
    );
    Ok(ExitCode::SUCCESS)
}
