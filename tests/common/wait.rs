//! Waiting for what a test client gets: refusals, presence notices.

use std::time::Duration;

use tim::{
    client::{Client, ClientError, Event},
    protocol::{ErrorCode, PresenceEntry},
};

/// The error code a request was refused with (panics on success or another failure).
pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => ErrorCode::from_u16(code).expect("a known code"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The next presence notice `c` gets (deliveries, acks and roster notices on the way are
/// skipped).
pub fn next_presence(c: &mut Client) -> PresenceEntry {
    loop {
        match c.recv().expect("a presence notice") {
            Event::PresenceNotice(p) => return p,
            Event::CatchUpEnd(_) | Event::Deliver(_) | Event::SendAck(_) | Event::RosterNotice(_) => {}
            other => panic!("expected a presence notice, got {other:?}"),
        }
    }
}

/// The next presence notice of `user` in `state` (others skipped: friends may hear a state
/// twice, e.g. as a new friend and after a login).
pub fn wait_presence(c: &mut Client, user: u64, state: u8) -> PresenceEntry {
    loop {
        let p = next_presence(c);
        if p.user == user && p.state == state {
            return p;
        }
    }
}

/// No presence notice arrives at `c` within a short while (300 ms; its timeout is 10 s after).
pub fn no_presence(c: &mut Client) {
    c.set_timeout(Some(Duration::from_millis(300))).unwrap();
    loop {
        match c.recv() {
            Err(_) => break,
            Ok(Event::PresenceNotice(p)) => panic!("unexpected presence notice {p:?}"),
            Ok(_) => {}
        }
    }
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
}
