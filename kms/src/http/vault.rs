//! Vault's wire format, both ways: the request parameters (JSON objects whose values Vault
//! reads leniently: `"true"` for `true`, `"256"` for `256`), the response envelope, the
//! error shape, the key type names and the `vault:v<N>:` prefix of ciphertexts,
//! signatures and MACs. Nothing here knows the keyring's engine, only its names.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::keyring::model::{Algorithm, RsaScheme};

/// A request's parameters: its JSON body (an object), with the parameters read so far, so
/// that those no handler read can be named in the answer's warnings, as Vault names them.
pub(crate) struct Params {
    map: Map<String, Value>,
    read: BTreeSet<&'static str>,
}

/// The most unknown parameters named in the warning.
const MAX_UNREAD_NAMED: usize = 16;

/// The longest unknown parameter's name repeated in the warning.
const MAX_UNREAD_NAME: usize = 64;

/// Why a request cannot be served as asked: a 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadRequest(pub String);

impl<T: Into<String>> From<T> for BadRequest {
    fn from(s: T) -> Self {
        Self(s.into())
    }
}

impl Params {
    /// The parameters of a body: empty, or a JSON object.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, BadRequest> {
        let map = if body.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Err("the request body must be a JSON object".into()),
                Err(_) => return Err("failed to parse JSON input".into()),
            }
        };
        Ok(Self {
            map,
            read: BTreeSet::new(),
        })
    }

    /// No parameters.
    pub(crate) fn empty() -> Self {
        Self {
            map: Map::new(),
            read: BTreeSet::new(),
        }
    }

    /// Parameters from one item of a `batch_input`.
    pub(crate) fn item(value: Value) -> Result<Self, BadRequest> {
        match value {
            Value::Object(map) => Ok(Self {
                map,
                read: BTreeSet::new(),
            }),
            _ => Err("every batch_input item must be a JSON object".into()),
        }
    }

    fn get(&mut self, name: &'static str) -> Option<&Value> {
        self.read.insert(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A string parameter (a number is read as its decimal form, as Vault does).
    pub(crate) fn str(&mut self, name: &'static str) -> Result<Option<String>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(format!("{name}: expected a string").into()),
        }
    }

    /// A boolean parameter (`true`, `"true"`, `1`, ... as Vault's parser takes them).
    pub(crate) fn bool(&mut self, name: &'static str) -> Result<Option<bool>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => match s.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Some(true)),
                "0" | "f" | "F" | "false" | "FALSE" | "False" | "" => Ok(Some(false)),
                _ => Err(format!("{name}: expected a boolean").into()),
            },
            Some(Value::Number(n)) => Ok(Some(n.as_u64() != Some(0))),
            Some(_) => Err(format!("{name}: expected a boolean").into()),
        }
    }

    /// A non-negative integer parameter.
    pub(crate) fn u64(&mut self, name: &'static str) -> Result<Option<u64>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{name}: expected a non-negative integer").into()),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}: expected a non-negative integer").into()),
            Some(_) => Err(format!("{name}: expected a non-negative integer").into()),
        }
    }

    /// A key version (`0` or absent: the latest).
    pub(crate) fn version(&mut self, name: &'static str) -> Result<u32, BadRequest> {
        Ok(self
            .u64(name)?
            .map(|v| u32::try_from(v).map_err(|_| format!("{name}: no such version")))
            .transpose()?
            .unwrap_or(0))
    }

    /// A duration in seconds: an integer, or a Go duration of hours, minutes and seconds
    /// (`"24h"`, `"90m"`, `"1h30m"`, `"3600s"`).
    pub(crate) fn seconds(&mut self, name: &'static str) -> Result<Option<u64>, BadRequest> {
        let bad = || {
            BadRequest(format!(
                "{name}: expected seconds or a duration such as \"24h\""
            ))
        };
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(bad),
            Some(Value::String(s)) => parse_duration(s).map(Some).ok_or_else(bad),
            Some(_) => Err(bad()),
        }
    }

    /// Base64 (standard, padded, as Vault's) bytes, kept zeroized.
    pub(crate) fn base64(
        &mut self,
        name: &'static str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => decode_base64(s)
                .map(Some)
                .ok_or_else(|| format!("{name}: not valid base64").into()),
            Some(_) => Err(format!("{name}: expected a base64 string").into()),
        }
    }

    /// A list parameter (`batch_input`), taken out of the parameters.
    pub(crate) fn list(&mut self, name: &'static str) -> Result<Option<Vec<Value>>, BadRequest> {
        self.read.insert(name);
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(format!("{name}: expected a list").into()),
        }
    }

    /// Whether the parameter is given as `null` (a JSON merge patch's "reset").
    pub(crate) fn is_null(&self, name: &str) -> bool {
        matches!(self.map.get(name), Some(Value::Null))
    }

    /// A parameter as sent, taken out of the parameters: `Some(Value::Null)` for an
    /// explicit `null` (which a JSON merge patch reads as "remove").
    pub(crate) fn take(&mut self, name: &'static str) -> Option<Value> {
        self.read.insert(name);
        self.map.remove(name)
    }

    /// Refuses a parameter that asks for what kms does not offer, unless it is absent or
    /// says no (`false`, `0`, `""`): Vault would honour it, so it is never ignored.
    pub(crate) fn refuse(&mut self, name: &'static str, why: &str) -> Result<(), BadRequest> {
        let asked = match self.get(name) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => !matches!(s.as_str(), "" | "false" | "0" | "f" | "F"),
            Some(Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if asked {
            return Err(format!("{name} is not supported: {why}").into());
        }
        Ok(())
    }

    /// Whether the request (or any item of its `batch_input`) gives `hmac`: a
    /// verification of a MAC.
    pub(crate) fn names_mac(&self) -> bool {
        self.map.contains_key("hmac")
            || self
                .map
                .get("batch_input")
                .and_then(Value::as_array)
                .is_some_and(|items| {
                    items
                        .iter()
                        .any(|i| i.as_object().is_some_and(|o| o.contains_key("hmac")))
                })
    }

    /// The warning Vault gives for parameters the endpoint does not know, if any: at most
    /// [`MAX_UNREAD_NAMED`] names, each at most [`MAX_UNREAD_NAME`] bytes (a longer one as
    /// `<name, N bytes>`), then `and N more`.
    pub(crate) fn unread(&self) -> Option<String> {
        // A `null` is no value (hvac sends `"plaintext": null` beside `batch_input`), and
        // `name` is the path's own parameter, which Vault accepts in the body too (hvac's
        // verify sends it).
        let unread: Vec<&str> = self
            .map
            .iter()
            .filter(|(k, v)| {
                !v.is_null() && k.as_str() != "name" && !self.read.contains(k.as_str())
            })
            .map(|(k, _)| k.as_str())
            .collect();
        if unread.is_empty() {
            return None;
        }
        let mut named: Vec<String> = unread
            .iter()
            .take(MAX_UNREAD_NAMED)
            .map(|k| {
                if k.len() > MAX_UNREAD_NAME {
                    format!("<name, {} bytes>", k.len())
                } else {
                    (*k).to_owned()
                }
            })
            .collect();
        if unread.len() > MAX_UNREAD_NAMED {
            named.push(format!("and {} more", unread.len() - MAX_UNREAD_NAMED));
        }
        Some(format!(
            "Endpoint ignored these unrecognized parameters: [{}]",
            named.join(" ")
        ))
    }
}

/// A Go-style duration of hours, minutes and seconds, in seconds.
pub(crate) fn parse_duration(s: &str) -> Option<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
    }
    digits.is_empty().then_some(total)
}

/// Seconds as Go prints a `time.Duration` (what Vault answers for `delete_version_after`):
/// `0s`, `59s`, `1m0s`, `1h0m0s`, `3h25m19s`.
pub(crate) fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Unix milliseconds as RFC 3339 in UTC, as Vault prints its times: with the milliseconds
/// (`2026-12-07T03:22:26.123Z`) when `millis`, else to the second.
pub(crate) fn rfc3339(ms: u64, millis: bool) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let fraction = if millis {
        format!(".{:03}", ms % 1000)
    } else {
        String::new()
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Standard base64, padded (Vault's `base64.StdEncoding`); whitespace is not allowed.
pub(crate) fn decode_base64(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    data_encoding::BASE64
        .decode(s.as_bytes())
        .ok()
        .map(Zeroizing::new)
}

/// Standard base64, padded.
pub(crate) fn base64(bytes: &[u8]) -> String {
    data_encoding::BASE64.encode(bytes)
}

/// `vault:v<version>:<base64 of bytes>`: what Vault's ciphertexts, signatures and MACs
/// look like. `url`: base64url without padding (JWS marshaling).
pub(crate) fn prefixed(version: u32, bytes: &[u8], url: bool) -> String {
    let body = if url {
        data_encoding::BASE64URL_NOPAD.encode(bytes)
    } else {
        base64(bytes)
    };
    format!("vault:v{version}:{body}")
}

/// The version and the bytes of a `vault:v<N>:...` value (`url`: base64url, with or
/// without padding). `what` names it in the error.
pub(crate) fn unprefix(
    value: &str,
    what: &str,
    url: bool,
) -> Result<(u32, Zeroizing<Vec<u8>>), BadRequest> {
    let bad = || {
        BadRequest(format!(
            "invalid {what}: expected vault:v<version>:<base64>"
        ))
    };
    let rest = value.strip_prefix("vault:v").ok_or_else(bad)?;
    let (version, body) = rest.split_once(':').ok_or_else(bad)?;
    if version.is_empty() || version.len() > 10 || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let version: u32 = version.parse().map_err(|_| bad())?;
    if version == 0 {
        return Err(bad());
    }
    let bytes = if url {
        data_encoding::BASE64URL_NOPAD
            .decode(body.trim_end_matches('=').as_bytes())
            .ok()
    } else {
        data_encoding::BASE64.decode(body.as_bytes()).ok()
    }
    .ok_or_else(bad)?;
    Ok((version, Zeroizing::new(bytes)))
}

/// A Transit ciphertext's bytes: the `vault:v<N>:` prefix must name the version that our
/// ciphertext (docs/formats.md) carries in its header, so that the two never disagree.
pub(crate) fn ciphertext(value: &str) -> Result<Vec<u8>, BadRequest> {
    let (version, bytes) = unprefix(value, "ciphertext", false)?;
    match crate::keyring::ciphertext::parse(&bytes) {
        Ok(p) if p.version == version => Ok(bytes.to_vec()),
        Ok(_) => Err(
            "invalid ciphertext: the vault:v<N> prefix does not match the key version inside it"
                .into(),
        ),
        Err(_) => Err("invalid ciphertext: not a kms ciphertext".into()),
    }
}

/// The kms algorithm of a Vault key type, for keys created through the front, or why it
/// is refused. `rsa-*` keys sign with PKCS#1 v1.5 (what X.509 CAs such as SPIRE's, and
/// JWT's RS256, use); a kms key's algorithm is fixed at creation.
pub(crate) fn algorithm_of(key_type: &str) -> Result<Algorithm, BadRequest> {
    Ok(match key_type {
        "aes256-gcm96" => Algorithm::Aes256Gcm,
        "ecdsa-p256" => Algorithm::EcdsaP256Sha256,
        "ecdsa-p384" => Algorithm::EcdsaP384Sha384,
        "ed25519" => Algorithm::Ed25519,
        "rsa-2048" => Algorithm::RsaSignPkcs12048Sha256,
        "rsa-3072" => Algorithm::RsaSignPkcs13072Sha256,
        "rsa-4096" => Algorithm::RsaSignPkcs14096Sha256,
        "hmac" => Algorithm::HmacSha256,
        "aes128-gcm96" | "chacha20-poly1305" | "ecdsa-p521" | "aes128-cmac" | "aes192-cmac"
        | "aes256-cmac" | "managed_key" | "ml-dsa" | "slh-dsa" | "hybrid" => {
            return Err(format!(
                "key type {key_type} is not offered by kms: use aes256-gcm96, ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096 or hmac"
            )
            .into());
        }
        // The caller's text, echoed only when it could be a type name.
        _ if key_type.len() <= 32
            && key_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) =>
        {
            return Err(format!("unknown key type {key_type}").into());
        }
        _ => return Err("unknown key type".into()),
    })
}

/// The Vault key type of a kms algorithm (RSA keys of every scheme are `rsa-<bits>`).
pub(crate) fn type_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Aes256Gcm => "aes256-gcm96",
        Algorithm::EcdsaP256Sha256 => "ecdsa-p256",
        Algorithm::EcdsaP384Sha384 => "ecdsa-p384",
        Algorithm::Ed25519 => "ed25519",
        Algorithm::HmacSha256 => "hmac",
        other => match other.rsa() {
            Some((_, 2048)) => "rsa-2048",
            Some((_, 3072)) => "rsa-3072",
            _ => "rsa-4096",
        },
    }
}

/// The name Vault gives a version of an asymmetric key in its read answer.
pub(crate) fn version_key_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::EcdsaP256Sha256 => "P-256",
        Algorithm::EcdsaP384Sha384 => "P-384",
        Algorithm::Ed25519 => "ed25519",
        other => type_name(other),
    }
}

/// The signing scheme of an RSA signing key.
pub(crate) fn rsa_scheme(algorithm: Algorithm) -> Option<RsaScheme> {
    algorithm.rsa().map(|(s, _)| s)
}

/// The one hash a key signs with (Vault's `hash_algorithm` name); Ed25519 none.
pub(crate) fn hash_of(algorithm: Algorithm) -> Option<&'static str> {
    match algorithm {
        Algorithm::Ed25519 => None,
        Algorithm::EcdsaP384Sha384 => Some("sha2-384"),
        _ => Some("sha2-256"),
    }
}

/// The answer envelope of every successful call with a body, as Vault writes it.
pub(crate) fn envelope(
    request_id: &str,
    data: Option<&Value>,
    auth: Option<&Value>,
    warnings: &[String],
    mount_type: &str,
) -> Vec<u8> {
    leased_envelope(request_id, data, auth, warnings, mount_type, None)
}

/// [`envelope`] with the lease of the secret `data` hands out (a database login's).
pub(crate) fn leased_envelope(
    request_id: &str,
    data: Option<&Value>,
    auth: Option<&Value>,
    warnings: &[String],
    mount_type: &str,
    lease: Option<&super::call::LeaseInfo>,
) -> Vec<u8> {
    let body = serde_json::json!({
        "request_id": request_id,
        "lease_id": lease.map_or("", |l| l.id.as_str()),
        "renewable": lease.is_some_and(|l| l.renewable),
        "lease_duration": lease.map_or(0, |l| l.duration),
        "data": data,
        "wrap_info": null,
        "warnings": if warnings.is_empty() { Value::Null } else { serde_json::json!(warnings) },
        "auth": auth,
        "mount_type": mount_type,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Vault's error shape: `{"errors": [...]}`.
pub(crate) fn errors(messages: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "errors": messages })).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The warning on unknown parameters is bounded: 16 names at most, each at most 64
    /// bytes (a longer one by its size), then how many more.
    #[test]
    fn the_warning_on_unknown_parameters_is_bounded() {
        let mut body = serde_json::Map::new();
        for i in 0..100 {
            body.insert(format!("p{i:03}"), Value::Bool(true));
        }
        body.insert("a".repeat(1000), Value::Bool(true));
        let p = Params::parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        let w = p.unread().unwrap();
        assert!(w.len() < 16 * 70 + 100, "{} bytes", w.len());
        assert!(w.contains("<name, 1000 bytes>"), "{w}");
        assert!(w.contains("and 85 more"), "{w}");
        assert!(!w.contains(&"a".repeat(65)), "{w}");
        let few = Params::parse(br#"{"x": 1, "y": 2}"#).unwrap();
        assert_eq!(
            few.unread().unwrap(),
            "Endpoint ignored these unrecognized parameters: [x y]"
        );
        // What hvac sends beside what it means: a `null` (`"plaintext": null` beside
        // `batch_input`) and the path's `name` are no unknown parameters.
        let hvac = Params::parse(br#"{"plaintext": null, "name": "k", "z": 0}"#).unwrap();
        assert_eq!(
            hvac.unread().unwrap(),
            "Endpoint ignored these unrecognized parameters: [z]"
        );
    }

    #[test]
    fn parameters_are_read_as_vault_reads_them() {
        let mut p = Params::parse(
            br#"{"bits": "256", "prehashed": "true", "exportable": false, "n": 3, "period": "1h30m", "x": 1}"#,
        )
        .unwrap();
        assert_eq!(p.u64("bits").unwrap(), Some(256));
        assert_eq!(p.bool("prehashed").unwrap(), Some(true));
        assert!(p.refuse("exportable", "no").is_ok());
        assert_eq!(p.u64("n").unwrap(), Some(3));
        assert_eq!(p.seconds("period").unwrap(), Some(5400));
        assert_eq!(
            p.unread().unwrap(),
            "Endpoint ignored these unrecognized parameters: [x]"
        );
        let mut p =
            Params::parse(br#"{"derived": true, "convergent_encryption": "true"}"#).unwrap();
        assert!(p.refuse("derived", "derived keys are not offered").is_err());
        assert!(p.refuse("convergent_encryption", "no").is_err());
        assert!(Params::parse(b"[1]").is_err());
        assert!(Params::parse(b"{").is_err());
        assert!(Params::parse(b"").is_ok());
        assert!(
            Params::parse(br#"{"bits": -1}"#)
                .unwrap()
                .u64("bits")
                .is_err()
        );
        assert!(
            Params::parse(br#"{"p": "1x"}"#)
                .unwrap()
                .seconds("p")
                .is_err()
        );
    }

    #[test]
    fn times_and_durations_print_as_vaults() {
        assert_eq!(rfc3339(0, false), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000, false), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000, false), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_613_746_123, true), "2026-12-07T03:22:26.123Z");
        assert_eq!(rfc3339(1_796_613_746_007, true), "2026-12-07T03:22:26.007Z");
        assert_eq!(rfc3339(1_796_613_746_999, false), "2026-12-07T03:22:26Z");
        for (secs, go) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m0s"),
            (3600, "1h0m0s"),
            (12_319, "3h25m19s"),
            (86_400, "24h0m0s"),
        ] {
            assert_eq!(go_duration(secs), go);
            assert_eq!(parse_duration(go), Some(secs), "{go}");
        }
    }

    #[test]
    fn the_vault_prefix_round_trips_and_is_checked() {
        let s = prefixed(7, b"\xff\x00abc", false);
        assert_eq!(s, "vault:v7:/wBhYmM=");
        assert_eq!(unprefix(&s, "x", false).unwrap().0, 7);
        assert_eq!(&*unprefix(&s, "x", false).unwrap().1, b"\xff\x00abc");
        let u = prefixed(2, b"\xff\xfe", true);
        assert_eq!(u, "vault:v2:__4");
        assert_eq!(&*unprefix(&u, "x", true).unwrap().1, b"\xff\xfe");
        for bad in [
            "vault:v0:AA==",
            "vault:v:AA==",
            "vault:1:AA==",
            "vault:v1",
            "v1:AA==",
            "vault:v1:***",
            "vault:v99999999999:AA==",
        ] {
            assert!(unprefix(bad, "x", false).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ciphertext_prefix_must_name_the_version_inside() {
        let ct = crate::keyring::ciphertext::assemble(3, &[1; 12], &[2; 20]);
        assert_eq!(ciphertext(&prefixed(3, &ct, false)).unwrap(), ct);
        assert!(ciphertext(&prefixed(4, &ct, false)).is_err());
        assert!(ciphertext(&prefixed(3, b"short", false)).is_err());
    }

    #[test]
    fn key_types_map_both_ways() {
        for t in [
            "aes256-gcm96",
            "ecdsa-p256",
            "ecdsa-p384",
            "ed25519",
            "rsa-2048",
            "rsa-3072",
            "rsa-4096",
            "hmac",
        ] {
            assert_eq!(type_name(algorithm_of(t).unwrap()), t);
        }
        assert_eq!(type_name(Algorithm::RsaSignPss3072Sha256), "rsa-3072");
        assert_eq!(type_name(Algorithm::RsaDecryptOaep4096Sha256), "rsa-4096");
        assert!(
            algorithm_of("chacha20-poly1305")
                .unwrap_err()
                .0
                .contains("not offered")
        );
        assert!(algorithm_of("aes128-gcm96").is_err());
        assert!(algorithm_of("nope").unwrap_err().0.ends_with("nope"));
        assert_eq!(
            algorithm_of(&"x".repeat(100)).unwrap_err().0,
            "unknown key type"
        );
    }

    #[test]
    fn the_envelope_and_errors_are_vaults() {
        let body: Value = serde_json::from_slice(&envelope(
            "id",
            Some(&serde_json::json!({"a": 1})),
            None,
            &[],
            "transit",
        ))
        .unwrap();
        assert_eq!(body["data"]["a"], 1);
        assert_eq!(body["request_id"], "id");
        assert_eq!(body["lease_id"], "");
        assert_eq!(body["renewable"], false);
        assert!(
            body["warnings"].is_null() && body["auth"].is_null() && body["wrap_info"].is_null()
        );
        assert_eq!(
            errors(&["permission denied"]),
            br#"{"errors":["permission denied"]}"#
        );
        assert_eq!(errors(&[]), br#"{"errors":[]}"#);
    }
}
