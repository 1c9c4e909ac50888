//! The crypto operations on keys: encrypt (with the nonce budget), decrypt, re-encrypt,
//! data keys, sign, verify, public keys, MAC.

use super::{
    Arc, DATA_KEY_LENGTHS, DataKey, KeyEntry, Keyring, KeyringError, LOCK, MAX_AAD, MAX_MESSAGE,
    MAX_PLAINTEXT, MAX_RSA_CIPHERTEXT, Ordering, Origin, Pregenerated, Purpose, Secret, SignInput,
    SignatureEncoding, SystemJournal, VersionMaterial, Zeroizing, check_size, ciphertext,
    counter_key, lifecycle, purpose_name, random,
};
use lifecycle::{Exhausted, VersionUse, budget_step};

/// What `ReEncrypt` made: the new ciphertext, the version that made it, and the version
/// that had made the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReEncrypted {
    /// The new ciphertext.
    pub ciphertext: Vec<u8>,
    /// The destination key's version that made it.
    pub version: u32,
    /// The source key's version that had made the old ciphertext.
    pub source_version: u32,
}

impl Keyring {
    /// Whether `name` is an HSM key this keyring holds, so that every crypto call on it is a
    /// PKCS#11 call: the server runs those on the HSM's threads ([`Keyring::hsm`]).
    /// A key not read yet answers false: its first use reads the store, on a blocking
    /// thread (as [`Keyring::runs_in_process`] says).
    pub(crate) fn is_hsm_key(&self, name: &str) -> bool {
        matches!(
            self.keys.peek(name),
            Some(super::cache::Cached::Found(e)) if e.meta.protection == super::model::Protection::Hsm
        ) && self.grants_cached(name)
    }

    /// The HSM this keyring's HSM keys live in.
    pub(crate) fn hsm(&self) -> &Arc<crate::hsm::Hsm> {
        &self.hsm
    }

    /// The entry, checked for purpose.
    fn entry_for(
        &self,
        name: &str,
        purpose: Purpose,
        operation: &'static str,
    ) -> Result<Arc<KeyEntry>, KeyringError> {
        let e = self.fetch(name)?;
        if e.meta.versions.is_empty() {
            return Err(KeyringError::PendingImport(name.to_owned()));
        }
        if e.meta.purpose != purpose {
            return Err(KeyringError::WrongPurpose {
                name: name.to_owned(),
                purpose: purpose_name(e.meta.purpose),
                operation,
            });
        }
        Ok(e)
    }

    /// The material of `version`, which must be enabled (and, to read existing data, at or
    /// above the minimum decryption version).
    fn usable(
        e: &KeyEntry,
        version: u32,
        purpose: VersionUse,
    ) -> Result<&Arc<VersionMaterial>, KeyringError> {
        e.meta.check_use(version, purpose)?;
        e.versions
            .get(&version)
            .ok_or(KeyringError::Internal("material"))
    }

    /// The secret of a usable version (see [`Keyring::usable`]).
    fn secret<'e>(
        &self,
        e: &'e KeyEntry,
        version: u32,
        purpose: VersionUse,
    ) -> Result<&'e Secret, KeyringError> {
        Self::usable(e, version, purpose)?
            .secret(&self.barrier, &e.meta, version)?
            .ok_or(KeyringError::Internal("no secret"))
    }

    /// Takes one message from the primary version's nonce budget; rotates at 3/4 of it.
    /// Returns whether this call rotated the key (the caller then uses the new primary).
    fn take_nonce_budget(&self, e: &KeyEntry) -> Result<bool, KeyringError> {
        let version = e.meta.primary;
        let m = Self::usable(e, version, VersionUse::Make)?;
        let max = self.settings.max_messages_per_version;
        let n = m.counter.fetch_add(1, Ordering::SeqCst);
        let step = budget_step(n, m.reserved.load(Ordering::SeqCst), max).map_err(|Exhausted| {
            KeyringError::Exhausted {
                name: e.meta.name.clone(),
                version,
            }
        })?;
        if step.reserve.is_some() {
            // On a shared store the change lock across servers; on one only this server
            // writes, the version's own lock, so that keys used for the first time together
            // reserve together (`keyring::reserve`) instead of one after another.
            let (_shared, _local) = if self.store.shared() {
                (Some(self.admin()?), None)
            } else {
                let local = m
                    .reserving
                    .lock()
                    .map_err(|_| KeyringError::Internal(LOCK))?;
                (None, Some(local))
            };
            // Another call may have reserved past `n` while this one waited for the lock.
            let reserved = m.reserved.load(Ordering::SeqCst);
            if let Some(new) = budget_step(n, reserved, max).ok().and_then(|s| s.reserve) {
                let (start, end) = self.reservations.reserve(
                    self.store.as_ref(),
                    &counter_key(&e.meta.name, version),
                    new - reserved,
                    max,
                )?;
                // Servers sharing the store reserved `reserved..start` meanwhile: skip it.
                // The calls that counted past `reserved` while this one waited are then
                // the first of the new range.
                if start > reserved {
                    m.counter.fetch_add(start - reserved, Ordering::SeqCst);
                }
                m.reserved.store(end, Ordering::SeqCst);
                if end <= n.max(start) {
                    return Err(KeyringError::Exhausted {
                        name: e.meta.name.clone(),
                        version,
                    });
                }
            }
        }
        if step.rotate && e.meta.origin == Origin::External {
            // kms cannot make material for an EXTERNAL key: the customer must import more
            // before the budget is spent (then encryption is refused, RESOURCE_EXHAUSTED).
            tracing::warn!(
                key = %e.meta.name,
                version,
                "an EXTERNAL key's version has used three quarters of its message budget: import new material (kms key import) before it is spent"
            );
            return Ok(false);
        }
        if step.rotate {
            let _g = self.admin()?;
            let journal = SystemJournal {
                recorder: &*self.recorder,
                operation: "AutoRotateKey",
                version: None,
            };
            // Only AES keys have a budget: nothing to make in advance.
            let meta =
                self.rotate_locked(&e.meta.name, Some(version), Pregenerated::Nothing, &journal)?;
            return Ok(meta.primary != version);
        }
        Ok(false)
    }

    /// Encrypts under the primary version. Returns the ciphertext and the version.
    pub fn encrypt(
        &self,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        check_size(
            "the plaintext",
            plaintext.len(),
            MAX_PLAINTEXT,
            ": encrypt larger data locally under a data key from GenerateDataKey",
        )?;
        check_size("the associated data", aad.len(), MAX_AAD, "")?;
        let mut e = self.entry_for(name, Purpose::EncryptDecrypt, "encryption")?;
        if self.take_nonce_budget(&e)? {
            // This call rotated the key: encrypt under the new primary version.
            e = self.entry(name)?;
            self.take_nonce_budget(&e)?;
        }
        let version = e.meta.primary;
        let secret = self.secret(&e, version, VersionUse::Make)?;
        let nonce = random::<{ ciphertext::NONCE_LEN }>()?;
        let header = ciphertext::header(version);
        // Build the output once: header | nonce, then the ciphertext is made in place.
        let mut out = Vec::with_capacity(ciphertext::OVERHEAD + plaintext.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        secret.encrypt_into(
            Some(&self.hsm),
            &nonce,
            &ciphertext::gcm_aad(&header, name, aad),
            plaintext,
            &mut out,
        )?;
        Ok((out, version))
    }

    /// Decrypts with the version the ciphertext names.
    pub fn decrypt(
        &self,
        name: &str,
        ct: &[u8],
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, u32), KeyringError> {
        check_size(
            "the ciphertext",
            ct.len(),
            MAX_PLAINTEXT + ciphertext::OVERHEAD,
            "",
        )?;
        check_size("the associated data", aad.len(), MAX_AAD, "")?;
        let mut e = self.entry_for(name, Purpose::EncryptDecrypt, "decryption")?;
        let parsed = ciphertext::parse(ct).map_err(|_| KeyringError::DecryptionFailed)?;
        // A version made a moment ago by another server sharing the store: look it up.
        if e.meta.version(parsed.version).is_none()
            && self.store.shared()
            && parsed.version > e.meta.versions.iter().map(|v| v.version).max().unwrap_or(0)
        {
            self.reload_key(name)?;
            e = self.entry_for(name, Purpose::EncryptDecrypt, "decryption")?;
        }
        // An unknown version is indistinguishable from tampering.
        if e.meta.version(parsed.version).is_none() {
            return Err(KeyringError::DecryptionFailed);
        }
        let secret = self.secret(&e, parsed.version, VersionUse::Read)?;
        let pt = secret.decrypt(
            Some(&self.hsm),
            &parsed.nonce,
            &ciphertext::gcm_aad(&parsed.header, name, aad),
            parsed.body,
        )?;
        Ok((pt, parsed.version))
    }

    /// Decrypts with `name` and encrypts under `destination` (or `name`)'s primary version,
    /// without returning the plaintext.
    pub fn reencrypt(
        &self,
        name: &str,
        ct: &[u8],
        aad: &[u8],
        destination: Option<&str>,
    ) -> Result<ReEncrypted, KeyringError> {
        let (pt, source_version) = self.decrypt(name, ct, aad)?;
        let (ciphertext, version) = self.encrypt(destination.unwrap_or(name), &pt, aad)?;
        Ok(ReEncrypted {
            ciphertext,
            version,
            source_version,
        })
    }

    /// A random data key, and its ciphertext under `name`.
    pub fn generate_data_key(
        &self,
        name: &str,
        length: usize,
        aad: &[u8],
    ) -> Result<DataKey, KeyringError> {
        if !DATA_KEY_LENGTHS.contains(&length) {
            return Err(KeyringError::BadRequest(
                "length_bytes must be a key's size: 16, 24, 32 or 64 bytes (0 means 32)",
            ));
        }
        let mut dk = Zeroizing::new(vec![0u8; length]);
        getrandom::fill(dk.as_mut_slice()).map_err(|_| KeyringError::Randomness)?;
        let (ct, version) = self.encrypt(name, &dk, aad)?;
        Ok((dk, ct, version))
    }

    /// Signs with the primary version.
    pub fn sign(
        &self,
        name: &str,
        input: SignInput<'_>,
        encoding: SignatureEncoding,
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        self.sign_version(name, 0, input, encoding)
    }

    /// Signs with `version` (0: the primary), which must be enabled.
    pub fn sign_version(
        &self,
        name: &str,
        version: u32,
        input: SignInput<'_>,
        encoding: SignatureEncoding,
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        if let SignInput::Message(m) = input {
            check_size(
                "the message",
                m.len(),
                MAX_MESSAGE,
                ": sign its SHA-256 digest instead (ECDSA)",
            )?;
        }
        let e = self.entry_for(name, Purpose::SignVerify, "signing")?;
        let version = Self::version_or_primary(&e, version);
        let secret = self.secret(&e, version, VersionUse::Make)?;
        Ok((secret.sign(Some(&self.hsm), input, encoding)?, version))
    }

    fn version_or_primary(e: &KeyEntry, version: u32) -> u32 {
        if version == 0 {
            e.meta.primary
        } else {
            version
        }
    }

    /// Verifies a signature made by `version` (0: the primary).
    pub fn verify(
        &self,
        name: &str,
        version: u32,
        input: SignInput<'_>,
        signature: &[u8],
    ) -> Result<bool, KeyringError> {
        if let SignInput::Message(m) = input {
            check_size("the message", m.len(), MAX_MESSAGE, "")?;
        }
        let e = self.entry_for(name, Purpose::SignVerify, "verification")?;
        let m = Self::usable(&e, Self::version_or_primary(&e, version), VersionUse::Read)?;
        m.public
            .as_ref()
            .ok_or(KeyringError::Internal("no public key"))?
            .verify(input, signature)
    }

    /// The public key of `version` (0: the primary), SubjectPublicKeyInfo PEM: a signing
    /// key's, or an asymmetric decryption key's (which callers encrypt to).
    pub fn public_key(&self, name: &str, version: u32) -> Result<(String, u32), KeyringError> {
        let e = self.fetch(name)?;
        if e.meta.versions.is_empty() {
            return Err(KeyringError::PendingImport(name.to_owned()));
        }
        if !e.meta.algorithm.is_asymmetric() {
            return Err(KeyringError::WrongPurpose {
                name: name.to_owned(),
                purpose: purpose_name(e.meta.purpose),
                operation: "public keys",
            });
        }
        let version = Self::version_or_primary(&e, version);
        let m = Self::usable(&e, version, VersionUse::Make)?;
        Ok((
            m.public
                .as_ref()
                .ok_or(KeyringError::Internal("no public key"))?
                .to_pem()?,
            version,
        ))
    }

    /// Decrypts an RSA-OAEP (SHA-256) ciphertext made with `version`'s public key (0: the
    /// primary). Every failure of the decryption itself is the opaque `DecryptionFailed`.
    pub fn asymmetric_decrypt(
        &self,
        name: &str,
        version: u32,
        ciphertext: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, u32), KeyringError> {
        check_size("the ciphertext", ciphertext.len(), MAX_RSA_CIPHERTEXT, "")?;
        let e = self.entry_for(name, Purpose::AsymmetricDecrypt, "asymmetric decryption")?;
        let version = Self::version_or_primary(&e, version);
        let secret = self.secret(&e, version, VersionUse::Read)?;
        Ok((
            secret.asymmetric_decrypt(Some(&self.hsm), ciphertext)?,
            version,
        ))
    }

    /// HMAC-SHA256 with the primary version.
    pub fn mac(&self, name: &str, message: &[u8]) -> Result<(Vec<u8>, u32), KeyringError> {
        check_size("the message", message.len(), MAX_MESSAGE, "")?;
        let e = self.entry_for(name, Purpose::Mac, "MAC")?;
        let version = e.meta.primary;
        let secret = self.secret(&e, version, VersionUse::Make)?;
        Ok((secret.mac(Some(&self.hsm), message)?, version))
    }

    /// Checks a MAC made by `version` (0: the primary), in constant time.
    pub fn verify_mac(
        &self,
        name: &str,
        version: u32,
        message: &[u8],
        tag: &[u8],
    ) -> Result<bool, KeyringError> {
        check_size("the message", message.len(), MAX_MESSAGE, "")?;
        let e = self.entry_for(name, Purpose::Mac, "MAC verification")?;
        let secret = self.secret(&e, Self::version_or_primary(&e, version), VersionUse::Read)?;
        let want = secret.mac(Some(&self.hsm), message)?;
        Ok(subtle::ConstantTimeEq::ct_eq(want.as_slice(), tag).unwrap_u8() == 1)
    }
}
