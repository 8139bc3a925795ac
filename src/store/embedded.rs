//! The embedded store: SQLite (bundled, WAL mode) in `store.data_dir`, the zero-setup default.
//!
//! - One **committer thread** owns the connection that writes messages. It takes the first queued
//!   batch, then everything else queued (from every shard) up to `commit_batch_max` messages,
//!   and commits them in one transaction: group
//!   commit, so durability costs one fsync per batch rather than per message.
//! - Account writes and cursor writes use a second connection under a mutex (they are rare or
//!   already batched); SQLite serializes writers and `busy_timeout` absorbs the overlap.
//! - Reads (login, conversation load, history, catch-up) use a small pool of read connections;
//!   WAL lets them run beside the writer.
//!
//! The schema is versioned with `PRAGMA user_version` and migrated at open.

use std::{path::Path, sync::Mutex, thread::JoinHandle, time::Duration};

use bytes::Bytes;
use crossbeam_channel::{unbounded, Receiver, Sender};
use rusqlite::{params, Connection, ErrorCode as SqliteCode, OptionalExtension};

use super::{
    Account, CatchUp, CommitDone, ConvKey, ConvLoad, Cursor, NameKey, Page, RecentSend, Store, StoreError,
    StoredMessage, UserId,
};
use crate::config::StoreConfig;

/// Schema version written by this build.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE accounts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name_key      BLOB NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_ms    INTEGER NOT NULL
);
CREATE TABLE messages (
    conv_a        INTEGER NOT NULL,
    conv_b        INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    msg_id        INTEGER NOT NULL,
    ts_ms         INTEGER NOT NULL,
    sender        INTEGER NOT NULL,
    sender_device INTEGER NOT NULL,
    client_msg_id INTEGER NOT NULL,
    payload       BLOB NOT NULL,
    PRIMARY KEY (conv_a, conv_b, seq)
) WITHOUT ROWID;
CREATE INDEX messages_by_a ON messages (conv_a, ts_ms);
CREATE INDEX messages_by_b ON messages (conv_b, ts_ms);
CREATE TABLE cursors (
    user   INTEGER NOT NULL,
    device INTEGER NOT NULL,
    conv_a INTEGER NOT NULL,
    conv_b INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (user, device, conv_a, conv_b)
) WITHOUT ROWID;
";

/// Read connections kept open.
const READERS_MAX: usize = 8;

type Job = (Vec<StoredMessage>, CommitDone);

pub struct EmbeddedStore {
    jobs: Mutex<Option<Sender<Job>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    aux: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    path: std::path::PathBuf,
    synchronous: String,
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// SQLite integers are i64; ids and times are u64 with the top bit clear in practice, and are
/// stored bit for bit either way.
#[inline]
fn i(v: u64) -> i64 {
    v as i64
}
#[inline]
fn u(v: i64) -> u64 {
    v as u64
}

fn open(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    anyhow::ensure!(
        version <= SCHEMA_VERSION,
        "the embedded store has schema version {version}, newer than this build's {SCHEMA_VERSION}"
    );
    if version < 1 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V1)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl EmbeddedStore {
    pub fn open(cfg: &StoreConfig) -> anyhow::Result<EmbeddedStore> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let path = cfg.data_dir.join("tim.db");
        let mut aux = open(&path, &cfg.synchronous)?;
        migrate(&mut aux)?;
        let writer = open(&path, &cfg.synchronous)?;
        let (tx, rx) = unbounded::<Job>();
        let batch_max = cfg.commit_batch_max;
        let committer = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || run_committer(writer, rx, batch_max))?;
        Ok(EmbeddedStore {
            jobs: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(committer)),
            aux: Mutex::new(aux),
            readers: Mutex::new(Vec::new()),
            path,
            synchronous: cfg.synchronous.clone(),
        })
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open(&self.path, &self.synchronous).map_err(unavailable)?,
        };
        let out = f(&conn).map_err(unavailable);
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < READERS_MAX {
            pool.push(conn);
        }
        out
    }

    fn with_aux<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let mut conn = self.aux.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Stop the committer after it has committed everything queued.
    pub fn shutdown(&self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.committer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_committer(mut conn: Connection, rx: Receiver<Job>, batch_max: usize) {
    let mut jobs: Vec<Job> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut count = first.0.len();
        jobs.push(first);
        // Everything the shards queued while the last commit ran goes into this one.
        while count < batch_max {
            match rx.try_recv() {
                Ok(j) => {
                    count += j.0.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let result = commit(&mut conn, &jobs);
        for (_, done) in jobs.drain(..) {
            done(result.as_ref().map(|_| Vec::new()).map_err(|e| StoreError::Unavailable(e.to_string())));
        }
    }
}

fn commit(conn: &mut Connection, jobs: &[Job]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (conv_a, conv_b, seq, msg_id, ts_ms, sender, sender_device, client_msg_id, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for m in jobs.iter().flat_map(|(batch, _)| batch) {
            insert.execute(params![
                i(m.conv.0),
                i(m.conv.1),
                i(m.seq),
                i(m.msg_id),
                i(m.ts_ms),
                i(m.sender),
                i(m.sender_device),
                i(m.client_msg_id),
                &m.payload[..],
            ])?;
        }
    }
    tx.commit()
}

fn page(rows: Vec<Vec<u8>>, limit: u32) -> Page {
    let more = rows.len() > limit as usize;
    Page { payloads: rows.into_iter().take(limit as usize).map(Bytes::from).collect(), more }
}

impl Store for EmbeddedStore {
    fn durable(&self) -> bool {
        true
    }

    fn create_account(&self, name: &NameKey, password_hash: String) -> Result<UserId, StoreError> {
        let now = crate::shard::now_ms();
        let r = self.with_aux(|c| {
            c.execute(
                "INSERT INTO accounts (name_key, password_hash, created_ms) VALUES (?1, ?2, ?3)",
                params![&name[..], password_hash, i(now)],
            )?;
            Ok(c.last_insert_rowid())
        });
        match r {
            Ok(id) => Ok(u(id)),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == SqliteCode::ConstraintViolation => {
                Err(StoreError::NameTaken)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    fn account_by_name(&self, name: &NameKey) -> Result<Option<Account>, StoreError> {
        self.with_reader(|c| {
            c.query_row(
                "SELECT id, password_hash FROM accounts WHERE name_key = ?1",
                params![&name[..]],
                |r| Ok(Account { id: u(r.get(0)?), password_hash: r.get(1)? }),
            )
            .optional()
        })
    }

    fn account_exists(&self, user: UserId) -> Result<bool, StoreError> {
        self.with_reader(|c| {
            c.query_row("SELECT 1 FROM accounts WHERE id = ?1", params![i(user)], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
    }

    fn append(&self, _partition: usize, batch: Vec<StoredMessage>, done: CommitDone) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.as_ref() {
            Some(tx) => {
                if let Err(e) = tx.send((batch, done)) {
                    let (_, done) = e.into_inner();
                    done(Err(StoreError::Unavailable("store closed".into())));
                }
            }
            None => done(Err(StoreError::Unavailable("store closed".into()))),
        }
    }

    fn load_conv(&self, conv: ConvKey, since_ms: u64, recent_max: usize) -> Result<ConvLoad, StoreError> {
        self.with_reader(|c| {
            let last_seq: Option<i64> = c.query_row(
                "SELECT MAX(seq) FROM messages WHERE conv_a = ?1 AND conv_b = ?2",
                params![i(conv.0), i(conv.1)],
                |r| r.get(0),
            )?;
            let mut stmt = c.prepare_cached(
                "SELECT sender, client_msg_id, msg_id, seq, ts_ms FROM messages
                 WHERE conv_a = ?1 AND conv_b = ?2 ORDER BY seq DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![i(conv.0), i(conv.1), recent_max as i64], |r| {
                Ok(RecentSend {
                    sender: u(r.get(0)?),
                    client_msg_id: u(r.get(1)?),
                    msg_id: u(r.get(2)?),
                    seq: u(r.get(3)?),
                    ts_ms: u(r.get(4)?),
                })
            })?;
            let mut recent = Vec::new();
            for r in rows {
                let r = r?;
                if r.ts_ms < since_ms {
                    break;
                }
                recent.push(r);
            }
            Ok(ConvLoad { last_seq: last_seq.map_or(0, u), recent })
        })
    }

    fn history(&self, conv: ConvKey, anchor: u64, older: bool, limit: u32) -> Result<Page, StoreError> {
        let sql = if older {
            "SELECT payload FROM messages WHERE conv_a = ?1 AND conv_b = ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4"
        } else {
            "SELECT payload FROM messages WHERE conv_a = ?1 AND conv_b = ?2 AND seq > ?3 ORDER BY seq ASC LIMIT ?4"
        };
        // Sequence numbers stay below 2^63: a larger anchor lies past every message (going
        // older: from the newest; going newer: nothing), it must not wrap to a negative number.
        let anchor = if older && anchor == 0 { i64::MAX } else { i(anchor.min(i64::MAX as u64)) };
        let rows = self.with_reader(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows =
                stmt.query_map(params![i(conv.0), i(conv.1), anchor, limit as i64 + 1], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>()
        })?;
        Ok(page(rows, limit))
    }

    fn catch_up(
        &self,
        user: UserId,
        device: u64,
        since_ms: u64,
        until_ms: u64,
        limit: u32,
    ) -> Result<CatchUp, StoreError> {
        let rows = self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT m.payload FROM messages m
                 LEFT JOIN cursors c
                   ON c.user = ?1 AND c.device = ?2 AND c.conv_a = m.conv_a AND c.conv_b = m.conv_b
                 WHERE (m.conv_a = ?1 OR m.conv_b = ?1) AND m.ts_ms >= ?3 AND m.ts_ms <= ?5
                   AND m.seq > COALESCE(c.seq, 0)
                   AND NOT (m.sender = ?1 AND m.sender_device = ?2)
                 ORDER BY m.ts_ms, m.conv_a, m.conv_b, m.seq LIMIT ?4",
            )?;
            let args = params![i(user), i(device), i(since_ms), limit as i64 + 1, i(until_ms)];
            let rows = stmt.query_map(args, |r| r.get(0))?;
            rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>()
        })?;
        Ok(CatchUp { page: page(rows, limit), unavailable: 0 })
    }

    fn close(&self) {
        self.shutdown();
    }

    fn save_cursors(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        self.with_aux(|c| {
            let tx = c.transaction()?;
            {
                let mut up = tx.prepare_cached(
                    "INSERT INTO cursors (user, device, conv_a, conv_b, seq) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (user, device, conv_a, conv_b) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                )?;
                for k in cursors {
                    up.execute(params![i(k.user), i(k.device), i(k.conv.0), i(k.conv.1), i(k.seq)])?;
                }
            }
            tx.commit()
        })
        .map_err(unavailable)
    }
}
