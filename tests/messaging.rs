//! 1:1 messaging over real sockets: cross-shard delivery, order and sequence numbers,
//! multi-device sync, resend dedup, and refusals.

mod common;
use common::*;
use tim::protocol::ErrorCode;

/// A message between users whose sessions sit on different shards is delivered once, in order,
/// with sequence numbers rising by one per conversation.
fn cross_shard_in_order(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = s.login_on_shard(&alice, 3, 0);
    let mut b = s.login_on_shard(&bob, 3, 1);
    const N: u64 = 300;
    for i in 1..=N {
        a.send(bob_id, i, format!("m{i}").as_bytes()).unwrap();
    }
    let mut acks = Vec::new();
    while acks.len() < N as usize {
        match a.recv().unwrap() {
            tim::client::Event::SendAck(ack) => acks.push(ack),
            other => panic!("unexpected {other:?}"),
        }
    }
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack.client_msg_id, i as u64 + 1, "acks in send order");
        assert_eq!(ack.seq, i as u64 + 1, "sequence rises by one");
        assert!(!ack.duplicate);
    }
    for i in 1..=N {
        let d = b.next_delivery().unwrap();
        assert_eq!(d.stamp.seq, i);
        assert_eq!((d.stamp.from, d.stamp.to, d.client_msg_id), (alice_id, bob_id, i));
        assert_eq!(d.body, format!("m{i}").as_bytes());
        assert_eq!(d.stamp.msg_id, acks[i as usize - 1].msg_id);
    }
    // the reply continues the same conversation's sequence, from the other side
    let ack = b.send_wait(alice_id, 1, b"reply").unwrap();
    assert_eq!(ack.seq, N + 1);
    let d = a.next_delivery().unwrap();
    assert_eq!((d.stamp.seq, d.stamp.from, d.body.as_slice()), (N + 1, bob_id, &b"reply"[..]));
    // nothing was delivered twice
    b.set_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    assert!(b.recv().is_err(), "no extra frame for the recipient");
}

/// Both of the recipient's devices and the sender's other device get the message; the sending
/// device gets only the ack.
fn multi_device(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a1 = s.login_on_shard(&alice, 1, 0);
    let mut a2 = s.login_on_shard(&alice, 3, 1);
    let mut b1 = s.login_on_shard(&bob, 1, 1);
    let mut b2 = s.login_on_shard(&bob, 3, 0);
    let ack = a1.send_wait(bob_id, 77, b"hello").unwrap();
    for c in [&mut a2, &mut b1, &mut b2] {
        let d = c.next_delivery().unwrap();
        assert_eq!((d.stamp.from, d.stamp.to, d.stamp.seq), (alice_id, bob_id, ack.seq));
        assert_eq!(d.body, b"hello");
    }
    a1.set_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    assert!(a1.recv().is_err(), "the sending session gets no copy");
}

/// A resend with the same client message id, also from a new connection, is acked again with the
/// original ids and is not delivered twice.
fn resend_dedup(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    let first = {
        let (mut a, _) = s.login(&alice, 3);
        let ack = a.send_wait(bob_id, 5, b"once").unwrap();
        let again = a.send_wait(bob_id, 5, b"once").unwrap();
        assert!(again.duplicate);
        assert_eq!((again.msg_id, again.seq, again.ts_ms), (ack.msg_id, ack.seq, ack.ts_ms));
        ack
    };
    // reconnect and resend
    let (mut a, _) = s.login(&alice, 3);
    let again = a.send_wait(bob_id, 5, b"once").unwrap();
    assert!(again.duplicate);
    assert_eq!((again.msg_id, again.seq), (first.msg_id, first.seq));
    let next = a.send_wait(bob_id, 6, b"twice").unwrap();
    assert_eq!(next.seq, first.seq + 1);
    assert_eq!(b.next_delivery().unwrap().body, b"once");
    assert_eq!(b.next_delivery().unwrap().body, b"twice");
    b.set_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    assert!(b.recv().is_err(), "the resend was not delivered");
}

/// Sends to nobody, with a too-large body or an unknown conversation kind get their codes; the
/// session stays usable.
fn send_refusals(driver: &str) {
    let s = TestServer::start(driver, "[limits]\nbody_bytes_max = 2048\nframe_bytes_max = 8192\ngroup_join_requests_max = 8\ngroup_page_max = 100\ngroup_add_batch_max = 300\ngroup_extra_bytes_max = 1024\n");
    let (alice, _) = s.register("alice");
    let (_, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    let err = a.send_wait(999_999, 1, b"x").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownRecipient));
    let err = a.send_wait(bob_id, 2, &vec![0u8; 2049]).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BodyTooLarge));
    a.send_frame(
        tim::protocol::kind::SEND,
        &tim::protocol::Send { conv: 9, flags: 0, burn_secs: 0, to: bob_id, client_msg_id: 3, body: vec![] },
    )
    .unwrap();
    match a.recv().unwrap() {
        tim::client::Event::Error(e) => {
            assert_eq!((e.code, e.client_msg_id), (ErrorCode::InvalidConversation as u16, 3))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(a.send_wait(bob_id, 4, &vec![7u8; 2048]).unwrap().seq, 1);
}

/// Messages to oneself reach one's other sessions and keep their own sequence.
fn note_to_self(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, alice_id) = s.register("alice");
    let (mut a1, _) = s.login(&alice, 1);
    let (mut a2, _) = s.login(&alice, 3);
    let ack = a1.send_wait(alice_id, 1, b"note").unwrap();
    assert_eq!(ack.seq, 1);
    let d = a2.next_delivery().unwrap();
    assert_eq!((d.stamp.from, d.stamp.to, d.body.as_slice()), (alice_id, alice_id, &b"note"[..]));
    a1.set_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    assert!(a1.recv().is_err());
}

on_both_drivers!(cross_shard_in_order, multi_device, resend_dedup, send_refusals, note_to_self);
