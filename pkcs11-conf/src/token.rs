//! Loading a PKCS#11 module, finding a token by label, and probing what a module offers.

use std::fmt;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::MechanismType;
use cryptoki::slot::Slot;

/// Why a module or token could not be used. PKCS#11 return codes are kept as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The shared library could not be loaded or initialised.
    #[error("cannot load the PKCS#11 module {path}")]
    Load {
        /// The module path.
        path: PathBuf,
        /// What cryptoki said.
        #[source]
        source: cryptoki::error::Error,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 call failed while trying to {op}")]
    Pkcs11 {
        /// What we were doing.
        op: &'static str,
        /// The call and its return code.
        #[source]
        source: cryptoki::error::Error,
    },
    /// No initialised token has the label.
    #[error("no token labelled {label:?} in this PKCS#11 module (tokens present: {})", list(.available))]
    TokenNotFound {
        /// The label asked for.
        label: String,
        /// The labels of the tokens that are present.
        available: Vec<String>,
    },
    /// Several tokens have the label.
    #[error("{count} tokens are labelled {label:?}: token labels must be unique")]
    AmbiguousLabel {
        /// The token label asked for.
        label: String,
        /// How many tokens carry it.
        count: usize,
    },
    /// No slot has an uninitialised token to provision.
    #[error("no free slot to initialise a new token in")]
    NoFreeSlot,
}

fn list(labels: &[String]) -> String {
    if labels.is_empty() {
        "none".to_owned()
    } else {
        labels
            .iter()
            .map(|l| format!("{l:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Wraps a cryptoki error with what we were doing.
pub fn pkcs11_err(op: &'static str) -> impl FnOnce(cryptoki::error::Error) -> TokenError {
    move |source| TokenError::Pkcs11 { op, source }
}

/// Loads and initialises a PKCS#11 module. Call once per process and keep the handle
/// (it is cheap to clone).
pub fn load(path: &Path) -> Result<Pkcs11, TokenError> {
    let load_err = |source| TokenError::Load {
        path: path.to_owned(),
        source,
    };
    let pkcs11 = Pkcs11::new(path).map_err(load_err)?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(load_err)?;
    Ok(pkcs11)
}

/// Finds the slot of the one initialised token labelled `label`. Slot ids change when
/// tokens are added, so kms never stores them.
pub fn find_token(pkcs11: &Pkcs11, label: &str) -> Result<Slot, TokenError> {
    let slots = pkcs11
        .get_slots_with_initialized_token()
        .map_err(pkcs11_err("list slots"))?;
    let mut found = Vec::new();
    let mut available = Vec::new();
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(pkcs11_err("read token info"))?;
        let l = info.label().trim_end().to_owned();
        if l == label {
            found.push(slot);
        }
        available.push(l);
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(TokenError::TokenNotFound {
            label: label.to_owned(),
            available,
        }),
        many => Err(TokenError::AmbiguousLabel {
            label: label.to_owned(),
            count: many.len(),
        }),
    }
}

/// A mechanism kms uses, and what for.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// The PKCS#11 mechanism (CKM_*).
    pub mechanism: MechanismType,
    /// Its PKCS#11 name.
    pub name: &'static str,
    /// What kms uses it for.
    pub used_for: &'static str,
    /// Whether kms cannot start without it.
    pub required: bool,
    /// What kms does without it (its fallback, or why it cannot work).
    pub without: &'static str,
}

/// The mechanisms kms uses.
pub const NEEDS: &[Need] = &[
    Need {
        mechanism: MechanismType::AES_KEY_GEN,
        name: "CKM_AES_KEY_GEN",
        used_for: "generating the master key",
        required: true,
        without: "no fallback: init makes the master key in the token",
    },
    Need {
        mechanism: MechanismType::AES_GCM,
        name: "CKM_AES_GCM",
        used_for: "wrapping the keyring root key under the master key",
        required: true,
        without: "no fallback: the root key is wrapped with AES-GCM inside the token",
    },
    Need {
        mechanism: MechanismType::ECC_KEY_PAIR_GEN,
        name: "CKM_EC_KEY_PAIR_GEN",
        used_for: "HSM-protected ECDSA P-256 and P-384 keys",
        required: false,
        without: "ECDSA keys must be SOFTWARE (creating an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::ECDSA,
        name: "CKM_ECDSA",
        used_for: "HSM-protected ECDSA P-256 and P-384 signing",
        required: false,
        without: "ECDSA keys must be SOFTWARE (signing with an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
        name: "CKM_EC_EDWARDS_KEY_PAIR_GEN",
        used_for: "HSM-protected Ed25519 keys (audit checkpoints)",
        required: true,
        without: "no fallback: init makes the audit checkpoint key (Ed25519) in the token",
    },
    Need {
        mechanism: MechanismType::EDDSA,
        name: "CKM_EDDSA",
        used_for: "HSM-protected Ed25519 signing",
        required: true,
        without: "no fallback: audit checkpoints are signed in the token",
    },
    Need {
        mechanism: MechanismType::GENERIC_SECRET_KEY_GEN,
        name: "CKM_GENERIC_SECRET_KEY_GEN",
        used_for: "HSM-protected HMAC keys",
        required: false,
        without: "HMAC keys must be SOFTWARE (an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::SHA256_HMAC,
        name: "CKM_SHA256_HMAC",
        used_for: "HSM-protected HMAC-SHA256",
        required: false,
        without: "HMAC keys must be SOFTWARE (an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        name: "CKM_RSA_PKCS_KEY_PAIR_GEN",
        used_for: "HSM-protected RSA keys (2048, 3072, 4096 bits)",
        required: false,
        without: "RSA keys must be SOFTWARE (creating an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::RSA_PKCS_PSS,
        name: "CKM_RSA_PKCS_PSS",
        used_for: "HSM-protected RSA-PSS signing (the digest is made in kms)",
        required: false,
        without: "RSA-PSS keys must be SOFTWARE (signing with an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::RSA_PKCS,
        name: "CKM_RSA_PKCS",
        used_for: "HSM-protected RSA PKCS#1 v1.5 signing (over the SHA-256 DigestInfo)",
        required: false,
        without: "RSA PKCS#1 v1.5 keys must be SOFTWARE (signing with an HSM one fails)",
    },
    Need {
        mechanism: MechanismType::RSA_PKCS_OAEP,
        name: "CKM_RSA_PKCS_OAEP",
        used_for: "HSM-protected RSA-OAEP decryption (with SHA-256)",
        required: false,
        without: "kms decrypts with CKM_RSA_X_509 and removes the OAEP padding itself, in constant time",
    },
    Need {
        mechanism: MechanismType::RSA_X_509,
        name: "CKM_RSA_X_509",
        used_for: "HSM-protected RSA-OAEP decryption where the module refuses OAEP with SHA-256 (SoftHSM 2.6)",
        required: false,
        without: "without CKM_RSA_PKCS_OAEP with SHA-256 either, HSM RSA decryption keys fail",
    },
];

/// What a module offers, as `kms pkcs11 probe` prints it.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The module path.
    pub module: PathBuf,
    /// The library's description and manufacturer.
    pub library: String,
    /// The library's version.
    pub library_version: String,
    /// Every slot.
    pub slots: Vec<SlotReport>,
    /// The token label the config names, if any.
    pub wanted_label: Option<String>,
}

/// One slot of a [`ProbeReport`].
#[derive(Debug, Clone)]
pub struct SlotReport {
    /// The slot id (changes when tokens are added: never configure it).
    pub slot_id: u64,
    /// The token in the slot, if initialised.
    pub token: Option<TokenReport>,
    /// Each mechanism kms uses and whether this slot offers it.
    pub mechanisms: Vec<(Need, bool)>,
}

/// The token of a [`SlotReport`].
#[derive(Debug, Clone)]
pub struct TokenReport {
    /// Token label.
    pub label: String,
    /// The token's manufacturer, as it reports itself.
    pub manufacturer: String,
    /// The token's model, as it reports itself.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Whether the user PIN is set.
    pub user_pin_initialized: bool,
}

impl ProbeReport {
    /// Whether the wanted token exists and offers every required mechanism.
    pub fn is_usable(&self) -> bool {
        let Some(label) = &self.wanted_label else {
            return self
                .slots
                .iter()
                .any(|s| s.token.is_some() && s.has_required());
        };
        self.slots
            .iter()
            .any(|s| s.token.as_ref().is_some_and(|t| &t.label == label) && s.has_required())
    }
}

impl SlotReport {
    fn has_required(&self) -> bool {
        self.mechanisms.iter().all(|(n, ok)| *ok || !n.required)
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "module:  {}", self.module.display())?;
        writeln!(
            f,
            "library: {} (version {})",
            self.library, self.library_version
        )?;
        for slot in &self.slots {
            match &slot.token {
                None => writeln!(f, "slot {}: no initialised token", slot.slot_id)?,
                Some(t) => {
                    let mark = match &self.wanted_label {
                        Some(l) if l == &t.label => "  <- configured token",
                        _ => "",
                    };
                    writeln!(f, "slot {}: token {:?}{mark}", slot.slot_id, t.label)?;
                    writeln!(f, "    {} {} serial {}", t.manufacturer, t.model, t.serial)?;
                    if !t.user_pin_initialized {
                        writeln!(f, "    user PIN not initialised")?;
                    }
                    for (need, ok) in &slot.mechanisms {
                        let status = match (ok, need.required) {
                            (true, _) => "ok",
                            (false, true) => "MISSING (required)",
                            (false, false) => "missing",
                        };
                        write!(f, "    {:<28} {:<19} {}", need.name, status, need.used_for)?;
                        if *ok {
                            writeln!(f)?;
                        } else {
                            writeln!(f, "; without it: {}", need.without)?;
                        }
                    }
                }
            }
        }
        if let Some(label) = &self.wanted_label
            && !self
                .slots
                .iter()
                .any(|s| s.token.as_ref().is_some_and(|t| &t.label == label))
        {
            writeln!(f, "configured token {label:?}: NOT FOUND")?;
        }
        write!(
            f,
            "verdict: {}",
            if self.is_usable() {
                "usable by kms"
            } else {
                "NOT usable by kms"
            }
        )
    }
}

/// Lists the slots, tokens and mechanisms of the module at `path`. Needs no PIN.
pub fn probe(path: &Path, wanted_label: Option<&str>) -> Result<ProbeReport, TokenError> {
    let pkcs11 = load(path)?;
    let info = pkcs11
        .get_library_info()
        .map_err(pkcs11_err("read library info"))?;
    let mut slots = Vec::new();
    for slot in pkcs11.get_all_slots().map_err(pkcs11_err("list slots"))? {
        let token_info = pkcs11.get_token_info(slot).ok();
        let token = token_info
            .filter(|t| t.token_initialized())
            .map(|t| TokenReport {
                label: t.label().trim_end().to_owned(),
                manufacturer: t.manufacturer_id().trim_end().to_owned(),
                model: t.model().trim_end().to_owned(),
                serial: t.serial_number().trim_end().to_owned(),
                user_pin_initialized: t.user_pin_initialized(),
            });
        let offered = if token.is_some() {
            pkcs11
                .get_mechanism_list(slot)
                .map_err(pkcs11_err("list mechanisms"))?
        } else {
            Vec::new()
        };
        let mechanisms = NEEDS
            .iter()
            .map(|n| (*n, offered.contains(&n.mechanism)))
            .collect();
        slots.push(SlotReport {
            slot_id: slot.id(),
            token,
            mechanisms,
        });
    }
    Ok(ProbeReport {
        module: path.to_owned(),
        library: format!(
            "{} by {}",
            info.library_description().trim_end(),
            info.manufacturer_id().trim_end()
        ),
        library_version: info.library_version().to_string(),
        slots,
        wanted_label: wanted_label.map(str::to_owned),
    })
}
