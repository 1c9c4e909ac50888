//! The audit record of what the server does by itself (automatic and due rotations, due
//! destructions): principal [`SYSTEM_PRINCIPAL`], service `kms.internal`. The keyring
//! names the change; this is where it becomes a record, committed with the change.

use super::{AuditEvent, AuditLog, SYSTEM_PRINCIPAL};
use crate::keyring::model::KeyMeta;
use crate::keyring::{KeyringError, SystemRecorder};
use crate::store::Write;

impl SystemRecorder for AuditLog {
    fn record(
        &self,
        operation: &'static str,
        meta: &KeyMeta,
        version: u32,
        writes: Vec<Write>,
    ) -> Result<(), KeyringError> {
        let event = AuditEvent {
            key: Some(meta.name.clone()),
            key_version: Some(version),
            ..AuditEvent::internal(SYSTEM_PRINCIPAL, "kms.internal", operation)
        };
        self.append_with(event, writes)
            .map(|_| ())
            .map_err(|_| KeyringError::AuditUnavailable)
    }
}
