//! The embedded store's append-only files for its log tables ([`Table::log`]: the audit
//! log).
//!
//! A log table's appends are frames written at the end of a segment file and made durable
//! with one `fdatasync`: no B-tree, no page copies, each entry written once. The files live
//! in the directory `STORE.TABLE` beside the redb file (`kms.redb.audit/`), are named by a
//! counter (`00000000000000000001.log`, ...: exactly 20 digits), and start with [`MAGIC`].
//! A frame is
//!
//! ```text
//! u32 LE  length of what follows the checksum (2 + key length + value length)
//! u32 LE  CRC-32 of the length's 4 bytes and what follows the checksum
//! u16 LE  key length, then the key (UTF-8), then the value
//! ```
//!
//! A length and checksum of zero end a file's entries (the file is grown ahead of its
//! entries with zeros, so that an append rewrites blocks the file already has and its
//! `fdatasync` writes no metadata). Keys increase along the files.
//!
//! **A torn tail** (a crash inside an append, whose callers were never answered) is found
//! when the log opens: the last file is read up to its first frame that does not check.
//! When no whole frame follows anywhere after it, what follows is the torn append: unless
//! all zeros, it is copied aside to `NNN.log.torn-OFFSET-N` (a new name each time; kept
//! for inspection, never deleted) and cut off. When a whole frame does follow, the file
//! was damaged, not torn: the log refuses to open ([`StoreError::LogDamaged`]) and cuts
//! nothing. A damaged frame in a sealed segment, or inside a file's durable part later,
//! is refused the same way when it is read: nothing is skipped silently.
//!
//! **A failed append** (a full disk) is cut off again before the error returns, so the
//! next append (once the disk has room) follows the last durable frame. A failed
//! `fdatasync`, or a cut that fails, stops every later append until the store is opened
//! again (what the disk holds after a failed sync is not known: fail closed).
//!
//! Entries are removed only from the start ([`FileLog::set_floor`]): a floor key at or
//! below which readers see nothing, kept by the store in its redb file (so it commits with
//! the record of the removal); segment files whose every entry is at or below it (read
//! whole and checked) are deleted. Readers hold each segment's open file, so a segment
//! deleted while they read it stays readable to them.

use std::fs::File;
use std::io::Read;
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

fn damaged(path: &Path, offset: u64, what: &'static str) -> StoreError {
    tracing::error!(file = %path.display(), offset, what, "a log segment is damaged");
    StoreError::LogDamaged {
        path: path.to_owned(),
        offset,
        what,
    }
}

/// One frame's bytes.
fn frame(key: &str, value: &[u8], out: &mut Vec<u8>) -> Result<(), StoreError> {
    let too_long = || StoreError::Settings("an entry too long for a log table".into());
    let klen = u16::try_from(key.len()).map_err(|_| too_long())?;
    let len = 2 + key.len() + value.len();
    if len > MAX_FRAME {
        return Err(too_long());
    }
    let len32 = u32::try_from(len).map_err(|_| too_long())?;
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
    /// The end of the entries (a zero header, or the end of what is read).
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

/// The longest frame [`holds_a_frame`] looks for: records are far shorter, and a bound
/// keeps the search cheap whatever the bytes.
const SEARCHED_FRAME: usize = 64 * 1024;

/// Whether `bytes` hold a whole frame that checks, of up to [`SEARCHED_FRAME`] bytes,
/// starting at any offset.
fn holds_a_frame(bytes: &[u8]) -> bool {
    (0..bytes.len()).any(|at| {
        let Some(&[l0, l1, l2, l3, c0, c1, c2, c3]) = bytes.get(at..at + HEADER) else {
            return false;
        };
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        if !(2..=SEARCHED_FRAME).contains(&len) {
            return false;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            return false;
        };
        let mut check = crc32fast::Hasher::new();
        check.update(&[l0, l1, l2, l3]);
        check.update(payload);
        check.finalize() == u32::from_le_bytes([c0, c1, c2, c3])
    })
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

/// Reads a file from `pos` to `end` with positional reads: one open file serves every
/// reader at once.
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let Some(buf) = buf.get_mut(..left.min(buf.len())).filter(|b| !b.is_empty()) else {
            return Ok(0);
        };
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A buffered reader of `file` from `pos` to `end`.
fn reader(file: &File, pos: u64, end: u64) -> std::io::BufReader<At<'_>> {
    std::io::BufReader::with_capacity(64 * 1024, At { file, pos, end })
}

/// One segment file, as readers see it.
#[derive(Clone)]
struct Segment {
    number: u64,
    path: PathBuf,
    /// The file, open for reading (it stays readable once deleted).
    file: Arc<File>,
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
    fn new(number: u64, path: PathBuf, file: File, first: Option<String>, len: u64) -> Self {
        Self {
            number,
            path,
            file: Arc::new(file),
            first,
            len,
            index: Arc::new(Mutex::new(Index {
                scanned: MAGIC.len() as u64,
                ..Index::default()
            })),
        }
    }

    /// The offset of a frame at or before the first with a key `>= start`, within this
    /// view's durable length (extending the shared index up to it first).
    fn seek(&self, start: &str) -> Result<u64, StoreError> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if index.scanned < self.len {
            let mut r = reader(&self.file, index.scanned, self.len);
            while index.scanned < self.len {
                let Read1::Entry(key, _, n) =
                    read_frame(&mut r).map_err(|e| io_error("read the log", e))?
                else {
                    return Err(damaged(
                        &self.path,
                        index.scanned,
                        "a record does not check",
                    ));
                };
                if index.frames.is_multiple_of(INDEX_EVERY) {
                    let at = index.scanned;
                    index.marks.push((key, at));
                }
                index.frames += 1;
                index.scanned += n;
            }
        }
        // Marks another view (a later one) put past this view's length are not used.
        let within = index.marks.partition_point(|(_, at)| *at < self.len);
        let marks = index.marks.get(..within).unwrap_or_default();
        let after = marks.partition_point(|(k, _)| k.as_str() <= start);
        Ok(after
            .checked_sub(1)
            .and_then(|i| marks.get(i))
            .map_or(MAGIC.len() as u64, |m| m.1))
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
    pub(super) fn last(&self) -> Option<Entry> {
        self.last
            .clone()
            .filter(|(k, _)| self.floor.as_deref().is_none_or(|f| k.as_str() > f))
    }

    /// Calls `each` with every entry with a key `>= start` (and above the floor), in key
    /// order, until it returns false. A frame that does not check inside a segment's
    /// durable part is an error ([`StoreError::LogDamaged`]), never skipped.
    pub(super) fn each_from(
        &self,
        start: &str,
        mut each: impl FnMut(String, Vec<u8>) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let op = "read the log";
        let floor = self.floor.as_deref();
        // Nothing at or below the floor is read.
        let start = match floor {
            Some(f) if f >= start => format!("{f}\0"),
            _ => start.to_owned(),
        };
        let start = start.as_str();
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
            let mut at = segment.seek(start)?;
            let mut r = reader(&segment.file, at, segment.len);
            while at < segment.len {
                let Read1::Entry(key, value, n) =
                    read_frame(&mut r).map_err(|e| io_error(op, e))?
                else {
                    return Err(damaged(&segment.path, at, "a record does not check"));
                };
                at += n;
                if key.as_str() < start {
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
    pub(super) fn range(&self, start: &str, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if limit > 0 {
            self.each_from(start, |k, v| {
                out.push((k, v));
                Ok(out.len() < limit)
            })?;
        }
        Ok(out)
    }

    /// The first entry's key.
    pub(super) fn first_key(&self) -> Result<Option<String>, StoreError> {
        Ok(self.range("", 1)?.into_iter().next().map(|(k, _)| k))
    }

    /// Whether it has a segment file (the table has been appended to).
    pub(super) fn has_files(&self) -> bool {
        !self.segments.is_empty()
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
    /// An append failed and could not be cut off, or a sync failed: nothing more is
    /// appended, to the files or (the store checks) anywhere else in the table.
    broken: bool,
}

impl Appender {
    /// Refuses when an earlier append left the log in a state only a restart clears.
    pub(super) fn usable(&self) -> Result<(), StoreError> {
        if self.broken {
            return Err(StoreError::Settings(
                "an earlier write to the audit log's files failed and could not be undone: restart the server (docs/audit.md)"
                    .into(),
            ));
        }
        Ok(())
    }
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

/// The number of a segment file's name: exactly 20 digits and `.log`.
fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
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
            if let Some(n) = segment_number(&name) {
                numbers.push(n);
            } else if name.ends_with(".log") {
                return Err(damaged(
                    &dir.join(name.as_ref()),
                    0,
                    "a file named like a segment that is not one of kms's names",
                ));
            }
        }
        numbers.sort_unstable();
        // A crash while a segment was being started can leave the newest file with no
        // more than its header (or part of it, or zeros), and so without an entry: it is
        // removed.
        if let Some(&n) = numbers.last() {
            let path = segment_path(dir, n);
            let mut head = [0u8; MAGIC.len() + 1];
            let got = read_full(&mut File::open(&path).map_err(err)?, &mut head).map_err(err)?;
            let head = head.get(..got).unwrap_or_default();
            if head.len() <= MAGIC.len()
                && (MAGIC.starts_with(head) || head.iter().all(|&b| b == 0))
            {
                std::fs::remove_file(&path).map_err(err)?;
                sync_dir(dir).map_err(err)?;
                numbers.pop();
            }
        }
        let mut segments = Vec::new();
        let count = numbers.len();
        for (i, &n) in numbers.iter().enumerate() {
            let path = segment_path(dir, n);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(i + 1 == count)
                .open(&path)
                .map_err(err)?;
            let len = file.metadata().map_err(err)?.len();
            let mut magic = [0u8; MAGIC.len()];
            if read_full(&mut reader(&file, 0, len), &mut magic).map_err(err)? < MAGIC.len()
                || &magic != MAGIC
            {
                return Err(damaged(&path, 0, "not a kms log segment"));
            }
            let first =
                match read_frame(&mut reader(&file, MAGIC.len() as u64, len)).map_err(err)? {
                    Read1::Entry(k, _, _) => Some(k),
                    Read1::End => None,
                    Read1::Damaged if i + 1 == count => None,
                    Read1::Damaged => {
                        return Err(damaged(
                            &path,
                            MAGIC.len() as u64,
                            "a record does not check",
                        ));
                    }
                };
            segments.push(Segment::new(n, path, file, first, len));
        }
        // Keys increase along the files.
        let firsts: Vec<&str> = segments.iter().filter_map(|s| s.first.as_deref()).collect();
        if firsts.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
            return Err(damaged(dir, 0, "the segments' first keys do not increase"));
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
            let (end, entry) = recover_tail(&file, &tail.path, segment_bytes)?;
            if tail.first.is_none() && entry.is_some() {
                return Err(damaged(
                    &tail.path,
                    MAGIC.len() as u64,
                    "a record does not check",
                ));
            }
            tail.len = end;
            last = entry;
            appender.len = end;
            appender.allocated = file.metadata().map_err(err)?.len();
            appender.file = Some(file);
        }
        // Sealed segments end with their last entry: read whole, found where the last
        // entry is when the newest segment has none.
        for segment in segments.iter().rev().skip(1) {
            if last.is_some() {
                break;
            }
            let (end, entry) = scan_end(&segment.file, segment.len).map_err(err)?;
            if end != segment.len {
                return Err(damaged(&segment.path, end, "a record does not check"));
            }
            last = entry;
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
            log.set_floor(&floor)?;
        }
        Ok(log)
    }

    /// What readers see now (a snapshot: appends after it are not in it).
    pub(super) fn view(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the appending end: held across an append's read of the last entry and its
    /// write, so that appends follow one another (and by a reader that also reads the
    /// redb file, so that it sees both as of one moment).
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
        appender.usable()?;
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
            file.write_all_at(&bytes, at)
        })();
        // A failed write (a full disk) is cut off again, so that the next append follows
        // the last durable entry. A failed sync is not retried: after it, what the disk
        // holds is not known (the kernel may have dropped the pages), so nothing more is
        // appended until the store is opened again and reads the disk.
        let synced =
            written.and_then(|()| file.sync_data().inspect_err(|_| appender.broken = true));
        if let Err(e) = synced {
            let cut = file.set_len(at).and_then(|()| file.sync_all());
            appender.allocated = at;
            if cut.is_err() {
                appender.broken = true;
            }
            if appender.broken {
                tracing::error!(
                    dir = %self.dir.display(),
                    "a failed write to the log could not be undone for certain: no more appends until the server restarts"
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
        if let Some(old) = appender.file.as_ref() {
            old.set_len(appender.len)?;
            old.sync_all()?;
        }
        let number = appender
            .number
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("no segment number left"))?;
        let path = segment_path(&self.dir, number);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let made = file
            .write_all_at(MAGIC, 0)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = made {
            // Not left behind to block the next try (it holds no entry).
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let reading = file.try_clone()?;
        appender.file = Some(file);
        appender.number = number;
        appender.len = MAGIC.len() as u64;
        appender.allocated = MAGIC.len() as u64;
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        view.segments.retain(|s| s.first.is_some());
        view.segments.push(Segment::new(
            number,
            path,
            reading,
            None,
            MAGIC.len() as u64,
        ));
        Ok(())
    }

    /// Entries with keys up to `floor` are removed: readers no longer see them, and
    /// segment files holding only such entries (each read whole and checked first) are
    /// deleted, never the one appended to. A floor never goes down.
    pub(super) fn set_floor(&self, floor: &str) -> Result<(), StoreError> {
        let view = {
            let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
            if view.floor.as_deref().is_some_and(|f| f >= floor) {
                return Ok(());
            }
            view.floor = Some(floor.to_owned());
            view.clone()
        };
        let count = view.segments.len();
        let mut gone = Vec::new();
        for segment in view.segments.iter().take(count.saturating_sub(1)) {
            let (end, last) = scan_end(&segment.file, segment.len)
                .map_err(|e| io_error("remove from the log", e))?;
            if end != segment.len {
                return Err(damaged(&segment.path, end, "a record does not check"));
            }
            match last {
                Some((key, _)) if key.as_str() <= floor => gone.push(segment.number),
                // Keys increase: no later segment is wholly below the floor.
                _ => break,
            }
        }
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        let (removed, kept): (Vec<Segment>, Vec<Segment>) = std::mem::take(&mut view.segments)
            .into_iter()
            .partition(|s| gone.contains(&s.number));
        view.segments = kept;
        drop(view);
        for s in removed {
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(file = %s.path.display(), error = %e, "an archived log segment could not be deleted");
            }
        }
        Ok(())
    }
}

/// Reads `file` from its first frame to `len`: the offset where its entries end (before
/// the first frame that does not check, or a zero header), and its last entry.
fn scan_end(file: &File, len: u64) -> std::io::Result<(u64, Option<Entry>)> {
    let mut r = reader(file, MAGIC.len() as u64, len);
    let mut end = MAGIC.len() as u64;
    let mut last = None;
    while let Read1::Entry(k, v, n) = read_frame(&mut r)? {
        end += n;
        last = Some((k, v));
    }
    Ok((end, last))
}

/// Finds where the last segment's entries end. What follows, unless all zeros, is either
/// a torn append (no whole frame anywhere in it: copied aside under a new name and cut
/// off) or damage (a whole frame follows: refused, nothing cut). The end and the last
/// entry.
fn recover_tail(
    file: &File,
    path: &Path,
    segment_bytes: u64,
) -> Result<(u64, Option<Entry>), StoreError> {
    let op = "open the log";
    let err = |e| io_error(op, e);
    let len = file.metadata().map_err(err)?.len();
    let (end, last) = scan_end(file, len).map_err(err)?;
    // What one segment and one append can make the file: anything longer is not a tail.
    let bound = segment_bytes + GROW_BYTES + (HEADER + MAX_FRAME) as u64;
    if len - end > bound {
        return Err(damaged(
            path,
            end,
            "more bytes after the last record than one append writes",
        ));
    }
    let mut rest = Vec::new();
    reader(file, end, len).read_to_end(&mut rest).map_err(err)?;
    if rest.iter().all(|&b| b == 0) {
        return Ok((end, last));
    }
    if holds_a_frame(rest.get(1..).unwrap_or_default()) {
        return Err(damaged(
            path,
            end,
            "a record does not check and whole records follow it (not a torn write)",
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let (aside, mut copy) = (1..=1000)
        .map(|n| dir.join(format!("{name}.torn-{end}-{n}")))
        .find_map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .ok()
                .map(|f| (p, f))
        })
        .ok_or_else(|| err(std::io::Error::other("no name for the torn tail's copy")))?;
    std::io::Write::write_all(&mut copy, &rest).map_err(err)?;
    copy.sync_all().map_err(err)?;
    sync_dir(dir).map_err(err)?;
    file.set_len(end).map_err(err)?;
    file.sync_all().map_err(err)?;
    tracing::warn!(
        file = %path.display(),
        offset = end,
        bytes = rest.len(),
        aside = %aside.display(),
        "the audit log's last segment ended in an incomplete append (a crash while writing it; never acknowledged): cut off and kept aside"
    );
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
                let aside = at.join(format!("{name}.torn-{kept_end}-1"));
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

    /// One flipped bit in a sealed segment: reading it is refused where the damage is,
    /// never skipped; the open itself does not look (it reads only the newest segment).
    #[test]
    fn a_damaged_record_in_a_sealed_segment_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open_sized(&at, None, 2048).unwrap();
        for g in 0..10 {
            append(&log, g * 10 + 1, g * 10 + 10);
        }
        let first = segments(&at).remove(0);
        drop(log);
        let mut bytes = std::fs::read(&first).unwrap();
        let third = MAGIC.len() + 2 * (HEADER + 2 + 20) + value(1).len() + value(2).len();
        bytes[third + HEADER + 5] ^= 1;
        std::fs::write(&first, bytes).unwrap();
        let log = FileLog::open_sized(&at, None, 2048).unwrap();
        let err = log.view().range("", usize::MAX).unwrap_err();
        assert!(
            matches!(&err, StoreError::LogDamaged { path, offset, .. } if *path == first && *offset == third as u64),
            "{err:?}"
        );
        // Past the damaged segment, the rest still reads.
        let later = log.view().range(&key(95), 100).unwrap();
        assert_eq!(later, expect(95, 100));
    }

    /// One flipped bit in the middle of the newest segment is damage, not a torn write:
    /// whole records follow it. The log refuses to open and cuts nothing.
    #[test]
    fn damage_before_whole_records_in_the_newest_segment_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open(&at, None).unwrap();
        for g in 0..10 {
            append(&log, g * 10 + 1, g * 10 + 10);
        }
        drop(log);
        let file = segments(&at).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[MAGIC.len() + 300] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let err = FileLog::open(&at, None).unwrap_err();
        assert!(matches!(err, StoreError::LogDamaged { .. }), "{err:?}");
        assert!(err.to_string().contains("whole records follow"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "nothing cut");
        assert_eq!(segments(&at).len(), 1);
        assert!(
            std::fs::read_dir(&at).unwrap().all(|e| !e
                .unwrap()
                .path()
                .to_string_lossy()
                .contains(".torn-"))
        );
    }

    /// A torn tail cut twice at the same place keeps both copies.
    #[test]
    fn a_torn_tail_copy_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kms.redb.audit");
        let log = FileLog::open(&at, None).unwrap();
        append(&log, 1, 3);
        let end = log.lock().len;
        drop(log);
        let file = segments(&at).pop().unwrap();
        let whole = std::fs::read(&file).unwrap()[..usize::try_from(end).unwrap()].to_vec();
        for (n, junk) in [[0x11u8; 20], [0x22u8; 20]].iter().enumerate() {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(junk);
            std::fs::write(&file, &bytes).unwrap();
            drop(FileLog::open(&at, None).unwrap());
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            let aside = at.join(format!("{name}.torn-{end}-{}", n + 1));
            assert_eq!(std::fs::read(&aside).unwrap(), junk.to_vec());
        }
    }

    #[test]
    fn names_that_are_not_segment_names_are_refused() {
        for name in [
            "1.log",
            "+0000000000000000001.log",
            "0000000000000000000001.log",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let at = dir.path().join("kms.redb.audit");
            let log = FileLog::open(&at, None).unwrap();
            append(&log, 1, 3);
            drop(log);
            std::fs::copy(segment_path(&at, 1), at.join(name)).unwrap();
            let err = FileLog::open(&at, None).unwrap_err();
            assert!(
                matches!(err, StoreError::LogDamaged { .. }),
                "{name}: {err:?}"
            );
        }
        assert_eq!(segment_number("00000000000000000007.log"), Some(7));
        assert_eq!(segment_number("0000000000000000007.log"), None);
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
        log.set_floor(&key(150)).unwrap();
        assert_eq!(all(&log), expect(151, 200));
        assert_eq!(log.view().first_key().unwrap(), Some(key(151)));
        let after = segments(&at).len();
        assert!(after < before, "{before} -> {after}");
        // The floor is the store's to keep: reopened with it, the same.
        drop(log);
        let log = FileLog::open_sized(&at, Some(key(150)), 2048).unwrap();
        assert_eq!(all(&log), expect(151, 200));
        // Everything below: the last entry too, and appending goes on.
        log.set_floor(&key(200)).unwrap();
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
        assert!(err.contains("not a kms log segment"), "{err}");
    }
}
