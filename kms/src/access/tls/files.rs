//! Reading the TLS files: the certificate chains, and the private key, refused when anyone
//! but the server may read or change it.

use std::io;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

/// The certificates of the PEM file at `path` (`what`: `cert` or `client_ca`, for errors).
pub(super) fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The permission bits the private key must not have: any for others, write for its group.
/// Group read stays allowed (`0640 root:kms`, read by the server through its group), when
/// the group is the server's.
const KEY_FORBIDDEN: u32 = 0o027;

/// Reads the server's private key, refusing it if others can read or write it (checked on
/// the opened file, so what is checked is what is read).
pub(super) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let pem_err = |e: io::Error| TlsError::Pem {
        what: "key",
        path: path.to_owned(),
        source: rustls_pki_types::pem::Error::Io(e),
    };
    let mut file = std::fs::File::open(path).map_err(pem_err)?;
    let meta = file.metadata().map_err(pem_err)?;
    let mode = meta.mode() & 0o777;
    if mode & KEY_FORBIDDEN != 0 || !crate::section::group_is_servers(mode, meta.gid()) {
        return Err(TlsError::KeyTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let mut pem = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut pem).map_err(pem_err)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        what: "key",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Issue 32: the key is read only when others have no bit on it; group read (`0640
    /// root:kms`) is the packaged way and is taken.
    #[test]
    fn a_private_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server-key.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&path, key.serialize_pem()).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o644, false),
            (0o604, false),
            (0o602, false),
            (0o601, false),
            // Its group may not write it (it could swap the server's identity).
            (0o660, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match private_key(&path) {
                Ok(_) => assert!(ok, "{mode:o}: taken"),
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e}");
                    assert!(
                        matches!(e, TlsError::KeyTooOpen { mode: m, .. } if m == mode),
                        "{e:?}"
                    );
                    let text = e.to_string();
                    assert!(
                        text.contains(&path.display().to_string())
                            && text.contains(&format!("mode {mode:03o}"))
                            && text.contains("chmod 640"),
                        "{text}"
                    );
                }
            }
        }
    }
}
