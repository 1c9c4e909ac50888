//! The Kubernetes KMS v2 plugin front: kube-apiserver's `v2.KeyManagementService`
//! (k8s.io/kms `apis/v2/api.proto`) served on a unix socket (docs/kubernetes.md).
//!
//! The apiserver encrypts each Secret with a data key it derives from a seed, and asks the
//! plugin to encrypt that seed: with kms, under a keyring key that never leaves kms. The
//! caller is who the kernel says is at the other end of the socket (`SO_PEERCRED`:
//! `unix:uid=0` for an apiserver running as root); it needs the `encrypt` and `decrypt`
//! grants on the key like any other caller, and every call is audited. The socket is the
//! server's user's alone (0600), or a configured group's too (0660); made under a
//! temporary name and renamed into place once its mode is set, and removed at stop.
//!
//! Architecture invariant: like [`crate::grpc`], this front only translates (its
//! [`plugin`] hands every call to [`crate::service`]) and turns refusals into statuses
//! through [`crate::grpc::respond`], the one conversion to `tonic::Status`.

pub(crate) mod config;
mod plugin;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kms_proto::kubernetes::v2::key_management_service_server::KeyManagementServiceServer;

pub use config::KubernetesSettings;

use crate::service::Service;

/// The most bytes a request may have: a ciphertext and a key_id of 1 KiB each, and 32 KiB
/// of annotations, with room for their encoding.
const MAX_REQUEST_BYTES: usize = 40 * 1024;

/// The most calls in flight on one connection.
const MAX_STREAMS: u32 = 256;

/// Why the plugin's socket could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Another process listens on the socket's path.
    #[error("another process serves the Kubernetes KMS socket {0}: stop it first")]
    InUse(PathBuf),
    /// Something that is not a socket is at the path.
    #[error("{0} exists and is not a socket: kms replaces only a socket no one serves")]
    NotASocket(PathBuf),
    /// A file-system call failed.
    #[error("cannot {what} the Kubernetes KMS socket {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The plugin's socket, bound: its listener and the file it is at, removed when this is
/// dropped (if it is still this socket's).
#[derive(Debug)]
pub(crate) struct Socket {
    listener: tokio::net::UnixListener,
    file: SocketFile,
}

/// The socket's file: removed on drop, unless another has taken its path since.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the socket of `settings` (from the async runtime): a socket left by a server
/// that is gone is replaced; one that answers, or a file that is not a socket, is left
/// alone and refused.
pub(crate) fn bind(settings: &KubernetesSettings) -> Result<Socket, SocketError> {
    let path = &settings.socket;
    let io = |what, source| SocketError::Io {
        what,
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.clone())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|e| io("remove the stale", e))?;
                }
                Err(e) => return Err(io("probe", e)),
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    // Made under a name of its own, given its mode and group, then renamed into place: the
    // apiserver never finds it more open than configured.
    let staging = staging_path(path);
    if std::fs::symlink_metadata(&staging).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&staging);
    }
    let listener = std::os::unix::net::UnixListener::bind(&staging).map_err(|e| io("bind", e))?;
    let placed = (|| {
        let mode = if settings.group.is_some() {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("set the mode of", e))?;
        if let Some(gid) = settings.group {
            rustix::fs::chown(&staging, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| io("give the group", e.into()))?;
        }
        std::fs::rename(&staging, path).map_err(|e| io("put in place", e))?;
        std::fs::symlink_metadata(path).map_err(|e| io("inspect", e))
    })();
    let meta = match placed {
        Ok(meta) => meta,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
    };
    let file = SocketFile {
        path: path.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| io("configure", e))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| io("listen on", e))?;
    Ok(Socket { listener, file })
}

/// `DIR/.NAME.PID` beside `path`.
fn staging_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

/// Serves the plugin on `socket` until `shutdown` completes; the socket's file is removed
/// then.
pub(crate) async fn serve(
    socket: Socket,
    service: Service,
    key: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let Socket { listener, file } = socket;
    tracing::info!(socket = %file.path.display(), key = %key, "Kubernetes KMS v2 plugin listening");
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .add_service(
            KeyManagementServiceServer::new(plugin::Plugin::new(service, key))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    drop(file);
    served
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings(dir: &Path, group: Option<u32>) -> KubernetesSettings {
        KubernetesSettings {
            socket: dir.join("kms.sock"),
            key: "k".into(),
            group,
        }
    }

    #[tokio::test]
    async fn the_socket_is_private_replaces_only_a_dead_socket_and_goes_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), None);
        let socket = bind(&s).unwrap();
        let meta = std::fs::symlink_metadata(&s.socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!staging_path(&s.socket).exists());
        // A second server is refused while the first listens.
        assert!(matches!(bind(&s), Err(SocketError::InUse(_))));
        drop(socket);
        assert!(!s.socket.exists(), "the socket is removed at stop");

        // A socket no one serves (a server killed) is replaced.
        let dead = std::os::unix::net::UnixListener::bind(&s.socket).unwrap();
        drop(dead);
        assert!(s.socket.exists());
        let again = bind(&s).unwrap();
        drop(again);

        // A file that is not a socket is never removed.
        std::fs::write(&s.socket, b"not a socket").unwrap();
        assert!(matches!(bind(&s), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&s.socket).unwrap(), b"not a socket");
    }

    #[tokio::test]
    async fn a_group_gets_0660() {
        let dir = tempfile::tempdir().unwrap();
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let s = settings(dir.path(), Some(gid));
        let socket = bind(&s).unwrap();
        let meta = std::fs::symlink_metadata(&s.socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        drop(socket);
    }

    #[tokio::test]
    async fn a_socket_moved_away_is_not_removed_by_the_old_server() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), None);
        let socket = bind(&s).unwrap();
        std::fs::remove_file(&s.socket).unwrap();
        std::fs::write(&s.socket, b"someone else's").unwrap();
        drop(socket);
        assert_eq!(std::fs::read(&s.socket).unwrap(), b"someone else's");
    }
}
