//! What can go wrong in the secrets engine. No message holds a value, a custom metadata
//! value or a name of a value: paths and version numbers only.

use crate::store::StoreError;

/// An error of the secrets engine.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretsError {
    /// The path is not one (docs/secrets.md, "Paths").
    #[error("invalid secret path: {0}")]
    BadPath(&'static str),
    /// A grant's path pattern is not one.
    #[error("invalid path pattern: {0}")]
    BadPattern(String),
    /// The request cannot be served as asked (what is wrong, never a value).
    #[error("{0}")]
    BadRequest(String),
    /// A version's values are larger than `[secrets] max_secret_bytes`.
    #[error(
        "the secret's values are {size} bytes, more than the {max} allowed ([secrets] max_secret_bytes): nothing was written"
    )]
    TooLarge {
        /// Their size (names and values).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A patch would make a version larger than `[secrets] max_secret_bytes` (its size is
    /// not told: it would tell a caller who may not read the secret the size of its values).
    #[error(
        "the patched version would be more than the {max} bytes allowed ([secrets] max_secret_bytes): nothing was written"
    )]
    PatchTooLarge {
        /// The limit.
        max: usize,
    },
    /// The engine's settings are missing from the store or do not open, and a change of
    /// them did not give every one (the defaults are not taken for what was lost).
    #[error(
        "the secrets engine's settings are missing from the store or damaged: set max_versions, cas_required and delete_version_after, all three at once"
    )]
    SettingsLost,
    /// The secret or the engine requires check-and-set, and the write gave none.
    #[error(
        "check-and-set parameter required for this call (cas_required is set on this secret or on the engine): nothing was written"
    )]
    CasRequired,
    /// The check-and-set version is not the current one.
    #[error(
        "check-and-set parameter did not match the current version ({current}; 0 when the secret is absent or has no version left to read): nothing was written"
    )]
    CasMismatch {
        /// The current version.
        current: u64,
    },
    /// No secret (no metadata) at this path.
    #[error("no secret at this path")]
    NotFound,
    /// The version asked for does not exist (never written, or removed past max_versions).
    #[error("version {0} of this secret does not exist")]
    VersionNotFound(u64),
    /// The version is deleted (soft: it can be undeleted).
    #[error("version {0} of this secret is deleted: undelete it to read it")]
    VersionDeleted(u64),
    /// The version's values are destroyed.
    #[error("version {0} of this secret is destroyed")]
    VersionDestroyed(u64),
    /// A patch on a secret whose current version cannot be read.
    #[error(
        "the current version of this secret is deleted or destroyed, or it has none: a patch needs one to apply to (write the secret instead)"
    )]
    NothingToPatch,
    /// A metadata change would drop versions, and the caller may not destroy them.
    #[error(
        "permission denied: this max_versions drops {0} versions of the secret, which needs a secret-destroy grant on its path too: nothing was changed"
    )]
    DropNeedsDestroy(usize),
    /// No such grant.
    #[error("no secret grant {0:?}")]
    GrantNotFound(String),
    /// A stored record did not open or parse: someone other than kms wrote it.
    #[error("a stored record of the secrets engine is not authentic ({0}): refused")]
    Tampered(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The audit record of a change could not be written: the change was not made.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Randomness,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
