//! The embedded store's append-only files for its log tables ([`Table::log`]: the audit
//! log).
//!
//! A log table's appends are frames written at the end of a segment file and made durable
//! with one `fdatasync`: no B-tree, no page copies, each entry written once. The files live
//! in the directory `STORE.TABLE` beside the redb file (`kms.redb.audit/`), are named by a
//! counter (`00000000000000000001.log`, ...), and start with [`MAGIC`]. A frame is
//!
//! ```text
//! u32 LE  length of what follows the checksum (2 + key length + value length)
//! u32 LE  CRC-32 of the length's 4 bytes and what follows the checksum
//! u16 LE  key length, then the key (UTF-8), then the value
//! ```
//!
//! A length of zero ends a file's entries (the file is grown ahead of its entries with
//! zeros, so that an append rewrites blocks the file already has and its `fdatasync`
//! writes no metadata). Keys increase along the files.
//!
//! **A torn tail** (a crash inside an append, whose caller was never answered) is found
//! when the log opens: the first frame of the last file that does not check is its end.
//! What follows it, when it is not all zeros, is moved aside to `NNN.log.torn-OFFSET` (kept
//! for inspection: nothing is deleted) and the file is cut there.
//!
//! **A failed append** (a full disk, a failing `fdatasync`) is cut off again before the
//! error returns, so the next append follows the last durable frame; if even that fails,
//! every later append fails until the store is opened again (fail closed).
//!
//! Entries are removed only from the start ([`FileLog::set_floor`]): a floor key below
//! which readers see nothing, kept by the store in its redb file (so it commits with the
//! record of the removal), and files wholly below it deleted.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{StoreError, Write};

/// A key and its value.
type Entry = (String, Vec<u8>);

/// What every segment file starts with.
pub(super) const MAGIC: &[u8; 8] = b"KMSLOG1\n";
/// A frame's header: its length and checksum.
const HEADER: usize = 8;
/// The longest frame (anything longer is not a frame: the end, or damage).
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// A segment is sealed and the next one started once it holds this much.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How far ahead of its entries a segment is grown with zeros.
const GROW_BYTES: u64 = 1024 * 1024;
/// One index entry (key, offset) per this many frames.
const INDEX_EVERY: u64 = 64;

fn io_error(op: &'static str, e: std::io::Error) -> StoreError {
    StoreError::Io {
        op,
        source: redb::Error::Io(e),
    }
}

/// One frame's bytes.
fn frame(key: &str, value: &[u8], out: &mut Vec<u8>) -> Result<(), StoreError> {
    let klen = u16::try_from(key.len()).map_err(|_| StoreError::Settings("key too long".into()))?;
    let len = 2 + key.len() + value.len();
    if len > MAX_FRAME {
        return Err(StoreError::Settings(
            "value too long for a log table".into(),
        ));
    }
    let len32 = u32::try_from(len).map_err(|_| StoreError::Settings("value too long".into()))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len32.to_le_bytes());
    crc.update(&klen.to_le_bytes());
    crc.update(key.as_bytes());
    crc.update(value);
    out.extend_from_slice(&len32.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    Ok(())
}

/// What reading a frame at some offset found.
enum Read1 {
    /// A frame: key, value, and its whole length.
    Entry(String, Vec<u8>, u64),
    /// The end of the entries (a zero length, or the end of the file).
    End,
    /// Bytes that are not a frame.
    Damaged,
}

/// Reads one frame from `r` (positioned at it).
fn read_frame(r: &mut impl Read) -> std::io::Result<Read1> {
    let mut header = [0u8; HEADER];
    match read_full(r, &mut header)? {
        0 => return Ok(Read1::End),
        n if n < HEADER => return Ok(Read1::Damaged),
        _ => {}
    }
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    if len == 0 && crc == 0 {
        return Ok(Read1::End);
    }
    let len = len as usize;
    if !(2..=MAX_FRAME).contains(&len) {
        return Ok(Read1::Damaged);
    }
    let mut payload = vec![0u8; len];
    if read_full(r, &mut payload)? < len {
        return Ok(Read1::Damaged);
    }
    let mut check = crc32fast::Hasher::new();
    check.update(&[l0, l1, l2, l3]);
    check.update(&payload);
    if check.finalize() != crc {
        return Ok(Read1::Damaged);
    }
    let klen = match payload.get(..2) {
        Some(&[k0, k1]) => usize::from(u16::from_le_bytes([k0, k1])),
        _ => return Ok(Read1::Damaged),
    };
    if 2 + klen > len {
        return Ok(Read1::Damaged);
    }
    let value = payload.split_off(2 + klen);
    let Ok(key) = String::from_utf8(payload.split_off(2)) else {
        return Ok(Read1::Damaged);
    };
    Ok(Read1::Entry(key, value, (HEADER + len) as u64))
}

/// Reads until `buf` is full or the end: how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|r| !r.is_empty()) {
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// One segment file, as readers see it.
#[derive(Clone)]
struct Segment {
    number: u64,
    path: PathBuf,
    /// Its first key (`None`: no entry yet).
    first: Option<String>,
    /// The bytes of durable entries (header included): readers read no further.
    len: u64,
    /// Sparse index, built by readers as they pass.
    index: Arc<Mutex<Index>>,
}

#[derive(Default)]
struct Index {
    /// (key, offset) of every `INDEX_EVERY`-th frame.
    marks: Vec<(String, u64)>,
    /// How far it was built, and how many frames that was.
    scanned: u64,
    frames: u64,
}

impl Segment {
    fn new(number: u64, path: PathBuf, first: Option<String>, len: u64) -> Self {
        Self {
            number,
            path,
            first,
            len,
            index: Arc::new(Mutex::new(Index {
                scanned: MAGIC.len() as u64,
                ..Index::default()
            })),
        }
    }

    /// The offset of a frame at or before the first with a key `>= start` (extending the
    /// index up to the durable length first).
    fn seek(&self, file: &mut File, start: &str) -> std::io::Result<u64> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if index.scanned < self.len {
            file.seek(SeekFrom::Start(index.scanned))?;
            let mut r = std::io::BufReader::new(file.by_ref().take(self.len - index.scanned));
            while let Read1::Entry(key, _, n) = read_frame(&mut r)? {
                if index.frames.is_multiple_of(INDEX_EVERY) {
                    let at = index.scanned;
                    index.marks.push((key, at));
                }
                index.frames += 1;
                index.scanned += n;
            }
        }
        let after = index.marks.partition_point(|(k, _)| k.as_str() <= start);
        Ok(match after.checked_sub(1) {
            Some(i) => index.marks.get(i).map_or(MAGIC.len() as u64, |m| m.1),
            None => MAGIC.len() as u64,
        })
    }
}

/// What readers see: the segments and their durable lengths, the last entry, the floor.
#[derive(Clone, Default)]
pub(super) struct View {
    segments: Vec<Segment>,
    last: Option<Entry>,
    floor: Option<String>,
}

impl View {
    /// The last entry above the floor.
    pub(super) fn last(&self) -> Option<(String, Vec<u8>)> {
        self.last
            .clone()
            .filter(|(k, _)| self.floor.as_deref().is_none_or(|f| k.as_str() > f))
    }

    /// Calls `each` with every entry with a key `>= start` (and above the floor), in key
    /// order, until it returns false.
    pub(super) fn each_from(
        &self,
        start: &str,
        mut each: impl FnMut(String, Vec<u8>) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let op = "read the log";
        let floor = self.floor.as_deref();
        // The last segment starting at or before `start` (earlier ones end before it).
        let from = self
            .segments
            .iter()
            .rposition(|s| s.first.as_deref().is_some_and(|f| f <= start))
            .unwrap_or(0);
        for segment in self.segments.iter().skip(from) {
            if segment.first.is_none() {
                continue;
            }
            let mut file = File::open(&segment.path).map_err(|e| io_error(op, e))?;
            let offset = segment
                .seek(&mut file, start)
                .map_err(|e| io_error(op, e))?;
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| io_error(op, e))?;
            let mut r =
                std::io::BufReader::with_capacity(64 * 1024, file.take(segment.len - offset));
            // Up to the end, or to a damaged frame inside a file that was whole when
            // written: what follows it cannot be found; the reader (the audit verifier)
            // sees the entries missing and names the break.
            while let Read1::Entry(key, value, _) =
                read_frame(&mut r).map_err(|e| io_error(op, e))?
            {
                if key.as_str() < start || floor.is_some_and(|f| key.as_str() <= f) {
                    continue;
                }
                if !each(key, value)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Up to `limit` entries with keys `>= start`.
    pub(super) fn range(
        &self,
        start: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        if limit > 0 {
            self.each_from(start, |k, v| {
                out.push((k, v));
                Ok(out.len() < limit)
            })?;
        }
        Ok(out)
    }
}

/// The appending end.
pub(super) struct Appender {
    file: Option<File>,
    number: u64,
    /// Where the next frame goes.
    len: u64,
    /// How long the file is (zeros past `len`).
    allocated: u64,
    /// An append failed and could not be cut off: nothing more is appended.
    broken: bool,
}

/// A log table's segment files.
pub(super) struct FileLog {
    dir: PathBuf,
    appender: Mutex<Appender>,
    view: RwLock<View>,
    /// A segment is sealed once it holds this much ([`SEGMENT_BYTES`]; less in tests).
    segment_bytes: u64,
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog").field("dir", &self.dir).finish()
    }
}

/// The segment file `number` in `dir`.
fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.log"))
}

/// Makes a new directory entry in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileLog {
    /// Opens (or creates, mode 0700) the log in `dir`, cutting a torn tail, with the floor
    /// the store kept.
    pub(super) fn open(dir: &Path, floor: Option<String>) -> Result<Self, StoreError> {
        Self::open_sized(dir, floor, SEGMENT_BYTES)
    }

    /// As [`FileLog::open`], sealing segments at `segment_bytes`.
    fn open_sized(
        dir: &Path,
        floor: Option<String>,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        let op = "open the log";
        let err = |e| io_error(op, e);
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(err)?;
            }
        }
        let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StoreError::TooOpen {
                path: dir.to_owned(),
                mode,
            });
        }
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(err)? {
            let name = entry.map_err(err)?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_suffix(".log")
                .and_then(|n| n.parse::<u64>().ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        // A crash while a segment was being started can leave the newest file without its
        // whole header (and so without an entry): it is removed.
        if let Some(&n) = numbers.last() {
            let path = segment_path(dir, n);
            let head = std::fs::read(&path).map_err(err)?;
            if head.len() < MAGIC.len()
                && (MAGIC.starts_with(&head) || head.iter().all(|&b| b == 0))
            {
                std::fs::remove_file(&path).map_err(err)?;
                sync_dir(dir).map_err(err)?;
                numbers.pop();
            }
        }
        let mut segments = Vec::new();
        for &n in &numbers {
            let path = segment_path(dir, n);
            let mut file = File::open(&path).map_err(err)?;
            let len = file.metadata().map_err(err)?.len();
            let mut magic = [0u8; MAGIC.len()];
            if read_full(&mut file, &mut magic).map_err(err)? < MAGIC.len() || &magic != MAGIC {
                return Err(StoreError::Settings(format!(
                    "{} is not a kms log segment",
                    path.display()
                )));
            }
            let first = match read_frame(&mut file).map_err(err)? {
                Read1::Entry(k, _, _) => Some(k),
                Read1::End | Read1::Damaged => None,
            };
            segments.push(Segment::new(n, path, first, len));
        }
        // The last segment: find its end, cut a torn tail.
        let mut last = None;
        let mut appender = Appender {
            file: None,
            number: numbers.last().copied().unwrap_or(0),
            len: 0,
            allocated: 0,
            broken: false,
        };
        if let Some(tail) = segments.last_mut() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tail.path)
                .map_err(err)?;
            let (end, entry) = recover_tail(&file, &tail.path).map_err(err)?;
            tail.len = end;
            last = entry;
            appender.len = end;
            appender.allocated = file.metadata().map_err(err)?.len();
            appender.file = Some(file);
        }
        // Sealed segments end at their last entry; find the last entry if the tail has none.
        for segment in segments.iter().rev() {
            if last.is_some() {
                break;
            }
            let file = File::open(&segment.path).map_err(err)?;
            last = scan_end(&file).map_err(err)?.1;
        }
        let segments = segments
            .into_iter()
            .filter(|s| s.first.is_some() || s.number == appender.number)
            .collect();
        let log = Self {
            dir: dir.to_owned(),
            appender: Mutex::new(appender),
            view: RwLock::new(View {
                segments,
                last,
                floor: None,
            }),
            segment_bytes,
        };
        if let Some(floor) = floor {
            log.set_floor(&floor);
        }
        Ok(log)
    }

    /// What readers see now (a snapshot: appends after it are not in it).
    pub(super) fn view(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the appending end: held across an append's read of the last entry and its
    /// write, so that appends follow one another (and by a snapshot, so that it sees the
    /// log and the redb file as of one moment).
    pub(super) fn lock(&self) -> MutexGuard<'_, Appender> {
        self.appender.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `writes` (keys increasing, after the last entry) durably: on `Ok` they are
    /// on disk; on `Err` none is visible, to readers or after a restart.
    pub(super) fn append(
        &self,
        appender: &mut Appender,
        writes: &[Write],
    ) -> Result<(), StoreError> {
        let op = "append to the log";
        let Some(last_write) = writes.last() else {
            return Ok(());
        };
        if appender.broken {
            return Err(StoreError::Settings(
                "an earlier append to the log failed and could not be undone: restart the server"
                    .into(),
            ));
        }
        let mut bytes = Vec::with_capacity(writes.iter().map(|w| 16 + w.value.len()).sum());
        for w in writes {
            frame(&w.key, &w.value, &mut bytes)?;
        }
        let need = bytes.len() as u64;
        if appender.file.is_none()
            || (appender.len > MAGIC.len() as u64 && appender.len + need > self.segment_bytes)
        {
            self.start_segment(appender).map_err(|e| io_error(op, e))?;
        }
        let Some(file) = appender.file.as_ref() else {
            return Err(StoreError::Settings("no log segment".into()));
        };
        let at = appender.len;
        let mut allocated = appender.allocated;
        let written = (|| {
            if at + need > allocated {
                let grow = (at + need - allocated).max(GROW_BYTES);
                let zeros = vec![0u8; usize::try_from(grow).unwrap_or(usize::MAX)];
                file.write_all_at(&zeros, allocated)?;
                allocated += grow;
            }
            file.write_all_at(&bytes, at)?;
            file.sync_data()
        })();
        if let Err(e) = written {
            // Cut off what may have reached the file, so that the next append (once the
            // disk has room again) follows the last durable entry.
            let cut = file.set_len(at).and_then(|()| file.sync_all());
            appender.allocated = at;
            if cut.is_err() {
                appender.broken = true;
                tracing::error!(
                    dir = %self.dir.display(),
                    "a failed append to the log could not be cut off: no more appends until the server restarts"
                );
            }
            return Err(io_error(op, e));
        }
        appender.allocated = allocated;
        appender.len = at + need;
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = view.segments.last_mut() {
            s.len = appender.len;
            if s.first.is_none() {
                s.first = writes.first().map(|w| w.key.clone());
            }
        }
        view.last = Some((last_write.key.clone(), last_write.value.clone()));
        Ok(())
    }

    /// Seals the current segment (cut to its entries) and starts the next one.
    fn start_segment(&self, appender: &mut Appender) -> std::io::Result<()> {
        if let Some(old) = appender.file.take() {
            old.set_len(appender.len)?;
            old.sync_all()?;
        }
        let number = appender.number + 1;
        let path = segment_path(&self.dir, number);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all_at(MAGIC, 0)?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        appender.file = Some(file);
        appender.number = number;
        appender.len = MAGIC.len() as u64;
        appender.allocated = MAGIC.len() as u64;
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        view.segments.retain(|s| s.first.is_some());
        view.segments
            .push(Segment::new(number, path, None, MAGIC.len() as u64));
        Ok(())
    }

    /// Entries with keys up to `floor` are removed: readers no longer see them, and
    /// segment files holding only such entries are deleted (never the one appended to).
    pub(super) fn set_floor(&self, floor: &str) {
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        if view.floor.as_deref().is_some_and(|f| f >= floor) {
            return;
        }
        view.floor = Some(floor.to_owned());
        // Segment i's keys are all below segment i+1's first key.
        let mut gone = Vec::new();
        let count = view.segments.len();
        let firsts: Vec<Option<String>> = view.segments.iter().map(|s| s.first.clone()).collect();
        for i in 0..count.saturating_sub(1) {
            if firsts
                .get(i + 1)
                .and_then(|f| f.as_deref())
                .is_some_and(|next| next <= floor)
            {
                gone.push(i);
            }
        }
        let removed: Vec<Segment> = gone
            .iter()
            .rev()
            .map(|&i| view.segments.remove(i))
            .collect();
        drop(view);
        for s in removed {
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(file = %s.path.display(), error = %e, "an archived log segment could not be deleted");
            }
        }
    }

    /// The first entry's key still visible.
    pub(super) fn first_key(&self) -> Result<Option<String>, StoreError> {
        Ok(self.view().range("", 1)?.into_iter().next().map(|(k, _)| k))
    }
}

/// Scans `file` from its start: the offset where its entries end, and its last entry.
fn scan_end(file: &File) -> std::io::Result<(u64, Option<Entry>)> {
    let mut r = std::io::BufReader::with_capacity(256 * 1024, file);
    r.seek(SeekFrom::Start(MAGIC.len() as u64))?;
    let mut end = MAGIC.len() as u64;
    let mut last = None;
    while let Read1::Entry(k, v, n) = read_frame(&mut r)? {
        end += n;
        last = Some((k, v));
    }
    Ok((end, last))
}

/// Finds where the last segment's entries end; what follows, unless all zeros, is a torn
/// append: copied aside to `PATH.torn-END` and cut off. The end and the last entry.
fn recover_tail(file: &File, path: &Path) -> std::io::Result<(u64, Option<Entry>)> {
    let (end, last) = scan_end(file)?;
    let len = file.metadata()?.len();
    let mut rest = Vec::new();
    let mut r = file;
    r.seek(SeekFrom::Start(end))?;
    r.take(len - end).read_to_end(&mut rest)?;
    if rest.iter().any(|&b| b != 0) {
        let aside = PathBuf::from(format!("{}.torn-{end}", path.display()));
        let mut copy = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)?;
        std::io::Write::write_all(&mut copy, &rest)?;
        copy.sync_all()?;
        file.set_len(end)?;
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        tracing::warn!(
            file = %path.display(),
            offset = end,
            bytes = rest.len(),
            aside = %aside.display(),
            "the audit log's last segment ended in an incomplete append (a crash while writing it; never acknowledged): cut off and kept aside"
        );
    }
    Ok((end, last))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::Table;

    const T: Table = Table::log("audit");

    fn key(i: u64) -> String {
        format!("{i:020}")
    }

    fn value(i: u64) -> Vec<u8> {
        format!("record {i} ")
            .repeat(1 + (i % 7) as usize)
            .into_bytes()
    }

    fn append(log: &FileLog, from: u64, to: u64) {
        let writes: Vec<Write> = (from..=to)
            .map(|i| Write {
                table: T,
                key: key(i),
                value: value(i),
            })
            .collect();
        log.append(&mut log.lock(), &writes).unwrap();
    }

    fn all(log: &FileLog) -> Vec<(String, Vec<u8>)> {
        log.view().range("", usize::MAX).unwrap()
    }

    fn expect(from: u64, to: u64) -> Vec<(String, Vec<u8>)> {
        (from..=to).map(|i| (key(i), value(i))).collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn appends_read_back_in_order_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open_sized(&at, None, 4096).unwrap();
        assert!(all(&log).is_empty());
        assert_eq!(log.view().last(), None);
        for g in 0..100 {
            append(&log, g * 10 + 1, g * 10 + 10);
        }
        assert!(segments(&at).len() > 10, "{:?}", segments(&at));
        assert_eq!(all(&log), expect(1, 1000));
        assert_eq!(log.view().last(), Some((key(1000), value(1000))));
        // Pages from anywhere, as the audit log's readers page.
        for start in [1, 2, 63, 64, 65, 500, 999, 1000] {
            assert_eq!(
                log.view().range(&key(start), 7).unwrap(),
                expect(start, (start + 6).min(1000)),
                "from {start}"
            );
        }
        assert!(log.view().range(&key(1001), 5).unwrap().is_empty());
        // Files are private.
        let mode = std::fs::metadata(&at).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        for f in segments(&at) {
            assert_eq!(
                std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        drop(log);
        let log = FileLog::open_sized(&at, None, 4096).unwrap();
        assert_eq!(all(&log), expect(1, 1000));
        append(&log, 1001, 1001);
        assert_eq!(log.view().range(&key(995), 100).unwrap(), expect(995, 1001));
    }

    /// A crash inside an append leaves any prefix of its bytes, or garbage, past the last
    /// durable frame: at every cut, reopening keeps every earlier entry, drops the torn
    /// one, keeps the torn bytes aside, and appends after the last whole entry.
    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_entry_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open(&at, None).unwrap();
        append(&log, 1, 20);
        let whole = log.lock().len;
        append(&log, 21, 23);
        let end = log.lock().len;
        drop(log);
        let file = segments(&at).pop().unwrap();
        let pristine = std::fs::read(&file).unwrap();
        // Where each of the last append's entries ends.
        let mut ends = vec![(20, whole)];
        for i in 21..=23 {
            let (_, at) = ends[ends.len() - 1];
            ends.push((i, at + (HEADER + 2 + 20 + value(i).len()) as u64));
        }
        assert_eq!(ends[3].1, end);
        for cut in whole..end {
            for garbage in [false, true] {
                let mut bytes = pristine[..usize::try_from(cut).unwrap()].to_vec();
                if garbage {
                    bytes.extend_from_slice(&[0xA5; 40]);
                }
                std::fs::write(&file, &bytes).unwrap();
                for f in std::fs::read_dir(&at).unwrap() {
                    let p = f.unwrap().path();
                    if p.to_string_lossy().contains(".torn-") {
                        std::fs::remove_file(p).unwrap();
                    }
                }
                // The entries that reached the file whole are there; none after.
                let (kept, kept_end) = *ends.iter().rev().find(|(_, e)| *e <= cut).unwrap();
                let log = FileLog::open(&at, None).unwrap();
                assert_eq!(
                    all(&log),
                    expect(1, kept),
                    "cut at {cut}, garbage {garbage}"
                );
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                let aside = at.join(format!("{name}.torn-{kept_end}"));
                assert_eq!(
                    aside.exists(),
                    cut > kept_end || garbage,
                    "cut at {cut}, garbage {garbage}"
                );
                if aside.exists() {
                    assert_eq!(
                        std::fs::read(&aside).unwrap(),
                        bytes[usize::try_from(kept_end).unwrap()..]
                    );
                }
                append(&log, kept + 1, kept + 1);
                drop(log);
                let log = FileLog::open(&at, None).unwrap();
                assert_eq!(
                    all(&log),
                    expect(1, kept + 1),
                    "cut at {cut}, garbage {garbage}"
                );
            }
        }
    }

    #[test]
    fn a_damaged_frame_ends_what_readers_see_of_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open_sized(&at, None, 2048).unwrap();
        for g in 0..10 {
            append(&log, g * 10 + 1, g * 10 + 10);
        }
        let first = segments(&at).remove(0);
        drop(log);
        // One bit of the first segment's third frame, in place.
        let mut bytes = std::fs::read(&first).unwrap();
        let third = MAGIC.len() + 2 * (HEADER + 2 + 20) + value(1).len() + value(2).len();
        bytes[third + HEADER + 5] ^= 1;
        std::fs::write(&first, bytes).unwrap();
        let log = FileLog::open_sized(&at, None, 2048).unwrap();
        let seen: Vec<String> = all(&log).into_iter().map(|(k, _)| k).collect();
        assert!(seen.contains(&key(2)));
        assert!(!seen.contains(&key(3)), "the damaged entry is not read");
        assert!(seen.contains(&key(100)), "later segments still are");
    }

    #[test]
    fn a_floor_hides_entries_and_deletes_whole_segments_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open_sized(&at, None, 2048).unwrap();
        for g in 0..20 {
            append(&log, g * 10 + 1, g * 10 + 10);
        }
        let before = segments(&at).len();
        log.set_floor(&key(150));
        assert_eq!(all(&log), expect(151, 200));
        assert_eq!(log.first_key().unwrap(), Some(key(151)));
        let after = segments(&at).len();
        assert!(after < before, "{before} -> {after}");
        // The floor is the store's to keep: reopened with it, the same.
        drop(log);
        let log = FileLog::open_sized(&at, Some(key(150)), 2048).unwrap();
        assert_eq!(all(&log), expect(151, 200));
        // Everything below: the last entry too, and appending goes on.
        log.set_floor(&key(200));
        assert!(all(&log).is_empty());
        assert_eq!(log.view().last(), None);
        append(&log, 201, 202);
        assert_eq!(all(&log), expect(201, 202));
    }

    #[test]
    fn a_directory_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        drop(FileLog::open(&at, None).unwrap());
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            FileLog::open(&at, None),
            Err(StoreError::TooOpen { .. })
        ));
    }

    /// A crash between making a new segment file and writing its header leaves it empty
    /// or with part of its header: it is removed, and appending goes on after the entries
    /// of the segment before it.
    #[test]
    fn a_segment_started_but_not_written_is_removed() {
        for partial in [&b""[..], &MAGIC[..3], &[0u8; 5][..]] {
            let dir = tempfile::tempdir().unwrap();
            let at = dir.path().join("kms.redb.audit");
            let log = FileLog::open(&at, None).unwrap();
            append(&log, 1, 5);
            drop(log);
            std::fs::write(segment_path(&at, 2), partial).unwrap();
            let log = FileLog::open(&at, None).unwrap();
            assert!(!segment_path(&at, 2).exists());
            assert_eq!(log.view().last(), Some((key(5), value(5))));
            append(&log, 6, 6);
            assert_eq!(all(&log), expect(1, 6));
        }
    }

    #[test]
    fn a_file_that_is_not_a_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        drop(FileLog::open(&at, None).unwrap());
        std::fs::write(segment_path(&at, 1), b"not a log segment").unwrap();
        let err = FileLog::open(&at, None).unwrap_err().to_string();
        assert!(err.contains("is not a kms log segment"), "{err}");
    }
}
