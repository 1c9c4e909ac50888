//! The barrier: the one holder of the root key while the server is unsealed.
//!
//! The seal unwraps the root key at unseal and gives it to a [`Barrier`] at once; the
//! engines (the keyring, and those to come) are handed an `Arc<Barrier>` and never see the
//! root's bytes. They ask it for two things:
//! - [`Barrier::derive`] / [`Barrier::derive_key`]: a subkey for a purpose,
//!   `HKDF-SHA256(ikm = root key, salt, info)`. The keyring's derivations (software key
//!   versions, stored material, the metadata MAC key) are exactly these, so every key,
//!   MAC and sealed record made before the barrier existed still opens bit for bit (the
//!   vectors below were computed independently, with Python's `hmac`).
//! - [`Barrier::seal`] / [`Barrier::open`]: a record for a [`Purpose`] (an engine's stored
//!   secret), AES-256-GCM under the purpose's subkey
//!   (`info = "kms/v1/barrier/" | purpose`), a random 96-bit nonce, and associated data
//!   binding the format version, the purpose and the record's name, so a record opens
//!   only under the purpose and name it was sealed for. Stored form:
//!   `0x01 | nonce (12) | ciphertext | tag (16)`.
//!
//! Seal = forget: dropping the last `Arc<Barrier>` zeroizes the root key. No `Debug`,
//! `Clone` or `PartialEq`.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The length of the root key and of every subkey [`Barrier::seal`] uses.
pub const KEY_LEN: usize = 32;
/// The nonce length of a sealed record.
const NONCE_LEN: usize = 12;
/// The first byte of a sealed record: its format.
const RECORD_FORMAT: u8 = 1;
/// The info prefix of a purpose's sealing subkey.
const PURPOSE_INFO: &[u8] = b"kms/v1/barrier/";
/// The associated data prefix of a sealed record.
const RECORD_AAD: &[u8] = b"kms/v1/barrier-record";
/// The longest purpose name.
const MAX_PURPOSE: usize = 64;

/// Why the barrier failed. Opening says nothing of why a record did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BarrierError {
    /// HKDF cannot give that many bytes (more than 255 blocks), or a purpose name is not
    /// `[a-z0-9_/-]{1,64}`: a mistake in the calling engine, not in any input.
    #[error("barrier misuse: {0}")]
    Misuse(&'static str),
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Randomness,
    /// The record is not one this barrier sealed for this purpose and name (altered,
    /// truncated, another name's, another purpose's or another root key's).
    #[error("the record cannot be opened")]
    CannotOpen,
}

/// What a sealed record is for: an engine's label for one kind of record (e.g.
/// `secrets/data`). Checked when made: `[a-z0-9_/-]{1,64}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purpose(&'static str);

impl Purpose {
    /// A purpose named `name`; `None` unless `name` is `[a-z0-9_/-]{1,64}`.
    pub const fn new(name: &'static str) -> Option<Self> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > MAX_PURPOSE {
            return None;
        }
        let mut rest = b;
        while let [c, tail @ ..] = rest {
            if !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(*c, b'_' | b'/' | b'-')) {
                return None;
            }
            rest = tail;
        }
        Some(Self(name))
    }

    /// The purpose's name.
    pub fn name(self) -> &'static str {
        self.0
    }
}

/// The root key, and the only way to use it. Zeroized on drop.
pub struct Barrier {
    root: Zeroizing<[u8; KEY_LEN]>,
}

impl Barrier {
    /// The barrier over `root` (the seal's unwrapped root key; tests and benches make one
    /// from a random key).
    pub fn new(root: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self { root }
    }

    /// Fills `out` with `HKDF-SHA256(ikm = root key, salt, info = the parts of `info`
    /// concatenated)`; no salt is HKDF's default (32 zero bytes).
    pub fn derive(
        &self,
        salt: Option<&[u8]>,
        info: &[&[u8]],
        out: &mut [u8],
    ) -> Result<(), BarrierError> {
        Hkdf::<Sha256>::new(salt, self.root.as_slice())
            .expand_multi_info(info, out)
            .map_err(|_| BarrierError::Misuse("hkdf output too long"))
    }

    /// [`Barrier::derive`] into a zeroizing array of `N` bytes.
    pub fn derive_key<const N: usize>(
        &self,
        salt: Option<&[u8]>,
        info: &[&[u8]],
    ) -> Result<Zeroizing<[u8; N]>, BarrierError> {
        let mut okm = Zeroizing::new([0u8; N]);
        self.derive(salt, info, okm.as_mut_slice())?;
        Ok(okm)
    }

    /// The AES-256-GCM cipher of `purpose`'s records.
    fn cipher(&self, purpose: Purpose) -> Result<Aes256Gcm, BarrierError> {
        let key = self.derive_key::<KEY_LEN>(None, &[PURPOSE_INFO, purpose.0.as_bytes()])?;
        Aes256Gcm::new_from_slice(key.as_slice()).map_err(|_| BarrierError::Misuse("aes key"))
    }

    /// Seals `plaintext` as the record `name` of `purpose`: `0x01 | nonce | ct | tag`.
    pub fn seal(
        &self,
        purpose: Purpose,
        name: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, BarrierError> {
        let cipher = self.cipher(purpose)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| BarrierError::Randomness)?;
        let aad = record_aad(purpose, name);
        let ct = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| BarrierError::Misuse("record too long"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(RECORD_FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens what [`Barrier::seal`] sealed as the record `name` of `purpose`.
    pub fn open(
        &self,
        purpose: Purpose,
        name: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
        let (&format, rest) = sealed.split_first().ok_or(BarrierError::CannotOpen)?;
        if format != RECORD_FORMAT {
            return Err(BarrierError::CannotOpen);
        }
        let (nonce, ct) = rest
            .split_at_checked(NONCE_LEN)
            .ok_or(BarrierError::CannotOpen)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| BarrierError::CannotOpen)?;
        let aad = record_aad(purpose, name);
        self.cipher(purpose)?
            .decrypt(&nonce.into(), Payload { msg: ct, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| BarrierError::CannotOpen)
    }
}

/// `"kms/v1/barrier-record" | format | purpose length (u16 BE) | purpose | name`: the
/// length keeps (purpose, name) pairs apart whatever bytes a name holds.
fn record_aad(purpose: Purpose, name: &str) -> Vec<u8> {
    let p = purpose.0.as_bytes();
    let mut aad = Vec::with_capacity(RECORD_AAD.len() + 3 + p.len() + name.len());
    aad.extend_from_slice(RECORD_AAD);
    aad.push(RECORD_FORMAT);
    // A purpose is at most 64 bytes.
    aad.extend_from_slice(&u16::try_from(p.len()).unwrap_or(u16::MAX).to_be_bytes());
    aad.extend_from_slice(p);
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        data_encoding::HEXLOWER.encode(b)
    }

    /// The keyring's derivations, as they were before the barrier: HKDF-SHA256 computed
    /// independently (Python's `hmac`) for root = [1; 32].
    #[test]
    fn derivations_of_before_are_unchanged() {
        let barrier = Barrier::new(Zeroizing::new([1u8; 32]));
        let version = 1u32.to_be_bytes();
        let material = barrier
            .derive_key::<32>(
                Some(&[2; 32]),
                &[b"kms/v1/key-material", &[3; 16], &version, b"AES_256_GCM"],
            )
            .unwrap();
        assert_eq!(
            hex(material.as_slice()),
            "cb5ca4b507d95bf9a020305d1680e3b55b362603e8d66cb3e98b3f84c50cf19c"
        );
        let p384 = barrier
            .derive_key::<48>(
                Some(&[2; 32]),
                &[
                    b"kms/v1/key-material",
                    &[3; 16],
                    &version,
                    b"ECDSA_P384_SHA384",
                    &[1],
                ],
            )
            .unwrap();
        assert_eq!(
            hex(p384.as_slice()),
            "fb70aab82c6ea436b391f1e97a1cc81722dd72e8ec7561b1913899e8c7b44f6c\
             c0ef2fc45da45df4694c24c02f656e80"
        );
        let stored = barrier
            .derive_key::<32>(
                Some(&[2; 32]),
                &[
                    b"kms/v1/stored-material",
                    &[3; 16],
                    &version,
                    b"AES_256_GCM",
                ],
            )
            .unwrap();
        assert_eq!(
            hex(stored.as_slice()),
            "6aaaed2a4175f5ecafe983e3272ae55765548dff54ed98bc31bdb74d2a987cce"
        );
        let mac = barrier
            .derive_key::<32>(None, &[b"kms/v1/metadata-mac"])
            .unwrap();
        assert_eq!(
            hex(mac.as_slice()),
            "34bd66e4c8b394086d5478fd3a2d14ff12cb774e64e395cd9d6645f52eb62e25"
        );
    }

    #[test]
    fn records_open_only_for_their_purpose_name_and_root() {
        let a = Barrier::new(Zeroizing::new([4u8; 32]));
        let b = Barrier::new(Zeroizing::new([5u8; 32]));
        let data = Purpose::new("secrets/data").unwrap();
        let other = Purpose::new("secrets/meta").unwrap();
        let sealed = a.seal(data, "payments/stripe", b"hunter2").unwrap();
        assert_eq!(sealed.len(), 1 + 12 + 7 + 16);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            *a.open(data, "payments/stripe", &sealed).unwrap(),
            b"hunter2"
        );
        // A fresh nonce each time.
        assert_ne!(sealed, a.seal(data, "payments/stripe", b"hunter2").unwrap());
        let refused = Err(BarrierError::CannotOpen);
        assert_eq!(a.open(data, "payments/strip", &sealed).map(|_| ()), refused);
        assert_eq!(
            a.open(other, "payments/stripe", &sealed).map(|_| ()),
            refused
        );
        assert_eq!(
            b.open(data, "payments/stripe", &sealed).map(|_| ()),
            refused
        );
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(a.open(data, "payments/stripe", &t).map(|_| ()), refused);
        }
        for n in 0..sealed.len() {
            assert_eq!(
                a.open(data, "payments/stripe", &sealed[..n]).map(|_| ()),
                refused
            );
        }
    }

    #[test]
    fn purposes_are_checked() {
        assert!(Purpose::new("keyring/material-2").is_some());
        assert!(Purpose::new("").is_none());
        assert!(Purpose::new("Secrets").is_none());
        assert!(Purpose::new("a b").is_none());
        assert!(Purpose::new("x".repeat(65).leak()).is_none());
    }
}
