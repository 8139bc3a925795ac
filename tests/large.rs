//! Large messages over real sockets (PROTOCOL 5.22): a `Send` too large for one frame goes up in
//! `Part` frames and comes down in `PartOut` frames; it is stored and delivered like any message
//! (live, to other devices, at catch-up, in history, in groups, recalled), no frame of either
//! side is over `frame_bytes_max`, other frames interleave with its parts, and every refusal
//! (size, order, one at a time, the shard's memory, idle uploads, slow readers) is tested.

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{Client, ClientError, Delivery, Event},
    protocol::{
        self, conv, invite_policy, join_policy, kind, msg_state, part::PartHeader, ErrorCode, GroupProfile,
    },
};

/// A body of `n` bytes that no shifted or truncated copy matches.
fn body(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed).collect()
}

/// The code and request kind of the next error for `id`.
fn next_error(c: &mut Client, id: u64) -> (ErrorCode, u16) {
    loop {
        match c.recv().unwrap() {
            Event::Error(e) if e.client_msg_id == id => {
                return (ErrorCode::from_u16(e.code).expect("a known code"), e.request_kind)
            }
            Event::CatchUpEnd(_) | Event::Deliver(_) | Event::SendAck(_) => {}
            other => panic!("expected an error for {id}, got {other:?}"),
        }
    }
}

fn refused(r: Result<protocol::SendAck, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => ErrorCode::from_u16(code).expect("a known code"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A raw `Part` frame.
fn part(c: &mut Client, id: u64, total: u32, offset: u32, k: u16, data: &[u8]) {
    let h = PartHeader { id, total, offset, kind: k };
    c.write_raw(&tim::frame::raw(kind::PART, &[&h.bytes(), data])).unwrap();
}

/// The `Send` payload of a message, as a client would split it.
fn send_payload(to: u64, cmid: u64, body: &[u8]) -> Vec<u8> {
    let f = tim::frame::encode(
        kind::SEND,
        &protocol::Send {
            conv: conv::DIRECT,
            flags: 0,
            burn_secs: 0,
            to,
            client_msg_id: cmid,
            body: body.to_vec(),
        },
    );
    f[8..8 + tim::frame::payload_len(&f)].to_vec()
}

/// The next delivery of `seq`, keeping nothing else.
fn delivery_of(c: &mut Client, seq: u64) -> Delivery {
    loop {
        let d = c.next_delivery().unwrap();
        if d.stamp.seq == seq {
            return d;
        }
    }
}

fn one_to_one(store: &str) {
    let durable = store != "memory";
    let s = TestServer::start_with_store("io_uring", &pg::store_body(store), "");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a1, _) = s.login(&ann, 3);
    let (mut a2, _) = s.login(&ann, 1);
    let (mut b, _) = s.login(&bob, 3);
    if durable {
        for c in [&mut a1, &mut a2, &mut b] {
            c.catch_up().unwrap();
        }
    }
    // 3 MiB, in 49 parts up and 49 down: bob and ann's other device get it whole.
    let big = body(3 << 20, 1);
    let ack = a1.send_large_wait(conv::DIRECT, bob_id, 1, &big).unwrap();
    for c in [&mut b, &mut a2] {
        let d = delivery_of(c, ack.seq);
        assert_eq!((d.client_msg_id, d.body.len()), (1, big.len()));
        assert!(d.body == big, "the body arrives intact");
        assert!(c.parts_received >= 48, "{} parts", c.parts_received);
    }
    // A resend of the whole upload gets the original ack.
    let again = a1.send_large_wait(conv::DIRECT, bob_id, 1, &big).unwrap();
    assert!(again.duplicate && again.seq == ack.seq);
    // A small message afterwards is an ordinary one (and a small message may come in parts too).
    let small = a1.send_large_wait(conv::DIRECT, bob_id, 2, b"after").unwrap();
    assert_eq!(delivery_of(&mut b, small.seq).body, b"after");
    assert_eq!(small.seq, ack.seq + 1);

    if durable {
        // A device that was away gets it at catch-up, before CatchUpEnd; history shows it.
        let (mut b2, _) = s.login(&bob, 1);
        let (got, end) = b2.catch_up().unwrap();
        let bodies: Vec<usize> = got.iter().map(|d| d.body.len()).collect();
        assert_eq!(bodies, vec![big.len(), 5], "{end:?}");
        assert!(got[0].body == big);
        let (mut page, _) = b2.history(ann_id, 0, true, 10).unwrap();
        page.sort_by_key(|d| d.stamp.seq);
        assert_eq!(page.iter().map(|d| d.body.len()).collect::<Vec<_>>(), vec![big.len(), 5]);
        assert!(page[0].body == big);
        // Recalled, the large body is gone from the store like any other.
        a1.recall_wait(conv::DIRECT, bob_id, 3, ack.seq).unwrap();
        let (page, _) = b2.history(ann_id, 0, true, 10).unwrap();
        let first = page.iter().find(|d| d.stamp.seq == ack.seq).unwrap();
        assert_eq!((first.state, first.body.len()), (msg_state::RECALLED, 0));
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

#[test]
fn one_to_one_postgres() {
    one_to_one("postgres");
}

/// A large message in a group reaches every member; the largest body allowed passes, one byte
/// more does not.
#[test]
fn group_and_size_limit() {
    let s = TestServer::start_with_store("io_uring", &pg::store_body("embedded"), "");
    let (ann, _) = s.register("ann");
    let (bob, _) = s.register("bob");
    let (carol, _) = s.register("carol");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);
    for cl in [&mut a, &mut b, &mut c] {
        cl.catch_up().unwrap();
    }
    let profile = GroupProfile {
        name: "big files".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    };
    let group = a.group_create(profile).unwrap();
    for cl in [&mut b, &mut c] {
        cl.group_action(group, protocol::group_action::JOIN, 0, 0, "").unwrap();
    }
    let max = 8 << 20;
    let big = body(max, 7);
    let ack = a.send_large_wait(conv::GROUP, group, 10, &big).unwrap();
    for cl in [&mut b, &mut c] {
        let d = delivery_of(cl, ack.seq);
        assert!(d.body == big && d.stamp.to == group);
    }
    let code = refused(a.send_large_wait(conv::GROUP, group, 11, &body(max + 1, 7)));
    assert_eq!(code, ErrorCode::BodyTooLarge);
    // Checks of the Send itself still apply, with the Send's request kind.
    let code = refused(a.send_large_wait(conv::DIRECT, 0, 12, &body(100_000, 1)));
    assert_eq!(code, ErrorCode::UnknownRecipient);
    s.assert_serves_others();
}

/// Parts of a large message and other frames share the connection: a small message sent after
/// a large one, to a reader that was not reading, arrives before the large one is complete.
#[test]
fn other_frames_interleave() {
    let s = TestServer::start("io_uring", "");
    let (ann, _) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    // 24 MiB queued for bob: more than the sockets can buffer while he does not read.
    let big = body(8 << 20, 3);
    let larges: Vec<u64> =
        (1..=3).map(|i| a.send_large_wait(conv::DIRECT, bob_id, i, &big).unwrap().seq).collect();
    let small = a.send_wait(bob_id, 9, b"small one").unwrap();
    let mut got = Vec::new();
    let mut parts_at_small = 0;
    while got.len() < 4 {
        let d = b.next_delivery().unwrap();
        if d.stamp.seq == small.seq {
            parts_at_small = b.parts_received;
        } else {
            assert!(d.body == big);
        }
        got.push(d.stamp.seq);
    }
    let small_at = got.iter().position(|&s| s == small.seq).unwrap();
    assert!(small_at < 3, "the small message overtakes the large ones' parts: {got:?} {larges:?}");
    assert!(parts_at_small > 0 && b.parts_received > parts_at_small + 10);
}

/// Every refusal of a part, each with the session going on.
#[test]
fn refusals() {
    let s = TestServer::start("io_uring", "[limits]\nupload_idle_timeout_ms = 300\n");
    let (ann, _) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    let payload = send_payload(bob_id, 5, &body(200_000, 2));
    let total = payload.len() as u32;
    // Shorter than a part header.
    a.write_raw(&tim::frame::raw(kind::PART, &[&[0u8; 10]])).unwrap();
    assert_eq!(next_error(&mut a, 0), (ErrorCode::Malformed, kind::PART));
    // Only a Send may come in parts.
    part(&mut a, 5, total, 0, kind::STREAM, &payload[..1000]);
    assert_eq!(next_error(&mut a, 5), (ErrorCode::Malformed, kind::PART));
    // Over large_body_bytes_max (and its archive's few bytes).
    part(&mut a, 6, (8 << 20) + 65, 0, kind::SEND, &payload[..1000]);
    assert_eq!(next_error(&mut a, 6), (ErrorCode::BodyTooLarge, kind::PART));
    // A part that does not start an upload.
    part(&mut a, 7, total, 4096, kind::SEND, &payload[4096..8192]);
    assert_eq!(next_error(&mut a, 7), (ErrorCode::Malformed, kind::PART));
    // One upload at a time: a second one is refused, the first goes on.
    part(&mut a, 5, total, 0, kind::SEND, &payload[..4096]);
    part(&mut a, 8, total, 0, kind::SEND, &payload[..4096]);
    assert_eq!(next_error(&mut a, 8), (ErrorCode::UploadInProgress, kind::PART));
    // A gap drops the upload: its next part has nothing to add to.
    part(&mut a, 5, total, 8192, kind::SEND, &payload[8192..9000]);
    assert_eq!(next_error(&mut a, 5), (ErrorCode::Malformed, kind::PART));
    part(&mut a, 5, total, 4096, kind::SEND, &payload[4096..8192]);
    assert_eq!(next_error(&mut a, 5), (ErrorCode::Malformed, kind::PART));
    // Bytes past the declared total.
    part(&mut a, 9, 100, 0, kind::SEND, &payload[..200]);
    assert_eq!(next_error(&mut a, 9), (ErrorCode::Malformed, kind::PART));
    // A whole upload that is no Send archive: refused with the Send's request kind.
    let junk = vec![0xabu8; 100_000];
    part(&mut a, 10, junk.len() as u32, 0, kind::SEND, &junk[..60_000]);
    part(&mut a, 10, junk.len() as u32, 60_000, kind::SEND, &junk[60_000..]);
    assert_eq!(next_error(&mut a, 10), (ErrorCode::Malformed, kind::SEND));
    // A Send whose client_msg_id is not the parts' id.
    for at in (0..payload.len()).step_by(50_000) {
        let end = (at + 50_000).min(payload.len());
        part(&mut a, 11, total, at as u32, kind::SEND, &payload[at..end]);
    }
    assert_eq!(next_error(&mut a, 11), (ErrorCode::Malformed, kind::SEND));
    // An upload left idle past upload_idle_timeout_ms is dropped with Timeout.
    part(&mut a, 12, total, 0, kind::SEND, &payload[..4096]);
    assert_eq!(next_error(&mut a, 12), (ErrorCode::Timeout, kind::PART));
    part(&mut a, 12, total, 4096, kind::SEND, &payload[4096..8192]);
    assert_eq!(next_error(&mut a, 12), (ErrorCode::Malformed, kind::PART));
    // After all that, the session sends large and small messages, and bob got nothing else.
    let ok = a.send_large_wait(conv::DIRECT, bob_id, 5, &body(200_000, 2)).unwrap();
    let d = b.next_delivery().unwrap();
    assert_eq!((d.stamp.seq, d.client_msg_id, d.body.len()), (ok.seq, 5, 200_000));
    a.send_wait(bob_id, 13, b"still here").unwrap();
    assert_eq!(b.next_delivery().unwrap().body, b"still here");
    s.assert_serves_others();
}

/// The shard's memory for large messages is bounded: a second upload on the same shard beyond
/// `large_shard_bytes_max` gets Busy until the first is answered.
#[test]
fn shard_memory_cap() {
    let cfg = "[limits]\nlarge_body_bytes_max = 1048576\nlarge_shard_bytes_max = 1500000\n\
               session_large_outbound_bytes_max = 1049600\n";
    let s = TestServer::start("io_uring", cfg);
    let (ann, _) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let mut a1 = s.login_on_shard(&ann, 3, 0);
    let mut a2 = s.login_on_shard(&ann, 1, 0);
    let (mut b, _) = s.login(&bob, 3);
    let payload = send_payload(bob_id, 1, &body(1 << 20, 4));
    let total = payload.len() as u32;
    part(&mut a1, 1, total, 0, kind::SEND, &payload[..60_000]);
    a1.ping(1).unwrap();
    let code = refused(a2.send_large_wait(conv::DIRECT, bob_id, 2, &body(1 << 20, 5)));
    assert_eq!(code, ErrorCode::Busy);
    // The first upload completes; once answered, its memory is free for the next.
    let mut at = 60_000;
    while at < payload.len() {
        let end = (at + 60_000).min(payload.len());
        part(&mut a1, 1, total, at as u32, kind::SEND, &payload[at..end]);
        at = end;
    }
    let ack = loop {
        match a1.recv().unwrap() {
            Event::SendAck(ack) => break ack,
            Event::Pong(_) => {}
            other => panic!("expected the ack, got {other:?}"),
        }
    };
    assert!(b.next_delivery().unwrap().body == body(1 << 20, 4));
    // (The refused upload's later parts were refused too, with Malformed: a client stops at the
    // first refusal; this one did not.)
    let second = a2.send_large_wait(conv::DIRECT, bob_id, 3, &body(1 << 20, 5)).unwrap();
    assert_eq!(second.seq, ack.seq + 1);
}

/// A reader too slow for the large frames queued for it is closed as a slow consumer; the
/// sender and everyone else go on.
#[test]
fn slow_reader_of_large_frames() {
    let cfg = "[limits]\nlarge_body_bytes_max = 1048576\nsession_large_outbound_bytes_max = 1049600\n";
    let s = TestServer::start("io_uring", cfg);
    let (ann, _) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(Duration::from_secs(20))).unwrap();
    // bob reads nothing: the first large frame is still queued when the next ones come.
    for i in 0..16 {
        a.send_large_wait(conv::DIRECT, bob_id, 1 + i, &body(1 << 20, i as u8)).unwrap();
    }
    let code = loop {
        match b.recv() {
            Ok(Event::Error(e)) => break e.code,
            Ok(_) => {}
            Err(e) => panic!("expected SlowConsumer, got {e}"),
        }
    };
    assert_eq!(ErrorCode::from_u16(code), Some(ErrorCode::SlowConsumer));
    assert!(matches!(b.recv(), Err(ClientError::Closed | ClientError::Io(_))));
    a.send_wait(bob_id, 9, b"bob will see this at his next login").unwrap();
    s.assert_serves_others();
}
