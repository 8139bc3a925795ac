//! Large messages end to end (PROTOCOL 5.22, 6.26) over loopback against an in-process tim server
//! (2 shards, memory store, io_uring, default limits): A sends one 1:1 message and waits for its
//! ack, then B, on the other shard, receives it whole. 16 KiB is an ordinary single-frame `Send`
//! (the baseline); 256 KiB, 1 MiB and 4 MiB go up in `Part` frames of the largest size a 64 KiB
//! `frame_bytes_max` takes and come down in `PartOut` frames, reassembled by the client.
//! Throughput is body bytes per iteration, so criterion prints MiB/s. One thread drives both
//! clients, so B starts reading once A has its ack (what the server pushed meanwhile waits in the
//! socket). The memory store keeps every body: a run holds about 2 GB of 4 MiB messages.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tim::{client::Client, protocol::conv};
use tim_bench::{login_on, loopback_server, PASSWORD};

/// The body sizes measured; those over `limits.body_bytes_max` (32 KiB) are sent in parts.
const SIZES: [(usize, &str); 4] =
    [(16 << 10, "16KiB"), (256 << 10, "256KiB"), (1 << 20, "1MiB"), (4 << 20, "4MiB")];

/// A body of `n` bytes that is not one repeated byte.
fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
}

fn large(c: &mut Criterion) {
    let server = loopback_server();
    let mut reg = Client::connect(server.addr).unwrap();
    reg.register("bench-a", PASSWORD).unwrap();
    let b_id = reg.register("bench-b", PASSWORD).unwrap();
    let mut a = login_on(&server, "bench-a", 3, 0);
    let mut b = login_on(&server, "bench-b", 3, 1);
    let mut g = c.benchmark_group("large_e2e");
    let mut cmid = 0u64;
    for (n, name) in SIZES {
        let body = body(n);
        let in_parts = n > 32 << 10;
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("send_ack_deliver_cross_shard", name), &body, |bench, body| {
            bench.iter(|| {
                cmid += 1;
                let ack = if in_parts {
                    a.send_large_wait(conv::DIRECT, b_id, cmid, body).unwrap()
                } else {
                    a.send_wait(b_id, cmid, body).unwrap()
                };
                let d = b.next_delivery().unwrap();
                assert_eq!((d.stamp.seq, d.body.len()), (ack.seq, n));
            })
        });
        // Outside the timing: the body arrives intact (in parts when large), and where the time
        // goes, as medians of a few runs: send → ack to A, then ack → the whole body at B.
        let mut split = Vec::new();
        for _ in 0..7 {
            let parts_before = b.parts_received;
            cmid += 1;
            let t0 = Instant::now();
            let ack = if in_parts {
                a.send_large_wait(conv::DIRECT, b_id, cmid, &body).unwrap()
            } else {
                a.send_wait(b_id, cmid, &body).unwrap()
            };
            let t1 = Instant::now();
            let d = b.next_delivery().unwrap();
            let t2 = Instant::now();
            assert!(d.stamp.seq == ack.seq && d.body == body, "{name} arrives intact");
            assert_eq!(b.parts_received > parts_before, in_parts, "{name}: PartOut frames iff large");
            split.push((t1 - t0, t2 - t1));
        }
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        eprintln!(
            "large_e2e {name}: send→ack {:?}, ack→delivered {:?} (medians of {})",
            median(split.iter().map(|s| s.0).collect()),
            median(split.iter().map(|s| s.1).collect()),
            split.len()
        );
    }
    g.finish();
    server.stop();
    server.join().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = large
}
criterion_main!(benches);
