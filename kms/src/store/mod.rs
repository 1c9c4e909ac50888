//! Persistent state, behind one narrow trait.
//!
//! [`Store`] is a durable key-value map in named tables, with two backends:
//! [`RedbStore`] (one file, the default: one server, nothing to install) and [`PgStore`]
//! (PostgreSQL: several servers share one keyring). Every write returns only after the data
//! is durable (redb: fsync before return; PostgreSQL: a synchronous commit), so whatever the
//! server acknowledged survives `kill -9` and power loss. Records are encoded by their owners
//! (see `crate::seal::SealRecord`) and carry a schema version; the store knows only bytes.

use std::path::PathBuf;

mod config;
mod embedded;
mod feed;
mod log;
mod postgres;

pub(crate) use config::StorageConfig;
pub use config::StorageSettings;
pub use embedded::{DEFAULT_CACHE_BYTES, RedbStore};
pub use feed::ChangeFeed;
pub(crate) use feed::MAX_HINTS;
pub use postgres::{PgSettings, PgStore, SecretSource};

/// One table of the store: a name, and whether servers sharing a store follow its changes.
/// Declared by its owner as a `const` (the seal's [`SYSTEM`] here; the keyring's, the audit
/// log's, each engine's in its own module); `crate::engines::tables` lists them all (the
/// backup, PostgreSQL's table creation and the change hints use that list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Table {
    name: &'static str,
    follow: Follow,
    log: bool,
}

/// Whether servers sharing a store follow a table's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Follow {
    /// Every committed write is announced to the other servers (PostgreSQL `NOTIFY`), and
    /// they read the entry again (keys, grants, the seal record).
    Changes,
    /// Never announced: servers read it when they need it (the audit log, counters).
    Never,
}

/// The longest table name.
pub const MAX_TABLE_NAME: usize = 40;

impl Table {
    /// A table named `name`, which must be `[a-z_]{1,40}`: checked when the `const` that
    /// declares it is evaluated, so a bad name fails the build (declare tables only in
    /// `const` items).
    pub const fn new(name: &'static str, follow: Follow) -> Self {
        assert!(valid_name(name), "a table name is 1 to 40 of [a-z_]");
        Self {
            name,
            follow,
            log: false,
        }
    }

    /// An append-only table named `name` (the audit log): written only by
    /// [`Store::append_with`] in increasing key order, and removed only from its start.
    /// The embedded store keeps such a table's appends in an append-only file (one write
    /// and one `fdatasync` per append instead of a B-tree transaction); every reader sees
    /// one table, in key order, as for any other. Never followed by other servers.
    pub const fn log(name: &'static str) -> Self {
        assert!(valid_name(name), "a table name is 1 to 40 of [a-z_]");
        Self {
            name,
            follow: Follow::Never,
            log: true,
        }
    }

    /// The table's name (redb's table, PostgreSQL's `kms_` + name, a backup's section).
    pub fn name(self) -> &'static str {
        self.name
    }

    /// Whether servers sharing a store follow its changes.
    pub fn followed(self) -> bool {
        matches!(self.follow, Follow::Changes)
    }

    /// Whether it is an append-only table ([`Table::log`]).
    pub fn is_log(self) -> bool {
        self.log
    }
}

/// Whether `name` is `[a-z_]{1,40}`.
const fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_TABLE_NAME {
        return false;
    }
    let mut rest = b;
    while let [c, tail @ ..] = rest {
        if !(c.is_ascii_lowercase() || *c == b'_') {
            return false;
        }
        rest = tail;
    }
    true
}

/// The seal's table: the seal record (the wrapped root key, the share set) and the
/// restore marker. Declared with the store, beneath every module that names it (the seal,
/// the backup, the engines' list), as the one table every store has.
pub const SYSTEM: Table = Table::new("system", Follow::Changes);

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file can be read or written by its group or by everyone.
    #[error(
        "the store {path} is readable or writable by others (mode {mode:o}): make it private with `chmod 600`"
    )]
    TooOpen {
        /// The store's path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The store's directory can be written by everyone: anyone could move the store
    /// aside and put another (an older copy: a rollback) in its place.
    #[error(
        "the directory {path} of the store is writable by everyone (mode {mode:03o}): anyone could swap the store for another; `chmod o-w {path}` (or keep the store in a directory of its own, 0700)"
    )]
    DirTooOpen {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another process holds the store open.
    #[error("the store {0} is in use by another kms process")]
    InUse(PathBuf),
    /// The store could not be opened or created.
    #[error("cannot open the store {path}")]
    Open {
        /// The store's path.
        path: PathBuf,
        /// What redb said.
        #[source]
        source: redb::Error,
    },
    /// PostgreSQL could not be reached or did not answer in time (down, unreachable,
    /// overloaded), or failed a statement for another reason than refusing kms's role
    /// ([`StoreError::DatabaseRefused`]).
    #[error("the database is unavailable: {op} failed")]
    Database {
        /// What we were doing.
        op: &'static str,
        /// What the client or the pool said (never a value or a password).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// PostgreSQL answered and refused kms's role: its password, its connection, a
    /// privilege, or the database the URL names. The database is up; trying again does
    /// not help until the configuration or the database's grants change.
    #[error("{op} failed: {refusal}")]
    DatabaseRefused {
        /// What we were doing.
        op: &'static str,
        /// What was refused, and what to do.
        refusal: DatabaseRefusal,
        /// What PostgreSQL said (never a password: the server does not echo one).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database's schema is newer than this binary: an older kms must not write to it.
    #[error(
        "the database's schema is version {found}, newer than this kms understands ({supported}): run the newer kms"
    )]
    SchemaTooNew {
        /// The version found.
        found: i32,
        /// The newest this binary knows.
        supported: i32,
    },
    /// The `[storage]` settings cannot be used (URL, password source, CA file).
    #[error("storage: {0}")]
    Settings(String),
    /// The audit log's append-only files (docs/audit.md) are damaged in a way a crash does
    /// not explain, missing, or another store's: kms cuts, skips and continues nothing.
    #[error(
        "the audit log's file {path} cannot be used (at byte {offset}): {what}. Nothing was cut or skipped: see docs/audit.md, \"The embedded store's append-only files\""
    )]
    LogDamaged {
        /// The file or directory.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A read or write failed.
    #[error("store {op} failed")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// What redb said.
        #[source]
        source: redb::Error,
    },
}

/// Why PostgreSQL refused kms's role, by the SQLSTATE it answered, each with what to do
/// (docs/setup.md shows the set-up these point to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatabaseRefusal {
    /// `28P01`: the password is wrong, or the role does not exist (with password
    /// authentication PostgreSQL does not say which).
    #[error(
        "the database refused the role's password (authentication failed): check the user in [storage] url and the password that password_file or password_env gives"
    )]
    Authentication,
    /// `28000`: no `pg_hba.conf` line lets this role connect to this database from this
    /// address (or over this transport), or the role may not log in.
    #[error(
        "the database does not let this role connect (no pg_hba.conf line for this role, database and address, or a hostssl line and no TLS, or a role without LOGIN): add a scram-sha-256 line to pg_hba.conf and reload PostgreSQL"
    )]
    NotAllowed,
    /// `42501`: the role lacks a privilege kms needs (on PostgreSQL 15 and later, only the
    /// database's owner may create tables in schema `public`).
    #[error(
        "permission denied to the role in [storage] url: make it the owner of the database (ALTER DATABASE kms OWNER TO kms) and of any kms_* table another role made, or, in that database, GRANT USAGE, CREATE ON SCHEMA public TO it (since PostgreSQL 15 only the database's owner may create tables in public)"
    )]
    PermissionDenied,
    /// `3D000`: the database the URL names does not exist.
    #[error(
        "the database named in [storage] url does not exist: create it (CREATE DATABASE kms OWNER kms) or correct the url"
    )]
    NoDatabase,
}

/// What another server (or this one) changed in a shared store, as its followers hear it:
/// a hint of what to read again, never data (anyone who can connect to a database can
/// announce a change).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    /// An entry of a table may have been written.
    Entry(Table, String),
    /// Changes may have been missed (the feed was interrupted): reload everything.
    Resync,
}

/// Holds a shared store's change lock (see [`Store::lock_changes`]); released on drop.
pub struct ChangeLock(#[allow(dead_code)] Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for ChangeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeLock")
    }
}

/// What [`Store::append_with`] calls with the table's last entry (key, value), under the
/// lock: the writes to commit after it.
pub type AppendBuild<'a> =
    dyn FnMut(Option<(String, Vec<u8>)>) -> Result<Vec<Write>, StoreError> + 'a;

/// What [`Store::snapshot`] calls with each entry: its table, key and value.
pub type EachEntry<'a> = dyn FnMut(Table, &str, &[u8]) -> Result<(), StoreError> + 'a;

/// A stored count (a nonce counter's reservation): 8 bytes big-endian; anything else reads
/// as exhausted (refuse, never reuse).
pub(crate) fn count_of(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap_or([0xff; 8]))
}

/// One value to write, in [`Store::write_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Which of the store's tables.
    pub table: Table,
    /// The entry's key in that table.
    pub key: String,
    /// The bytes to store there (replacing any old value).
    pub value: Vec<u8>,
}

/// Entries to remove, in [`Store::write_all_removing`]: every key from `from` to `to`,
/// both included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Which of the store's tables.
    pub table: Table,
    /// The first key removed.
    pub from: String,
    /// The last key removed.
    pub to: String,
}

/// A durable key-value store in named tables.
pub trait Store: Send + Sync + 'static {
    /// Reads one value.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes one value unless the key exists; returns whether it wrote. Durable on `Ok`.
    fn insert_new(&self, table: Table, key: &str, value: &[u8]) -> Result<bool, StoreError>;
    /// Writes (or overwrites) one value. Durable on `Ok`.
    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Every entry of a table, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Writes many values, in any tables, in one durable transaction: all or none. Durable
    /// on `Ok`. (An audit record and the key change it records commit together.)
    fn write_all(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.write_all_removing(writes, &[])
    }
    /// As [`Store::write_all`], and removes the `removals` ranges in the same transaction
    /// (archived audit records go with the record of their archiving).
    fn write_all_removing(&self, writes: &[Write], removals: &[Removal]) -> Result<(), StoreError>;
    /// Appends to `table` (the audit log) in one transaction: under a lock that serialises
    /// appenders on every server sharing the store, reads the table's last entry, lets
    /// `build` make the writes that follow it, and commits them with `removals`. Two servers
    /// thus extend one audit chain and never fork it. An error from `build` writes nothing.
    fn append_with(
        &self,
        table: Table,
        build: &mut AppendBuild<'_>,
        removals: &[Removal],
    ) -> Result<(), StoreError>;
    /// Reserves up to `want` more of the counter at `key` (an 8-byte big-endian count, 0 when
    /// absent; unreadable counts as exhausted), never past `max`: returns the range
    /// `[start, end)` now this caller's, durably, and atomically with every server sharing
    /// the store (two servers never get the same range). `end == start` when exhausted.
    fn reserve(
        &self,
        table: Table,
        key: &str,
        want: u64,
        max: u64,
    ) -> Result<(u64, u64), StoreError>;
    /// Takes the lock that serialises changes to the keyring (keys, versions, grants,
    /// reservations) across every server sharing the store, until the guard is dropped;
    /// `None` when this process is the store's only writer (its own mutex suffices).
    fn lock_changes(&self) -> Result<Option<ChangeLock>, StoreError> {
        Ok(None)
    }
    /// Calls `each` with every entry of every table of `tables` (in that order, keys in
    /// order), all read from one consistent snapshot while the store stays online (a
    /// backup). Stops at the first error `each` returns.
    fn snapshot(&self, tables: &[Table], each: &mut EachEntry<'_>) -> Result<(), StoreError>;
    /// Where this store lives, as something its data cannot change: the redb file's
    /// canonical path; the PostgreSQL cluster's system identifier and the database's name.
    /// A seal record found at another location than the one it names is a copy (see
    /// `seal::record`).
    fn location(&self) -> Result<String, StoreError>;
    /// Whether other servers may write this store too (then the keyring follows
    /// [`Store::changes`], and reloads what it meets and does not know).
    fn shared(&self) -> bool {
        false
    }
    /// The feed of changes to the keys, grants and seal record committed by any server
    /// sharing the store (bounded and coalesced: see [`ChangeFeed`]); `None` for a store
    /// only this process writes. Taken once.
    fn changes(&self) -> Option<ChangeFeed> {
        None
    }
    /// The entry with the greatest key, if any.
    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError>;
    /// Up to `limit` entries with keys `>= start`, in key order (paging through big tables).
    fn range(
        &self,
        table: Table,
        start: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_bounded_lowercase_words() {
        for good in [
            "system",
            "audit_checkpoints",
            "a",
            &"x".repeat(MAX_TABLE_NAME),
        ] {
            assert!(valid_name(good), "{good:?}");
        }
        let long = "x".repeat(MAX_TABLE_NAME + 1);
        for bad in [
            "",
            "Keys",
            "kv2",
            "kv-data",
            "a b",
            "kms;drop",
            long.as_str(),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
