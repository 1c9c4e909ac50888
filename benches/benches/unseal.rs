//! Ceremony and store costs: Shamir split/combine of a 256-bit unseal key, share text
//! parsing, and one durable (fsync'd) store commit, the floor under every acknowledged write.
//!
//! Run: `cargo bench -p kms-benches --bench unseal`. Results: docs/benchmarks.md.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use criterion::{Criterion, criterion_group, criterion_main};
use kms::store::{RedbStore, Store};
use kms_unseal::{Share, combine, split};

fn shamir(c: &mut Criterion) {
    let secret = [0x42u8; 32];
    c.bench_function("split 32 B into 5 shares, threshold 3", |b| {
        b.iter(|| split(std::hint::black_box(&secret), 5, 3).unwrap())
    });
    let (_, shares) = split(&secret, 5, 3).unwrap();
    let texts: Vec<_> = shares.iter().map(Share::to_text).collect();
    c.bench_function("parse one share text", |b| {
        b.iter(|| Share::parse(std::hint::black_box(&texts[0])).unwrap())
    });
    let parsed: Vec<Share> = texts
        .iter()
        .take(3)
        .map(|t| Share::parse(t).unwrap())
        .collect();
    c.bench_function("combine 3 shares of 32 B", |b| {
        b.iter(|| combine(std::hint::black_box(&parsed)).unwrap())
    });
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("bench.redb")).unwrap();
    let value = [7u8; 512];
    let mut i = 0u64;
    c.bench_function("store put 512 B, durable commit", |b| {
        b.iter(|| {
            i += 1;
            store
                .put(kms::store::SYSTEM, &format!("k{i}"), &value)
                .unwrap()
        })
    });
}

criterion_group!(benches, shamir, store);
criterion_main!(benches);
