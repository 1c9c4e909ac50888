//! `[http]`: the Vault-compatible HTTPS front (docs/vault-transit.md), off unless `listen`
//! is given. It serves with the `[tls]` certificate and client CA bundle, the `[roles]`,
//! the grants and the `[limits]` of the gRPC listener: nothing here widens access.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::section::ConfigError;

/// The `[http]` table, as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    /// Where the HTTPS front listens, e.g. `127.0.0.1:8201`; off when absent.
    pub listen: Option<String>,
    /// How long a `client_token` from `auth/cert/login` lives, in seconds (default 300,
    /// 10 to 3600).
    pub token_ttl_seconds: Option<u64>,
    /// Where the keys that `POST transit/keys/:name` creates live: `"hsm"` (default:
    /// generated in the token) or `"software"` (beneath the root key).
    pub key_protection: Option<String>,
    /// The front's URL as clients reach it (`https://kms.example.com:8201`), which the
    /// credentials engine's issuers publish their keys under and name in their tokens'
    /// `iss`; by default `https://` and the listen address.
    pub public_url: Option<String>,
}

/// `[http]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// The listen address.
    pub listen: SocketAddr,
    /// The life of a session token.
    pub token_ttl: Duration,
    /// The protection of keys created through the front.
    pub key_protection: crate::keyring::model::Protection,
    /// The front's URL as clients reach it (no trailing `/`), if set.
    pub public_url: Option<String>,
}

/// Whether `u` is `https://HOST[:PORT][/PATH]` as tokens may name it: a lowercase host
/// name or an IP address (IPv6 in brackets), a port of 1 to 65535, path segments of
/// `[A-Za-z0-9._-]` other than `.` and `..`; no user, query or fragment.
fn public_url_ok(u: &str) -> bool {
    let Some(rest) = u.strip_prefix("https://") else {
        return false;
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let (host_ok, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
        };
        (addr.parse::<std::net::Ipv6Addr>().is_ok(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        (ok, port)
    };
    let port_ok = port.is_none_or(|p| !p.starts_with('0') && p.parse::<u16>().is_ok_and(|n| n > 0));
    let path_ok = path.is_none_or(|p| {
        p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
    });
    host_ok && port_ok && path_ok
}

/// The default life of a session token.
const DEFAULT_TOKEN_TTL: u64 = 300;

impl HttpConfig {
    /// The settings, `None` when the front is off. `tls` says whether `[tls]` gave files.
    pub(crate) fn validate(&self, tls: bool) -> Result<Option<HttpSettings>, ConfigError> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        let listen = listen
            .parse()
            .map_err(|_| ConfigError::BadHttpListen(listen.clone()))?;
        if !tls {
            return Err(ConfigError::HttpNeedsTls);
        }
        let ttl = self.token_ttl_seconds.unwrap_or(DEFAULT_TOKEN_TTL);
        if !(10..=3600).contains(&ttl) {
            return Err(ConfigError::BadHttp("token_ttl_seconds: 10 to 3600"));
        }
        use crate::keyring::model::Protection;
        let key_protection = match self.key_protection.as_deref() {
            None | Some("hsm") => Protection::Hsm,
            Some("software") => Protection::Software,
            Some(_) => {
                return Err(ConfigError::BadHttp(
                    "key_protection: \"hsm\" or \"software\"",
                ));
            }
        };
        let public_url = match &self.public_url {
            None => None,
            Some(u) => {
                let u = u.trim_end_matches('/');
                let ok = u.len() <= 256 && public_url_ok(u);
                if !ok {
                    return Err(ConfigError::BadHttp(
                        "public_url: https:// and a host (and port and path), at most 256 bytes, without query or fragment",
                    ));
                }
                Some(u.to_owned())
            }
        };
        Ok(Some(HttpSettings {
            listen,
            token_ttl: Duration::from_secs(ttl),
            key_protection,
            public_url,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(text: &str) -> HttpConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn public_url_is_an_https_url_without_query_or_fragment() {
        let with = |u: &str| {
            config(&format!(
                "listen = \"127.0.0.1:8201\"\npublic_url = \"{u}\"\n"
            ))
            .validate(true)
        };
        let ok = with("https://kms.example.com:8201/").unwrap().unwrap();
        assert_eq!(
            ok.public_url.as_deref(),
            Some("https://kms.example.com:8201")
        );
        assert!(with("https://[::1]:8201/kms").is_ok());
        for bad in [
            "http://kms.example.com",
            "https://",
            "https://a b",
            "https://a?x=1",
            "https://a#f",
            "kms.example.com",
            "https:///x",
            "https://a/../b",
            "https://a//b",
            "https://:8201",
            "https://a:b:c",
            "https://a:0",
            "https://a:65536",
            "https://KMS.example",
            "https://user@a",
            "https://[::1",
            "https://[nope]:1",
        ] {
            assert!(with(bad).is_err(), "{bad}");
        }
        let default = config("listen = \"127.0.0.1:8201\"\n")
            .validate(true)
            .unwrap()
            .unwrap();
        assert_eq!(default.public_url, None);
    }

    #[test]
    fn off_unless_listen_is_given() {
        assert_eq!(config("").validate(true).unwrap(), None);
        let s = config("listen = \"127.0.0.1:8201\"")
            .validate(true)
            .unwrap()
            .unwrap();
        assert_eq!(s.listen.port(), 8201);
        assert_eq!(s.token_ttl, Duration::from_secs(300));
        assert_eq!(s.key_protection, crate::keyring::model::Protection::Hsm);
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        assert!(matches!(
            config("listen = \"127.0.0.1:8201\"").validate(false),
            Err(ConfigError::HttpNeedsTls)
        ));
        assert!(matches!(
            config("listen = \"nope\"").validate(true),
            Err(ConfigError::BadHttpListen(_))
        ));
        assert!(matches!(
            config("listen = \"127.0.0.1:1\"\ntoken_ttl_seconds = 5").validate(true),
            Err(ConfigError::BadHttp(_))
        ));
        assert!(matches!(
            config("listen = \"127.0.0.1:1\"\nkey_protection = \"cloud\"").validate(true),
            Err(ConfigError::BadHttp(_))
        ));
        assert!(toml::from_str::<HttpConfig>("listen = \"x\"\nport = 1").is_err());
    }
}
