//! The credentials engine: short-lived machine credentials signed by keys of the keyring
//! (docs/credentials.md). Today: JWT-SVIDs (the SPIFFE JWT-SVID profile), their public
//! keys as a JWKS and an OpenID discovery document per issuer, and their validation;
//! X.509-SVIDs ([`x509`]) under a CA certificate per key version; OpenSSH user and host
//! certificates ([`ssh`]), their CA keys as an authorized_keys file.
//!
//! An issuer is an administrator's definition (which key signs, who may ask, for which
//! audiences and subjects, for how long), sealed by the barrier in the store. Nothing is
//! kept in memory: each call reads the issuer it names, so a change made on one server is
//! in force on every other from its commit on. The signature is the keyring's
//! ([`KeySource`]): an HSM key signs in the HSM.

pub(crate) mod error;
pub(crate) mod jose;
pub(crate) mod model;
pub(crate) mod ssh;
pub(crate) mod x509;

use std::sync::{Arc, Mutex};

pub(crate) use error::CredentialsError;
use jose::{Alg, Jwk};
use model::Issuer;
use serde_json::{Map, Value, json};
pub(crate) use ssh::SshRequest;

use crate::barrier::Barrier;
use crate::keyring::material::SignInput;
pub(crate) use crate::keyring::material::SignatureEncoding;
use crate::keyring::model::{Algorithm, VersionState};
use crate::keyring::{Keyring, now};
use crate::policy::Pattern;
use crate::store::{Follow, Store, Table, Write};

/// Issuers, by name.
pub(crate) const ISSUERS: Table = Table::new("credential_issuers", Follow::Changes);

/// Tokens revoked, by `ISSUER/JTI`: until when ValidateJwt refuses them (8-byte big-endian
/// Unix seconds, sealed with the entry's name).
pub(crate) const REVOCATIONS: Table = Table::new("credential_revocations", Follow::Never);

/// The engine's tables, in the order a backup writes them.
pub(crate) const TABLES: &[Table] = &[ISSUERS, REVOCATIONS];

/// How far ahead of this server's clock a token's `iat` may be (another server's clock).
const CLOCK_SKEW: u64 = 60;

/// How long a revocation is kept: longer than any token lives
/// ([`model::MAX_TTL_LIMIT`]), whatever its issuer allowed when it was issued.
const REVOCATION_KEPT: u64 = model::MAX_TTL_LIMIT;

/// Where an issuer's documents are on the HTTPS front, after its base URL (Vault's path for
/// its identity tokens' named providers).
pub(crate) const ISSUER_PATH: &str = "/v1/identity/oidc/provider/";

/// One enabled version of a signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyVersion {
    /// Its number.
    pub version: u32,
    /// When it was made, Unix seconds: it has been published since.
    pub created_at: u64,
}

/// A signing key's algorithm and enabled versions (oldest first).
pub(crate) struct KeyVersions {
    /// The key's algorithm.
    pub algorithm: Algorithm,
    /// Its enabled versions, oldest first.
    pub enabled: Vec<KeyVersion>,
}

/// A signing key's public side: its algorithm and the versions that verify (enabled), each
/// with its public key (SubjectPublicKeyInfo PEM).
pub(crate) struct PublicKeys {
    /// The key's algorithm.
    pub algorithm: Algorithm,
    /// Every enabled version and its public key, oldest first.
    pub versions: Vec<(u32, String)>,
}

/// The keys a credential may be verified with, and the signatures: what the engine needs
/// of the keyring.
pub(crate) trait KeySource {
    /// `key`'s algorithm and enabled versions.
    fn versions(&self, key: &str) -> Result<KeyVersions, CredentialsError>;
    /// The public key of `key`'s `version` (SubjectPublicKeyInfo PEM).
    fn public_key(&self, key: &str, version: u32) -> Result<String, CredentialsError>;
    /// `key`'s public side: every enabled version's public key.
    fn verifying_keys(&self, key: &str) -> Result<PublicKeys, CredentialsError> {
        let versions = self.versions(key)?;
        let mut out = Vec::with_capacity(versions.enabled.len());
        for v in versions.enabled {
            out.push((v.version, self.public_key(key, v.version)?));
        }
        Ok(PublicKeys {
            algorithm: versions.algorithm,
            versions: out,
        })
    }
    /// Signs `message` with `key`'s `version` (which must be enabled): ECDSA signatures in
    /// `encoding` (raw `r | s`, as JWS and SSH want them, or DER, as X.509 does).
    fn sign(
        &self,
        key: &str,
        version: u32,
        message: &[u8],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>, CredentialsError>;
    /// Whether a grant lets someone sign with `key` (who could then sign claims outside an
    /// issuer's rules).
    fn sign_granted(&self, key: &str) -> Result<bool, CredentialsError>;
}

impl KeySource for Keyring {
    fn versions(&self, key: &str) -> Result<KeyVersions, CredentialsError> {
        let meta = self.get_key(key)?;
        let mut enabled: Vec<KeyVersion> = meta
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Enabled)
            .map(|v| KeyVersion {
                version: v.version,
                created_at: v.created_at,
            })
            .collect();
        enabled.sort_by_key(|v| v.version);
        Ok(KeyVersions {
            algorithm: meta.algorithm,
            enabled,
        })
    }

    fn public_key(&self, key: &str, version: u32) -> Result<String, CredentialsError> {
        Ok(Keyring::public_key(self, key, version)?.0)
    }

    fn sign_granted(&self, key: &str) -> Result<bool, CredentialsError> {
        Ok(self
            .list_grants(key, "")?
            .iter()
            .any(|g| g.operations.contains(&crate::policy::Operation::Sign)))
    }

    fn sign(
        &self,
        key: &str,
        version: u32,
        message: &[u8],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>, CredentialsError> {
        if version == 0 {
            return Err(CredentialsError::Internal("a signature names its version"));
        }
        Ok(self
            .sign_version(key, version, SignInput::Message(message), encoding)?
            .0)
    }
}

/// The version of a key that signs for an issuer that publishes versions `ahead` seconds
/// before they sign: the newest enabled version made at least `ahead` seconds before
/// `now`, among those `usable` allows (an x509 issuer's versions with a CA certificate). A
/// version made later has not been published long enough for verifiers that cache the
/// keys. When none has (the older ones were disabled, or the key is new), the oldest
/// usable version signs: there is no other.
pub(crate) fn signing_version(
    enabled: &[KeyVersion],
    ahead: u64,
    now: u64,
    usable: impl Fn(u32) -> bool,
) -> Option<u32> {
    let candidates = enabled.iter().filter(|v| usable(v.version));
    let oldest = candidates.clone().min_by_key(|v| v.version)?;
    Some(
        candidates
            .filter(|v| v.created_at.saturating_add(ahead) <= now)
            .max_by_key(|v| v.version)
            .unwrap_or(oldest)
            .version,
    )
}

/// How a change commits: its write in one transaction with its audit record.
pub(crate) trait Journal {
    /// Commits `writes` with the record of the change of `issuer`: all or nothing.
    fn commit(&self, issuer: &str, writes: Vec<Write>) -> Result<(), CredentialsError>;
}

/// A request for a token.
pub(crate) struct JwtRequest<'a> {
    /// The issuer's name.
    pub issuer: &'a str,
    /// One of the issuer's audiences; empty: its only one.
    pub audience: &'a str,
    /// Empty: the caller's own identity.
    pub subject: &'a str,
    /// 0: the issuer's default.
    pub ttl: u64,
}

/// A token issued, and what its record says of it.
pub(crate) struct Issued {
    /// The compact JWS. Never logged or recorded.
    pub token: String,
    /// What the record names.
    pub summary: crate::audit::CredentialSummary,
    /// The key (and [`Issued::key_version`]) that signed.
    pub key: String,
    /// The key version that signed.
    pub key_version: u32,
    /// The key id.
    pub kid: String,
}

/// What a valid token says.
pub(crate) struct Validated {
    /// `sub`.
    pub subject: String,
    /// `jti`.
    pub jti: String,
    /// `exp`, Unix seconds.
    pub expires: u64,
    /// `act.sub`, if any.
    pub actor: Option<String>,
}

/// The open engine.
pub(crate) struct Credentials {
    barrier: Arc<Barrier>,
    store: Arc<dyn Store>,
    /// Serialises this server's changes of issuers.
    admin: Mutex<()>,
}

impl Credentials {
    /// Opens the engine (nothing is read: each call reads the issuer it names).
    pub(crate) fn open(barrier: Arc<Barrier>, store: Arc<dyn Store>) -> Self {
        Self {
            barrier,
            store,
            admin: Mutex::new(()),
        }
    }

    /// The issuer `name`.
    pub(crate) fn issuer(&self, name: &str) -> Result<Issuer, CredentialsError> {
        let sealed = self
            .store
            .get(ISSUERS, name)?
            .ok_or_else(|| CredentialsError::IssuerNotFound(bounded(name)))?;
        self.open_issuer(name, &sealed)
    }

    /// The issuer `name`, which must issue `kind`.
    pub(crate) fn issuer_of_kind(
        &self,
        name: &str,
        kind: model::Kind,
    ) -> Result<Issuer, CredentialsError> {
        let issuer = self.issuer(name)?;
        if issuer.kind != kind {
            return Err(CredentialsError::WrongKind {
                issuer: issuer.name,
                kind: issuer.kind.name(),
                asked: kind.name(),
            });
        }
        Ok(issuer)
    }

    fn open_issuer(&self, name: &str, sealed: &[u8]) -> Result<Issuer, CredentialsError> {
        let tampered = || CredentialsError::Tampered(format!("issuer {}", bounded(name)));
        let json = self
            .barrier
            .open(model::ISSUER, name, sealed)
            .map_err(|_| tampered())?;
        serde_json::from_slice(&json).map_err(|_| tampered())
    }

    /// Whether an issuer signs with `key` (a `sign` grant on it is then refused). An issuer
    /// record that does not open counts as one that does (refuse rather than allow).
    pub(crate) fn signs_with(&self, key: &str) -> Result<bool, CredentialsError> {
        for (name, sealed) in self.store.scan(ISSUERS)? {
            match self.open_issuer(&name, &sealed) {
                Ok(i) if i.key == key => return Ok(true),
                Ok(_) => {}
                Err(_) => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Every issuer, by name (one that does not open is left out and logged).
    pub(crate) fn issuers(&self) -> Result<Vec<Issuer>, CredentialsError> {
        let mut out = Vec::new();
        for (name, sealed) in self.store.scan(ISSUERS)? {
            match self.open_issuer(&name, &sealed) {
                Ok(i) => out.push(i),
                Err(e) => {
                    tracing::error!(error = %e, "an issuer record is not authentic: left out")
                }
            }
        }
        Ok(out)
    }

    pub(super) fn write(&self, issuer: &Issuer) -> Result<Write, CredentialsError> {
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(issuer)
                .map_err(|_| CredentialsError::Internal("record encoding"))?,
        );
        let value = self
            .barrier
            .seal(model::ISSUER, &issuer.name, &json)
            .map_err(|e| match e {
                crate::barrier::BarrierError::Randomness => CredentialsError::Randomness,
                _ => CredentialsError::Internal("barrier"),
            })?;
        Ok(Write {
            table: ISSUERS,
            key: issuer.name.clone(),
            value,
        })
    }

    /// Defines an issuer whose key can sign JWTs.
    pub(crate) fn create_issuer(
        &self,
        journal: &dyn Journal,
        keys: &dyn KeySource,
        mut issuer: Issuer,
        by: &str,
    ) -> Result<Issuer, CredentialsError> {
        issuer.schema = model::SCHEMA;
        issuer.created_ms = crate::audit::now_ms();
        issuer.created_by = by.to_owned();
        issuer.ca.clear();
        issuer.check()?;
        check_key(keys, &issuer)?;
        let _one = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let _shared = self.store.lock_changes()?;
        if self.store.get(ISSUERS, &issuer.name)?.is_some() {
            return Err(CredentialsError::IssuerExists(issuer.name));
        }
        // One key, one kind of credential: a key that signs tokens and certificates would be
        // published as both a JWT and an X.509 authority, and a signature of one kind made
        // for the other could one day be taken for it.
        if let Some(other) = self
            .issuers()?
            .into_iter()
            .find(|i| i.key == issuer.key && i.kind != issuer.kind)
        {
            return Err(CredentialsError::KeyUnusable(format!(
                "issuer {:?} signs {} credentials with this key: an issuer of another kind needs a key of its own",
                other.name,
                other.kind.name()
            )));
        }
        // An x509 issuer's CA certificates (or entries awaiting them) are in its first record.
        Self::complete_ca(keys, &mut issuer, now())?;
        journal.commit(&issuer.name, vec![self.write(&issuer)?])?;
        Ok(issuer)
    }

    /// Changes an issuer: `change` edits it; the result is checked as a new one is.
    pub(crate) fn update_issuer(
        &self,
        journal: &dyn Journal,
        keys: &dyn KeySource,
        name: &str,
        change: impl FnOnce(&mut Issuer),
    ) -> Result<Issuer, CredentialsError> {
        let _one = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let _shared = self.store.lock_changes()?;
        let before = self.issuer(name)?;
        let mut issuer = before.clone();
        change(&mut issuer);
        if issuer.kind != before.kind
            || issuer.self_signed != before.self_signed
            || issuer.key != before.key
        {
            // Another key would withdraw the old one's public keys at once (its tokens and
            // certificates would stop verifying) and sign without being published first:
            // an issuer's key changes by rotation.
            return Err(CredentialsError::BadRequest(
                "an issuer's kind, key and self_signed are fixed when it is made: rotate its key (kms issuer rotate), or make another issuer".to_owned(),
            ));
        }
        if issuer.kind == model::Kind::X509 && issuer.key != before.key {
            return Err(CredentialsError::BadRequest(
                "an x509 issuer's key is fixed: its CA certificates certify that key's versions"
                    .to_owned(),
            ));
        }
        issuer.check()?;
        check_key(keys, &issuer)?;
        journal.commit(&issuer.name, vec![self.write(&issuer)?])?;
        Ok(issuer)
    }

    /// What a rotation of `name`'s key (made by the caller) changes in the issuer: nothing
    /// for the kinds whose keys are published as they are; for an x509 issuer, the new
    /// version's self-signed CA certificate, or an entry awaiting an outside CA's.
    pub(crate) fn rotated(
        &self,
        journal: &dyn Journal,
        keys: &dyn KeySource,
        name: &str,
    ) -> Result<Issuer, CredentialsError> {
        let _one = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let _shared = self.store.lock_changes()?;
        let mut issuer = self.issuer(name)?;
        if Self::complete_ca(keys, &mut issuer, now())? {
            journal.commit(&issuer.name, vec![self.write(&issuer)?])?;
        }
        Ok(issuer)
    }

    /// Issues a JWT-SVID to `caller` (its principal).
    pub(crate) fn issue_jwt(
        &self,
        keys: &dyn KeySource,
        base: Option<&str>,
        caller: &str,
        req: &JwtRequest<'_>,
    ) -> Result<Issued, CredentialsError> {
        let issuer = self.issuer_of_kind(req.issuer, model::Kind::Jwt)?;
        let (subject, actor) = subject_of(&issuer, caller, req.subject, "a token")?;
        if !crate::access::tls::is_spiffe_id(&subject) {
            return Err(CredentialsError::BadRequest(
                "a JWT-SVID's subject is a SPIFFE ID: the caller's certificate names none"
                    .to_owned(),
            ));
        }
        // No audience named: the issuer's, if it has one only (Vault's identity tokens name
        // their role's one audience, and take none).
        let audience = match (req.audience, issuer.audiences.as_slice()) {
            ("", [only]) => only.as_str(),
            ("", _) => {
                return Err(CredentialsError::BadRequest(format!(
                    "issuer {:?} issues tokens for several audiences: name one",
                    issuer.name
                )));
            }
            (a, _) => a,
        };
        if !issuer.audiences.iter().any(|a| a == audience) {
            // The issuer's audiences are public (GetIssuer): name a few, bounded.
            let mut listed: Vec<String> = issuer
                .audiences
                .iter()
                .take(5)
                .map(|a| bounded(a))
                .collect();
            if issuer.audiences.len() > 5 {
                listed.push("...".to_owned());
            }
            return Err(CredentialsError::Denied(format!(
                "issuer {:?} does not issue tokens for this audience (it issues for: {})",
                issuer.name,
                listed.join(", ")
            )));
        }
        let base = base.ok_or(CredentialsError::NoHttpsFront)?;
        let ttl = ttl_of(&issuer, req.ttl)?;
        let iat = now();
        let exp = iat.saturating_add(ttl);
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| CredentialsError::Randomness)?;
        let jti = data_encoding::HEXLOWER.encode(&id);
        let mut claims = Map::new();
        for (k, v) in &issuer.claims {
            claims.insert(k.clone(), Value::String(v.clone()));
        }
        claims.insert(
            "iss".to_owned(),
            Value::String(issuer_url(base, &issuer.name)),
        );
        claims.insert("sub".to_owned(), Value::String(subject.clone()));
        claims.insert("aud".to_owned(), json!([audience]));
        claims.insert("exp".to_owned(), json!(exp));
        claims.insert("iat".to_owned(), json!(iat));
        claims.insert("jti".to_owned(), Value::String(jti.clone()));
        if let Some(a) = &actor {
            claims.insert("act".to_owned(), json!({ "sub": a }));
        }
        let versions = keys.versions(&issuer.key)?;
        let alg = jwt_alg(versions.algorithm)?;
        let version = signing_version(&versions.enabled, issuer.publish_ahead, iat, |_| true)
            .ok_or_else(|| CredentialsError::KeyUnusable("no version is enabled".to_owned()))?;
        let jwk = Jwk::from_spki_pem(&keys.public_key(&issuer.key, version)?, alg)
            .map_err(|_| CredentialsError::Internal("a public key that is not one"))?;
        let token = jose::sign_compact(alg, jwk.kid(), &claims, |input| {
            keys.sign(&issuer.key, version, input, SignatureEncoding::Raw)
        })
        .map_err(|e| match e {
            jose::SignError::Signer(e) => e,
            other => CredentialsError::KeyUnusable(other.to_string()),
        })?;
        Ok(Issued {
            key: issuer.key.clone(),
            token,
            summary: crate::audit::CredentialSummary {
                issuer: issuer.name.clone(),
                kind: issuer.kind.name().to_owned(),
                subject,
                audience: audience.to_owned(),
                actor,
                jti,
                expires: exp,
                key_version: version,
                principals: Vec::new(),
            },
            key_version: version,
            kid: jwk.kid().to_owned(),
        })
    }

    /// The key version that signs for `issuer` now (0: none can).
    pub(crate) fn signing_version_of(
        &self,
        keys: &dyn KeySource,
        issuer: &Issuer,
    ) -> Result<u32, CredentialsError> {
        let versions = keys.versions(&issuer.key)?;
        let published = issuer.published(&versions.enabled);
        Ok(
            signing_version(&published, issuer.publish_ahead, now(), |v| {
                issuer.can_sign_with(v)
            })
            .unwrap_or(0),
        )
    }

    /// The public keys of `name`'s tokens, as a JWKS (RFC 7517): every enabled version of
    /// its key.
    pub(crate) fn jwks(&self, keys: &dyn KeySource, name: &str) -> Result<Value, CredentialsError> {
        let issuer = self.issuer_of_kind(name, model::Kind::Jwt)?;
        let published = published_keys(keys, &issuer.key)?;
        let list: Vec<Value> = published.iter().map(|(_, j)| j.to_json("sig")).collect();
        Ok(json!({ "keys": list }))
    }

    /// The SPIFFE trust bundle of every issuer (the SPIFFE Trust Domain and Bundle
    /// standard's JWKS): each jwt issuer's enabled key versions as `jwt-svid` keys, each
    /// x509 issuer's CA certificates as `x509-svid` keys with their certificate (`x5c`),
    /// and `spiffe_refresh_hint` (seconds). An issuer whose key cannot be read is left out
    /// and logged: the others' keys still verify.
    pub(crate) fn spiffe_bundle(
        &self,
        keys: &dyn KeySource,
        refresh_hint: u64,
    ) -> Result<Value, CredentialsError> {
        let mut list = Vec::new();
        for issuer in self.issuers()? {
            let published = match issuer.kind {
                model::Kind::Jwt | model::Kind::X509 => published_keys(keys, &issuer.key),
                model::Kind::SshUser | model::Kind::SshHost => continue,
            };
            let published = match published {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(issuer = %issuer.name, error = %crate::error_chain(&e), "an issuer's keys are left out of the SPIFFE bundle");
                    continue;
                }
            };
            for (version, jwk) in published {
                if issuer.kind == model::Kind::Jwt {
                    list.push(jwk.to_json("jwt-svid"));
                    continue;
                }
                let Some(ca) = issuer
                    .ca
                    .iter()
                    .find(|c| c.version == version)
                    .and_then(|c| c.chain.first())
                else {
                    continue;
                };
                let mut entry = jwk.to_json("x509-svid");
                if let Some(map) = entry.as_object_mut() {
                    map.remove("kid");
                    map.remove("alg");
                    map.insert("x5c".to_owned(), json!([data_encoding::BASE64.encode(ca)]));
                }
                list.push(entry);
            }
        }
        Ok(json!({ "keys": list, "spiffe_refresh_hint": refresh_hint }))
    }

    /// `name`'s OpenID Connect discovery document (the members a verifier of its tokens
    /// reads).
    pub(crate) fn discovery(
        &self,
        keys: &dyn KeySource,
        base: &str,
        name: &str,
    ) -> Result<Value, CredentialsError> {
        let issuer = self.issuer_of_kind(name, model::Kind::Jwt)?;
        let published = published_keys(keys, &issuer.key)?;
        let mut algs: Vec<&str> = published.iter().map(|(_, j)| j.alg().name()).collect();
        algs.dedup();
        let url = issuer_url(base, name);
        Ok(json!({
            "issuer": url,
            "jwks_uri": format!("{url}/.well-known/keys"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
        }))
    }

    /// Validates `token` as one of `name`'s, for `audience`.
    pub(crate) fn validate_jwt(
        &self,
        keys: &dyn KeySource,
        base: Option<&str>,
        name: &str,
        token: &str,
        audience: &str,
    ) -> Result<Result<Validated, String>, CredentialsError> {
        let issuer = self.issuer_of_kind(name, model::Kind::Jwt)?;
        let base = base.ok_or(CredentialsError::NoHttpsFront)?;
        let published = published_keys(keys, &issuer.key)?;
        let jwks: Vec<Jwk> = published.into_iter().map(|(_, j)| j).collect();
        let claims = match jose::verify_compact(token, &jwks) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let verdict = check_claims(&claims, &issuer, &issuer_url(base, name), audience, now());
        if let Ok(v) = &verdict
            && self.revoked(name, &v.jti)?
        {
            return Ok(Err("the token was revoked".to_owned()));
        }
        Ok(verdict)
    }
}

/// Who a credential `caller` asks of `issuer` for `requested` (empty: itself) is for, and
/// the delegator if another: `caller` allowed by the issuer's principals, or delegating
/// for a SPIFFE ID its subjects match. `what` names the credential in refusals.
fn subject_of(
    issuer: &Issuer,
    caller: &str,
    requested: &str,
    what: &str,
) -> Result<(String, Option<String>), CredentialsError> {
    if requested.is_empty() || requested == caller {
        if !issuer.allows(caller) {
            return Err(CredentialsError::Denied(format!(
                "{caller:?} may not ask issuer {:?} for {what}",
                issuer.name
            )));
        }
        return Ok((caller.to_owned(), None));
    }
    if !crate::access::tls::is_spiffe_id(requested) {
        return Err(CredentialsError::BadRequest(
            "a subject is a SPIFFE ID: spiffe://, a trust domain and path segments of [A-Za-z0-9._-]".to_owned(),
        ));
    }
    if !issuer.allows_delegation(caller, requested) {
        return Err(CredentialsError::Denied(format!(
            "{caller:?} may not ask issuer {:?} for {what} on behalf of another subject",
            issuer.name
        )));
    }
    Ok((requested.to_owned(), Some(caller.to_owned())))
}

/// A credential's lifetime: `asked` (0: the issuer's default), at most the issuer's maximum.
fn ttl_of(issuer: &Issuer, asked: u64) -> Result<u64, CredentialsError> {
    let ttl = if asked == 0 {
        issuer.default_ttl
    } else {
        asked
    };
    if ttl > issuer.max_ttl {
        return Err(CredentialsError::BadRequest(format!(
            "ttl_seconds {ttl} is over issuer {:?}'s max_ttl_seconds, {}: ask for at most that",
            issuer.name, issuer.max_ttl
        )));
    }
    Ok(ttl)
}

/// Certificates (DER) as PEM, one after the other.
pub(crate) fn pem_chain(chain: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for der in chain {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = data_encoding::BASE64.encode(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The `iss` of issuer `name`'s tokens, under the HTTPS front's URL `base`.
pub(crate) fn issuer_url(base: &str, name: &str) -> String {
    format!("{base}{ISSUER_PATH}{name}")
}

impl Credentials {
    /// Revokes `name`'s token `jti`: [`Credentials::validate_jwt`] refuses it until the
    /// answer (Unix seconds).
    pub(crate) fn revoke_jwt(
        &self,
        journal: &dyn Journal,
        name: &str,
        jti: &str,
    ) -> Result<u64, CredentialsError> {
        let issuer = self.issuer_of_kind(name, model::Kind::Jwt)?;
        if jti.len() != 32 || !jti.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(CredentialsError::BadRequest(
                "a jti kms issued is 32 lowercase hex digits".to_owned(),
            ));
        }
        let until = now().saturating_add(REVOCATION_KEPT);
        let key = revocation_key(&issuer.name, jti);
        let value = self
            .barrier
            .seal(model::REVOCATION, &key, &until.to_be_bytes())
            .map_err(|_| CredentialsError::Randomness)?;
        journal.commit(
            &issuer.name,
            vec![Write {
                table: REVOCATIONS,
                key,
                value,
            }],
        )?;
        Ok(until)
    }

    /// Whether `name`'s token `jti` is revoked now. A revocation record that does not open
    /// counts as one (the store was altered: refuse rather than accept).
    fn revoked(&self, name: &str, jti: &str) -> Result<bool, CredentialsError> {
        let key = revocation_key(name, jti);
        let Some(sealed) = self.store.get(REVOCATIONS, &key)? else {
            return Ok(false);
        };
        Ok(self.revoked_until(&key, &sealed).unwrap_or(u64::MAX) > now())
    }

    /// Until when a revocation record says its token is refused; `None` when it does not
    /// open.
    fn revoked_until(&self, key: &str, sealed: &[u8]) -> Option<u64> {
        self.barrier
            .open(model::REVOCATION, key, sealed)
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_be_bytes)
    }

    /// Removes the revocations past their time (what maintenance does); how many. A record
    /// that does not open stays (kms removes only what it wrote).
    pub(crate) fn sweep_revocations(&self, now: u64) -> Result<usize, CredentialsError> {
        let removals: Vec<crate::store::Removal> = self
            .store
            .scan(REVOCATIONS)?
            .into_iter()
            .filter(|(key, sealed)| self.revoked_until(key, sealed).is_some_and(|u| u <= now))
            .map(|(key, _)| crate::store::Removal {
                table: REVOCATIONS,
                from: key.clone(),
                to: key,
            })
            .collect();
        if !removals.is_empty() {
            self.store.write_all_removing(&[], &removals)?;
        }
        Ok(removals.len())
    }
}

/// A revocation's key: the issuer's name (no `/` in it) and the jti.
fn revocation_key(issuer: &str, jti: &str) -> String {
    format!("{issuer}/{jti}")
}

/// The claims' verdict: the issuer, an audience, an expiry not passed, a subject and id.
///
/// And what only a token kms issued can say, so that one signed outside the issuer (by a
/// holder of a `sign` grant on its key) is refused here: an `iat`, a lifetime within the
/// issuer's maximum, a subject the issuer issues to (its principals, or its subjects with
/// an `act` naming one of its delegators).
fn check_claims(
    claims: &Map<String, Value>,
    issuer: &Issuer,
    iss: &str,
    audience: &str,
    now: u64,
) -> Result<Validated, String> {
    if claims.get("iss").and_then(Value::as_str) != Some(iss) {
        return Err("the token is another issuer's".to_owned());
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err("the token is not for this audience".to_owned());
    }
    let Some(exp) = claims.get("exp").and_then(Value::as_u64) else {
        return Err("the token has no expiry".to_owned());
    };
    if exp <= now {
        return Err("the token has expired".to_owned());
    }
    let Some(iat) = claims.get("iat").and_then(Value::as_u64) else {
        return Err("the token has no issue time".to_owned());
    };
    if exp.saturating_sub(iat) > issuer.max_ttl || iat > now.saturating_add(CLOCK_SKEW) {
        return Err("the token's lifetime is not one its issuer gives".to_owned());
    }
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(subject), Some(jti)) = (text("sub"), text("jti")) else {
        return Err("the token has no subject or id".to_owned());
    };
    let actor = match claims.get("act") {
        None => None,
        Some(a) => match a.get("sub").and_then(Value::as_str) {
            Some(s) => Some(s.to_owned()),
            None => return Err("the token's act names no subject".to_owned()),
        },
    };
    let allowed = match &actor {
        None => issuer.allows(&subject),
        Some(a) => issuer.allows_delegation(a, &subject),
    };
    if !allowed || !crate::access::tls::is_spiffe_id(&subject) {
        return Err("the token's subject is not one its issuer issues to".to_owned());
    }
    Ok(Validated {
        subject,
        jti,
        expires: exp,
        actor,
    })
}

/// Whether `issuer`'s key can sign what it issues: its algorithm, and no grant that lets
/// someone sign with it.
fn check_key(keys: &dyn KeySource, issuer: &Issuer) -> Result<(), CredentialsError> {
    if keys.sign_granted(&issuer.key)? {
        return Err(CredentialsError::KeyUnusable(
            "a grant lets a principal sign with this key, who could sign credentials outside the issuer's rules: revoke it, or use a key of the issuer's own".to_owned(),
        ));
    }
    let algorithm = keys.versions(&issuer.key)?.algorithm;
    match issuer.kind {
        model::Kind::Jwt => jwt_alg(algorithm).map(|_| ()),
        model::Kind::X509 => x509::ca_algorithm(algorithm).map(|_| ()),
        model::Kind::SshUser | model::Kind::SshHost => {
            if ssh::CaKey::algorithm_fits(algorithm) {
                Ok(())
            } else {
                Err(CredentialsError::KeyUnusable(SSH_KEY_ALGORITHMS.to_owned()))
            }
        }
    }
}

/// What an ssh issuer's key is.
const SSH_KEY_ALGORITHMS: &str = "an SSH certificate is signed by an ECDSA P-256 or Ed25519 key";

/// The JWS algorithm a key of `algorithm` signs JWTs with.
fn jwt_alg(algorithm: Algorithm) -> Result<Alg, CredentialsError> {
    Alg::of(algorithm).ok_or_else(|| {
        CredentialsError::KeyUnusable(
            "a JWT is signed by an ECDSA P-256 or P-384, RSA-PSS or RSA PKCS#1 key".to_owned(),
        )
    })
}

/// The JWK of each enabled version of `key`, oldest first.
fn published_keys(keys: &dyn KeySource, key: &str) -> Result<Vec<(u32, Jwk)>, CredentialsError> {
    let public = keys.verifying_keys(key)?;
    let alg = jwt_alg(public.algorithm)?;
    let mut jwks = Vec::with_capacity(public.versions.len());
    for (v, pem) in public.versions {
        let jwk = Jwk::from_spki_pem(&pem, alg)
            .map_err(|_| CredentialsError::Internal("a public key that is not one"))?;
        jwks.push((v, jwk));
    }
    Ok(jwks)
}

/// A name as errors show it: at most 64 characters.
fn bounded(name: &str) -> String {
    name.chars().take(64).collect()
}

/// Patterns from their text.
pub(crate) fn patterns(list: &[String]) -> Result<Vec<Pattern>, CredentialsError> {
    list.iter()
        .map(|p| Pattern::new(p).map_err(|e| CredentialsError::BadRequest(e.to_string())))
        .collect()
}

impl crate::engine::Engine for Credentials {
    fn name(&self) -> &'static str {
        "credentials"
    }

    fn tables(&self) -> &'static [Table] {
        TABLES
    }

    // Nothing is kept: every call reads what it needs.
    fn heard(&self, _: &[crate::store::Change]) {}

    fn follow(&self, _: &[crate::store::Change]) -> Vec<crate::store::Change> {
        Vec::new()
    }

    fn maintain(&self, now: u64) {
        match self.sweep_revocations(now) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "revocations of expired tokens removed"),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "revocations of expired tokens not removed: the next maintenance tries again");
            }
        }
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
