//! A PostgreSQL range that stops answering (SIGSTOP) or dies wedges nothing else: accounts on the
//! healthy range register and log in, a login's catch-up delivers what the healthy range holds
//! and says it is partial, sends and history on the healthy range work, sends on the stalled
//! range get StoreUnavailable once (at `commit_timeout_ms`, also when queued behind a stalled
//! commit); and when the server returns, everything works again and nothing acknowledged is lost.
//!
//! Every wait is bounded by the client's read timeout (a hang fails the test); apart from the
//! commit timeout's bound, no test asserts how fast anything is.

mod common;
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{pg::PgServer, *};
use tim::{
    client::{Client, ClientError},
    config::Security,
    protocol::{ErrorCode, SendAck},
    store::postgres::PostgresStore,
};

/// A wait for anything in this test; far above every store timeout configured below.
const PATIENCE: Duration = Duration::from_secs(8);

/// Whether the 1:1 conversation of `a` and `b` lives on the low range (partitions 0-2047).
fn conv_low(a: u64, b: u64) -> bool {
    tim_shards::partition_of(tim::placement::conv_hash(tim::placement::direct_key(a, b)))
        < tim_shards::PARTITIONS / 2
}

/// Whether an account lives on the low range (its id carries its partition in the low 12 bits).
fn account_low(id: u64) -> bool {
    let partitions = u64::from(tim_shards::PARTITIONS);
    id % partitions < partitions / 2
}

/// A fresh account name whose account will live on the low range (`low`) or the high one.
fn name_on(s: &TestServer, low: bool, prefix: &str) -> String {
    let sec = Security { name_key: NAME_KEY.into(), ..Security::default() };
    let auth = tim::auth::Auth::new(&sec, None).unwrap();
    loop {
        let name = s.name(prefix);
        let slot = PostgresStore::name_slot(&auth.name_key(&name));
        if (slot < tim_shards::PARTITIONS as u64 / 2) == low {
            return name;
        }
    }
}

/// A client whose every wait ends after [`PATIENCE`].
fn client(addr: SocketAddr) -> Client {
    let c = Client::connect(addr).unwrap();
    c.set_timeout(Some(PATIENCE)).unwrap();
    c
}

fn register(s: &TestServer, name: &str) -> Result<u64, ClientError> {
    client(s.addr).register(name, PASSWORD)
}

fn login(s: &TestServer, name: &str, device: &str) -> Client {
    login_at(s.addr, name, device)
}

fn login_at(addr: SocketAddr, name: &str, device: &str) -> Client {
    let mut c = client(addr);
    c.login(name, PASSWORD, 3, device).unwrap_or_else(|e| panic!("login {name}/{device}: {e}"));
    c
}

/// Send until acked (after a stall the store may need a moment, and a resend of a send whose
/// commit is still open gets Busy); panics after `within`.
fn send_until_acked(c: &mut Client, to: u64, cmid: u64, body: &[u8], within: Duration) -> SendAck {
    let start = Instant::now();
    loop {
        match c.send_wait(to, cmid, body) {
            Ok(ack) => return ack,
            Err(e)
                if matches!(e.code(), Some(ErrorCode::StoreUnavailable | ErrorCode::Busy))
                    && start.elapsed() < within =>
            {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("send {cmid}: {e}"),
        }
    }
}

fn store_unavailable(r: Result<SendAck, ClientError>) {
    match r {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}"),
        Ok(ack) => panic!("false ack {ack:?} while the range is away"),
    }
}

fn bodies(ds: &[tim::client::Delivery]) -> BTreeSet<Vec<u8>> {
    ds.iter().map(|d| d.body.clone()).collect()
}

/// The `[store]` body of a server split over `low` (0-2047) and `high` (2048-4095).
fn two_ranges(low: &PgServer, high: &PgServer, commit_timeout_ms: u64, statement_timeout_ms: u64) -> String {
    format!(
        "commit_timeout_ms = {commit_timeout_ms}\nbackend = \"postgres\"\n[store.postgres]\n\
         connect_timeout_ms = 1000\nacquire_timeout_ms = 1000\nstatement_timeout_ms = {statement_timeout_ms}\n\
         [[store.postgres.partition]]\nslots = \"0-2047\"\nurl = \"{}\"\n\
         [[store.postgres.partition]]\nslots = \"2048-4095\"\nurl = \"{}\"\n",
        common::pg::fresh_db(low),
        common::pg::fresh_db(high)
    )
}

#[test]
fn stalled_or_dead_range_wedges_nothing_else() {
    let low = PgServer::start();
    let mut high = PgServer::start();
    let s = TestServer::start_with_store("io_uring", &two_ranges(&low, &high, 1000, 1000), "");

    // alice's account is on the low range; one peer's conversation with her on each range.
    let alice = name_on(&s, true, "alice");
    let alice_id = register(&s, &alice).unwrap();
    assert!(account_low(alice_id));
    let (mut peer_low, mut peer_high) = (None, None);
    while peer_low.is_none() || peer_high.is_none() {
        let name = name_on(&s, true, "peer");
        let id = register(&s, &name).unwrap();
        let slot = if conv_low(alice_id, id) { &mut peer_low } else { &mut peer_high };
        slot.get_or_insert((name, id));
    }
    let ((pl_name, pl), (ph_name, ph)) = (peer_low.unwrap(), peer_high.unwrap());
    let on_high = name_on(&s, false, "high");
    assert!(!account_low(register(&s, &on_high).unwrap()));

    // While alice is away, each peer sends her two messages. `acked`: (peer, seq, body).
    let mut acked: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    let mut cl = login(&s, &pl_name, "d");
    let mut ch = login(&s, &ph_name, "d");
    for (c, peer, tag) in [(&mut cl, pl, "low"), (&mut ch, ph, "high")] {
        c.catch_up().unwrap();
        for cmid in 1..=2 {
            let body = format!("{tag}-{cmid}").into_bytes();
            let ack = c.send_wait(alice_id, cmid, &body).unwrap();
            acked.push((peer, ack.seq, body));
        }
    }

    // ---- the high range's server stops answering ----
    high.pause();

    // (a) Registrations and logins on the healthy range work, many at once, and each login's
    // catch-up ends, marked partial (a new account has no messages, but every range is asked).
    let names: Vec<String> = (0..8).map(|i| name_on(&s, true, &format!("new{i}"))).collect();
    let t = Instant::now();
    std::thread::scope(|scope| {
        let addr = s.addr;
        let joins: Vec<_> = names
            .into_iter()
            .map(|name| {
                scope.spawn(move || {
                    let r = client(addr).register(&name, PASSWORD);
                    r.unwrap_or_else(|e| panic!("register {name}: {e}"));
                    let mut c = login_at(addr, &name, "d");
                    let (got, end) = c.catch_up().unwrap();
                    assert!(got.is_empty());
                    assert_eq!((end.count, end.unavailable), (0, 1), "{name}");
                    assert_eq!(c.ping(7).unwrap().nonce, 7);
                })
            })
            .collect();
        for j in joins {
            j.join().unwrap();
        }
    });
    eprintln!("8 registrations, logins and partial catch-ups at once, one range stalled: {:?}", t.elapsed());
    // Accounts on the stalled range: a bounded failure, not a hang.
    let e = register(&s, &name_on(&s, false, "nope")).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}");
    let e = client(s.addr).login(&on_high, PASSWORD, 3, "d").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}");

    // (b) alice's catch-up has the healthy range's messages and says one range did not answer.
    let t = Instant::now();
    let mut a = login(&s, &alice, "phone");
    let (got, end) = a.catch_up().unwrap();
    eprintln!("login and partial catch-up, one range stalled: {:?}", t.elapsed());
    assert_eq!(bodies(&got), BTreeSet::from([b"low-1".to_vec(), b"low-2".to_vec()]));
    assert_eq!((end.count, end.more, end.unavailable), (2, false, 1));

    // (c) Sends on the healthy range are acked and delivered; on the stalled one, refused.
    let ack = a.send_wait(pl, 10, b"low-3").unwrap();
    acked.push((pl, ack.seq, b"low-3".to_vec()));
    assert_eq!(cl.next_delivery().unwrap().body, b"low-3");
    store_unavailable(a.send_wait(ph, 11, b"stalled"));
    let ack = a.send_wait(pl, 12, b"low-4").unwrap();
    acked.push((pl, ack.seq, b"low-4".to_vec()));

    // (d) History on the healthy range works, and pings do.
    let (page, end) = a.history(pl, 0, true, 50).unwrap();
    assert_eq!(page.len(), 4);
    assert!(!end.more);
    assert_eq!(a.ping(1).unwrap().nonce, 1);

    // ---- the server answers again ----
    high.resume();
    let ack = send_until_acked(&mut a, ph, 13, b"high-3", Duration::from_secs(15));
    acked.push((ph, ack.seq, b"high-3".to_vec()));
    let start = Instant::now();
    loop {
        match register(&s, &name_on(&s, false, "back")) {
            Ok(id) => break assert!(!account_low(id)),
            Err(e) if start.elapsed() < Duration::from_secs(15) => {
                assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("register on the high range after it returned: {e}"),
        }
    }
    login(&s, &on_high, "d");
    // A new device of alice gets a complete catch-up: every message to or from her.
    let mut tablet = login(&s, &alice, "tablet");
    let (got, end) = tablet.catch_up().unwrap();
    assert_eq!(end.unavailable, 0);
    let want: BTreeSet<Vec<u8>> = acked.iter().map(|(_, _, b)| b.clone()).collect();
    assert!(bodies(&got).is_superset(&want), "catch-up {:?} lacks some of {want:?}", bodies(&got));
    // Nothing acknowledged was lost: each acked message is in its conversation's history.
    for peer in [pl, ph] {
        let (page, _) = tablet.history(peer, 0, true, 100).unwrap();
        let stored: BTreeSet<(u64, Vec<u8>)> = page.iter().map(|d| (d.stamp.seq, d.body.clone())).collect();
        for (p, seq, body) in acked.iter().filter(|m| m.0 == peer) {
            assert!(stored.contains(&(*seq, body.clone())), "acked seq {seq} with {p} lost");
        }
    }

    // ---- the high range's server is shut down (its connections close) ----
    high.stop();
    let mut laptop = login(&s, &alice, "laptop");
    let (_, end) = laptop.catch_up().unwrap();
    assert_eq!(end.unavailable, 1);
    store_unavailable(laptop.send_wait(ph, 20, b"down"));
    let ack = laptop.send_wait(pl, 21, b"low-5").unwrap();
    acked.push((pl, ack.seq, b"low-5".to_vec()));
    high.restart();
    let ack = send_until_acked(&mut laptop, ph, 22, b"high-4", Duration::from_secs(15));
    acked.push((ph, ack.seq, b"high-4".to_vec()));
    let mut desk = login(&s, &alice, "desk");
    let (got, end) = desk.catch_up().unwrap();
    assert_eq!(end.unavailable, 0);
    let want: BTreeSet<Vec<u8>> = acked.iter().map(|(_, _, b)| b.clone()).collect();
    assert!(bodies(&got).is_superset(&want), "catch-up {:?} lacks some of {want:?}", bodies(&got));
}

/// A send queued behind a stalled commit gets StoreUnavailable `commit_timeout_ms` after it was
/// sent, not after the stalled commit's timeout plus its own.
#[test]
fn commit_timeout_counts_from_the_send() {
    let pg = PgServer::start();
    let body = format!(
        "commit_timeout_ms = 1500\nbackend = \"postgres\"\n[store.postgres]\nstatement_timeout_ms = 10000\n\
         [[store.postgres.partition]]\nslots = \"0-4095\"\nurl = \"{}\"\n",
        common::pg::fresh_db(&pg)
    );
    let s = TestServer::start_with_store("io_uring", &body, "");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a1 = login(&s, &alice, "1");
    let mut a2 = login(&s, &alice, "2");
    let mut b = login(&s, &bob, "d");
    for c in [&mut a1, &mut a2, &mut b] {
        c.catch_up().unwrap();
    }
    a1.send_wait(bob_id, 1, b"loads the conversation").unwrap();

    pg.pause();
    let timeout = Duration::from_millis(1500);
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            let t = Instant::now();
            store_unavailable(a1.send_wait(bob_id, 2, b"stalled"));
            t.elapsed()
        });
        // Queued on the same commit queue while the first commit is stalled.
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        store_unavailable(a2.send_wait(bob_id, 3, b"queued behind"));
        (first.join().unwrap(), t.elapsed())
    });
    eprintln!(
        "commit_timeout_ms {timeout:?}: StoreUnavailable after {first:?}, queued behind it after {second:?}"
    );
    for waited in [first, second] {
        assert!(waited >= timeout - Duration::from_millis(100), "answered early: {waited:?}");
        // Twice the timeout (less the 500 ms head start) before the fix: 2.5 s.
        assert!(waited < timeout + Duration::from_millis(600), "waited {waited:?}");
    }
    pg.resume();
    send_until_acked(&mut a1, bob_id, 4, b"back", Duration::from_secs(15));
}

/// While a partition's store is stalled, a shard holds at most `commit_backlog_max` sends for
/// it: the rest get StoreUnavailable at once, not after the (long) commit timeout; the held ones
/// are acked once the store is back.
#[test]
fn commit_backlog_is_bounded() {
    let pg = PgServer::start();
    let body = format!(
        "commit_timeout_ms = 20000\ncommit_backlog_max = 4\nbackend = \"postgres\"\n[store.postgres]\n\
         statement_timeout_ms = 30000\n[[store.postgres.partition]]\nslots = \"0-4095\"\nurl = \"{}\"\n",
        common::pg::fresh_db(&pg)
    );
    let s = TestServer::start_with_store("io_uring", &body, "[limits]\nanswer_timeout_ms = 40000\n");
    let (alice, _) = s.register("alice");
    let (_, bob_id) = s.register("bob");
    let mut a = login(&s, &alice, "1");
    a.catch_up().unwrap();
    a.send_wait(bob_id, 1, b"loads the conversation").unwrap();

    pg.pause();
    const N: u64 = 20;
    for i in 2..2 + N {
        a.send(bob_id, i, b"stalled").unwrap();
    }
    // Well inside the commit timeout, every send beyond what the shard holds has been refused:
    // it holds the stalled batch (at most a backlog's worth, taken when its committer ran) and
    // a full backlog behind it.
    a.set_timeout(Some(Duration::from_millis(200))).unwrap();
    let start = Instant::now();
    let mut refused = BTreeSet::new();
    while start.elapsed() < Duration::from_secs(3) {
        match a.recv() {
            Ok(tim::client::Event::Error(e)) => {
                assert_eq!(ErrorCode::from_u16(e.code), Some(ErrorCode::StoreUnavailable));
                refused.insert(e.client_msg_id);
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {} // nothing more yet
        }
    }
    let held = N as usize - refused.len();
    assert!((1..=8).contains(&held), "{held} sends held while the store is stalled (refused {refused:?})");
    pg.resume();
    // The held ones are acked when the store is back.
    a.set_timeout(Some(PATIENCE)).unwrap();
    let mut acked = 0;
    while acked < held {
        match a.recv().expect("the held sends are answered") {
            tim::client::Event::SendAck(ack) => {
                assert!(!refused.contains(&ack.client_msg_id));
                acked += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
