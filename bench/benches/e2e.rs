//! End-to-end benchmarks over loopback against an in-process tim server (2 shards, memory store):
//! a Ping round trip, and a 1:1 message from send to the sender's ack and the recipient's
//! delivery, with the two sessions on different shards so every message crosses the mesh.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tim::client::Client;
use tim_bench::{login_on, loopback_server, PASSWORD};

fn e2e(c: &mut Criterion) {
    let server = loopback_server();
    let mut reg = Client::connect(server.addr).unwrap();
    reg.register("bench-a", PASSWORD).unwrap();
    let b_id = reg.register("bench-b", PASSWORD).unwrap();
    let mut a = login_on(&server, "bench-a", 3, 0);
    let mut b = login_on(&server, "bench-b", 3, 1);
    let mut g = c.benchmark_group("e2e_loopback");
    g.throughput(Throughput::Elements(1));
    let mut nonce = 0u64;
    g.bench_function("ping_round_trip", |bench| {
        bench.iter(|| {
            nonce += 1;
            a.ping(nonce).unwrap()
        })
    });
    let body = [b'x'; 64];
    let mut cmid = 0u64;
    g.bench_function("send_ack_deliver_64B_cross_shard", |bench| {
        bench.iter(|| {
            cmid += 1;
            let ack = a.send_wait(b_id, cmid, &body).unwrap();
            let d = b.next_delivery().unwrap();
            assert_eq!(d.stamp.seq, ack.seq);
        })
    });
    g.finish();
    server.stop();
    server.join().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = e2e
}
criterion_main!(benches);
