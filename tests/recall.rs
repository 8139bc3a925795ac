//! Recall over real sockets: a Send with the RECALL flag takes back an earlier message of its
//! conversation. Live sessions get the recall notice, offline devices get the tombstone and the
//! notice at catch-up, history shows the tombstone (the body is gone from the store); every
//! refusal, on the embedded store and in no-data mode, 1:1 and in a group (where managers may
//! recall anyone's message).

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{Client, ClientError, Delivery, Event},
    protocol::{
        self, conv, invite_policy, join_policy, kind, msg_state, send_flags, ErrorCode, GroupProfile,
    },
};

/// The code of a refused send.
fn refused(r: Result<protocol::SendAck, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => ErrorCode::from_u16(code).expect("a known code"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The next delivery that is not a group notice.
fn next_message(c: &mut Client) -> Delivery {
    loop {
        let d = c.next_delivery().unwrap();
        if tim::client::group_notice(&d).is_none() {
            return d;
        }
    }
}

/// Send a raw `Send` and return the error it gets.
fn raw_send_error(c: &mut Client, k: u16, send: protocol::Send) -> (u16, u64) {
    let cmid = send.client_msg_id;
    c.send_frame(k, &send).unwrap();
    loop {
        match c.recv().unwrap() {
            Event::Error(e) if e.client_msg_id == cmid => return (e.code, e.client_msg_id),
            Event::CatchUpEnd(_) | Event::Deliver(_) => {}
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

fn one_to_one(store: &str) {
    let durable = store != "memory";
    let s = TestServer::start_with_store("io_uring", &pg::store_body(store), "");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (mut a1, _) = s.login(&ann, 3);
    let (mut a2, _) = s.login(&ann, 1);
    let (mut b, _) = s.login(&bob, 3);
    if durable {
        // Catch-ups done first: a message stamped in the millisecond of a login may come both
        // live and at catch-up (PROTOCOL 8.13).
        for c in [&mut a1, &mut a2, &mut b] {
            c.catch_up().unwrap();
        }
    }
    let sent = a1.send_wait(bob_id, 1, b"oops, wrong chat").unwrap();
    assert_eq!(next_message(&mut b).body, b"oops, wrong chat");
    assert_eq!(next_message(&mut a2).stamp.seq, sent.seq);
    // The recall is a message of its own: acked with the next seq, delivered to the peer and
    // to the sender's other sessions with the RECALL flag and the seq it takes back.
    let recall = a1.recall_wait(conv::DIRECT, bob_id, 2, sent.seq).unwrap();
    assert_eq!(recall.seq, sent.seq + 1);
    for c in [&mut b, &mut a2] {
        let d = next_message(c);
        assert_eq!((d.stamp.from, d.stamp.seq, d.flags), (ann_id, recall.seq, send_flags::RECALL));
        assert_eq!(d.recalled_seq(), Some(sent.seq));
    }
    // A resend of the recall is answered with its ack, not recalled again.
    let again = a1.recall_wait(conv::DIRECT, bob_id, 2, sent.seq).unwrap();
    assert!(again.duplicate && again.seq == recall.seq);

    // Refusals: another user's message, the recall notice itself, a message recalled already,
    // a seq never given, and recalls the session refuses at once (a bad body or flags).
    let bobs = b.send_wait(ann_id, 1, b"mine").unwrap();
    assert_eq!(refused(a1.recall_wait(conv::DIRECT, bob_id, 3, bobs.seq)), ErrorCode::NotRecallable);
    assert_eq!(refused(a1.recall_wait(conv::DIRECT, bob_id, 4, recall.seq)), ErrorCode::NotRecallable);
    assert_eq!(refused(a1.recall_wait(conv::DIRECT, bob_id, 5, sent.seq)), ErrorCode::NotRecallable);
    assert_eq!(refused(a1.recall_wait(conv::DIRECT, bob_id, 6, 999)), ErrorCode::NotRecallable);
    let bad_body = protocol::Send {
        conv: conv::DIRECT,
        flags: send_flags::RECALL,
        burn_secs: 0,
        to: bob_id,
        client_msg_id: 7,
        body: vec![1; 7],
    };
    assert_eq!(raw_send_error(&mut a1, kind::SEND, bad_body.clone()), (ErrorCode::Malformed.code(), 7));
    let zero = protocol::Send { body: vec![0; 8], client_msg_id: 8, ..bad_body.clone() };
    assert_eq!(raw_send_error(&mut a1, kind::SEND, zero).0, ErrorCode::Malformed.code());
    let unknown_flag = protocol::Send { flags: 0x80, body: vec![], client_msg_id: 9, ..bad_body.clone() };
    assert_eq!(raw_send_error(&mut a1, kind::SEND, unknown_flag).0, ErrorCode::Malformed.code());
    let server_flag =
        protocol::Send { flags: send_flags::BURNED, body: vec![], client_msg_id: 10, ..bad_body.clone() };
    assert_eq!(raw_send_error(&mut a1, kind::SEND, server_flag).0, ErrorCode::Malformed.code());
    let streamed =
        protocol::Send { body: 1u64.to_le_bytes().to_vec(), client_msg_id: 11, ..bad_body.clone() };
    assert_eq!(raw_send_error(&mut a1, kind::STREAM, streamed).0, ErrorCode::Malformed.code());
    // The refusals stored nothing: the next message follows the recall's seq... or, on a
    // durable store, the holes the refused recalls left.
    let after = a1.send_wait(bob_id, 12, b"fine").unwrap();
    assert!(after.seq > bobs.seq);

    if durable {
        // History shows the tombstone (state RECALLED, the body gone, the client message id
        // kept) and the recall notice.
        let (page, _) = b.history(ann_id, 0, true, 50).unwrap();
        let old = page.iter().find(|d| d.stamp.seq == sent.seq).expect("the recalled message");
        assert_eq!((old.state, old.body.len(), old.client_msg_id), (msg_state::RECALLED, 0, 1));
        let notice = page.iter().find(|d| d.stamp.seq == recall.seq).expect("the recall");
        assert_eq!(notice.recalled_seq(), Some(sent.seq));
        assert!(page.iter().all(|d| d.stamp.seq != recall.seq + 1 || d.stamp.from == bob_id));

        // An offline device learns it at catch-up: the tombstone, then the notice.
        let m = a1.send_wait(carol_id, 1, b"for carol's eyes later").unwrap();
        a1.recall_wait(conv::DIRECT, carol_id, 2, m.seq).unwrap();
        let (mut c, _) = s.login(&carol, 3);
        let (got, _) = c.catch_up().unwrap();
        let got: Vec<_> = got.iter().filter(|d| d.stamp.from == ann_id).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].state, got[0].body.len()), (msg_state::RECALLED, 0));
        assert_eq!(got[1].recalled_seq(), Some(m.seq));
    }
    s.assert_serves_others();
}

#[test]
fn one_to_one_embedded() {
    one_to_one("embedded");
}

#[test]
fn one_to_one_memory() {
    one_to_one("memory");
}

/// `messages.recall_window_secs`: a recall after the window is refused.
#[test]
fn recall_window() {
    let s = TestServer::start("io_uring", "[messages]\nrecall_window_secs = 1\n");
    let (ann, _) = s.register("ann");
    let (_, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let early = a.send_wait(bob_id, 1, b"a").unwrap();
    let late = a.send_wait(bob_id, 2, b"b").unwrap();
    a.recall_wait(conv::DIRECT, bob_id, 3, late.seq).unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(refused(a.recall_wait(conv::DIRECT, bob_id, 4, early.seq)), ErrorCode::RecallExpired);
}

/// In a group, a member recalls its own messages, a manager anyone's; a plain member may not
/// recall another's, and a non-member nothing.
fn group(store: &str) {
    let s = TestServer::start_with_store("io_uring", &pg::store_body(store), "");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, _) = s.register("carol");
    let (dave, _) = s.register("dave");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);
    let (mut d, _) = s.login(&dave, 3);
    if store != "memory" {
        for x in [&mut a, &mut b, &mut c, &mut d] {
            x.catch_up().unwrap();
        }
    }
    let profile = GroupProfile {
        name: "recallers".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    };
    let g = a.group_create(profile).unwrap();
    b.group_action(g, protocol::group_action::JOIN, 0, 0, "").unwrap();
    c.group_action(g, protocol::group_action::JOIN, 0, 0, "").unwrap();
    let m1 = b.group_send_wait(g, 1, b"one").unwrap();
    let m2 = b.group_send_wait(g, 2, b"two").unwrap();
    assert_eq!(refused(c.recall_wait(conv::GROUP, g, 1, m1.seq)), ErrorCode::NotRecallable);
    assert_eq!(refused(d.recall_wait(conv::GROUP, g, 1, m1.seq)), ErrorCode::NotMember);
    let own = b.recall_wait(conv::GROUP, g, 3, m1.seq).unwrap();
    let by_founder = a.recall_wait(conv::GROUP, g, 1, m2.seq).unwrap();
    assert!(by_founder.seq > own.seq);
    // Carol (a member) sees both recall notices, from their recallers.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = next_message(&mut c);
        if m.flags == send_flags::RECALL {
            seen.push((m.stamp.from, m.recalled_seq()));
        }
    }
    assert_eq!(seen, [(bob_id, Some(m1.seq)), (ann_id, Some(m2.seq))]);
    if store != "memory" {
        let (page, _) = c.history_of(conv::GROUP, g, 0, true, 50).unwrap();
        for seq in [m1.seq, m2.seq] {
            let m = page.iter().find(|m| m.stamp.seq == seq).unwrap();
            assert_eq!((m.state, m.body.len()), (msg_state::RECALLED, 0));
        }
    }
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
fn one_to_one_postgres() {
    one_to_one("postgres");
}
