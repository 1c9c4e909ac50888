//! What the databases engine stores (connections, roles, leases), and the rules on what an
//! administrator may define: names and statements end up in logins, audit records and
//! reports; templates end up in SQL.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::DatabasesError;
use crate::barrier::Purpose;
use crate::policy::Pattern;

macro_rules! purpose {
    ($name:ident, $text:literal) => {
        #[allow(
            clippy::panic,
            reason = "evaluated when the const is: a bad name fails the build"
        )]
        pub(crate) const $name: Purpose = match Purpose::new($text) {
            Some(p) => p,
            None => panic!("a purpose is [a-z0-9_/-]{{1,64}}"),
        };
    };
}

purpose!(CONNECTION, "databases/connection");
purpose!(ROLE, "databases/role");
purpose!(LEASE, "databases/lease");

/// The schema of every record of the engine.
pub(crate) const SCHEMA: u32 = 1;

/// The only database kind today.
pub(crate) const POSTGRESQL: &str = "postgresql";

/// A lease's duration when neither the request nor the role says: 1 hour (Vault's).
pub(crate) const DEFAULT_TTL: u64 = 3600;
/// The longest a role allows when it does not say: 24 hours.
pub(crate) const DEFAULT_MAX_TTL: u64 = 86_400;
/// The longest any role may allow: 30 days.
pub(crate) const MAX_TTL_LIMIT: u64 = 30 * 86_400;
/// Connections kept open to a database unless its connection says.
pub(crate) const DEFAULT_OPEN_CONNECTIONS: u32 = 4;
/// The most connections kept open to one database.
pub(crate) const MAX_OPEN_CONNECTIONS: u32 = 64;
/// A password's length unless the role says, and the bounds of what it may say.
pub(crate) const DEFAULT_PASSWORD_LENGTH: u32 = 32;
const PASSWORD_LENGTHS: std::ops::RangeInclusive<u32> = 20..=100;
/// A password's characters: any PostgreSQL accepts in a quoted literal, none that needs
/// escaping in SQL, a URL or a shell.
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-";
/// PostgreSQL's longest identifier (NAMEDATALEN - 1).
pub(crate) const MAX_USERNAME: usize = 63;
/// A login name's template unless the role says.
pub(crate) const DEFAULT_USERNAME_TEMPLATE: &str = "kms_{{role}}_{{caller}}_{{random}}";
/// The characters of `{{random}}` in a login's name, and how many.
const RANDOM_NAME_LEN: usize = 16;
/// The most characters of the role's and the caller's name a login's name takes.
pub(crate) const NAME_PART_LEN: usize = 16;
/// The most statements of one kind, and the longest statement.
const MAX_STATEMENTS: usize = 64;
const MAX_STATEMENT: usize = 16 * 1024;
/// The most bytes of statements of one kind in all (a lease keeps its role's revocation
/// and renewal statements).
const MAX_STATEMENTS_BYTES: usize = 64 * 1024;
/// The longest connection URL, root login name and CA bundle.
const MAX_URL: usize = 2048;
const MAX_ROOT_NAME: usize = 63;
const MAX_CA_PEM: usize = 64 * 1024;
/// The most principals a role names, and allowed roles a connection names.
const MAX_LIST: usize = 64;

/// The default revocation: no new sessions, the root login made a member of the login
/// (a root login that is not a superuser, only `CREATEROLE`, as Vault advises, may end
/// another role's sessions and take what it owns only as its member: without it the
/// revocation is refused, and the lease ends irrevocable), the open sessions ended and
/// waited for (up to 5 s each, PostgreSQL 14's form: a session still exiting drops its
/// temporary tables while they are reassigned, and the reassignment fails), what
/// the login owns handed to the root login (a login that created a table is still
/// dropped: vault #1857), its privileges dropped, then the login. Each statement is its
/// own step so that a login already gone is no error.
pub(crate) const DEFAULT_REVOCATION: &[&str] = &[
    "DO $$ BEGIN IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{{name}}') THEN ALTER ROLE \"{{name}}\" NOLOGIN; BEGIN GRANT \"{{name}}\" TO CURRENT_USER; EXCEPTION WHEN insufficient_privilege THEN NULL; END; END IF; END $$;",
    "SELECT pg_catalog.pg_terminate_backend(pid, 5000) FROM pg_catalog.pg_stat_activity WHERE usename = '{{name}}' AND pid <> pg_catalog.pg_backend_pid();",
    "DO $$ BEGIN IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{{name}}') THEN REASSIGN OWNED BY \"{{name}}\" TO CURRENT_USER; DROP OWNED BY \"{{name}}\"; END IF; END $$;",
    "DROP ROLE IF EXISTS \"{{name}}\";",
];

/// The default renewal: the login's validity follows its lease.
pub(crate) const DEFAULT_RENEW: &[&str] =
    &["ALTER ROLE \"{{name}}\" VALID UNTIL '{{expiration}}';"];

/// A secret string kept in a record (a root password): zeroized on drop, never shown.
#[derive(Clone, Default)]
pub(crate) struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps `s`.
    pub(crate) fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret's text.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

/// A database kms makes logins on, and the root credentials it makes them with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Connection {
    pub schema: u32,
    pub name: String,
    pub plugin: String,
    /// With `{{username}}` and `{{password}}`.
    pub url: String,
    pub username: String,
    pub password: Secret,
    /// A new root password set in the database by a rotation that did not finish: tried
    /// when `password` is refused, so that a rotation cut short never locks kms out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_password: Option<Secret>,
    pub allowed_roles: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_pem: String,
    pub max_open: u32,
    #[serde(default)]
    pub root_rotated: u64,
    pub created_ms: u64,
    pub created_by: String,
}

/// How logins of one kind are made, renewed and dropped, for how long, and who may ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Role {
    pub schema: u32,
    pub name: String,
    pub connection: String,
    pub creation: Vec<String>,
    pub revocation: Vec<String>,
    pub renew: Vec<String>,
    pub default_ttl: u64,
    pub max_ttl: u64,
    pub username_template: String,
    pub password_length: u32,
    pub principals: Vec<Pattern>,
    pub created_ms: u64,
    pub created_by: String,
}

/// A login made for a caller, until when, and how to drop it (the statements it was made
/// with: a role changed or removed since still leaves it revocable).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Lease {
    pub schema: u32,
    pub id: String,
    pub role: String,
    pub connection: String,
    pub username: String,
    pub principal: String,
    pub issued: u64,
    pub expires: u64,
    pub max_expires: u64,
    #[serde(default)]
    pub renewed: u64,
    /// The lease's own duration (a renewal without an increment extends it by this).
    pub ttl: u64,
    pub revocation: Vec<String>,
    pub renew: Vec<String>,
    /// When it is due for revocation (its entry in the due table): its expiry, or the
    /// next attempt after a failure.
    pub due: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(default)]
    pub irrevocable: bool,
}

/// Whether `name` is a connection's or a role's name: 1 to 64 of `[A-Za-z0-9_-]`.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), DatabasesError> {
    if (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(DatabasesError::BadRequest(format!(
            "a {what} name is 1 to 64 of [A-Za-z0-9_-]"
        )))
    }
}

/// The prefix of every lease id.
pub(crate) const LEASE_PREFIX: &str = "database/creds/";

/// A new lease id for `role`: `database/creds/ROLE/` and 24 random characters.
pub(crate) fn lease_id(role: &str) -> Result<String, DatabasesError> {
    Ok(format!(
        "{LEASE_PREFIX}{role}/{}",
        random_text(
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            24
        )?
        .as_str()
    ))
}

/// Whether `id` is shaped as a lease id (before it is looked up): bounded, printable.
pub(crate) fn check_lease_id(id: &str) -> Result<(), DatabasesError> {
    let Some(rest) = id.strip_prefix(LEASE_PREFIX) else {
        return Err(DatabasesError::BadRequest(
            "a lease id starts with database/creds/".to_owned(),
        ));
    };
    match rest.split_once('/') {
        Some((role, random))
            if check_name("role", role).is_ok()
                && (1..=64).contains(&random.len())
                && random.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            Ok(())
        }
        _ => Err(DatabasesError::BadRequest(
            "a lease id is database/creds/ROLE/ID".to_owned(),
        )),
    }
}

/// `n` characters of `alphabet`, uniformly (rejection sampling).
pub(crate) fn random_text(alphabet: &[u8], n: usize) -> Result<Zeroizing<String>, DatabasesError> {
    let len = alphabet.len();
    if len == 0 || len > 256 {
        return Err(DatabasesError::Internal("alphabet"));
    }
    // The largest multiple of `len` that fits a byte: bytes from it on are drawn again.
    let limit = 256 - (256 % len);
    let mut out = Zeroizing::new(String::with_capacity(n));
    let mut pool = Zeroizing::new([0u8; 64]);
    while out.len() < n {
        getrandom::fill(pool.as_mut_slice()).map_err(|_| DatabasesError::Randomness)?;
        for &b in pool.iter() {
            if out.len() == n {
                break;
            }
            if usize::from(b) < limit
                && let Some(&c) = alphabet.get(usize::from(b) % len)
            {
                out.push(char::from(c));
            }
        }
    }
    Ok(out)
}

/// A new password of `length` characters with at least one upper-case letter, one
/// lower-case letter and one digit (policies that ask for classes are met).
pub(crate) fn new_password(length: u32) -> Result<Zeroizing<String>, DatabasesError> {
    let n = usize::try_from(length).map_err(|_| DatabasesError::Internal("length"))?;
    loop {
        let p = random_text(PASSWORD_ALPHABET, n)?;
        let has = |f: fn(&u8) -> bool| p.as_bytes().iter().any(f);
        if has(u8::is_ascii_uppercase) && has(u8::is_ascii_lowercase) && has(u8::is_ascii_digit) {
            return Ok(p);
        }
    }
}

/// Lower-cases `s` and keeps `[a-z0-9_]` (others become `_`), at most `max` characters: a
/// caller's or role's name as part of a login's name.
pub(crate) fn name_part(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// The placeholders of a username template, and the most characters each becomes.
const NAME_PLACEHOLDERS: &[(&str, usize)] = &[
    ("{{role}}", NAME_PART_LEN),
    ("{{caller}}", NAME_PART_LEN),
    ("{{random}}", RANDOM_NAME_LEN),
    ("{{unix_time}}", 10),
];

/// Checks a username template: its placeholders, `{{random}}` among them, its literal
/// characters `[a-z0-9_-]`, and at most [`MAX_USERNAME`] characters once made.
pub(crate) fn check_username_template(t: &str) -> Result<(), DatabasesError> {
    let bad = |why: &str| DatabasesError::BadRequest(format!("username_template: {why}"));
    if !t.contains("{{random}}") {
        return Err(bad(
            "it must hold {{random}}, so that two logins never share a name",
        ));
    }
    let mut rest = t;
    let mut longest = 0usize;
    'outer: while !rest.is_empty() {
        for (p, n) in NAME_PLACEHOLDERS {
            if let Some(after) = rest.strip_prefix(p) {
                longest += n;
                rest = after;
                continue 'outer;
            }
        }
        let mut chars = rest.chars();
        match chars.next() {
            Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' => {
                longest += 1;
                rest = chars.as_str();
            }
            _ => {
                return Err(bad(
                    "only {{role}}, {{caller}}, {{random}}, {{unix_time}} and [a-z0-9_-]",
                ));
            }
        }
    }
    if longest > MAX_USERNAME {
        return Err(bad(&format!(
            "it can make names of {longest} characters; PostgreSQL's limit is {MAX_USERNAME}"
        )));
    }
    if !t.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        return Err(bad("a login's name starts with [a-z_]"));
    }
    Ok(())
}

/// A login's name from a checked template: the role's and the caller's names reduced to
/// `[a-z0-9_]` (the caller's: the last segment of its principal), 16 random characters.
pub(crate) fn username(
    template: &str,
    role: &str,
    principal: &str,
    now: u64,
) -> Result<String, DatabasesError> {
    let caller = principal.rsplit(['/', ':']).next().unwrap_or(principal);
    let random = random_text(b"abcdefghijklmnopqrstuvwxyz0123456789", RANDOM_NAME_LEN)?;
    let name = template
        .replace("{{role}}", &name_part(role, NAME_PART_LEN))
        .replace("{{caller}}", &name_part(caller, NAME_PART_LEN))
        .replace("{{unix_time}}", &now.to_string())
        .replace("{{random}}", &random);
    if name.len() > MAX_USERNAME || name.contains("{{") {
        return Err(DatabasesError::Internal("username template"));
    }
    Ok(name)
}

/// The `{{expiration}}` of a statement: `YYYY-MM-DD HH:MM:SS+00`, as PostgreSQL reads it.
pub(crate) fn expiration(unix: u64) -> String {
    let t = i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `statement` with the login's `name`, `password` and `expiration` in place of their
/// placeholders (`{{username}}` is Vault's other name for `{{name}}`). The values are
/// kms's own (a name of `[a-z0-9_-]`, a password of [`PASSWORD_ALPHABET`], a date), so no
/// quoting is needed and none can end a literal or an identifier.
pub(crate) fn render(
    statement: &str,
    name: &str,
    password: &str,
    expiration: &str,
) -> Zeroizing<String> {
    Zeroizing::new(
        statement
            .replace("{{name}}", name)
            .replace("{{username}}", name)
            .replace("{{password}}", password)
            .replace("{{expiration}}", expiration),
    )
}

/// `given` (or, when there are none, `default`) with the login's `name` and `expiration`
/// in place: what revokes or renews a login (no password in either).
pub(crate) fn rendered(
    given: &[String],
    default: &[&str],
    name: &str,
    expiration: &str,
) -> Vec<Zeroizing<String>> {
    if given.is_empty() {
        default
            .iter()
            .map(|s| render(s, name, "", expiration))
            .collect()
    } else {
        given
            .iter()
            .map(|s| render(s, name, "", expiration))
            .collect()
    }
}

/// Checks statements an administrator gave: bounded in count and size, no NUL.
pub(crate) fn check_statements(what: &str, list: &[String]) -> Result<(), DatabasesError> {
    if list.len() > MAX_STATEMENTS {
        return Err(DatabasesError::BadRequest(format!(
            "{what}: at most {MAX_STATEMENTS} statements"
        )));
    }
    for s in list {
        if s.trim().is_empty() || s.len() > MAX_STATEMENT || s.contains('\0') {
            return Err(DatabasesError::BadRequest(format!(
                "{what}: each statement is 1 to {MAX_STATEMENT} bytes, without NUL"
            )));
        }
    }
    // Every lease keeps its revocation and renewal statements: bounded in all.
    if list.iter().map(String::len).sum::<usize>() > MAX_STATEMENTS_BYTES {
        return Err(DatabasesError::BadRequest(format!(
            "{what}: at most {MAX_STATEMENTS_BYTES} bytes in all"
        )));
    }
    Ok(())
}

/// Principal patterns an administrator gave (a role's or a static role's `principals`).
pub(crate) fn principals(list: &[String]) -> Result<Vec<Pattern>, DatabasesError> {
    list.iter()
        .map(|s| {
            Pattern::new(s).map_err(|e| DatabasesError::BadRequest(format!("principals: {e}")))
        })
        .collect()
}

/// Whether a connection's `allowed_roles` lets `role` use it: a name, a prefix followed
/// by `*`, or `*` (every role).
pub(crate) fn role_allowed(allowed: &[String], role: &str) -> bool {
    allowed.iter().any(|a| match a.strip_suffix('*') {
        Some(prefix) => role.starts_with(prefix),
        None => a == role,
    })
}

impl Connection {
    /// Checks what an administrator gave (not the connection itself).
    pub(crate) fn check(&self) -> Result<(), DatabasesError> {
        let bad = |why: String| Err(DatabasesError::BadRequest(why));
        check_name("connection", &self.name)?;
        if self.plugin != POSTGRESQL {
            return bad(format!("plugin: only \"{POSTGRESQL}\" is supported"));
        }
        if self.url.len() > MAX_URL || self.url.chars().any(char::is_control) {
            return bad(format!(
                "connection_url: at most {MAX_URL} printable characters"
            ));
        }
        if !(self.url.starts_with("postgresql://") || self.url.starts_with("postgres://")) {
            return bad(
                "connection_url: postgresql://{{username}}:{{password}}@host:port/database"
                    .to_owned(),
            );
        }
        if !self.url.contains("{{username}}") || !self.url.contains("{{password}}") {
            return bad("connection_url must hold {{username}} and {{password}}, where kms puts the root credentials (never a password of its own)".to_owned());
        }
        if self.username.is_empty()
            || self.username.len() > MAX_ROOT_NAME
            || self.username.chars().any(char::is_control)
        {
            return bad(format!(
                "username: 1 to {MAX_ROOT_NAME} printable characters"
            ));
        }
        if self.password.is_empty() || self.password.expose().len() > 1024 {
            return bad("password: 1 to 1024 bytes (required for a new connection)".to_owned());
        }
        if self.allowed_roles.len() > MAX_LIST
            || self
                .allowed_roles
                .iter()
                .any(|r| r != "*" && check_name("role", r.strip_suffix('*').unwrap_or(r)).is_err())
        {
            return bad(format!(
                "allowed_roles: at most {MAX_LIST} role names, prefixes followed by *, or *"
            ));
        }
        if self.ca_pem.len() > MAX_CA_PEM {
            return bad(format!("ca_pem: at most {MAX_CA_PEM} bytes"));
        }
        if !(1..=MAX_OPEN_CONNECTIONS).contains(&self.max_open) {
            return bad(format!("max_open_connections: 1 to {MAX_OPEN_CONNECTIONS}"));
        }
        Ok(())
    }
}

impl Role {
    /// Checks what an administrator gave.
    pub(crate) fn check(&self) -> Result<(), DatabasesError> {
        let bad = |why: String| Err(DatabasesError::BadRequest(why));
        check_name("role", &self.name)?;
        check_name("connection", &self.connection)?;
        if self.creation.is_empty() {
            return bad("creation_statements: at least one (CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';)".to_owned());
        }
        check_statements("creation_statements", &self.creation)?;
        check_statements("revocation_statements", &self.revocation)?;
        check_statements("renew_statements", &self.renew)?;
        if !self
            .creation
            .iter()
            .any(|s| s.contains("{{name}}") || s.contains("{{username}}"))
        {
            return bad("creation_statements must name the login ({{name}})".to_owned());
        }
        if self.max_ttl == 0 || self.max_ttl > MAX_TTL_LIMIT {
            return bad(format!("max_ttl_seconds: 1 to {MAX_TTL_LIMIT}"));
        }
        if self.default_ttl == 0 || self.default_ttl > self.max_ttl {
            return bad("default_ttl_seconds: 1 to max_ttl_seconds".to_owned());
        }
        check_username_template(&self.username_template)?;
        if !PASSWORD_LENGTHS.contains(&self.password_length) {
            return bad(format!(
                "password_length: {} to {}",
                PASSWORD_LENGTHS.start(),
                PASSWORD_LENGTHS.end()
            ));
        }
        if self.principals.len() > MAX_LIST {
            return bad(format!("principals: at most {MAX_LIST}"));
        }
        Ok(())
    }
}

/// Encodes a record as JSON (in zeroizing memory: a connection holds a password).
pub(crate) fn encode<T: Serialize>(record: &T) -> Result<Zeroizing<Vec<u8>>, DatabasesError> {
    serde_json::to_vec(record)
        .map(Zeroizing::new)
        .map_err(|_| DatabasesError::Internal("encode a record"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_checked_and_names_are_bounded_and_safe() {
        check_username_template(DEFAULT_USERNAME_TEMPLATE).unwrap();
        for bad in [
            "kms_{{role}}",
            "kms_{{random}}_\"",
            "kms_{{random}}_{{name}}",
            "Kms_{{random}}",
            "1kms_{{random}}",
            "{{random}}_{{role}}_{{caller}}_{{unix_time}}_{{role}}_{{caller}}",
        ] {
            assert!(check_username_template(bad).is_err(), "{bad}");
        }
        let name = username(
            DEFAULT_USERNAME_TEMPLATE,
            "Read-Only\"; DROP",
            "spiffe://corp/ns/prod/sa/Web App'--",
            1,
        )
        .unwrap();
        assert!(name.len() <= MAX_USERNAME);
        assert!(
            name.starts_with("kms_read_only___drop_web_app___"),
            "{name}"
        );
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        );
        assert_ne!(
            name,
            username(DEFAULT_USERNAME_TEMPLATE, "Read-Only\"; DROP", "x", 1).unwrap()
        );
    }

    #[test]
    fn passwords_have_every_class_and_only_safe_characters() {
        for _ in 0..200 {
            let p = new_password(20).unwrap();
            assert_eq!(p.len(), 20);
            assert!(p.bytes().any(|b| b.is_ascii_uppercase()));
            assert!(p.bytes().any(|b| b.is_ascii_lowercase()));
            assert!(p.bytes().any(|b| b.is_ascii_digit()));
            assert!(p.bytes().all(|b| PASSWORD_ALPHABET.contains(&b)));
        }
        assert_ne!(*new_password(32).unwrap(), *new_password(32).unwrap());
    }

    #[test]
    fn statements_get_their_values_and_expirations_read_as_utc() {
        let s = render(
            "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT x TO \"{{username}}\";",
            "kms_a",
            "Pw1",
            &expiration(86_400 + 3661),
        );
        assert_eq!(
            s.as_str(),
            "CREATE ROLE \"kms_a\" LOGIN PASSWORD 'Pw1' VALID UNTIL '1970-01-02 01:01:01+00'; GRANT x TO \"kms_a\";"
        );
    }

    #[test]
    fn lease_ids_are_checked_before_they_are_looked_up() {
        let id = lease_id("readonly").unwrap();
        check_lease_id(&id).unwrap();
        assert!(id.starts_with("database/creds/readonly/"));
        for bad in [
            "",
            "database/creds/",
            "database/creds/readonly",
            "database/creds/readonly/",
            "database/creds/read only/abc",
            "database/creds/readonly/ab/c",
            "sys/leases/x/y",
        ] {
            assert!(check_lease_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowed_roles_are_names_prefixes_or_all() {
        let allowed = ["app-*".to_owned(), "report".to_owned()];
        assert!(role_allowed(&allowed, "app-read"));
        assert!(role_allowed(&allowed, "report"));
        assert!(!role_allowed(&allowed, "reports"));
        assert!(!role_allowed(&[], "report"));
        assert!(role_allowed(&["*".to_owned()], "anything"));
    }

    #[test]
    fn a_secret_never_shows() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?}"), "<redacted>");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"hunter2\"");
    }
}
