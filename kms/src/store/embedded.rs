//! The embedded store: one redb file (the default backend: one server, nothing to install).

use super::{Removal, Store, StoreError, Table, Write};
use std::path::Path;

fn definition(table: Table) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    redb::TableDefinition::new(table.name())
}

/// The page cache when the configuration names none: 64 MiB (redb's own default is 1 GiB,
/// which a server under load filled with audit pages it never reads again).
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
    /// `redb:` and the file's canonical path ([`Store::location`]).
    location: String,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

/// `table` in a read transaction; `None` when it was never written (so it is empty).
fn open_read(
    txn: &redb::ReadTransaction,
    table: Table,
    op: &'static str,
) -> Result<Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>, StoreError> {
    match txn.open_table(definition(table)) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(io(op)(e.into())),
    }
}

fn io(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

/// The random identity of the store at `path`, in the file `PATH.id` beside it (made, 0600,
/// when missing): part of [`Store::location`], so that a copy at the same path on another
/// host (a restore drill with the same configuration) is known for one. It is never in a
/// backup, and the seal record holds only a hash of the location: whoever writes a copy's
/// store cannot make it production's.
fn identity(path: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut id_path = path.as_os_str().to_owned();
    id_path.push(".id");
    let id_path = std::path::PathBuf::from(id_path);
    let valid = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match std::fs::read_to_string(&id_path) {
        Ok(text) if valid(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a store identity", id_path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| std::io::Error::other("the random source failed"))?;
    let id = data_encoding::HEXLOWER.encode(&bytes);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&id_path)?;
    file.write_all(id.as_bytes())?;
    file.sync_all()?;
    Ok(id)
}

impl RedbStore {
    /// Opens the store at `path`, creating it (and its directory, mode 0700) if missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// As [`RedbStore::open`], with a page cache of at most `cache_bytes` (`[storage]
    /// cache_mib`). The cache holds what is read again (the keyring's records, grants); the
    /// audit log is only appended, so a cache sized for it buys nothing but memory.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError::Open {
                    path: path.to_owned(),
                    source: redb::Error::Io(e),
                })?;
        }
        // Created private (0600) whatever the umask, and refused if someone opened it up:
        // it holds wrapped keys and the audit log.
        let open_err = |e: std::io::Error| StoreError::Open {
            path: path.to_owned(),
            source: redb::Error::Io(e),
        };
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(open_err)?;
            let mode = file.metadata().map_err(open_err)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(StoreError::TooOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.to_owned()),
                other => StoreError::Open {
                    path: path.to_owned(),
                    source: other.into(),
                },
            })?;
        let location = format!(
            "redb:{}:{}",
            std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_owned())
                .display(),
            identity(path).map_err(open_err)?
        );
        Ok(Self { db, location })
    }

    /// One durable transaction of `writes` and `removals`; with `append`, the writes are
    /// what its build makes after `table`'s last entry, read in the same transaction (redb
    /// has one writer: nothing can come between).
    fn commit(
        &self,
        op: &'static str,
        append: Option<(Table, &mut super::AppendBuild<'_>)>,
        writes: &[Write],
        removals: &[Removal],
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| io(op)(e.into()))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| io(op)(redb::Error::from(e)))?;
        let built = match append {
            Some((table, build)) => {
                use redb::ReadableTable;
                let t = txn
                    .open_table(definition(table))
                    .map_err(|e| io(op)(e.into()))?;
                let last = t
                    .last()
                    .map_err(|e| io(op)(e.into()))?
                    .map(|(k, v)| (k.value().to_owned(), v.value().to_vec()));
                drop(t);
                build(last)?
            }
            None => Vec::new(),
        };
        for w in writes.iter().chain(&built) {
            let mut t = txn
                .open_table(definition(w.table))
                .map_err(|e| io(op)(e.into()))?;
            t.insert(w.key.as_str(), w.value.as_slice())
                .map_err(|e| io(op)(e.into()))?;
        }
        for r in removals {
            let mut t = txn
                .open_table(definition(r.table))
                .map_err(|e| io(op)(e.into()))?;
            t.retain_in::<&str, _>(r.from.as_str()..=r.to.as_str(), |_, _| false)
                .map_err(|e| io(op)(e.into()))?;
        }
        txn.commit().map_err(|e| io(op)(e.into()))
    }

    fn write(
        &self,
        op: &'static str,
        table: Table,
        f: impl FnOnce(&mut redb::Table<'_, &'static str, &'static [u8]>) -> Result<bool, redb::Error>,
    ) -> Result<bool, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| io(op)(e.into()))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| io(op)(redb::Error::from(e)))?;
        let wrote = {
            let mut t = txn
                .open_table(definition(table))
                .map_err(|e| io(op)(e.into()))?;
            f(&mut t).map_err(io(op))?
        };
        txn.commit().map_err(|e| io(op)(e.into()))?;
        Ok(wrote)
    }
}

impl Store for RedbStore {
    fn location(&self) -> Result<String, StoreError> {
        Ok(self.location.clone())
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        use redb::ReadableDatabase;
        let op = "read";
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        let Some(t) = open_read(&txn, table, op)? else {
            return Ok(None);
        };
        let value = t.get(key).map_err(|e| io(op)(e.into()))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let op = "scan";
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        let Some(t) = open_read(&txn, table, op)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| io(op)(e.into()))? {
            let (k, v) = item.map_err(|e| io(op)(e.into()))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn insert_new(&self, table: Table, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        self.write("insert", table, |t| {
            if redb::ReadableTable::get(t, key)?.is_some() {
                return Ok(false);
            }
            t.insert(key, value)?;
            Ok(true)
        })
    }

    fn write_all_removing(&self, writes: &[Write], removals: &[Removal]) -> Result<(), StoreError> {
        self.commit("batch write", None, writes, removals)
            .map(|_| ())
    }

    fn reserve(
        &self,
        table: Table,
        key: &str,
        want: u64,
        max: u64,
    ) -> Result<(u64, u64), StoreError> {
        let mut range = (0, 0);
        self.write("reserve", table, |t| {
            let start = redb::ReadableTable::get(t, key)?.map_or(0, |v| super::count_of(v.value()));
            let end = start.saturating_add(want).min(max).max(start);
            t.insert(key, end.to_be_bytes().as_slice())?;
            range = (start, end);
            Ok(true)
        })?;
        Ok(range)
    }

    fn snapshot(
        &self,
        tables: &[Table],
        each: &mut super::EachEntry<'_>,
    ) -> Result<(), StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let op = "snapshot";
        // One read transaction: every table as of one commit.
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        for &table in tables {
            let Some(t) = open_read(&txn, table, op)? else {
                continue;
            };
            for item in t.iter().map_err(|e| io(op)(e.into()))? {
                let (k, v) = item.map_err(|e| io(op)(e.into()))?;
                each(table, k.value(), v.value())?;
            }
        }
        Ok(())
    }

    fn append_with(
        &self,
        table: Table,
        build: &mut super::AppendBuild<'_>,
        removals: &[Removal],
    ) -> Result<(), StoreError> {
        self.commit("append", Some((table, build)), &[], removals)
    }

    fn range(
        &self,
        table: Table,
        start: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use redb::ReadableDatabase;
        let op = "range";
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        let Some(t) = open_read(&txn, table, op)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in t.range(start..).map_err(|e| io(op)(e.into()))?.take(limit) {
            let (k, v) = item.map_err(|e| io(op)(e.into()))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let op = "read last";
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        let Some(t) = open_read(&txn, table, op)? else {
            return Ok(None);
        };
        Ok(t.last()
            .map_err(|e| io(op)(e.into()))?
            .map(|(k, v)| (k.value().to_owned(), v.value().to_vec())))
    }

    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write("write", table, |t| {
            t.insert(key, value)?;
            Ok(true)
        })
        .map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{Follow, SYSTEM};

    const KEYS: Table = Table::new("keys", Follow::Changes);
    const AUDIT: Table = Table::new("audit", Follow::Never);

    #[test]
    fn a_small_page_cache_still_serves_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.redb");
        let store = RedbStore::open_with_cache(&path, 1024 * 1024).unwrap();
        let value = vec![7u8; 4096];
        for i in 0..1000 {
            store.put(AUDIT, &format!("{i:06}"), &value).unwrap();
        }
        drop(store);
        // 4 MB of values through a 1 MiB cache, then read back after reopening.
        let store = RedbStore::open_with_cache(&path, 1024 * 1024).unwrap();
        for i in [0, 499, 999] {
            assert_eq!(
                store.get(AUDIT, &format!("{i:06}")).unwrap().as_deref(),
                Some(value.as_slice())
            );
        }
        assert_eq!(store.scan(AUDIT).unwrap().len(), 1000);
    }

    #[test]
    fn round_trip_and_insert_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kms.redb");
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get(SYSTEM, "a").unwrap(), None);
        assert!(store.insert_new(SYSTEM, "a", b"1").unwrap());
        assert!(!store.insert_new(SYSTEM, "a", b"2").unwrap());
        assert_eq!(store.get(SYSTEM, "a").unwrap().as_deref(), Some(&b"1"[..]));
        store.put(SYSTEM, "a", b"3").unwrap();
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get(SYSTEM, "a").unwrap().as_deref(), Some(&b"3"[..]));
        // scan is in key order; write_all is one transaction; last is the greatest key.
        assert!(store.scan(KEYS).unwrap().is_empty());
        assert_eq!(store.last(AUDIT).unwrap(), None);
        let w = |table, k: &str, v: &[u8]| Write {
            table,
            key: k.into(),
            value: v.to_vec(),
        };
        store
            .write_all(&[w(AUDIT, "2", b"b"), w(AUDIT, "1", b"a"), w(KEYS, "k", b"v")])
            .unwrap();
        assert_eq!(store.get(KEYS, "k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(
            store.range(AUDIT, "2", 10).unwrap(),
            vec![("2".to_owned(), b"b".to_vec())]
        );
        assert_eq!(store.range(AUDIT, "0", 1).unwrap().len(), 1);
        assert_eq!(
            store.scan(AUDIT).unwrap(),
            vec![
                ("1".to_owned(), b"a".to_vec()),
                ("2".to_owned(), b"b".to_vec())
            ]
        );
        assert_eq!(
            store.last(AUDIT).unwrap(),
            Some(("2".to_owned(), b"b".to_vec()))
        );
    }

    #[test]
    fn the_store_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        drop(RedbStore::open(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for open in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open)).unwrap();
            let err = RedbStore::open(&path).unwrap_err();
            assert!(
                matches!(err, StoreError::TooOpen { mode, .. } if mode == open),
                "{err:?}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn a_second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let _first = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::InUse(_)), "{err:?}");
    }
}
