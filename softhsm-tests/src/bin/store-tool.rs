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

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use redb::ReadableDatabase;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
