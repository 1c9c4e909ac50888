//! How keyring changes become durable together with their audit record.

use super::{Grant, KeyMeta, KeyringError, Write};

/// Makes a key change durable together with the audit record of the request that made
/// it, in one transaction (see [`crate::audit`]): a change whose record cannot be written
/// is not made, and a record is never written for a change that was not.
pub trait Journal {
    /// Writes `writes` (the new record of `change`) with the audit record, or fails with
    /// [`KeyringError::AuditUnavailable`] having written neither.
    fn commit(&self, change: Change<'_>, writes: Vec<Write>) -> Result<(), KeyringError>;

    /// Called by every change of a key or grant once it holds the keyring's change lock,
    /// before it changes anything: a change made already by an earlier attempt of the same
    /// request (a retry with its idempotency key, `keyring::requests`) fails with
    /// [`KeyringError::Replayed`], and the caller answers with the first answer.
    fn admit(&self) -> Result<(), KeyringError> {
        Ok(())
    }
}

/// What a [`Journal`] commit stores.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A key's new metadata.
    Key(&'a KeyMeta),
    /// A grant, made or revoked.
    Grant(&'a Grant),
}

/// Where the changes the server makes by itself (automatic and due rotations, due
/// destructions) are recorded: in the server, the audit log (`crate::audit` implements
/// this). The keyring names the operation; the recorder writes the record.
pub trait SystemRecorder: Send + Sync {
    /// Writes `writes` (key `meta`'s new record) with the record of `operation` on
    /// `version`, or fails with [`KeyringError::AuditUnavailable`] having written neither.
    fn record(
        &self,
        operation: &'static str,
        meta: &KeyMeta,
        version: u32,
        writes: Vec<Write>,
    ) -> Result<(), KeyringError>;
}

/// The journal of what the server does by itself.
pub struct SystemJournal<'a> {
    /// Where the change's record goes.
    pub recorder: &'a dyn SystemRecorder,
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
        let version = self.version.unwrap_or(meta.primary);
        self.recorder.record(self.operation, meta, version, writes)
    }
}
