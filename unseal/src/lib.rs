//! Shamir secret sharing of the kms unseal key, and the share text custodians hold.
//!
//! The arithmetic is `blahaj`'s (GF(256), the maintained fork of `sharks` that fixed
//! RUSTSEC-2024-0398). This crate adds what a ceremony needs around it:
//!
//! - a **share set id**: random per split, printed into every share, so a share from another
//!   init is recognised before it is used;
//! - the **threshold** and the share's **index** inside the share, so a custodian's share
//!   says what it belongs to;
//! - a **checksum**, so a typo is caught when the share is typed, not when the quorum fails.
//!
//! GF(256) shares carry no integrity of their own: `threshold` shares of which one was
//! altered (with a recomputed checksum) recombine to a wrong secret without any error. The
//! caller must verify the recombined secret; kms checks a key check value and then an
//! authenticated decryption (see `docs/ARCHITECTURE.md`).
//!
//! # Share text
//! `kms1-` followed by the RFC 4648 base32 (no padding) of
//! `version(1) | share_set_id(8) | threshold(1) | index(1) | y(len) | checksum(4)`,
//! in groups of four characters joined by `-`. The checksum is the first four bytes of
//! SHA-256(`"kms-share-v1"` | everything before it). Parsing ignores case, white space
//! and dashes.

#![forbid(unsafe_code)]

use core::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The text prefix of every share of format version 1.
pub const SHARE_PREFIX: &str = "kms1-";
const FORMAT_VERSION: u8 = 1;
const CHECKSUM_LABEL: &[u8] = b"kms-share-v1";
const COMMITMENT_LABEL: &[u8] = b"kms-share-commitment-v1";
const CHECKSUM_LEN: usize = 4;
/// version + set id + threshold + index.
const HEADER_LEN: usize = 1 + 8 + 1 + 1;
/// The longest secret a share can carry (the share's y part).
pub const MAX_SECRET_LEN: usize = 255;
/// The most shares one split can make (GF(256) has 255 non-zero points).
pub const MAX_SHARES: u8 = 255;
/// The smallest threshold: a threshold of one would be a copy of the secret.
pub const MIN_THRESHOLD: u8 = 2;

/// The id of one split: every share of one init carries it. Not secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ShareSetId([u8; 8]);

impl ShareSetId {
    /// A fresh random id.
    pub fn random() -> Result<Self, SplitError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|_| SplitError::Randomness)?;
        Ok(Self(id))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }

    /// The id from bytes (as stored by the server).
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        Self(bytes)
    }

    /// Parses the lower-case hex form that `Display` prints.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .ok()?;
        let arr: [u8; 8] = bytes.try_into().ok()?;
        Some(Self(arr))
    }
}

impl fmt::Display for ShareSetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

/// One custodian's share. Secret: zeroized on drop, and its `Debug` shows only the public
/// parts (share set, threshold, index).
pub struct Share {
    set: ShareSetId,
    threshold: u8,
    index: u8,
    y: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("set", &self.set)
            .field("threshold", &self.threshold)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Why a share's text was refused. Nothing here quotes the share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// The text does not start with `kms1-`.
    #[error("not a kms share: it must start with \"{SHARE_PREFIX}\"")]
    MissingPrefix,
    /// A character outside the share alphabet (A-Z, 2-7, dashes, white space).
    #[error("the share contains a character that cannot appear in a share")]
    BadCharacter,
    /// The share is shorter or longer than any share can be.
    #[error("the share has the wrong length: a character is missing or extra")]
    BadLength,
    /// The checksum does not match: most likely a typo.
    #[error("the share's checksum does not match: check it for a typo")]
    BadChecksum,
    /// The share names a format version this build does not know.
    #[error("the share has format version {0}, this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion(u8),
    /// The share's header is inconsistent (index 0, threshold out of range).
    #[error("the share's header is invalid (index or threshold out of range)")]
    BadHeader,
}

impl Share {
    /// Parses a share's text form. Case, white space and dashes are ignored.
    pub fn parse(text: &str) -> Result<Self, ShareError> {
        let trimmed = text.trim();
        let prefix = trimmed
            .get(..SHARE_PREFIX.len())
            .ok_or(ShareError::MissingPrefix)?;
        if !prefix.eq_ignore_ascii_case(SHARE_PREFIX) {
            return Err(ShareError::MissingPrefix);
        }
        let body = trimmed.get(SHARE_PREFIX.len()..).unwrap_or_default();
        let mut compact = Zeroizing::new(String::with_capacity(body.len()));
        for c in body.chars() {
            match c {
                '-' => {}
                c if c.is_whitespace() => {}
                c if c.is_ascii_alphanumeric() => compact.push(c.to_ascii_uppercase()),
                _ => return Err(ShareError::BadCharacter),
            }
        }
        let raw = Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .decode(compact.as_bytes())
                .map_err(|e| match e.kind {
                    data_encoding::DecodeKind::Symbol => ShareError::BadCharacter,
                    _ => ShareError::BadLength,
                })?,
        );
        if raw.len() < HEADER_LEN + 1 + CHECKSUM_LEN
            || raw.len() > HEADER_LEN + MAX_SECRET_LEN + CHECKSUM_LEN
        {
            return Err(ShareError::BadLength);
        }
        let (payload, checksum) = raw.split_at(raw.len() - CHECKSUM_LEN);
        if checksum != compute_checksum(payload) {
            return Err(ShareError::BadChecksum);
        }
        let (header, y) = payload.split_at(HEADER_LEN);
        let [version, id @ .., threshold, index] = header else {
            return Err(ShareError::BadLength);
        };
        if *version != FORMAT_VERSION {
            return Err(ShareError::UnsupportedVersion(*version));
        }
        if *index == 0 || *threshold < MIN_THRESHOLD {
            return Err(ShareError::BadHeader);
        }
        let id: [u8; 8] = id.try_into().map_err(|_| ShareError::BadLength)?;
        Ok(Self {
            set: ShareSetId(id),
            threshold: *threshold,
            index: *index,
            y: Zeroizing::new(y.to_vec()),
        })
    }

    /// The share's text form, for a custodian to keep. Secret.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(HEADER_LEN + self.y.len() + CHECKSUM_LEN));
        raw.push(FORMAT_VERSION);
        raw.extend_from_slice(&self.set.0);
        raw.push(self.threshold);
        raw.push(self.index);
        raw.extend_from_slice(&self.y);
        let checksum = compute_checksum(&raw);
        raw.extend_from_slice(&checksum);
        let encoded = Zeroizing::new(data_encoding::BASE32_NOPAD.encode(&raw));
        let mut text = Zeroizing::new(String::with_capacity(
            SHARE_PREFIX.len() + encoded.len() * 5 / 4 + 1,
        ));
        text.push_str(SHARE_PREFIX);
        for (i, c) in encoded.chars().enumerate() {
            if i > 0 && i % 4 == 0 {
                text.push('-');
            }
            text.push(c);
        }
        text
    }

    /// The share set this share belongs to.
    pub fn share_set(&self) -> ShareSetId {
        self.set
    }

    /// How many shares recombine the secret.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// This share's index (its x coordinate), 1..=255.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The share's commitment: SHA-256(`"kms-share-commitment-v1"` | set id | threshold |
    /// index | y). Not secret: the server stores one per share at init, so that a share
    /// altered or forged with a valid checksum (the checksum has no key) is refused when it
    /// is submitted, and never counts towards a quorum. It reveals nothing of use about the
    /// share: y is as random as the 256-bit secret it hides.
    pub fn commitment(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(COMMITMENT_LABEL)
            .chain_update(self.set.0)
            .chain_update([self.threshold, self.index])
            .chain_update(self.y.as_slice())
            .finalize()
            .into()
    }

    /// Whether two shares carry the same point (the same share typed twice).
    pub fn same_point(&self, other: &Share) -> bool {
        self.set == other.set && self.index == other.index && *self.y == *other.y
    }
}

fn compute_checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::new()
        .chain_update(CHECKSUM_LABEL)
        .chain_update(payload)
        .finalize();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(digest.get(..CHECKSUM_LEN).unwrap_or(&[0; CHECKSUM_LEN]));
    out
}

/// Why a split was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// `threshold` or `shares` is out of range.
    #[error(
        "invalid share parameters: need {MIN_THRESHOLD} <= threshold <= shares <= {MAX_SHARES}, got threshold {threshold} of {shares} shares"
    )]
    InvalidParameters {
        /// Shares asked for.
        shares: u32,
        /// Threshold asked for.
        threshold: u32,
    },
    /// The secret is empty or longer than [`MAX_SECRET_LEN`].
    #[error("the secret must be 1..={MAX_SECRET_LEN} bytes")]
    SecretLength,
    /// The operating system's random source failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
}

/// Checks split parameters without splitting anything.
pub fn check_parameters(shares: u32, threshold: u32) -> Result<(u8, u8), SplitError> {
    let bad = SplitError::InvalidParameters { shares, threshold };
    let n = u8::try_from(shares).map_err(|_| bad.clone())?;
    let t = u8::try_from(threshold).map_err(|_| bad.clone())?;
    if t < MIN_THRESHOLD || t > n {
        return Err(bad);
    }
    Ok((n, t))
}

/// Splits `secret` into `shares` shares of which any `threshold` recombine it, under a fresh
/// share set id.
pub fn split(
    secret: &[u8],
    shares: u32,
    threshold: u32,
) -> Result<(ShareSetId, Vec<Share>), SplitError> {
    split_into(ShareSetId::random()?, secret, shares, threshold)
}

/// As [`split`], under the share set id `set` chosen beforehand (a rekey names the share
/// set it will make before the custodians give their old shares).
pub fn split_into(
    set: ShareSetId,
    secret: &[u8],
    shares: u32,
    threshold: u32,
) -> Result<(ShareSetId, Vec<Share>), SplitError> {
    let (n, t) = check_parameters(shares, threshold)?;
    if secret.is_empty() || secret.len() > MAX_SECRET_LEN {
        return Err(SplitError::SecretLength);
    }
    let dealer = blahaj::Sharks(t).dealer(secret);
    let out = dealer
        .take(usize::from(n))
        .map(|s| {
            let bytes = Zeroizing::new(Vec::<u8>::from(&s));
            let (x, y) = bytes
                .split_first()
                .map(|(x, y)| (*x, y.to_vec()))
                .unwrap_or_default();
            Share {
                set,
                threshold: t,
                index: x,
                y: Zeroizing::new(y),
            }
        })
        .collect();
    Ok((set, out))
}

/// Why shares could not be recombined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CombineError {
    /// Fewer distinct shares than the threshold.
    #[error("not enough shares: have {have}, need {need}")]
    NotEnoughShares {
        /// Distinct shares given.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// The shares belong to different share sets or disagree on the threshold.
    #[error("the shares are not all from one share set")]
    MixedShareSets,
    /// Two shares have the same index.
    #[error("two shares have the same index {0}")]
    DuplicateIndex(u8),
    /// The shares' secrets have different lengths.
    #[error("the shares have different lengths")]
    LengthMismatch,
}

/// Recombines the secret from at least `threshold` shares of one share set, in any order.
///
/// The result is not verified (see the crate docs): the caller must check it.
pub fn combine(shares: &[Share]) -> Result<Zeroizing<Vec<u8>>, CombineError> {
    let first = shares
        .first()
        .ok_or(CombineError::NotEnoughShares { have: 0, need: 0 })?;
    let threshold = first.threshold;
    let mut seen = [false; 256];
    for s in shares {
        if s.set != first.set || s.threshold != threshold {
            return Err(CombineError::MixedShareSets);
        }
        if s.y.len() != first.y.len() {
            return Err(CombineError::LengthMismatch);
        }
        let slot = seen
            .get_mut(usize::from(s.index))
            .ok_or(CombineError::DuplicateIndex(s.index))?;
        if *slot {
            return Err(CombineError::DuplicateIndex(s.index));
        }
        *slot = true;
    }
    if shares.len() < usize::from(threshold) {
        return Err(CombineError::NotEnoughShares {
            have: shares.len(),
            need: usize::from(threshold),
        });
    }
    let converted: Vec<blahaj::Share> = shares
        .iter()
        .filter_map(|s| {
            let mut bytes = Zeroizing::new(Vec::with_capacity(1 + s.y.len()));
            bytes.push(s.index);
            bytes.extend_from_slice(&s.y);
            blahaj::Share::try_from(bytes.as_slice()).ok()
        })
        .collect();
    let secret = blahaj::Sharks(threshold)
        .recover(converted.iter())
        .map_err(|_| CombineError::NotEnoughShares {
            have: shares.len(),
            need: usize::from(threshold),
        })?;
    Ok(Zeroizing::new(secret))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> Vec<u8> {
        (0u8..32).collect()
    }

    #[test]
    fn text_round_trip() {
        let (set, shares) = split(&secret(), 5, 3).unwrap();
        for s in &shares {
            let text = s.to_text();
            assert!(text.starts_with(SHARE_PREFIX));
            let back = Share::parse(&text).unwrap();
            assert_eq!(back.share_set(), set);
            assert_eq!(back.threshold(), 3);
            assert_eq!(back.index(), s.index());
            assert!(back.same_point(s));
            // Case, white space and dashes do not matter.
            let body = &text[SHARE_PREFIX.len()..];
            let sloppy = format!("  KMS1-{}\n", body.to_lowercase().replace('-', " "));
            assert!(Share::parse(&sloppy).unwrap().same_point(s));
        }
    }

    #[test]
    fn commitments_tell_every_share_and_every_forgery_apart() {
        let (_, shares) = split(&secret(), 5, 3).unwrap();
        let c: Vec<[u8; 32]> = shares.iter().map(Share::commitment).collect();
        for (i, a) in c.iter().enumerate() {
            for b in c.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        // A forged share: same header, another y, a valid checksum (anyone can compute it).
        let mut forged = Share::parse(&shares[0].to_text()).unwrap();
        forged.y[0] ^= 1;
        let forged = Share::parse(&forged.to_text()).unwrap();
        assert_eq!(forged.index(), shares[0].index());
        assert_ne!(forged.commitment(), c[0]);
        // Parsing does not change it.
        assert_eq!(
            Share::parse(&shares[1].to_text()).unwrap().commitment(),
            c[1]
        );
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let (_, shares) = split(&secret(), 2, 2).unwrap();
        let text = shares[0].to_text();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        for (i, c) in text.char_indices().skip(SHARE_PREFIX.len()) {
            if c == '-' {
                continue;
            }
            for r in alphabet.chars().filter(|r| *r != c) {
                let mut typo = text.to_string();
                typo.replace_range(i..i + 1, &r.to_string());
                let err = Share::parse(&typo).unwrap_err();
                // The last character carries only some bits: a change may alter padding
                // bits, which base32 rejects as a bad length or symbol.
                assert!(
                    matches!(
                        err,
                        ShareError::BadChecksum | ShareError::BadLength | ShareError::BadCharacter
                    ),
                    "{err:?} at {i}"
                );
            }
        }
    }

    #[test]
    fn malformed_texts_are_refused_with_distinct_errors() {
        assert_eq!(Share::parse("").unwrap_err(), ShareError::MissingPrefix);
        assert_eq!(
            Share::parse("hello").unwrap_err(),
            ShareError::MissingPrefix
        );
        assert_eq!(
            Share::parse("kms1-AAAA!").unwrap_err(),
            ShareError::BadCharacter
        );
        assert_eq!(
            Share::parse("kms1-AAAA").unwrap_err(),
            ShareError::BadLength
        );
        let (_, shares) = split(&secret(), 2, 2).unwrap();
        let text = shares[0].to_text();
        let cut = &text[..text.len() - 8];
        assert!(matches!(
            Share::parse(cut).unwrap_err(),
            ShareError::BadChecksum | ShareError::BadLength
        ));
    }

    #[test]
    fn debug_shows_no_secret() {
        let (_, shares) = split(&[0xAB; 32], 3, 2).unwrap();
        let printed = format!("{:?}", shares[0]);
        assert!(printed.contains("index"));
        // The secret's bytes (0xAB) in any of Debug's renderings of a byte array, outside
        // the random share set id (which is printed, and may hold a byte 171 by chance).
        let printed = printed.replace(&format!("{:?}", shares[0].set), "");
        assert!(!printed.contains("171"), "{printed}");
        assert!(!printed.to_lowercase().contains("ab, "), "{printed}");
        assert!(!printed.to_lowercase().contains("abab"), "{printed}");
    }

    #[test]
    fn parameters_are_checked() {
        assert!(split(&secret(), 5, 1).is_err());
        assert!(split(&secret(), 2, 3).is_err());
        assert!(split(&secret(), 256, 3).is_err());
        assert!(split(&[], 3, 2).is_err());
        assert!(split(&secret(), 255, 255).is_ok());
    }

    #[test]
    fn combine_refuses_mixed_duplicate_and_short() {
        let (_, a) = split(&secret(), 3, 2).unwrap();
        let (_, b) = split(&secret(), 3, 2).unwrap();
        let a0 = Share::parse(&a[0].to_text()).unwrap();
        let a0_again = Share::parse(&a[0].to_text()).unwrap();
        let b1 = Share::parse(&b[1].to_text()).unwrap();
        assert_eq!(
            combine(&[a0, b1]).unwrap_err(),
            CombineError::MixedShareSets
        );
        let a0 = Share::parse(&a[0].to_text()).unwrap();
        assert_eq!(
            combine(&[a0, a0_again]).unwrap_err(),
            CombineError::DuplicateIndex(a[0].index())
        );
        let a1 = Share::parse(&a[1].to_text()).unwrap();
        assert_eq!(
            combine(&[a1]).unwrap_err(),
            CombineError::NotEnoughShares { have: 1, need: 2 }
        );
    }

    fn pick(shares: &[Share], order: &[usize]) -> Vec<Share> {
        order
            .iter()
            .map(|&i| Share::parse(&shares[i].to_text()).unwrap())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_threshold_subset_recovers(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            n in 2u32..12,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let t = 2 + ((f64::from(n - 2)) * t_frac) as u32;
            let (_, shares) = split(&secret, n, t).unwrap();
            // A pseudo-random permutation of the indices from the seed.
            let mut order: Vec<usize> = (0..n as usize).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let subset = pick(&shares, &order[..t as usize]);
            prop_assert_eq!(&*combine(&subset).unwrap(), &secret);
            // T-1 shares are refused by combine...
            let short = pick(&shares, &order[..t as usize - 1]);
            let refused = matches!(combine(&short), Err(CombineError::NotEnoughShares { .. }));
            prop_assert!(refused);
            // ...and interpolating them anyway does not give the secret (for a 32-byte
            // secret the chance of a match is 2^-256; short secrets can collide by chance,
            // so only check long ones).
            if secret.len() >= 16 {
                let raw: Vec<blahaj::Share> = short.iter().map(|s| {
                    let mut b = vec![s.index()];
                    b.extend_from_slice(&s.y);
                    blahaj::Share::try_from(b.as_slice()).unwrap()
                }).collect();
                let guess = blahaj::Sharks(t as u8 - 1).recover(raw.iter()).unwrap();
                prop_assert_ne!(guess, secret);
            }
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,200}") {
            let _ = Share::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_prefixed_base32(text in "kms1-[A-Z2-7-]{0,120}") {
            let _ = Share::parse(&text);
        }
    }
}
