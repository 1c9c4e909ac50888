//! Bring your own key: import parameters (an RSA-4096 wrapping key made in the HSM and a
//! token bound to the key and that wrapping key) and the import of wrapped material as a
//! new version of a key of origin EXTERNAL (docs/byok.md).
//!
//! The wrapping key decrypts only. `RSA_AES_KEY_WRAP_SHA_256` material is
//! `OAEP(wrapping key, AES key) | AES-KWP(AES key, material)`: the AES key is recovered by
//! the HSM (RSA-OAEP), then for an HSM key the module unwraps the material straight into a
//! token object (C_UnwrapKey) and kms never holds it; for a SOFTWARE key kms unwraps it and
//! stores it sealed under the root key, as a generated RSA key is. Nothing is written unless
//! the material unwrapped, is what the key's algorithm needs, and (asymmetric keys) works
//! with its public key.

use super::{
    Algorithm, HsmKeyKind, HsmObject, IMPORT_LABEL_PREFIX, Journal, KeyHandle, KeyMeta, Keyring,
    KeyringError, Origin, Protection, Public, Secret, SignInput, SignatureEncoding, VersionMeta,
    Zeroizing, hex, hsm_kind, hsm_label, material, model, now, pending_label, random, unhex,
};
use crate::hsm::RsaScheme;
use model::ImportJob;

/// The wrapping key: RSA 4096, decrypts only.
pub(super) const WRAPPING_KIND: HsmKeyKind = hsm_kind(WRAPPING_ALGORITHM);
/// The wrapping key's algorithm: RSA-4096 with OAEP (SHA-256).
const WRAPPING_ALGORITHM: Algorithm = Algorithm::RsaDecryptOaep4096Sha256;
/// The size of an RSA-4096 OAEP block: the first part of `RSA_AES_KEY_WRAP_SHA_256`.
const WRAPPED_KEY_LEN: usize = 512;
/// Longest and default validity of import parameters.
pub(crate) const MAX_IMPORT_VALIDITY: u64 = 86_400;
/// Shortest validity a caller may ask for.
const MIN_IMPORT_VALIDITY: u64 = 1;
/// Largest wrapped material accepted (an RSA-4096 PKCS#8 key is about 2.4 KB).
const MAX_WRAPPED: usize = 8 * 1024;
/// The MAC domain of import tokens.
const TOKEN_DOMAIN: &str = "kms/v1/import-token/";
/// Import token: version (1) | job id (16) | key id (16) | expiry (8, BE) | MAC (32).
const TOKEN_LEN: usize = 1 + 16 + 16 + 8 + 32;
const TOKEN_VERSION: u8 = 1;

/// How the material is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapping {
    /// An AES-256 key under RSA-OAEP-SHA-256, then the material under AES-KWP.
    RsaAesKeyWrapSha256,
    /// The material itself under RSA-OAEP-SHA-256 (at most 32 bytes).
    RsaesOaepSha256,
}

/// What `GetImportParameters` gives the customer.
pub(crate) struct ImportParameters {
    /// The wrapping public key, SubjectPublicKeyInfo PEM.
    pub(crate) wrapping_public_pem: String,
    /// The opaque token to give back with the material.
    pub(crate) token: Vec<u8>,
    /// Unix seconds.
    pub(crate) expires_at: u64,
}

/// One import request.
pub(crate) struct Import<'a> {
    /// The key.
    pub(crate) name: &'a str,
    /// The token from `GetImportParameters`.
    pub(crate) token: &'a [u8],
    /// How `wrapped` was wrapped.
    pub(crate) wrapping: Wrapping,
    /// The wrapped material.
    pub(crate) wrapped: &'a [u8],
    /// The public key (PEM) the caller says goes with asymmetric material, if any.
    pub(crate) public_key_pem: Option<&'a str>,
}

fn bad(why: &'static str) -> KeyringError {
    KeyringError::BadRequest(why)
}

/// The one answer to material that does not unwrap, whichever layer failed.
const NOT_UNWRAPPED: &str = "the wrapped material does not unwrap with these import parameters (wrapped with another key's parameters, or altered)";

impl Keyring {
    /// New import parameters for an EXTERNAL key, valid for `valid_for` seconds (0: 24 h).
    /// Replaces the key's previous parameters (their wrapping key is destroyed).
    pub(crate) fn import_parameters(
        &self,
        name: &str,
        valid_for: u64,
        journal: &dyn Journal,
    ) -> Result<ImportParameters, KeyringError> {
        let valid_for = match valid_for {
            0 => MAX_IMPORT_VALIDITY,
            v if (MIN_IMPORT_VALIDITY..=MAX_IMPORT_VALIDITY).contains(&v) => v,
            _ => return Err(bad("valid_for_seconds must be 1..=86400 (0: 86400)")),
        };
        // The RSA-4096 wrapping key takes seconds to generate: made before the admin lock
        // (see `pregen`), for a key checked now and again under the lock.
        let seen = self.fetch(name)?;
        Self::check_external(&seen.meta)?;
        let job_id = random::<16>()?;
        let label = format!("{IMPORT_LABEL_PREFIX}{}/{}", seen.meta.key_id, hex(&job_id));
        let wrapping = HsmObject::generate(&self.hsm, WRAPPING_ALGORITHM, label)?;
        let pem = match wrapping
            .public()
            .and_then(|p| Public::from_bytes(WRAPPING_ALGORITHM, p))
        {
            Some(p) => p.to_pem()?,
            None => return Err(KeyringError::Internal("wrapping public key")),
        };
        let _g = self.admin()?;
        journal.admit()?;
        let entry = self.entry_locked(name)?;
        Self::check_external(&entry.meta)?;
        if entry.meta.key_id != seen.meta.key_id {
            // Keys are never deleted, so a name keeps its key id: not expected.
            return Err(KeyringError::Internal(
                "the key changed while its wrapping key was made",
            ));
        }
        let created = now();
        let job = ImportJob {
            id: hex(&job_id),
            wrapping_label: wrapping.label().to_owned(),
            wrapping_id: hex(wrapping.id()),
            created_at: created,
            expires_at: created.saturating_add(valid_for),
        };
        let token = self.token(&entry.meta, &job)?;
        let handle = wrapping.take()?;
        let mut meta = entry.meta.clone();
        let previous = meta.import_job.replace(job.clone());
        self.commit_new_version(meta, Some(&entry), Some(handle), journal)?;
        if let Some(old) = previous {
            self.destroy_wrapping_key(&old);
        }
        Ok(ImportParameters {
            wrapping_public_pem: pem,
            token,
            expires_at: job.expires_at,
        })
    }

    /// Imports wrapped material as the key's new primary version.
    pub(crate) fn import_material(
        &self,
        req: Import<'_>,
        journal: &dyn Journal,
    ) -> Result<KeyMeta, KeyringError> {
        if req.wrapped.len() > MAX_WRAPPED {
            return Err(KeyringError::TooLarge {
                what: "the wrapped material",
                size: req.wrapped.len(),
                max: MAX_WRAPPED,
                hint: "",
            });
        }
        let _g = self.admin()?;
        journal.admit()?;
        let entry = self.entry_locked(req.name)?;
        let meta = &entry.meta;
        Self::check_external(meta)?;
        let job = self.check_token(meta, req.token)?;
        let algorithm = meta.algorithm;
        let given_public = match req.public_key_pem {
            Some(pem) if algorithm.is_asymmetric() => {
                Some(material::public_from_pem(algorithm, pem).ok_or(bad(
                    "public_key_pem is not a public key of the key's algorithm",
                ))?)
            }
            Some(_) => return Err(bad("a symmetric key takes no public key")),
            None => None,
        };
        let wrapping_id =
            unhex(&job.wrapping_id).ok_or_else(|| KeyringError::Tampered(req.name.to_owned()))?;
        let wrapping = self
            .hsm
            .find_key(
                WRAPPING_KIND,
                crate::hsm::Provenance::Generated,
                &job.wrapping_label,
                Some(&wrapping_id),
            )?
            .ok_or(KeyringError::NotAllowed(
                "the wrapping key of these import parameters is gone from the HSM: get new import parameters",
            ))?;
        let oaep = |ct: &[u8]| match self.hsm.rsa_oaep_decrypt(wrapping, 4096, ct) {
            Ok(pt) => Ok(pt),
            Err(crate::hsm::HsmError::DecryptFailed) => Err(bad(NOT_UNWRAPPED)),
            Err(e) => Err(KeyringError::from(e)),
        };
        let version = meta.next_version()?;
        let mut v = VersionMeta::new(version, now(), Origin::External);
        let mut object = None;
        match meta.protection {
            Protection::Software => {
                let plain = match req.wrapping {
                    Wrapping::RsaAesKeyWrapSha256 => {
                        let (key, body) = split_wrapped(req.wrapped)?;
                        let kek = oaep(key)?;
                        kwp_unwrap(&kek, body)?
                    }
                    Wrapping::RsaesOaepSha256 => oaep_material(algorithm, req.wrapped, oaep)?,
                };
                let secret = material::secret_from_material(algorithm, &plain)
                    .ok_or(bad(material::material_problem(algorithm)))?;
                if let Some(public) = secret.public() {
                    if given_public
                        .as_ref()
                        .is_some_and(|g| g.to_bytes() != public.to_bytes())
                    {
                        return Err(bad(
                            "public_key_pem is not the public key of the imported material",
                        ));
                    }
                    v.public_key = Some(hex(&public.to_bytes()));
                }
                let salt = random::<32>()?;
                let key_id = unhex(&meta.key_id).ok_or(KeyringError::Internal("key id"))?;
                let sealed = material::seal_material(
                    &self.root, &salt, &key_id, version, algorithm, &plain,
                )?;
                v.salt = Some(hex(&salt));
                v.material = Some(hex(&sealed));
            }
            Protection::Hsm => {
                let kind = hsm_kind(algorithm);
                let label = hsm_label(&meta.key_id, version);
                let id = self.hsm.new_object_id()?;
                let refused = |e: crate::hsm::HsmError| match e {
                    crate::hsm::HsmError::DecryptFailed if kind == HsmKeyKind::Ed25519 => bad(
                        "the wrapped material does not unwrap with these import parameters, or this HSM module cannot unwrap an Ed25519 key (SoftHSM 2.6 cannot): import it into a SOFTWARE key",
                    ),
                    crate::hsm::HsmError::DecryptFailed => bad(unwrap_problem(algorithm)),
                    crate::hsm::HsmError::ImportRefused(why) => bad(why),
                    crate::hsm::HsmError::Unsupported(why) => KeyringError::NotAllowed(why),
                    e => KeyringError::from(e),
                };
                // Marked pending before it exists (see `pending_label`).
                self.hsm.create_marker(&pending_label(&id))?;
                let unmark = || {
                    let _ = self.hsm.remove_markers(&pending_label(&id));
                };
                let made = (|| -> Result<(KeyHandle, Option<Vec<u8>>), KeyringError> {
                    Ok(match req.wrapping {
                        Wrapping::RsaAesKeyWrapSha256 => {
                            let (key, body) = split_wrapped(req.wrapped)?;
                            // 32 bytes wrap to 40 (so do 25 to 31: the HSM checks the key works).
                            if matches!(algorithm, Algorithm::Aes256Gcm | Algorithm::HmacSha256)
                                && body.len() != 40
                            {
                                return Err(bad(material::material_problem(algorithm)));
                            }
                            let kek = oaep(key)?;
                            if kek.len() != 32 {
                                return Err(bad(NOT_UNWRAPPED));
                            }
                            self.hsm
                                .unwrap_key_material(kind, &kek, body, &label, &id)
                                .map_err(refused)?
                        }
                        Wrapping::RsaesOaepSha256 => {
                            let plain = oaep_material(algorithm, req.wrapped, oaep)?;
                            if plain.len() != 32 {
                                return Err(bad(material::material_problem(algorithm)));
                            }
                            let h = self
                                .hsm
                                .create_secret_key(kind, &plain, &label, &id)
                                .map_err(refused)?;
                            (h, None)
                        }
                    })
                })();
                let (handle, token_public) = made.inspect_err(|_| unmark())?;
                object = Some(handle);
                v.hsm_label = Some(label);
                v.hsm_id = Some(hex(&id));
                if algorithm.is_asymmetric() {
                    // RSA: the token gave the public key; EC and Ed25519: the caller must.
                    let public = match (token_public, given_public) {
                        (Some(der), given) => {
                            let p = Public::from_bytes(algorithm, &der)
                                .ok_or(KeyringError::Internal("imported public key"));
                            match (p, given) {
                                (Ok(p), Some(g)) if g.to_bytes() != p.to_bytes() => Err(bad(
                                    "public_key_pem is not the public key of the imported material",
                                )),
                                (p, _) => p,
                            }
                        }
                        (None, Some(g)) => Ok(g),
                        (None, None) => Err(bad(
                            "give the material's public key (public_key_pem): the HSM does not give an imported EC or Ed25519 key's public half",
                        )),
                    };
                    let checked = public.and_then(|p| {
                        self.check_pair(handle, kind, algorithm, &p)?;
                        Ok(p)
                    });
                    match checked {
                        Ok(p) => v.public_key = Some(hex(&p.to_bytes())),
                        Err(e) => {
                            if self.hsm.destroy(handle).is_ok() {
                                unmark();
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
        let mut next = meta.clone();
        next.versions.push(v);
        next.primary = version;
        let committed = self.commit_new_version(next, Some(&entry), object, journal)?;
        tracing::info!(key = %req.name, version, "key material imported");
        Ok(committed)
    }

    /// Proves an imported HSM key and a public key are one pair: a signature over a
    /// random challenge verifies, or a random secret encrypted to the public key comes
    /// back from the HSM.
    fn check_pair(
        &self,
        handle: KeyHandle,
        kind: HsmKeyKind,
        algorithm: Algorithm,
        public: &Public,
    ) -> Result<(), KeyringError> {
        let challenge = random::<32>()?;
        let secret = Secret::Hsm(kind, handle);
        let ok = match public {
            Public::Rsa(k, RsaScheme::Oaep) => {
                let ct = k
                    .encrypt(
                        &mut getrandom::SysRng,
                        rsa::Oaep::<sha2::Sha256>::new(),
                        &challenge,
                    )
                    .map_err(|_| KeyringError::Internal("rsa encrypt"))?;
                secret
                    .asymmetric_decrypt(Some(&self.hsm), &ct)
                    .is_ok_and(|pt| pt.as_slice() == challenge)
            }
            _ => {
                let input = match algorithm {
                    Algorithm::Ed25519 => SignInput::Message(&challenge),
                    Algorithm::EcdsaP384Sha384 => SignInput::Message(&challenge),
                    _ => SignInput::Digest(&challenge),
                };
                let sig = secret.sign(Some(&self.hsm), input, SignatureEncoding::Der)?;
                public.verify(input, &sig)?
            }
        };
        if ok {
            Ok(())
        } else {
            Err(bad(
                "public_key_pem is not the public key of the imported material",
            ))
        }
    }

    fn check_external(meta: &KeyMeta) -> Result<(), KeyringError> {
        if meta.origin == Origin::External {
            Ok(())
        } else {
            Err(KeyringError::NotAllowed(
                "this key's material was made by kms (origin GENERATED): create a key with origin EXTERNAL to import material",
            ))
        }
    }

    /// The token of `job` for `meta`'s key.
    fn token(&self, meta: &KeyMeta, job: &ImportJob) -> Result<Vec<u8>, KeyringError> {
        let mut t = Vec::with_capacity(TOKEN_LEN);
        t.push(TOKEN_VERSION);
        t.extend(unhex(&job.id).ok_or(KeyringError::Internal("job id"))?);
        t.extend(unhex(&meta.key_id).ok_or(KeyringError::Internal("key id"))?);
        t.extend(job.expires_at.to_be_bytes());
        let mac = model::record_mac(&self.mac_key, TOKEN_DOMAIN, &meta.name, &t)?;
        t.extend(mac);
        Ok(t)
    }

    /// The key's import job, if `token` is its token and has not expired.
    fn check_token(&self, meta: &KeyMeta, token: &[u8]) -> Result<ImportJob, KeyringError> {
        let foreign = || {
            bad(
                "the import token is not one this server gave for this key (another key's, altered, or not a token)",
            )
        };
        if token.len() != TOKEN_LEN {
            return Err(foreign());
        }
        let (body, mac) = token.split_at(TOKEN_LEN - 32);
        let want = model::record_mac(&self.mac_key, TOKEN_DOMAIN, &meta.name, body)?;
        if subtle::ConstantTimeEq::ct_eq(want.as_slice(), mac).unwrap_u8() != 1 {
            return Err(foreign());
        }
        let job = meta.import_job.clone().ok_or(KeyringError::NotAllowed(
            "these import parameters were replaced or have expired: get new import parameters",
        ))?;
        if token.get(1..17) != unhex(&job.id).as_deref() {
            return Err(KeyringError::NotAllowed(
                "these import parameters were replaced by newer ones: use the newest, or get new import parameters",
            ));
        }
        if now() >= job.expires_at {
            return Err(KeyringError::NotAllowed(
                "these import parameters have expired: get new import parameters",
            ));
        }
        Ok(job)
    }

    /// Destroys a replaced job's wrapping key (best effort: logged if the token refuses).
    fn destroy_wrapping_key(&self, job: &ImportJob) {
        let id = unhex(&job.wrapping_id);
        if let Err(e) = self
            .hsm
            .destroy_key(WRAPPING_KIND, &job.wrapping_label, id.as_deref())
        {
            tracing::warn!(error = %crate::error_chain(&e), "could not destroy a replaced import wrapping key");
        }
    }
}

/// What a failed `C_UnwrapKey` may mean: the module cannot tell a bad wrapping from
/// material that is not the key type's PKCS#8.
fn unwrap_problem(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Aes256Gcm | Algorithm::HmacSha256 => NOT_UNWRAPPED,
        Algorithm::EcdsaP256Sha256 => {
            "the wrapped material does not unwrap into this key: wrapped with another key's parameters, altered, or not a P-256 private key in PKCS#8 DER (openssl pkcs8 -topk8 -nocrypt -outform DER converts a SEC1 key)"
        }
        Algorithm::EcdsaP384Sha384 => {
            "the wrapped material does not unwrap into this key: wrapped with another key's parameters, altered, or not a P-384 private key in PKCS#8 DER (openssl pkcs8 -topk8 -nocrypt -outform DER converts a SEC1 key)"
        }
        _ => {
            "the wrapped material does not unwrap into this key: wrapped with another key's parameters, altered, or not an RSA private key of the algorithm's size in PKCS#8 DER"
        }
    }
}

/// `RSA_AES_KEY_WRAP_SHA_256`: the OAEP block and the AES-KWP part.
fn split_wrapped(wrapped: &[u8]) -> Result<(&[u8], &[u8]), KeyringError> {
    // KWP output is at least 16 bytes.
    if wrapped.len() < WRAPPED_KEY_LEN + 16 {
        return Err(bad(
            "RSA_AES_KEY_WRAP_SHA_256 material is a 512-byte RSA-OAEP block followed by the AES-KWP wrapped material",
        ));
    }
    Ok(wrapped.split_at(WRAPPED_KEY_LEN))
}

/// `RSAES_OAEP_SHA_256`: the material itself, at most 32 bytes.
fn oaep_material(
    algorithm: Algorithm,
    wrapped: &[u8],
    oaep: impl Fn(&[u8]) -> Result<Zeroizing<Vec<u8>>, KeyringError>,
) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
    if !matches!(algorithm, Algorithm::Aes256Gcm | Algorithm::HmacSha256) {
        return Err(bad(
            "RSAES_OAEP_SHA_256 carries at most 32 bytes: wrap this material with RSA_AES_KEY_WRAP_SHA_256",
        ));
    }
    if wrapped.len() != WRAPPED_KEY_LEN {
        return Err(bad(NOT_UNWRAPPED));
    }
    oaep(wrapped)
}

/// AES-KWP (RFC 5649) unwrap in software, for SOFTWARE keys.
fn kwp_unwrap(kek: &[u8], body: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
    use aes_gcm::aead::KeyInit as _;
    use aes_kw::KwpAes256;
    let kwp = KwpAes256::new_from_slice(kek).map_err(|_| bad(NOT_UNWRAPPED))?;
    let mut buf = Zeroizing::new(vec![0u8; body.len()]);
    let len = kwp
        .unwrap_key(body, &mut buf)
        .map_err(|_| bad(NOT_UNWRAPPED))?
        .len();
    buf.truncate(len);
    Ok(buf)
}
