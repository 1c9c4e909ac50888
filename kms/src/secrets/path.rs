//! Secrets' paths and the patterns grants name them by.
//!
//! A path is 1 to [`MAX_DEPTH`] segments joined by `/`, each segment of the characters of
//! a key name (`[A-Za-z0-9_.-]`) and never `.` or `..`, at most [`MAX_PATH_LEN`] bytes in
//! all: it goes into store keys, audit records, log lines, reports and URLs as it is. A
//! prefix (what `ListSecrets` lists) is empty or a path followed by `/`. A pattern is a
//! path, a prefix followed by `*`, or `*` alone (every path).

use super::SecretsError;

/// The longest path, in bytes.
pub(crate) const MAX_PATH_LEN: usize = 512;

/// The most segments in a path.
pub(crate) const MAX_DEPTH: usize = 32;

/// The separator of the version in a stored value's key: a character no path holds, so
/// that the values of `a` (`a@...`) never mix with those of `a/b` or `a-b`.
const VERSION_SEPARATOR: char = '@';

/// Checks a path.
pub(crate) fn check(path: &str) -> Result<(), SecretsError> {
    if path.is_empty() {
        return Err(SecretsError::BadPath("a secret's path is empty"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(SecretsError::BadPath(
            "a secret's path is at most 512 bytes",
        ));
    }
    let mut depth = 0;
    for segment in path.split('/') {
        depth += 1;
        if segment.is_empty() {
            return Err(SecretsError::BadPath(
                "a secret's path has no empty segment (no leading, trailing or double `/`)",
            ));
        }
        if segment == "." || segment == ".." {
            return Err(SecretsError::BadPath(
                "a secret's path has no `.` or `..` segment",
            ));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        {
            return Err(SecretsError::BadPath(
                "a secret's path is segments of A-Z a-z 0-9 _ . - separated by `/`",
            ));
        }
    }
    if depth > MAX_DEPTH {
        return Err(SecretsError::BadPath(
            "a secret's path has at most 32 segments",
        ));
    }
    Ok(())
}

/// Checks a prefix to list: empty (the top), or a path with a `/` after it. A prefix
/// without its `/` is taken as the folder it names (`payments` lists `payments/`).
pub(crate) fn prefix(given: &str) -> Result<String, SecretsError> {
    let folder = given.strip_suffix('/').unwrap_or(given);
    if folder.is_empty() {
        return Ok(String::new());
    }
    check(folder)?;
    Ok(format!("{folder}/"))
}

/// [`prefix`] as a check, for a call that names a prefix (`service::Call::secret`).
pub(crate) fn check_prefix(given: &str) -> Result<(), SecretsError> {
    prefix(given).map(drop)
}

/// The prefix a listing of `given` reads (`payments` lists `payments/`); as given when it is
/// not one (the call refuses it, and records a placeholder).
pub(crate) fn listed(given: &str) -> String {
    prefix(given).unwrap_or_else(|_| given.to_owned())
}

/// [`PathPattern::new`] as a check, for a call that names a grant's pattern.
pub(crate) fn check_pattern(given: &str) -> Result<(), SecretsError> {
    PathPattern::new(given).map(drop)
}

/// The check of a call that names no path (the engine's configuration): its record names
/// none.
pub(crate) fn no_path(_: &str) -> Result<(), SecretsError> {
    Ok(())
}

/// The store key of version `version` of `path`: the path, `@`, the version in 20 digits
/// (so that keys sort as versions do).
pub(crate) fn value_key(path: &str, version: u64) -> String {
    format!("{path}{VERSION_SEPARATOR}{version:020}")
}

/// The first and last store keys any version of `path` can have.
pub(crate) fn value_range(path: &str) -> (String, String) {
    (value_key(path, 0), value_key(path, u64::MAX))
}

/// A grant's path pattern: a path, a prefix followed by `*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) struct PathPattern(String);

impl PathPattern {
    /// Checks and makes a pattern.
    pub(crate) fn new(s: &str) -> Result<Self, SecretsError> {
        let bad = |why: &str| {
            SecretsError::BadPattern(format!(
                "{why} (a path, a path followed by `/*` or `*`, or `*` alone)"
            ))
        };
        match s.strip_suffix('*') {
            Some("") => {}
            Some(body) => {
                if body.contains('*') {
                    return Err(bad("only a trailing `*` is special"));
                }
                // `payments/*` or `payments/stripe-*`: what comes before the `*` is a path,
                // or a path and a `/`.
                let head = body.strip_suffix('/').unwrap_or(body);
                check(head).map_err(|e| bad(&e.to_string()))?;
            }
            None => check(s).map_err(|e| bad(&e.to_string()))?,
        }
        Ok(Self(s.to_owned()))
    }

    /// Whether the pattern covers `path` (a path, or a prefix being listed).
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => self.0 == path,
        }
    }

    /// The pattern as written.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PathPattern {
    type Error = SecretsError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<PathPattern> for String {
    fn from(p: PathPattern) -> Self {
        p.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_bounded_segments_of_name_characters() {
        for ok in [
            "a",
            "payments/stripe/api-key",
            "a.b/c_d/E-9",
            &"a/".repeat(31).add("b"),
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/./b",
            "../a",
            "a b",
            "a@1",
            "a*",
            "é",
            "a\u{202e}b",
            "a\nb",
            &"a".repeat(513),
            &"a/".repeat(32).add("b"),
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        // Exactly at the bounds.
        assert!(check(&"a".repeat(512)).is_ok());
    }

    trait Add {
        fn add(self, s: &str) -> String;
    }
    impl Add for String {
        fn add(mut self, s: &str) -> String {
            self.push_str(s);
            self
        }
    }

    #[test]
    fn prefixes_are_folders() {
        assert_eq!(prefix("").unwrap(), "");
        assert_eq!(prefix("/").unwrap(), "");
        assert_eq!(prefix("payments").unwrap(), "payments/");
        assert_eq!(prefix("payments/").unwrap(), "payments/");
        assert!(prefix("payments//").is_err());
        assert!(prefix("a b/").is_err());
    }

    #[test]
    fn value_keys_sort_as_versions_and_stay_apart() {
        assert!(value_key("a", 9) < value_key("a", 10));
        let (from, to) = value_range("a");
        for inside in [value_key("a", 1), value_key("a", u64::MAX)] {
            assert!(from <= inside && inside <= to);
        }
        for outside in [value_key("a-b", 1), value_key("a/b", 1), value_key("ab", 1)] {
            assert!(!(from <= outside && outside <= to), "{outside}");
        }
    }

    #[test]
    fn patterns_match_paths_and_prefixes() {
        let p = PathPattern::new("payments/*").unwrap();
        assert!(p.matches("payments/stripe"));
        assert!(p.matches("payments/"));
        assert!(!p.matches("payments"));
        assert!(!p.matches("paymentsx/a"));
        let e = PathPattern::new("payments/stripe").unwrap();
        assert!(e.matches("payments/stripe") && !e.matches("payments/stripe2"));
        assert!(PathPattern::new("*").unwrap().matches("anything/at/all"));
        assert!(
            PathPattern::new("payments/stripe-*")
                .unwrap()
                .matches("payments/stripe-eu")
        );
        for bad in ["", "a*b*", "/a/*", "a//*", "a b", "**", "a/*/b"] {
            assert!(PathPattern::new(bad).is_err(), "{bad}");
        }
    }
}
