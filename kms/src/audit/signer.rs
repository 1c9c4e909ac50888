//! The audit signing key in the HSM: checkpoints and export seals.

use super::{
    Arc, AuditError, Checkpoint, Head, Hsm, HsmKeyKind, KeyHandle, Mutex, fingerprint, now_ms,
    report,
};

/// The audit signing key: an Ed25519 key in the HSM, known once the server is initialised
/// and logged in. The writer thread signs with it; nothing else takes this lock, so a
/// caller that holds another lock while waiting for its record cannot deadlock the writer.
pub struct Signer {
    hsm: Option<Arc<Hsm>>,
    key: Mutex<Option<(KeyHandle, Vec<u8>)>>,
    /// Set at start-up when the chain's tail does not connect: nothing is signed then.
    refused: Mutex<Option<(u64, u64)>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer with no key yet.
    pub fn new(hsm: Arc<Hsm>) -> Self {
        Self {
            hsm: Some(hsm),
            key: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// A signer that never signs (benchmarks and tests of the chain alone).
    pub fn disabled() -> Self {
        Self {
            hsm: None,
            key: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// Sets (or forgets) the key: its handle and raw 32-byte public key.
    pub fn set(&self, key: Option<(KeyHandle, Vec<u8>)>) {
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = key;
    }

    /// The public key, when the key is known.
    pub fn public_key(&self) -> Option<Vec<u8>> {
        self.key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, p)| p.clone())
    }

    /// Refuses every signature from now on: the chain's tail does not connect to
    /// `checkpoint` from record `seq` on.
    pub(super) fn refuse(&self, checkpoint: u64, seq: u64) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some((checkpoint, seq));
    }

    /// Signs `message` with the key: `None` when the key is not available now (before
    /// init, or sealed with the PIN in the shares); an error when signing is refused.
    fn sign(&self, message: &[u8]) -> Option<Result<(Vec<u8>, String), AuditError>> {
        let hsm = self.hsm.as_ref()?;
        let (handle, public) = self.key.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        if let Some((checkpoint, seq)) = *self.refused.lock().unwrap_or_else(|p| p.into_inner()) {
            return Some(Err(AuditError::TailBroken { checkpoint, seq }));
        }
        Some(
            hsm.sign(HsmKeyKind::Ed25519, handle, message)
                .map_err(AuditError::Sign)
                .map(|sig| (sig, fingerprint(&public))),
        )
    }

    /// Signs a checkpoint over `head` (see [`Signer::sign`] for `None`).
    pub(super) fn checkpoint(&self, head: &Head) -> Option<Result<Checkpoint, AuditError>> {
        let public = self.public_key()?;
        let time_ms = now_ms();
        let key_fingerprint = fingerprint(&public);
        let message = Checkpoint::message(head.seq, &head.hash, time_ms, &key_fingerprint);
        Some(self.sign(&message)?.map(|(sig, _)| Checkpoint {
            checkpoint: head.seq,
            head: head.hash.clone(),
            time_ms,
            key_fingerprint,
            signature: data_encoding::HEXLOWER.encode(&sig),
        }))
    }

    /// Signs a backup's digest message (`kms::backup`); returns the signature and the key's
    /// fingerprint. `None` when the key is not available now.
    pub(crate) fn sign_backup(
        &self,
        message: &[u8],
    ) -> Option<Result<(Vec<u8>, String), AuditError>> {
        self.sign(message)
    }

    /// Seals an export: signs `range` (whose `key_fingerprint` it fills in). `None` when
    /// the key is not available now.
    pub(crate) fn seal_export(
        &self,
        mut range: report::ExportRange,
    ) -> Option<Result<report::ExportSeal, AuditError>> {
        range.key_fingerprint = fingerprint(&self.public_key()?);
        Some(
            self.sign(&range.message())?
                .map(|(sig, _)| report::ExportSeal {
                    export_seal: range,
                    signature: data_encoding::HEXLOWER.encode(&sig),
                }),
        )
    }
}
