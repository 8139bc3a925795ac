//! A PostgreSQL partition that is stalled or down: sends to its conversations get
//! StoreUnavailable after a bounded wait (never a false ack), the other partition keeps working,
//! and tim reconnects by itself when the server returns.

mod common;
use std::time::{Duration, Instant};

use common::{pg::PgServer, *};
use tim::{
    client::{Client, ClientError},
    protocol::ErrorCode,
};

/// Whether the 1:1 conversation of `a` and `b` lives in the low half of the partitions.
fn low_half(a: u64, b: u64) -> bool {
    tim_shards::partition_of(tim::placement::conv_hash(tim::placement::direct_key(a, b)))
        < tim_shards::PARTITIONS / 2
}

fn login(s: &TestServer, name: &str) -> Client {
    let mut c = s.client();
    c.login(name, PASSWORD, 3, "d").unwrap();
    c.catch_up().unwrap();
    c
}

/// Send until acked (the store may need a moment to reconnect, and a resend of a send whose
/// commit is still open gets Busy); panics after `within`.
fn send_until_acked(c: &mut Client, to: u64, cmid: u64, within: Duration) -> tim::protocol::SendAck {
    let start = Instant::now();
    loop {
        match c.send_wait(to, cmid, b"retry") {
            Ok(ack) => return ack,
            Err(e)
                if matches!(e.code(), Some(ErrorCode::StoreUnavailable | ErrorCode::Busy))
                    && start.elapsed() < within =>
            {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("send {cmid}: {e}"),
        }
    }
}

fn unavailable(r: Result<tim::protocol::SendAck, ClientError>) {
    match r {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}"),
        Ok(ack) => panic!("false ack {ack:?} while the partition is away"),
    }
}

#[test]
fn stalled_and_down_partition() {
    let low = PgServer::start();
    let mut high = PgServer::start();
    let body = format!(
        "commit_timeout_ms = 1000\nbackend = \"postgres\"\n[store.postgres]\nconnect_timeout_ms = 1000\n\
         [[store.postgres.partition]]\nslots = \"0-2047\"\nurl = \"{}\"\n\
         [[store.postgres.partition]]\nslots = \"2048-4095\"\nurl = \"{}\"\n",
        common::pg::fresh_db(&low),
        common::pg::fresh_db(&high)
    );
    let s = TestServer::start_with_store("io_uring", &body, "");
    let (alice, alice_id) = s.register("alice");
    // one peer whose conversation with alice is on each half
    let (mut to_low, mut to_high) = (None, None);
    while to_low.is_none() || to_high.is_none() {
        let (name, id) = s.register("peer");
        let slot = if low_half(alice_id, id) { &mut to_low } else { &mut to_high };
        slot.get_or_insert((name, id));
    }
    let ((low_name, low_id), (high_name, high_id)) = (to_low.unwrap(), to_high.unwrap());
    let mut a = login(&s, &alice);
    let mut bl = login(&s, &low_name);
    let mut bh = login(&s, &high_name);
    assert_eq!(a.send_wait(low_id, 1, b"hello").unwrap().seq, 1);
    assert_eq!(a.send_wait(high_id, 2, b"hello").unwrap().seq, 1);
    assert_eq!(bl.next_delivery().unwrap().body, b"hello");
    assert_eq!(bh.next_delivery().unwrap().body, b"hello");

    // Stalled: a bounded wait, then StoreUnavailable; the other half is unaffected.
    high.pause();
    let t = Instant::now();
    unavailable(a.send_wait(high_id, 3, b"stalled"));
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "waited {waited:?}");
    let ack = a.send_wait(low_id, 4, b"low works").unwrap();
    assert_eq!(ack.seq, 2);
    assert_eq!(bl.next_delivery().unwrap().body, b"low works");
    high.resume();
    // The stalled commit may finish late; a resend then gets its original ack, never a copy.
    let ack3 = send_until_acked(&mut a, high_id, 3, Duration::from_secs(10));
    let ack5 = send_until_acked(&mut a, high_id, 5, Duration::from_secs(10));
    assert!(ack5.seq > ack3.seq);
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(bh.next_delivery().unwrap().client_msg_id);
    }
    assert_eq!(got, vec![3, 5], "cmid 3 delivered once, then 5");

    // Down: StoreUnavailable (no false ack); the low half works; back up, tim reconnects.
    high.stop();
    unavailable(a.send_wait(high_id, 6, b"down"));
    assert_eq!(a.send_wait(low_id, 7, b"still").unwrap().seq, 3);
    high.restart();
    let ack = send_until_acked(&mut a, high_id, 8, Duration::from_secs(15));
    assert!(ack.seq > ack5.seq);
    assert_eq!(bh.next_delivery().unwrap().client_msg_id, 8);
}
