//! kms: an HSM-backed key-management service.
//!
//! The code map is in docs/ARCHITECTURE.md. In short:
//! - [`policy`]: the leaf vocabulary of grants and roles: operations, principal patterns.
//! - `access` (private): identities (mTLS), roles, the rule of every RPC, TLS reload.
//! - [`audit`]: the hash-chained, group-committed audit log.
//! - [`config`]: the TOML configuration file.
//! - [`hsm`]: PKCS#11 sessions, login, and the master key.
//! - [`barrier`]: the root key while unsealed: subkeys and sealed records for the engines.
//! - [`store`]: the durable store (redb) behind a narrow trait.
//! - [`seal`]: init / unseal / seal, and the root key.
//! - [`keyring`]: named, versioned keys and the crypto operations (the first engine).
//! - `engine` (private): the interface every engine implements (heard, follow, maintain).
//! - [`engines`]: the list of engines, and every table of the store.
//! - `service` (private): a call's life whatever its front: caller, operation, access
//!   decision, audit record, transport-neutral errors.
//! - `grpc` (private): the gRPC front; the only place errors become `tonic::Status`.
//! - `http` (private): the Vault-compatible HTTPS front (Transit), beside gRPC.
//! - [`server`]: start-up, serving, shutdown.
//! - [`wire`]: every protobuf <-> domain conversion, both ways.
//!
//! # The public surface
//!
//! As rustls's lib.rs chooses its own: a module is public only when another crate of the
//! workspace uses it, and everything else is private or `pub(crate)` (`unreachable_pub`
//! warns about a `pub` item no other crate can reach). Who uses what:
//! - `kms-cli` (the `kms` binary): [`config`] (`Config::load`, the log settings),
//!   [`server`] (`run`, `Opened`, `shutdown_signal`), [`seal`] (`kms dev`'s bootstrap),
//!   [`policy`], [`wire`], [`keyring`] (`wrap`, `Wrapping`, the model), [`audit`] (report,
//!   verify, history), [`backup`] (check, restore), [`code_name`], [`error_chain`].
//! - the benches: [`audit`], [`barrier`], [`hsm`], [`keyring`], [`store`].
//! - the end-to-end tests: [`store`] (the backends' contract), [`engines`] (the tables),
//!   [`keyring`] (`wrap`).
//! - the fuzz targets: [`keyring`] (`ciphertext`).
//!
//! Private: `access`, `grpc`, `metrics`, and the leaves `node` (the server's name among
//! servers sharing a keyring) and `section` (what every configuration section shares).
//!
//! The `kms` binary (the command line, `kms dev` and its development PKI) is the `kms-cli`
//! crate, on top of this library and never the reverse.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

mod access;
pub mod audit;
pub mod backup;
pub mod barrier;
pub mod config;
pub(crate) mod credentials;
pub mod databases;
mod engine;
pub mod engines;
mod grpc;
pub mod hsm;
mod http;
pub mod keyring;
pub mod kubernetes;
mod metrics;
mod node;
pub mod policy;
pub mod seal;
pub mod secrets;
mod section;
pub mod server;
mod service;
pub mod store;
pub mod wire;

pub use grpc::code_name;

/// An error and its sources, joined by ": ".
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
