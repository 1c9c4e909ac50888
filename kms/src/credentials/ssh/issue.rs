//! OpenSSH certificates issued: the engine's side of [`super`] (the format is the parent
//! module's): an ssh issuer's checks, the principals a caller may have, the certificate
//! signed by the version that signs now, and the CA keys as an authorized_keys file.

use crate::credentials::model::{self, Issuer};
use crate::credentials::ssh;
use crate::credentials::{
    Credentials, CredentialsError, KeySource, SSH_KEY_ALGORITHMS, SignatureEncoding, bounded, now,
    signing_version, ttl_of,
};

/// A request for an OpenSSH certificate.
pub(crate) struct SshRequest<'a> {
    /// The issuer's name (an ssh_user or ssh_host issuer).
    pub issuer: &'a str,
    /// The key to certify: one authorized_keys line (untrusted).
    pub public_key: &'a str,
    /// Some of the issuer's ssh_principals; empty: all of them.
    pub principals: &'a [String],
    /// 0: the issuer's default.
    pub ttl: u64,
}

/// A certificate issued, and what its record says of it.
pub(crate) struct SshIssued {
    /// The certificate's line, as ssh-keygen writes `id-cert.pub`.
    pub certificate: String,
    /// Its serial.
    pub serial: u64,
    /// The principals it names.
    pub principals: Vec<String>,
    /// What the record names (the serial in decimal as its `jti`, the caller as its
    /// subject and key id).
    pub summary: crate::audit::CredentialSummary,
    /// The key that signed (its version is the summary's).
    pub key: String,
}

impl Credentials {
    /// The issuer `name`, which must issue SSH certificates (user or host).
    fn ssh_issuer(&self, name: &str) -> Result<Issuer, CredentialsError> {
        let issuer = self.issuer(name)?;
        if !issuer.kind.is_ssh() {
            return Err(CredentialsError::WrongKind {
                issuer: issuer.name,
                kind: issuer.kind.name(),
                asked: "ssh_user or ssh_host",
            });
        }
        Ok(issuer)
    }

    /// Issues an OpenSSH certificate of `caller`'s (its principal, the certificate's key
    /// id) for a public key: a user certificate from an ssh_user issuer, a host
    /// certificate from an ssh_host one.
    pub(crate) fn issue_ssh(
        &self,
        keys: &dyn KeySource,
        caller: &str,
        req: &SshRequest<'_>,
    ) -> Result<SshIssued, CredentialsError> {
        let issuer = self.ssh_issuer(req.issuer)?;
        let cert_type = if issuer.kind == model::Kind::SshUser {
            ssh::CertType::User
        } else {
            ssh::CertType::Host
        };
        if !issuer.allows(caller) {
            return Err(CredentialsError::Denied(format!(
                "{caller:?} may not ask issuer {:?} for a certificate",
                issuer.name
            )));
        }
        // The key id, which sshd logs: no control or invisible character.
        model::check_text(
            caller,
            ssh::MAX_KEY_ID,
            "the caller's principal (the key id)",
        )?;
        let subject = ssh::SubjectKey::parse(req.public_key)?;
        let principals = ssh_principals(&issuer, caller, req.principals)?;
        let ttl = ttl_of(&issuer, req.ttl)?;
        let versions = keys.versions(&issuer.key)?;
        let now = now();
        let version = signing_version(&versions.enabled, issuer.publish_ahead, now, |_| true)
            .ok_or_else(|| CredentialsError::KeyUnusable("no version is enabled".to_owned()))?;
        let ca =
            ssh::CaKey::from_spki_pem(versions.algorithm, &keys.public_key(&issuer.key, version)?)
                .ok_or_else(|| CredentialsError::KeyUnusable(SSH_KEY_ALGORITHMS.to_owned()))?;
        let mut nonce = [0u8; 32];
        let mut serial = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|_| CredentialsError::Randomness)?;
        getrandom::fill(&mut serial).map_err(|_| CredentialsError::Randomness)?;
        let serial = u64::from_be_bytes(serial);
        let no_options = std::collections::BTreeMap::new();
        let user = cert_type == ssh::CertType::User;
        let expires = now.saturating_add(ttl);
        let cert = ssh::Certificate {
            key: &subject,
            nonce,
            serial,
            cert_type,
            key_id: caller,
            principals: &principals,
            valid_after: now.saturating_sub(ssh::BACKDATE),
            valid_before: expires,
            critical_options: if user {
                &issuer.ssh_critical_options
            } else {
                &no_options
            },
            extensions: if user { &issuer.ssh_extensions } else { &[] },
            ca: &ca,
        };
        let tbs = cert.to_be_signed();
        let signature = keys.sign(&issuer.key, version, &tbs, SignatureEncoding::Raw)?;
        let certificate = cert
            .line(tbs, &signature)
            .ok_or(CredentialsError::Internal("a signature of another length"))?;
        Ok(SshIssued {
            key: issuer.key.clone(),
            certificate,
            serial,
            summary: crate::audit::CredentialSummary {
                issuer: issuer.name.clone(),
                kind: issuer.kind.name().to_owned(),
                subject: caller.to_owned(),
                jti: serial.to_string(),
                expires,
                key_version: version,
                principals: principals.clone(),
                ..crate::audit::CredentialSummary::default()
            },
            principals,
        })
    }

    /// The CA keys of ssh issuer `name`, as an authorized_keys file (sshd's
    /// TrustedUserCAKeys): every enabled version of its key, oldest first.
    pub(crate) fn ssh_ca_keys(
        &self,
        keys: &dyn KeySource,
        name: &str,
    ) -> Result<String, CredentialsError> {
        let issuer = self.ssh_issuer(name)?;
        let public = keys.verifying_keys(&issuer.key)?;
        let mut out = String::new();
        for (v, pem) in public.versions {
            let ca = ssh::CaKey::from_spki_pem(public.algorithm, &pem)
                .ok_or_else(|| CredentialsError::KeyUnusable(SSH_KEY_ALGORITHMS.to_owned()))?;
            out.push_str(&ca.line(&format!("kms:{}:v{v}", issuer.name)));
            out.push('\n');
        }
        Ok(out)
    }
}

/// The principals a certificate of `issuer` names: those `asked` (each once), all of
/// them when none is; one it does not list is refused.
fn ssh_principals(
    issuer: &Issuer,
    caller: &str,
    asked: &[String],
) -> Result<Vec<String>, CredentialsError> {
    if asked.len() > model::MAX_LIST {
        return Err(CredentialsError::BadRequest(format!(
            "a request names at most {} principals",
            model::MAX_LIST
        )));
    }
    // What this caller may have: the issuer's fixed principals (shared accounts, for every
    // caller it allows), and its own name where the issuer lists `{{name}}`.
    let own = model::caller_name(caller);
    let mut allowed: Vec<&str> = Vec::with_capacity(issuer.ssh_principals.len());
    for p in &issuer.ssh_principals {
        let p = if p == model::CALLER_NAME {
            match own {
                Some(name) => name,
                None => continue,
            }
        } else {
            p.as_str()
        };
        if !allowed.contains(&p) {
            allowed.push(p);
        }
    }
    if asked.is_empty() {
        if allowed.is_empty() {
            return Err(CredentialsError::Denied(format!(
                "issuer {:?} issues certificates for the caller's own name only, and the caller's identity names none that is an SSH principal",
                issuer.name
            )));
        }
        return Ok(allowed.iter().map(|p| (*p).to_owned()).collect());
    }
    let mut out: Vec<String> = Vec::with_capacity(asked.len());
    for p in asked {
        if !allowed.contains(&p.as_str()) {
            return Err(CredentialsError::Denied(format!(
                "issuer {:?} does not issue certificates for the principal {:?}",
                issuer.name,
                bounded(p)
            )));
        }
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    Ok(out)
}
