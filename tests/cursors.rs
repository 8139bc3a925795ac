//! Delivery cursors are kept only for conversations that have stored messages (PostgreSQL; the
//! embedded store has the same check in its unit tests): acks of made-up conversations cannot
//! grow the store.

mod common;

use tim::store::{postgres::PostgresStore, Cursor, Store};

#[test]
fn cursors_only_for_stored_conversations() {
    let servers = common::pg::shared();
    let db = common::pg::fresh_db_name();
    servers[0].create_database(&db);
    let cfg = tim::config::PostgresConfig {
        partitions: vec![tim::config::PgPartition { slots: "0-4095".into(), url: servers[0].url(&db) }],
        ..Default::default()
    };
    let store = PostgresStore::open(&cfg).unwrap();
    let msg = tim::store::StoredMessage {
        conv: (1, 2),
        seq: 1,
        msg_id: 1,
        ts_ms: tim::clock::now_ms(),
        sender: 1,
        sender_device: 1,
        client_msg_id: 1,
        payload: bytes::Bytes::from_static(b"x"),
        group: None,
        edit: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    store.append(store.partition_of((1, 2)), vec![msg], Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap());
    let cursor = |conv| Cursor { user: 1, device: 5, conv, seq: 1 };
    let made_up: Vec<Cursor> = (0..500).map(|n| cursor((1, 10_000 + n))).collect();
    store.save_cursors(&made_up).unwrap();
    store.save_cursors(&[cursor((1, 2))]).unwrap();
    assert_eq!(servers[0].psql(&db, "SELECT count(*) FROM cursors").as_deref(), Ok("1"));
    store.close();
}
