//! Ambiguous commits on PostgreSQL: a commit tim gave up on (the send was answered
//! StoreUnavailable) that the server still runs and commits later must not lead to a second copy
//! of the message when the client resends it: the store refuses a second (conversation, sender,
//! client message id). And a database written before that rule (schema 1), which may already hold
//! such copies, is cleaned up at start without a seq being given twice.

mod common;
use std::time::{Duration, Instant};

use common::{pg::PgServer, *};
use tim::{
    client::Client,
    protocol::ErrorCode,
    store::{postgres::PostgresStore, Store},
};

/// A wait for anything in this test; far above every store timeout configured below.
const PATIENCE: Duration = Duration::from_secs(8);

fn login(s: &TestServer, name: &str, device: &str) -> Client {
    let mut c = Client::connect(s.addr).unwrap();
    c.set_timeout(Some(PATIENCE)).unwrap();
    c.login(name, PASSWORD, 3, device).unwrap_or_else(|e| panic!("login {name}/{device}: {e}"));
    c
}

/// Poll `sql` (one number) on `db` until it answers `want`; panics after `within`.
fn wait_for_count(pg: &PgServer, db: &str, sql: &str, want: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let got = pg.psql(db, sql);
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(start.elapsed() < within, "{sql}: {got:?}, waited for {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The reported bug: the server stops while a send's INSERT is on its way, tim answers
/// StoreUnavailable and drops the connection, the server resumes and commits the INSERT anyway;
/// the client resends with the same client message id. The message must be stored once: a fresh
/// device's history and catch-up show one copy. (Before the dedup index it was stored again under
/// a new seq.)
#[test]
fn late_commit_then_resend_stores_one_copy() {
    let pg = PgServer::start();
    let db = common::pg::fresh_db_name();
    pg.create_database(&db);
    // tim gives up on the send at 1 s and on the statement at 2 s (then it closes the
    // connection); the server only starts the statement when it resumes, so its own
    // statement_timeout does not stop it.
    let body = format!(
        "commit_timeout_ms = 1000\nbackend = \"postgres\"\n[store.postgres]\nconnect_timeout_ms = 1000\n\
         acquire_timeout_ms = 1000\nstatement_timeout_ms = 2000\n\
         [[store.postgres.partition]]\nslots = \"0-4095\"\nurl = \"{}\"\n",
        pg.url(&db)
    );
    let s = TestServer::start_with_store("io_uring", &body, "");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut a = login(&s, &alice, "a1");
    a.catch_up().unwrap();
    // Loads the conversation and leaves a pooled connection, so that the next INSERT is written
    // to the server's socket even while the server is stopped.
    a.send_wait(bob_id, 1, b"before").unwrap();

    pg.pause();
    match a.send_wait(bob_id, 2, b"ambiguous") {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}"),
        Ok(ack) => panic!("acked {ack:?} while the server is stopped"),
    }
    // Past tim's statement timeout: tim has given up on the INSERT and dropped its connection.
    std::thread::sleep(Duration::from_millis(2000));
    pg.resume();
    // The server reads the INSERT from the dead connection's socket and commits it.
    let stored = "SELECT count(*) FROM messages WHERE client_msg_id = 2";
    wait_for_count(&pg, &db, stored, "1", Duration::from_secs(10));

    // The client never got an ack: it resends.
    let start = Instant::now();
    let ack = loop {
        match a.send_wait(bob_id, 2, b"ambiguous") {
            Ok(ack) => break ack,
            Err(e)
                if matches!(e.code(), Some(ErrorCode::StoreUnavailable | ErrorCode::Busy))
                    && start.elapsed() < Duration::from_secs(15) =>
            {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("resend: {e}"),
        }
    };
    assert_eq!(pg.psql(&db, stored).as_deref(), Ok("1"), "the resend was stored again");

    // A fresh device of bob: one copy in catch-up and in history.
    let mut b = login(&s, &bob, "fresh");
    let (got, end) = b.catch_up().unwrap();
    assert_eq!(end.unavailable, 0);
    let bodies: Vec<&[u8]> = got.iter().map(|d| &d.body[..]).collect();
    assert_eq!(bodies, [&b"before"[..], b"ambiguous"], "catch-up");
    let alice_id = got[0].stamp.from;
    let (page, _) = b.history(alice_id, 0, false, 100).unwrap();
    let copies: Vec<u64> = page.iter().filter(|d| d.body == b"ambiguous").map(|d| d.stamp.seq).collect();
    assert_eq!(copies.len(), 1, "history holds {copies:?}");
    // The owner answers the resend with the stored original's ids.
    assert!(ack.duplicate, "resend acked as new: {ack:?}");
    assert_eq!(ack.seq, copies[0], "the resend's ack names the stored copy");
}

/// A schema 1 database that already holds resent copies: at start the lowest seq of each
/// (conversation, sender, client message id) stays, the others go, and the conversation goes on
/// above the highest seq it ever used.
#[test]
fn schema_1_with_resent_copies_migrates() {
    let servers = common::pg::shared();
    let db = common::pg::fresh_db_name();
    servers[0].create_database(&db);
    // Schema 1 as it was released.
    let v1 = "
        CREATE TABLE tim_schema (version int4 NOT NULL);
        INSERT INTO tim_schema VALUES (1);
        CREATE SEQUENCE user_ids;
        CREATE TABLE accounts (id int8 PRIMARY KEY, name_key bytea NOT NULL UNIQUE,
                               password_hash text NOT NULL, created_ms int8 NOT NULL);
        CREATE TABLE messages (conv_a int8 NOT NULL, conv_b int8 NOT NULL, seq int8 NOT NULL,
                               msg_id int8 NOT NULL, ts_ms int8 NOT NULL, sender int8 NOT NULL,
                               sender_device int8 NOT NULL, client_msg_id int8 NOT NULL,
                               payload bytea NOT NULL, PRIMARY KEY (conv_a, conv_b, seq));
        CREATE INDEX messages_by_a ON messages (conv_a, ts_ms);
        CREATE INDEX messages_by_b ON messages (conv_b, ts_ms);
        CREATE TABLE cursors (user_id int8 NOT NULL, device int8 NOT NULL, conv_a int8 NOT NULL,
                              conv_b int8 NOT NULL, seq int8 NOT NULL,
                              PRIMARY KEY (user_id, device, conv_a, conv_b));
        -- (1, 2): 10 at seq 1 and again at 3; 11 at 2 and again at 4 and 5 (the newest).
        INSERT INTO messages
        SELECT 1, 2, seq, 1000 + seq, 1700000000000 + seq, 1, 7, cmid, convert_to('s' || seq, 'UTF8')
        FROM (VALUES (1, 10), (2, 11), (3, 10), (4, 11), (5, 11)) v (seq, cmid);
        INSERT INTO messages VALUES (1, 3, 1, 2001, 1700000000001, 1, 7, 10, 's1');";
    servers[0].psql(&db, v1).unwrap();
    let cfg = tim::config::PostgresConfig {
        partitions: vec![tim::config::PgPartition { slots: "0-4095".into(), url: servers[0].url(&db) }],
        ..Default::default()
    };
    let store = PostgresStore::open(&cfg).unwrap();
    let bodies = |conv| {
        let page = store.history(conv, 0, false, 100.into()).unwrap();
        page.payloads.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(bodies((1, 2)), ["s1", "s2"]);
    assert_eq!(bodies((1, 3)), ["s1"]);
    let load = store.load_conv((1, 2), 0, 10).unwrap();
    assert_eq!(load.last_seq, 5, "a removed copy's seq is not given again");
    assert_eq!(load.recent.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(store.load_conv((1, 3), 0, 10).unwrap().last_seq, 1);
    assert_eq!(
        servers[0].psql(&db, "SELECT max(version) FROM tim_schema").as_deref(),
        Ok(tim::store::postgres::SCHEMA_VERSION.to_string().as_str())
    );
    // Schema 3 lists each user's conversations, and catch-up reads from that list.
    let listed = servers[0].psql(&db, "SELECT string_agg(user_id || ':' || conv_a || '-' || conv_b, ' ' ORDER BY user_id, conv_a, conv_b) FROM user_convs");
    assert_eq!(listed.as_deref(), Ok("1:1-2 1:1-3 2:1-2 3:1-3"));
    let caught = store.catch_up(2, 9, 0, u64::MAX >> 1, 100.into()).unwrap();
    let caught: Vec<_> =
        caught.page.payloads.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect();
    assert_eq!(caught, ["s1", "s2"], "user 2's catch-up after the migration");
    store.close();
    drop(store);
    // Opening again migrates nothing.
    let store = PostgresStore::open(&cfg).unwrap();
    assert_eq!(store.load_conv((1, 2), 0, 10).unwrap().last_seq, 5);
}
