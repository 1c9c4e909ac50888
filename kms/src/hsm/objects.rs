//! The objects kms makes in the token: keyring keys (each with a random CKA_ID), the
//! lookups that must find exactly one, their destruction, and the master key's
//! attributes.

use super::{
    Attribute, AttributeType, GCM_IV_LEN, GCM_TAG_BITS, GcmParams, Hsm, HsmError, KeyHandle,
    KeyType, Mechanism, ObjectClass, ObjectHandle, Ownership, RvError, Session, owner, pk, recover,
};

/// DER of the Ed25519 curve OID 1.3.101.112 (CKA_EC_PARAMS).
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];
/// DER of the P-256 curve OID 1.2.840.10045.3.1.7 (CKA_EC_PARAMS).
const OID_P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// DER of the P-384 curve OID 1.3.132.0.34 (CKA_EC_PARAMS).
const OID_P384: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];

impl Hsm {
    /// Generates a keyring key inside the token, labelled `label`: a token object,
    /// private, sensitive, never extractable, with only the usages `kind` needs.
    /// Returns the private (or secret) key and, for key pairs, the public key's bytes
    /// (Ed25519: 32 bytes; P-256 and P-384: the 65- or 97-byte uncompressed SEC1 point;
    /// RSA: SubjectPublicKeyInfo DER).
    pub fn generate_key(
        &self,
        kind: HsmKeyKind,
        label: &str,
        id: &[u8],
    ) -> Result<(KeyHandle, Option<Vec<u8>>), HsmError> {
        let (class, key_type) = kind.class_and_type();
        let lookup = recover::Lookup::new(class, Some(key_type), label, Some(id)).generated(true);
        let (handle, public) = self.with_session("generate", |s| {
            let base = base_template(label, id);
            match kind {
                HsmKeyKind::Aes256 | HsmKeyKind::HmacSha256 => {
                    Ok((generate_secret(s, kind, base)?, None))
                }
                HsmKeyKind::Ed25519 | HsmKeyKind::EcdsaP256 | HsmKeyKind::EcdsaP384 => {
                    let (key, public) = generate_ec_pair(s, kind, base)?;
                    Ok((key, Some(public)))
                }
                HsmKeyKind::Rsa(scheme, bits) => {
                    let (key, public) = generate_rsa_pair(s, scheme, bits, base)?;
                    Ok((key, Some(public)))
                }
            }
        })?;
        Ok((self.register(handle, lookup), public))
    }

    /// Unwraps customer key material into a token object of `kind`, labelled `label` with
    /// CKA_ID `id`, with the same attributes as a key kms generates: `kek` (the AES-256 key
    /// the customer wrapped with) becomes a session object, `wrapped` (AES-KWP, RFC 5649)
    /// is unwrapped by the module with CKM_AES_KEY_WRAP_PAD (SoftHSM's RFC 5649 key wrap),
    /// and the session key is destroyed. The material never leaves the token. The new
    /// object is checked to be what `kind` says (size, curve), or destroyed and refused.
    /// Returns the object and, for RSA, its public key (SubjectPublicKeyInfo DER).
    pub(crate) fn unwrap_key_material(
        &self,
        kind: HsmKeyKind,
        kek: &[u8],
        wrapped: &[u8],
        label: &str,
        id: &[u8],
    ) -> Result<(KeyHandle, Option<Vec<u8>>), HsmError> {
        let (class, key_type) = kind.class_and_type();
        let lookup = recover::Lookup::new(class, Some(key_type), label, Some(id));
        let (handle, public) = self.with_session("unwrap", |s| {
            let session_kek = s
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Value(kek.to_vec()),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Unwrap(true),
                    Attribute::Wrap(false),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                ])
                .map_err(pk("load the import's AES key"))?;
            let made = s.unwrap_key(
                &Mechanism::AesKeyWrapPad,
                session_kek,
                wrapped,
                &import_template(kind, label, id),
            );
            let _ = s.destroy_object(session_kek);
            let h = made.map_err(|e| match e {
                cryptoki::error::Error::Pkcs11(RvError::MechanismInvalid, _) => HsmError::Unsupported(
                    "this HSM module cannot unwrap with CKM_AES_KEY_WRAP_PAD (RFC 5649): import into a SOFTWARE key",
                ),
                cryptoki::error::Error::Pkcs11(
                    RvError::WrappedKeyInvalid
                    | RvError::WrappedKeyLenRange
                    | RvError::UnwrappingKeyHandleInvalid
                    | RvError::GeneralError
                    | RvError::DeviceError
                    | RvError::FunctionFailed
                    | RvError::EncryptedDataInvalid
                    | RvError::TemplateInconsistent
                    | RvError::AttributeValueInvalid
                    | RvError::DomainParamsInvalid,
                    _,
                ) => HsmError::DecryptFailed,
                e => pk("unwrap the imported key")(e),
            })?;
            match check_imported(s, kind, h) {
                Ok(public) => Ok((h, public)),
                Err(e) => {
                    let _ = s.destroy_object(h);
                    Err(e)
                }
            }
        })?;
        Ok((self.register(handle, lookup), public))
    }

    /// Creates a secret key of `kind` (AES-256 or HMAC) in the token from its value, with the
    /// same attributes as one kms generates (for material that came RSA-OAEP-wrapped, which
    /// the module cannot unwrap into a key itself).
    pub(crate) fn create_secret_key(
        &self,
        kind: HsmKeyKind,
        value: &[u8],
        label: &str,
        id: &[u8],
    ) -> Result<KeyHandle, HsmError> {
        if !matches!(kind, HsmKeyKind::Aes256 | HsmKeyKind::HmacSha256) {
            return Err(HsmError::Misuse(
                "only secret keys are created from a value",
            ));
        }
        let lookup = recover::Lookup::new(
            ObjectClass::SECRET_KEY,
            Some(kind.class_and_type().1),
            label,
            Some(id),
        );
        let handle = self.with_session("create", |s| {
            let mut template = import_template(kind, label, id);
            template.push(Attribute::Value(value.to_vec()));
            s.create_object(&template)
                .map_err(pk("create the imported key"))
        })?;
        Ok(self.register(handle, lookup))
    }

    /// Finds a key kms made (after a restart, handles are looked up again): the token
    /// object of `kind` with this label and, when given, this CKA_ID. Exactly one must
    /// answer (`None`: none does), and it must be what kms made: the right class and key
    /// type, sensitive and never extractable, and, for a key generated in the token
    /// (`Provenance::Generated`), always sensitive and never extractable since it was made
    /// (a key someone created from a value they know, under its label and id, is refused).
    pub(crate) fn find_key(
        &self,
        kind: HsmKeyKind,
        provenance: Provenance,
        label: &str,
        id: Option<&[u8]>,
    ) -> Result<Option<KeyHandle>, HsmError> {
        let (class, key_type) = kind.class_and_type();
        let mut template = vec![
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        if let Some(id) = id {
            template.push(Attribute::Id(id.to_vec()));
        }
        let lookup = recover::Lookup::new(class, Some(key_type), label, id)
            .generated(provenance == Provenance::Generated);
        self.with_session("find", |s| {
            let found = s.find_objects(&template).map_err(pk("find a key"))?;
            let one = match found.as_slice() {
                [] => return Ok(None),
                [one] => *one,
                many => {
                    return Err(HsmError::KeyAmbiguous {
                        label: label.to_owned(),
                        count: many.len(),
                    });
                }
            };
            lookup
                .check(s, one)
                .map_err(|why| HsmError::UnexpectedObject {
                    label: label.to_owned(),
                    why,
                })?;
            Ok(Some(self.register(one, lookup.clone())))
        })
    }

    /// Every token object whose label starts with `prefix`: handle, label and CKA_ID (for
    /// finding the objects kms made that no record names).
    pub(crate) fn objects_labelled(&self, prefix: &str) -> Result<Vec<TokenObject>, HsmError> {
        self.with_session("list", |s| {
            let all = s
                .find_objects(&[Attribute::Token(true)])
                .map_err(pk("list token objects"))?;
            let mut out = Vec::new();
            for h in all {
                let attrs = s
                    .get_attributes(
                        h,
                        &[
                            AttributeType::Label,
                            AttributeType::Id,
                            AttributeType::Class,
                        ],
                    )
                    .map_err(pk("read an object's label"))?;
                let (mut label, mut id, mut class) = (Vec::new(), Vec::new(), None);
                for a in attrs {
                    match a {
                        Attribute::Label(l) => label = l,
                        Attribute::Id(i) => id = i,
                        Attribute::Class(c) => class = Some(c),
                        _ => {}
                    }
                }
                let label = String::from_utf8_lossy(&label).into_owned();
                if label.starts_with(prefix) {
                    let lookup = recover::Lookup::new(
                        class.unwrap_or(ObjectClass::SECRET_KEY),
                        None,
                        &label,
                        Some(&id),
                    );
                    out.push(TokenObject {
                        handle: self.register(h, lookup),
                        label,
                        id,
                    });
                }
            }
            Ok(out)
        })
    }

    /// Destroys the key object kms made with this label and id, and confirms with the token
    /// that it is gone (`Ok` also when it was gone already). After a failed destroy the
    /// object is never confirmed gone in this process (see
    /// [`HsmError::DestroyUnconfirmed`]): a restart, with a fresh view of the token, is
    /// needed to try again.
    pub(crate) fn destroy_key(
        &self,
        kind: HsmKeyKind,
        label: &str,
        id: Option<&[u8]>,
    ) -> Result<(), HsmError> {
        let entry = (label.to_owned(), id.map(<[u8]>::to_vec));
        let unconfirmed = || self.unconfirmed.lock().unwrap_or_else(|p| p.into_inner());
        if unconfirmed().contains(&entry) {
            return Err(HsmError::DestroyUnconfirmed {
                label: label.to_owned(),
            });
        }
        if let Some(h) = self.find_key(kind, Provenance::Either, label, id)?
            && let Err(e) = self.destroy(h)
        {
            // Refused before the token was asked: nothing to distrust.
            if !matches!(e, HsmError::NotOurs { .. }) {
                unconfirmed().insert(entry);
            }
            return Err(e);
        }
        if self
            .find_key(kind, Provenance::Either, label, id)?
            .is_some()
        {
            return Err(HsmError::Misuse(
                "the token still holds an object it destroyed",
            ));
        }
        Ok(())
    }

    /// Destroys a key object: its material is gone from the token for good. Only an object
    /// this instance made (its CKA_ID, read from the token now, says so; see `owner.rs`):
    /// any other is refused with [`HsmError::NotOurs`] and left as it is.
    pub fn destroy(&self, key: KeyHandle) -> Result<(), HsmError> {
        let ownership = self.ownership();
        self.with_session("destroy", |s| {
            let handle = self.handle(key)?;
            let (label, id) = label_and_id(s, handle)?;
            if !ownership.owns(&id) {
                return Err(HsmError::NotOurs {
                    maker: match owner::maker(&id) {
                        owner::Maker::Instance(i) => format!("made by kms instance {i}"),
                        owner::Maker::Untagged => {
                            "made before this instance, or outside kms".to_owned()
                        }
                        owner::Maker::Nobody => "it has no CKA_ID".to_owned(),
                    },
                    label,
                });
            }
            s.destroy_object(handle).map_err(pk("destroy a key"))
        })
    }

    /// Makes a marker in the token: a private data object labelled `label`, holding no
    /// secret, that nobody who can only write the store can make or remove. kms uses one to
    /// remember, where a store writer cannot roll it back, that a scheduled destruction was
    /// cancelled (`keyring::maintenance`).
    pub(crate) fn create_marker(&self, label: &str) -> Result<(), HsmError> {
        self.with_session("create", |s| {
            s.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Modifiable(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Application(MARKER_APPLICATION.to_vec()),
                Attribute::Value(b"1".to_vec()),
            ])
            .map(drop)
            .map_err(pk("make a marker"))
        })
    }

    /// Whether the token holds a marker kms made labelled `label`.
    pub(crate) fn has_marker(&self, label: &str) -> Result<bool, HsmError> {
        self.with_session("find", |s| {
            Ok(!s
                .find_objects(&marker_template(label))
                .map_err(pk("find a marker"))?
                .is_empty())
        })
    }

    /// Removes the markers kms made whose label starts with `prefix` (they hold no key
    /// material).
    pub(crate) fn remove_markers(&self, prefix: &str) -> Result<(), HsmError> {
        self.with_session("destroy", |s| {
            for h in s
                .find_objects(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Application(MARKER_APPLICATION.to_vec()),
                ])
                .map_err(pk("find a marker"))?
            {
                let (label, _) = label_and_id(s, h)?;
                if label.starts_with(prefix) {
                    s.destroy_object(h).map_err(pk("remove a marker"))?;
                }
            }
            Ok(())
        })
    }

    /// What this instance may destroy (see `owner.rs`).
    pub(crate) fn ownership(&self) -> Ownership {
        self.owner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets this instance's identity and what it owns: the seal sets it from the
    /// authenticated seal record; a program with a token of its own and no seal (a bench)
    /// sets one before it makes keys.
    pub fn set_ownership(&self, ownership: Ownership) {
        *self.owner.write().unwrap_or_else(|p| p.into_inner()) = ownership;
    }

    /// A fresh CKA_ID for an object this instance makes: the marker, the instance, 16
    /// random bytes.
    pub(crate) fn new_object_id(&self) -> Result<Vec<u8>, HsmError> {
        self.ownership().new_object_id().ok_or(HsmError::Misuse(
            "no instance identity yet, or the random source failed",
        ))
    }

    /// Reads the master key's security attributes, as the token reports them.
    pub(crate) fn master_key_attributes(
        &self,
        key: KeyHandle,
    ) -> Result<MasterKeyAttributes, HsmError> {
        self.with_session("attributes", |s| {
            let attrs = s
                .get_attributes(
                    self.handle(key)?,
                    &[
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::NeverExtractable,
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Copyable,
                        AttributeType::Derive,
                        AttributeType::Wrap,
                    ],
                )
                .map_err(pk("read master key attributes"))?;
            // Read what the token says; an attribute it does not report counts against the
            // key, except CKA_COPYABLE (PKCS#11 2.40), whose copies could not be extractable
            // or less sensitive anyway.
            let mut out = MasterKeyAttributes {
                derive: true,
                wrap: true,
                ..MasterKeyAttributes::default()
            };
            for a in attrs {
                match a {
                    Attribute::Sensitive(v) => out.sensitive = v,
                    Attribute::Extractable(v) => out.extractable = v,
                    Attribute::NeverExtractable(v) => out.never_extractable = v,
                    Attribute::Token(v) => out.token = v,
                    Attribute::Private(v) => out.private = v,
                    Attribute::Copyable(v) => out.copyable = v,
                    Attribute::Derive(v) => out.derive = v,
                    Attribute::Wrap(v) => out.wrap = v,
                    _ => {}
                }
            }
            Ok(out)
        })
    }
}

/// A token object found by `Hsm::objects_labelled`.
#[derive(Debug, Clone)]
pub struct TokenObject {
    /// Its handle.
    pub handle: KeyHandle,
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID.
    pub id: Vec<u8>,
}

/// The kinds of keyring key kms makes inside the HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmKeyKind {
    /// AES-256 for AES-GCM.
    Aes256,
    /// Ed25519 (CKM_EDDSA).
    Ed25519,
    /// ECDSA over P-256 (CKM_ECDSA on a SHA-256 digest).
    EcdsaP256,
    /// ECDSA over P-384 (CKM_ECDSA on a SHA-384 digest).
    EcdsaP384,
    /// A 256-bit generic secret for CKM_SHA256_HMAC.
    HmacSha256,
    /// An RSA private key of this many bits, for one scheme (its only usage).
    Rsa(RsaScheme, usize),
}

/// How a key object came into the token, for the checks when it is found
/// (`Hsm::find_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    /// Generated in the token by kms: always sensitive and never extractable since made.
    Generated,
    /// Imported (unwrapped or created from a value) or made elsewhere: sensitive and not
    /// extractable now.
    Either,
}

/// What an RSA key does with its private half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaScheme {
    /// RSASSA-PSS signatures over SHA-256 (MGF1-SHA-256, salt: 32 bytes).
    Pss,
    /// RSASSA-PKCS1-v1_5 signatures over SHA-256.
    Pkcs1,
    /// RSAES-OAEP decryption with SHA-256 and MGF1-SHA-256, empty label.
    Oaep,
}

impl HsmKeyKind {
    /// The class and key type of the object kms uses (the private half of a pair).
    fn class_and_type(self) -> (ObjectClass, KeyType) {
        match self {
            Self::Aes256 => (ObjectClass::SECRET_KEY, KeyType::AES),
            Self::HmacSha256 => (ObjectClass::SECRET_KEY, KeyType::GENERIC_SECRET),
            Self::Ed25519 => (ObjectClass::PRIVATE_KEY, KeyType::EC_EDWARDS),
            Self::EcdsaP256 | Self::EcdsaP384 => (ObjectClass::PRIVATE_KEY, KeyType::EC),
            Self::Rsa(..) => (ObjectClass::PRIVATE_KEY, KeyType::RSA),
        }
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point; some tokens return the bare point.
fn unwrap_ec_point(value: &[u8], want: usize) -> Result<Vec<u8>, HsmError> {
    match value {
        [0x04, len, rest @ ..] if usize::from(*len) == want && rest.len() == want => {
            Ok(rest.to_vec())
        }
        bare if bare.len() == want => Ok(bare.to_vec()),
        _ => Err(HsmError::Misuse(
            "unexpected EC point encoding from the token",
        )),
    }
}

/// The master key's security attributes, as read from the token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MasterKeyAttributes {
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: bool,
    /// CKA_TOKEN.
    pub token: bool,
    /// CKA_PRIVATE: only a logged-in user sees it.
    pub private: bool,
    /// CKA_COPYABLE.
    pub copyable: bool,
    /// CKA_DERIVE: other keys could be derived from it (and those could be extractable).
    pub derive: bool,
    /// CKA_WRAP: it could wrap other keys out of the token.
    pub wrap: bool,
}

impl MasterKeyAttributes {
    /// Why the key is not as kms requires (a sensitive, never extractable, private token
    /// object that derives and wraps nothing); empty when it is.
    pub(crate) fn problems(&self) -> Vec<&'static str> {
        [
            (!self.sensitive, "not sensitive"),
            (self.extractable, "extractable"),
            (!self.never_extractable, "was extractable once"),
            (!self.token, "not a token object"),
            (!self.private, "not private"),
            (self.copyable, "copyable"),
            (self.derive, "can derive keys"),
            (self.wrap, "can wrap keys"),
        ]
        .into_iter()
        .filter_map(|(bad, why)| bad.then_some(why))
        .collect()
    }
}

/// Attributes every keyring key has: a private token object that never leaves, with a
/// random CKA_ID that tells it apart from any other object with its label (one left by a
/// crash before its version was committed, say).
/// An object's CKA_LABEL (lossy UTF-8) and CKA_ID (empty when it has none), as the token
/// reports them.
fn label_and_id(s: &Session, h: ObjectHandle) -> Result<(String, Vec<u8>), HsmError> {
    let attrs = s
        .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
        .map_err(pk("read an object's label and id"))?;
    let (mut label, mut id) = (Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::Label(l) => label = l,
            Attribute::Id(i) => id = i,
            _ => {}
        }
    }
    Ok((String::from_utf8_lossy(&label).into_owned(), id))
}

/// The CKA_APPLICATION of the markers kms makes.
const MARKER_APPLICATION: &[u8] = b"kms";

fn marker_template(label: &str) -> [Attribute; 4] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Application(MARKER_APPLICATION.to_vec()),
    ]
}

fn base_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Id(id.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Derive(false),
    ]
}

/// A 256-bit secret key: AES encrypts and decrypts, the HMAC key signs and verifies. Every
/// usage flag is explicit (SoftHSM adds defaults otherwise).
fn generate_secret(
    s: &Session,
    kind: HsmKeyKind,
    mut template: Vec<Attribute>,
) -> Result<ObjectHandle, HsmError> {
    let (mechanism, key_type, mac) = match kind {
        HsmKeyKind::Aes256 => (Mechanism::AesKeyGen, KeyType::AES, false),
        _ => (
            Mechanism::GenericSecretKeyGen,
            KeyType::GENERIC_SECRET,
            true,
        ),
    };
    template.extend([
        Attribute::Encrypt(!mac),
        Attribute::Decrypt(!mac),
        Attribute::Sign(mac),
        Attribute::Verify(mac),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::ValueLen(32u64.into()),
    ]);
    let h = s
        .generate_key(&mechanism, &template)
        .map_err(pk("generate a secret key"))?;
    Ok(h)
}

/// An Ed25519 or P-256 key pair. The private key gets the usages a private key can have,
/// explicit; the public half is a session object, read and destroyed at once: kms keeps the
/// public key's bytes in its (authenticated) metadata and verifies in software. Returns the
/// private key and the public key's bytes (Ed25519: 32 bytes; P-256: the 65-byte
/// uncompressed SEC1 point).
fn generate_ec_pair(
    s: &Session,
    kind: HsmKeyKind,
    mut private: Vec<Attribute>,
) -> Result<(ObjectHandle, Vec<u8>), HsmError> {
    let (mechanism, key_type, params): (Mechanism<'_>, KeyType, &[u8]) = match kind {
        HsmKeyKind::Ed25519 => (
            Mechanism::EccEdwardsKeyPairGen,
            KeyType::EC_EDWARDS,
            OID_ED25519,
        ),
        HsmKeyKind::EcdsaP384 => (Mechanism::EccKeyPairGen, KeyType::EC, OID_P384),
        _ => (Mechanism::EccKeyPairGen, KeyType::EC, OID_P256),
    };
    let public = [
        Attribute::Token(false),
        Attribute::Verify(true),
        Attribute::KeyType(key_type),
        Attribute::EcParams(params.to_vec()),
    ];
    private.extend([
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
    ]);
    let (pub_h, priv_h) = s
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(pk("generate a key pair"))?;
    let point = s
        .get_attributes(pub_h, &[AttributeType::EcPoint])
        .map_err(pk("read the public key"))?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or(HsmError::Misuse("the token returned no public key"))?;
    let _ = s.destroy_object(pub_h);
    let want = match kind {
        HsmKeyKind::Ed25519 => 32,
        HsmKeyKind::EcdsaP384 => 97,
        _ => 65,
    };
    Ok((priv_h, unwrap_ec_point(&point, want)?))
}

/// An RSA key pair of `bits` with public exponent 65537. The private key has the one usage
/// its scheme needs (sign, or decrypt), every other usage false; the public half is a
/// session object, read and destroyed at once. Returns the private key and the public key
/// as SubjectPublicKeyInfo DER.
fn generate_rsa_pair(
    s: &Session,
    scheme: RsaScheme,
    bits: usize,
    mut private: Vec<Attribute>,
) -> Result<(ObjectHandle, Vec<u8>), HsmError> {
    let decrypt = scheme == RsaScheme::Oaep;
    let bits = u64::try_from(bits).map_err(|_| HsmError::Misuse("RSA modulus size"))?;
    let public = [
        Attribute::Token(false),
        Attribute::Verify(!decrypt),
        Attribute::Encrypt(decrypt),
        Attribute::Wrap(false),
        Attribute::KeyType(KeyType::RSA),
        Attribute::ModulusBits(bits.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
    ];
    private.extend([
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Sign(!decrypt),
        Attribute::Decrypt(decrypt),
        Attribute::Unwrap(false),
    ]);
    let (pub_h, priv_h) = s
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .map_err(pk("generate an RSA key pair"))?;
    let read = rsa_public_parts(s, pub_h);
    let _ = s.destroy_object(pub_h);
    let Some((n, e)) = read? else {
        return Err(HsmError::Misuse("the token returned no RSA public key"));
    };
    let spki = rsa_spki(&n, &e).ok_or(HsmError::Misuse(
        "the token returned a malformed RSA public key",
    ))?;
    Ok((priv_h, spki))
}

/// An RSA public key's modulus and exponent, big-endian.
type RsaParts = (Vec<u8>, Vec<u8>);

/// An RSA key object's modulus and public exponent (public attributes, also on a private
/// key), if the token gives both.
fn rsa_public_parts(s: &Session, h: ObjectHandle) -> Result<Option<RsaParts>, HsmError> {
    let attrs = s
        .get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])
        .map_err(pk("read an RSA key's public part"))?;
    let (mut n, mut e) = (None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(v) => n = Some(v),
            Attribute::PublicExponent(v) => e = Some(v),
            _ => {}
        }
    }
    Ok(n.zip(e))
}

/// SubjectPublicKeyInfo DER of the RSA public key `(n, e)` (big-endian bytes).
fn rsa_spki(n: &[u8], e: &[u8]) -> Option<Vec<u8>> {
    use rsa::pkcs8::EncodePublicKey;
    let n = rsa::BoxedUint::from_be_slice_vartime(n);
    let e = rsa::BoxedUint::from_be_slice_vartime(e);
    let key = rsa::PublicKey::new(n, e).ok()?;
    key.to_public_key_der().ok().map(|d| d.into_vec())
}

/// The template of an imported key of `kind`: the attributes of one kms generates.
fn import_template(kind: HsmKeyKind, label: &str, id: &[u8]) -> Vec<Attribute> {
    let mut t = base_template(label, id);
    let (class, key_type) = kind.class_and_type();
    t.extend([Attribute::Class(class), Attribute::KeyType(key_type)]);
    match kind {
        HsmKeyKind::Aes256 | HsmKeyKind::HmacSha256 => {
            let mac = kind == HsmKeyKind::HmacSha256;
            t.extend([
                Attribute::Encrypt(!mac),
                Attribute::Decrypt(!mac),
                Attribute::Sign(mac),
                Attribute::Verify(mac),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
            ]);
        }
        HsmKeyKind::Rsa(scheme, _) => {
            let decrypt = scheme == RsaScheme::Oaep;
            t.extend([
                Attribute::Sign(!decrypt),
                Attribute::Decrypt(decrypt),
                Attribute::Unwrap(false),
            ]);
        }
        HsmKeyKind::Ed25519 | HsmKeyKind::EcdsaP256 | HsmKeyKind::EcdsaP384 => {
            t.extend([
                Attribute::Sign(true),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
            ]);
        }
    }
    // SoftHSM applies an unwrap template in order and refuses every attribute after
    // CKA_MODIFIABLE = false (CKR_ATTRIBUTE_READ_ONLY): it goes last.
    if let Some(at) = t.iter().position(|a| matches!(a, Attribute::Modifiable(_))) {
        let m = t.remove(at);
        t.push(m);
    }
    t
}

/// Checks an unwrapped key is what `kind` says: a 32-byte secret, an RSA key of the size
/// (its public key returned, SubjectPublicKeyInfo DER), or an EC key on the curve.
fn check_imported(
    s: &Session,
    kind: HsmKeyKind,
    h: ObjectHandle,
) -> Result<Option<Vec<u8>>, HsmError> {
    let refuse = |why| Err(HsmError::ImportRefused(why));
    match kind {
        HsmKeyKind::Aes256 | HsmKeyKind::HmacSha256 => {
            let len = s
                .get_attributes(h, &[AttributeType::ValueLen])
                .map_err(pk("read the imported key's size"))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::ValueLen(l) => Some(u64::from(l)),
                    _ => None,
                });
            match len {
                Some(32) => Ok(None),
                Some(l) if l != 0 => refuse("the material is not 32 bytes"),
                // SoftHSM keeps no CKA_VALUE_LEN for an unwrapped key: the caller has
                // checked the wrapped length (25 to 32 bytes), and the key must work (an
                // AES key of 25 to 31 bytes does not, nor an HMAC key under 32 bytes).
                _ => {
                    let works = if kind == HsmKeyKind::Aes256 {
                        let mut iv = [0u8; GCM_IV_LEN];
                        getrandom::fill(&mut iv).map_err(|_| {
                            HsmError::Misuse("operating system random source failed")
                        })?;
                        GcmParams::new(&mut iv, b"", GCM_TAG_BITS.into())
                            .ok()
                            .is_some_and(|p| s.encrypt(&Mechanism::AesGcm(p), h, &[0; 16]).is_ok())
                    } else {
                        s.sign(&Mechanism::Sha256Hmac, h, b"kms").is_ok()
                    };
                    if works {
                        Ok(None)
                    } else {
                        refuse("the material is not 32 bytes")
                    }
                }
            }
        }
        HsmKeyKind::Rsa(_, bits) => {
            let Some((n, e)) = rsa_public_parts(s, h)? else {
                return refuse("the token gave no public part for the imported RSA key");
            };
            let n_bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if n_bits != bits {
                return refuse("the RSA key is not of the algorithm's size");
            }
            rsa_spki(&n, &e)
                .map(Some)
                .ok_or(HsmError::ImportRefused("the RSA key is malformed"))
        }
        HsmKeyKind::Ed25519 | HsmKeyKind::EcdsaP256 | HsmKeyKind::EcdsaP384 => {
            let params = s
                .get_attributes(h, &[AttributeType::EcParams])
                .map_err(pk("read the imported key's curve"))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcParams(p) => Some(p),
                    _ => None,
                });
            let want: &[u8] = match kind {
                HsmKeyKind::Ed25519 => OID_ED25519,
                HsmKeyKind::EcdsaP384 => OID_P384,
                _ => OID_P256,
            };
            // Ed25519 may be named by OID or by the printable name "edwards25519".
            let ok = params.as_deref() == Some(want)
                || (kind == HsmKeyKind::Ed25519
                    && params
                        .as_deref()
                        .is_some_and(|p| p.ends_with(b"edwards25519")));
            if ok {
                Ok(None)
            } else {
                refuse("the key is not on the algorithm's curve")
            }
        }
    }
}
