//! The roster over real sockets, on every store: friend requests with a note, accept, reject,
//! cancel, remove, block and unblock; both users' sessions are told; the lists; a block stops
//! the blocked user's messages and requests; `messages.require_friendship`; every refusal; and
//! (durable stores) the roster surviving a restart. Presence watches: asked, allowed or denied,
//! withdrawn, revoked, ended by a block; the watcher sees the presence (and only it does).

mod common;
use std::time::Duration;

use common::{wait::*, *};
use tim::{
    client::{Client, Event},
    protocol::{presence_state as ps, roster_action as act, roster_list as list, ErrorCode, RosterNotice},
};

/// The next roster notice `c` gets.
fn next_notice(c: &mut Client) -> RosterNotice {
    loop {
        match c.recv().expect("a roster notice") {
            Event::RosterNotice(n) => return n,
            // Friends' presence comes too (tests/presence.rs).
            Event::CatchUpEnd(_) | Event::Deliver(_) | Event::SendAck(_) | Event::PresenceNotice(_) => {}
            other => panic!("expected a roster notice, got {other:?}"),
        }
    }
}

/// The next roster notice of `event` (earlier ones skipped).
fn wait_notice(c: &mut Client, event: u8) -> RosterNotice {
    loop {
        let n = next_notice(c);
        if n.event == event {
            return n;
        }
    }
}

/// No roster notice arrives at `c` within a short while.
fn no_notice(c: &mut Client) {
    c.set_timeout(Some(Duration::from_millis(300))).unwrap();
    loop {
        match c.recv() {
            Err(_) => break,
            Ok(Event::RosterNotice(n)) => panic!("unexpected roster notice {n:?}"),
            Ok(_) => {}
        }
    }
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
}

fn users(c: &mut Client, which: u8) -> Vec<u64> {
    c.roster_get(which, 0, 0).unwrap().entries.iter().map(|e| e.user).collect()
}

fn roster(store: &str) {
    let body = pg::store_body(store);
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir, "io_uring", &body, "");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (mut a1, _) = s.login(&ann, 3);
    let (mut a2, _) = s.login(&ann, 1);
    let (mut b, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);

    // A request with a note: bob and ann's other session are told.
    let ok = a1.roster_action(act::REQUEST, bob_id, "hi, it's ann").unwrap();
    assert!(!ok.friends);
    let want = RosterNotice { event: act::REQUEST, from: ann_id, to: bob_id, note: "hi, it's ann".into() };
    assert_eq!(next_notice(&mut b), want);
    assert_eq!(next_notice(&mut a2), want);
    let incoming = b.roster_get(list::INCOMING, 0, 0).unwrap();
    assert_eq!(incoming.entries.len(), 1);
    assert_eq!((incoming.entries[0].user, incoming.entries[0].note.as_str()), (ann_id, "hi, it's ann"));
    assert_eq!(users(&mut a1, list::OUTGOING), [bob_id]);
    // Accept: friends on both sides.
    assert!(b.roster_action(act::ACCEPT, ann_id, "").unwrap().friends);
    assert_eq!(next_notice(&mut a1).event, act::ACCEPT);
    assert_eq!(users(&mut a1, list::FRIENDS), [bob_id]);
    assert_eq!(users(&mut b, list::FRIENDS), [ann_id]);
    assert!(users(&mut b, list::INCOMING).is_empty());

    // Refusals.
    assert_eq!(code(a1.roster_action(act::REQUEST, bob_id, "")), ErrorCode::AlreadyFriends);
    assert_eq!(code(a1.roster_action(act::ACCEPT, carol_id, "")), ErrorCode::NoFriendRequest);
    assert_eq!(code(a1.roster_action(act::REMOVE, carol_id, "")), ErrorCode::NotFriends);
    assert_eq!(code(a1.roster_action(act::REQUEST, ann_id, "")), ErrorCode::InvalidRoster);
    assert_eq!(code(a1.roster_action(99, bob_id, "")), ErrorCode::InvalidRoster);
    assert_eq!(code(a1.roster_action(act::REQUEST, 1 << 62, "")), ErrorCode::InvalidRoster);
    assert_eq!(code(a1.roster_action(act::REQUEST, bob_id, &"x".repeat(257))), ErrorCode::InvalidRoster);
    assert_eq!(
        code(a1.roster_action(act::REQUEST, carol_id.wrapping_add(4096 * 1000), "")),
        ErrorCode::UnknownUser
    );
    assert_eq!(code(a1.roster_get(8, 0, 0)), ErrorCode::InvalidRoster);

    // Carol asks ann, then cancels; asks again, ann rejects.
    c.roster_action(act::REQUEST, ann_id, "").unwrap();
    assert_eq!(next_notice(&mut a1).event, act::REQUEST);
    c.roster_action(act::CANCEL, ann_id, "").unwrap();
    assert_eq!(next_notice(&mut a1).event, act::CANCEL);
    assert!(users(&mut a1, list::INCOMING).is_empty());
    c.roster_action(act::REQUEST, ann_id, "again").unwrap();
    assert_eq!(next_notice(&mut a1).note, "again");
    a1.roster_action(act::REJECT, carol_id, "").unwrap();
    assert_eq!(next_notice(&mut c).event, act::REJECT);

    // Ann blocks carol: carol's messages and requests to ann are refused; ann may still write.
    // Ann's other session hears of the block; carol does not.
    a1.roster_action(act::BLOCK, carol_id, "").unwrap();
    no_notice(&mut c);
    assert_eq!(
        wait_notice(&mut a2, act::BLOCK),
        RosterNotice { event: act::BLOCK, from: ann_id, to: carol_id, note: String::new() }
    );
    assert_eq!(users(&mut a1, list::BLOCKED), [carol_id]);
    assert_eq!(code(c.send_wait(ann_id, 1, b"let me in")), ErrorCode::Blocked);
    assert_eq!(code(c.roster_action(act::REQUEST, ann_id, "")), ErrorCode::Blocked);
    a1.send_wait(carol_id, 1, b"goodbye").unwrap();
    // Unblocked: carol's messages go through again.
    a1.roster_action(act::UNBLOCK, carol_id, "").unwrap();
    wait_notice(&mut a2, act::UNBLOCK);
    c.send_wait(ann_id, 2, b"hello again").unwrap();
    assert!(users(&mut a1, list::BLOCKED).is_empty());

    // Blocking a friend ends the friendship; bob learns only that he was removed.
    a1.roster_action(act::BLOCK, bob_id, "").unwrap();
    assert_eq!(
        next_notice(&mut b),
        RosterNotice { event: act::REMOVE, from: ann_id, to: bob_id, note: String::new() }
    );
    assert!(users(&mut b, list::FRIENDS).is_empty());
    assert_eq!(code(b.send_wait(ann_id, 9, b"?")), ErrorCode::Blocked);
    a1.roster_action(act::UNBLOCK, bob_id, "").unwrap();
    // Friends again, then removed by bob.
    b.roster_action(act::REQUEST, ann_id, "").unwrap();
    a1.roster_action(act::REQUEST, bob_id, "").unwrap(); // asks back: accepts
    assert_eq!(users(&mut b, list::FRIENDS), [ann_id]);
    b.roster_action(act::REMOVE, ann_id, "").unwrap();
    assert!(users(&mut a1, list::FRIENDS).is_empty());
    b.roster_action(act::REQUEST, ann_id, "").unwrap();
    a1.roster_action(act::ACCEPT, bob_id, "").unwrap();

    // The durable stores keep it all across a restart.
    if store != "memory" {
        drop((a1, a2, b, c));
        let dir = s.stop_keep();
        let s = TestServer::start_in(dir, "io_uring", &body, "");
        let (mut a, _) = s.login(&ann, 3);
        assert_eq!(users(&mut a, list::FRIENDS), [bob_id]);
        a.roster_action(act::BLOCK, carol_id, "").unwrap();
        let (mut c, _) = s.login(&carol, 3);
        assert_eq!(code(c.send_wait(ann_id, 3, b"?")), ErrorCode::Blocked);
    }
}

/// Both a roster notice of `event` and a presence notice of `user` in `state`, in either order.
fn wait_notice_and_presence(c: &mut Client, event: u8, user: u64, state: u8) {
    let (mut notice, mut presence) = (false, false);
    while !(notice && presence) {
        match c.recv().expect("notices") {
            Event::RosterNotice(n) if n.event == event => notice = true,
            Event::PresenceNotice(p) if p.user == user && p.state == state => presence = true,
            Event::PresenceNotice(_) | Event::RosterNotice(_) | Event::CatchUpEnd(_) => {}
            other => panic!("expected notices, got {other:?}"),
        }
    }
}

/// Presence watches: ann asks to watch bob's presence, bob denies, then allows: ann (no friend)
/// sees bob's presence, one way; the lists; every refusal; revoke, unwatch and a block end a
/// watch; and (durable stores) a watch survives a restart.
fn watches(store: &str) {
    let body = pg::store_body(store);
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir, "io_uring", &body, "");
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (mut a1, _) = s.login(&ann, 3);
    let (mut a2, _) = s.login(&ann, 1);
    let (mut b, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);

    // Asked: bob and ann's other session are told; the lists say so.
    assert!(!a1.roster_action(act::WATCH, bob_id, "").unwrap().friends);
    let want = RosterNotice { event: act::WATCH, from: ann_id, to: bob_id, note: String::new() };
    assert_eq!(next_notice(&mut b), want);
    assert_eq!(next_notice(&mut a2), want);
    assert_eq!(users(&mut b, list::WATCH_INCOMING), [ann_id]);
    assert_eq!(users(&mut a1, list::WATCH_OUTGOING), [bob_id]);
    assert!(users(&mut b, list::INCOMING).is_empty(), "no friend request");
    // Refusals.
    assert_eq!(code(a1.roster_action(act::ALLOW, bob_id, "")), ErrorCode::NoWatch, "one's own request");
    assert_eq!(code(b.roster_action(act::DENY, carol_id, "")), ErrorCode::NoWatch);
    assert_eq!(code(b.roster_action(act::REVOKE, ann_id, "")), ErrorCode::NoWatch);
    assert_eq!(code(c.roster_action(act::UNWATCH, bob_id, "")), ErrorCode::NoWatch);
    assert_eq!(code(a1.roster_action(act::WATCH, ann_id, "")), ErrorCode::InvalidRoster);
    assert_eq!(code(a1.roster_action(13, bob_id, "")), ErrorCode::InvalidRoster);
    // Denied; asked again; allowed: ann learns where bob stands at once.
    b.roster_action(act::DENY, ann_id, "").unwrap();
    assert_eq!(next_notice(&mut a1).event, act::DENY);
    assert!(users(&mut a1, list::WATCH_OUTGOING).is_empty());
    a1.roster_action(act::WATCH, bob_id, "").unwrap();
    assert_eq!(next_notice(&mut b).event, act::WATCH);
    b.presence_set(ps::BUSY, "in a meeting", b"").unwrap();
    no_presence(&mut a1);
    b.roster_action(act::ALLOW, ann_id, "").unwrap();
    wait_notice_and_presence(&mut a1, act::ALLOW, bob_id, ps::BUSY);
    assert_eq!(users(&mut b, list::WATCHERS), [ann_id]);
    assert_eq!(users(&mut a1, list::WATCHING), [bob_id]);
    assert!(users(&mut a1, list::FRIENDS).is_empty());
    assert_eq!(code(a1.roster_action(act::WATCH, bob_id, "")), ErrorCode::AlreadyWatching);
    // One way: bob does not see ann's changes; ann sees bob's.
    a1.presence_set(ps::AWAY, "", b"").unwrap();
    no_presence(&mut b);
    b.presence_set(ps::ONLINE, "", b"").unwrap();
    wait_presence(&mut a1, bob_id, ps::ONLINE);
    // Bob's last session ends and a new one begins: the watcher is told both (the new
    // session's owner reads the watch from the store).
    drop(b);
    wait_presence(&mut a1, bob_id, ps::OFFLINE);
    let (b, _) = s.login(&bob, 3);
    wait_presence(&mut a1, bob_id, ps::ONLINE);

    // The durable stores keep the watch across a restart.
    let (s, mut a1, mut b, mut c) = if store != "memory" {
        drop((a1, a2, b, c));
        let dir = s.stop_keep();
        let s = TestServer::start_in(dir, "io_uring", &body, "");
        let (mut a1, _) = s.login(&ann, 3);
        assert_eq!(users(&mut a1, list::WATCHING), [bob_id]);
        let (b, _) = s.login(&bob, 3);
        wait_presence(&mut a1, bob_id, ps::ONLINE);
        let (c, _) = s.login(&carol, 3);
        (s, a1, b, c)
    } else {
        drop(a2);
        (s, a1, b, c)
    };

    // Revoked: ann hears it, and no more of bob's presence.
    b.roster_action(act::REVOKE, ann_id, "").unwrap();
    assert_eq!(next_notice(&mut a1).event, act::REVOKE);
    assert!(users(&mut a1, list::WATCHING).is_empty());
    b.presence_set(ps::AWAY, "", b"").unwrap();
    no_presence(&mut a1);
    // Carol watches ann (allowed), then stops: ann is told.
    c.roster_action(act::WATCH, ann_id, "").unwrap();
    a1.roster_action(act::ALLOW, carol_id, "").unwrap();
    assert_eq!(wait_notice(&mut c, act::ALLOW).from, ann_id);
    c.roster_action(act::UNWATCH, ann_id, "").unwrap();
    assert_eq!(wait_notice(&mut a1, act::UNWATCH).from, carol_id);
    assert!(users(&mut a1, list::WATCHERS).is_empty());
    // A block ends a watch: carol, allowed again, learns only that it was revoked; a blocked
    // user cannot ask.
    c.roster_action(act::WATCH, ann_id, "").unwrap();
    wait_notice(&mut a1, act::WATCH);
    a1.roster_action(act::ALLOW, carol_id, "").unwrap();
    wait_notice(&mut c, act::ALLOW);
    a1.roster_action(act::BLOCK, carol_id, "").unwrap();
    assert_eq!(wait_notice(&mut c, act::REVOKE).from, ann_id);
    assert!(users(&mut c, list::WATCHING).is_empty());
    assert_eq!(code(c.roster_action(act::WATCH, ann_id, "")), ErrorCode::Blocked);
    assert_eq!(
        code(a1.roster_action(act::WATCH, carol_id, "")),
        ErrorCode::InvalidRoster,
        "one blocks carol"
    );
    a1.presence_set(ps::BUSY, "", b"").unwrap();
    no_presence(&mut c);
    drop(s);
}

#[test]
fn watches_embedded() {
    watches("embedded");
}

#[test]
fn watches_memory() {
    watches("memory");
}

#[test]
fn watches_postgres() {
    watches("postgres");
}

#[test]
fn roster_embedded() {
    roster("embedded");
}

#[test]
fn roster_memory() {
    roster("memory");
}

#[test]
fn roster_postgres() {
    roster("postgres");
}

/// `messages.require_friendship`: 1:1 messages only between friends (notes to oneself pass);
/// `roster_entries_max` bounds friends, outgoing requests and watches, and (on their own) the
/// watchers a user allows; a watch does not make messages pass.
#[test]
fn friendship_required_and_limits() {
    let s = TestServer::start(
        "io_uring",
        "[messages]\nrequire_friendship = true\n\n[limits]\nroster_entries_max = 1\n",
    );
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    let (mut c, _) = s.login(&carol, 3);
    assert_eq!(code(a.send_wait(bob_id, 1, b"hi")), ErrorCode::NotFriends);
    a.send_wait(ann_id, 1, b"note to self").unwrap();
    a.roster_action(act::REQUEST, bob_id, "").unwrap();
    assert_eq!(code(a.roster_action(act::REQUEST, carol_id, "")), ErrorCode::TooManyFriends);
    assert_eq!(code(a.roster_action(act::WATCH, carol_id, "")), ErrorCode::TooManyFriends);
    // Carol may allow one watcher: bob; dave's ask waits until bob's watch is revoked. A watch
    // does not make messages pass.
    let (dave, dave_id) = s.register("dave");
    let (mut d, _) = s.login(&dave, 3);
    b.roster_action(act::WATCH, carol_id, "").unwrap();
    d.roster_action(act::WATCH, carol_id, "").unwrap();
    c.roster_action(act::ALLOW, bob_id, "").unwrap();
    assert_eq!(code(c.roster_action(act::ALLOW, dave_id, "")), ErrorCode::TooManyFriends);
    c.roster_action(act::REVOKE, bob_id, "").unwrap();
    c.roster_action(act::ALLOW, dave_id, "").unwrap();
    assert_eq!(code(c.send_wait(dave_id, 1, b"watching me?")), ErrorCode::NotFriends);
    b.roster_action(act::ACCEPT, ann_id, "").unwrap();
    // The conversation owner learned the new flags: the refused send now goes through.
    a.send_wait(bob_id, 2, b"hi, friend").unwrap();
    assert_eq!(b.next_delivery().unwrap().body, b"hi, friend");
    b.roster_action(act::REMOVE, ann_id, "").unwrap();
    assert_eq!(code(a.send_wait(bob_id, 3, b"still there?")), ErrorCode::NotFriends);
}
