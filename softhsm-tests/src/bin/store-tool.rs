//! Test helper: edits the kms store offline, as someone with write access to the disk
//! could. `store-tool replace STORE TABLE KEY FROM TO` replaces the text FROM with TO in one
//! stored value (it must occur), through redb directly.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    assert_eq!(args.len(), 6, "store-tool replace STORE TABLE KEY FROM TO");
    assert_eq!(args[0], "replace");
    let db = redb::Database::create(&args[1]).unwrap();
    let table: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new(&args[2]);
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(table).unwrap();
        let old = {
            let v = redb::ReadableTable::get(&t, args[3].as_str())
                .unwrap()
                .expect("no such key");
            String::from_utf8(v.value().to_vec()).unwrap()
        };
        assert!(
            old.contains(&args[4]),
            "{:?} does not occur in the value",
            args[4]
        );
        let new = old.replacen(&args[4], &args[5], 1);
        t.insert(args[3].as_str(), new.as_bytes()).unwrap();
    }
    txn.commit().unwrap();
}
