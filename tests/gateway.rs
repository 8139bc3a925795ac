//! The gateway's listeners over real sockets: WebSocket (binary v1 frames; JSON in
//! tests/gateway_json.rs), the binary protocol over TLS, WebSocket over TLS, certificate reload
//! on SIGHUP, the HTTP side of the WebSocket listener, and bad input on each, which never
//! disturbs other sessions.

mod common;
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::{gateway::*, *};
use tim::{
    client::{Client, Event},
    protocol::ErrorCode,
};
use tungstenite::{protocol::frame::coding::CloseCode, Message};

/// A TCP session and a WebSocket session of two users exchange messages both ways.
fn ws_binary_talks_with_tcp(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = ws_client(ws_connect(s.ws_addr.unwrap(), None));
    a.login(&alice, PASSWORD, 4, "browser").unwrap();
    let (mut b, _) = s.login(&bob, 3);
    for i in 1..=50u64 {
        let ack = a.send_wait(bob_id, i, format!("ws {i}").as_bytes()).unwrap();
        assert_eq!(ack.seq, i);
        let d = b.next_delivery().unwrap();
        assert_eq!((d.stamp.from, d.stamp.seq, d.body), (alice_id, i, format!("ws {i}").into_bytes()));
    }
    b.send_wait(alice_id, 1, b"from tcp").unwrap();
    let d = a.next_delivery().unwrap();
    assert_eq!((d.stamp.from, d.body.as_slice()), (bob_id, &b"from tcp"[..]));
    // Registration over the WebSocket too, and a ping.
    let mut c = ws_client(ws_connect(s.ws_addr.unwrap(), Some("tim.v1")));
    let carol = s.name("carol");
    assert!(c.register(&carol, PASSWORD).unwrap() > 0);
    assert_eq!(c.ping(7).unwrap().nonce, 7);
}

/// Requests that are not a WebSocket upgrade get HTTP status codes and a close; a silent
/// connection is closed at the handshake timeout; none of it disturbs a live session.
fn http_refusals(driver: &str) {
    let s = TestServer::start(driver, "[gateway]\nws_listen = \"127.0.0.1:0\"\nhandshake_timeout_ms = 300\n");
    let ws = s.ws_addr.unwrap();
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    let (mut b, _) = s.login(&bob, 3);
    let status = |bytes: &[u8]| {
        let out = raw_exchange(ws, bytes);
        String::from_utf8_lossy(&out).split_whitespace().nth(1).unwrap_or("").to_string()
    };
    assert_eq!(status(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"), "404");
    assert_eq!(status(b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n"), "405");
    assert_eq!(status(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"), "426");
    assert_eq!(status(b"\x16\x03\x01 not http at all\r\n\r\n"), "400");
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(status(big.as_bytes()), "431");
    // Silent, and half a request: closed at the handshake timeout without an answer.
    let started = std::time::Instant::now();
    assert!(raw_exchange(ws, b"").is_empty());
    assert!(raw_exchange(ws, b"GET /ws HTTP/1.1\r\n").is_empty());
    assert!(started.elapsed() < Duration::from_secs(5), "closed at the handshake timeout");
    a.send_wait(bob_id, 1, b"still here").unwrap();
    assert_eq!(b.next_delivery().unwrap().body, b"still here");
}

/// Broken WebSocket input closes that connection with the documented close code: an unmasked
/// client frame (1002), a message over the size cap (1009), a text that is not UTF-8 (1007), a
/// binary message cutting a frame (Error Malformed, then close). Other sessions go on.
fn ws_bad_input(driver: &str) {
    let s = TestServer::start(
        driver,
        "[limits]\nframe_bytes_max = 65536\nbody_bytes_max = 32768\npartial_frame_timeout_ms = 300\n",
    );
    let ws = s.ws_addr.unwrap();
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    let (mut b, _) = s.login(&bob, 3);
    let close_code = |raw: &[u8]| -> Option<u16> {
        // Upgrade by hand, then send `raw` as frame bytes and read the server's close frame.
        let mut t = TcpStream::connect(ws).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        t.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap();
        t.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = t.read_to_end(&mut out);
        let body = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| &out[i + 4..])?;
        // The close frame: 0x88, length, then the code (big-endian).
        let at = body.iter().position(|&b| b == 0x88)?;
        Some(u16::from_be_bytes([body[at + 2], body[at + 3]]))
    };
    // An unmasked binary frame of 4 bytes.
    assert_eq!(close_code(&[0x82, 0x04, 1, 2, 3, 4]), Some(1002));
    // A masked binary frame announcing 1 MiB (over the cap).
    let mut big = vec![0x82, 0x80 | 127];
    big.extend_from_slice(&(1u64 << 20).to_be_bytes());
    big.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(close_code(&big), Some(1009));
    // A masked text frame (mask 0) of invalid UTF-8.
    assert_eq!(close_code(&[0x81, 0x80 | 2, 0, 0, 0, 0, 0xff, 0xfe]), Some(1007));
    // Half a frame, then nothing: closed at partial_frame_timeout_ms (not the login timeout).
    let started = std::time::Instant::now();
    assert_eq!(close_code(&[0x82, 0x80 | 5, 0, 0]), Some(1000));
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    // Half a v1 frame in a binary message: Error Malformed, then the close.
    let mut w = ws_connect(ws, None);
    w.send(Message::Binary(vec![6u8, 0, 0, 0, 64, 0, 0, 0].into())).unwrap();
    let mut saw_error = false;
    loop {
        match w.read() {
            Ok(Message::Binary(f)) => {
                let h = tim::frame::Header::read(&f);
                saw_error |= h.kind == tim::protocol::kind::ERROR;
            }
            Ok(Message::Close(c)) => {
                assert_eq!(c.map(|c| c.code), Some(CloseCode::Normal));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(saw_error, "an Error frame before the close");
    // A frame over frame_bytes_max inside an allowed message: FrameTooLarge and close.
    let mut c = ws_client(ws_connect(ws, None));
    let mut header = vec![0u8; 8];
    tim::frame::Header { kind: tim::protocol::kind::SEND, flags: 0, len: 70_000 }.write(&mut header);
    c.write_raw(&header).unwrap();
    match c.recv() {
        Ok(Event::Error(e)) => assert_eq!(e.code, ErrorCode::FrameTooLarge.code()),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    a.send_wait(bob_id, 1, b"unharmed").unwrap();
    assert_eq!(b.next_delivery().unwrap().body, b"unharmed");
}

/// A cluster-free TLS setup in a test directory: the server's [tls] section and the DER to
/// trust.
fn tls_server(driver: &str) -> (TestServer, tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let der = write_certificate(dir.path());
    let extra = format!(
        "[tls]\ncert_file = \"{0}/cert.pem\"\nkey_file = \"{0}/key.pem\"\nlisten = \"127.0.0.1:0\"\n\
         ws_listen = \"127.0.0.1:0\"\n",
        dir.path().display()
    );
    (TestServer::start(driver, &extra), dir, der)
}

/// The binary protocol over TLS and WebSocket over TLS talk with plain TCP; a plain-text client
/// on the TLS port is closed without harm.
fn tls_listeners(driver: &str) {
    let (s, _dir, der) = tls_server(driver);
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let mut a = Client::over(Box::new(tls_connect(s.tls_addr.unwrap(), &der).unwrap())).unwrap();
    a.login(&alice, PASSWORD, 3, "tls").unwrap();
    let wss = tls_connect(s.wss_addr.unwrap(), &der).unwrap();
    let mut c = ws_client(ws_over(Box::new(wss), "localhost", None));
    c.login(&carol, PASSWORD, 4, "wss").unwrap();
    let (mut b, _) = s.login(&bob, 3);
    for i in 1..=20u64 {
        a.send_wait(bob_id, i, format!("tls {i}").as_bytes()).unwrap();
        assert_eq!(b.next_delivery().unwrap().body, format!("tls {i}").as_bytes());
    }
    b.send_wait(alice_id, 1, b"to tls").unwrap();
    assert_eq!(a.next_delivery().unwrap().body, b"to tls");
    c.send_wait(alice_id, 1, b"wss to tls").unwrap();
    let d = a.next_delivery().unwrap();
    assert_eq!((d.stamp.from, d.body.as_slice()), (carol_id, &b"wss to tls"[..]));
    // Plain v1 frames on the TLS port: not a TLS handshake; closed.
    let mut plain = Client::connect(s.tls_addr.unwrap()).unwrap();
    let refused = plain.login(&bob, PASSWORD, 3, "plain");
    assert!(refused.is_err(), "{refused:?}");
    a.send_wait(bob_id, 21, b"after").unwrap();
    assert_eq!(b.next_delivery().unwrap().body, b"after");
}

/// SIGHUP reloads the certificate: new connections get the new one (the old one is no longer
/// trusted by a client of the new), open sessions keep working; a broken file keeps the old.
fn tls_reload(driver: &str) {
    let (s, dir, old) = tls_server(driver);
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = Client::over(Box::new(tls_connect(s.tls_addr.unwrap(), &old).unwrap())).unwrap();
    a.login(&alice, PASSWORD, 3, "tls").unwrap();
    let new = write_certificate(dir.path());
    s.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tls_connect(s.tls_addr.unwrap(), &new).is_err() {
        assert!(std::time::Instant::now() < deadline, "the new certificate is served");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tls_connect(s.tls_addr.unwrap(), &old).is_err(), "the old certificate is gone");
    let (mut b, _) = s.login(&bob, 3);
    a.send_wait(bob_id, 1, b"same session").unwrap();
    assert_eq!(b.next_delivery().unwrap().body, b"same session");
    // A broken key file: the reload fails, the certificate in use stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    s.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    tls_connect(s.tls_addr.unwrap(), &new).unwrap();
}

on_both_drivers!(ws_binary_talks_with_tcp, http_refusals, ws_bad_input, tls_listeners, tls_reload);
