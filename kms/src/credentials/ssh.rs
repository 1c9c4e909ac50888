//! OpenSSH certificates (OpenSSH's PROTOCOL.certkeys) and the public keys they certify
//! (RFC 4253 section 6.6, RFC 5656, PROTOCOL.u2f), encoded here: the format is small, and
//! the one crate that does it on our RustCrypto generation is a release candidate
//! (docs/dependencies.md).
//!
//! A subject's public key is untrusted input: [`SubjectKey::parse`] reads one
//! authorized_keys line and keeps only what it understood, refusing the rest with an
//! [`SshKeyError`]. The certificate is signed outside this module (the keyring, maybe in
//! the HSM): [`Certificate::to_be_signed`] gives the bytes, [`Certificate::line`] takes
//! the signature.

mod issue;

pub(crate) use issue::SshRequest;

use std::fmt;

use crate::keyring::model::Algorithm;

/// The longest authorized_keys line a request may give: 16 KiB (an RSA key of 16384 bits
/// is about 2.8 KiB in base64).
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// The smallest RSA modulus a subject key may have, in bits.
pub(crate) const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus a subject key may have, in bits (OpenSSH's limit).
pub(crate) const MAX_RSA_BITS: usize = 16384;
/// The longest key id (the caller's principal).
pub(crate) const MAX_KEY_ID: usize = 2048;
/// How far before now a certificate is valid: another machine's clock may be behind.
pub(crate) const BACKDATE: u64 = 60;

/// The extensions OpenSSH knows (PROTOCOL.certkeys), sorted.
pub(crate) const KNOWN_EXTENSIONS: &[&str] = &[
    "no-touch-required",
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];
/// A user certificate's extensions when its issuer was made without any: ssh-keygen's.
pub(crate) const DEFAULT_EXTENSIONS: &[&str] = &[
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];

/// Why a subject's public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SshKeyError {
    /// Not one line of text of at most [`MAX_LINE`] bytes.
    #[error("public_key is one line of authorized_keys, at most {MAX_LINE} bytes")]
    NotOneLine,
    /// Its first field is not a key type kms certifies.
    #[error(
        "public_key's type is not one kms certifies: ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa, sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com (authorized_keys options are not taken)"
    )]
    UnknownType,
    /// A certificate was given where a public key is asked for.
    #[error("public_key is a certificate: give the public key it certifies (id.pub)")]
    Certificate,
    /// The key is not base64.
    #[error("public_key's key is not base64")]
    NotBase64,
    /// The decoded key is not what its type says (truncated, another type, a bad field).
    #[error("public_key's key is malformed: {0}")]
    Malformed(&'static str),
    /// Bytes follow the key's last field.
    #[error("public_key's key has data after its last field")]
    TrailingData,
    /// An RSA key under [`MIN_RSA_BITS`] or over [`MAX_RSA_BITS`].
    #[error("an RSA public key is {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {0}")]
    RsaSize(usize),
}

/// What a subject key is, and its fields as the certificate carries them.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SubjectKey {
    /// Its type, as in authorized_keys (`ssh-ed25519`).
    kind: &'static str,
    /// The encoded fields after the type string (the certificate copies them).
    fields: Vec<u8>,
    /// Its comment, when it is printable text (the certificate line keeps it).
    comment: Option<String>,
}

impl fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The key types kms certifies, and their certificate types.
const TYPES: &[(&str, &str)] = &[
    ("ssh-ed25519", "ssh-ed25519-cert-v01@openssh.com"),
    (
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    ),
    (
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    ),
    (
        "ecdsa-sha2-nistp521",
        "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    ),
    ("ssh-rsa", "ssh-rsa-cert-v01@openssh.com"),
    (
        "sk-ssh-ed25519@openssh.com",
        "sk-ssh-ed25519-cert-v01@openssh.com",
    ),
    (
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    ),
];

impl SubjectKey {
    /// Reads one authorized_keys line: a type, the key in base64, maybe a comment.
    pub(crate) fn parse(line: &str) -> Result<Self, SshKeyError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() > MAX_LINE || line.contains(['\n', '\r']) {
            return Err(SshKeyError::NotOneLine);
        }
        let mut parts = line.trim().splitn(3, [' ', '\t']);
        let name = parts.next().unwrap_or_default();
        let Some(&(kind, _)) = TYPES.iter().find(|(t, _)| *t == name) else {
            return Err(if name.contains("-cert-v0") {
                SshKeyError::Certificate
            } else {
                SshKeyError::UnknownType
            });
        };
        let b64 = parts
            .next()
            .ok_or(SshKeyError::Malformed("no key after the type"))?;
        let blob = data_encoding::BASE64
            .decode(b64.as_bytes())
            .map_err(|_| SshKeyError::NotBase64)?;
        let comment = parts
            .next()
            .map(str::trim)
            .filter(|c| crate::policy::is_label(c, 1024))
            .map(str::to_owned);
        let mut r = Reader::new(&blob);
        let inner = r.string()?;
        if inner != kind.as_bytes() {
            return Err(if inner.windows(8).any(|w| w == b"-cert-v0") {
                SshKeyError::Certificate
            } else {
                SshKeyError::Malformed("the key's type is not the line's")
            });
        }
        let start = r.offset();
        match kind {
            "ssh-ed25519" | "sk-ssh-ed25519@openssh.com" => {
                if r.string()?.len() != 32 {
                    return Err(SshKeyError::Malformed("an Ed25519 key is 32 bytes"));
                }
            }
            "ssh-rsa" => {
                let e = r.mpint()?;
                let n = r.mpint()?;
                let even = |x: &[u8]| x.last().is_none_or(|b| b & 1 == 0);
                if even(e) || even(n) {
                    return Err(SshKeyError::Malformed("an RSA key's e and n are odd"));
                }
                let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    return Err(SshKeyError::RsaSize(bits));
                }
            }
            _ => {
                let (curve, len) = match kind {
                    "ecdsa-sha2-nistp384" => ("nistp384", 97),
                    "ecdsa-sha2-nistp521" => ("nistp521", 133),
                    _ => ("nistp256", 65),
                };
                if r.string()? != curve.as_bytes() {
                    return Err(SshKeyError::Malformed("the curve is not the key type's"));
                }
                let q = r.string()?;
                if q.len() != len || q.first() != Some(&4) || !on_curve(curve, q) {
                    return Err(SshKeyError::Malformed("the point is not one of the curve"));
                }
            }
        }
        if kind.starts_with("sk-") {
            // The application (FIDO relying party), "ssh:" for OpenSSH's.
            let app = r.string()?;
            if app.is_empty() || std::str::from_utf8(app).is_err() {
                return Err(SshKeyError::Malformed(
                    "a security key names its application",
                ));
            }
        }
        let fields = blob.get(start..r.offset()).unwrap_or_default().to_vec();
        if !r.is_empty() {
            return Err(SshKeyError::TrailingData);
        }
        Ok(Self {
            kind,
            fields,
            comment,
        })
    }

    /// The type of its certificates.
    fn cert_kind(&self) -> &'static str {
        TYPES
            .iter()
            .find(|(t, _)| *t == self.kind)
            .map_or("", |(_, c)| c)
    }
}

/// Whether `q` (SEC1, uncompressed) is a point of `curve`; P-521's is only checked for its
/// form (no P-521 arithmetic in the tree: sshd checks it when the key is used).
fn on_curve(curve: &str, q: &[u8]) -> bool {
    match curve {
        "nistp256" => p256::ecdsa::VerifyingKey::from_sec1_bytes(q).is_ok(),
        "nistp384" => p384::ecdsa::VerifyingKey::from_sec1_bytes(q).is_ok(),
        _ => true,
    }
}

/// A CA's public key: what signs (the issuer's key) as OpenSSH names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CaKey {
    /// The key's algorithm.
    algorithm: Algorithm,
    /// Its public key blob (RFC 4253 section 6.6).
    blob: Vec<u8>,
}

impl CaKey {
    /// The CA key of a keyring key of `algorithm` (ECDSA P-256 or Ed25519) whose public key
    /// is `pem` (SubjectPublicKeyInfo); `None` for another algorithm or a PEM that is not
    /// one.
    pub(crate) fn from_spki_pem(algorithm: Algorithm, pem: &str) -> Option<Self> {
        use p256::pkcs8::DecodePublicKey as _;
        let mut w = Writer::default();
        match algorithm {
            Algorithm::EcdsaP256Sha256 => {
                let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem).ok()?;
                w.string(b"ecdsa-sha2-nistp256");
                w.string(b"nistp256");
                w.string(key.to_sec1_point(false).as_bytes());
            }
            Algorithm::Ed25519 => {
                let key = ed25519_dalek::VerifyingKey::from_public_key_pem(pem).ok()?;
                w.string(b"ssh-ed25519");
                w.string(key.as_bytes());
            }
            _ => return None,
        }
        Some(Self {
            algorithm,
            blob: w.0,
        })
    }

    /// Whether a key of `algorithm` can be an SSH CA's.
    pub(crate) fn algorithm_fits(algorithm: Algorithm) -> bool {
        matches!(algorithm, Algorithm::EcdsaP256Sha256 | Algorithm::Ed25519)
    }

    /// Its key type as authorized_keys names it.
    fn kind(&self) -> &'static str {
        match self.algorithm {
            Algorithm::Ed25519 => "ssh-ed25519",
            _ => "ecdsa-sha2-nistp256",
        }
    }

    /// Its authorized_keys line (for TrustedUserCAKeys), with `comment`.
    pub(crate) fn line(&self, comment: &str) -> String {
        format!(
            "{} {} {comment}",
            self.kind(),
            data_encoding::BASE64.encode(&self.blob)
        )
    }

    /// The SSH signature blob of a keyring signature (`raw`: Ed25519's 64 bytes, or
    /// ECDSA's `r | s`); `None` when it is not of the length the algorithm gives.
    fn signature(&self, raw: &[u8]) -> Option<Vec<u8>> {
        let mut w = Writer::default();
        w.string(self.kind().as_bytes());
        match self.algorithm {
            Algorithm::Ed25519 if raw.len() == 64 => w.string(raw),
            Algorithm::EcdsaP256Sha256 if raw.len() == 64 => {
                let (r, s) = raw.split_at(32);
                let mut rs = Writer::default();
                rs.mpint(r);
                rs.mpint(s);
                w.string(&rs.0);
            }
            _ => return None,
        }
        Some(w.0)
    }
}

/// A user (1) or host (2) certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertType {
    /// It authenticates a user to a host.
    User,
    /// It authenticates a host to users.
    Host,
}

/// A certificate's fields: what kms decides, before it is signed.
#[derive(Debug, Clone)]
pub(crate) struct Certificate<'a> {
    /// The key certified.
    pub key: &'a SubjectKey,
    /// 32 random bytes (they make the signed bytes unpredictable).
    pub nonce: [u8; 32],
    /// A random serial.
    pub serial: u64,
    /// User or host.
    pub cert_type: CertType,
    /// Its key id (the caller's principal, logged by sshd).
    pub key_id: &'a str,
    /// The user or host names it is valid for.
    pub principals: &'a [String],
    /// Unix seconds.
    pub valid_after: u64,
    /// Unix seconds.
    pub valid_before: u64,
    /// By name (sorted, as the spec requires): force-command and source-address carry a
    /// value, verify-required none.
    pub critical_options: &'a std::collections::BTreeMap<String, String>,
    /// Sorted by [`Certificate::to_be_signed`].
    pub extensions: &'a [String],
    /// The CA's key.
    pub ca: &'a CaKey,
}

impl Certificate<'_> {
    /// The bytes the CA signs: every field up to the signature key, included.
    pub(crate) fn to_be_signed(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.string(self.key.cert_kind().as_bytes());
        w.string(&self.nonce);
        w.0.extend_from_slice(&self.key.fields);
        w.u64(self.serial);
        w.u32(match self.cert_type {
            CertType::User => 1,
            CertType::Host => 2,
        });
        w.string(self.key_id.as_bytes());
        let mut principals = Writer::default();
        for p in self.principals {
            principals.string(p.as_bytes());
        }
        w.string(&principals.0);
        w.u64(self.valid_after);
        w.u64(self.valid_before);
        let mut options = Writer::default();
        for (name, value) in self.critical_options {
            options.string(name.as_bytes());
            if value.is_empty() {
                options.string(b"");
            } else {
                let mut data = Writer::default();
                data.string(value.as_bytes());
                options.string(&data.0);
            }
        }
        w.string(&options.0);
        let mut names: Vec<&String> = self.extensions.iter().collect();
        names.sort();
        names.dedup();
        let mut extensions = Writer::default();
        for name in names {
            extensions.string(name.as_bytes());
            extensions.string(b"");
        }
        w.string(&extensions.0);
        w.string(b""); // reserved
        w.string(&self.ca.blob);
        w.0
    }

    /// The certificate's line, as ssh-keygen writes `id-cert.pub`: `to_be_signed` (what
    /// [`Certificate::to_be_signed`] gave) followed by the CA's signature over it.
    pub(crate) fn line(&self, to_be_signed: Vec<u8>, raw_signature: &[u8]) -> Option<String> {
        let signature = self.ca.signature(raw_signature)?;
        let mut w = Writer(to_be_signed);
        w.string(&signature);
        let mut line = format!(
            "{} {}",
            self.key.cert_kind(),
            data_encoding::BASE64.encode(&w.0)
        );
        if let Some(c) = &self.key.comment {
            line.push(' ');
            line.push_str(c);
        }
        line.push('\n');
        Some(line)
    }
}

/// The SSH wire encoding (RFC 4251 section 5).
#[derive(Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }

    fn u64(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }

    /// A length-prefixed string. Lengths here are bounded far below 4 GiB (a line is at
    /// most [`MAX_LINE`]), so the length always fits.
    fn string(&mut self, s: &[u8]) {
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(s);
    }

    /// An unsigned big-endian integer as an mpint: no leading zero byte unless the high
    /// bit is set, nothing for zero.
    fn mpint(&mut self, n: &[u8]) {
        let first = n.iter().position(|b| *b != 0).unwrap_or(n.len());
        let n = n.get(first..).unwrap_or_default();
        if n.first().is_some_and(|b| b & 0x80 != 0) {
            self.u32(u32::try_from(n.len() + 1).unwrap_or(u32::MAX));
            self.0.push(0);
            self.0.extend_from_slice(n);
        } else {
            self.string(n);
        }
    }
}

/// Reads the SSH wire encoding from untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn offset(&self) -> usize {
        self.at
    }

    /// Whether everything was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SshKeyError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(SshKeyError::Malformed("truncated"))?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(SshKeyError::Malformed("truncated"))?;
        self.at = end;
        Ok(out)
    }

    /// A big-endian u32.
    pub(crate) fn u32(&mut self) -> Result<u32, SshKeyError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(
            b.try_into()
                .map_err(|_| SshKeyError::Malformed("truncated"))?,
        ))
    }

    /// A big-endian u64.
    #[cfg(test)]
    pub(crate) fn u64(&mut self) -> Result<u64, SshKeyError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(
            b.try_into()
                .map_err(|_| SshKeyError::Malformed("truncated"))?,
        ))
    }

    /// A length-prefixed string.
    pub(crate) fn string(&mut self) -> Result<&'a [u8], SshKeyError> {
        let len = self.u32()?;
        self.take(usize::try_from(len).map_err(|_| SshKeyError::Malformed("truncated"))?)
    }

    /// A non-negative mpint in its minimal form, as unsigned big-endian bytes.
    fn mpint(&mut self) -> Result<&'a [u8], SshKeyError> {
        let s = self.string()?;
        match s {
            [] => Ok(s),
            [b, ..] if b & 0x80 != 0 => Err(SshKeyError::Malformed("a negative integer")),
            [0, rest @ ..] if rest.first().is_none_or(|b| b & 0x80 == 0) => Err(
                SshKeyError::Malformed("an integer not in its shortest form"),
            ),
            [0, rest @ ..] => Ok(rest),
            _ => Ok(s),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
