//! Bad input over real sockets: every kind gets its error code or a close, the server keeps
//! serving every other session, and nothing crashes.

mod common;
use std::{
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use tim::{
    client::Event,
    frame::Header,
    protocol::{kind, ErrorCode},
};

fn header(len: u32, k: u16, flags: u16) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    Header { len, kind: k, flags }.write(&mut h);
    h
}

fn expect_error(ev: Event, code: ErrorCode) {
    match ev {
        Event::Error(e) => assert_eq!(e.code, code as u16, "{e:?}"),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

/// A frame over the cap gets FrameTooLarge and a close; others keep being served.
fn frame_over_cap(driver: &str) {
    let s = TestServer::start(driver, "[limits]\nframe_bytes_max = 4096\nbody_bytes_max = 2048\ngroup_join_requests_max = 8\ngroup_page_max = 100\ngroup_add_batch_max = 300\ngroup_extra_bytes_max = 1024\n");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    a.write_raw(&header(4097, kind::SEND, 0)).unwrap();
    expect_error(a.recv().unwrap(), ErrorCode::FrameTooLarge);
    assert!(a.recv().is_err(), "closed");
    // the cap applies before login too
    let mut c = s.client();
    c.write_raw(&header(u32::MAX, kind::REGISTER, 0)).unwrap();
    expect_error(c.recv().unwrap(), ErrorCode::FrameTooLarge);
    assert!(c.recv().is_err());
    s.assert_serves_others();
}

/// Random bytes get an error and a close (or just a close), never a crash.
fn random_bytes(driver: &str) {
    let s = TestServer::start(driver, "");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..20 {
        let mut junk = vec![0u8; 64 + round * 97];
        for b in junk.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        let mut c = s.client();
        c.set_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_raw(&junk);
        // Whatever the junk said, the server answers with errors and/or closes, or waits for the
        // rest of a frame; it never answers with anything else.
        loop {
            match c.recv() {
                Ok(Event::Error(_)) => continue,
                Ok(other) => panic!("unexpected answer to junk: {other:?}"),
                Err(_) => break,
            }
        }
    }
    s.assert_serves_others();
}

/// A well-formed frame of an unknown kind gets UnknownKind and the session carries on.
fn unknown_kind(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    let mut f = header(8, 999, 0);
    f.extend_from_slice(&[0u8; 8]);
    a.write_raw(&f).unwrap();
    expect_error(a.recv().unwrap(), ErrorCode::UnknownKind);
    // a server-to-client kind sent by a client is unknown too
    let mut f = header(8, kind::PONG, 0);
    f.extend_from_slice(&[0u8; 8]);
    a.write_raw(&f).unwrap();
    expect_error(a.recv().unwrap(), ErrorCode::UnknownKind);
    assert_eq!(a.ping(5).unwrap().nonce, 5, "the session still works");
}

/// A payload that is not a valid archive of its kind gets Malformed; the session carries on.
fn malformed_payload(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    // A Send archive whose body vector points far outside the payload.
    let mut f = header(32, kind::SEND, 0);
    let mut p = [0u8; 32];
    p[24..28].copy_from_slice(&(-1000i32).to_le_bytes());
    p[28..32].copy_from_slice(&100u32.to_le_bytes());
    f.extend_from_slice(&p);
    a.write_raw(&f).unwrap();
    expect_error(a.recv().unwrap(), ErrorCode::Malformed);
    // A valid Send archive with unreferenced bytes in front of it: they would travel to every
    // recipient, so it is refused.
    let (_, bob_id) = s.register("bob");
    let send = tim::protocol::Send {
        conv: 1,
        flags: 0,
        burn_secs: 0,
        to: bob_id,
        client_msg_id: 8,
        body: b"x".to_vec(),
    };
    let plain = tim::frame::encode(kind::SEND, &send);
    let archive_len = u32::from_le_bytes(plain[0..4].try_into().unwrap()) as usize;
    let mut padded = vec![0u8; 200];
    padded.extend_from_slice(&plain[8..8 + archive_len]);
    let mut f = header(padded.len() as u32, kind::SEND, 0);
    f.extend_from_slice(&padded);
    f.resize(tim::frame::frame_bytes(padded.len()), 0);
    a.write_raw(&f).unwrap();
    match a.recv().unwrap() {
        Event::Error(e) => assert_eq!((e.code, e.client_msg_id), (ErrorCode::BodyTooLarge as u16, 8)),
        other => panic!("unexpected {other:?}"),
    }
    // non-zero flags are refused and close the connection
    let mut c = s.client();
    c.write_raw(&header(0, kind::PING, 1)).unwrap();
    expect_error(c.recv().unwrap(), ErrorCode::BadHeader);
    assert!(c.recv().is_err());
    assert_eq!(a.ping(6).unwrap().nonce, 6);
}

/// Operations before login get NotLoggedIn and do nothing.
fn before_login(driver: &str) {
    let s = TestServer::start(driver, "");
    let (_, bob_id) = s.register("bob");
    let mut c = s.client();
    c.send(bob_id, 1, b"sneaky").unwrap();
    match c.recv().unwrap() {
        Event::Error(e) => assert_eq!((e.code, e.request_kind), (ErrorCode::NotLoggedIn as u16, kind::SEND)),
        other => panic!("unexpected {other:?}"),
    }
    c.delivery_ack(bob_id, 1).unwrap();
    expect_error(c.recv().unwrap(), ErrorCode::NotLoggedIn);
    assert_eq!(c.ping(1).unwrap().nonce, 1, "ping is allowed before login");
}

/// A truncated frame followed by a close leaves the server serving others.
fn truncated_then_close(driver: &str) {
    let s = TestServer::start(driver, "");
    for cut in [3usize, 8, 12] {
        let mut raw = TcpStream::connect(s.addr).unwrap();
        let mut f = tim::frame::encode(kind::PING, &tim::protocol::Ping { nonce: 1 });
        f.truncate(cut);
        raw.write_all(&f).unwrap();
        drop(raw);
    }
    // a half-written large frame, then close, while logged in
    let (alice, _) = s.register("alice");
    let (a, _) = s.login(&alice, 3);
    let mut f = header(20_000, kind::SEND, 0);
    f.extend_from_slice(&[0u8; 10_000]);
    let mut stream = a.stream().try_clone().unwrap();
    stream.write_all(&f).unwrap();
    drop(stream);
    drop(a);
    s.assert_serves_others();
}

/// A client that never reads is closed as a slow consumer (after an Error frame) without hurting
/// the sender or anyone else.
fn slow_consumer(driver: &str) {
    let s = TestServer::start(
        driver,
        "[limits]\nsession_outbound_bytes_max = 131072\nframe_bytes_max = 65536\nbody_bytes_max = 32768\n",
    );
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    let (mut b, _) = s.login(&bob, 3);
    let body = vec![1u8; 30_000];
    const N: u64 = 400; // 12 MB: far more than socket buffers plus the 128 KiB queue
    for i in 1..=N {
        a.send_wait(bob_id, i, &body).unwrap_or_else(|e| panic!("sender affected: {e}"));
    }
    let (mut delivered, mut told) = (0u64, false);
    loop {
        match b.recv() {
            Ok(Event::Deliver(_)) => delivered += 1,
            Ok(Event::Error(e)) if e.code == ErrorCode::SlowConsumer as u16 => told = true,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(told, "the slow reader was told why");
    assert!(delivered < N, "the slow reader was cut off ({delivered} delivered)");
    s.assert_serves_others();
}

/// A frame begun and never finished closes the session with PartialFrameTimeout after
/// `partial_frame_timeout_ms`, long before the idle timeout, logged in or not, even if its bytes
/// trickle in; a session that sent whole frames and then nothing stays.
fn partial_frame_times_out(driver: &str) {
    let s = TestServer::start(driver, "[limits]\npartial_frame_timeout_ms = 300\n");
    let (alice, _) = s.register("alice");
    let (mut quiet, _) = s.login(&alice, 1);
    let closed_by_partial_timeout = |c: &mut tim::client::Client, start: Instant| {
        expect_error(c.recv().unwrap(), ErrorCode::PartialFrameTimeout);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "{waited:?}");
        assert!(c.recv().is_err(), "closed");
    };
    // logged in: a Send header announcing 20000 bytes, and 100 of them
    let (mut a, _) = s.login(&alice, 3);
    a.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let mut f = header(20_000, kind::SEND, 0);
    f.extend_from_slice(&[0u8; 100]);
    a.write_raw(&f).unwrap();
    closed_by_partial_timeout(&mut a, start);
    // before login: part of a header, or a whole header and nothing after it
    for cut in [3usize, 8] {
        let mut c = s.client();
        c.set_timeout(Some(Duration::from_secs(10))).unwrap();
        let start = Instant::now();
        c.write_raw(&header(8, kind::PING, 0)[..cut]).unwrap();
        closed_by_partial_timeout(&mut c, start);
    }
    // bytes that keep coming without completing the frame do not restart the clock
    let (mut t, _) = s.login(&alice, 4);
    t.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    t.write_raw(&header(20_000, kind::SEND, 0)).unwrap();
    let mut stream = t.stream().try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            if stream.write_all(&[0u8; 8]).is_err() {
                break;
            }
        }
    });
    closed_by_partial_timeout(&mut t, start);
    trickle.join().unwrap();
    assert_eq!(quiet.ping(1).unwrap().nonce, 1, "a session without a partial frame stays");
    s.assert_serves_others();
}

on_both_drivers!(
    frame_over_cap,
    random_bytes,
    unknown_kind,
    malformed_payload,
    before_login,
    truncated_then_close,
    slow_consumer,
    partial_frame_times_out
);
