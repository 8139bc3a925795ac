//! Live rooms (N:N, never stored) over real sockets: subscribers on both shards get every
//! publish once, in order; every refusal has its code; a deleted or idle room tells its
//! subscribers; a subscriber that does not read misses messages (and is told how many) without
//! slowing the publisher or the other subscribers; a closed connection leaves its rooms.

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{Client, ClientError, Event, RoomMessage},
    protocol::{missed, room_closed, room_publish, ErrorCode},
};

fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>, code: ErrorCode) {
    match r {
        Err(ClientError::Server { name: Some(c), .. }) if c == code => {}
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// The next room message (other events are skipped).
fn next_room_msg(c: &mut Client) -> RoomMessage {
    loop {
        match c.recv().unwrap() {
            Event::RoomMsg(m) => return m,
            Event::Pong(_) | Event::CatchUpEnd(_) => {}
            other => panic!("expected a room message, got {other:?}"),
        }
    }
}

/// The next event that is not a room message or a pong.
fn next_other(c: &mut Client) -> Event {
    loop {
        match c.recv().unwrap() {
            Event::RoomMsg(_) | Event::Pong(_) | Event::CatchUpEnd(_) => {}
            other => return other,
        }
    }
}

/// A publish reaches every subscriber on both shards once, in order, with its stamp; not the
/// publishing session itself. Unsubscribed sessions get nothing more.
#[test]
fn publish_reaches_subscribers_on_every_shard() {
    let s = TestServer::start("io_uring", "");
    let (owner_name, owner_id) = s.register("owner");
    let mut owner = s.login_on_shard(&owner_name, 3, 0);
    let room = owner.room_create(room_publish::OWNER, 0, &[]).unwrap();
    assert_ne!(room, 0);
    let mut subs = Vec::new();
    for shard in [0, 1, 1] {
        let (name, _) = s.register("sub");
        let mut c = s.login_on_shard(&name, 3, shard);
        let n = c.room_subscribe(room).unwrap();
        subs.push(c);
        assert_eq!(n as usize, subs.len());
    }
    // Subscribing twice changes nothing.
    assert_eq!(subs[0].room_subscribe(room).unwrap(), 3);
    for i in 1..=20u64 {
        owner.room_publish(room, i, format!("m{i}").as_bytes()).unwrap();
    }
    for c in &mut subs {
        for i in 1..=20u64 {
            let m = next_room_msg(c);
            assert_eq!((m.stamp.room_id, m.stamp.seq, m.stamp.from), (room, i, owner_id));
            assert_eq!((m.client_msg_id, m.body), (i, format!("m{i}").into_bytes()));
        }
    }
    assert_eq!(subs[2].room_unsubscribe(room).unwrap(), 2);
    owner.room_publish(room, 21, b"after").unwrap();
    for c in &mut subs[..2] {
        assert_eq!(next_room_msg(c).body, b"after");
    }
    // The unsubscribed session got nothing: its next event is the pong.
    subs[2].ping(7).unwrap();
    assert!(!subs[2].has_pending(), "nothing queued behind the pong");
    // The publisher did not get its own messages.
    owner.ping(8).unwrap();
    assert!(!owner.has_pending());
}

/// Every refusal has its code: unknown room, publishing without the right, a full room, a
/// delete by someone else, bad options, too many subscriptions.
#[test]
fn refusals() {
    let s = TestServer::start(
        "io_uring",
        "[limits]\nroom_subscriptions_per_session_max = 2\nroom_publishers_max = 2\n",
    );
    let (a_name, _) = s.register("a");
    let (b_name, b_id) = s.register("b");
    let (c_name, _) = s.register("c");
    let (mut a, _) = s.login(&a_name, 3);
    let (mut b, _) = s.login(&b_name, 3);
    let (mut c, _) = s.login(&c_name, 3);

    refused(a.room_subscribe(12345), ErrorCode::RoomNotFound);
    refused(a.room_delete(12345), ErrorCode::RoomNotFound);
    refused(a.room_create(9, 0, &[]), ErrorCode::InvalidRoom);
    refused(a.room_create(room_publish::LISTED, 0, &[1, 2, 3]), ErrorCode::InvalidRoom);

    // Listed publishers: b may publish, c may not, even subscribed.
    let room = a.room_create(room_publish::LISTED, 2, &[b_id]).unwrap();
    b.room_subscribe(room).unwrap();
    c.room_subscribe(room).unwrap();
    refused(a.room_subscribe(room), ErrorCode::RoomFull);
    b.room_publish(room, 1, b"from b").unwrap();
    assert_eq!(next_room_msg(&mut c).body, b"from b");
    c.room_publish(room, 2, b"from c").unwrap();
    match next_other(&mut c) {
        Event::Error(e) => {
            assert_eq!(ErrorCode::from_u16(e.code), Some(ErrorCode::NotPublisher));
            assert_eq!(e.client_msg_id, 2, "a refused publish names its client message id");
        }
        other => panic!("expected NotPublisher, got {other:?}"),
    }
    c.room_publish(99, 3, b"nowhere").unwrap();
    match next_other(&mut c) {
        Event::Error(e) => {
            assert_eq!((ErrorCode::from_u16(e.code), e.client_msg_id), (Some(ErrorCode::RoomNotFound), 3))
        }
        other => panic!("expected RoomNotFound, got {other:?}"),
    }
    refused(b.room_delete(room), ErrorCode::NotRoomOwner);

    // Subscribers-only room: a session must be subscribed to publish.
    let open = a.room_create(room_publish::SUBSCRIBERS, 0, &[]).unwrap();
    c.room_publish(open, 4, b"not yet").unwrap();
    match next_other(&mut c) {
        Event::Error(e) => assert_eq!(ErrorCode::from_u16(e.code), Some(ErrorCode::NotPublisher)),
        other => panic!("expected NotPublisher, got {other:?}"),
    }
    c.room_subscribe(open).unwrap();
    // c is in two rooms: its limit.
    let third = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    refused(c.room_subscribe(third), ErrorCode::TooManyRooms);
    b.room_subscribe(open).unwrap();
    c.room_publish(open, 5, b"now").unwrap();
    assert_eq!(next_room_msg(&mut b).body, b"now");
    // Nothing above disturbed the sessions.
    for x in [&mut a, &mut b, &mut c] {
        x.ping(1).unwrap();
    }
}

/// Deleting a room tells every subscriber; an idle room expires and tells them too.
#[test]
fn delete_and_expiry_close_rooms() {
    let s = TestServer::start("io_uring", "[limits]\nroom_idle_secs = 2\n");
    let (a_name, _) = s.register("a");
    let (b_name, _) = s.register("b");
    let mut a = s.login_on_shard(&a_name, 3, 0);
    let mut b = s.login_on_shard(&b_name, 3, 1);
    let room = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    b.room_subscribe(room).unwrap();
    a.room_delete(room).unwrap();
    match next_other(&mut b) {
        Event::RoomClosed(c) => assert_eq!((c.room_id, c.reason), (room, room_closed::DELETED)),
        other => panic!("expected RoomClosed, got {other:?}"),
    }
    refused(b.room_subscribe(room), ErrorCode::RoomNotFound);

    let idle = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    b.room_subscribe(idle).unwrap();
    b.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    match next_other(&mut b) {
        Event::RoomClosed(c) => assert_eq!((c.room_id, c.reason), (idle, room_closed::EXPIRED)),
        other => panic!("expected RoomClosed, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(500), "closed after its idle time, not at once");
    b.ping(1).unwrap();
    refused(a.room_subscribe(idle), ErrorCode::RoomNotFound);
}

/// A subscriber that stops reading misses the oldest room messages and is told how many; the
/// publisher and a reading subscriber are not slowed or disturbed, and nobody is closed.
#[test]
fn slow_subscriber_misses_messages_and_is_told() {
    let s = TestServer::start("io_uring", "[limits]\nroom_queue_frames_max = 32\n");
    let (a_name, _) = s.register("a");
    let (fast_name, _) = s.register("fast");
    let (slow_name, _) = s.register("slow");
    let (mut a, _) = s.login(&a_name, 3);
    let (mut fast, _) = s.login(&fast_name, 3);
    let (mut slow, _) = s.login(&slow_name, 3);
    let room = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    fast.room_subscribe(room).unwrap();
    slow.room_subscribe(room).unwrap();
    // 8 KB messages: the slow subscriber's socket buffers fill, then its room queue. The
    // publisher goes on at the pace of the reading subscriber, who gets every message.
    let body = vec![7u8; 8 * 1024];
    let total = 3200u64;
    for burst in 0..total / 16 {
        for i in 1..=16 {
            a.room_publish(room, burst * 16 + i, &body).unwrap();
        }
        for i in 1..=16 {
            let m = next_room_msg(&mut fast);
            assert_eq!(m.stamp.seq, burst * 16 + i, "the reading subscriber gets every message in order");
        }
    }
    a.ping(1).unwrap();
    // Now the slow one reads: some messages, a Missed, and the rest; all accounted for.
    let (mut got, mut missed, mut last_seq) = (0u64, 0u64, 0u64);
    slow.set_timeout(Some(Duration::from_secs(10))).unwrap();
    while got + missed < total {
        match slow.recv().unwrap() {
            Event::RoomMsg(m) => {
                assert!(m.stamp.seq > last_seq, "in order");
                last_seq = m.stamp.seq;
                got += 1;
            }
            Event::Missed(m) => {
                assert_eq!((m.source, m.id), (missed::ROOM, room));
                missed += m.count;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got + missed, total);
    assert!(missed > 0, "a subscriber that did not read missed some");
    assert_eq!(last_seq, total, "the newest are kept, the oldest dropped");
    for c in [&mut a, &mut fast, &mut slow] {
        c.ping(2).unwrap();
    }
}

/// A connection that ends leaves its rooms: the room counts one subscriber less.
#[test]
fn closed_connection_leaves_its_rooms() {
    let s = TestServer::start("io_uring", "");
    let (a_name, _) = s.register("a");
    let (b_name, _) = s.register("b");
    let (mut a, _) = s.login(&a_name, 3);
    let room = a.room_create(room_publish::SUBSCRIBERS, 0, &[]).unwrap();
    {
        let mut b = s.login_on_shard(&b_name, 3, 1);
        assert_eq!(b.room_subscribe(room).unwrap(), 1);
    }
    for _ in 0..100 {
        let n = a.room_subscribe(room).unwrap();
        if n == 1 {
            return;
        }
        a.room_unsubscribe(room).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the closed connection still counts as a subscriber");
}

/// A room with more local subscribers than `fanout_slice` is served in slices: every
/// subscriber still gets every message once, in order, and the closing after them.
#[test]
fn sliced_fanout_keeps_order() {
    let s = TestServer::start("io_uring", "[limits]\nfanout_slice = 2\n");
    let (a_name, _) = s.register("a");
    let mut a = s.login_on_shard(&a_name, 3, 0);
    let room = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    let mut subs = Vec::new();
    for i in 0..7 {
        let (name, _) = s.register("sub");
        let mut c = s.login_on_shard(&name, 3, 1);
        assert_eq!(c.room_subscribe(room).unwrap(), i + 1);
        subs.push(c);
    }
    for i in 1..=30u64 {
        a.room_publish(room, i, &i.to_le_bytes()).unwrap();
    }
    a.room_delete(room).unwrap();
    for c in &mut subs {
        for i in 1..=30u64 {
            let m = next_room_msg(c);
            assert_eq!((m.stamp.seq, m.body), (i, i.to_le_bytes().to_vec()));
        }
        match next_other(c) {
            Event::RoomClosed(closed) => assert_eq!(closed.reason, room_closed::DELETED),
            other => panic!("expected RoomClosed, got {other:?}"),
        }
    }
}

/// An unsubscribe sent before the subscribe's answer: the session ends up out of the room on
/// both sides (it gets nothing, the room does not count it, and it does not count against the
/// session's own limit of rooms).
#[test]
fn unsubscribe_racing_its_subscribe() {
    use tim::protocol::{kind, RoomRef};
    let s = TestServer::start("io_uring", "[limits]\nroom_subscriptions_per_session_max = 2\n");
    let (a_name, _) = s.register("a");
    let (b_name, _) = s.register("b");
    let (mut a, _) = s.login(&a_name, 3);
    let mut b = s.login_on_shard(&b_name, 3, 1);
    let room = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    for _ in 0..20 {
        b.send_frame(kind::ROOM_SUBSCRIBE, &RoomRef { room_id: room }).unwrap();
        b.send_frame(kind::ROOM_UNSUBSCRIBE, &RoomRef { room_id: room }).unwrap();
        for want in [kind::ROOM_SUBSCRIBE, kind::ROOM_UNSUBSCRIBE] {
            match next_other(&mut b) {
                Event::RoomOk(ok) => assert_eq!(ok.request_kind, want),
                other => panic!("expected RoomOk, got {other:?}"),
            }
        }
    }
    a.room_publish(room, 1, b"nobody").unwrap();
    assert_eq!(b.ping(5).unwrap().nonce, 5);
    assert!(!b.has_pending(), "no room message for a session that left");
    assert_eq!(a.room_subscribe(room).unwrap(), 1, "the room counts only the new subscriber");
    for _ in 0..2 {
        let other = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
        b.room_subscribe(other).expect("the raced room takes none of b's two places");
    }
}

/// More room messages than `fanout_jobs_max` waiting on a shard: the excess is dropped for that
/// shard's subscribers, who are told (Missed) with the next message or once the backlog is gone;
/// every message is received or reported missed, in order.
#[test]
fn fanout_backlog_is_bounded_and_reported() {
    let s = TestServer::start("io_uring", "[limits]\nfanout_slice = 1\nfanout_jobs_max = 2\n");
    let (a_name, _) = s.register("a");
    let mut a = s.login_on_shard(&a_name, 3, 0);
    let room = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let (name, _) = s.register("sub");
        let mut c = s.login_on_shard(&name, 3, 1);
        c.room_subscribe(room).unwrap();
        subs.push(c);
    }
    let total = 300u64;
    for i in 1..=total {
        a.room_publish(room, i, &i.to_le_bytes()).unwrap();
    }
    let mut any_missed = false;
    for c in &mut subs {
        c.set_timeout(Some(Duration::from_secs(10))).unwrap();
        let (mut got, mut lost, mut last) = (0u64, 0u64, 0u64);
        while got + lost < total {
            match c.recv().unwrap() {
                Event::RoomMsg(m) => {
                    assert!(m.stamp.seq > last, "in order");
                    last = m.stamp.seq;
                    got += 1;
                }
                Event::Missed(m) => {
                    assert_eq!((m.source, m.id), (missed::ROOM, room));
                    lost += m.count;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got + lost, total, "every message received or reported missed");
        any_missed |= lost > 0;
    }
    assert!(any_missed, "the backlog never filled: the test proves nothing");
}

/// A session with 64 room requests unanswered gets Busy for the next (here: a burst of
/// subscriptions to a room owned by the other shard, sent in one write).
#[test]
fn room_requests_in_flight_are_bounded() {
    use tim::{
        placement::Placement,
        protocol::{kind, RoomRef},
    };
    let s = TestServer::start("io_uring", "");
    let (a_name, _) = s.register("a");
    let (b_name, _) = s.register("b");
    let (mut a, _) = s.login(&a_name, 3);
    let mut b = s.login_on_shard(&b_name, 3, 0);
    let room = loop {
        let r = a.room_create(room_publish::OWNER, 0, &[]).unwrap();
        if Placement::new(2).room(r).shard == 1 {
            break r;
        }
    };
    let mut burst = Vec::new();
    for _ in 0..100 {
        burst.extend(tim::frame::encode(kind::ROOM_SUBSCRIBE, &RoomRef { room_id: room }));
    }
    b.write_raw(&burst).unwrap();
    let (mut ok, mut busy) = (0, 0);
    while ok + busy < 100 {
        match b.recv().unwrap() {
            Event::RoomOk(r) => {
                assert_eq!(r.request_kind, kind::ROOM_SUBSCRIBE);
                ok += 1;
            }
            Event::Error(e) => {
                assert_eq!(
                    (ErrorCode::from_u16(e.code), e.request_kind, e.client_msg_id),
                    (Some(ErrorCode::Busy), kind::ROOM_SUBSCRIBE, room)
                );
                busy += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(busy > 0 && ok >= 64, "ok {ok}, busy {busy}");
    assert_eq!(b.room_subscribe(room).unwrap(), 1, "answers free their places; one subscription");
}
