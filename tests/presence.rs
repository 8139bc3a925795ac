//! Presence over real sockets: friends are told when a user comes online, changes its state or
//! text, turns invisible or goes offline with its last session; anyone may ask (up to
//! `presence_query_max` users), but an invisible user looks offline, and so does a user to those
//! it blocks; a new friend learns where the other stands; with `presence_auto_offline = false`
//! a set presence outlives the sessions. Every refusal.

mod common;
use std::time::Duration;

use common::{wait::*, *};
use tim::{
    client::{Client, Event},
    protocol::{presence_state as ps, roster_action as act, ErrorCode},
};

fn states(c: &mut Client, ids: &[u64]) -> Vec<u8> {
    c.presence_get(ids).unwrap().iter().map(|e| e.state).collect()
}

fn befriend(a: &mut Client, b: &mut Client, a_id: u64, b_id: u64) {
    a.roster_action(act::REQUEST, b_id, "").unwrap();
    b.roster_action(act::ACCEPT, a_id, "").unwrap();
}

#[test]
fn presence() {
    let s = TestServer::start("io_uring", "[limits]\npresence_query_max = 3\npresence_text_bytes_max = 8\n");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (dave, dave_id) = s.register("dave");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    befriend(&mut a, &mut b, ann_id, bob_id);
    // New friends learn where the other stands.
    let p = next_presence(&mut b);
    assert_eq!((p.user, p.state), (ann_id, ps::ONLINE));
    let p = next_presence(&mut a);
    assert_eq!((p.user, p.state), (bob_id, ps::ONLINE));
    a.logout().unwrap();
    let p = wait_presence(&mut b, ann_id, ps::OFFLINE);
    assert_eq!(p.text, "");
    // Ann logs in: bob (a friend) is told; carol (no friend) is not.
    let (mut c, _) = s.login(&carol, 3);
    let (mut a, _) = s.login(&ann, 3);
    wait_presence(&mut b, ann_id, ps::ONLINE);
    no_presence(&mut c);
    // A state with a text: answered, told to friends and to her other sessions.
    let (mut a2, _) = s.login(&ann, 1);
    let set = a.presence_set(ps::AWAY, "lunch", b"x").unwrap();
    assert_eq!((set.state, set.text.as_str(), set.extra.as_slice()), (ps::AWAY, "lunch", &b"x"[..]));
    assert_eq!(wait_presence(&mut b, ann_id, ps::AWAY).text, "lunch");
    assert_eq!(next_presence(&mut a2).state, ps::AWAY);
    // Anyone may ask, in the order asked; a user never seen is offline.
    assert_eq!(states(&mut c, &[bob_id, ann_id, dave_id]), [ps::ONLINE, ps::AWAY, ps::OFFLINE]);
    // Invisible: offline to everybody else, itself excepted.
    a.presence_set(ps::INVISIBLE, "", b"").unwrap();
    wait_presence(&mut b, ann_id, ps::OFFLINE);
    assert_eq!(states(&mut c, &[ann_id]), [ps::OFFLINE]);
    assert_eq!(states(&mut a, &[ann_id]), [ps::INVISIBLE]);
    a.presence_set(ps::BUSY, "", b"").unwrap();
    wait_presence(&mut b, ann_id, ps::BUSY);
    // A user sees offline whoever blocks it.
    a.roster_action(act::BLOCK, carol_id, "").unwrap();
    assert_eq!(states(&mut c, &[ann_id]), [ps::OFFLINE]);
    // A new friend learns where the other stands.
    let (mut d, _) = s.login(&dave, 3);
    d.roster_action(act::REQUEST, ann_id, "").unwrap();
    a.roster_action(act::ACCEPT, dave_id, "").unwrap();
    wait_presence(&mut d, ann_id, ps::BUSY);
    // Refusals.
    assert_eq!(code(a.presence_set(0, "", b"")), ErrorCode::InvalidPresence);
    assert_eq!(code(a.presence_set(5, "", b"")), ErrorCode::InvalidPresence);
    assert_eq!(code(a.presence_set(ps::AWAY, "123456789", b"")), ErrorCode::InvalidPresence);
    assert_eq!(code(a.presence_get(&[])), ErrorCode::InvalidPresence);
    assert_eq!(code(a.presence_get(&[1, 2, 3, 4])), ErrorCode::InvalidPresence);
    // The last session's end: offline, and the presence forgotten.
    drop(a2);
    a.logout().unwrap();
    wait_presence(&mut b, ann_id, ps::OFFLINE);
    let (_a, _) = s.login(&ann, 3);
    let p = next_presence(&mut b);
    assert_eq!((p.user, p.state), (ann_id, ps::ONLINE), "online again, not busy");
}

/// `presence_auto_offline = false`: a set presence outlives the sessions.
#[test]
fn presence_outlives_sessions() {
    let s = TestServer::start("io_uring", "[sessions]\npresence_auto_offline = false\n");
    let (ann, ann_id) = s.register("ann");
    let (bob, _) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    a.presence_set(ps::BUSY, "in a meeting", b"").unwrap();
    a.logout().unwrap();
    let e = b.presence_get(&[ann_id]).unwrap();
    assert_eq!((e[0].state, e[0].text.as_str()), (ps::BUSY, "in a meeting"));
}

/// `presence_coalesce_ms`: quick changes reach friends as few notices, the last being where the
/// user stands.
#[test]
fn presence_coalesced() {
    let s = TestServer::start("io_uring", "[limits]\npresence_coalesce_ms = 300\n");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    befriend(&mut a, &mut b, ann_id, bob_id);
    wait_presence(&mut b, ann_id, ps::ONLINE);
    // Whatever else the login and the new friendship bring (a repeat of ONLINE) comes first.
    b.set_timeout(Some(Duration::from_millis(700))).unwrap();
    while b.recv().is_ok() {}
    for (i, state) in [ps::AWAY, ps::BUSY, ps::AWAY, ps::BUSY, ps::AWAY].iter().enumerate() {
        a.presence_set(*state, &format!("change {i}"), b"").unwrap();
    }
    let mut got = Vec::new();
    b.set_timeout(Some(Duration::from_millis(800))).unwrap();
    while let Ok(ev) = b.recv() {
        if let Event::PresenceNotice(p) = ev {
            got.push((p.state, p.text));
        }
    }
    assert!(!got.is_empty() && got.len() <= 2, "{got:?}");
    assert_eq!(got.last().unwrap(), &(ps::AWAY, "change 4".to_string()));
}

/// Ask the admin API (no token on loopback in tests) to ban `user`; its HTTP status.
fn ban(s: &TestServer, user: u64) -> u16 {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.admin_addr.unwrap()).unwrap();
    let req = format!(
        "PUT /v1/bans/{user} HTTP/1.1\r\nHost: tim\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A banned user's friends see it go OFFLINE at once, even when set presences outlive sessions.
#[test]
fn banned_user_goes_offline() {
    for auto_offline in [true, false] {
        let s =
            TestServer::start("io_uring", &format!("[sessions]\npresence_auto_offline = {auto_offline}\n"));
        let (ann, ann_id) = s.register("ann");
        let (bob, bob_id) = s.register("bob");
        let (mut a, _) = s.login(&ann, 3);
        let (mut b, _) = s.login(&bob, 3);
        befriend(&mut a, &mut b, ann_id, bob_id);
        a.presence_set(ps::BUSY, "in a meeting", b"").unwrap();
        wait_presence(&mut b, ann_id, ps::BUSY);
        assert_eq!(ban(&s, ann_id), 200);
        let p = wait_presence(&mut b, ann_id, ps::OFFLINE);
        assert_eq!((p.user, p.text.as_str()), (ann_id, ""), "auto_offline {auto_offline}");
        assert_eq!(states(&mut b, &[ann_id]), vec![ps::OFFLINE]);
    }
}
