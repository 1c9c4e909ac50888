//! Test helper: edits the kms store offline, as someone with write access to the disk
//! could, through redb directly.
//!
//! ```text
//! store-tool replace STORE TABLE KEY FROM TO   replace the first occurrence of the bytes
//!                                              of FROM with those of TO in one stored value
//!                                              (it must occur; the value may be JSON or
//!                                              binary, as audit records are)
//! store-tool get STORE TABLE KEY               print one stored value
//! store-tool put STORE TABLE KEY FILE          store FILE's bytes as one value
//! store-tool delete STORE TABLE KEY            remove one entry
//! ```
//!
//! `replace` and `get` also find entries of the audit table that the store keeps in its
//! append-only files (`STORE.audit/*.log`, the frame format in kms's `store/log.rs`), and
//! `replace` rewrites such a frame in place with a valid checksum, as someone who knows the
//! format could.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use redb::ReadableDatabase;

/// The frames of the log files of `table` beside `store`: (file, frame offset, key, value).
fn log_frames(store: &str, table: &str) -> Vec<(std::path::PathBuf, usize, String, Vec<u8>)> {
    let dir = std::path::PathBuf::from(format!("{store}.{table}"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let mut at = 8;
        while at + 8 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            if len == 0 || at + 8 + len > bytes.len() {
                break;
            }
            let payload = &bytes[at + 8..at + 8 + len];
            let klen = u16::from_le_bytes([payload[0], payload[1]]) as usize;
            let key = String::from_utf8(payload[2..2 + klen].to_vec()).unwrap();
            out.push((file.clone(), at, key, payload[2 + klen..].to_vec()));
            at += 8 + len;
        }
    }
    out
}

/// `replace` or `get` on an entry in the log files; false when none has the key.
fn in_log(args: &[String]) -> bool {
    let Some((file, at, key, value)) = log_frames(&args[1], &args[2])
        .into_iter()
        .find(|f| f.2 == args[3])
    else {
        return false;
    };
    if args[0] == "get" {
        std::io::Write::write_all(&mut std::io::stdout(), &value).unwrap();
        return true;
    }
    let (from, to) = (args[4].as_bytes(), args[5].as_bytes());
    assert_eq!(
        from.len(),
        to.len(),
        "in the log files, only a same-length replacement"
    );
    let pos = value
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} does not occur in the value", args[4]));
    let mut new = value.clone();
    new[pos..pos + to.len()].copy_from_slice(to);
    let mut payload = (key.len() as u16).to_le_bytes().to_vec();
    payload.extend_from_slice(key.as_bytes());
    payload.extend_from_slice(&new);
    let len = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&payload);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at + 4..at + 8].copy_from_slice(&crc.finalize().to_le_bytes());
    bytes[at + 8..at + 8 + payload.len()].copy_from_slice(&payload);
    std::fs::write(&file, bytes).unwrap();
    true
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let in_redb = |db: &redb::Database| {
        let table: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new(&args[2]);
        let txn = db.begin_read().unwrap();
        txn.open_table(table).ok().is_some_and(|t| {
            redb::ReadableTable::get(&t, args[3].as_str())
                .unwrap()
                .is_some()
        })
    };
    if matches!(args[0].as_str(), "get" | "replace") {
        let db = redb::Database::create(&args[1]).unwrap();
        let found = in_redb(&db);
        drop(db);
        if !found && in_log(&args) {
            return;
        }
    }
    let db = redb::Database::create(&args[1]).unwrap();
    let table: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new(&args[2]);
    match args[0].as_str() {
        "get" => {
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(table).unwrap();
            let v = redb::ReadableTable::get(&t, args[3].as_str())
                .unwrap()
                .expect("no such key");
            std::io::Write::write_all(&mut std::io::stdout(), v.value()).unwrap();
            return;
        }
        "put" => {
            let bytes = std::fs::read(&args[4]).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(table).unwrap();
                t.insert(args[3].as_str(), bytes.as_slice()).unwrap();
            }
            txn.commit().unwrap();
            return;
        }
        "delete" => {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(table).unwrap();
                assert!(t.remove(args[3].as_str()).unwrap().is_some(), "no such key");
            }
            txn.commit().unwrap();
            return;
        }
        _ => {}
    }
    assert_eq!(args.len(), 6, "store-tool replace STORE TABLE KEY FROM TO");
    assert_eq!(args[0], "replace");
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(table).unwrap();
        let old = {
            let v = redb::ReadableTable::get(&t, args[3].as_str())
                .unwrap()
                .expect("no such key");
            v.value().to_vec()
        };
        let (from, to) = (args[4].as_bytes(), args[5].as_bytes());
        let at = old
            .windows(from.len())
            .position(|w| w == from)
            .unwrap_or_else(|| panic!("{:?} does not occur in the value", args[4]));
        let mut new = old[..at].to_vec();
        new.extend_from_slice(to);
        new.extend_from_slice(&old[at + from.len()..]);
        t.insert(args[3].as_str(), new.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}
