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
/// A certificate's lifetime when neither the request nor the issuer says: 1 hour (SPIRE's).
pub(crate) const DEFAULT_CERT_TTL: u64 = 3600;
/// How long a new key version is published before it signs unless the issuer says: twice
/// the HTTPS front's max-age for the published keys, so that a verifier that cached them
/// just before the rotation has them again before the first token it signs.
pub(crate) const DEFAULT_PUBLISH_AHEAD: u64 = 120;
/// The longest an issuer may publish a key before it signs: 7 days.
pub(crate) const MAX_PUBLISH_AHEAD: u64 = 7 * 86_400;
/// The longest lifetime an issuer allows unless it says: 1 hour.
pub(crate) const DEFAULT_MAX_TTL: u64 = 3600;
/// The longest lifetime any issuer may allow: 24 hours. Tokens are short-lived, and a
/// revoked token is refused until it expires.
pub(crate) const MAX_TTL_LIMIT: u64 = 86_400;

/// The most principals, delegators, subjects and audiences an issuer names, each.
pub(crate) const MAX_LIST: usize = 64;
/// The longest SSH principal.
pub(crate) const MAX_SSH_PRINCIPAL: usize = 256;
/// The longest force-command.
const MAX_FORCE_COMMAND: usize = 4096;
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

/// What an issuer issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// JWT-SVIDs.
    #[default]
    Jwt,
    /// X.509-SVIDs.
    X509,
    /// OpenSSH user certificates.
    SshUser,
    /// OpenSSH host certificates.
    SshHost,
}

impl Kind {
    /// Its name in records, reports and the CLI.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::X509 => "x509",
            Self::SshUser => "ssh_user",
            Self::SshHost => "ssh_host",
        }
    }

    /// Whether it issues OpenSSH certificates.
    pub(crate) fn is_ssh(self) -> bool {
        matches!(self, Self::SshUser | Self::SshHost)
    }
}

/// An x509 issuer's CA certificate for one version of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaCert {
    /// The key version.
    pub version: u32,
    /// The CA certificate, then those above it, DER each; empty while an outside CA's
    /// certificate is awaited.
    pub chain: Vec<Vec<u8>>,
    /// Whether kms made it.
    pub self_signed: bool,
    /// When it was set, Unix seconds: its CA has been published since (0 in records made
    /// before this was kept: published since its key version was made).
    #[serde(default)]
    pub set_at: u64,
}

/// An issuer, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Issuer {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Its name (a key's name's rules).
    pub name: String,
    /// What it issues (records made before kinds: JWTs).
    #[serde(default)]
    pub kind: Kind,
    /// How long a new key version is published before it signs, seconds.
    #[serde(default = "default_publish_ahead")]
    pub publish_ahead: u64,
    /// x509: its CA certificates, by key version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca: Vec<CaCert>,
    /// x509: whether kms signs its CA certificates itself.
    #[serde(default)]
    pub self_signed: bool,
    /// ssh: the principals a certificate may name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_principals: Vec<String>,
    /// ssh_user: critical options every certificate carries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ssh_critical_options: BTreeMap<String, String>,
    /// ssh_user: extensions every certificate carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_extensions: Vec<String>,
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

fn default_publish_ahead() -> u64 {
    DEFAULT_PUBLISH_AHEAD
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
        // A prefix covers whole path segments: `spiffe://corp/app*` would also match
        // `spiffe://corp/app-admin`, and `spiffe://corp*` another trust domain.
        for p in self
            .principals
            .iter()
            .chain(&self.delegators)
            .chain(&self.subjects)
        {
            if p.as_str().ends_with('*') && !p.as_str().ends_with("/*") {
                return Err(CredentialsError::BadRequest(format!(
                    "the pattern {:?} ends in a partial name: an issuer's patterns are names, or prefixes ending in `/*` (a whole path segment)",
                    super::bounded(p.as_str())
                )));
            }
        }
        if !self.delegators.is_empty() && self.subjects.is_empty() {
            return Err(CredentialsError::BadRequest(
                "an issuer with delegators names the subjects they may ask for".to_owned(),
            ));
        }
        if self.publish_ahead > MAX_PUBLISH_AHEAD {
            return Err(CredentialsError::BadRequest(format!(
                "publish_ahead_seconds is at most {MAX_PUBLISH_AHEAD} (7 days)"
            )));
        }
        self.check_kind()?;
        if self.kind == Kind::Jwt && (self.audiences.is_empty() || self.audiences.len() > MAX_LIST)
        {
            return Err(CredentialsError::BadRequest(format!(
                "a jwt issuer names 1 to {MAX_LIST} audiences"
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

    /// What only some kinds have is not set on the others.
    fn check_kind(&self) -> Result<(), CredentialsError> {
        let only = |set: bool, what: &str, kinds: &str| {
            if set {
                Err(CredentialsError::BadRequest(format!(
                    "{what} is for {kinds} issuers, not {}",
                    self.kind.name()
                )))
            } else {
                Ok(())
            }
        };
        let jwt = self.kind == Kind::Jwt;
        only(!jwt && !self.audiences.is_empty(), "audiences", "jwt")?;
        only(!jwt && !self.claims.is_empty(), "claims", "jwt")?;
        let x509 = self.kind == Kind::X509;
        only(!x509 && !self.ca.is_empty(), "a CA certificate", "x509")?;
        only(!x509 && self.self_signed, "self_signed", "x509")?;
        let ssh = self.kind.is_ssh();
        only(
            !ssh && !self.ssh_principals.is_empty(),
            "ssh_principals",
            "ssh",
        )?;
        let user = self.kind == Kind::SshUser;
        only(
            !user && !self.ssh_critical_options.is_empty(),
            "ssh_critical_options",
            "ssh_user",
        )?;
        only(
            !user && !self.ssh_extensions.is_empty(),
            "ssh_extensions",
            "ssh_user",
        )?;
        // A token names its delegator (`act`); a certificate cannot, and kms itself would
        // take a delegated X.509-SVID as its subject's own client certificate.
        only(!jwt && !self.delegators.is_empty(), "delegation", "jwt")?;
        only(!jwt && !self.subjects.is_empty(), "subjects", "jwt")?;
        if ssh {
            self.check_ssh()?;
        }
        Ok(())
    }

    /// An ssh issuer's principals, critical options and extensions: what OpenSSH reads.
    fn check_ssh(&self) -> Result<(), CredentialsError> {
        if self.ssh_principals.is_empty() || self.ssh_principals.len() > MAX_LIST {
            return Err(CredentialsError::BadRequest(format!(
                "an ssh issuer names 1 to {MAX_LIST} ssh_principals"
            )));
        }
        for p in &self.ssh_principals {
            check_ssh_principal(p)?;
        }
        for (name, value) in &self.ssh_critical_options {
            match name.as_str() {
                "force-command" => check_text(value, MAX_FORCE_COMMAND, "force-command")?,
                "source-address" => check_source_address(value)?,
                "verify-required" if value.is_empty() => {}
                "verify-required" => {
                    return Err(CredentialsError::BadRequest(
                        "verify-required takes no value".to_owned(),
                    ));
                }
                _ => {
                    return Err(CredentialsError::BadRequest(
                        "an ssh critical option is force-command, source-address or verify-required"
                            .to_owned(),
                    ));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for e in &self.ssh_extensions {
            if !super::ssh::KNOWN_EXTENSIONS.contains(&e.as_str()) {
                return Err(CredentialsError::BadRequest(format!(
                    "an ssh extension is one of {}",
                    super::ssh::KNOWN_EXTENSIONS.join(", ")
                )));
            }
            if !seen.insert(e) {
                return Err(CredentialsError::BadRequest(format!(
                    "the ssh extension {e} is named twice"
                )));
            }
        }
        Ok(())
    }

    /// Its key's enabled versions, each with when its public side was first published:
    /// an x509 issuer's version is published with its CA certificate, which an outside CA
    /// may have signed long after the version was made.
    pub(crate) fn published(&self, enabled: &[super::KeyVersion]) -> Vec<super::KeyVersion> {
        enabled
            .iter()
            .map(|v| super::KeyVersion {
                version: v.version,
                created_at: self
                    .ca
                    .iter()
                    .find(|c| c.version == v.version && self.kind == Kind::X509)
                    .map_or(v.created_at, |c| v.created_at.max(c.set_at)),
            })
            .collect()
    }

    /// Whether version `v` of its key may sign for it: an x509 issuer's needs a CA
    /// certificate.
    pub(crate) fn can_sign_with(&self, v: u32) -> bool {
        self.kind != Kind::X509
            || self
                .ca
                .iter()
                .any(|c| c.version == v && !c.chain.is_empty())
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

/// An ssh issuer's principal that stands for the caller's own name ([`caller_name`]): the
/// one principal a certificate may name that differs from caller to caller.
pub(crate) const CALLER_NAME: &str = "{{name}}";

/// The caller's own name, as [`CALLER_NAME`] resolves: the last path segment of its
/// SPIFFE ID (`spiffe://corp/people/alice`: `alice`; `spiffe://corp/host/db1.corp`:
/// `db1.corp`), or the name of a `cn:NAME` principal; `None` when that is not an SSH
/// principal (empty, too long, with whitespace, commas or control characters).
pub(crate) fn caller_name(principal: &str) -> Option<&str> {
    let name = if let Some(cn) = principal.strip_prefix("cn:") {
        cn
    } else if crate::access::tls::is_spiffe_id(principal) {
        let (_, path) = principal.strip_prefix("spiffe://")?.split_once('/')?;
        path.rsplit('/').next()?
    } else {
        return None;
    };
    (name != CALLER_NAME && check_ssh_principal(name).is_ok()).then_some(name)
}

/// Checks an SSH principal (a user or host name a certificate names): 1 to
/// [`MAX_SSH_PRINCIPAL`] bytes without whitespace, commas (sshd splits on them) or
/// control characters.
pub(crate) fn check_ssh_principal(p: &str) -> Result<(), CredentialsError> {
    if p == CALLER_NAME {
        return Ok(());
    }
    let ok = !p.is_empty()
        && p.len() <= MAX_SSH_PRINCIPAL
        && crate::policy::is_label(p, MAX_SSH_PRINCIPAL)
        && !p.chars().any(|c| c.is_whitespace() || c == ',');
    if !ok {
        return Err(CredentialsError::BadRequest(format!(
            "an ssh principal is 1 to {MAX_SSH_PRINCIPAL} bytes, without whitespace, commas or control characters"
        )));
    }
    Ok(())
}

/// Checks a source-address critical option: a comma-separated list of addresses and CIDR
/// blocks (`10.0.0.0/8,2001:db8::/32`), without host bits under the mask.
fn check_source_address(list: &str) -> Result<(), CredentialsError> {
    let bad = || {
        CredentialsError::BadRequest(format!(
            "source-address is 1 to {MAX_LIST} addresses or CIDR blocks (10.0.0.0/8), separated by commas"
        ))
    };
    let entries: Vec<&str> = list.split(',').collect();
    if list.is_empty() || entries.len() > MAX_LIST {
        return Err(bad());
    }
    for entry in entries {
        let (addr, len) = match entry.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (entry, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let (bits, value) = match addr {
            std::net::IpAddr::V4(a) => (32u32, u128::from(u32::from(a)) << 96),
            std::net::IpAddr::V6(a) => (128, u128::from(a)),
        };
        let Some(len) = len else { continue };
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let len: u32 = len.parse().map_err(|_| bad())?;
        if len > bits {
            return Err(bad());
        }
        let host = u128::MAX.checked_shr(len).unwrap_or(0);
        if value & host != 0 {
            return Err(CredentialsError::BadRequest(format!(
                "source-address: {entry} has bits set under its mask"
            )));
        }
    }
    Ok(())
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
            kind: Kind::Jwt,
            publish_ahead: DEFAULT_PUBLISH_AHEAD,
            ca: Vec::new(),
            self_signed: false,
            ssh_principals: Vec::new(),
            ssh_critical_options: BTreeMap::new(),
            ssh_extensions: Vec::new(),
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
        let bad: [fn(&mut Issuer); 21] = [
            |i: &mut Issuer| i.publish_ahead = MAX_PUBLISH_AHEAD + 1,
            |i: &mut Issuer| i.principals = vec![Pattern::new("spiffe://corp/app*").unwrap()],
            |i: &mut Issuer| i.kind = Kind::X509,
            |i: &mut Issuer| i.self_signed = true,
            |i: &mut Issuer| i.ssh_principals = vec!["root".to_owned()],
            |i: &mut Issuer| {
                i.kind = Kind::SshHost;
                i.audiences.clear();
                i.ssh_extensions = vec!["permit-pty".to_owned()];
            },
            |i: &mut Issuer| {
                i.kind = Kind::X509;
                i.audiences.clear();
                i.claims.insert("team".to_owned(), "x".to_owned());
            },
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

    /// An issuer stored before issuers had kinds is a JWT issuer that publishes a new key
    /// version for the default time before it signs.
    #[test]
    fn a_record_made_before_kinds_is_a_jwt_issuer() {
        let mut old: serde_json::Value = serde_json::to_value(issuer()).unwrap();
        let map = old.as_object_mut().unwrap();
        for gone in ["kind", "publish_ahead", "self_signed"] {
            assert!(map.remove(gone).is_some(), "{gone}");
        }
        let read: Issuer = serde_json::from_value(old).unwrap();
        assert_eq!(read.kind, Kind::Jwt);
        assert_eq!(read.publish_ahead, DEFAULT_PUBLISH_AHEAD);
        assert_eq!(read, issuer());
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
