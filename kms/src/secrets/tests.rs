//! The engine against a real redb store, its changes committed without an audit log.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::Arc;

use super::model::Values;
use super::{
    Committed, ConfigUpdate, DEFAULT_MAX_SECRET_BYTES, GRANTS, Journal, METADATA, MetadataUpdate,
    NewSecretGrant, Patch, Secrets, SecretsError, Settings, VALUES, path,
};
use crate::barrier::Barrier;
use crate::policy::SecretOperation;
use crate::store::{Change, RedbStore, Removal, Store, Table, Write};

struct Direct(Arc<dyn Store>);

impl Journal for Direct {
    fn commit(
        &self,
        _: Committed<'_>,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<(), SecretsError> {
        self.0.write_all_removing(&writes, &removals)?;
        Ok(())
    }
}

/// A journal whose commits fail, as when the audit log is unavailable.
struct Failing;

impl Journal for Failing {
    fn commit(&self, _: Committed<'_>, _: Vec<Write>, _: Vec<Removal>) -> Result<(), SecretsError> {
        Err(SecretsError::AuditUnavailable)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    barrier: Arc<Barrier>,
    engine: Secrets,
    journal: Direct,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("kms.redb")).unwrap());
    let mut root = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(root.as_mut_slice()).unwrap();
    let barrier = Arc::new(Barrier::new(root));
    let engine = Secrets::open(
        Arc::clone(&barrier),
        Arc::clone(&store),
        Settings::default(),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        journal: Direct(Arc::clone(&store)),
        store,
        barrier,
        engine,
    }
}

fn values(pairs: &[(&str, &str)]) -> Values {
    Values(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn read(f: &Fixture, path: &str, version: u64) -> BTreeMap<String, String> {
    let (_, v) = f.engine.read(path, version).unwrap().into_values().unwrap();
    v.0.clone()
}

#[test]
fn versions_are_written_read_and_numbered() {
    let f = fixture();
    let w1 = f
        .engine
        .write(&f.journal, "a/b", values(&[("k", "v1")]), None)
        .unwrap();
    let w2 = f
        .engine
        .write(&f.journal, "a/b", values(&[("k", "v2")]), None)
        .unwrap();
    assert_eq!((w1.version, w2.version), (1, 2));
    assert_eq!(read(&f, "a/b", 0)["k"], "v2");
    assert_eq!(read(&f, "a/b", 1)["k"], "v1");
    let meta = f.engine.read_metadata("a/b").unwrap();
    assert_eq!((meta.current, meta.oldest()), (2, 1));
    assert!(matches!(
        f.engine.read("a/b", 3),
        Err(SecretsError::VersionNotFound(3))
    ));
    assert!(matches!(
        f.engine.read("a/c", 0),
        Err(SecretsError::NotFound)
    ));
    assert!(matches!(
        f.engine.read("a//c", 0),
        Err(SecretsError::BadPath(_))
    ));
}

#[test]
fn check_and_set_writes_only_over_the_version_named() {
    let f = fixture();
    let e = &f.engine;
    e.write(&f.journal, "p", values(&[("k", "1")]), Some(0))
        .unwrap();
    // 0: only when absent.
    assert!(matches!(
        e.write(&f.journal, "p", values(&[("k", "x")]), Some(0)),
        Err(SecretsError::CasMismatch { current: 1 })
    ));
    assert!(matches!(
        e.write(&f.journal, "p", values(&[("k", "x")]), Some(2)),
        Err(SecretsError::CasMismatch { current: 1 })
    ));
    e.write(&f.journal, "p", values(&[("k", "2")]), Some(1))
        .unwrap();
    assert_eq!(read(&f, "p", 0)["k"], "2");
    // 0 again once every version is deleted or destroyed.
    e.delete(&f.journal, "p", &[2]).unwrap();
    e.destroy(&f.journal, "p", &[1]).unwrap();
    let w = e
        .write(&f.journal, "p", values(&[("k", "3")]), Some(0))
        .unwrap();
    assert_eq!(w.version, 3);
    // cas_required on the secret, then on the engine.
    e.update_metadata(
        &f.journal,
        "p",
        MetadataUpdate {
            cas_required: Some(true),
            ..MetadataUpdate::default()
        },
        true,
    )
    .unwrap();
    assert!(matches!(
        e.write(&f.journal, "p", values(&[("k", "x")]), None),
        Err(SecretsError::CasRequired)
    ));
    e.update_config(
        &f.journal,
        ConfigUpdate {
            cas_required: Some(true),
            ..ConfigUpdate::default()
        },
    )
    .unwrap();
    assert!(matches!(
        e.write(&f.journal, "q", values(&[("k", "x")]), None),
        Err(SecretsError::CasRequired)
    ));
    // Nothing was written by the refusals.
    assert_eq!(e.read_metadata("p").unwrap().current, 3);
    assert!(matches!(e.read_metadata("q"), Err(SecretsError::NotFound)));
}

#[test]
fn delete_undelete_and_destroy_keep_metadata_right() {
    let f = fixture();
    let e = &f.engine;
    for i in 1..=3 {
        e.write(&f.journal, "s", values(&[("k", &i.to_string())]), None)
            .unwrap();
    }
    // Deleting the latest: it reads as deleted, with its metadata.
    e.delete(&f.journal, "s", &[]).unwrap();
    let r = e.read("s", 0).unwrap();
    assert_eq!(r.version, 3);
    assert!(r.values.is_none() && r.info.deletion_ms.is_some() && !r.info.destroyed);
    assert!(matches!(
        r.into_values(),
        Err(SecretsError::VersionDeleted(3))
    ));
    e.undelete(&f.journal, "s", &[3]).unwrap();
    assert_eq!(read(&f, "s", 0)["k"], "3");
    // Destroying: the values are gone from the store; the metadata keeps the version.
    e.destroy(&f.journal, "s", &[2]).unwrap();
    assert!(
        f.store
            .get(VALUES, &path::value_key("s", 2))
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        e.read("s", 2).unwrap().into_values(),
        Err(SecretsError::VersionDestroyed(2))
    ));
    // Undeleting a destroyed version leaves it destroyed.
    e.undelete(&f.journal, "s", &[2]).unwrap();
    assert!(e.read("s", 2).unwrap().info.destroyed);
    let meta = e.read_metadata("s").unwrap();
    assert_eq!(
        (meta.current, meta.oldest(), meta.versions.len()),
        (3, 1, 3)
    );
    // A version that does not exist is refused, and nothing changes.
    assert!(matches!(
        e.delete(&f.journal, "s", &[1, 9]),
        Err(SecretsError::VersionNotFound(9))
    ));
    assert!(e.read("s", 1).unwrap().values.is_some());
    assert!(matches!(
        e.destroy(&f.journal, "s", &[0]),
        Err(SecretsError::VersionNotFound(0))
    ));
    // Deleting everything: metadata and values gone, the path free again.
    e.delete_all(&f.journal, "s").unwrap();
    assert!(matches!(e.read_metadata("s"), Err(SecretsError::NotFound)));
    for v in 1..=3 {
        assert!(
            f.store
                .get(VALUES, &path::value_key("s", v))
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(
        e.write(&f.journal, "s", values(&[("k", "x")]), Some(0))
            .unwrap()
            .version,
        1
    );
}

#[test]
fn old_versions_are_dropped_past_max_versions() {
    let f = fixture();
    let e = &f.engine;
    e.update_metadata(
        &f.journal,
        "m",
        MetadataUpdate {
            max_versions: Some(2),
            ..MetadataUpdate::default()
        },
        true,
    )
    .unwrap();
    for i in 1..=4 {
        e.write(&f.journal, "m", values(&[("k", &i.to_string())]), None)
            .unwrap();
    }
    let meta = e.read_metadata("m").unwrap();
    assert_eq!((meta.current, meta.oldest()), (4, 3));
    assert!(
        f.store
            .get(VALUES, &path::value_key("m", 2))
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        e.read("m", 1),
        Err(SecretsError::VersionNotFound(1))
    ));
    // Lowering max_versions drops the extra versions at once, for a caller who may destroy
    // them; for another, it is refused and changes nothing.
    let lower = |may_drop| MetadataUpdate {
        max_versions: Some(1),
        may_drop,
        ..MetadataUpdate::default()
    };
    assert!(matches!(
        e.update_metadata(&f.journal, "m", lower(false), false),
        Err(SecretsError::DropNeedsDestroy(1))
    ));
    assert_eq!(e.read_metadata("m").unwrap().versions.len(), 2);
    e.update_metadata(&f.journal, "m", lower(true), false)
        .unwrap();
    let meta = e.read_metadata("m").unwrap();
    assert_eq!(
        (meta.current, meta.oldest(), meta.versions.len()),
        (4, 4, 1)
    );
    assert!(
        f.store
            .get(VALUES, &path::value_key("m", 3))
            .unwrap()
            .is_none()
    );
    // The engine's default is 10, and 0 sets it back to 10.
    assert_eq!(e.config().unwrap().max_versions, 10);
    let c = e
        .update_config(
            &f.journal,
            ConfigUpdate {
                max_versions: Some(0),
                ..ConfigUpdate::default()
            },
        )
        .unwrap();
    assert_eq!(c.max_versions, 10);
    assert!(
        e.update_config(
            &f.journal,
            ConfigUpdate {
                max_versions: Some(1001),
                ..ConfigUpdate::default()
            }
        )
        .is_err()
    );
}

#[test]
fn patches_merge_into_the_current_version() {
    let f = fixture();
    let e = &f.engine;
    assert!(matches!(
        e.patch(&f.journal, "x", Patch::default(), None),
        Err(SecretsError::NotFound)
    ));
    e.write(&f.journal, "x", values(&[("a", "1"), ("b", "2")]), None)
        .unwrap();
    let w = e
        .patch(
            &f.journal,
            "x",
            Patch {
                set: values(&[("b", "3"), ("c", "4")]),
                remove: vec!["a".to_owned()],
            },
            Some(1),
        )
        .unwrap();
    assert_eq!(w.version, 2);
    let got = read(&f, "x", 0);
    assert_eq!(got.len(), 2);
    assert_eq!((got["b"].as_str(), got["c"].as_str()), ("3", "4"));
    assert!(matches!(
        e.patch(&f.journal, "x", Patch::default(), Some(1)),
        Err(SecretsError::CasMismatch { current: 2 })
    ));
    e.delete(&f.journal, "x", &[]).unwrap();
    assert!(matches!(
        e.patch(&f.journal, "x", Patch::default(), None),
        Err(SecretsError::NothingToPatch)
    ));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let f = fixture();
    let e = &f.engine;
    let big = "x".repeat(DEFAULT_MAX_SECRET_BYTES);
    assert!(matches!(
        e.write(&f.journal, "big", values(&[("k", &big)]), None),
        Err(SecretsError::TooLarge { .. })
    ));
    assert!(
        e.write(&f.journal, "bad path", values(&[("k", "v")]), None)
            .is_err()
    );
    assert!(e.write(&f.journal, "ok", values(&[]), None).is_err());
    let custom: BTreeMap<String, String> = [("owner\u{202e}".to_owned(), "x".to_owned())].into();
    assert!(
        e.update_metadata(
            &f.journal,
            "ok",
            MetadataUpdate {
                custom: Some(custom),
                ..MetadataUpdate::default()
            },
            true
        )
        .is_err()
    );
    // A failed commit (the audit log) leaves nothing behind.
    assert!(matches!(
        e.write(&Failing, "ok", values(&[("k", "v")]), None),
        Err(SecretsError::AuditUnavailable)
    ));
    assert!(f.store.scan(METADATA).unwrap().is_empty());
    assert!(f.store.scan(VALUES).unwrap().is_empty());
}

#[test]
fn a_version_moved_in_the_store_does_not_open() {
    let f = fixture();
    let e = &f.engine;
    e.write(&f.journal, "a", values(&[("k", "secret-a")]), None)
        .unwrap();
    e.write(&f.journal, "b", values(&[("k", "secret-b")]), None)
        .unwrap();
    e.write(&f.journal, "b", values(&[("k", "secret-b2")]), None)
        .unwrap();
    // a's values copied over b's version 1, and b's version 2 over its version 1.
    let a1 = f
        .store
        .get(VALUES, &path::value_key("a", 1))
        .unwrap()
        .unwrap();
    f.store.put(VALUES, &path::value_key("b", 1), &a1).unwrap();
    assert!(matches!(e.read("b", 1), Err(SecretsError::Tampered(_))));
    let b2 = f
        .store
        .get(VALUES, &path::value_key("b", 2))
        .unwrap()
        .unwrap();
    f.store.put(VALUES, &path::value_key("b", 1), &b2).unwrap();
    assert!(matches!(e.read("b", 1), Err(SecretsError::Tampered(_))));
    // Metadata moved to another path: refused too.
    let meta = f.store.get(METADATA, "a").unwrap().unwrap();
    f.store.put(METADATA, "c", &meta).unwrap();
    assert!(matches!(e.read("c", 0), Err(SecretsError::Tampered(_))));
    // Nothing stored holds a value in the clear.
    for table in [METADATA, VALUES] {
        for (_, v) in f.store.scan(table).unwrap() {
            assert!(!v.windows(8).any(|w| w == b"secret-a"));
        }
    }
}

#[test]
fn a_configuration_that_does_not_open_refuses_writes_until_set_again() {
    let f = fixture();
    let e = &f.engine;
    e.write(&f.journal, "a", values(&[("k", "v")]), None)
        .unwrap();
    f.store.put(super::CONFIG, "config", b"forged").unwrap();
    // Reads go on; writes are refused; setting the configuration again mends it.
    let opened = Secrets::open(
        Arc::clone(&f.barrier),
        Arc::clone(&f.store),
        Settings::default(),
    )
    .unwrap();
    assert!(opened.read("a", 0).unwrap().values.is_some());
    assert!(matches!(
        opened.write(&f.journal, "a", values(&[("k", "w")]), None),
        Err(SecretsError::Tampered(_))
    ));
    assert!(opened.config().is_err());
    // The defaults do not fill what the administrator does not give.
    assert!(matches!(
        opened.update_config(
            &f.journal,
            ConfigUpdate {
                cas_required: Some(false),
                ..ConfigUpdate::default()
            },
        ),
        Err(SecretsError::SettingsLost)
    ));
    let c = opened
        .update_config(
            &f.journal,
            ConfigUpdate {
                max_versions: Some(0),
                cas_required: Some(false),
                delete_version_after: Some(0),
            },
        )
        .unwrap();
    assert_eq!(c.max_versions, 10);
    opened
        .write(&f.journal, "a", values(&[("k", "w")]), None)
        .unwrap();
}

#[test]
fn listing_pages_through_names_and_folders() {
    let f = fixture();
    let e = &f.engine;
    for p in ["a", "a/x", "a/y/z", "a-b", "b", "c/d/e", "c/f"] {
        e.write(&f.journal, p, values(&[("k", "v")]), None).unwrap();
    }
    // Enough entries under one folder to span several reads.
    for i in 0..600 {
        e.write(
            &f.journal,
            &format!("big/{i:04}"),
            values(&[("k", "v")]),
            None,
        )
        .unwrap();
    }
    let all = e.list("", 1000, "").unwrap();
    assert_eq!(all.keys, ["a", "a-b", "a/", "b", "big/", "c/"]);
    assert_eq!(all.next, None);
    assert_eq!(e.list("a", 100, "").unwrap().keys, ["x", "y/"]);
    assert_eq!(e.list("c/", 100, "").unwrap().keys, ["d/", "f"]);
    assert!(e.list("nothing", 100, "").unwrap().keys.is_empty());
    // Pages of two, each after the last name of the one before.
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = e.list("", 2, &token).unwrap();
        pages.extend(page.keys.clone());
        match page.next {
            Some(t) => token = t,
            None => break,
        }
    }
    assert_eq!(pages, all.keys);
    let big = e.list("big", 1000, "").unwrap();
    assert_eq!(big.keys.len(), 600);
    assert_eq!(
        e.list("big", 10, "0595").unwrap().keys,
        ["0596", "0597", "0598", "0599"]
    );
    assert!(e.list("", 10, "../x").is_err());
}

#[test]
fn grants_allow_what_they_name_and_nothing_else() {
    let f = fixture();
    let e = &f.engine;
    let g = e
        .create_grant(
            &f.journal,
            NewSecretGrant {
                path: "payments/*".to_owned(),
                principal: "spiffe://corp/app".to_owned(),
                operations: vec![SecretOperation::SecretRead],
            },
            "admin",
        )
        .unwrap();
    assert!(
        e.permits(
            "spiffe://corp/app",
            "payments/stripe",
            SecretOperation::SecretRead
        )
        .unwrap()
    );
    assert!(
        !e.permits(
            "spiffe://corp/app",
            "payments/stripe",
            SecretOperation::SecretWrite
        )
        .unwrap()
    );
    assert!(
        !e.permits(
            "spiffe://corp/other",
            "payments/stripe",
            SecretOperation::SecretRead
        )
        .unwrap()
    );
    assert!(
        !e.permits(
            "spiffe://corp/app",
            "hr/salaries",
            SecretOperation::SecretRead
        )
        .unwrap()
    );
    assert_eq!(e.list_grants("", "").unwrap().len(), 1);
    // A grant survives reopening the engine; a revoked one is gone.
    let reopened = Secrets::open(
        Arc::clone(&f.barrier),
        Arc::clone(&f.store),
        Settings::default(),
    )
    .unwrap();
    assert!(
        reopened
            .permits(
                "spiffe://corp/app",
                "payments/x",
                SecretOperation::SecretRead
            )
            .unwrap()
    );
    e.revoke_grant(&f.journal, &g.id).unwrap();
    assert!(
        !e.permits(
            "spiffe://corp/app",
            "payments/stripe",
            SecretOperation::SecretRead
        )
        .unwrap()
    );
    assert!(matches!(
        e.revoke_grant(&f.journal, &g.id),
        Err(SecretsError::GrantNotFound(_))
    ));
    // Another server's change is read again once heard.
    use crate::engine::Engine as _;
    reopened.heard(&[Change::Entry(GRANTS, g.id.clone())]);
    assert!(
        !reopened
            .permits(
                "spiffe://corp/app",
                "payments/x",
                SecretOperation::SecretRead
            )
            .unwrap()
    );
    // A grant record written by anyone else allows nothing, and the others still work.
    let kept = e
        .create_grant(
            &f.journal,
            NewSecretGrant {
                path: "hr/*".to_owned(),
                principal: "spiffe://corp/hr".to_owned(),
                operations: vec![SecretOperation::SecretRead],
            },
            "admin",
        )
        .unwrap();
    let mut forged = f.store.get(GRANTS, &kept.id).unwrap().unwrap();
    f.store.put(GRANTS, &"0".repeat(32), &forged).unwrap();
    forged[20] ^= 1;
    f.store.put(GRANTS, &"1".repeat(32), &forged).unwrap();
    let opened = Secrets::open(
        Arc::clone(&f.barrier),
        Arc::clone(&f.store),
        Settings::default(),
    )
    .unwrap();
    assert_eq!(opened.list_grants("", "").unwrap(), [kept]);
    assert!(
        opened
            .permits("spiffe://corp/hr", "hr/x", SecretOperation::SecretRead)
            .unwrap()
    );
    for bad in ["", "a b", "/x"] {
        assert!(
            e.create_grant(
                &f.journal,
                NewSecretGrant {
                    path: bad.to_owned(),
                    principal: "x".to_owned(),
                    operations: vec![SecretOperation::SecretRead],
                },
                "admin",
            )
            .is_err()
        );
    }
}

/// Commits as [`Direct`] does, and keeps what a shared store would announce to the other
/// servers: its writes to followed tables, never its removals (`store::Follow`, and the
/// PostgreSQL store's `NOTIFY` of written keys).
struct Announcing {
    direct: Direct,
    announced: std::sync::Mutex<Vec<Change>>,
}

impl Journal for Announcing {
    fn commit(
        &self,
        what: Committed<'_>,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<(), SecretsError> {
        let heard: Vec<Change> = writes
            .iter()
            .filter(|w| w.table.followed())
            .map(|w| Change::Entry(w.table, w.key.clone()))
            .collect();
        self.direct.commit(what, writes, removals)?;
        self.announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(heard);
        Ok(())
    }
}

#[test]
fn a_grant_revoked_on_one_server_is_refused_on_another() {
    use crate::engine::Engine as _;
    let f = fixture();
    let other = Secrets::open(
        Arc::clone(&f.barrier),
        Arc::clone(&f.store),
        Settings::default(),
    )
    .unwrap();
    let journal = Announcing {
        direct: Direct(Arc::clone(&f.store)),
        announced: std::sync::Mutex::new(Vec::new()),
    };
    let hear = || {
        let heard = std::mem::take(&mut *journal.announced.lock().unwrap());
        other.heard(&heard);
    };
    let g = f
        .engine
        .create_grant(
            &journal,
            NewSecretGrant {
                path: "payments/*".to_owned(),
                principal: "spiffe://corp/app".to_owned(),
                operations: vec![SecretOperation::SecretRead],
            },
            "admin",
        )
        .unwrap();
    hear();
    let allowed = || {
        other
            .permits(
                "spiffe://corp/app",
                "payments/x",
                SecretOperation::SecretRead,
            )
            .unwrap()
    };
    assert!(allowed(), "the other server heard of the grant");
    f.engine.revoke_grant(&journal, &g.id).unwrap();
    hear();
    assert!(!allowed(), "the other server heard of the revocation");
}

/// A redb store that says other servers write it too, as a PostgreSQL store does; it
/// announces nothing (its changes are never heard). It counts the entries its ranges read.
struct Shared(Arc<dyn Store>, std::sync::atomic::AtomicUsize);

impl Shared {
    fn over(store: &Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self(
            Arc::clone(store),
            std::sync::atomic::AtomicUsize::new(0),
        ))
    }
}

impl Store for Shared {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
        self.0.get(table, key)
    }
    fn insert_new(
        &self,
        table: Table,
        key: &str,
        value: &[u8],
    ) -> Result<bool, crate::store::StoreError> {
        self.0.insert_new(table, key, value)
    }
    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), crate::store::StoreError> {
        self.0.put(table, key, value)
    }
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, crate::store::StoreError> {
        self.0.scan(table)
    }
    fn write_all_removing(
        &self,
        writes: &[Write],
        removals: &[Removal],
    ) -> Result<(), crate::store::StoreError> {
        self.0.write_all_removing(writes, removals)
    }
    fn append_with(
        &self,
        table: Table,
        build: &mut crate::store::AppendBuild<'_>,
        removals: &[Removal],
    ) -> Result<(), crate::store::StoreError> {
        self.0.append_with(table, build, removals)
    }
    fn reserve(
        &self,
        table: Table,
        key: &str,
        want: u64,
        max: u64,
    ) -> Result<(u64, u64), crate::store::StoreError> {
        self.0.reserve(table, key, want, max)
    }
    fn snapshot(
        &self,
        tables: &[Table],
        each: &mut crate::store::EachEntry<'_>,
    ) -> Result<(), crate::store::StoreError> {
        self.0.snapshot(tables, each)
    }
    fn location(&self) -> Result<String, crate::store::StoreError> {
        self.0.location()
    }
    fn shared(&self) -> bool {
        true
    }
    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, crate::store::StoreError> {
        self.0.last(table)
    }
    fn range(
        &self,
        table: Table,
        start: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, crate::store::StoreError> {
        let entries = self.0.range(table, start, limit)?;
        self.1
            .fetch_add(entries.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(entries)
    }
}

#[test]
fn on_a_shared_store_a_grant_change_is_in_force_on_every_server_before_it_is_heard() {
    let f = fixture();
    let shared: Arc<dyn Store> = Shared::over(&f.store);
    let open = || {
        Secrets::open(
            Arc::clone(&f.barrier),
            Arc::clone(&shared),
            Settings::default(),
        )
        .unwrap()
    };
    let (a, b) = (open(), open());
    let journal = Direct(Arc::clone(&shared));
    let allowed = |e: &Secrets| {
        e.permits(
            "spiffe://corp/app",
            "payments/x",
            SecretOperation::SecretRead,
        )
        .unwrap()
    };
    assert!(!allowed(&b));
    let g = a
        .create_grant(
            &journal,
            NewSecretGrant {
                path: "payments/*".to_owned(),
                principal: "spiffe://corp/app".to_owned(),
                operations: vec![SecretOperation::SecretRead],
            },
            "admin",
        )
        .unwrap();
    assert!(allowed(&b), "B allows A's new grant, nothing heard");
    a.revoke_grant(&journal, &g.id).unwrap();
    assert!(!allowed(&b), "B refuses the grant A revoked, nothing heard");
    // The configuration too: cas_required set on A is required on B at once.
    a.update_config(
        &journal,
        ConfigUpdate {
            cas_required: Some(true),
            ..ConfigUpdate::default()
        },
    )
    .unwrap();
    assert!(matches!(
        b.write(&journal, "payments/x", values(&[("k", "v")]), None),
        Err(SecretsError::CasRequired)
    ));
}

/// What a commit said: the path, the versions, the versions dropped.
type Said = (String, Vec<u64>, Vec<u64>);

/// A journal that keeps what each commit said, and commits.
struct Recording(Direct, std::sync::Mutex<Vec<Said>>);

impl Journal for Recording {
    fn commit(
        &self,
        what: Committed<'_>,
        writes: Vec<Write>,
        removals: Vec<Removal>,
    ) -> Result<(), SecretsError> {
        self.1.lock().unwrap().push((
            what.path.to_owned(),
            what.versions.to_vec(),
            what.dropped.to_vec(),
        ));
        self.0.commit(what, writes, removals)
    }
}

#[test]
fn a_write_records_the_versions_it_drops_and_refuses_to_overwrite_values() {
    let f = fixture();
    let e = &f.engine;
    let j = Recording(Direct(Arc::clone(&f.store)), std::sync::Mutex::default());
    e.update_metadata(
        &j,
        "d",
        MetadataUpdate {
            max_versions: Some(2),
            ..MetadataUpdate::default()
        },
        true,
    )
    .unwrap();
    for i in 1..=3 {
        e.write(&j, "d", values(&[("k", &i.to_string())]), None)
            .unwrap();
    }
    let seen = j.1.lock().unwrap().clone();
    assert_eq!(seen.last().unwrap(), &("d".to_owned(), vec![3], vec![1]));
    // Values already stored under the next version (metadata rolled back): refused.
    let v3 = f
        .store
        .get(VALUES, &path::value_key("d", 3))
        .unwrap()
        .unwrap();
    f.store.put(VALUES, &path::value_key("d", 4), &v3).unwrap();
    assert!(matches!(
        e.write(&j, "d", values(&[("k", "x")]), None),
        Err(SecretsError::Tampered(_))
    ));
    assert_eq!(
        f.store
            .get(VALUES, &path::value_key("d", 4))
            .unwrap()
            .unwrap(),
        v3
    );
}

#[test]
fn a_listing_never_shows_a_stored_key_that_is_not_a_path() {
    let f = fixture();
    let e = &f.engine;
    e.write(&f.journal, "a/b", values(&[("k", "v")]), None)
        .unwrap();
    let forged = f.store.get(METADATA, "a/b").unwrap().unwrap();
    f.store.put(METADATA, "a/\u{1b}[31mx", &forged).unwrap();
    f.store.put(METADATA, "a/c d", &forged).unwrap();
    assert_eq!(e.list("a", 100, "").unwrap().keys, ["b"]);
}

#[test]
fn folders_longer_than_a_read_are_skipped_whole() {
    let f = fixture();
    let e = &f.engine;
    // Folders each longer than a read after a skip, with a secret between them.
    for d in 0..5 {
        for i in 0..20 {
            e.write(
                &f.journal,
                &format!("x/d{d}/{i:02}"),
                values(&[("k", "v")]),
                None,
            )
            .unwrap();
        }
        e.write(&f.journal, &format!("x/d{d}z"), values(&[("k", "v")]), None)
            .unwrap();
    }
    let page = e.list("x", 100, "").unwrap();
    assert_eq!(
        page.keys,
        [
            "d0/", "d0z", "d1/", "d1z", "d2/", "d2z", "d3/", "d3z", "d4/", "d4z"
        ]
    );
}

/// A read runs on an async worker only when every version of the secret is small and the
/// store is this server's own; a record from before sizes were kept, or one that does not
/// open, is read on a thread.
#[test]
fn only_reads_of_small_secrets_on_a_local_store_are_quick() {
    let f = fixture();
    const MAX: u64 = 4096;
    assert!(f.engine.reads_quickly("app/absent", MAX), "nothing to read");
    assert!(
        !f.engine.reads_quickly("bad path/", MAX),
        "a bad path is reported on a thread"
    );
    f.engine
        .write(
            &f.journal,
            "app/small",
            values(&[("k", &"x".repeat(1000))]),
            None,
        )
        .unwrap();
    assert!(f.engine.reads_quickly("app/small", MAX));
    // One big version makes every read of the path a thread's, until it is destroyed.
    f.engine
        .write(
            &f.journal,
            "app/small",
            values(&[("k", &"x".repeat(5000))]),
            None,
        )
        .unwrap();
    assert!(!f.engine.reads_quickly("app/small", MAX));
    f.engine.destroy(&f.journal, "app/small", &[2]).unwrap();
    assert!(f.engine.reads_quickly("app/small", MAX));
    // Metadata bigger than the bound (custom metadata, many versions) is read on a thread.
    f.engine
        .update_metadata(
            &f.journal,
            "app/small",
            MetadataUpdate {
                custom: Some(
                    (0..10)
                        .map(|i| (format!("n{i}"), "v".repeat(500)))
                        .collect(),
                ),
                ..MetadataUpdate::default()
            },
            false,
        )
        .unwrap();
    assert!(!f.engine.reads_quickly("app/small", MAX));
    f.engine
        .update_metadata(
            &f.journal,
            "app/small",
            MetadataUpdate {
                custom: Some(BTreeMap::new()),
                ..MetadataUpdate::default()
            },
            false,
        )
        .unwrap();
    assert!(f.engine.reads_quickly("app/small", MAX));
    // A version written before sizes were kept.
    let mut meta = f.engine.metadata("app/small").unwrap().unwrap();
    meta.versions.get_mut(&1).unwrap().stored_bytes = None;
    f.store
        .write_all_removing(&[f.engine.metadata_write("app/small", &meta).unwrap()], &[])
        .unwrap();
    assert!(!f.engine.reads_quickly("app/small", MAX));
    // Metadata that does not open.
    f.store
        .write_all_removing(
            &[Write {
                table: METADATA,
                key: "app/small".to_owned(),
                value: vec![1; 64],
            }],
            &[],
        )
        .unwrap();
    assert!(!f.engine.reads_quickly("app/small", MAX));
    // A shared store: always a thread.
    let shared: Arc<dyn Store> = Shared::over(&f.store);
    let b = Secrets::open(Arc::clone(&f.barrier), shared, Settings::default()).unwrap();
    assert!(!b.reads_quickly("app/absent", MAX));
}

/// The first open stores the configuration; once the engine holds secrets, a configuration
/// removed from the store is not taken for the defaults (a lower `max_versions` would drop
/// versions at the next write): writes are refused until an administrator sets it again.
#[test]
fn a_configuration_removed_from_the_store_refuses_writes_until_set_again() {
    let f = fixture();
    assert!(
        f.store.get(super::CONFIG, "config").unwrap().is_some(),
        "stored at the first open"
    );
    f.engine
        .update_config(
            &f.journal,
            ConfigUpdate {
                max_versions: Some(50),
                ..ConfigUpdate::default()
            },
        )
        .unwrap();
    for i in 0..12 {
        f.engine
            .write(&f.journal, "a", values(&[("k", &i.to_string())]), None)
            .unwrap();
    }
    f.store
        .write_all_removing(
            &[],
            &[Removal {
                table: super::CONFIG,
                from: "config".to_owned(),
                to: "config".to_owned(),
            }],
        )
        .unwrap();
    let opened = Secrets::open(
        Arc::clone(&f.barrier),
        Arc::clone(&f.store),
        Settings::default(),
    )
    .unwrap();
    assert!(
        f.store.get(super::CONFIG, "config").unwrap().is_none(),
        "not written again over secrets"
    );
    assert!(matches!(
        opened.write(&f.journal, "a", values(&[("k", "w")]), None),
        Err(SecretsError::Tampered(_))
    ));
    assert_eq!(
        opened.read_metadata("a").unwrap().versions.len(),
        12,
        "nothing dropped"
    );
    assert_eq!(read(&f, "a", 1)["k"], "0");
    // Grants are made and revoked all the same: their announcement depends on nothing else.
    let g = opened
        .create_grant(
            &f.journal,
            NewSecretGrant {
                path: "a".to_owned(),
                principal: "spiffe://corp/app".to_owned(),
                operations: vec![SecretOperation::SecretRead],
            },
            "admin",
        )
        .unwrap();
    opened.revoke_grant(&f.journal, &g.id).unwrap();
    assert!(
        !opened
            .permits("spiffe://corp/app", "a", SecretOperation::SecretRead)
            .unwrap()
    );
    assert!(matches!(
        opened.update_config(
            &f.journal,
            ConfigUpdate {
                max_versions: Some(50),
                ..ConfigUpdate::default()
            },
        ),
        Err(SecretsError::SettingsLost)
    ));
    opened
        .update_config(
            &f.journal,
            ConfigUpdate {
                max_versions: Some(50),
                cas_required: Some(false),
                delete_version_after: Some(0),
            },
        )
        .unwrap();
    opened
        .write(&f.journal, "a", values(&[("k", "w")]), None)
        .unwrap();
    assert_eq!(opened.read_metadata("a").unwrap().versions.len(), 13);
}

/// A page after a folder starts past it and past the siblings listed before it: a token a
/// caller makes up costs reads in proportion to the page, not to the names before it.
#[test]
fn a_page_after_a_folder_reads_nothing_listed_before_it() {
    let f = fixture();
    for i in 0..300 {
        f.engine
            .write(
                &f.journal,
                &format!("t/a-{i:04}"),
                values(&[("k", "v")]),
                None,
            )
            .unwrap();
    }
    for p in ["t/a/x", "t/b"] {
        f.engine
            .write(&f.journal, p, values(&[("k", "v")]), None)
            .unwrap();
    }
    let counted = Shared::over(&f.store);
    let engine = Secrets::open(
        Arc::clone(&f.barrier),
        Arc::clone(&counted) as Arc<dyn Store>,
        Settings::default(),
    )
    .unwrap();
    let before = counted.1.load(std::sync::atomic::Ordering::Relaxed);
    let page = engine.list("t", 1, "a/").unwrap();
    assert_eq!(page.keys, ["b"]);
    let read = counted.1.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        read <= 8,
        "{read} entries read for one name after the folder"
    );
    // The pages still go through every name, folders and siblings alike.
    let mut token = String::new();
    let mut names = Vec::new();
    loop {
        let page = engine.list("t", 7, &token).unwrap();
        names.extend(page.keys.clone());
        match page.next {
            Some(t) => token = t,
            None => break,
        }
    }
    assert_eq!(names.len(), 302);
    assert_eq!(names[299..], ["a-0299", "a/", "b"]);
}

/// A patch past the size limit is refused without its merged size: that would tell a
/// caller who may only write the size of the values it cannot read.
#[test]
fn a_patch_too_large_does_not_tell_the_size_of_the_values() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("kms.redb")).unwrap());
    let barrier = Arc::new(Barrier::new(zeroize::Zeroizing::new([7u8; 32])));
    let engine = Secrets::open(
        barrier,
        Arc::clone(&store),
        Settings {
            max_secret_bytes: 100,
        },
    )
    .unwrap();
    let journal = Direct(store);
    engine
        .write(&journal, "a", values(&[("password", "hunter2")]), None)
        .unwrap();
    let patch = Patch {
        set: values(&[("filler", &"x".repeat(90))]),
        remove: Vec::new(),
    };
    let refused = engine.patch(&journal, "a", patch, None).err().unwrap();
    assert!(matches!(refused, SecretsError::PatchTooLarge { max: 100 }));
    let said = refused.to_string();
    assert!(!said.contains("111") && said.contains("100"), "{said}");
    assert_eq!(
        engine.read_metadata("a").unwrap().current,
        1,
        "nothing written"
    );
}
