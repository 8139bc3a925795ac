//! Codec benchmarks: encoding a frame, reading an archive validated (as the server does once at
//! the edge) and unchecked, the same message through serde_json for comparison, and the
//! partition lookups done per message.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tim::{
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
    protocol::{kind, ArchivedSend, Send},
};

/// The same message as `Send`, for serde_json.
#[derive(serde::Serialize, serde::Deserialize)]
struct JsonSend {
    conv: u8,
    to: u64,
    client_msg_id: u64,
    body: Vec<u8>,
}

fn message(body_bytes: usize) -> Send {
    Send {
        conv: 1,
        flags: 0,
        burn_secs: 0,
        to: 123_456_789,
        client_msg_id: 987_654_321,
        body: vec![b'x'; body_bytes],
    }
}

fn codec(c: &mut Criterion) {
    for body in [64usize, 1024] {
        let mut g = c.benchmark_group(format!("codec/body_{body}"));
        g.throughput(Throughput::Elements(1));
        let msg = message(body);
        g.bench_function("encode_frame", |b| {
            let mut out = Vec::with_capacity(2048);
            b.iter(|| {
                out.clear();
                frame::encode_into(kind::SEND, black_box(&msg), &mut out);
                black_box(out.len())
            })
        });
        let f = frame::encode(kind::SEND, &msg);
        let mut buf = AlignedBuf::new(4096);
        buf.spare()[..f.len()].copy_from_slice(&f);
        buf.end = f.len();
        let Parsed::Frame(h, _) = frame::parse(buf.filled(), 1 << 20) else { unreachable!() };
        let payload = &buf.filled()[HEADER_BYTES..HEADER_BYTES + h.len as usize];
        g.bench_function("parse_and_validated_access", |b| {
            b.iter(|| {
                let Parsed::Frame(h, _) = frame::parse(black_box(buf.filled()), 1 << 20) else {
                    unreachable!()
                };
                let p = &buf.filled()[HEADER_BYTES..HEADER_BYTES + h.len as usize];
                let a = frame::access::<ArchivedSend>(p).unwrap();
                black_box(a.to.to_native() ^ a.body.len() as u64)
            })
        });
        g.bench_function("unchecked_access", |b| {
            b.iter(|| {
                // SAFETY: `payload` was validated above.
                let a = unsafe { rkyv::access_unchecked::<ArchivedSend>(black_box(payload)) };
                black_box(a.to.to_native() ^ a.body.len() as u64)
            })
        });
        let json_msg =
            JsonSend { conv: 1, to: msg.to, client_msg_id: msg.client_msg_id, body: msg.body.clone() };
        g.bench_function("serde_json_encode", |b| {
            let mut out = Vec::with_capacity(8192);
            b.iter(|| {
                out.clear();
                serde_json::to_writer(&mut out, black_box(&json_msg)).unwrap();
                black_box(out.len())
            })
        });
        let json = serde_json::to_vec(&json_msg).unwrap();
        g.bench_function("serde_json_decode", |b| {
            b.iter(|| {
                let m: JsonSend = serde_json::from_slice(black_box(&json)).unwrap();
                black_box(m.to ^ m.body.len() as u64)
            })
        });
        g.finish();
    }
}

fn partition(c: &mut Criterion) {
    let mut g = c.benchmark_group("partition");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("user_shard_x1024", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for id in 0..1024u64 {
                acc += tim::placement::user_shard(black_box(id), 4);
            }
            acc
        })
    });
    g.bench_function("conv_shard_x1024", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for id in 0..1024u64 {
                acc += tim::placement::conv_shard(tim::placement::direct_key(black_box(id), 77), 4);
            }
            acc
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = codec, partition
}
criterion_main!(benches);
