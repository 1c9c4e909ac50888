//! The PKCS#11 side of kms: which module, which token, where the PIN comes from, which
//! master key; checked before use, with errors an operator can act on.
//!
//! - [`HsmConfig`]: the `[hsm]` table of the kms config file, and [`HsmConfig::validate`].
//! - [`PinSource`]: an environment variable or a file, never a command-line argument.
//! - [`token`]: load the module, find the token by label, and [`token::probe`] a module for
//!   the slots, tokens and mechanisms kms needs.
//! - [`softhsm`]: a private SoftHSM set-up (its own `SOFTHSM2_CONF` and token directory) and
//!   token provisioning, for development and tests.
//!
//! Nothing here logs or prints a PIN; errors name the PIN's *source*, never its value.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

pub mod softhsm;
pub mod token;

/// The default label of the master key object in the token.
pub const DEFAULT_MASTER_KEY_LABEL: &str = "kms-master-key";
/// The default number of PKCS#11 sessions the server keeps open.
pub const DEFAULT_SESSIONS: usize = 4;
/// PKCS#11 token labels are at most 32 bytes.
pub const MAX_TOKEN_LABEL_LEN: usize = 32;

/// The `[hsm]` table of the configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (a shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token that holds the master key.
    pub token_label: String,
    /// Name of an environment variable that holds the user PIN.
    pub pin_env: Option<String>,
    /// Path of a file that holds the user PIN (trailing newline ignored; must not be
    /// readable by group or others).
    pub pin_file: Option<PathBuf>,
    /// The PIN travels inside the custodians' Shamir secret: given once at init, recovered
    /// at every unseal, never on disk or in the environment.
    #[serde(default)]
    pub pin_in_shares: bool,
    /// Label of the AES-256 master key object.
    #[serde(default = "default_master_key_label")]
    pub master_key_label: String,
    /// How many PKCS#11 sessions to keep open (1..=64).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

fn default_master_key_label() -> String {
    DEFAULT_MASTER_KEY_LABEL.to_owned()
}

fn default_sessions() -> usize {
    DEFAULT_SESSIONS
}

/// A checked [`HsmConfig`]: the module exists, exactly one PIN source is named, labels fit.
#[derive(Debug, Clone)]
pub struct ValidHsmConfig {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// The label of the token kms uses (found by label, never by slot id).
    pub token_label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// The master key object's CKA_LABEL.
    pub master_key_label: String,
    /// Number of sessions.
    pub sessions: usize,
}

/// What is wrong with an `[hsm]` configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `module` names no file.
    #[error(
        "hsm.module: no PKCS#11 module at {0} (is the HSM's client library installed? for SoftHSM: apt-get install softhsm2)"
    )]
    ModuleNotFound(PathBuf),
    /// `module` is not a regular file.
    #[error("hsm.module: {0} is not a file")]
    ModuleNotAFile(PathBuf),
    /// None of `pin_env`, `pin_file`, `pin_in_shares`.
    #[error(
        "hsm: no PIN source: set pin_env (an environment variable's name), pin_file, or pin_in_shares = true"
    )]
    NoPinSource,
    /// More than one PIN source.
    #[error("hsm: set only one of pin_env, pin_file and pin_in_shares")]
    TwoPinSources,
    /// A label is empty or too long.
    #[error("hsm.{field}: must be 1..={max} bytes")]
    BadLabel {
        /// Which key.
        field: &'static str,
        /// The maximum length.
        max: usize,
    },
    /// `pin_env` is not a usable variable name.
    #[error("hsm.pin_env: not a valid environment variable name")]
    BadPinEnv,
    /// `sessions` out of range.
    #[error("hsm.sessions: must be 1..=64, got {0}")]
    BadSessions(usize),
}

impl HsmConfig {
    /// Checks the configuration. Relative paths are taken as they are (relative to the
    /// server's working directory); the config loader resolves them against the file first.
    pub fn validate(&self) -> Result<ValidHsmConfig, ConfigError> {
        match std::fs::metadata(&self.module) {
            Err(_) => return Err(ConfigError::ModuleNotFound(self.module.clone())),
            Ok(m) if !m.is_file() => return Err(ConfigError::ModuleNotAFile(self.module.clone())),
            Ok(_) => {}
        }
        if self.token_label.is_empty() || self.token_label.len() > MAX_TOKEN_LABEL_LEN {
            return Err(ConfigError::BadLabel {
                field: "token_label",
                max: MAX_TOKEN_LABEL_LEN,
            });
        }
        if self.master_key_label.is_empty() || self.master_key_label.len() > 128 {
            return Err(ConfigError::BadLabel {
                field: "master_key_label",
                max: 128,
            });
        }
        let pin = match (&self.pin_env, &self.pin_file, self.pin_in_shares) {
            (None, None, false) => return Err(ConfigError::NoPinSource),
            (Some(var), None, false) => {
                if !is_env_name(var) {
                    return Err(ConfigError::BadPinEnv);
                }
                PinSource::Env(var.clone())
            }
            (None, Some(path), false) => PinSource::File(path.clone()),
            (None, None, true) => PinSource::Shares,
            _ => return Err(ConfigError::TwoPinSources),
        };
        if !(1..=64).contains(&self.sessions) {
            return Err(ConfigError::BadSessions(self.sessions));
        }
        Ok(ValidHsmConfig {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            pin,
            master_key_label: self.master_key_label.clone(),
            sessions: self.sessions,
        })
    }

    /// Resolves relative paths against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.module.is_relative() {
            self.module = base.join(&self.module);
        }
        if let Some(p) = &self.pin_file
            && p.is_relative()
        {
            self.pin_file = Some(base.join(p));
        }
    }
}

/// Whether `name` can name an environment variable that holds a secret: ASCII letters,
/// digits and `_`, not starting with a digit (what `pin_env` and the store's
/// `password_env` accept).
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Where the HSM user PIN comes from. Its `Display` names the source, never the PIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// An environment variable of the server process.
    Env(String),
    /// A file, readable by the server's user only.
    File(PathBuf),
    /// The custodians' Shamir secret: known only while an init or unseal is under way.
    Shares,
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Shares => f.write_str("the unseal shares"),
        }
    }
}

/// Why the PIN could not be read. Names the source, never the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The environment variable is not set.
    #[error("the HSM PIN's {0} is not set")]
    EnvNotSet(PinSource),
    /// The file could not be read.
    #[error("the HSM PIN's {source_name} cannot be read")]
    FileUnreadable {
        /// The source.
        source_name: PinSource,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("the HSM PIN's {0} is readable by group or others: chmod 600 it")]
    FileTooOpen(PinSource),
    /// The PIN is not readable at start-up: it comes with the unseal shares.
    #[error("the HSM PIN travels in the unseal shares: it is known only during init and unseal")]
    InShares,
    /// The PIN is empty or not UTF-8.
    #[error("the HSM PIN from {0} is empty or not valid UTF-8")]
    Empty(PinSource),
}

impl PinSource {
    /// Reads the PIN. [`PinSource::Shares`] has nothing to read: [`PinError::InShares`].
    pub fn read(&self) -> Result<SecretString, PinError> {
        let raw = match self {
            Self::Shares => return Err(PinError::InShares),
            Self::Env(var) => match std::env::var(var) {
                Ok(v) => zeroize::Zeroizing::new(v),
                Err(std::env::VarError::NotPresent) => {
                    return Err(PinError::EnvNotSet(self.clone()));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(PinError::Empty(self.clone()));
                }
            },
            Self::File(path) => {
                check_private_file(path).map_err(|e| match e {
                    PrivateFileError::Io(source) => PinError::FileUnreadable {
                        source_name: self.clone(),
                        source,
                    },
                    PrivateFileError::TooOpen => PinError::FileTooOpen(self.clone()),
                })?;
                let bytes = std::fs::read(path).map_err(|source| PinError::FileUnreadable {
                    source_name: self.clone(),
                    source,
                })?;
                zeroize::Zeroizing::new(String::from_utf8(bytes).map_err(|e| {
                    let mut b = e.into_bytes();
                    zeroize::Zeroize::zeroize(&mut b);
                    PinError::Empty(self.clone())
                })?)
            }
        };
        let pin = raw.trim_end_matches(['\n', '\r']);
        if pin.is_empty() {
            return Err(PinError::Empty(self.clone()));
        }
        Ok(SecretString::from(pin.to_owned()))
    }
}

enum PrivateFileError {
    Io(std::io::Error),
    TooOpen,
}

fn check_private_file(path: &Path) -> Result<(), PrivateFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(PrivateFileError::Io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(PrivateFileError::TooOpen);
    }
    Ok(())
}

/// Well-known places of the SoftHSM module on Debian and Ubuntu.
pub const SOFTHSM_MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM module, if installed in a well-known place.
pub fn find_softhsm_module() -> Option<PathBuf> {
    SOFTHSM_MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn base(module: &Path) -> HsmConfig {
        HsmConfig {
            module: module.to_owned(),
            token_label: "kms".into(),
            pin_env: Some("KMS_HSM_PIN".into()),
            pin_file: None,
            pin_in_shares: false,
            master_key_label: DEFAULT_MASTER_KEY_LABEL.into(),
            sessions: 4,
        }
    }

    #[test]
    fn validation_errors_are_specific() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("lib.so");
        std::fs::write(&module, b"").unwrap();
        assert!(base(&module).validate().is_ok());

        let missing = base(&dir.path().join("nope.so")).validate().unwrap_err();
        assert!(matches!(missing, ConfigError::ModuleNotFound(_)));
        assert!(missing.to_string().contains("nope.so"));
        assert!(matches!(
            base(dir.path()).validate().unwrap_err(),
            ConfigError::ModuleNotAFile(_)
        ));

        let mut c = base(&module);
        c.pin_env = None;
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::NoPinSource
        ));
        c.pin_env = Some("X".into());
        c.pin_file = Some("/x".into());
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::TwoPinSources
        ));
        let mut c = base(&module);
        c.pin_in_shares = true;
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::TwoPinSources
        ));
        c.pin_env = None;
        assert_eq!(c.validate().unwrap().pin, PinSource::Shares);
        assert!(matches!(
            PinSource::Shares.read().unwrap_err(),
            PinError::InShares
        ));
        let mut c = base(&module);
        c.pin_env = Some("1BAD".into());
        assert!(matches!(c.validate().unwrap_err(), ConfigError::BadPinEnv));
        let mut c = base(&module);
        c.token_label = "x".repeat(33);
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::BadLabel {
                field: "token_label",
                ..
            }
        ));
        let mut c = base(&module);
        c.sessions = 0;
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::BadSessions(0)
        ));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<HsmConfig>(
            "module = \"/x\"\ntoken_label = \"t\"\npin_env = \"P\"\npin = \"1234\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn pin_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "98765432\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let src = PinSource::File(path.clone());
        let err = src.read().unwrap_err();
        assert!(matches!(err, PinError::FileTooOpen(_)));
        assert!(!err.to_string().contains("98765432"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(src.read().unwrap().expose_secret(), "98765432");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(src.read().unwrap_err(), PinError::Empty(_)));
        let gone = PinSource::File(dir.path().join("gone"));
        assert!(matches!(
            gone.read().unwrap_err(),
            PinError::FileUnreadable { .. }
        ));
        let env = PinSource::Env("KMS_TEST_SURELY_UNSET_VARIABLE".into());
        let err = env.read().unwrap_err();
        assert!(err.to_string().contains("KMS_TEST_SURELY_UNSET_VARIABLE"));
    }
}
