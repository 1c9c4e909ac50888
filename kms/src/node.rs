//! This server's name among the servers that may share one keyring: its host name and bound
//! address, as `kms operator status` and a backup's header show it.
//!
//! A leaf: it imports nothing from the crate, so the seal, the wire conversions and the
//! server can all name the server without importing one another.

use std::net::SocketAddr;
use std::sync::OnceLock;

/// This server's host name and bound address, once bound.
static IDENTITY: OnceLock<String> = OnceLock::new();

/// This server's host name and bound address ("" before it is bound).
pub(crate) fn identity() -> &'static str {
    IDENTITY.get().map_or("", String::as_str)
}

/// Records the address the server is bound to, with the host name; the first call wins.
pub(crate) fn bound(local: SocketAddr) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let _ = IDENTITY.set(format!("{} {local}", host.trim()).trim().to_owned());
}
