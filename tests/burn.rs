//! Burn after read over real sockets, on the durable stores: a 1:1 message sent with the
//! BURN_AFTER_READ flag is deleted from the store (a tombstone, state BURNED) once its recipient
//! reads it, or when its lifetime (`burn_secs`) ends unread; both users' sessions get a burn
//! notice listing the seqs; other messages stay. Refusals: in a group, and a lifetime without
//! the flag.

mod common;
use std::time::{Duration, Instant};

use common::*;
use tim::{
    client::{Client, ClientError, Delivery, Event},
    protocol::{
        self, conv, invite_policy, join_policy, kind, msg_state, send_flags, ErrorCode, GroupProfile,
    },
};

/// Send a flagged message and wait for its ack or error.
fn send_burn(
    c: &mut Client,
    conv: u8,
    to: u64,
    cmid: u64,
    body: &[u8],
    burn_secs: u32,
) -> Result<protocol::SendAck, ClientError> {
    let flags = send_flags::BURN_AFTER_READ;
    c.send_frame(
        kind::SEND,
        &protocol::Send { conv, flags, burn_secs, to, client_msg_id: cmid, body: body.to_vec() },
    )?;
    loop {
        match c.recv()? {
            Event::SendAck(a) if a.client_msg_id == cmid => return Ok(a),
            Event::Error(e) if e.client_msg_id == cmid => {
                return Err(ClientError::Server {
                    code: e.code,
                    name: ErrorCode::from_u16(e.code),
                    message: e.message,
                })
            }
            _ => {}
        }
    }
}

/// The next burn notice `c` gets, within 15 s.
fn next_burn(c: &mut Client) -> Delivery {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let d = c.next_delivery().unwrap();
        if d.flags == send_flags::BURNED {
            return d;
        }
    }
    panic!("no burn notice");
}

fn burned_seqs(d: &Delivery) -> Vec<u64> {
    d.body.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn burn(store: &str) {
    let body = pg::store_body(store);
    let s = TestServer::start_with_store("io_uring", &body, "[limits]\ncursor_flush_ms = 50\n");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    // Burned once read: the recipient sees the flag; its read burns it (not the plain one).
    let secret = send_burn(&mut a, conv::DIRECT, bob_id, 1, b"self-destructs", 0).unwrap();
    let plain = a.send_wait(bob_id, 2, b"stays").unwrap();
    let d = b.next_delivery().unwrap();
    assert_eq!(
        (d.flags, d.burn_secs, d.body.as_slice()),
        (send_flags::BURN_AFTER_READ, 0, &b"self-destructs"[..])
    );
    b.read(conv::DIRECT, ann_id, plain.seq).unwrap();
    for c in [&mut a, &mut b] {
        let n = next_burn(c);
        assert_eq!((n.stamp.from, n.stamp.to, burned_seqs(&n)), (bob_id, ann_id, vec![secret.seq]));
    }
    let (page, _) = a.history(bob_id, 0, true, 50).unwrap();
    let m = page.iter().find(|m| m.stamp.seq == secret.seq).unwrap();
    assert_eq!((m.state, m.body.len(), m.flags), (msg_state::BURNED, 0, send_flags::BURN_AFTER_READ));
    let p = page.iter().find(|m| m.stamp.seq == plain.seq).unwrap();
    assert_eq!((p.state, p.body.as_slice()), (msg_state::PLAIN, &b"stays"[..]));
    // The sender's own read burns nothing of its own messages.
    let mine = send_burn(&mut a, conv::DIRECT, bob_id, 3, b"mine", 0).unwrap();
    a.read(conv::DIRECT, bob_id, mine.seq).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (page, _) = b.history(ann_id, 0, true, 50).unwrap();
    assert_eq!(page.iter().find(|m| m.stamp.seq == mine.seq).unwrap().state, msg_state::PLAIN);
    // A lifetime burns it unread.
    let short = send_burn(&mut a, conv::DIRECT, bob_id, 4, b"one second", 1).unwrap();
    let n = next_burn(&mut a);
    assert_eq!(burned_seqs(&n), vec![short.seq]);
    let (page, _) = b.history(ann_id, 0, true, 50).unwrap();
    assert_eq!(page.iter().find(|m| m.stamp.seq == short.seq).unwrap().state, msg_state::BURNED);
    // Refusals: burn after read in a group; a lifetime without the flag.
    let profile = GroupProfile {
        name: "g".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    };
    let g = a.group_create(profile).unwrap();
    match send_burn(&mut a, conv::GROUP, g, 5, b"x", 0) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::BurnNotAllowed.code()),
        other => panic!("expected BurnNotAllowed, got {other:?}"),
    }
    let lifetime_only = protocol::Send {
        conv: conv::DIRECT,
        flags: 0,
        burn_secs: 5,
        to: bob_id,
        client_msg_id: 6,
        body: vec![],
    };
    a.send_frame(kind::SEND, &lifetime_only).unwrap();
    loop {
        if let Event::Error(e) = a.recv().unwrap() {
            assert_eq!((e.code, e.client_msg_id), (ErrorCode::Malformed.code(), 6));
            break;
        }
    }
}

#[test]
fn burn_embedded() {
    burn("embedded");
}

#[test]
fn burn_postgres() {
    burn("postgres");
}
