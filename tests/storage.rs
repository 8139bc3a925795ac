//! Storage over real sockets, as one conformance suite run on every store: acks after commit,
//! history paging, offline catch-up per device, sequence numbers and resend dedup across restarts,
//! a kill -9 under load, and the store's own resend dedup (a message stored once per conversation,
//! sender and client message id). The memory store (no-data mode) skips what needs durability. Where
//! the server shapes a request before the store sees it, the store is also called directly.

mod common;
use std::{collections::BTreeMap, time::Duration};

use common::*;
use tim::{
    client::{Client, Event},
    protocol::{group_role, GroupProfile, JoinRequest, GROUP_ID_MIN},
    store::{
        group_conv, Cursor, Duplicates, GroupChange, GroupRow, GroupWrite, LoadRequest, MemberRow,
        RecentSend, Store, StoreError, StoredMessage, Unstored,
    },
};

fn durable(name: &str) -> bool {
    name != "memory"
}

const FAST_CURSORS: &str = "[limits]\ncursor_flush_ms = 20\n";

/// A server on store `name`, and the `[store]` body to restart it on the same data.
fn start(name: &str) -> (TestServer, String) {
    let body = pg::store_body(name);
    (TestServer::start_with_store("io_uring", &body, FAST_CURSORS), body)
}

fn login_device(s: &TestServer, name: &str, device: &str) -> Client {
    let mut c = s.client();
    c.login(name, PASSWORD, 3, device).unwrap();
    c
}

/// Messages are acked and delivered on every store; history pages walk a conversation both ways
/// on durable stores and are empty without one.
fn history_pages(st: &str) {
    let (s, _) = start(st);
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = login_device(&s, &alice, "a1");
    let mut b = login_device(&s, &bob, "b1");
    if durable(st) {
        assert_eq!(b.catch_up().unwrap().1.count, 0);
        assert_eq!(a.catch_up().unwrap().1.count, 0);
    }
    for i in 1..=25u64 {
        assert_eq!(a.send_wait(bob_id, i, format!("h{i}").as_bytes()).unwrap().seq, i);
    }
    for i in 1..=25u64 {
        assert_eq!(b.next_delivery().unwrap().stamp.seq, i);
    }
    let (page, end) = b.history(s_user(&mut a), 0, true, 10).unwrap();
    if !durable(st) {
        assert!(page.is_empty() && !end.more, "no history without a store");
        return;
    }
    let seqs: Vec<u64> = page.iter().map(|d| d.stamp.seq).collect();
    assert_eq!(seqs, (16..=25).rev().collect::<Vec<_>>(), "newest first");
    assert!(end.more);
    assert_eq!(end.count, 10);
    assert_eq!(page[0].body, b"h25");
    let (page, end) = b.history(s_user(&mut a), 16, true, 100).unwrap();
    assert_eq!(page.len(), 15);
    assert!(!end.more);
    let (page, end) = a.history(bob_id, 20, false, 3).unwrap();
    assert_eq!(page.iter().map(|d| d.stamp.seq).collect::<Vec<_>>(), vec![21, 22, 23]);
    assert!(end.more);
    // a page is capped by history_page_max (200) and the request's limit
    let (page, _) = a.history(bob_id, 0, false, 0).unwrap();
    assert_eq!(page.len(), 25);
}

/// A history anchor of 2^63 or more lies past every sequence number (`seq < anchor` and
/// `seq > anchor` of a u64, 5.10): going older the page starts from the newest message, going
/// newer it is empty. Over the protocol, and on the store itself, which must not read such an
/// anchor as a negative number even when the server does not clamp it first.
fn huge_history_anchor(st: &str) {
    const HUGE: [u64; 3] = [1 << 63, (1 << 63) + 5, u64::MAX];
    let (s, _) = start(st);
    let (alice, _) = s.register("alice");
    let (_bob, bob_id) = s.register("bob");
    let mut a = login_device(&s, &alice, "a1");
    for i in 1..=5u64 {
        a.send_wait(bob_id, i, format!("x{i}").as_bytes()).unwrap();
    }
    let newest_first: Vec<u64> = if durable(st) { (1..=5).rev().collect() } else { Vec::new() };
    for anchor in HUGE {
        let (page, end) = a.history(bob_id, anchor, true, 10).unwrap();
        assert_eq!(page.iter().map(|d| d.stamp.seq).collect::<Vec<_>>(), newest_first, "older from {anchor}");
        assert!(!end.more);
        let (page, end) = a.history(bob_id, anchor, false, 10).unwrap();
        assert!(page.is_empty() && !end.more, "newer from {anchor}");
    }
    drop(s);

    // The store, with the anchor as it comes.
    let (store, _dir) = open_store(st);
    let conv = (1, 2);
    let batch = (1..=5u64)
        .map(|seq| StoredMessage {
            conv,
            seq,
            msg_id: seq,
            ts_ms: 1_700_000_000_000 + seq,
            sender: 1,
            sender_device: 1,
            client_msg_id: seq,
            payload: bytes::Bytes::from(format!("p{seq}")),
            group: None,
            edit: None,
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    store.append(store.partition_of(conv), batch, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), "commit failed");
    let bodies = |p: tim::store::Page| p.payloads.iter().map(|b| b.to_vec()).collect::<Vec<_>>();
    let newest_first: Vec<Vec<u8>> =
        if durable(st) { (1..=5).rev().map(|i| format!("p{i}").into_bytes()).collect() } else { Vec::new() };
    for anchor in HUGE {
        assert_eq!(
            bodies(store.history(conv, anchor, true, 10.into()).unwrap()),
            newest_first,
            "older from {anchor}"
        );
        let newer = store.history(conv, anchor, false, 10.into()).unwrap();
        assert!(newer.payloads.is_empty() && !newer.more, "newer from {anchor}");
    }
    // the largest anchor that is a signed number, and the usual ones, for comparison
    let max = i64::MAX as u64;
    assert_eq!(bodies(store.history(conv, max, true, 10.into()).unwrap()), newest_first);
    assert!(store.history(conv, max, false, 10.into()).unwrap().payloads.is_empty());
    assert_eq!(bodies(store.history(conv, 0, true, 10.into()).unwrap()), newest_first);
    assert_eq!(bodies(store.history(conv, 0, false, 10.into()).unwrap()).len(), newest_first.len());
    store.close();
}

/// Store `name` opened directly (not through a server), and the directory it keeps its data in.
fn open_store(st: &str) -> (Box<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[store]\ndata_dir = {:?}\n{}\n", dir.path().join("data"), pg::store_body(st));
    let cfg: tim::config::Config = toml::from_str(&text).unwrap();
    let store: Box<dyn Store> = match st {
        "memory" => Box::new(tim::store::MemoryStore::default()),
        "embedded" => Box::new(tim::store::embedded::EmbeddedStore::open(&cfg.store).unwrap()),
        _ => Box::new(tim::store::postgres::PostgresStore::open(&cfg.store.postgres).unwrap()),
    };
    (store, dir)
}

/// Append `batch` to `store` and wait for the outcome.
fn append(store: &dyn Store, batch: Vec<StoredMessage>) -> Result<Duplicates, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    store.append(store.partition_of(batch[0].conv), batch, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

/// Message `seq` of `conv` from `sender` with client message id `cmid` (msg_id 1000 + seq).
fn message(conv: (u64, u64), seq: u64, sender: u64, cmid: u64) -> StoredMessage {
    StoredMessage {
        conv,
        seq,
        msg_id: 1000 + seq,
        ts_ms: 1_700_000_000_000 + seq,
        sender,
        sender_device: 1,
        client_msg_id: cmid,
        payload: bytes::Bytes::from(format!("p{seq}")),
        group: None,
        edit: None,
    }
}

/// A message whose (conversation, sender, client message id) is already stored (by an earlier
/// batch, or earlier in the same batch) is not stored again but reported with the stored
/// original's ids, and the rest of its batch commits; a conflict on (conversation, seq) still
/// fails the whole batch. The memory store stores nothing and reports nothing.
fn store_dedup(st: &str) {
    let (store, _dir) = open_store(st);
    let store = &*store;
    let (conv, other) = ((1, 2), (1, 3));
    assert!(append(store, vec![message(conv, 1, 1, 10), message(conv, 2, 2, 10)]).unwrap().is_empty());
    let original = |m: StoredMessage| RecentSend {
        sender: m.sender,
        client_msg_id: m.client_msg_id,
        msg_id: m.msg_id,
        seq: m.seq,
        ts_ms: m.ts_ms,
    };
    let dups = append(
        store,
        vec![
            message(conv, 3, 1, 10), // stored before, at seq 1
            message(conv, 4, 1, 11), // new
            message(conv, 5, 1, 11), // stored just before, in this batch
            message(conv, 6, 2, 11), // same client message id, another sender: new
            message(conv, 7, 2, 10), // stored before, at seq 2
        ],
    )
    .unwrap();
    let want = [
        (0, Unstored::Duplicate(original(message(conv, 1, 1, 10)))),
        (2, Unstored::Duplicate(original(message(conv, 4, 1, 11)))),
        (4, Unstored::Duplicate(original(message(conv, 2, 2, 10)))),
    ];
    assert_eq!(dups, if durable(st) { want.to_vec() } else { Vec::new() });
    // Another conversation has its own client message ids.
    assert!(append(store, vec![message(other, 1, 1, 10)]).unwrap().is_empty());
    // Two copies of a stored message in one batch: both are the stored one.
    let dups = append(store, vec![message(conv, 8, 1, 11), message(conv, 9, 1, 11)]).unwrap();
    let dup = Unstored::Duplicate(original(message(conv, 4, 1, 11)));
    let want = [(0, dup), (1, dup)];
    assert_eq!(dups, if durable(st) { want.to_vec() } else { Vec::new() });

    let seqs = |conv| {
        let page = store.history(conv, 0, false, 100.into()).unwrap();
        page.payloads.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect::<Vec<_>>()
    };
    let stored = ["p1", "p2", "p4", "p6"];
    assert_eq!(seqs(conv), if durable(st) { &stored[..] } else { &[] }, "one copy of each");
    let load = store.load_conv(conv, 0, 100).unwrap();
    if durable(st) {
        assert_eq!(load.last_seq, 6);
        assert_eq!(load.recent.iter().map(|r| r.seq).collect::<Vec<_>>(), [6, 4, 2, 1]);
    }

    // A seq that is taken fails the batch (two owners sequencing one conversation), even with
    // a duplicate and a new message beside it: nothing of it is stored.
    let r = append(store, vec![message(conv, 10, 1, 10), message(conv, 11, 1, 20), message(conv, 6, 1, 21)]);
    if durable(st) {
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert_eq!(seqs(conv), stored, "a failed batch stores nothing");
    } else {
        assert!(r.unwrap().is_empty());
    }
    // After the failure the store carries on.
    assert!(append(store, vec![message(conv, 12, 1, 20)]).unwrap().is_empty());
    store.close();
}

/// Conversations loaded together (what a burst of first messages after a start asks for)
/// answer as each loaded alone, in order; a recipient without an account answers `None`,
/// whichever database range would hold it.
fn batched_loads(st: &str) {
    let (store, _dir) = open_store(st);
    let store = &*store;
    let alice = store.create_account(&[7u8; 32], "hash".into()).unwrap();
    let bob = store.create_account(&[200u8; 32], "hash".into()).unwrap();
    let convs: Vec<(u64, u64)> = (1..=40).map(|k| (k, 1000 + k)).collect();
    for (n, &conv) in convs.iter().enumerate() {
        let msgs: Vec<_> = (1..=(n as u64 % 4)).map(|seq| message(conv, seq, conv.0, seq)).collect();
        if !msgs.is_empty() {
            append(store, msgs).unwrap();
        }
    }
    // Account ids carry their partition in their low 12 bits: one missing id on each range.
    let missing = [4096 * 5 + 1, 4096 * 5 + 3000];
    let recipients = [Some(alice), Some(bob), Some(missing[0]), Some(missing[1]), None];
    let mut by_part: BTreeMap<usize, Vec<LoadRequest>> = BTreeMap::new();
    for (n, &conv) in convs.iter().enumerate() {
        let req = LoadRequest { key: conv, check_recipient: recipients[n % 5], since_ms: 0, recent_max: 2 };
        by_part.entry(store.partition_of(conv)).or_default().push(req);
    }
    assert_eq!(by_part.len(), store.partitions(), "every partition has conversations to load");
    let mut loaded = 0;
    for (part, reqs) in &by_part {
        let got = store.load_convs(*part, reqs);
        assert_eq!(got.len(), reqs.len());
        for (req, got) in reqs.iter().zip(got) {
            let got = got.unwrap();
            if req.check_recipient.is_some_and(|to| missing.contains(&to)) {
                assert!(got.is_none(), "{req:?}: no such recipient");
                continue;
            }
            let got = got.expect("the recipient exists");
            let alone = store.load_conv(req.key, 0, 2).unwrap();
            assert_eq!(got.last_seq, alone.last_seq, "{req:?}");
            assert_eq!(got.recent, alone.recent, "{req:?}");
            let sent = (req.key.0 - 1) % 4;
            if durable(st) {
                assert_eq!(got.last_seq, sent);
                let want: Vec<u64> = (1..=sent).rev().take(2).collect();
                assert_eq!(got.recent.iter().map(|r| r.seq).collect::<Vec<_>>(), want, "newest first");
            }
            loaded += 1;
        }
    }
    assert_eq!(loaded, 40 - 16, "two of every five conversations name a missing recipient");
    store.close();
}

/// A user's id, from a token (its first 16 hex digits).
fn s_user(c: &mut Client) -> u64 {
    let t = c.issue_token(1).unwrap();
    u64::from_str_radix(&t.token[..16], 16).unwrap()
}

/// Messages to an offline user arrive at the next login on every device; each device catches up
/// from its own cursor, and the sending device does not get its own sends back.
fn offline_catch_up(st: &str) {
    if !durable(st) {
        return;
    }
    let (s, _) = start(st);
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    {
        let mut a1 = login_device(&s, &alice, "a1");
        a1.catch_up().unwrap();
        for i in 1..=3u64 {
            a1.send_wait(bob_id, i, format!("o{i}").as_bytes()).unwrap();
        }
        a1.logout().unwrap();
    }
    // bob's phone: everything, then it acks only up to seq 2
    let mut phone = login_device(&s, &bob, "phone");
    let (got, end) = phone.catch_up().unwrap();
    assert_eq!((end.count, end.more), (3, false));
    assert_eq!(got.iter().map(|d| d.stamp.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(got[2].body, b"o3");
    assert_eq!(got[0].stamp.from, alice_id);
    phone.delivery_ack(alice_id, 2).unwrap();
    phone.ping(1).unwrap();
    std::thread::sleep(Duration::from_millis(150)); // > cursor_flush_ms
    phone.logout().unwrap();
    let mut phone = login_device(&s, &bob, "phone");
    let (got, _) = phone.catch_up().unwrap();
    assert_eq!(
        got.iter().map(|d| d.stamp.seq).collect::<Vec<_>>(),
        vec![3],
        "what was not acked comes again"
    );
    // bob's laptop has its own cursor: everything
    let mut laptop = login_device(&s, &bob, "laptop");
    assert_eq!(laptop.catch_up().unwrap().1.count, 3);
    // alice's other device gets her sends (multi-device sync); the sending device does not
    let mut a2 = login_device(&s, &alice, "a2");
    assert_eq!(a2.catch_up().unwrap().1.count, 3);
    let mut a1 = login_device(&s, &alice, "a1");
    assert_eq!(a1.catch_up().unwrap().1.count, 0);
}

/// After a restart a conversation continues after its last stored sequence number, and a resend
/// within the dedup window gets its original ack.
fn restart_keeps_sequences_and_dedup(st: &str) {
    if !durable(st) {
        return;
    }
    let (s, body) = start(st);
    let (alice, _) = s.register("alice");
    let (_bob, bob_id) = s.register("bob");
    let mut a = login_device(&s, &alice, "a1");
    let mut acks = Vec::new();
    for i in 1..=5u64 {
        acks.push(a.send_wait(bob_id, 100 + i, b"before").unwrap());
    }
    drop(a);
    let dir = s.stop_keep();
    let s = TestServer::start_in(dir, "io_uring", &body, FAST_CURSORS);
    let mut a = login_device(&s, &alice, "a1");
    let again = a.send_wait(bob_id, 103, b"before").unwrap();
    assert!(again.duplicate);
    assert_eq!((again.msg_id, again.seq, again.ts_ms), (acks[2].msg_id, acks[2].seq, acks[2].ts_ms));
    let next = a.send_wait(bob_id, 200, b"after").unwrap();
    assert_eq!(next.seq, 6, "sequence continues after the last stored one");
    assert!(next.msg_id > acks[4].msg_id);
}

/// kill -9 under load: after a restart every acked message is stored, sequence numbers are
/// unique, and the offline recipient gets every acked message exactly once.
fn crash_under_load(st: &str) {
    if !durable(st) {
        return;
    }
    let (s, body) = start(st);
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = login_device(&s, &alice, "a1");
    a.catch_up().unwrap();
    // keep 32 sends in flight; crash after 400 acks
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new(); // client_msg_id -> seq
    let mut next = 1u64;
    for _ in 0..32 {
        a.send(bob_id, next, &next.to_le_bytes()).unwrap();
        next += 1;
    }
    while acked.len() < 400 {
        match a.recv().unwrap() {
            Event::SendAck(ack) => {
                acked.insert(ack.client_msg_id, ack.seq);
                a.send(bob_id, next, &next.to_le_bytes()).unwrap();
                next += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let dir = s.crash();
    let s = TestServer::start_in(dir, "io_uring", &body, FAST_CURSORS);
    let mut b = login_device(&s, &bob, "b1");
    let (got, end) = b.catch_up().unwrap();
    assert!(!end.more);
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for d in &got {
        assert!(seen.insert(d.stamp.seq, d.client_msg_id).is_none(), "seq {} delivered twice", d.stamp.seq);
        assert_eq!(d.body, d.client_msg_id.to_le_bytes());
    }
    for (cmid, seq) in &acked {
        assert_eq!(seen.get(seq), Some(cmid), "acked message {cmid} (seq {seq}) lost");
    }
    // everything stored is a message that was sent; the rest of the window may or may not be
    assert!(seen.values().all(|&cmid| cmid < next));
    // the sender resends what it never saw acked: stored ones are acked as duplicates with their
    // stored seq, the others get new, unused sequence numbers
    let mut a = login_device(&s, &alice, "a1");
    a.catch_up().unwrap();
    let mut used: std::collections::BTreeSet<u64> = seen.keys().copied().collect();
    for cmid in 1..next {
        if acked.contains_key(&cmid) {
            continue;
        }
        let ack = a.send_wait(bob_id, cmid, &cmid.to_le_bytes()).unwrap();
        match seen.iter().find(|(_, &c)| c == cmid) {
            Some((&seq, _)) => assert!(ack.duplicate && ack.seq == seq),
            None => assert!(!ack.duplicate && used.insert(ack.seq), "seq {} reused", ack.seq),
        }
    }
}

/// A commit that waits for more messages (`commit_wait_us`) still acks every message once, in
/// order, and a resend still gets its original ack.
fn gathered_commits(st: &str) {
    let body = format!("commit_wait_us = 2000\n{}", pg::store_body(st));
    let s = TestServer::start_with_store("io_uring", &body, FAST_CURSORS);
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = login_device(&s, &alice, "a1");
    let mut b = login_device(&s, &bob, "b1");
    for i in 1..=50u64 {
        a.send(bob_id, i, &i.to_le_bytes()).unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 50 {
        match a.recv().unwrap() {
            Event::SendAck(ack) => seqs.push((ack.client_msg_id, ack.seq)),
            Event::CatchUpEnd(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, (1..=50u64).map(|i| (i, i)).collect::<Vec<_>>());
    for i in 1..=50u64 {
        assert_eq!(b.next_delivery().unwrap().stamp.seq, i);
    }
    let again = a.send_wait(bob_id, 25, &25u64.to_le_bytes()).unwrap();
    assert!(again.duplicate && again.seq == 25);
}

/// History pages and catch-ups are bounded by bytes as well as by count: a page stops before
/// the message that would pass the byte limit (holding at least one) and says there is more.
fn pages_bounded_by_bytes(st: &str) {
    let (store, _dir) = open_store(st);
    let conv = (1, 2);
    let body = |seq: u64| format!("{seq:0>1000}").into_bytes(); // 1000 bytes each
    let batch = (1..=5u64)
        .map(|seq| StoredMessage {
            conv,
            seq,
            msg_id: seq,
            ts_ms: tim::clock::now_ms() - 10 + seq,
            sender: 1,
            sender_device: 1,
            client_msg_id: seq,
            payload: bytes::Bytes::from(body(seq)),
            group: None,
            edit: None,
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    store.append(store.partition_of(conv), batch, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), "commit failed");
    if !durable(st) {
        return;
    }
    let limit = |bytes| tim::store::PageLimit { count: 10, bytes };
    let page = store.history(conv, 0, false, limit(2500)).unwrap();
    assert_eq!(page.payloads.iter().map(|p| p.to_vec()).collect::<Vec<_>>(), vec![body(1), body(2)]);
    assert!(page.more, "cut by bytes");
    let page = store.history(conv, 0, true, limit(10)).unwrap();
    assert_eq!(page.payloads.len(), 1, "at least one message, however large");
    assert!(page.more);
    let page = store.history(conv, 0, false, limit(5000)).unwrap();
    assert_eq!(page.payloads.len(), 5);
    assert!(!page.more, "exactly at the limit");
    // User 2's device 9 has seen nothing: its catch-up is cut the same way.
    let caught = store.catch_up(2, 9, 0, u64::MAX >> 1, limit(3500)).unwrap();
    assert_eq!(caught.page.payloads.len(), 3);
    assert!(caught.page.more);
}

/// Message `seq` of group `group` from `sender` (device 1), its payload `g<group>:<seq>`; a
/// group notice when it carries `writes`. Client message ids are unique per group and seq.
fn group_message(group: u64, seq: u64, sender: u64, writes: Option<Vec<GroupWrite>>) -> StoredMessage {
    StoredMessage {
        conv: group_conv(group),
        seq,
        msg_id: 1000 + seq,
        ts_ms: 1_700_000_000_000 + seq,
        sender,
        sender_device: 1,
        client_msg_id: 5000 + seq,
        payload: bytes::Bytes::from(format!("g{}:{seq}", group - GROUP_ID_MIN)),
        group: writes.map(|writes| std::sync::Arc::new(GroupChange { group, writes })),
        edit: None,
    }
}

fn group_row(group: u64, founder: u64, name: &str) -> GroupRow {
    GroupRow {
        id: group,
        profile: GroupProfile {
            name: name.into(),
            topic: format!("about {name}"),
            avatar_url: format!("https://example.invalid/{name}.png"),
            extra: vec![0, 1, 2, 255],
            join_policy: tim::protocol::join_policy::APPROVAL,
            invite_policy: tim::protocol::invite_policy::MEMBERS,
        },
        founder,
        muted_all_until_ms: 0,
        dissolved: false,
        created_ms: 1_700_000_000_000,
    }
}

/// Groups as stored: a notice's changes are stored with it (create, join, role and mute, block
/// and unblock, settled requests, leave, rejoin, dissolve), join requests kept and dropped, a
/// user's groups paged over every range, and each member's span of the group's sequence. On a
/// durable store, catch-up gives a member the group's messages from the notice that made it one,
/// up to the one that ended its membership, never earlier ones; a duplicate notice's changes
/// and a failed batch's are not stored.
fn groups(st: &str) {
    use group_role::{FOUNDER, MANAGER, MEMBER};
    let (store, _dir) = open_store(st);
    let store = &*store;
    let (alice, bob, carol, dave) = (1u64, 2u64, 3u64, 4u64);
    // Groups on every partition (range) of the store.
    let gids: Vec<u64> = (1..=6).map(|k| GROUP_ID_MIN + k * 7919).collect();
    let parts: std::collections::BTreeSet<usize> =
        gids.iter().map(|&g| store.partition_of(group_conv(g))).collect();
    assert_eq!(parts.len(), store.partitions(), "groups on every partition");
    let g = gids[0];
    let request = |user: u64, note: &str| JoinRequest { user_id: user, note: note.into(), ts_ms: 42 + user };
    let member = |user, role, muted_until_ms, from_seq| MemberRow { user, role, muted_until_ms, from_seq };
    let writes = |w: Vec<GroupWrite>| Some(w);
    let caught = |user: u64, device: u64| -> Vec<String> {
        let c = store.catch_up(user, device, 0, u64::MAX >> 1, 1000.into()).unwrap();
        assert_eq!(c.unavailable, 0);
        c.page.payloads.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect()
    };
    let of_g = |seqs: std::ops::RangeInclusive<u64>| -> Vec<String> {
        seqs.map(|s| format!("g{}:{s}", g - GROUP_ID_MIN)).collect()
    };

    assert!(store.load_group(g).unwrap().is_none(), "never created");
    // Created: the founder joins with the create notice.
    let row = group_row(g, alice, "g");
    let create = |g: u64, seq| {
        group_message(
            g,
            seq,
            alice,
            writes(vec![
                GroupWrite::Group(group_row(g, alice, "g")),
                GroupWrite::Join { user: alice, role: FOUNDER },
            ]),
        )
    };
    assert!(append(store, vec![create(g, 1)]).unwrap().is_empty());
    let load = store.load_group(g).unwrap().expect("created");
    assert_eq!(load.row, row);
    assert_eq!(load.members, [member(alice, FOUNDER, 0, 1)]);
    assert!(load.blocked.is_empty() && load.requests.is_empty());
    assert_eq!(store.member_span(alice, g).unwrap(), Some((1, u64::MAX)));
    assert_eq!(store.member_span(bob, g).unwrap(), None);

    // Join requests are kept and dropped; none for a group that does not exist.
    store.save_join_request(g, carol, Some(&request(carol, "me too"))).unwrap();
    store.save_join_request(g, bob, Some(&request(bob, "first"))).unwrap();
    store.save_join_request(g, bob, Some(&request(bob, "let me in"))).unwrap();
    store.save_join_request(gids[5], bob, Some(&request(bob, "nobody there"))).unwrap();
    assert!(store.load_group(gids[5]).unwrap().is_none());
    assert_eq!(
        store.load_group(g).unwrap().unwrap().requests,
        [request(bob, "let me in"), request(carol, "me too")]
    );
    store.save_join_request(g, carol, None).unwrap();
    assert_eq!(store.load_group(g).unwrap().unwrap().requests, [request(bob, "let me in")]);

    // Before bob joins: seq 2. Bob's join settles his request.
    append(store, vec![group_message(g, 2, alice, None)]).unwrap();
    append(
        store,
        vec![group_message(g, 3, alice, writes(vec![GroupWrite::Join { user: bob, role: MEMBER }]))],
    )
    .unwrap();
    let load = store.load_group(g).unwrap().unwrap();
    assert_eq!(load.members, [member(alice, FOUNDER, 0, 1), member(bob, MEMBER, 0, 3)]);
    assert!(load.requests.is_empty(), "the join settled the request");
    assert_eq!(store.member_span(bob, g).unwrap(), Some((3, u64::MAX)));

    // A role and a mute; a block, and another block lifted, in one notice, in order. With plain
    // messages in the same batch.
    store.save_join_request(g, carol, Some(&request(carol, "again"))).unwrap();
    let batch = vec![
        group_message(
            g,
            4,
            alice,
            writes(vec![
                GroupWrite::Member { user: bob, role: MANAGER, muted_until_ms: 5000 },
                GroupWrite::Member { user: carol, role: MANAGER, muted_until_ms: 1 }, // not a member: no-op
                GroupWrite::Block { user: dave },
                GroupWrite::Block { user: 5 },
                GroupWrite::Block { user: dave },
                GroupWrite::Unblock { user: 5 },
            ]),
        ),
        group_message(g, 5, alice, None),
        group_message(g, 6, bob, None),
        group_message(g, 7, alice, writes(vec![GroupWrite::Unrequest { user: carol }])),
    ];
    assert!(append(store, batch).unwrap().is_empty());
    let load = store.load_group(g).unwrap().unwrap();
    assert_eq!(load.members, [member(alice, FOUNDER, 0, 1), member(bob, MANAGER, 5000, 3)]);
    assert_eq!(load.blocked, [dave]);
    assert!(load.requests.is_empty(), "settled");

    // Bob leaves at seq 8; seq 9 is not his.
    append(store, vec![group_message(g, 8, bob, writes(vec![GroupWrite::Leave { user: bob }]))]).unwrap();
    append(store, vec![group_message(g, 9, alice, None)]).unwrap();
    assert_eq!(store.load_group(g).unwrap().unwrap().members, [member(alice, FOUNDER, 0, 1)]);
    assert_eq!(store.member_span(bob, g).unwrap(), Some((3, 8)), "a past member's span");
    assert_eq!(store.user_groups(bob, 0, 10).unwrap(), (vec![], false));
    assert_eq!(store.group_count(bob).unwrap(), 0);
    if durable(st) {
        assert_eq!(caught(bob, 9), of_g(3..=8), "from its join up to its leave");
        assert_eq!(caught(alice, 9), of_g(1..=9));
        assert_eq!(caught(carol, 9), Vec::<String>::new(), "never a member");
        assert_eq!(caught(alice, 1), [of_g(6..=6), of_g(8..=8)].concat(), "not a device's own sends");
        // A group's conversation is not listed as anybody's conversation (users 0 and g).
        assert!(caught(0, 9).is_empty() && caught(g, 9).is_empty());
        // From the device's cursor on.
        store.save_cursors(&[Cursor { user: bob, device: 9, conv: group_conv(g), seq: 5 }]).unwrap();
        assert_eq!(caught(bob, 9), of_g(6..=8));
        // Within the time window.
        let c = store.catch_up(bob, 9, 1_700_000_000_007, 1_700_000_000_007, 100.into()).unwrap();
        assert_eq!(c.page.payloads, [bytes::Bytes::from(of_g(7..=7)[0].clone())]);
        assert_eq!(store.history(group_conv(g), 0, false, 100.into()).unwrap().payloads.len(), 9);
    }

    // A rejoin starts a new span.
    let batch = vec![
        group_message(g, 10, alice, writes(vec![GroupWrite::Join { user: bob, role: MEMBER }])),
        group_message(g, 11, bob, None),
    ];
    append(store, batch).unwrap();
    assert_eq!(store.member_span(bob, g).unwrap(), Some((10, u64::MAX)));
    assert_eq!(
        store.load_group(g).unwrap().unwrap().members,
        [member(alice, FOUNDER, 0, 1), member(bob, MEMBER, 0, 10)],
        "a rejoin is a new member: role and mute anew"
    );
    if durable(st) {
        assert_eq!(caught(bob, 9), of_g(10..=11));
    }

    if durable(st) {
        // A duplicate notice (a resend of seq 8's client message id) is not stored, and neither
        // are its changes; the new message beside it is.
        let mut dup = group_message(g, 12, bob, writes(vec![GroupWrite::Leave { user: bob }]));
        dup.client_msg_id = 5008;
        let dups = append(
            store,
            vec![group_message(g, 12, alice, None), {
                dup.seq = 13;
                dup
            }],
        )
        .unwrap();
        assert_eq!(
            dups.iter().map(|(index, d)| (*index, d.original().unwrap().seq)).collect::<Vec<_>>(),
            [(1, 8)]
        );
        assert_eq!(
            store.member_span(bob, g).unwrap(),
            Some((10, u64::MAX)),
            "the duplicate's leave not stored"
        );
        // A failed batch (seq 12 is taken, by another message) stores none of its changes.
        let mut taken = group_message(g, 12, alice, writes(vec![GroupWrite::Leave { user: alice }]));
        taken.client_msg_id = 9999;
        let r = append(
            store,
            vec![group_message(g, 14, alice, writes(vec![GroupWrite::Block { user: 6 }])), taken],
        );
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        let load = store.load_group(g).unwrap().unwrap();
        assert_eq!(load.blocked, [dave]);
        assert_eq!(load.members.len(), 2);
        assert!(append(store, vec![group_message(g, 14, alice, None)]).unwrap().is_empty(), "carries on");
    }

    // Alice founds five more groups, over every range: her groups page by rising id.
    for &other in &gids[1..] {
        append(store, vec![create(other, 1)]).unwrap();
        append(
            store,
            vec![group_message(
                other,
                2,
                alice,
                writes(vec![GroupWrite::Join { user: carol, role: MEMBER }]),
            )],
        )
        .unwrap();
    }
    let mut sorted = gids.clone();
    sorted.sort_unstable();
    assert_eq!(store.group_count(alice).unwrap(), 6);
    assert_eq!(store.user_groups(alice, 0, 4).unwrap(), (sorted[..4].to_vec(), true));
    assert_eq!(store.user_groups(alice, sorted[3], 4).unwrap(), (sorted[4..].to_vec(), false));
    assert_eq!(store.user_groups(alice, sorted[1], 4).unwrap(), (sorted[2..].to_vec(), false));
    assert_eq!(store.user_groups(alice, 0, 6).unwrap(), (sorted.clone(), false));
    assert_eq!(store.user_groups(alice, 0, 0).unwrap(), (vec![], true));
    assert_eq!(store.user_groups(alice, 0, usize::MAX).unwrap(), (sorted.clone(), false));
    assert_eq!(store.user_groups(alice, sorted[5], 10).unwrap(), (vec![], false));
    assert_eq!(store.user_groups(alice, u64::MAX, 10).unwrap(), (vec![], false));
    assert_eq!(store.group_count(carol).unwrap(), 5);
    assert_eq!(store.group_count(bob).unwrap(), 1);
    assert_eq!(store.user_groups(bob, 0, 10).unwrap(), (vec![g], false));

    // Dissolved: every member leaves with the notice.
    let last = gids[5];
    let mut dissolved = group_row(last, alice, "g");
    dissolved.dissolved = true;
    dissolved.muted_all_until_ms = 77;
    dissolved.profile.name = "gone".into();
    append(
        store,
        vec![group_message(
            last,
            3,
            alice,
            writes(vec![GroupWrite::Group(dissolved.clone()), GroupWrite::LeaveAll]),
        )],
    )
    .unwrap();
    let load = store.load_group(last).unwrap().unwrap();
    assert_eq!(load.row, dissolved);
    assert!(load.members.is_empty());
    assert_eq!(store.member_span(alice, last).unwrap(), Some((1, 3)));
    assert_eq!(store.member_span(carol, last).unwrap(), Some((2, 3)));
    assert_eq!(store.group_count(alice).unwrap(), 5);
    assert_eq!(store.group_count(carol).unwrap(), 4);
    assert_eq!(
        store.user_groups(alice, sorted[4], 10).unwrap().0,
        sorted[5..].iter().copied().filter(|&x| x != last).collect::<Vec<_>>()
    );
    if durable(st) {
        let tag = format!("g{}:", last - GROUP_ID_MIN);
        let of_last: Vec<String> = caught(carol, 9).into_iter().filter(|p| p.starts_with(&tag)).collect();
        assert_eq!(of_last, [format!("{tag}2"), format!("{tag}3")], "up to the dissolve");
        // Each group's messages of carol's, from her join: five groups, seq 2 on (and 3 of the last).
        assert_eq!(caught(carol, 9).len(), 6);
    }
    store.close();
}

/// Bans on every store: set, read back with the account, lifted; an unknown account is
/// reported as such.
fn store_bans(st: &str) {
    let (store, _dir) = open_store(st);
    let name = [42u8; 32];
    let id = store.create_account(&name, "hash".into()).unwrap();
    assert_eq!(store.account_by_name(&name).unwrap().unwrap().banned_until_ms, 0);
    assert_eq!(store.ban_of(id).unwrap(), Some(0));
    assert!(store.set_ban(id, tim::store::BANNED_FOREVER).unwrap());
    assert_eq!(store.account_by_name(&name).unwrap().unwrap().banned_until_ms, tim::store::BANNED_FOREVER);
    assert_eq!(store.ban_of(id).unwrap(), Some(tim::store::BANNED_FOREVER));
    assert!(store.set_ban(id, 0).unwrap());
    assert_eq!(store.ban_of(id).unwrap(), Some(0));
    let unknown = id.wrapping_add(4096 * 1000);
    assert!(!store.set_ban(unknown, 5).unwrap());
    assert_eq!(store.ban_of(unknown).unwrap(), None);
    store.close();
}

/// Profiles on every store: saved, read back in the order asked (unknown ids left out, unset
/// ones empty), replaced by a later save.
fn store_profiles(st: &str) {
    let (store, _dir) = open_store(st);
    let a = store.create_account(&[51u8; 32], "hash".into()).unwrap();
    let b = store.create_account(&[52u8; 32], "hash".into()).unwrap();
    let p =
        tim::store::UserProfile { nickname: "n".into(), gender: 2, extra: vec![9; 3], ..Default::default() };
    store.save_profile(a, &p, 1000).unwrap();
    let unknown = b.wrapping_add(4096 * 1000);
    let got = store.profiles(&[b, unknown, a]).unwrap();
    assert_eq!(got, vec![(b, 0, Default::default()), (a, 1000, p.clone())]);
    let q = tim::store::UserProfile { area: "x".into(), ..p };
    store.save_profile(a, &q, 2000).unwrap();
    assert_eq!(store.profiles(&[a]).unwrap(), vec![(a, 2000, q)]);
    store.close();
}

macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[test] fn $name() { super::$name("memory") } )* }
        mod embedded { $( #[test] fn $name() { super::$name("embedded") } )* }
        mod postgres { $( #[test] fn $name() { super::$name("postgres") } )* }
    };
}

on_every_store!(
    store_bans,
    store_profiles,
    batched_loads,
    history_pages,
    offline_catch_up,
    restart_keeps_sequences_and_dedup,
    crash_under_load,
    gathered_commits,
    huge_history_anchor,
    store_dedup,
    pages_bounded_by_bytes,
    groups
);

/// A real `DELIVER` payload: `stamp`, then a Send archive.
fn deliver_payload(stamp: tim::protocol::Stamp, flags: u8, cmid: u64, body: &[u8]) -> bytes::Bytes {
    let send = tim::protocol::Send {
        conv: stamp.conv,
        flags,
        burn_secs: 0,
        to: stamp.to,
        client_msg_id: cmid,
        body: body.to_vec(),
    };
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&send).unwrap();
    let mut p = vec![0u8; tim::protocol::Stamp::BYTES];
    stamp.write(&mut p);
    p.extend_from_slice(&archive);
    bytes::Bytes::from(p)
}

/// Recalls on every store: the edit is made in the recall's transaction (the target's body
/// replaced by a tombstone) or refused, and a refused recall is not stored. The memory store
/// keeps no message: it takes every recall (the conversation owner checks them).
fn store_recall(st: &str) {
    use tim::protocol::{msg_state, send_flags, ErrorCode, Stamp};
    use tim::store::Edit;
    let (store, _dir) = open_store(st);
    let conv = (61, 62);
    let t0 = 1_700_000_000_000;
    let msg = |seq: u64, from: u64, flags: u8, body: &[u8], edit: Option<Edit>| {
        let stamp = Stamp { msg_id: 1000 + seq, seq, ts_ms: t0 + seq, from, to: 62, conv: 1 };
        StoredMessage {
            payload: deliver_payload(stamp, flags, seq, body),
            edit,
            ..message(conv, seq, from, seq)
        }
    };
    let recall = |seq: u64, by: u64, target: u64, any_sender: bool, since_ms: u64| {
        let edit = Edit::Recall { seq: target, by, any_sender, since_ms };
        msg(seq, by, send_flags::RECALL, &target.to_le_bytes(), Some(edit))
    };
    let ok = |batch| append(&*store, batch).unwrap();
    assert!(ok(vec![msg(1, 61, 0, b"secret", None), msg(2, 62, 0, b"reply", None)]).is_empty());
    assert!(ok(vec![recall(3, 61, 1, false, t0)]).is_empty());
    let refusals = [
        (recall(4, 61, 2, false, t0), ErrorCode::NotRecallable), // another's
        (recall(5, 61, 1, false, t0), ErrorCode::NotRecallable), // recalled already
        (recall(6, 61, 3, false, t0), ErrorCode::NotRecallable), // a recall notice
        (recall(7, 61, 99, false, t0), ErrorCode::NotRecallable), // none
        (recall(8, 62, 2, false, t0 + 3), ErrorCode::RecallExpired), // too late
    ];
    for (m, code) in refusals {
        let dups = ok(vec![m]);
        if durable(st) {
            assert_eq!(dups, vec![(0, Unstored::Refused(code))]);
        }
    }
    // A manager's recall of another's message, and a message recalled in its own batch.
    assert!(ok(vec![recall(9, 61, 2, true, t0)]).is_empty());
    assert!(ok(vec![msg(10, 62, 0, b"x", None), recall(11, 62, 10, false, t0)]).is_empty());
    if durable(st) {
        let page = store.history(conv, 0, false, 50.into()).unwrap();
        let seqs: Vec<u64> = page.payloads.iter().map(|p| Stamp::read(p).unwrap().seq).collect();
        assert_eq!(seqs, [1, 2, 3, 9, 10, 11], "refused recalls are not stored");
        for p in [&page.payloads[0], &page.payloads[1], &page.payloads[4]] {
            let d = tim::client::delivery(p).unwrap();
            assert_eq!((d.state, d.body.len(), p.len()), (msg_state::RECALLED, 0, 80));
            assert_eq!(d.client_msg_id, d.stamp.seq, "the client message id is kept");
        }
        assert_eq!(tim::client::delivery(&page.payloads[2]).unwrap().recalled_seq(), Some(1));
    }
    store.close();
}

mod recall_on_every_store {
    #[test]
    fn memory() {
        super::store_recall("memory")
    }
    #[test]
    fn embedded() {
        super::store_recall("embedded")
    }
    #[test]
    fn postgres() {
        super::store_recall("postgres")
    }
}

/// Burns on the durable stores: a burn-after-read message becomes due when its recipient's
/// read is saved (not the sender's), a lifetime makes it due by itself, a due burn is claimed
/// once (again only after `BURN_CLAIM_MS`), and a burn notice's edit leaves a tombstone that
/// is never due again.
fn store_burn(st: &str) {
    use tim::protocol::{msg_state, send_flags, Stamp};
    use tim::store::{DueBurn, Edit, BURN_CLAIM_MS};
    let (store, _dir) = open_store(st);
    let conv = (71, 72);
    let now = tim::clock::now_ms();
    let msg = |seq: u64, from: u64, flags: u8, burn_secs: u32, body: &[u8], edit: Option<Edit>| {
        let stamp = Stamp { msg_id: 2000 + seq, seq, ts_ms: now, from, to: 72, conv: 1 };
        let send = tim::protocol::Send {
            conv: 1,
            flags,
            burn_secs,
            to: 72,
            client_msg_id: seq,
            body: body.to_vec(),
        };
        let mut p = vec![0u8; Stamp::BYTES];
        stamp.write(&mut p);
        p.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(&send).unwrap());
        StoredMessage { payload: bytes::Bytes::from(p), ts_ms: now, edit, ..message(conv, seq, from, seq) }
    };
    let burn = send_flags::BURN_AFTER_READ;
    append(&*store, vec![msg(1, 71, burn, 0, b"secret", None), msg(2, 71, 0, 0, b"plain", None)]).unwrap();
    append(&*store, vec![msg(3, 71, burn, 3600, b"an hour", None)]).unwrap();
    assert!(store.claim_due_burns(now, 100).unwrap().is_empty(), "unread: nothing due");
    let read = |user: u64, seq: u64| tim::store::Cursor { user, device: 1, conv, seq };
    store.save_reads(&[read(71, 3)]).unwrap();
    assert!(store.claim_due_burns(now + 10, 100).unwrap().is_empty(), "the sender's read burns nothing");
    store.save_reads(&[read(72, 1)]).unwrap();
    let t = tim::clock::now_ms() + 10;
    let due = store.claim_due_burns(t, 100).unwrap();
    assert_eq!(due, vec![DueBurn { conv, seq: 1, sender: 71 }]);
    assert!(store.claim_due_burns(t, 100).unwrap().is_empty(), "claimed once");
    assert_eq!(store.claim_due_burns(t + BURN_CLAIM_MS, 100).unwrap(), due, "a stale claim again");
    // The lifetime of message 3 makes it due an hour on, read or not (and message 1's claim is
    // stale again by then).
    let mut later = store.claim_due_burns(now + 3_600_000, 100).unwrap();
    later.sort_by_key(|d| d.seq);
    assert_eq!(later, vec![DueBurn { conv, seq: 1, sender: 71 }, DueBurn { conv, seq: 3, sender: 71 }]);
    // The burn notice's edit: tombstones, never due again; a second burn of them is refused.
    let notice = |seq: u64| {
        msg(seq, 72, send_flags::BURNED, 0, &1u64.to_le_bytes(), Some(Edit::Burn { seqs: vec![1, 3] }))
    };
    assert!(append(&*store, vec![notice(4)]).unwrap().is_empty());
    let dups = append(&*store, vec![notice(5)]).unwrap();
    assert!(matches!(dups[..], [(0, Unstored::Refused(_))]), "{dups:?}");
    assert!(store.claim_due_burns(now + 10 * 3_600_000, 100).unwrap().is_empty());
    let page = store.history(conv, 0, false, 50.into()).unwrap();
    let states: Vec<(u64, u8)> =
        page.payloads.iter().map(|p| (Stamp::read(p).unwrap().seq, p[Stamp::STATE_AT])).collect();
    assert_eq!(states, [(1, msg_state::BURNED), (2, msg_state::PLAIN), (3, msg_state::BURNED), (4, 0)]);
    store.close();
}

mod burn_on_durable_stores {
    #[test]
    fn embedded() {
        super::store_burn("embedded")
    }
    #[test]
    fn postgres() {
        super::store_burn("postgres")
    }
}
