//! Audit log appends: one writer (one fsync per record) against 32 concurrent writers
//! whose records share commits. Reported per record.
//!
//! Run: `cargo bench -p kms-benches --bench audit`. Results: docs/benchmarks.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kms::audit::{AuditEvent, AuditLog, CheckpointPolicy, Signer};
use kms::store::RedbStore;

fn event() -> AuditEvent {
    AuditEvent {
        time_ms: 0,
        request_id: "req".into(),
        principal: "spiffe://example.org/payments".into(),
        peer: "127.0.0.1:5000".into(),
        service: "kms.v1.KeyManagement".into(),
        operation: "Encrypt".into(),
        key: Some("payments".into()),
        key_version: Some(3),
        outcome: "OK".into(),
        input_bytes: 1024,
        output_bytes: 1057,
        ..AuditEvent::default()
    }
}

fn audit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // No HSM here: the signer never signs, so this measures the chain and group commit.
    let log = AuditLog::open(
        Arc::new(RedbStore::open(&dir.path().join("audit.redb")).unwrap()),
        Arc::new(Signer::disabled()),
        CheckpointPolicy::default(),
    )
    .unwrap();
    let mut g = c.benchmark_group("audit append, per record");
    g.sample_size(20);
    g.bench_function("1 writer", |b| b.iter(|| log.append(event()).unwrap()));
    g.bench_function("32 concurrent writers", |b| {
        b.iter_custom(|iters| {
            let writers = 32u64;
            let each = iters.div_ceil(writers);
            let start = Instant::now();
            let threads: Vec<_> = (0..writers)
                .map(|_| {
                    let log = log.clone();
                    std::thread::spawn(move || {
                        for _ in 0..each {
                            log.append(event()).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let per = start.elapsed().as_nanos() / u128::from(each * writers);
            Duration::from_nanos(u64::try_from(per).unwrap_or(u64::MAX))
                * u32::try_from(iters).unwrap_or(u32::MAX)
        })
    });
    g.finish();
    println!("commits: {}", log.commits());
}

criterion_group!(benches, audit);
criterion_main!(benches);
