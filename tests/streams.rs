//! Stream messages over real sockets: to a user's live sessions only, never stored, never
//! acknowledged; after every stored message sent before them in the same conversation; dropped
//! (counted, reported) for a session that reads too slowly; refusals with their codes.

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{Client, Event},
    protocol::{kind, missed, ErrorCode},
};

fn store_embedded() -> &'static str {
    "backend = \"embedded\"\nsynchronous = \"normal\""
}

/// The next event that is a delivery, a stream message, or `Missed`.
fn next_message(c: &mut Client) -> Event {
    loop {
        match c.recv().unwrap() {
            e @ (Event::Deliver(_) | Event::StreamMsg(_) | Event::Missed(_)) => return e,
            Event::SendAck(_) | Event::Pong(_) | Event::CatchUpEnd(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Streams and stored messages sent alternately arrive in the order they were sent; each
/// stream's stamp names the stored message it follows (`seq`) and has no id; the sender's other
/// session gets the streams too, the sending session does not; nothing of a stream is stored.
#[test]
fn streams_follow_stored_messages_and_are_not_stored() {
    let s = TestServer::start_with_store("io_uring", store_embedded(), "");
    let (a_name, _) = s.register("a");
    let (b_name, b_id) = s.register("b");
    let (mut a, _) = s.login(&a_name, 3);
    let (mut a2, _) = s.login(&a_name, 1);
    let (mut b, _) = s.login(&b_name, 3);
    for c in [&mut a, &mut a2, &mut b] {
        c.catch_up().unwrap();
    }
    for i in 1..=50u64 {
        a.send(b_id, i, format!("stored {i}").as_bytes()).unwrap();
        a.send_stream(b_id, 1000 + i, format!("stream {i}").as_bytes()).unwrap();
    }
    for i in 1..=50u64 {
        match next_message(&mut b) {
            Event::Deliver(d) => assert_eq!((d.stamp.seq, d.body), (i, format!("stored {i}").into_bytes())),
            other => panic!("expected stored message {i}, got {other:?}"),
        }
        match next_message(&mut b) {
            Event::StreamMsg(d) => {
                assert_eq!(d.body, format!("stream {i}").into_bytes());
                assert_eq!((d.stamp.msg_id, d.stamp.seq, d.client_msg_id), (0, i, 1000 + i));
            }
            other => panic!("expected stream {i}, got {other:?}"),
        }
    }
    // The sender's other session sees both kinds too.
    let streams_on_a2 = (0..100).filter(|_| matches!(next_message(&mut a2), Event::StreamMsg(_))).count();
    assert_eq!(streams_on_a2, 50);
    // Streams are not acknowledged: the sending session got 50 acks and nothing else.
    let mut acks = 0;
    a.set_timeout(Some(Duration::from_millis(500))).unwrap();
    while let Ok(ev) = a.recv() {
        match ev {
            Event::SendAck(_) => acks += 1,
            other => panic!("the sending session got {other:?}"),
        }
    }
    assert_eq!(acks, 50);
    // Not stored: history and a fresh device's catch-up hold the 50 stored messages only.
    let (page, _) = b.history(s_user(&mut a), 0, false, 200).unwrap();
    assert_eq!(page.len(), 50);
    assert!(page.iter().all(|d| d.body.starts_with(b"stored")));
    let mut fresh = s.client();
    fresh.login(&b_name, PASSWORD, 2, "fresh").unwrap();
    let (caught, _) = fresh.catch_up().unwrap();
    assert_eq!(caught.len(), 50);
}

/// A user's id, from a token (its first 16 hex digits).
fn s_user(c: &mut Client) -> u64 {
    let t = c.issue_token(1).unwrap();
    u64::from_str_radix(&t.token[..16], 16).unwrap()
}

/// A stream to an unknown user or with an oversized body is refused with its code and client
/// message id; a stream to a user with no live session goes nowhere, silently.
#[test]
fn stream_refusals() {
    let s = TestServer::start("io_uring", "");
    let (a_name, _) = s.register("a");
    let (_, offline) = s.register("offline");
    let (mut a, _) = s.login(&a_name, 3);
    let refused = |c: &mut Client, code: ErrorCode, cmid: u64| match c.recv().unwrap() {
        Event::Error(e) => {
            assert_eq!(
                (ErrorCode::from_u16(e.code), e.request_kind, e.client_msg_id),
                (Some(code), kind::STREAM, cmid)
            )
        }
        other => panic!("expected {code:?}, got {other:?}"),
    };
    a.send_stream(0, 1, b"x").unwrap();
    refused(&mut a, ErrorCode::UnknownRecipient, 1);
    a.send_stream(4096 * 77 + 5, 2, b"x").unwrap();
    refused(&mut a, ErrorCode::UnknownRecipient, 2);
    a.send_stream(offline, 3, &vec![0u8; 40_000]).unwrap();
    refused(&mut a, ErrorCode::BodyTooLarge, 3);
    a.send_stream(offline, 4, b"to nobody online").unwrap();
    assert_eq!(a.ping(9).unwrap().nonce, 9, "nothing answers a stream that went through");
}

/// A recipient that does not read misses stream messages (told with `Missed`) and is not
/// closed; the sender is not held up; every stored message still arrives.
#[test]
fn slow_reader_misses_streams() {
    let s = TestServer::start("io_uring", "[limits]\nroom_queue_frames_max = 16\n");
    let (a_name, a_id) = s.register("a");
    let (b_name, b_id) = s.register("b");
    let (mut a, _) = s.login(&a_name, 3);
    let (mut b, _) = s.login(&b_name, 3);
    // The conversation is loaded first: streams that arrive while it loads wait in a bounded
    // queue (beyond it they are refused Busy, as sends are).
    a.send_wait(b_id, 1, b"before the streams").unwrap();
    assert!(matches!(next_message(&mut b), Event::Deliver(_)));
    let body = vec![1u8; 8 * 1024];
    let total = 2000u64;
    for i in 1..=total {
        a.send_stream(b_id, i, &body).unwrap();
    }
    a.send_wait(b_id, 2, b"stored after the streams").unwrap();
    let (mut got, mut lost, mut stored) = (0u64, 0u64, 0);
    b.set_timeout(Some(Duration::from_secs(10))).unwrap();
    while stored == 0 || got + lost < total {
        match next_message(&mut b) {
            Event::StreamMsg(_) => got += 1,
            Event::Missed(m) => {
                assert_eq!((m.source, m.id), (missed::STREAM, a_id));
                lost += m.count;
            }
            Event::Deliver(d) => {
                assert_eq!(d.body, b"stored after the streams");
                stored += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got + lost, total);
    assert!(lost > 0, "a reader that did not keep up missed some");
    // Neither session was closed.
    assert_eq!(b.ping(1).unwrap().nonce, 1);
    assert_eq!(a.ping(2).unwrap().nonce, 2);
}
