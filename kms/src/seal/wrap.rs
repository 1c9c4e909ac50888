//! The root key's wrapping: random keys, the key check value, AES-GCM in software (the
//! inner layer, under the unseal key) and in the HSM (the outer layer, under the master
//! key).

use super::{
    Aes256Gcm, Hmac, Hsm, HsmError, INNER_AAD, KCV_LABEL, KCV_LEN, KEY_LEN, KeyHandle, KeyInit,
    NONCE_LEN, OUTER_AAD, Payload, RootKey, SealError, SealRecord, Sha256, ShareSetId, Zeroizing,
};
use aes_gcm::aead::Aead;
use hmac::Mac;

pub(super) fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, SealError> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(k.as_mut_slice()).map_err(|_| SealError::Randomness)?;
    Ok(k)
}

/// Copies key bytes into a zeroizing array, without a stack copy left behind.
pub(super) fn to_key(bytes: &[u8]) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    if bytes.len() != KEY_LEN {
        return None;
    }
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    k.copy_from_slice(bytes);
    Some(k)
}

pub(super) fn random_nonce() -> Result<String, SealError> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|_| SealError::Randomness)?;
    Ok(data_encoding::HEXLOWER.encode(&n))
}

pub(super) fn aad(label: &[u8], set: ShareSetId) -> Vec<u8> {
    let mut v = Vec::with_capacity(label.len() + 8);
    v.extend_from_slice(label);
    v.extend_from_slice(set.as_bytes());
    v
}

/// HMAC-SHA256(unseal key, label | share set id | PIN carried in the shares, if any),
/// truncated to 16 bytes. Keyed by the 256-bit unseal key, so it allows no guessing of the PIN.
pub(super) fn key_check(
    unseal_key: &[u8; KEY_LEN],
    set: ShareSetId,
    pin: &[u8],
) -> Result<[u8; KCV_LEN], SealError> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(unseal_key)
        .map_err(|_| SealError::WrongQuorum)?;
    mac.update(KCV_LABEL);
    mac.update(set.as_bytes());
    mac.update(pin);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; KCV_LEN];
    out.copy_from_slice(full.get(..KCV_LEN).ok_or(SealError::WrongQuorum)?);
    Ok(out)
}

pub(super) fn software_wrap(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    pt: &[u8],
) -> Result<Vec<u8>, SealError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::RootKeyUnwrap)?;
    cipher
        .encrypt(&(*nonce).into(), Payload { msg: pt, aad })
        .map_err(|_| SealError::RootKeyUnwrap)
}

/// Wraps the root key twice: in software under the unseal key (a random nonce before the
/// ciphertext), then in the HSM under the master key. Both layers bind the share set id.
/// The inverse of [`unwrap_root`].
pub(super) fn wrap_root(
    hsm: &Hsm,
    master_key: KeyHandle,
    set: ShareSetId,
    unseal_key: &[u8; KEY_LEN],
    root_key: &[u8; KEY_LEN],
) -> Result<Vec<u8>, SealError> {
    let mut inner_nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut inner_nonce).map_err(|_| SealError::Randomness)?;
    let inner_ct = software_wrap(
        unseal_key,
        &inner_nonce,
        &aad(INNER_AAD, set),
        root_key.as_slice(),
    )?;
    let mut inner_blob = Vec::with_capacity(NONCE_LEN + inner_ct.len());
    inner_blob.extend_from_slice(&inner_nonce);
    inner_blob.extend_from_slice(&inner_ct);
    Ok(hsm.encrypt(master_key, &aad(OUTER_AAD, set), &inner_blob)?)
}

/// Unwraps the root key from the seal record: the HSM layer, then the software layer.
pub(super) fn unwrap_root(
    hsm: &Hsm,
    master_key: KeyHandle,
    record: &SealRecord,
    unseal_key: &[u8; KEY_LEN],
) -> Result<RootKey, SealError> {
    let set = record.share_set()?;
    let outer = data_encoding::HEXLOWER
        .decode(record.wrapped_root_key.as_bytes())
        .map_err(|_| SealError::CorruptRecord)?;
    let inner_blob = hsm
        .decrypt(master_key, &aad(OUTER_AAD, set), &outer)
        .map_err(|e| match e {
            HsmError::DecryptFailed => SealError::RootKeyUnwrap,
            other => SealError::Hsm(other),
        })?;
    if inner_blob.len() < NONCE_LEN {
        return Err(SealError::RootKeyUnwrap);
    }
    let (nonce, ct) = inner_blob.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::RootKeyUnwrap)?;
    let cipher = Aes256Gcm::new_from_slice(unseal_key).map_err(|_| SealError::RootKeyUnwrap)?;
    let pt = Zeroizing::new(
        cipher
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: ct,
                    aad: &aad(INNER_AAD, set),
                },
            )
            .map_err(|_| SealError::RootKeyUnwrap)?,
    );
    Ok(RootKey(to_key(&pt).ok_or(SealError::RootKeyUnwrap)?))
}
