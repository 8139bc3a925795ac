//! Costly requests are budgeted: registrations and sends to accounts that do not exist are
//! limited per connection and per source address (docs/PROTOCOL.md 8.11, code 47).

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{ClientError, Event},
    protocol::ErrorCode,
};

fn rate_limited<T: std::fmt::Debug>(r: Result<T, ClientError>) {
    match r {
        Err(ClientError::Server { name: Some(ErrorCode::RateLimited), .. }) => {}
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

/// One connection registers at most `registrations_per_connection_max` accounts; the
/// connection stays usable.
#[test]
fn registrations_per_connection() {
    let s = TestServer::start("io_uring", "");
    let mut c = s.client();
    for i in 0..3 {
        c.register(&format!("reg-{i}"), PASSWORD).unwrap();
    }
    rate_limited(c.register("reg-3", PASSWORD));
    assert!(c.ping(1).is_ok());
    // another connection may
    s.client().register("reg-3", PASSWORD).unwrap();
}

/// One source address gets at most `registrations_per_address_per_minute_max` registrations
/// per shard per minute (loopback counts here: the exemption is turned off).
#[test]
fn registrations_per_address() {
    let s = TestServer::start(
        "io_uring",
        "[limits]\nrate_limit_exempt_loopback = false\nregistrations_per_address_per_minute_max = 2\n",
    );
    let mut limited = 0;
    // 2 shards × 2 allowed: a fifth registration over fresh connections is refused somewhere.
    for i in 0..8 {
        match s.client().register(&format!("addr-{i}"), PASSWORD) {
            Ok(_) => {}
            Err(ClientError::Server { name: Some(ErrorCode::RateLimited), .. }) => limited += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(limited >= 4, "{limited} of 8 refused");
}

/// A connection that keeps sending to accounts that do not exist (each a store lookup) is
/// closed with RateLimited once over `unknown_recipients_per_connection_per_minute_max`; other
/// sessions are untouched.
#[test]
fn unknown_recipients_close_the_connection() {
    let s = TestServer::start("io_uring", "[limits]\nunknown_recipients_per_connection_per_minute_max = 5\n");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    a.set_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 1..=6u64 {
        a.send(9_000_000 + i, i, b"anyone?").unwrap();
    }
    let mut unknown = 0;
    loop {
        match a.recv() {
            Ok(Event::Error(e)) if e.code == ErrorCode::UnknownRecipient as u16 => unknown += 1,
            Ok(Event::Error(e)) if e.code == ErrorCode::RateLimited as u16 => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("closed without RateLimited after {unknown} refusals: {e:?}"),
        }
    }
    assert_eq!(unknown, 6);
    assert!(a.recv().is_err(), "closed");
    s.assert_serves_others();
}
