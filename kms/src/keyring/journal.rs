//! How keyring changes become durable together with their audit record.

use super::*;

/// Makes a key change durable together with the audit record of the request that made
/// it, in one transaction (see [`crate::audit`]): a change whose record cannot be written
/// is not made, and a record is never written for a change that was not.
pub trait Journal {
    /// Writes `writes` (the new record of `change`) with the audit record, or fails with
    /// [`KeyringError::AuditUnavailable`] having written neither.
    fn commit(&self, change: Change<'_>, writes: Vec<Write>) -> Result<(), KeyringError>;
}

/// What a [`Journal`] commit stores.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A key's new metadata.
    Key(&'a KeyMeta),
    /// A grant, made or revoked.
    Grant(&'a Grant),
}

/// The journal of what the server does by itself: records under principal
/// `crate::audit::SYSTEM_PRINCIPAL`, service `kms.internal`.
pub struct SystemJournal<'a> {
    /// Where the change's audit record goes.
    pub log: &'a AuditLog,
    /// The operation, e.g. `AutoRotateKey`.
    pub operation: &'static str,
    /// The version it concerns (the new primary when `None`).
    pub version: Option<u32>,
}

impl Journal for SystemJournal<'_> {
    fn commit(&self, change: Change<'_>, writes: Vec<Write>) -> Result<(), KeyringError> {
        let Change::Key(meta) = change else {
            return Err(KeyringError::Internal(
                "the server changes no grant by itself",
            ));
        };
        let event = crate::audit::AuditEvent {
            key: Some(meta.name.clone()),
            key_version: Some(self.version.unwrap_or(meta.primary)),
            ..crate::audit::AuditEvent::internal(
                crate::audit::SYSTEM_PRINCIPAL,
                "kms.internal",
                self.operation,
            )
        };
        self.log
            .append_with(event, writes)
            .map(|_| ())
            .map_err(|_| KeyringError::AuditUnavailable)
    }
}
