//! What can go wrong in the databases engine. No message holds a password.

use crate::store::StoreError;

/// An error of the databases engine.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DatabasesError {
    /// The request cannot be served as asked (what is wrong, never a password).
    #[error("{0}")]
    BadRequest(String),
    /// No connection of this name.
    #[error("no database connection {0:?}")]
    ConnectionNotFound(String),
    /// No role of this name.
    #[error("no database role {0:?}")]
    RoleNotFound(String),
    /// No lease of this id.
    #[error("no lease {0:?}")]
    LeaseNotFound(String),
    /// The caller may not ask this role, or act on this lease.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The request is refused in the state things are in (a role the connection does not
    /// allow, live leases, an expired lease).
    #[error("{0}")]
    Precondition(String),
    /// Another server (or call) is revoking, renewing or rotating this now.
    #[error("{0:?} is being revoked, renewed or rotated now: try again")]
    Busy(String),
    /// No connection to the database could be made: nothing was sent.
    #[error("the database of connection {connection:?} cannot be reached: {why}")]
    Unreachable {
        /// The connection.
        connection: String,
        /// Why (never the URL's credentials).
        why: String,
    },
    /// The connection was lost, or the database did not answer in time, after statements
    /// were sent: what they did is not known.
    #[error("the database of connection {connection:?} is unavailable: {why}")]
    Unavailable {
        /// The connection.
        connection: String,
        /// Why (never the URL's credentials).
        why: String,
    },
    /// The database refused a statement (its code and message, with any password in it
    /// replaced).
    #[error("the database refused: {0}")]
    Refused(String),
    /// A stored record did not open or parse: someone other than kms wrote it.
    #[error("a stored record of the databases engine is not authentic ({0}): refused")]
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
