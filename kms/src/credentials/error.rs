//! What can go wrong in the credentials engine. No message holds a token's text.

use crate::store::StoreError;

/// An error of the credentials engine.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialsError {
    /// The request cannot be served as asked (what is wrong, never a token).
    #[error("{0}")]
    BadRequest(String),
    /// A subject's SSH public key was refused (untrusted input: what is wrong with it).
    #[error(transparent)]
    SshKey(#[from] super::ssh::SshKeyError),
    /// No issuer of this name.
    #[error("no issuer {0:?}")]
    IssuerNotFound(String),
    /// An issuer of this name exists.
    #[error("an issuer {0:?} exists")]
    IssuerExists(String),
    /// The issuer issues another kind of credential.
    #[error("issuer {issuer:?} issues {kind} credentials, not {asked}")]
    WrongKind {
        /// The issuer.
        issuer: String,
        /// What it issues.
        kind: &'static str,
        /// What was asked.
        asked: &'static str,
    },
    /// The caller may not ask this issuer (for this subject).
    #[error("permission denied: {0}")]
    Denied(String),
    /// The issuer's key cannot sign what it issues (its algorithm, state or purpose).
    #[error("the issuer's key cannot sign: {0}")]
    KeyUnusable(String),
    /// A caller's certificate request is refused (untrusted input).
    #[error("certificate request refused: {0}")]
    BadCsr(super::x509::CsrProblem),
    /// An administrator's CA chain is refused (nothing was stored).
    #[error("CA certificate refused: {0}")]
    BadCaChain(super::x509::ChainProblem),
    /// No version of an x509 issuer's key has a CA certificate yet (an outside CA's is
    /// awaited: GetIssuerCsr, SetIssuerCertificate).
    #[error(
        "no version of the issuer's key has a CA certificate: have the company's CA sign its request (kms issuer csr), then set it (kms issuer set-certificate)"
    )]
    NoCaCertificate,
    /// Issuers publish their keys on the HTTPS front, which is off: no token can name where.
    #[error(
        "credential issuers publish their keys on the HTTPS front: set [http] listen (and public_url) to issue and validate tokens"
    )]
    NoHttpsFront,
    /// A stored record did not open or parse: someone other than kms wrote it.
    #[error("a stored record of the credentials engine is not authentic ({0}): refused")]
    Tampered(String),
    /// The keyring refused or failed.
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The audit record of a change could not be written: the change was not made.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Randomness,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
