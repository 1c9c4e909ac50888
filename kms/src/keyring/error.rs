//! Why a keyring operation failed.

use super::{HsmError, StoreError};

/// Why a keyring operation failed. Never carries key material, plaintext or associated
/// data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The key name is not `[a-zA-Z0-9_.-]{1,128}`.
    #[error("invalid key name: use 1 to 128 of the characters a-z A-Z 0-9 _ . -")]
    BadName,
    /// Bad labels.
    #[error(
        "invalid labels: at most 64, keys of 1..=63 characters a-z A-Z 0-9 _ . -, values up to 256 characters"
    )]
    BadLabels,
    /// A malformed or out-of-range request field.
    #[error("{0}")]
    BadRequest(&'static str),
    /// Input larger than allowed.
    #[error("{what} is {size} bytes, more than the {max} allowed{hint}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
        /// What to do instead.
        hint: &'static str,
    },
    /// Too many items in a batch.
    #[error("the batch has {count} items, more than the {max} allowed")]
    TooManyItems {
        /// Items given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A batch whose answer could be larger than a gRPC client receives by default, bounded
    /// from its items before any of them is done.
    #[error(
        "the answer to this batch could be {bound} bytes, more than the {max} a batch answer may be (gRPC clients receive 4 MiB by default): send fewer or smaller items (docs/api.md, \"Batch limits\")"
    )]
    BatchTooLarge {
        /// The bound on the answer's encoded size, from the items.
        bound: usize,
        /// The limit.
        max: usize,
    },
    /// A key of that name exists.
    #[error("a key named {0:?} already exists")]
    AlreadyExists(String),
    /// No key of that name.
    #[error("no key named {0:?}")]
    NotFound(String),
    /// No such version.
    #[error("key {name:?} has no version {version}")]
    VersionNotFound {
        /// The key.
        name: String,
        /// The version the request named.
        version: u32,
    },
    /// The operation does not fit the key's purpose.
    #[error("key {name:?} is for {purpose}, not for {operation}")]
    WrongPurpose {
        /// The key.
        name: String,
        /// Its purpose.
        purpose: &'static str,
        /// What was asked.
        operation: &'static str,
    },
    /// The version is not enabled.
    #[error("version {version} of key {name:?} is {state}")]
    VersionNotEnabled {
        /// The key.
        name: String,
        /// The version the request named.
        version: u32,
        /// Its state.
        state: &'static str,
    },
    /// The version is below the key's minimum decryption version.
    #[error("version {version} of key {name:?} is below its min_decryption_version {min}")]
    BelowMinimum {
        /// The key.
        name: String,
        /// The version the request named.
        version: u32,
        /// The minimum.
        min: u32,
    },
    /// A state change that is not allowed.
    #[error("{0}")]
    NotAllowed(&'static str),
    /// An EXTERNAL key with no version yet.
    #[error(
        "key {0:?} has no key material yet (origin EXTERNAL): import it first (GetImportParameters, ImportKeyMaterial; kms key import)"
    )]
    PendingImport(String),
    /// Decryption failed: tampering, wrong key, or wrong associated data. Deliberately
    /// says nothing more.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The version's nonce budget is spent (rotation did not happen).
    #[error(
        "version {version} of key {name:?} has encrypted its maximum number of messages: rotate the key (an EXTERNAL key: import new material)"
    )]
    Exhausted {
        /// The key.
        name: String,
        /// The version the request named.
        version: u32,
    },
    /// The key's stored metadata failed authentication: the store was edited.
    #[error(
        "the stored metadata of key {0:?} failed authentication (the store was altered): the key is refused"
    )]
    Tampered(String),
    /// An HSM key's object is not in the token.
    #[error("the HSM object of this key version is missing from the token")]
    HsmKeyMissing,
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another server changed this key (or a grant on it), and this server has not been
    /// able to apply the change yet: the key is refused here until it has.
    #[error(
        "key {0:?} is unavailable on this server until it has applied a change another server made to it"
    )]
    KeyBehind(String),
    /// This server has not been able to apply every change other servers made, and cannot
    /// tell which keys they concern: every key is refused here until it has.
    #[error(
        "this server is behind the shared store (changes other servers made are not applied yet): keys are unavailable here until it catches up"
    )]
    Behind,
    /// The OS random source failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The request's audit record could not be written: nothing was done.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// The change was made already, by an earlier attempt with the same idempotency key:
    /// the caller answers with that attempt's answer ([`super::Journal::admit`]). Never an
    /// answer itself.
    #[error("the change was made by an earlier attempt with the same idempotency key")]
    Replayed,
    /// The caller's idempotency key names an earlier change of another operation or request.
    #[error(
        "this idempotency-key was used by another request of this caller in the last 24 hours: use a new key for a new change (a retry must send the same request)"
    )]
    IdempotencyKeyReused,
    /// No live grant with that id.
    #[error("no grant with id {0:?} (it may have been revoked already)")]
    GrantNotFound(String),
    /// A grant's principal pattern is not one.
    #[error(transparent)]
    BadPattern(#[from] crate::policy::PatternError),
}
