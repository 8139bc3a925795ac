//! The insert path of the durable stores: one commit of a batch of 1, 16, 128 or 1024 messages
//! (64-byte bodies), from `Store::append` to its completion callback. Shows what group commit
//! buys: the cost of a commit is mostly per batch, not per message.
//!
//! The embedded store is measured with `synchronous = full` and `normal`. The PostgreSQL store is
//! measured when `TIM_BENCH_PG_URL` names a database (for example one started with the test
//! harness); it is skipped otherwise.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tim::{
    config::{PgPartition, PostgresConfig, StoreConfig},
    store::{embedded::EmbeddedStore, postgres::PostgresStore, Store, StoredMessage},
};

const BATCHES: [usize; 4] = [1, 16, 128, 1024];

/// `n` messages of distinct conversations from `next` on (a stored payload of 48 + 96 bytes).
fn batch(next: &mut u64, n: usize) -> Vec<StoredMessage> {
    let payload = Bytes::from(vec![7u8; 144]);
    (0..n)
        .map(|_| {
            *next += 1;
            StoredMessage {
                conv: (1, 1_000_000 + *next),
                seq: 1,
                msg_id: *next,
                ts_ms: 1_800_000_000_000,
                sender: 1,
                sender_device: 9,
                client_msg_id: *next,
                payload: payload.clone(),
                group: None,
                edit: None,
            }
        })
        .collect()
}

fn commit(store: &dyn Store, msgs: Vec<StoredMessage>) {
    let (tx, rx) = mpsc::channel();
    let part = store.partition_of(msgs[0].conv);
    store.append(part, msgs, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(30)).expect("commit answered").expect("commit succeeded");
}

fn bench_store(c: &mut Criterion, name: &str, store: &dyn Store) {
    let mut g = c.benchmark_group(format!("store_insert/{name}"));
    let mut next = 0u64;
    for n in BATCHES {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let msgs = batch(&mut next, n);
                    let t = Instant::now();
                    commit(store, msgs);
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

fn embedded(c: &mut Criterion) {
    for sync in ["full", "normal"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            synchronous: sync.into(),
            ..StoreConfig::default()
        };
        let store = EmbeddedStore::open(&cfg).unwrap();
        bench_store(c, &format!("embedded_sync_{sync}"), &store);
    }
}

fn postgres(c: &mut Criterion) {
    let Ok(url) = std::env::var("TIM_BENCH_PG_URL") else {
        eprintln!("store_insert/postgres skipped: set TIM_BENCH_PG_URL to a database URL to measure it");
        return;
    };
    let cfg = PostgresConfig {
        partitions: vec![PgPartition { slots: "0-4095".into(), url }],
        ..PostgresConfig::default()
    };
    let store = PostgresStore::open(&cfg).unwrap();
    bench_store(c, "postgres", &store);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = embedded, postgres
}
criterion_main!(benches);
