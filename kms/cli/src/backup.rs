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
        /// The audit key you trust: its fingerprint, as `kms operator init` printed it (or
        /// the public key in hex). A file signed by another key is refused; without this,
        /// nothing is restored.
        #[arg(long, value_name = "FINGERPRINT")]
        public_key: Option<String>,
    },
    /// Check a backup file without restoring it. With --public-key, exit 0 only if the file
    /// is intact and signed by that key; without it, the file can be checked only against
    /// the key it names itself, which proves nothing of its origin: exit 4.
    Check {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// The audit key you trust: its fingerprint (or the public key in hex).
        #[arg(long, value_name = "FINGERPRINT")]
        public_key: Option<String>,
    },
}

/// Exit code of a check that could not prove a file's origin (as `kms audit verify`'s
/// NOT ANCHORED).
const NOT_PINNED: u8 = 4;

/// What a check or restore without a trusted key says.
fn unpinned(checked: &kms::backup::Checked) -> String {
    format!(
        "NOT PINNED: the file is intact as far as it alone can tell, but it was checked only against the key it names itself ({}), which whoever could write the file could have replaced: pass --public-key with the audit key fingerprint recorded at init",
        checked.key_fingerprint
    )
}

/// Runs `kms backup ...`. `connect` is called only by `create`.
pub async fn run<F, Fut>(command: BackupCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        BackupCommand::Create { out } => create(connect().await?, &out).await,
        BackupCommand::Restore {
            input,
            config,
            public_key,
        } => {
            let Some(trusted) = public_key else {
                // Say what the file is, and restore nothing.
                let checked =
                    tokio::task::spawn_blocking(move || kms::backup::check(&input, None)).await??;
                println!("{}; nothing was restored", unpinned(&checked));
                return Ok(ExitCode::from(NOT_PINNED));
            };
            let config = kms::config::Config::load(&config)?;
            let target = config.storage.describe();
            let store = config
                .storage
                .open(kms::engines::tables())
                .map_err(|e| format!("cannot open {target}: {}", kms::error_chain(&e)))?;
            let done =
                tokio::task::spawn_blocking(move || kms::backup::restore(&input, store, &trusted))
                    .await?
                    .map_err(|e| match e {
                        kms::backup::BackupError::NotEmpty(_) => {
                            format!("{target}: {e}; nothing was restored")
                        }
                        e => kms::error_chain(&e),
                    })?;
            println!(
                "restored {} entries (backup of {} by {}, sha256 {}, signed by the audit key {}); start the server and unseal it: it takes an instance identity of its own (docs/operations.md)",
                done.entries,
                crate::audit::rfc3339(done.created_unix_ms),
                done.server,
                done.sha256,
                done.key_fingerprint
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Check { input, public_key } => {
            let done = tokio::task::spawn_blocking(move || {
                kms::backup::check(&input, public_key.as_deref())
            })
            .await??;
            let what = format!(
                "{} entries, made {} by {}, sha256 {}",
                done.entries,
                crate::audit::rfc3339(done.created_unix_ms),
                done.server,
                done.sha256
            );
            if done.pinned {
                println!(
                    "intact: {what}, signed by the audit key you trust ({})",
                    done.key_fingerprint
                );
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{}: {what}", unpinned(&done));
                Ok(ExitCode::from(NOT_PINNED))
            }
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
        let checked =
            tokio::task::spawn_blocking(move || kms::backup::check(&path, None)).await??;
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
        "backup written to {}: {} entries, sha256 {}, signed by the audit key {} (check it against the fingerprint recorded at init: kms backup check --in FILE --public-key FINGERPRINT)",
        out.display(),
        checked.entries,
        checked.sha256,
        checked.key_fingerprint
    );
    Ok(ExitCode::SUCCESS)
}
