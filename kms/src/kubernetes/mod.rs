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
//! Architecture invariant: like `grpc`, this front only translates (its `plugin` hands
//! every call to the service layer) and turns refusals into statuses through
//! `grpc::respond`, the one conversion to `tonic::Status`.

pub(crate) mod config;
mod plugin;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kms_proto::kubernetes::v2::key_management_service_server::KeyManagementServiceServer;

pub use config::KubernetesSettings;

use crate::service::Service;

/// The most bytes a request may have: a ciphertext and a key_id of 1 KiB each, and 32 KiB
/// of annotations, with room for their encoding.
const MAX_REQUEST_BYTES: usize = 40 * 1024;

/// The most calls in flight on one connection.
const MAX_STREAMS: u32 = 256;

/// The most connections open at once (the apiserver keeps one): beyond it, new ones wait
/// in the socket's backlog, and take no file descriptor of the server's.
const MAX_CONNECTIONS: usize = 64;

/// How long the start waits for a socket found at the path to answer before taking it for
/// one that another process serves.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// Others than root and the server's user can write the socket's directory: they could
    /// put their own socket in kms's place.
    #[error(
        "the Kubernetes KMS socket's directory {path} can be written by others (mode {mode:o}, owner uid {owner}): use a directory of root's or the server's user's, not writable by group or others (the package's /run/kms)"
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        owner: u32,
    },
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

/// Binds the socket of `settings`, in a directory only root and the server's user can
/// write: a socket left by a server that is gone is replaced; one that answers, or a file
/// that is not a socket, is left alone and refused.
pub(crate) async fn bind(settings: &KubernetesSettings) -> Result<Socket, SocketError> {
    let path = &settings.socket;
    let io = |what, source| SocketError::Io {
        what,
        path: path.clone(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|e| io("inspect the directory of", e))?;
    let me = rustix::process::geteuid().as_raw();
    if !(meta.uid() == 0 || meta.uid() == me) || meta.mode() & 0o022 != 0 {
        return Err(SocketError::UnsafeDirectory {
            path: dir.to_owned(),
            mode: meta.mode() & 0o7777,
            owner: meta.uid(),
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
                // Answered, or holds its connections: someone serves it.
                Ok(Ok(_)) | Err(_) => return Err(SocketError::InUse(path.clone())),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|e| io("remove the stale", e))?;
                }
                Ok(Err(e)) => return Err(io("probe", e)),
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    // Made under a name of its own, given its group and mode, then renamed into place
    // (never over anything that appeared meanwhile): the apiserver never finds it more open
    // than configured.
    let staging = staging_path(path);
    if std::fs::symlink_metadata(&staging).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&staging);
    }
    let listener = std::os::unix::net::UnixListener::bind(&staging).map_err(|e| io("bind", e))?;
    let placed = (|| {
        if let Some(gid) = settings.group {
            rustix::fs::chown(&staging, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| io("give the group", e.into()))?;
        }
        let mode = if settings.group.is_some() {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("set the mode of", e))?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            path,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| io("put in place", e.into()))?;
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

/// `DIR/.kms-PID` beside `path` (at most [`config::STAGING_EXTRA`] bytes longer than the
/// directory).
fn staging_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(".kms-{}", std::process::id()))
}

/// Serves the plugin on `socket` until `shutdown` completes; the socket's file is removed
/// then.
pub(crate) async fn serve(
    socket: Socket,
    service: Service,
    key: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let Socket { listener, file } = socket;
    tracing::info!(socket = %file.path.display(), key = %key, "Kubernetes KMS v2 plugin listening");
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .http2_max_header_list_size(16 * 1024)
        .add_service(
            KeyManagementServiceServer::new(plugin::Plugin::new(service, key))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, socket = %file.path.display(), "the Kubernetes KMS plugin stopped");
    }
    drop(file);
}

/// The connections accepted on `listener`, at most [`MAX_CONNECTIONS`] open at once; a
/// failed accept (out of file descriptors) is logged and retried after a pause rather than
/// at once.
fn incoming(
    listener: tokio::net::UnixListener,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let stream = loop {
                tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => break stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot accept on the Kubernetes KMS socket");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    },
                }
            };
            if tx
                .send(Ok(Conn {
                    stream,
                    _slot: slot,
                }))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An accepted connection, holding its slot until it closes.
struct Conn {
    stream: tokio::net::UnixStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
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
        let socket = bind(&s).await.unwrap();
        let meta = std::fs::symlink_metadata(&s.socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!staging_path(&s.socket).exists());
        // A second server is refused while the first listens.
        assert!(matches!(bind(&s).await, Err(SocketError::InUse(_))));
        drop(socket);
        assert!(!s.socket.exists(), "the socket is removed at stop");

        // A socket no one serves (a server killed) is replaced.
        let dead = std::os::unix::net::UnixListener::bind(&s.socket).unwrap();
        drop(dead);
        assert!(s.socket.exists());
        let again = bind(&s).await.unwrap();
        drop(again);

        // A file that is not a socket is never removed.
        std::fs::write(&s.socket, b"not a socket").unwrap();
        assert!(matches!(bind(&s).await, Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&s.socket).unwrap(), b"not a socket");
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o770, 0o1777] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let s = settings(dir.path(), None);
            assert!(
                matches!(bind(&s).await, Err(SocketError::UnsafeDirectory { .. })),
                "{mode:o}"
            );
            assert!(!s.socket.exists());
        }
    }

    #[tokio::test]
    async fn a_group_gets_0660() {
        let dir = tempfile::tempdir().unwrap();
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let s = settings(dir.path(), Some(gid));
        let socket = bind(&s).await.unwrap();
        let meta = std::fs::symlink_metadata(&s.socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        drop(socket);
    }

    #[tokio::test]
    async fn a_socket_moved_away_is_not_removed_by_the_old_server() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), None);
        let socket = bind(&s).await.unwrap();
        std::fs::remove_file(&s.socket).unwrap();
        std::fs::write(&s.socket, b"someone else's").unwrap();
        drop(socket);
        assert_eq!(std::fs::read(&s.socket).unwrap(), b"someone else's");
    }
}
