//! The gRPC edge: protobuf types in, domain calls, protobuf types out.
//!
//! Architecture invariant: this module is the one place where errors become
//! `tonic::Status` ([`to_status`]), and the one place in `kms` where protobuf types are
//! built or read. The log line for every call is written here: the RPC, the key, the
//! outcome and the error's chain, never a request or response body.

mod keys;
mod system;

pub use keys::KeyManagementService;
pub use system::SystemService;

use std::sync::Arc;

use tonic::{Code, Status};

use crate::keyring::{Keyring, KeyringError};
use crate::seal::{SealError, SealManager};

/// Any error a service can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// From the seal.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// From the keyring.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

/// The gRPC code of an error: `FAILED_PRECONDITION` for lifecycle and state (sealed,
/// uninitialised, wrong purpose, version not enabled), `INVALID_ARGUMENT` for bad input
/// (including the opaque "decryption failed"), `NOT_FOUND`, `ALREADY_EXISTS`,
/// `RESOURCE_EXHAUSTED`, `UNAVAILABLE` for HSM and store faults, `DATA_LOSS` for a store
/// that was altered or is corrupt.
pub fn code_of(err: &ApiError) -> Code {
    match err {
        ApiError::Seal(e) => seal_code(e),
        ApiError::Keyring(e) => keyring_code(e),
    }
}

fn seal_code(e: &SealError) -> Code {
    match e {
        SealError::NotInitialized
        | SealError::AlreadyInitialized
        | SealError::Sealed
        | SealError::AttemptMismatch
        | SealError::UnsafeMasterKey(_)
        | SealError::SharesPinRejected(_)
        | SealError::PinModeMismatch { .. } => Code::FailedPrecondition,
        SealError::BadParameters(_)
        | SealError::MalformedShare(_)
        | SealError::WrongShareSet { .. }
        | SealError::WrongThreshold { .. }
        | SealError::DuplicateShare { .. }
        | SealError::WrongQuorum
        | SealError::PinRequired
        | SealError::PinNotExpected
        | SealError::InitPinRejected(_) => Code::InvalidArgument,
        SealError::RootKeyUnwrap | SealError::CorruptRecord => Code::DataLoss,
        SealError::Keyring(k) => keyring_code(k),
        SealError::Hsm(_) | SealError::Store(_) | SealError::Randomness => Code::Unavailable,
    }
}

fn keyring_code(e: &KeyringError) -> Code {
    match e {
        KeyringError::BadName
        | KeyringError::BadLabels
        | KeyringError::BadRequest(_)
        | KeyringError::TooLarge { .. }
        | KeyringError::TooManyItems { .. }
        | KeyringError::DecryptionFailed => Code::InvalidArgument,
        KeyringError::AlreadyExists(_) => Code::AlreadyExists,
        KeyringError::NotFound(_) | KeyringError::VersionNotFound { .. } => Code::NotFound,
        KeyringError::WrongPurpose { .. }
        | KeyringError::VersionNotEnabled { .. }
        | KeyringError::BelowMinimum { .. }
        | KeyringError::NotAllowed(_) => Code::FailedPrecondition,
        KeyringError::Exhausted { .. } => Code::ResourceExhausted,
        KeyringError::Tampered(_) | KeyringError::HsmKeyMissing => Code::DataLoss,
        KeyringError::Hsm(_) | KeyringError::Store(_) | KeyringError::Randomness => {
            Code::Unavailable
        }
        KeyringError::Internal(_) => Code::Internal,
    }
}

/// The status a caller sees: the code, and the error's own message (never a secret; an
/// internal error says only "internal error").
pub fn to_status(err: &ApiError) -> Status {
    let code = code_of(err);
    let message = match code {
        Code::Unavailable => format!("unavailable: {err}"),
        Code::Internal => "internal error".to_owned(),
        _ => err.to_string(),
    };
    Status::new(code, message)
}

/// Writes the error and its whole source chain (PKCS#11 return codes included) to the log.
fn log_error(rpc: &'static str, key: &str, err: &ApiError, code: Code) {
    let chain = crate::error_chain(err);
    if matches!(code, Code::Unavailable | Code::DataLoss | Code::Internal) {
        tracing::error!(rpc, key, code = ?code, error = %chain, "request failed");
    } else {
        tracing::warn!(rpc, key, code = ?code, error = %chain, "request refused");
    }
}

/// Runs a blocking call off the async runtime, logs its outcome, maps its error.
async fn run<T: Send + 'static>(
    rpc: &'static str,
    key: String,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, Status> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Status::internal("internal error"))?;
    match result {
        Ok(v) => {
            tracing::info!(rpc, key = %key, code = "OK", "request served");
            Ok(v)
        }
        Err(e) => {
            let code = code_of(&e);
            log_error(rpc, &key, &e, code);
            Err(to_status(&e))
        }
    }
}

/// Runs `f` on the keyring (or fails with sealed / not initialised).
async fn with_keyring<T: Send + 'static>(
    seal: &Arc<SealManager>,
    rpc: &'static str,
    key: &str,
    f: impl FnOnce(&Keyring) -> Result<T, KeyringError> + Send + 'static,
) -> Result<T, Status> {
    let seal = Arc::clone(seal);
    run(rpc, key.to_owned(), move || {
        let keyring = seal.keyring()?;
        Ok(f(&keyring)?)
    })
    .await
}
