//! EME-OAEP decoding (RFC 8017, 7.1.2 step 3) with SHA-256, MGF1-SHA-256 and the empty
//! label: after a raw RSA decryption in a module that refuses OAEP with SHA-256 (SoftHSM
//! 2.6), and for SOFTWARE keys after `rsa`'s private-key operation (whose own OAEP decoding
//! does not check the block's leading byte). Project Wycheproof's OAEP vectors run through
//! it at both levels (softhsm-tests/tests/wycheproof.rs).
//!
//! Constant time in the secret: every byte of the block is read and every check is
//! combined with `subtle` before the one branch on the result, so neither the time taken
//! nor the (single, opaque) failure tells *which* check failed: no Manger-style oracle.
//! The message's length, which a success returns anyway, is the only thing that varies.

use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use zeroize::Zeroizing;

/// SHA-256's output length.
const H: usize = 32;

/// MGF1 with SHA-256: `len` bytes from `seed`, XORed into `out`.
fn mgf1_xor(seed: &[u8], out: &mut [u8]) {
    for (counter, chunk) in (0u32..).zip(out.chunks_mut(H)) {
        let mask = Sha256::new()
            .chain_update(seed)
            .chain_update(counter.to_be_bytes())
            .finalize();
        for (o, m) in chunk.iter_mut().zip(mask.iter()) {
            *o ^= m;
        }
    }
}

/// The message inside the encoded block `em` of a `k`-byte modulus (`em` as the token
/// returned it: `k` bytes, or fewer when it dropped leading zeros), or `None`.
pub(crate) fn decode(em: &[u8], k: usize) -> Option<Zeroizing<Vec<u8>>> {
    // Public facts: the modulus size and the block's length.
    if k < 2 * H + 2 || em.len() > k {
        return None;
    }
    let mut block = Zeroizing::new(vec![0u8; k]);
    block.get_mut(k - em.len()..)?.copy_from_slice(em);
    let (y, rest) = block.split_first_mut()?;
    let (seed, db) = rest.split_at_mut(H);
    mgf1_xor(db, seed);
    mgf1_xor(seed, db);
    let (lhash, ps_m) = db.split_at(H);
    let want = Sha256::digest(b"");
    let mut good = y.ct_eq(&0) & lhash.ct_eq(want.as_slice());
    // PS (zeros) then 0x01 then M: find the first 0x01 without branching on any byte.
    let mut looking = Choice::from(1);
    let mut invalid = Choice::from(0);
    let mut index = 0u32;
    for (i, b) in (0u32..).zip(ps_m.iter()) {
        let zero = b.ct_eq(&0);
        let one = b.ct_eq(&1);
        index.conditional_assign(&i, looking & one);
        invalid |= looking & !zero & !one;
        looking &= !one;
    }
    good &= !looking & !invalid;
    if !bool::from(good) {
        return None;
    }
    let start = usize::try_from(index).ok()?.checked_add(1)?;
    Some(Zeroizing::new(ps_m.get(start..)?.to_vec()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// EME-OAEP encoding (RFC 8017, 7.1.1 step 2), for the tests.
    fn encode(m: &[u8], k: usize, seed: [u8; H]) -> Vec<u8> {
        let mut db = Sha256::digest(b"").to_vec();
        db.resize(k - m.len() - H - 2, 0);
        db.push(1);
        db.extend_from_slice(m);
        let mut seed = seed.to_vec();
        mgf1_xor(&seed, &mut db);
        mgf1_xor(&db, &mut seed);
        [vec![0], seed, db].concat()
    }

    #[test]
    fn round_trips_every_length_and_refuses_every_flipped_byte() {
        let k = 256;
        for len in [0, 1, 31, 100, k - 2 * H - 2] {
            let m: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let em = encode(&m, k, [7; H]);
            assert_eq!(em.len(), k);
            assert_eq!(*decode(&em, k).unwrap(), m, "length {len}");
            for i in 0..k {
                let mut bad = em.clone();
                bad[i] ^= 0x40;
                assert!(decode(&bad, k).is_none(), "length {len}, flip at {i}");
            }
        }
        // A token that drops the leading zero byte: the same message.
        let em = encode(b"hi", k, [9; H]);
        assert_eq!(*decode(&em[1..], k).unwrap(), b"hi");
    }

    #[test]
    fn refuses_malformed_blocks() {
        let k = 256;
        assert!(decode(&[0; 257], k).is_none());
        assert!(decode(&[0; 256], k).is_none(), "no 0x01 separator");
        assert!(
            decode(&[0; 60], 60).is_none(),
            "modulus too small for SHA-256"
        );
        // A longer message than fits.
        let em = encode(&[1; 190], k, [1; H]);
        assert!(decode(&em, k).is_some());
    }

    /// Encryption by the `rsa` crate (an independent OAEP implementation) decoded after a
    /// raw private-key operation done by hand: the same message.
    #[test]
    fn decodes_what_the_rsa_crate_encrypts() {
        use rsa::traits::PublicKeyParts;
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 1024).unwrap();
        let public = key.to_public_key();
        let ct = public
            .encrypt(
                &mut getrandom::SysRng,
                rsa::Oaep::<Sha256>::new(),
                b"attack at dawn",
            )
            .unwrap();
        let c = rsa::BoxedUint::from_be_slice(&ct, public.n().bits_precision()).unwrap();
        let m = rsa::hazmat::rsa_decrypt(Some(&mut getrandom::SysRng), &key, &c).unwrap();
        let em = m.to_be_bytes();
        assert_eq!(*decode(&em, public.size()).unwrap(), b"attack at dawn");
    }
}
