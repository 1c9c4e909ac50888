//! Master key rotation: the root key's outer layer moved from one HSM master key to another.
//!
//! The inner layer (under the unseal key) is untouched, so the shares stay valid; the HSM
//! unwraps the outer layer with the old key and wraps the same bytes with the new one, inside
//! the token, and the round trip is proved before anything is stored. The new key is named in
//! the seal record by label and CKA_ID, committed in one write with the audit record; only
//! then is the old key destroyed. A crash before the commit leaves the old key in force (the
//! new one, an unnamed object, is harmless); after it, the new one, and the old key, listed
//! as retired in the record, is destroyed at the next start. HSM-protected keyring versions
//! are token objects of their own, not wrapped by the master key: a rotation leaves them
//! as they are.

use super::wrap::aad;
use super::{
    Hsm, HsmError, HsmKeyKind, KeyHandle, OUTER_AAD, RetiredMasterKey, SealError, SealManager,
    SealRecord, ShareSetId, State, Zeroizing, check_master_key, unix_now,
};
use crate::audit::CeremonySummary;
use subtle::ConstantTimeEq;

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRotation {
    /// The master key now in force: label and CKA_ID (hex).
    pub label: String,
    /// Its CKA_ID (hex).
    pub id: String,
    /// The one it replaced: label and CKA_ID (hex; empty if it had none).
    pub previous_label: String,
    /// Its CKA_ID.
    pub previous_id: String,
    /// Whether the previous key is gone from the token already (else it is destroyed at the
    /// next start).
    pub previous_destroyed: bool,
}

impl SealManager {
    /// Moves the root key's outer layer to a new master key: generated in the token under the
    /// configured label with a new id, or `adopt`ed (an existing key, by label, made by the
    /// HSM's administrators: it must be as safe as one kms makes). The server must be
    /// unsealed.
    pub fn rotate_master_key(
        &self,
        adopt: Option<&str>,
        commit: &super::rekey::CeremonyCommit<'_>,
    ) -> Result<MasterKeyRotation, SealError> {
        self.adopt_record()?;
        let mut inner = self.lock();
        let Some(record) = inner.record.clone() else {
            return Err(SealError::NotInitialized);
        };
        if !matches!(inner.state, State::Unsealed(_)) {
            return Err(SealError::Sealed);
        }
        if let Some(p) = &record.pending_rekey {
            return Err(SealError::RekeyInProgress(
                ShareSetId::from_hex(&p.share_set_id).ok_or(SealError::CorruptRecord)?,
            ));
        }
        let old = inner.master_key.ok_or(SealError::Sealed)?;
        let old_id = self.hsm.key_id(old)?;
        let (new, label, generated) = match adopt {
            Some(label)
                if label.is_empty() || label.len() > 128 || label.chars().any(char::is_control) =>
            {
                return Err(SealError::BadLabel);
            }
            Some(label) => {
                let key = self.hsm.find_master_key_by(label, None)?;
                check_master_key(&self.hsm, key, label)?;
                if self.hsm.key_id(key)? == old_id && label == record.master_key_label {
                    return Err(SealError::SameMasterKey);
                }
                (key, label.to_owned(), false)
            }
            None => {
                let label = record.master_key_label.clone();
                (self.hsm.generate_master_key_labelled(&label)?, label, true)
            }
        };
        let result = self.move_outer_layer(&record, old, &old_id, new, &label, commit);
        if result.is_err() && generated {
            // Never named by a committed record: nothing is wrapped under it.
            let _ = self.hsm.destroy(new);
        }
        let (next, new_id) = result?;
        inner.record = Some(next);
        inner.master_key = Some(new);
        let previous_destroyed = match self.hsm.destroy(old) {
            Ok(()) => true,
            Err(e @ HsmError::NotOurs { .. }) => {
                tracing::warn!(error = %crate::error_chain(&e), "the old master key was not made by this instance: it is left in the token for its owner (or the HSM's administrators) to destroy");
                false
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "the old master key could not be destroyed now: it will be at the next start");
                false
            }
        };
        Ok(MasterKeyRotation {
            label,
            id: data_encoding::HEXLOWER.encode(&new_id),
            previous_label: record.master_key_label.clone(),
            previous_id: data_encoding::HEXLOWER.encode(&old_id),
            previous_destroyed,
        })
    }

    /// Rewraps the outer layer under `new`, proves it, commits the record naming `new`.
    fn move_outer_layer(
        &self,
        record: &SealRecord,
        old: KeyHandle,
        old_id: &[u8],
        new: KeyHandle,
        label: &str,
        commit: &super::rekey::CeremonyCommit<'_>,
    ) -> Result<(SealRecord, Vec<u8>), SealError> {
        let set = record.share_set()?;
        let outer_aad = aad(OUTER_AAD, set);
        let outer = data_encoding::HEXLOWER
            .decode(record.wrapped_root_key.as_bytes())
            .map_err(|_| SealError::CorruptRecord)?;
        let inner_blob = Zeroizing::new(self.hsm.decrypt(old, &outer_aad, &outer).map_err(
            |e| match e {
                HsmError::DecryptFailed => SealError::RootKeyUnwrap,
                other => SealError::Hsm(other),
            },
        )?);
        let rewrapped = self.hsm.encrypt(new, &outer_aad, &inner_blob)?;
        let back = Zeroizing::new(self.hsm.decrypt(new, &outer_aad, &rewrapped)?);
        if back.as_slice().ct_eq(inner_blob.as_slice()).unwrap_u8() != 1 {
            return Err(SealError::RootKeyUnwrap);
        }
        let new_id = self.hsm.key_id(new)?;
        let mut next = record.clone();
        next.wrapped_root_key = data_encoding::HEXLOWER.encode(&rewrapped);
        next.master_key_label = label.to_owned();
        next.master_key_id = Some(data_encoding::HEXLOWER.encode(&new_id));
        next.retired_master_keys.push(RetiredMasterKey {
            label: record.master_key_label.clone(),
            id: data_encoding::HEXLOWER.encode(old_id),
            retired_at: unix_now(),
        });
        let _other_servers = self.store.lock_changes()?;
        let (next, write) = self.signed_write(record, next)?;
        commit(
            CeremonySummary {
                share_set: record.share_set_id.clone(),
                step: "master-key-rotated".to_owned(),
                master_key: format!("{label}/{}", data_encoding::HEXLOWER.encode(&new_id)),
                ..CeremonySummary::default()
            },
            vec![write],
        )?;
        tracing::info!(
            label,
            "master key rotated: the root key is wrapped under the new key"
        );
        Ok((next, new_id))
    }
}

/// Destroys the master keys the (authenticated) record lists as retired that are still in
/// the token (a crash came between a rotation's commit and its destroy). Best effort:
/// logged. Even so, never the key in force (by handle, and by label and id), never a
/// keyring object or the audit or seal record key (by label), never an object without a
/// CKA_ID, and never one this instance did not make ([`Hsm::destroy`] checks the id the
/// token reports).
pub(super) fn destroy_retired(hsm: &Hsm, record: &SealRecord, in_force: KeyHandle) {
    if record.retired_master_keys.is_empty() {
        return;
    }
    // The key in force as the token knows it (one object may have several handles here).
    let in_force_id = match hsm.key_id(in_force) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "the master key in force could not be read: retired master keys are left for the next start");
            return;
        }
    };
    for retired in &record.retired_master_keys {
        let Ok(id) = data_encoding::HEXLOWER.decode(retired.id.as_bytes()) else {
            continue;
        };
        let spared = id.is_empty()
            || id == in_force_id
            || (record.master_key_id.as_deref() == Some(retired.id.as_str())
                && record.master_key_label == retired.label)
            || retired.label.starts_with(crate::keyring::HSM_LABEL_PREFIX)
            || retired
                .label
                .starts_with(crate::keyring::IMPORT_LABEL_PREFIX)
            || retired.label == record.audit_key_label
            || retired.label == super::record::record_key_label(hsm);
        if spared {
            tracing::warn!(label = %retired.label, "the seal record lists as a retired master key an object kms never destroys as one: left as it is");
            continue;
        }
        // An AES key, sensitive and never extractable, exactly one: a master key.
        let found = match hsm.find_key(
            HsmKeyKind::Aes256,
            crate::hsm::Provenance::Either,
            &retired.label,
            Some(&id),
        ) {
            Ok(Some(key)) => key,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(label = %retired.label, error = %crate::error_chain(&e), "a master key a rotation retired was not destroyed");
                continue;
            }
        };
        match hsm.destroy(found) {
            Ok(()) => {
                tracing::info!(label = %retired.label, "a master key a rotation retired was destroyed")
            }
            Err(e) => {
                tracing::warn!(label = %retired.label, error = %crate::error_chain(&e), "a master key a rotation retired could not be destroyed")
            }
        }
    }
}
