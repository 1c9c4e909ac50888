//! A private SoftHSM set-up for development and tests.
//!
//! SoftHSM finds its configuration through the `SOFTHSM2_CONF` environment variable, read
//! when the module is initialised. [`SoftHsmDir::create`] writes a configuration whose token
//! directory is inside a directory of ours, so nothing touches the system's tokens. The
//! process that loads the module must have `SOFTHSM2_CONF` set to [`SoftHsmDir::conf`]
//! *before* it starts (kms sets it on the child processes it spawns; it never changes its own
//! environment, which is unsound in a threaded program).

use std::io;
use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use secrecy::SecretString;

use crate::token::{TokenError, find_token, pkcs11_err};

/// The environment variable SoftHSM reads its configuration path from.
pub const CONF_ENV: &str = "SOFTHSM2_CONF";

/// A directory holding a SoftHSM configuration and its token store.
#[derive(Debug, Clone)]
pub struct SoftHsmDir {
    /// The `softhsm2.conf` file.
    pub conf: PathBuf,
    /// The token directory.
    pub tokens: PathBuf,
}

impl SoftHsmDir {
    /// Writes `softhsm2.conf` and creates `tokens/` in `dir` (created if missing). Existing
    /// tokens are kept.
    pub fn create(dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let tokens = dir.join("tokens");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tokens)?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "# Written by kms: a private SoftHSM token store.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        );
        std::fs::write(&conf, text)?;
        Ok(Self { conf, tokens })
    }
}

/// Initialises a new token labelled `label` in a free slot, sets its SO and user PINs, and
/// returns its slot. The process must have `SOFTHSM2_CONF` pointing at the intended token
/// directory (see the module docs).
pub fn provision_token(
    pkcs11: &Pkcs11,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<Slot, TokenError> {
    if find_token(pkcs11, label).is_ok() {
        return Err(TokenError::AmbiguousLabel {
            label: label.to_owned(),
            count: 2,
        });
    }
    let mut free = None;
    for slot in pkcs11.get_all_slots().map_err(pkcs11_err("list slots"))? {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(pkcs11_err("read token info"))?;
        if !info.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or(TokenError::NoFreeSlot)?;
    pkcs11
        .init_token(slot, so_pin, label)
        .map_err(pkcs11_err("initialise the token"))?;
    // SoftHSM renumbers slots after C_InitToken: look the token up again by label.
    let slot = find_token(pkcs11, label)?;
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(pkcs11_err("open a session"))?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(pkcs11_err("log in as security officer"))?;
    session
        .init_pin(user_pin)
        .map_err(pkcs11_err("set the user PIN"))?;
    session.logout().map_err(pkcs11_err("log out"))?;
    Ok(slot)
}

/// A random PIN of 32 hex characters (128 bits), for development tokens.
pub fn random_pin() -> io::Result<SecretString> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 16]);
    getrandom::fill(bytes.as_mut_slice()).map_err(|e| io::Error::other(e.to_string()))?;
    let mut text = String::with_capacity(32);
    for b in bytes.iter() {
        text.push_str(&format!("{b:02x}"));
    }
    Ok(SecretString::from(text))
}
