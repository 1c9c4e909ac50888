//! `[kubernetes_kms]`: the Kubernetes KMS v2 plugin's socket, off unless `socket` is given
//! (docs/kubernetes.md).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::section::{ConfigError, resolve};

/// The longest path a unix socket can have (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How much longer than its directory the socket's staging name is (`/.kms-` and a pid of
/// up to 7 digits).
pub(crate) const STAGING_EXTRA: usize = 13;

/// The `[kubernetes_kms]` table, as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct KubernetesConfig {
    /// The unix socket kube-apiserver's `EncryptionConfiguration` names as its `endpoint`
    /// (`unix:///run/kms/kubernetes.sock`); off when absent.
    pub socket: Option<PathBuf>,
    /// The keyring key the plugin encrypts with (an AES-256-GCM key; its callers need the
    /// `encrypt` and `decrypt` grants on it).
    pub key: Option<String>,
    /// A group (name or number) whose members may connect: the socket is then 0660 and
    /// that group's, else 0600 and the server's user's alone.
    pub group: Option<String>,
}

/// `[kubernetes_kms]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// The socket's path.
    pub socket: PathBuf,
    /// The key's name.
    pub key: String,
    /// The group given access to the socket, if any.
    pub group: Option<u32>,
}

impl KubernetesConfig {
    /// The checked settings, or `None` when the plugin is off. Relative paths are resolved
    /// against `base`; a group name is looked up in `/etc/group`.
    pub(crate) fn validate(self, base: &Path) -> Result<Option<KubernetesSettings>, ConfigError> {
        self.validate_with(base, Path::new("/etc/group"))
    }

    fn validate_with(
        self,
        base: &Path,
        groups: &Path,
    ) -> Result<Option<KubernetesSettings>, ConfigError> {
        let Some(socket) = self.socket else {
            return match (self.key, self.group) {
                (None, None) => Ok(None),
                _ => Err(ConfigError::BadKubernetes(
                    "socket: missing (key and group mean nothing without it)".to_owned(),
                )),
            };
        };
        let socket = resolve(base, socket);
        let dir_len = socket.parent().map_or(0, |d| d.as_os_str().len());
        if socket.as_os_str().len() > MAX_SOCKET_PATH || dir_len + STAGING_EXTRA > MAX_SOCKET_PATH {
            return Err(ConfigError::BadKubernetes(format!(
                "socket: a unix socket's path has at most {MAX_SOCKET_PATH} bytes (and its directory at most {})",
                MAX_SOCKET_PATH - STAGING_EXTRA
            )));
        }
        if socket.file_name().is_none() {
            return Err(ConfigError::BadKubernetes(
                "socket: not a file's path".to_owned(),
            ));
        }
        let key = self.key.ok_or_else(|| {
            ConfigError::BadKubernetes(
                "key: missing (the keyring key the plugin encrypts with)".to_owned(),
            )
        })?;
        if crate::keyring::model::check_name(&key).is_err() {
            return Err(ConfigError::BadKubernetes(
                "key: not a key name (1 to 128 of A-Z a-z 0-9 _ . -)".to_owned(),
            ));
        }
        let group = self.group.map(|g| group_id(&g, groups)).transpose()?;
        Ok(Some(KubernetesSettings { socket, key, group }))
    }
}

/// A group's number: `g` itself if it is one, else its entry in `groups` (`/etc/group`).
fn group_id(g: &str, groups: &Path) -> Result<u32, ConfigError> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string(groups).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == g).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            ConfigError::BadKubernetes(format!(
                "group: {g:?} is not in {} (give its number instead)",
                groups.display()
            ))
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table(text: &str) -> KubernetesConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn off_unless_a_socket_is_given() {
        let base = Path::new("/etc/kms");
        assert_eq!(table("").validate(base).unwrap(), None);
        let err = table("key = \"k\"").validate(base).unwrap_err();
        assert!(err.to_string().contains("socket: missing"), "{err}");
    }

    #[test]
    fn paths_keys_and_groups_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let groups = dir.path().join("group");
        std::fs::write(&groups, "root:x:0:\nkube:x:998:alice\n").unwrap();
        let base = Path::new("/etc/kms");
        let ok = table("socket = \"k.sock\"\nkey = \"k8s-secrets\"\ngroup = \"kube\"")
            .validate_with(base, &groups)
            .unwrap()
            .unwrap();
        assert_eq!(ok.socket, Path::new("/etc/kms/k.sock"));
        assert_eq!(ok.key, "k8s-secrets");
        assert_eq!(ok.group, Some(998));
        let numeric = table("socket = \"/run/k.sock\"\nkey = \"k\"\ngroup = \"65534\"")
            .validate_with(base, &groups)
            .unwrap()
            .unwrap();
        assert_eq!(numeric.group, Some(65534));
        for (text, why) in [
            ("socket = \"/run/k.sock\"", "key: missing"),
            (
                "socket = \"/run/k.sock\"\nkey = \"a b\"",
                "key: not a key name",
            ),
            (
                "socket = \"/run/k.sock\"\nkey = \"k\"\ngroup = \"nobody-here\"",
                "not in",
            ),
            (
                &format!("socket = \"/{}\"\nkey = \"k\"", "s".repeat(107)),
                "at most 107 bytes",
            ),
            (
                &format!("socket = \"/{}/k.sock\"\nkey = \"k\"", "d".repeat(94)),
                "its directory at most 94",
            ),
        ] {
            let err = table(text).validate_with(base, &groups).unwrap_err();
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
    }
}
