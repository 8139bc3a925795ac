//! Every wait ends: a send whose answer is lost between shards gets Timeout instead of holding
//! its in-flight slot forever, and two requests pacing on one session's writer both finish.

mod common;
use std::{collections::HashMap, time::Duration};

use common::*;
use tim::{client::Event, protocol::ErrorCode};

/// With mesh queues of one slot and no overflow room, envelopes between shards are dropped
/// (counted); every send still gets exactly one answer — its ack, or Busy or Timeout — and the
/// session keeps working.
#[test]
fn lost_answers_become_timeouts() {
    let s = TestServer::start_with_store(
        "io_uring",
        "backend = \"memory\"\ncommit_timeout_ms = 100",
        "[limits]\nmesh_queue_capacity = 1\nmesh_overflow_max = 0\nanswer_timeout_ms = 400\n\
         inflight_per_session_max = 64\n",
    );
    let (alice, _) = s.register("alice");
    let mut peers = Vec::new();
    for _ in 0..8 {
        peers.push(s.register("peer").1);
    }
    let mut a = s.login_on_shard(&alice, 3, 0);
    a.set_timeout(Some(Duration::from_secs(20))).unwrap();
    const N: u64 = 3000;
    for i in 1..=N {
        a.send(peers[i as usize % peers.len()], i, b"x").unwrap();
    }
    let mut answers: HashMap<u64, Result<u64, ErrorCode>> = HashMap::new();
    while answers.len() < N as usize {
        let (cmid, answer) = match a.recv().expect("every send is answered") {
            Event::SendAck(ack) => (ack.client_msg_id, Ok(ack.seq)),
            Event::Error(e) => (e.client_msg_id, Err(ErrorCode::from_u16(e.code).expect("a known code"))),
            _ => continue,
        };
        assert!(answers.insert(cmid, answer).is_none(), "send {cmid} answered twice");
    }
    let timeouts = answers.values().filter(|a| **a == Err(ErrorCode::Timeout)).count();
    let busy = answers.values().filter(|a| **a == Err(ErrorCode::Busy)).count();
    let acked = answers.values().filter(|a| a.is_ok()).count();
    assert_eq!(timeouts + busy + acked, N as usize, "only acks, Busy and Timeout");
    assert!(
        timeouts > 0,
        "the one-slot mesh lost nothing: the test proves nothing ({acked} acked, {busy} busy)"
    );
    // The session is not wedged: a send now is answered.
    a.set_timeout(Some(Duration::from_secs(5))).unwrap();
    a.send(peers[0], N + 1, b"after").unwrap();
    loop {
        match a.recv().expect("answered") {
            Event::SendAck(ack) if ack.client_msg_id == N + 1 => break,
            Event::Error(e) if e.client_msg_id == N + 1 => break,
            _ => {}
        }
    }
}

/// A History request while the login's catch-up is pacing on the same session's writer: both
/// finish (a notification with a single waiter left one of them asleep for good).
#[test]
fn history_during_paced_catch_up() {
    let s = TestServer::start_with_store(
        "io_uring",
        "backend = \"embedded\"",
        "[limits]\nsession_outbound_bytes_max = 131072\n",
    );
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    // Enough that the socket's buffers fill and both requests wait for the writer.
    let body = vec![b'm'; 4000];
    const N: u64 = 3000;
    for i in 1..=N {
        a.send(bob_id, i, &body).unwrap();
    }
    let mut acked = 0;
    while acked < N {
        match a.recv().unwrap() {
            Event::SendAck(_) => acked += 1,
            Event::CatchUpEnd(_) => {} // alice's own (empty) catch-up
            other => panic!("unexpected {other:?}"),
        }
    }
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(Duration::from_secs(20))).unwrap();
    // Read nothing for a while, so that the catch-up of 3000 × 4 KB fills the socket and waits
    // for the writer; then ask for history, which waits for the writer too.
    std::thread::sleep(Duration::from_millis(300));
    let (page, end) = b.history(alice_id, 0, true, 100).expect("history finishes");
    assert_eq!(page.len(), 100);
    assert!(end.more);
    let (caught, cend) = b.catch_up().expect("catch-up finishes");
    assert_eq!(caught.len() as u64, N);
    assert_eq!(cend.count as u64, N);
}
