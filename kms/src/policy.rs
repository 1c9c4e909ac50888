//! The vocabulary of who may do what, shared by the keyring (grants) and access control: the
//! operations a grant can allow, principal patterns, the principals kms reserves, and the
//! characters no name may hold. A leaf: it depends on nothing else in the crate, so the
//! domain never imports the access layer for these types.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The principal of a caller without a client certificate (on a TLS listener).
pub(crate) const ANONYMOUS: &str = "anonymous";

/// The principal of every caller on a plaintext loopback listener (no certificate there).
pub const LOOPBACK: &str = "loopback";

/// Whether `s` is 1 to `max` bytes without a control or invisible character
/// ([`is_invisible`]): a label that ends up in records, reports and logs as it is.
pub fn is_label(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(is_invisible)
}

/// Whether `c` is a character no name may hold: a control character, or an invisible
/// Unicode format character (zero-width, bidirectional overrides and isolates, BOM), which
/// would make two names look alike or reorder what a reader sees.
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// An operation a grant can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// `Encrypt`, `BatchEncrypt`.
    Encrypt,
    /// `Decrypt`, `BatchDecrypt`.
    Decrypt,
    /// `ReEncrypt`, `BatchReEncrypt`, on the source key.
    ReencryptFrom,
    /// `ReEncrypt`, `BatchReEncrypt`, on the destination key.
    ReencryptTo,
    /// Before the split into [`Operation::ReencryptFrom`] and [`Operation::ReencryptTo`]:
    /// allows nothing. Kept so that older grant records still load (and list); new grants
    /// cannot name it.
    Reencrypt,
    /// `GenerateDataKey`, `GenerateDataKeyWithoutPlaintext`.
    GenerateDataKey,
    /// `Sign`, `BatchSign`.
    Sign,
    /// `Verify`.
    Verify,
    /// `GetPublicKey`.
    GetPublicKey,
    /// `Mac`.
    Mac,
    /// `VerifyMac`.
    VerifyMac,
}

impl Operation {
    /// Every operation a new grant can name.
    pub const ALL: [Operation; 10] = [
        Self::Encrypt,
        Self::Decrypt,
        Self::ReencryptFrom,
        Self::ReencryptTo,
        Self::GenerateDataKey,
        Self::Sign,
        Self::Verify,
        Self::GetPublicKey,
        Self::Mac,
        Self::VerifyMac,
    ];

    /// The name operators write (`generate-data-key`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::ReencryptFrom => "reencrypt-from",
            Self::ReencryptTo => "reencrypt-to",
            Self::Reencrypt => "reencrypt",
            Self::GenerateDataKey => "generate-data-key",
            Self::Sign => "sign",
            Self::Verify => "verify",
            Self::GetPublicKey => "get-public-key",
            Self::Mac => "mac",
            Self::VerifyMac => "verify-mac",
        }
    }

    /// Parses [`Operation::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name() == s)
    }

    /// What a call needing `self` on its key needs on its destination key (ReEncrypt).
    pub(crate) fn on_destination(self) -> Self {
        match self {
            Self::ReencryptFrom => Self::ReencryptTo,
            other => other,
        }
    }

    /// Whether requests of this operation carry associated data (so that a grant may
    /// constrain it).
    pub(crate) fn has_associated_data(self) -> bool {
        matches!(
            self,
            Self::Encrypt
                | Self::Decrypt
                | Self::ReencryptFrom
                | Self::ReencryptTo
                | Self::GenerateDataKey
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An operation a grant on secrets' paths can allow (the secrets engine, docs/secrets.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretOperation {
    /// Read a version's values (`GetSecret`).
    SecretRead,
    /// Write a version, patch one, set a secret's metadata.
    SecretWrite,
    /// List the paths under a prefix.
    SecretList,
    /// Delete versions softly, and undelete them.
    SecretDelete,
    /// Destroy versions' values, or a secret with all its versions.
    SecretDestroy,
    /// Read a secret's metadata and its values' names, never its values.
    SecretReadMetadata,
}

impl SecretOperation {
    /// Every operation.
    pub const ALL: [SecretOperation; 6] = [
        Self::SecretRead,
        Self::SecretWrite,
        Self::SecretList,
        Self::SecretDelete,
        Self::SecretDestroy,
        Self::SecretReadMetadata,
    ];

    /// The name operators write (`secret-read`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SecretRead => "secret-read",
            Self::SecretWrite => "secret-write",
            Self::SecretList => "secret-list",
            Self::SecretDelete => "secret-delete",
            Self::SecretDestroy => "secret-destroy",
            Self::SecretReadMetadata => "secret-read-metadata",
        }
    }

    /// Parses [`SecretOperation::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name() == s)
    }
}

impl fmt::Display for SecretOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A principal pattern: exact, or a prefix followed by `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern(String);

/// Why a pattern is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Empty.
    #[error("a principal pattern is empty")]
    Empty,
    /// `*` alone.
    #[error(
        "the pattern \"*\" would match every certificate: name a prefix, e.g. \"spiffe://example.org/ops/*\""
    )]
    Everything,
    /// `*` not at the end, or a control character.
    #[error(
        "principal pattern {0:?}: only a trailing `*` is special, and control characters are not allowed"
    )]
    Malformed(String),
    /// Longer than 1024 bytes.
    #[error("a principal pattern is longer than 1024 bytes")]
    TooLong,
}

impl Pattern {
    /// Checks and makes a pattern.
    pub fn new(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.len() > 1024 {
            return Err(PatternError::TooLong);
        }
        if s == "*" {
            return Err(PatternError::Everything);
        }
        let body = s.strip_suffix('*').unwrap_or(s);
        if body.contains('*') || s.chars().any(is_invisible) {
            return Err(PatternError::Malformed(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// Whether `principal` matches. Patterns never match `ANONYMOUS`
    /// unless they name it exactly, and a prefix pattern never matches
    /// [`LOOPBACK`] or `anonymous` at all.
    pub fn matches(&self, principal: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => {
                principal != ANONYMOUS && principal != LOOPBACK && principal.starts_with(prefix)
            }
            None => self.0 == principal,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Pattern {
    type Error = PatternError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> Self {
        p.0
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_exact_or_trailing_star() {
        let p = Pattern::new("spiffe://corp/ops/*").unwrap();
        assert!(p.matches("spiffe://corp/ops/alice"));
        assert!(!p.matches("spiffe://corp/opsx"));
        assert!(!p.matches("spiffe://corp/app"));
        let e = Pattern::new("alice").unwrap();
        assert!(e.matches("alice") && !e.matches("alice2"));
        assert_eq!(Pattern::new("*"), Err(PatternError::Everything));
        assert_eq!(Pattern::new(""), Err(PatternError::Empty));
        assert!(matches!(
            Pattern::new("a*b"),
            Err(PatternError::Malformed(_))
        ));
        assert!(matches!(
            Pattern::new("a\nb"),
            Err(PatternError::Malformed(_))
        ));
        // A prefix never matches the callers without a certificate.
        assert!(!Pattern::new("a*").unwrap().matches("anonymous"));
        assert!(!Pattern::new("l*").unwrap().matches(LOOPBACK));
    }
}
