//! Typing notices over real sockets: to a 1:1 peer's sessions and to a group's members', never
//! stored, and every refusal (a bad conversation or state, a group the sender may not write to,
//! the per-session rate).

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{Client, Event},
    protocol::{conv, invite_policy, join_policy, ErrorCode, GroupProfile, TypingNotice},
};

/// The next typing notice `c` gets (skipping catch-up ends and group notices).
fn next_typing(c: &mut Client) -> TypingNotice {
    loop {
        match c.recv().expect("a typing notice") {
            Event::TypingNotice(t) => return t,
            Event::CatchUpEnd(_) | Event::Deliver(_) => {}
            other => panic!("expected a typing notice, got {other:?}"),
        }
    }
}

/// The next error `c` gets.
fn next_error(c: &mut Client) -> (u16, u16) {
    loop {
        match c.recv().expect("an error") {
            Event::Error(e) => return (e.code, e.request_kind),
            Event::CatchUpEnd(_) | Event::Deliver(_) | Event::TypingNotice(_) => {}
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

/// Nothing arrives at `c` within a short while.
fn quiet(c: &mut Client) {
    c.set_timeout(Some(Duration::from_millis(300))).unwrap();
    match c.recv() {
        Err(_) => {}
        Ok(Event::CatchUpEnd(_)) => quiet(c),
        Ok(other) => panic!("expected nothing, got {other:?}"),
    }
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
}

fn typing(driver: &str) {
    let s = TestServer::start(driver, "[limits]\ntyping_per_session_per_minute_max = 10\n");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, _) = s.register("carol");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b1, _) = s.login(&bob, 1);
    let (mut b2, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);
    // 1:1: both of bob's sessions, nobody else.
    a.typing(conv::DIRECT, bob_id, 1).unwrap();
    for b in [&mut b1, &mut b2] {
        assert_eq!(next_typing(b), TypingNotice { from: ann_id, to: bob_id, conv: conv::DIRECT, state: 1 });
    }
    a.typing(conv::DIRECT, bob_id, 0).unwrap();
    assert_eq!(next_typing(&mut b1).state, 0);
    assert_eq!(next_typing(&mut b2).state, 0);
    quiet(&mut c);
    // Never stored: a session of bob's that logs in later gets no catch-up of it.
    // A group: ann and bob are members, carol is not.
    let profile = GroupProfile {
        name: "typists".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    };
    let group = a.group_create(profile).unwrap();
    b1.group_action(group, tim::protocol::group_action::JOIN, 0, 0, "").unwrap();
    b1.typing(conv::GROUP, group, 1).unwrap();
    let t = next_typing(&mut a);
    assert_eq!((t.from, t.to, t.conv, t.state), (bob_id, group, conv::GROUP, 1));
    assert_eq!(next_typing(&mut b2).from, bob_id, "the sender's other session hears it");
    // Refusals.
    c.typing(conv::GROUP, group, 1).unwrap();
    assert_eq!(next_error(&mut c), (ErrorCode::NotMember.code(), tim::protocol::kind::TYPING));
    for (cv, to, state, code) in [
        (conv::DIRECT, 0, 1, ErrorCode::InvalidConversation),
        (conv::DIRECT, ann_id, 1, ErrorCode::InvalidConversation),
        (conv::GROUP, bob_id, 1, ErrorCode::InvalidConversation),
        (9, bob_id, 1, ErrorCode::InvalidConversation),
        (conv::DIRECT, bob_id, 2, ErrorCode::Malformed),
    ] {
        a.typing(cv, to, state).unwrap();
        assert_eq!(next_error(&mut a), (code.code(), tim::protocol::kind::TYPING), "{cv} {to} {state}");
    }
    // The rate: 10 a minute per session (carol's one refused notice counted).
    for _ in 0..9 {
        c.typing(conv::DIRECT, bob_id, 1).unwrap();
    }
    c.typing(conv::DIRECT, bob_id, 1).unwrap();
    assert_eq!(next_error(&mut c), (ErrorCode::RateLimited.code(), tim::protocol::kind::TYPING));
    c.ping(7).expect("the session stays");
    // A later session of bob's gets nothing of the earlier notices.
    let (mut b3, _) = s.login(&bob, 4);
    quiet(&mut b3);
}

on_both_drivers!(typing);
