//! What the credentials engine stores (issuers), and the rules on what an administrator may
//! define: every string here ends up in tokens, audit records and reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CredentialsError;
use crate::barrier::Purpose;
use crate::policy::Pattern;

/// The purpose of issuer records.
#[allow(
    clippy::panic,
    reason = "evaluated when the const is: a bad name fails the build"
)]
pub(crate) const ISSUER: Purpose = match Purpose::new("credentials/issuer") {
    Some(p) => p,
    None => panic!("a purpose is [a-z0-9_/-]{{1,64}}"),
};

/// The purpose of revocation records.
#[allow(
    clippy::panic,
    reason = "evaluated when the const is: a bad name fails the build"
)]
pub(crate) const REVOCATION: Purpose = match Purpose::new("credentials/revocation") {
    Some(p) => p,
    None => panic!("a purpose is [a-z0-9_/-]{{1,64}}"),
};

/// The schema of issuer records.
pub(crate) const SCHEMA: u32 = 1;

/// A token's lifetime when neither the request nor the issuer says: 5 minutes (SPIRE's).
pub(crate) const DEFAULT_TTL: u64 = 300;
/// The longest lifetime an issuer allows unless it says: 1 hour.
pub(crate) const DEFAULT_MAX_TTL: u64 = 3600;
/// The longest lifetime any issuer may allow: 24 hours. Tokens are short-lived, and a
/// revoked token is refused until it expires.
pub(crate) const MAX_TTL_LIMIT: u64 = 86_400;

/// The most principals, delegators, subjects and audiences an issuer names, each.
pub(crate) const MAX_LIST: usize = 64;
/// The longest audience.
const MAX_AUDIENCE: usize = 256;
/// The most fixed claims, their longest name and value.
const MAX_CLAIMS: usize = 32;
const MAX_CLAIM_NAME: usize = 64;
const MAX_CLAIM_VALUE: usize = 1024;
/// The most bytes of fixed claims' names and values in all: every token carries them, and
/// a token must stay within what verifiers take (16 KiB, [`super::jose::MAX_TOKEN_LEN`],
/// with a subject and a delegator of 2 KiB each).
const MAX_CLAIMS_BYTES: usize = 4096;

/// The claims kms sets itself, which an issuer's fixed claims may not name.
pub(crate) const REGISTERED: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "act"];

/// An issuer, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Issuer {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Its name (a key's name's rules).
    pub name: String,
    /// The keyring key that signs.
    pub key: String,
    /// Who may ask for a token for themselves.
    pub principals: Vec<Pattern>,
    /// The audiences a token may be asked for.
    pub audiences: Vec<String>,
    /// A token's lifetime when the request gives none, in seconds.
    pub default_ttl: u64,
    /// The longest lifetime a request may ask for, in seconds.
    pub max_ttl: u64,
    /// Claims every token carries.
    pub claims: BTreeMap<String, String>,
    /// Who may ask on behalf of a subject.
    pub delegators: Vec<Pattern>,
    /// The subjects a delegator may ask for.
    pub subjects: Vec<Pattern>,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// The principal who defined it.
    pub created_by: String,
}

impl Issuer {
    /// Checks what an administrator defined: the name, the key's name, the lists' sizes and
    /// characters, the lifetimes, the fixed claims.
    pub(crate) fn check(&self) -> Result<(), CredentialsError> {
        crate::keyring::model::check_name(&self.name).map_err(|_| {
            CredentialsError::BadRequest(
                "an issuer's name is 1 to 128 bytes of [A-Za-z0-9_.-]".to_owned(),
            )
        })?;
        crate::keyring::model::check_name(&self.key).map_err(|_| {
            CredentialsError::BadRequest(
                "an issuer's key is a key's name: 1 to 128 bytes of [A-Za-z0-9_.-]".to_owned(),
            )
        })?;
        if self.principals.is_empty() && self.delegators.is_empty() {
            return Err(CredentialsError::BadRequest(
                "an issuer names at least one principal or delegator who may ask".to_owned(),
            ));
        }
        for (list, what) in [
            (&self.principals, "principals"),
            (&self.delegators, "delegators"),
            (&self.subjects, "subjects"),
        ] {
            if list.len() > MAX_LIST {
                return Err(CredentialsError::BadRequest(format!(
                    "an issuer names at most {MAX_LIST} {what}"
                )));
            }
        }
        if !self.delegators.is_empty() && self.subjects.is_empty() {
            return Err(CredentialsError::BadRequest(
                "an issuer with delegators names the subjects they may ask for".to_owned(),
            ));
        }
        if self.audiences.is_empty() || self.audiences.len() > MAX_LIST {
            return Err(CredentialsError::BadRequest(format!(
                "an issuer names 1 to {MAX_LIST} audiences"
            )));
        }
        for a in &self.audiences {
            check_text(a, MAX_AUDIENCE, "an audience")?;
        }
        if self.max_ttl == 0 || self.max_ttl > MAX_TTL_LIMIT {
            return Err(CredentialsError::BadRequest(format!(
                "max_ttl_seconds is 1 to {MAX_TTL_LIMIT} (24 hours)"
            )));
        }
        if self.default_ttl == 0 || self.default_ttl > self.max_ttl {
            return Err(CredentialsError::BadRequest(
                "default_ttl_seconds is 1 to max_ttl_seconds".to_owned(),
            ));
        }
        if matches!(self.name.as_str(), "." | "..") {
            return Err(CredentialsError::BadRequest(
                "an issuer's name is not `.` or `..`: it is a path segment of its URL".to_owned(),
            ));
        }
        let claims_bytes: usize = self.claims.iter().map(|(k, v)| k.len() + v.len()).sum();
        if claims_bytes > MAX_CLAIMS_BYTES {
            return Err(CredentialsError::BadRequest(format!(
                "an issuer's claims are at most {MAX_CLAIMS_BYTES} bytes of names and values in all"
            )));
        }
        if self.claims.len() > MAX_CLAIMS {
            return Err(CredentialsError::BadRequest(format!(
                "an issuer sets at most {MAX_CLAIMS} claims"
            )));
        }
        for (name, value) in &self.claims {
            let ok = !name.is_empty()
                && name.len() <= MAX_CLAIM_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'));
            if !ok {
                return Err(CredentialsError::BadRequest(format!(
                    "a claim's name is 1 to {MAX_CLAIM_NAME} bytes of [A-Za-z0-9_.:-]"
                )));
            }
            if REGISTERED.contains(&name.as_str()) {
                return Err(CredentialsError::BadRequest(format!(
                    "the claim {name:?} is set by kms: an issuer's claims are others"
                )));
            }
            check_text(value, MAX_CLAIM_VALUE, "a claim's value")?;
        }
        Ok(())
    }

    /// Whether `principal` may ask for a token for itself.
    pub(crate) fn allows(&self, principal: &str) -> bool {
        self.principals.iter().any(|p| p.matches(principal))
    }

    /// Whether `principal` may ask on behalf of `subject`.
    pub(crate) fn allows_delegation(&self, principal: &str, subject: &str) -> bool {
        self.delegators.iter().any(|p| p.matches(principal))
            && self.subjects.iter().any(|p| p.matches(subject))
    }
}

/// Checks a string an administrator or a caller gives that ends up in tokens and records: 1
/// to `max` bytes, no control or invisible character.
pub(crate) fn check_text(s: &str, max: usize, what: &str) -> Result<(), CredentialsError> {
    if !crate::policy::is_label(s, max) {
        return Err(CredentialsError::BadRequest(format!(
            "{what} is 1 to {max} bytes, without control or invisible characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn issuer() -> Issuer {
        Issuer {
            schema: SCHEMA,
            name: "workloads".to_owned(),
            key: "jwt-signer".to_owned(),
            principals: vec![Pattern::new("spiffe://corp/app/*").unwrap()],
            audiences: vec!["payments".to_owned()],
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            claims: BTreeMap::new(),
            delegators: Vec::new(),
            subjects: Vec::new(),
            created_ms: 0,
            created_by: "admin".to_owned(),
        }
    }

    #[test]
    fn an_issuer_is_checked_before_it_is_stored() {
        assert!(issuer().check().is_ok());
        let bad: [fn(&mut Issuer); 14] = [
            |i: &mut Issuer| i.name = "..".to_owned(),
            |i: &mut Issuer| {
                for n in 0..5 {
                    i.claims.insert(format!("c{n}"), "x".repeat(1000));
                }
            },
            |i: &mut Issuer| i.name = "a b".to_owned(),
            |i: &mut Issuer| i.key = String::new(),
            |i: &mut Issuer| i.principals.clear(),
            |i: &mut Issuer| i.audiences.clear(),
            |i: &mut Issuer| i.audiences = vec!["a\u{202e}b".to_owned()],
            |i: &mut Issuer| i.max_ttl = MAX_TTL_LIMIT + 1,
            |i: &mut Issuer| i.default_ttl = i.max_ttl + 1,
            |i: &mut Issuer| i.default_ttl = 0,
            (|i: &mut Issuer| {
                i.claims.insert("sub".to_owned(), "x".to_owned());
            }),
            (|i: &mut Issuer| {
                i.claims.insert("a b".to_owned(), "x".to_owned());
            }),
            (|i: &mut Issuer| {
                i.claims.insert("team".to_owned(), "x\ny".to_owned());
            }),
            |i: &mut Issuer| i.delegators = vec![Pattern::new("spiffe://corp/ci").unwrap()],
        ];
        for (n, change) in bad.iter().enumerate() {
            let mut i = issuer();
            change(&mut i);
            assert!(i.check().is_err(), "change {n} accepted");
        }
    }

    #[test]
    fn principals_ask_for_themselves_and_delegators_for_their_subjects() {
        let mut i = issuer();
        assert!(i.allows("spiffe://corp/app/web"));
        assert!(!i.allows("spiffe://corp/other"));
        assert!(!i.allows_delegation("spiffe://corp/ci", "spiffe://corp/app/web"));
        i.delegators = vec![Pattern::new("spiffe://corp/ci").unwrap()];
        i.subjects = vec![Pattern::new("spiffe://corp/app/*").unwrap()];
        assert!(i.allows_delegation("spiffe://corp/ci", "spiffe://corp/app/web"));
        assert!(!i.allows_delegation("spiffe://corp/ci", "spiffe://corp/admin"));
        assert!(!i.allows_delegation("spiffe://corp/app/web", "spiffe://corp/app/db"));
    }
}
