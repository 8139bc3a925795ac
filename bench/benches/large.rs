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
use tim::{client::Client, config::Config, protocol::conv};

const PASSWORD: &str = "bench password";

/// The body sizes measured; those over `limits.body_bytes_max` (32 KiB) are sent in parts.
const SIZES: [(usize, &str); 4] =
    [(16 << 10, "16KiB"), (256 << 10, "256KiB"), (1 << 20, "1MiB"), (4 << 20, "4MiB")];

fn start() -> tim::server::Server {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = 2;
    // The default is the embedded store, under ./tim-data: this measures the server, not SQLite.
    cfg.store.backend = "memory".into();
    cfg.gateway.ws_listen = None;
    cfg.admin.listen = None;
    cfg.server.pin_cores = false;
    cfg.security.argon2_m_kib = 64;
    cfg.security.argon2_t = 1;
    tim::server::start(cfg).expect("server starts")
}

/// A logged-in client of `name` whose session sits on `shard` (as in e2e.rs).
fn login_on(server: &tim::server::Server, name: &str, device_type: u8, shard: u64) -> Client {
    for _ in 0..200 {
        let mut c = Client::connect(server.addr).unwrap();
        let ok = c.login(name, PASSWORD, device_type, "bench").unwrap();
        if ok.session_id >> 48 == shard {
            return c;
        }
        c.logout().unwrap();
    }
    panic!("no session on shard {shard}");
}

/// A body of `n` bytes that is not one repeated byte.
fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
}

fn large(c: &mut Criterion) {
    let server = start();
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
