//! Key material made before the admin lock is taken.
//!
//! Generating a key can take seconds: an RSA-4096 key took SoftHSM 0.4 to 5 s on the
//! project's machine (prime search is random), the `rsa` crate as long, and a network HSM
//! may take longer. Made under the keyring's admin lock,
//! every other administrative change, the maintenance run and an encryption that must
//! reserve its next nonce range would wait for it. So a new version's material (and an
//! import job's wrapping key) is made first, from a snapshot of the key, and only checked,
//! sealed and committed under the lock. If the key moved on meanwhile (another rotation
//! took the version number), what was made is thrown away (a token object destroyed) and
//! made again under the lock.

use super::{
    Algorithm, Hsm, KeyHandle, Keyring, KeyringError, Origin, Protection, Public, Zeroizing,
    hsm_kind, hsm_label, material, pending_label,
};

/// A token object made for a change not yet committed. Dropped without being taken, it is
/// destroyed, so that a refused or abandoned change leaves nothing behind in the token.
pub(super) struct HsmObject<'h> {
    hsm: &'h Hsm,
    label: String,
    id: Vec<u8>,
    handle: Option<KeyHandle>,
    public: Option<Vec<u8>>,
}

impl<'h> HsmObject<'h> {
    /// Generates an `algorithm` key in the token, labelled `label` with a fresh CKA_ID, and
    /// checks that the public key the token returns (if any) parses for `algorithm`.
    pub(super) fn generate(
        hsm: &'h Hsm,
        algorithm: Algorithm,
        label: String,
    ) -> Result<Self, KeyringError> {
        let id = hsm.new_object_id()?;
        // Marked pending before it exists: a crash from here to the commit leaves an object
        // the sweep may destroy, and nothing else ever is.
        hsm.create_marker(&pending_label(&id))?;
        let (handle, public) = match hsm.generate_key(hsm_kind(algorithm), &label, &id) {
            Ok(made) => made,
            Err(e) => {
                let _ = hsm.remove_markers(&pending_label(&id));
                return Err(e.into());
            }
        };
        let object = HsmObject {
            hsm,
            label,
            id,
            handle: Some(handle),
            public,
        };
        // Check the token's bytes parse as a public key before we rely on them (dropped
        // here, the object is destroyed).
        if let Some(p) = &object.public
            && Public::from_bytes(algorithm, p).is_none()
        {
            return Err(KeyringError::Internal("HSM public key"));
        }
        Ok(object)
    }

    /// Its label (which names the key id and version it was made for).
    pub(super) fn label(&self) -> &str {
        &self.label
    }

    /// Its CKA_ID.
    pub(super) fn id(&self) -> &[u8] {
        &self.id
    }

    /// Its public key, if it has one (SubjectPublicKeyInfo DER for RSA, the point or key
    /// bytes otherwise; checked to parse for its algorithm).
    pub(super) fn public(&self) -> Option<&[u8]> {
        self.public.as_deref()
    }

    /// Hands the object over to the record that names it (read its label, id and public
    /// key first): no longer destroyed on drop. The handle returned is destroyed by
    /// [`Keyring::commit_new_version`] if the commit is refused.
    pub(super) fn take(mut self) -> Result<KeyHandle, KeyringError> {
        self.handle
            .take()
            .ok_or(KeyringError::Internal("HSM object taken twice"))
    }
}

impl Drop for HsmObject<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            match self.hsm.destroy(h) {
                Ok(()) => {
                    let _ = self.hsm.remove_markers(&pending_label(&self.id));
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "could not destroy an HSM object made for a change that did not happen: the next unseal sweeps or reports it");
                }
            }
        }
    }
}

/// A new version's material, made before the lock (see the module's documentation).
pub(super) enum Pregenerated<'h> {
    /// Nothing made in advance: derived SOFTWARE keys cost nothing, and the version is made
    /// whole under the lock.
    Nothing,
    /// A SOFTWARE RSA key: its PKCS#8 DER (sealed under the lock) and public key.
    SoftwareRsa(Algorithm, Zeroizing<Vec<u8>>, Public),
    /// An HSM key's token object, labelled for the version it was made for.
    Hsm(HsmObject<'h>),
}

impl<'h> Pregenerated<'h> {
    /// Makes what version `version` of the key `key_id` (an `algorithm` key at
    /// `protection`) needs.
    pub(super) fn make(
        hsm: &'h Hsm,
        algorithm: Algorithm,
        protection: Protection,
        key_id: &str,
        version: u32,
    ) -> Result<Self, KeyringError> {
        Ok(match protection {
            Protection::Hsm => Pregenerated::Hsm(HsmObject::generate(
                hsm,
                algorithm,
                hsm_label(key_id, version),
            )?),
            Protection::Software if algorithm.rsa().is_some() => {
                let (der, public) = material::generate_rsa(algorithm)?;
                Pregenerated::SoftwareRsa(algorithm, der, public)
            }
            Protection::Software => Pregenerated::Nothing,
        })
    }
}

impl Keyring {
    /// What the next version of the key called `name` needs, made in advance from the key
    /// as this server last saw it. Nothing if there is no such key or it gets versions only
    /// by import: the change then fails under the lock with the usual error.
    pub(super) fn pregenerate(&self, name: &str) -> Result<Pregenerated<'_>, KeyringError> {
        let Ok(e) = self.fetch(name) else {
            return Ok(Pregenerated::Nothing);
        };
        let meta = &e.meta;
        match meta.next_version() {
            Ok(next) if meta.origin == Origin::Generated => Pregenerated::make(
                &self.hsm,
                meta.algorithm,
                meta.protection,
                &meta.key_id,
                next,
            ),
            _ => Ok(Pregenerated::Nothing),
        }
    }
}
