//! The embedded store: one redb file (the default backend: one server, nothing to install).

use super::log::FileLog;
use super::{Removal, Store, StoreError, Table, Write};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where each log table's files stop: the key of its last removed entry, committed with the
/// removal (store-private: never in a backup, never in PostgreSQL).
const LOG_FLOORS: Table = Table::new("log_floors", super::Follow::Never);

fn definition(table: Table) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    redb::TableDefinition::new(table.name())
}

/// The page cache when the configuration names none: 64 MiB (redb's own default is 1 GiB,
/// which a server under load filled with audit pages it never reads again).
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
    /// The redb file.
    path: PathBuf,
    /// `redb:` and the file's canonical path ([`Store::location`]).
    location: String,
    /// The log tables' files ([`Table::log`]), opened at their first use.
    logs: Mutex<BTreeMap<&'static str, Arc<FileLog>>>,
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
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir_err = |e| StoreError::Open {
            path: path.to_owned(),
            source: redb::Error::Io(e),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
        // A directory everyone can write lets anyone swap the store (the file, the log
        // beside it, the instance id) for another, sticky bit or not (it only stops them
        // once the files exist). Its group may write it: that is the server's group.
        let dir_mode = std::fs::metadata(dir).map_err(dir_err)?.mode() & 0o7777;
        if dir_mode & 0o002 != 0 {
            return Err(StoreError::DirTooOpen {
                path: dir.to_owned(),
                mode: dir_mode,
            });
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
        Ok(Self {
            db,
            path: path.to_owned(),
            location,
            logs: Mutex::new(BTreeMap::new()),
        })
    }

    /// The files of `table` when it is a log table (opened, and a torn tail cut, at the
    /// first use): in the directory `STORE.TABLE` beside the redb file.
    fn log(&self, table: Table) -> Result<Option<Arc<FileLog>>, StoreError> {
        if !table.is_log() {
            return Ok(None);
        }
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = logs.get(table.name()) {
            return Ok(Some(Arc::clone(log)));
        }
        let floor = self
            .redb_get(LOG_FLOORS, table.name())?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let dir = log_dir(&self.path, table);
        let token = self.redb_get(LOG_FLOORS, &owner_key(table))?;
        if token.is_some() && !dir.exists() {
            return Err(StoreError::LogDamaged {
                path: dir,
                offset: 0,
                what: "the store's append-only audit files are missing (a store is its redb file, its .id and this directory, moved and copied together)",
            });
        }
        let log = Arc::new(FileLog::open(&dir, floor)?);
        // The files belong to this redb file: a directory left from another store, or a
        // redb file copied without its own, is refused rather than continued.
        let owner = match std::fs::read(dir.join(OWNER_FILE)) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("open the log")(redb::Error::Io(e))),
        };
        if log.view().has_files() && (token.is_none() || owner != token) {
            return Err(StoreError::LogDamaged {
                path: dir,
                offset: 0,
                what: "the append-only audit files belong to another store than this redb file",
            });
        }
        logs.insert(table.name(), Arc::clone(&log));
        Ok(Some(log))
    }

    /// Ties `log`'s directory to this redb file before its first segment is made: a
    /// random token in the redb file and in the directory's `OWNER` file.
    fn tie(&self, table: Table, log: &FileLog) -> Result<(), StoreError> {
        let op = "open the log";
        if log.view().has_files() {
            return Ok(());
        }
        let token = match self.redb_get(LOG_FLOORS, &owner_key(table))? {
            Some(token) => token,
            None => {
                let mut bytes = [0u8; 16];
                getrandom::fill(&mut bytes)
                    .map_err(|_| StoreError::Settings("the random source failed".into()))?;
                let token = data_encoding::HEXLOWER.encode(&bytes).into_bytes();
                self.put(LOG_FLOORS, &owner_key(table), &token)?;
                token
            }
        };
        let dir = log_dir(&self.path, table);
        let written = (|| {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join(OWNER_FILE))?;
            file.write_all(&token)?;
            file.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        written.map_err(|e| io(op)(redb::Error::Io(e)))
    }

    /// A log table's files and a redb read transaction, both as of one moment.
    fn read_both(
        &self,
        table: Table,
    ) -> Result<(Option<super::log::View>, redb::ReadTransaction), StoreError> {
        use redb::ReadableDatabase;
        let op = "read";
        let log = self.log(table)?;
        let _appending = log.as_ref().map(|l| l.lock());
        let view = log.as_ref().map(|l| l.view());
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        Ok((view, txn))
    }

    fn redb_get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        use redb::ReadableDatabase;
        let op = "read";
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        let Some(t) = open_read(&txn, table, op)? else {
            return Ok(None);
        };
        let value = t.get(key).map_err(|e| io(op)(e.into()))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn redb_range(
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

    fn redb_last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError> {
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

    /// The floors the `removals` set on log tables (the last key each removes), checking
    /// that each removes from the table's start.
    fn log_floors(
        &self,
        removals: &[Removal],
    ) -> Result<Vec<(Arc<FileLog>, Table, String)>, StoreError> {
        let mut floors = Vec::new();
        for r in removals {
            let Some(log) = self.log(r.table)? else {
                continue;
            };
            let first = [
                log.view().first_key()?,
                self.redb_range(r.table, "", 1)?
                    .into_iter()
                    .next()
                    .map(|(k, _)| k),
            ]
            .into_iter()
            .flatten()
            .min();
            if first.is_some_and(|first| r.from.as_str() > first.as_str()) {
                return Err(StoreError::Settings(format!(
                    "the log table {} is removed only from its start",
                    r.table.name()
                )));
            }
            // A floor never goes down.
            let stored = self
                .redb_get(LOG_FLOORS, r.table.name())?
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            let floor = stored.filter(|f| f > &r.to).unwrap_or_else(|| r.to.clone());
            floors.push((log, r.table, floor));
        }
        Ok(floors)
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
        let floors = self.log_floors(removals)?;
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
        for (_, table, floor) in &floors {
            let mut t = txn
                .open_table(definition(LOG_FLOORS))
                .map_err(|e| io(op)(e.into()))?;
            t.insert(table.name(), floor.as_bytes())
                .map_err(|e| io(op)(e.into()))?;
        }
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
        txn.commit().map_err(|e| io(op)(e.into()))?;
        for (log, _, floor) in floors {
            // The floor is durable and readers already see it; deleting the segments
            // below it is housekeeping, done again at the next start.
            if let Err(e) = log.set_floor(&floor) {
                tracing::error!(error = %crate::error_chain(&e), "archived log segments were not deleted");
            }
        }
        Ok(())
    }

    /// Appends to a log table: the writes its build makes after the last entry (of the
    /// files or the redb table, whichever is greater) go to the files when they are only
    /// that table's, in increasing key order, and nothing is removed; otherwise (an audit
    /// record with the change it records, an archiving with its removal) to one redb
    /// transaction, as for any table. Readers merge both.
    fn append_log(
        &self,
        log: &FileLog,
        table: Table,
        build: &mut super::AppendBuild<'_>,
        removals: &[Removal],
    ) -> Result<(), StoreError> {
        let mut appender = log.lock();
        // After a failure only a restart clears, nothing more is appended to the table,
        // in the files or in the redb file.
        appender.usable()?;
        let last = later(log.view().last(), self.redb_last(table)?);
        let after = last.as_ref().map(|(k, _)| k.clone());
        let writes = build(last)?;
        let mut previous = after.as_deref();
        let mut increasing = true;
        for w in &writes {
            increasing &= w.table == table && previous.is_none_or(|p| w.key.as_str() > p);
            previous = Some(&w.key);
        }
        if removals.is_empty() && increasing {
            self.tie(table, log)?;
            return log.append(&mut appender, &writes);
        }
        self.commit("append", None, &writes, removals)
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
        if let Some(found) = self.redb_get(table, key)? {
            return Ok(Some(found));
        }
        let Some(log) = self.log(table)? else {
            return Ok(None);
        };
        Ok(log
            .view()
            .range(key, 1)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use redb::ReadableTable;
        let op = "scan";
        let (view, txn) = self.read_both(table)?;
        let mut out = Vec::new();
        if let Some(t) = open_read(&txn, table, op)? {
            for item in t.iter().map_err(|e| io(op)(e.into()))? {
                let (k, v) = item.map_err(|e| io(op)(e.into()))?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
        }
        if let Some(view) = view {
            let mut files = Vec::new();
            view.each_from("", |k, v| {
                files.push((k, v));
                Ok(true)
            })?;
            out = merge(out, files, usize::MAX);
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
        // One read transaction, and the log tables' files as of the same moment (no append
        // runs while both are taken): every table as of one commit.
        let logs = tables
            .iter()
            .filter_map(|&t| self.log(t).transpose().map(|l| l.map(|l| (t, l))))
            .collect::<Result<Vec<_>, _>>()?;
        let guards: Vec<_> = logs.iter().map(|(_, l)| l.lock()).collect();
        let txn = self.db.begin_read().map_err(|e| io(op)(e.into()))?;
        let views: BTreeMap<&'static str, super::log::View> =
            logs.iter().map(|(t, l)| (t.name(), l.view())).collect();
        drop(guards);
        for &table in tables {
            let Some(t) = open_read(&txn, table, op)? else {
                if let Some(view) = views.get(table.name()) {
                    view.each_from("", |k, v| each(table, &k, &v).map(|()| true))?;
                }
                continue;
            };
            let mut stored = t.iter().map_err(|e| io(op)(e.into()))?.peekable();
            let Some(view) = views.get(table.name()) else {
                for item in stored {
                    let (k, v) = item.map_err(|e| io(op)(e.into()))?;
                    each(table, k.value(), v.value())?;
                }
                continue;
            };
            // The files streamed, the redb entries slotted in by key (they win a tie),
            // neither held whole in memory.
            view.each_from("", |k, v| {
                while let Some(item) =
                    stored.next_if(|i| i.as_ref().map_or(true, |(sk, _)| sk.value() <= k.as_str()))
                {
                    let (sk, sv) = item.map_err(|e| io(op)(e.into()))?;
                    each(table, sk.value(), sv.value())?;
                    if sk.value() == k {
                        return Ok(true);
                    }
                }
                each(table, &k, &v)?;
                Ok(true)
            })?;
            for item in stored {
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
        match self.log(table)? {
            Some(log) => self.append_log(&log, table, build, removals),
            None => self.commit("append", Some((table, build)), &[], removals),
        }
    }

    fn range(
        &self,
        table: Table,
        start: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let Some(log) = self.log(table)? else {
            return self.redb_range(table, start, limit);
        };
        // Both as of one moment (no append between): a record appended to the files
        // while a later one went to the redb file is never missed.
        let (view, stored) = {
            let _appending = log.lock();
            (log.view(), self.redb_range(table, start, limit)?)
        };
        Ok(merge(stored, view.range(start, limit)?, limit))
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let files = self.log(table)?.and_then(|log| log.view().last());
        Ok(later(files, self.redb_last(table)?))
    }

    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write("write", table, |t| {
            t.insert(key, value)?;
            Ok(true)
        })
        .map(|_| ())
    }
}

/// The file in a log table's directory naming the redb file it belongs to.
const OWNER_FILE: &str = "OWNER";

/// The key, in `LOG_FLOORS`, of the token that ties a log table's directory to the redb
/// file.
fn owner_key(table: Table) -> String {
    format!("{}.owner", table.name())
}

/// The directory of a log table's files: `STORE.TABLE` beside the redb file.
pub(super) fn log_dir(store: &Path, table: Table) -> PathBuf {
    let mut dir = store.as_os_str().to_owned();
    dir.push(".");
    dir.push(table.name());
    PathBuf::from(dir)
}

/// The entry with the greater key (the redb one on a tie).
fn later(
    files: Option<(String, Vec<u8>)>,
    stored: Option<(String, Vec<u8>)>,
) -> Option<(String, Vec<u8>)> {
    match (files, stored) {
        (Some(f), Some(s)) => Some(if f.0 > s.0 { f } else { s }),
        (f, s) => s.or(f),
    }
}

/// Two key-ordered lists as one, at most `limit` long; on a tie the redb entry (`stored`)
/// wins.
fn merge(
    stored: Vec<(String, Vec<u8>)>,
    files: Vec<(String, Vec<u8>)>,
    limit: usize,
) -> Vec<(String, Vec<u8>)> {
    if files.is_empty() {
        return stored.into_iter().take(limit).collect();
    }
    let mut out = Vec::with_capacity((stored.len() + files.len()).min(limit));
    let mut files = files.into_iter().peekable();
    for s in stored {
        while let Some(f) = files.next_if(|f| f.0 < s.0) {
            out.push(f);
        }
        if files.peek().is_some_and(|f| f.0 == s.0) {
            files.next();
        }
        out.push(s);
    }
    out.extend(files);
    out.truncate(limit);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
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
    fn a_store_in_a_directory_everyone_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        // Its group may write it (the server's group); everyone may not, sticky or not.
        for (mode, ok) in [
            (0o700, true),
            (0o770, true),
            (0o777, false),
            (0o1777, false),
        ] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            match RedbStore::open(&path) {
                Ok(_) => assert!(ok, "{mode:o}: opened"),
                Err(err) => {
                    assert!(!ok, "{mode:o}: {err}");
                    assert!(
                        matches!(err, StoreError::DirTooOpen { mode: m, .. } if m == mode),
                        "{err:?}"
                    );
                    assert!(err.to_string().contains("chmod o-w"), "{err}");
                }
            }
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let _first = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::InUse(_)), "{err:?}");
    }

    const LOG: Table = Table::log("audit");

    fn w(table: Table, k: &str, v: &[u8]) -> Write {
        Write {
            table,
            key: k.into(),
            value: v.to_vec(),
        }
    }

    /// Appends `entries` to `LOG` after whatever is last, with `also` in the same commit.
    fn append(store: &RedbStore, entries: &[(&str, &str)], also: &[Write]) {
        let mut build = |_last: Option<(String, Vec<u8>)>| {
            let mut writes: Vec<Write> = also.to_vec();
            writes.extend(entries.iter().map(|(k, v)| w(LOG, k, v.as_bytes())));
            Ok(writes)
        };
        store.append_with(LOG, &mut build, &[]).unwrap();
    }

    fn entries(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    fn snapshot(store: &RedbStore) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .snapshot(&[KEYS, LOG], &mut |t, k, v| {
                if t == LOG {
                    out.push((k.to_owned(), v.to_vec()));
                }
                Ok(())
            })
            .unwrap();
        out
    }

    /// A log table's appends go to its files, unless they commit with another change (then
    /// to the redb file, with it); every reader sees one table in key order, after a
    /// reopen too; a removal from the start hides entries from both and survives a reopen.
    #[test]
    fn a_log_table_is_one_table_across_its_files_and_the_redb_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let store = RedbStore::open(&path).unwrap();
        // A store written before the files existed: its first entries in the redb file.
        store.put(LOG, "01", b"a").unwrap();
        append(&store, &[("02", "b"), ("03", "c")], &[]);
        append(&store, &[("04", "d")], &[w(KEYS, "k", b"v")]);
        append(&store, &[("05", "e"), ("06", "f")], &[]);
        let all = entries(&[
            ("01", "a"),
            ("02", "b"),
            ("03", "c"),
            ("04", "d"),
            ("05", "e"),
            ("06", "f"),
        ]);
        // Where each went.
        assert_eq!(
            store.redb_range(LOG, "", 10).unwrap(),
            entries(&[("01", "a"), ("04", "d")])
        );
        assert!(
            log_dir(&path, LOG)
                .join("00000000000000000001.log")
                .exists()
        );
        for check in 0..2 {
            assert_eq!(store.scan(LOG).unwrap(), all, "{check}");
            assert_eq!(snapshot(&store), all, "{check}");
            assert_eq!(store.range(LOG, "", 100).unwrap(), all, "{check}");
            assert_eq!(store.range(LOG, "03", 2).unwrap(), all[2..4].to_vec());
            assert_eq!(store.range(LOG, "035", 1).unwrap(), all[3..4].to_vec());
            assert_eq!(store.last(LOG).unwrap(), all.last().cloned());
            assert_eq!(store.get(LOG, "05").unwrap().as_deref(), Some(&b"e"[..]));
            assert_eq!(store.get(LOG, "04").unwrap().as_deref(), Some(&b"d"[..]));
            assert_eq!(store.get(LOG, "07").unwrap(), None);
            assert_eq!(store.get(KEYS, "k").unwrap().as_deref(), Some(&b"v"[..]));
        }
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.scan(LOG).unwrap(), all);
        // An entry rewritten in the redb file (as someone with the disk could) is what
        // readers see: the verifier, not the store, judges it.
        store.put(LOG, "05", b"E").unwrap();
        assert_eq!(store.get(LOG, "05").unwrap().as_deref(), Some(&b"E"[..]));
        assert_eq!(store.scan(LOG).unwrap()[4].1, b"E".to_vec());
        assert_eq!(snapshot(&store)[4].1, b"E".to_vec());
        // Removal from the start, with its record and a change.
        let mut build = |_last: Option<(String, Vec<u8>)>| Ok(vec![w(LOG, "07", b"g")]);
        let removal = Removal {
            table: LOG,
            from: "01".into(),
            to: "04".into(),
        };
        store
            .append_with(LOG, &mut build, std::slice::from_ref(&removal))
            .unwrap();
        let rest = entries(&[("05", "E"), ("06", "f"), ("07", "g")]);
        assert_eq!(store.scan(LOG).unwrap(), rest);
        assert_eq!(store.range(LOG, "", 1).unwrap(), rest[..1].to_vec());
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.scan(LOG).unwrap(), rest);
        assert_eq!(snapshot(&store), rest);
        // Only from the start.
        let middle = Removal {
            table: LOG,
            from: "06".into(),
            to: "06".into(),
        };
        let err = store.write_all_removing(&[], &[middle]).unwrap_err();
        assert!(err.to_string().contains("only from its start"), "{err}");
        assert_eq!(store.scan(LOG).unwrap(), rest);
    }

    /// What an append's build sees as the last entry is the greatest of both places.
    #[test]
    fn an_append_follows_the_last_entry_wherever_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("kms.redb")).unwrap();
        let mut seen = Vec::new();
        for (i, also) in [false, true, false, false, true, true, false]
            .into_iter()
            .enumerate()
        {
            let key = format!("{:02}", i + 1);
            let extra = if also {
                vec![w(KEYS, &key, b"x")]
            } else {
                vec![]
            };
            let mut build = |last: Option<(String, Vec<u8>)>| {
                seen.push(last.map(|(k, _)| k));
                let mut writes = extra.clone();
                writes.push(w(LOG, &key, key.as_bytes()));
                Ok(writes)
            };
            store.append_with(LOG, &mut build, &[]).unwrap();
        }
        let expected: Vec<Option<String>> =
            (0..7).map(|i| (i > 0).then(|| format!("{i:02}"))).collect();
        assert_eq!(seen, expected);
        // A build that fails writes nothing.
        let mut failing = |_| Err(StoreError::Settings("no".into()));
        assert!(store.append_with(LOG, &mut failing, &[]).is_err());
        assert_eq!(store.scan(LOG).unwrap().len(), 7);
    }

    /// The files belong to their redb file: a redb file without its directory, or a
    /// directory left by another store, is refused, never continued.
    #[test]
    fn a_log_directory_belongs_to_its_redb_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let store = RedbStore::open(&path).unwrap();
        append(&store, &[("01", "a")], &[]);
        drop(store);
        // The redb file copied without its directory.
        let elsewhere = dir.path().join("copy");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::copy(&path, elsewhere.join("kms.redb")).unwrap();
        let copy = RedbStore::open(&elsewhere.join("kms.redb")).unwrap();
        let err = copy.last(LOG).unwrap_err();
        assert!(matches!(err, StoreError::LogDamaged { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");
        drop(copy);
        // A new store at the first one's path, its directory left behind.
        std::fs::remove_file(&path).unwrap();
        let fresh = RedbStore::open(&path).unwrap();
        let err = fresh.scan(LOG).unwrap_err();
        assert!(err.to_string().contains("another store"), "{err}");
    }

    /// A removal with a lower last key never lowers the floor.
    #[test]
    fn a_log_floor_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let store = RedbStore::open(&path).unwrap();
        append(
            &store,
            &[("01", "a"), ("02", "b"), ("03", "c"), ("04", "d")],
            &[],
        );
        let remove = |to: &str| Removal {
            table: LOG,
            from: String::new(),
            to: to.into(),
        };
        store.write_all_removing(&[], &[remove("03")]).unwrap();
        store.write_all_removing(&[], &[remove("01")]).unwrap();
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.scan(LOG).unwrap(), entries(&[("04", "d")]));
    }
}
