//! Read receipts over real sockets: "read up to seq" per conversation and device. 1:1: the peer
//! and the reader's other sessions are told, and both positions can be asked for (they survive
//! a restart on the durable store). Groups: each member's position is kept; small groups get
//! them live, larger ones only answer counts. Every refusal.

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{Client, ClientError, Event},
    protocol::{
        conv, group_action, invite_policy, join_policy, ErrorCode, GroupProfile, ReadEntry, ReadNotice,
    },
};

/// The next read notice `c` gets (skipping deliveries and catch-up ends).
fn next_read(c: &mut Client) -> ReadNotice {
    loop {
        match c.recv().expect("a read notice") {
            Event::ReadNotice(r) => return r,
            Event::CatchUpEnd(_) | Event::Deliver(_) | Event::SendAck(_) => {}
            other => panic!("expected a read notice, got {other:?}"),
        }
    }
}

/// The next error `c` gets.
fn next_error(c: &mut Client) -> (u16, u16) {
    loop {
        match c.recv().expect("an error") {
            Event::Error(e) => return (e.code, e.request_kind),
            Event::CatchUpEnd(_) | Event::Deliver(_) | Event::ReadNotice(_) => {}
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

/// No read notice arrives at `c` within a short while.
fn no_read(c: &mut Client) {
    c.set_timeout(Some(Duration::from_millis(400))).unwrap();
    loop {
        match c.recv() {
            Err(_) => break,
            Ok(Event::ReadNotice(r)) => panic!("unexpected read notice {r:?}"),
            Ok(_) => {}
        }
    }
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
}

fn code(r: Result<tim::protocol::ReadState, ClientError>) -> u16 {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Wait (flushes run every `cursor_flush_ms`) until `f` holds.
fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never came true");
}

fn profile() -> GroupProfile {
    GroupProfile {
        name: "readers".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    }
}

fn one_to_one(store: &str) {
    let extra = "[limits]\ncursor_flush_ms = 50\nreads_per_session_per_minute_max = 20\n";
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().to_path_buf();
    let body = pg::store_body(store);
    let s = TestServer::start_in(dir, "io_uring", &body, extra);
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a1, _) = s.login(&ann, 3);
    let (mut a2, _) = s.login(&ann, 1);
    let (mut b, _) = s.login(&bob, 3);
    let m1 = a1.send_wait(bob_id, 1, b"one").unwrap();
    let m2 = a1.send_wait(bob_id, 2, b"two").unwrap();
    // Bob reads up to m2: ann's sessions are told, and none of bob's (he has one).
    b.read(conv::DIRECT, ann_id, m2.seq).unwrap();
    for a in [&mut a1, &mut a2] {
        assert_eq!(next_read(a), ReadNotice { from: bob_id, to: ann_id, conv: conv::DIRECT, seq: m2.seq });
    }
    // Ann's read on one device reaches her other one (and bob).
    a1.read(conv::DIRECT, bob_id, m2.seq).unwrap();
    assert_eq!(next_read(&mut a2).from, ann_id);
    assert_eq!(next_read(&mut b).from, ann_id);
    // Both positions, and whether the peer read a given message.
    eventually(|| a1.read_get(conv::DIRECT, bob_id, m1.seq).unwrap().read_count == 1);
    let st = a1.read_get(conv::DIRECT, bob_id, m2.seq + 1).unwrap();
    assert_eq!((st.read_count, st.member_count), (0, 1));
    let mut want = vec![ReadEntry { user: ann_id, seq: m2.seq }, ReadEntry { user: bob_id, seq: m2.seq }];
    want.sort_by_key(|e| e.user);
    assert_eq!(st.reads, want);
    // A position never goes back.
    b.read(conv::DIRECT, ann_id, m1.seq).unwrap();
    assert_eq!(next_read(&mut a1).seq, m1.seq, "the notice goes out");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a1.read_get(conv::DIRECT, bob_id, m2.seq).unwrap().read_count, 1);
    // Refusals: a bad conversation, seq 0, and the rate limit (the session stays).
    b.read(9, ann_id, 1).unwrap();
    assert_eq!(next_error(&mut b), (ErrorCode::InvalidConversation.code(), tim::protocol::kind::READ));
    b.read(conv::DIRECT, 0, 1).unwrap();
    assert_eq!(next_error(&mut b).0, ErrorCode::InvalidConversation.code());
    b.read(conv::DIRECT, ann_id, 0).unwrap();
    assert_eq!(next_error(&mut b).0, ErrorCode::Malformed.code());
    assert_eq!(code(b.read_get(conv::GROUP, ann_id, 1)), ErrorCode::InvalidConversation.code());
    for _ in 0..20 {
        b.read(conv::DIRECT, ann_id, m2.seq).unwrap();
    }
    assert_eq!(next_error(&mut b), (ErrorCode::RateLimited.code(), tim::protocol::kind::READ));
    b.ping(1).unwrap();
    // The durable store keeps positions across a restart.
    if store != "memory" {
        drop((a1, a2, b));
        let dir = s.stop_keep();
        assert_eq!(dir.path(), keep);
        let s = TestServer::start_in(dir, "io_uring", &body, extra);
        let (mut a, _) = s.login(&ann, 3);
        let st = a.read_get(conv::DIRECT, bob_id, m2.seq).unwrap();
        assert_eq!(st.read_count, 1, "{st:?}");
    }
}

#[test]
fn one_to_one_embedded() {
    one_to_one("embedded");
}

#[test]
fn one_to_one_memory() {
    one_to_one("memory");
}

/// A group of three with `receipts_live_members_max` 3 gets receipts live; counts come from the
/// owner; a non-member is refused. Then the group grows past the limit: no more live receipts,
/// counts still, and no positions list.
fn group(store: &str) {
    let extra = "[limits]\ncursor_flush_ms = 50\nreceipts_live_members_max = 3\n";
    let s = TestServer::start_with_store("io_uring", &pg::store_body(store), extra);
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (dave, _) = s.register("dave");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);
    let (mut d, _) = s.login(&dave, 3);
    let g = a.group_create(profile()).unwrap();
    b.group_action(g, group_action::JOIN, 0, 0, "").unwrap();
    c.group_action(g, group_action::JOIN, 0, 0, "").unwrap();
    let m = a.group_send_wait(g, 1, b"hello").unwrap();
    b.read(conv::GROUP, g, m.seq).unwrap();
    for x in [&mut a, &mut c] {
        assert_eq!(next_read(x), ReadNotice { from: bob_id, to: g, conv: conv::GROUP, seq: m.seq });
    }
    let st = a.read_get(conv::GROUP, g, m.seq).unwrap();
    assert_eq!((st.read_count, st.member_count), (1, 2));
    assert_eq!(st.reads.len(), 3);
    assert!(st.reads.contains(&ReadEntry { user: bob_id, seq: m.seq }));
    assert!(st.reads.contains(&ReadEntry { user: carol_id, seq: 0 }));
    assert!(st.reads.contains(&ReadEntry { user: ann_id, seq: 0 }));
    // Not a member: refused, for both requests.
    d.read(conv::GROUP, g, m.seq).unwrap();
    assert_eq!(next_error(&mut d).0, ErrorCode::NotMember.code());
    assert_eq!(code(d.read_get(conv::GROUP, g, m.seq)), ErrorCode::NotMember.code());
    // Past the limit: dave joins (4 members), carol's read reaches nobody live.
    d.group_action(g, group_action::JOIN, 0, 0, "").unwrap();
    c.read(conv::GROUP, g, m.seq).unwrap();
    no_read(&mut a);
    let st = a.read_get(conv::GROUP, g, m.seq).unwrap();
    assert_eq!((st.read_count, st.member_count, st.reads.len()), (2, 3, 0));
}

#[test]
fn group_embedded() {
    group("embedded");
}

#[test]
fn group_memory() {
    group("memory");
}

#[test]
fn group_postgres() {
    group("postgres");
}

#[test]
fn one_to_one_postgres() {
    one_to_one("postgres");
}
