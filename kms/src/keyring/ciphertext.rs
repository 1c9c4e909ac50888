//! The ciphertext format (docs/formats.md).
//!
//! ```text
//! byte 0       format version (1)
//! bytes 1..5   key version, u32 big-endian
//! bytes 5..17  AES-GCM nonce (96 bits, random)
//! bytes 17..   AES-256-GCM ciphertext | 16-byte tag
//! ```
//! The GCM associated data binds the header, the key's name and the caller's associated
//! data: `"kms/v1/ct" | header(5) | u16 BE len(name) | name | associated data`.
//! So a ciphertext decrypts only under the key and version that made it, with the same
//! associated data.

/// The current format version.
pub(crate) const FORMAT_V1: u8 = 1;
/// Header length: format version and key version.
pub(crate) const HEADER_LEN: usize = 5;
/// Nonce length.
pub(crate) const NONCE_LEN: usize = 12;
/// Tag length.
pub(crate) const TAG_LEN: usize = 16;
/// Bytes a ciphertext adds to its plaintext.
pub(crate) const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// A parsed ciphertext. Parsing checks only the structure; authenticity is the decryption's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The key version that made it.
    pub version: u32,
    /// The header bytes (bound into the associated data).
    pub header: [u8; HEADER_LEN],
    /// The 96-bit AES-GCM nonce, random per message.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext and tag.
    pub body: &'a [u8],
}

/// Why bytes are not a ciphertext of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than header, nonce and tag.
    #[error("the ciphertext is too short")]
    TooShort,
    /// Unknown format version.
    #[error("unknown ciphertext format version {0}")]
    UnknownFormat(u8),
    /// Key version 0 does not exist.
    #[error("the ciphertext names key version 0")]
    BadVersion,
}

/// Parses a ciphertext's structure.
pub fn parse(bytes: &[u8]) -> Result<Parsed<'_>, FormatError> {
    if bytes.len() < OVERHEAD {
        return Err(FormatError::TooShort);
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let header: [u8; HEADER_LEN] = header.try_into().map_err(|_| FormatError::TooShort)?;
    let [format, v0, v1, v2, v3] = header;
    if format != FORMAT_V1 {
        return Err(FormatError::UnknownFormat(format));
    }
    let version = u32::from_be_bytes([v0, v1, v2, v3]);
    if version == 0 {
        return Err(FormatError::BadVersion);
    }
    Ok(Parsed {
        version,
        header,
        nonce: nonce.try_into().map_err(|_| FormatError::TooShort)?,
        body,
    })
}

/// The header for `version`.
pub fn header(version: u32) -> [u8; HEADER_LEN] {
    let v = version.to_be_bytes();
    [FORMAT_V1, v[0], v[1], v[2], v[3]]
}

/// The GCM associated data for a ciphertext of key `name` with caller data `aad`.
pub(crate) fn gcm_aad(header: &[u8; HEADER_LEN], name: &str, aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + HEADER_LEN + 2 + name.len() + aad.len());
    out.extend_from_slice(b"kms/v1/ct");
    out.extend_from_slice(header);
    // Names are at most 128 bytes (checked at creation).
    out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(aad);
    out
}

/// Assembles `header | nonce | body`.
pub fn assemble(version: u32, nonce: &[u8; NONCE_LEN], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len());
    out.extend_from_slice(&header(version));
    out.extend_from_slice(nonce);
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let ct = assemble(7, &[9; NONCE_LEN], &[1; 20]);
        let p = parse(&ct).unwrap();
        assert_eq!(p.version, 7);
        assert_eq!(p.nonce, [9; NONCE_LEN]);
        assert_eq!(p.body, &[1; 20][..]);
        assert_eq!(p.header, header(7));
    }

    #[test]
    fn malformed_is_refused() {
        assert_eq!(parse(&[]), Err(FormatError::TooShort));
        assert_eq!(parse(&[1; OVERHEAD - 1]), Err(FormatError::TooShort));
        let mut ct = assemble(1, &[0; NONCE_LEN], &[0; TAG_LEN]);
        ct[0] = 2;
        assert_eq!(parse(&ct), Err(FormatError::UnknownFormat(2)));
        let ct = assemble(0, &[0; NONCE_LEN], &[0; TAG_LEN]);
        assert_eq!(parse(&ct), Err(FormatError::BadVersion));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse(&bytes);
        }
    }
}
