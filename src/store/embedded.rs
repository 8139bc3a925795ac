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
//! - Resend dedup: a unique index on (conversation, sender, client message id). The committer
//!   inserts with `ON CONFLICT … DO NOTHING`, and for a message that was not inserted reads the
//!   stored original and reports it to its batch ([`super::Duplicates`]); a conflict on the
//!   primary key (conversation, seq) still fails the transaction.
//!
//! The schema is versioned with `PRAGMA user_version` and migrated at open.

use std::{path::Path, sync::Mutex, thread::JoinHandle, time::Duration};

use crossbeam_channel::{unbounded, Receiver, Sender};
use rusqlite::{params, Connection, ErrorCode as SqliteCode, OptionalExtension};

use super::{
    collect_page, Account, CatchUp, CommitDone, ConvKey, ConvLoad, Cursor, Duplicates, Edit, GroupChange,
    GroupLoad, GroupRow, GroupWrite, MemberRow, NameKey, Page, PageLimit, RecentSend, Store, StoreError,
    StoredMessage, Unstored, UserId, UserProfile,
};
use crate::{
    config::StoreConfig,
    protocol::{ErrorCode, GroupProfile, JoinRequest},
};

/// Schema version written by this build.
pub const SCHEMA_VERSION: i64 = 10;

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

/// Version 2: a message is stored once per (conversation, sender, client message id), so that a
/// resend whose first attempt was committed after all is not stored again. Copies already stored
/// twice (resends after an ambiguous commit, before this version) are removed first, keeping the
/// lowest seq (the first stored, as the dedup of version 2 would have kept). A removed copy's seq
/// stays used: `seq_floors` keeps, per conversation, the highest seq removed, and a conversation
/// continues above it (devices may have received it, and their cursors may stand on it).
const SCHEMA_V2: &str = "
CREATE TABLE seq_floors (
    conv_a INTEGER NOT NULL,
    conv_b INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (conv_a, conv_b)
) WITHOUT ROWID;
CREATE TEMP TABLE resent AS
    SELECT conv_a, conv_b, seq FROM (
        SELECT conv_a, conv_b, seq, row_number() OVER (
            PARTITION BY conv_a, conv_b, sender, client_msg_id ORDER BY seq) AS copy
        FROM messages)
    WHERE copy > 1;
INSERT INTO seq_floors (conv_a, conv_b, seq)
    SELECT conv_a, conv_b, MAX(seq) FROM resent GROUP BY conv_a, conv_b;
DELETE FROM messages WHERE (conv_a, conv_b, seq) IN (SELECT conv_a, conv_b, seq FROM resent);
DROP TABLE temp.resent;
CREATE UNIQUE INDEX messages_dedup ON messages (conv_a, conv_b, sender, client_msg_id);
";

/// Version 3: `user_convs`, each user's conversations, written with their messages. A login's
/// catch-up walks it and reads, per conversation, what lies past the device's cursor by primary
/// key, instead of every message of the user in the window (as on PostgreSQL, schema 3).
const SCHEMA_V3: &str = "
CREATE TABLE user_convs (
    user   INTEGER NOT NULL,
    conv_a INTEGER NOT NULL,
    conv_b INTEGER NOT NULL,
    PRIMARY KEY (user, conv_a, conv_b)
) WITHOUT ROWID;
INSERT OR IGNORE INTO user_convs (user, conv_a, conv_b)
    SELECT conv_a, conv_a, conv_b FROM (SELECT DISTINCT conv_a, conv_b FROM messages);
INSERT OR IGNORE INTO user_convs (user, conv_a, conv_b)
    SELECT conv_b, conv_a, conv_b FROM (SELECT DISTINCT conv_a, conv_b FROM messages);
";

/// Version 4: groups. A group's messages are the conversation (0, group id) in `messages`
/// (not listed in `user_convs`: its readers are its members). A member's row stays when it
/// leaves, with `until_seq` set: catch-up still gives it the messages up to its leave, and
/// `member_span` answers from it; a rejoin sets `from_seq` anew and clears `until_seq`.
const SCHEMA_V4: &str = "
CREATE TABLE groups (
    id                 INTEGER PRIMARY KEY,
    name               TEXT NOT NULL,
    topic              TEXT NOT NULL,
    avatar_url         TEXT NOT NULL,
    extra              BLOB NOT NULL,
    join_policy        INTEGER NOT NULL,
    invite_policy      INTEGER NOT NULL,
    founder            INTEGER NOT NULL,
    muted_all_until_ms INTEGER NOT NULL,
    dissolved          INTEGER NOT NULL,
    created_ms         INTEGER NOT NULL
);
CREATE TABLE group_members (
    group_id       INTEGER NOT NULL,
    user_id        INTEGER NOT NULL,
    role           INTEGER NOT NULL,
    muted_until_ms INTEGER NOT NULL,
    from_seq       INTEGER NOT NULL,
    until_seq      INTEGER,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
CREATE INDEX group_members_by_user ON group_members (user_id, group_id);
CREATE TABLE group_blocks (
    group_id INTEGER NOT NULL,
    user_id  INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
CREATE TABLE group_requests (
    group_id INTEGER NOT NULL,
    user_id  INTEGER NOT NULL,
    note     TEXT NOT NULL,
    ts_ms    INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
";

/// Version 5: bans (`banned_until_ms`: 0 none, else banned until then).
const SCHEMA_V5: &str = "
ALTER TABLE accounts ADD COLUMN banned_until_ms INTEGER NOT NULL DEFAULT 0;
";

/// Version 6: user profiles (postcard blobs).
/// Version 7: read positions (read receipts), per user, device and conversation.
const SCHEMA_V7: &str = "
CREATE TABLE reads (
    user   INTEGER NOT NULL,
    device INTEGER NOT NULL,
    conv_a INTEGER NOT NULL,
    conv_b INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (conv_a, conv_b, user, device)
) WITHOUT ROWID;
";

/// Version 8: when a burn-after-read message burns (see [`super::burn_at_ms`]; 0: never, below
/// 0: claimed by a sweep at minus that time).
const SCHEMA_V8: &str = "
ALTER TABLE messages ADD COLUMN burn_at_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_burn ON messages (burn_at_ms) WHERE burn_at_ms <> 0;
CREATE INDEX messages_burn_conv ON messages (conv_a, conv_b, seq) WHERE burn_at_ms > 0;
";

/// Version 9: the roster, one row per user and other user it has a relation with (see
/// [`crate::roster::Side`]); both rows of a pair change in one transaction.
const SCHEMA_V9: &str = "
CREATE TABLE roster (
    user     INTEGER NOT NULL,
    other    INTEGER NOT NULL,
    state    INTEGER NOT NULL,
    blocks   INTEGER NOT NULL,
    note     TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (user, other)
) WITHOUT ROWID;
";

/// Version 10: presence watches on the roster ([`crate::roster::watch`] bits, and since when).
const SCHEMA_V10: &str = "
ALTER TABLE roster ADD COLUMN watch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE roster ADD COLUMN watch_since_ms INTEGER NOT NULL DEFAULT 0;
";

const SCHEMA_V6: &str = "
CREATE TABLE profiles (
    user_id    INTEGER PRIMARY KEY,
    updated_ms INTEGER NOT NULL,
    data       BLOB NOT NULL
);
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
    if version < 2 {
        let tx = conn.transaction()?;
        let before: i64 = tx.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))?;
        tx.execute_batch(SCHEMA_V2)?;
        let after: i64 = tx.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))?;
        tx.pragma_update(None, "user_version", 2)?;
        tx.commit()?;
        if before > after {
            log::warn!(
                "embedded store: schema 2 removed {} resent copies of stored messages (kept the lowest seq of each)",
                before - after
            );
        }
    }
    if version < 3 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V3)?;
        tx.pragma_update(None, "user_version", 3)?;
        tx.commit()?;
    }
    if version < 4 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V4)?;
        tx.pragma_update(None, "user_version", 4)?;
        tx.commit()?;
    }
    if version < 5 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V5)?;
        tx.pragma_update(None, "user_version", 5)?;
        tx.commit()?;
    }
    if version < 6 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V6)?;
        tx.pragma_update(None, "user_version", 6)?;
        tx.commit()?;
    }
    if version < 7 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V7)?;
        tx.pragma_update(None, "user_version", 7)?;
        tx.commit()?;
    }
    if version < 8 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V8)?;
        tx.pragma_update(None, "user_version", 8)?;
        tx.commit()?;
    }
    if version < 9 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V9)?;
        tx.pragma_update(None, "user_version", 9)?;
        tx.commit()?;
    }
    if version < 10 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V10)?;
        tx.pragma_update(None, "user_version", 10)?;
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
        match commit(&mut conn, &jobs) {
            Ok(dups) => {
                for ((_, done), dups) in jobs.drain(..).zip(dups) {
                    done(Ok(dups));
                }
            }
            Err(e) => {
                for (_, done) in jobs.drain(..) {
                    done(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

/// Commit every job's batch in one transaction; for each job, the messages already stored under
/// their (conversation, sender, client message id) (earlier, by an earlier job of this commit,
/// or earlier in the same batch), which were not inserted.
fn commit(conn: &mut Connection, jobs: &[Job]) -> rusqlite::Result<Vec<Duplicates>> {
    let tx = conn.transaction()?;
    let mut out = Vec::with_capacity(jobs.len());
    {
        // Only the dedup index is the conflict target: a conflict on the primary key (two owners
        // giving the same seq) still aborts the transaction.
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (conv_a, conv_b, seq, msg_id, ts_ms, sender, sender_device, client_msg_id, payload,
                                   burn_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (conv_a, conv_b, sender, client_msg_id) DO NOTHING",
        )?;
        let mut listed = tx.prepare_cached(
            "INSERT OR IGNORE INTO user_convs (user, conv_a, conv_b) VALUES (?1, ?2, ?3), (?4, ?2, ?3)",
        )?;
        // Each conversation once per commit: both users list it (a probe when they already do).
        // A group's conversation (0, id) is not listed: its members are.
        let mut convs = std::collections::HashSet::new();
        for (batch, _) in jobs {
            let mut dups = Duplicates::new();
            for (index, m) in batch.iter().enumerate() {
                let inserted = insert.execute(params![
                    i(m.conv.0),
                    i(m.conv.1),
                    i(m.seq),
                    i(m.msg_id),
                    i(m.ts_ms),
                    i(m.sender),
                    i(m.sender_device),
                    i(m.client_msg_id),
                    &m.payload[..],
                    i(super::burn_at_ms(&m.payload, m.ts_ms)),
                ])?;
                if inserted == 0 {
                    // A duplicate notice's changes were stored with its original.
                    dups.push((index, Unstored::Duplicate(original(&tx, m)?)));
                    continue;
                }
                if let Some(edit) = &m.edit {
                    if let Err(code) = apply_edit(&tx, m.conv, edit)? {
                        // Nothing of a refused recall is stored: its seq stays a hole.
                        tx.prepare_cached(
                            "DELETE FROM messages WHERE conv_a = ?1 AND conv_b = ?2 AND seq = ?3",
                        )?
                        .execute(params![i(m.conv.0), i(m.conv.1), i(m.seq)])?;
                        dups.push((index, Unstored::Refused(code)));
                        continue;
                    }
                }
                if m.conv.0 != 0 && convs.insert(m.conv) {
                    listed.execute(params![i(m.conv.0), i(m.conv.0), i(m.conv.1), i(m.conv.1)])?;
                }
                if let Some(change) = &m.group {
                    apply_group(&tx, change, m.seq)?;
                }
            }
            out.push(dups);
        }
    }
    tx.commit()?;
    Ok(out)
}

/// `user`'s side of its pair with `other` (empty without a row).
fn side(c: &Connection, user: UserId, other: UserId) -> rusqlite::Result<crate::roster::Side> {
    c.prepare_cached(
        "SELECT state, blocks, note, since_ms, watch, watch_since_ms FROM roster WHERE user = ?1 AND other = ?2",
    )?
    .query_row(params![i(user), i(other)], |r| {
        Ok(crate::roster::Side {
            state: r.get(0)?,
            blocks: r.get(1)?,
            note: r.get(2)?,
            since_ms: u(r.get(3)?),
            watch: r.get(4)?,
            watch_since_ms: u(r.get(5)?),
        })
    })
        .optional()
        .map(Option::unwrap_or_default)
}

/// Keep `user`'s side of its pair with `other` (an empty side: no row).
fn put_side(c: &Connection, user: UserId, other: UserId, s: &crate::roster::Side) -> rusqlite::Result<()> {
    if s.is_empty() {
        c.prepare_cached("DELETE FROM roster WHERE user = ?1 AND other = ?2")?
            .execute(params![i(user), i(other)])?;
    } else {
        c.prepare_cached(
            "INSERT INTO roster (user, other, state, blocks, note, since_ms, watch, watch_since_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (user, other) DO UPDATE SET state = excluded.state, blocks = excluded.blocks,
                 note = excluded.note, since_ms = excluded.since_ms, watch = excluded.watch,
                 watch_since_ms = excluded.watch_since_ms",
        )?
        .execute(params![
            i(user),
            i(other),
            s.state,
            s.blocks,
            s.note,
            i(s.since_ms),
            s.watch,
            i(s.watch_since_ms)
        ])?;
    }
    Ok(())
}

/// A roster list ([`crate::protocol::roster_list`]) in SQL: the condition on a row (an unknown
/// list: none), and the columns of its entries' `since_ms` and `note` (what
/// [`crate::roster::Side::listed`] says).
pub(crate) fn roster_filter(list: u8) -> (&'static str, &'static str, &'static str) {
    use crate::protocol::roster_list as l;
    let cond = match list {
        l::FRIENDS => "state = 3",
        l::INCOMING => "state = 2",
        l::OUTGOING => "state = 1",
        l::BLOCKED => "blocks",
        l::WATCHERS => "(watch & 4) <> 0",
        l::WATCHING => "(watch & 1) <> 0",
        l::WATCH_INCOMING => "(watch & 8) <> 0",
        l::WATCH_OUTGOING => "(watch & 2) <> 0",
        _ => "false",
    };
    match list {
        l::INCOMING | l::OUTGOING => (cond, "since_ms", "note"),
        l::FRIENDS | l::BLOCKED => (cond, "since_ms", "''"),
        _ => (cond, "watch_since_ms", "''"),
    }
}

/// Make `edit` to its messages of `conv` (read, checked and rewritten in the transaction);
/// the inner `Err` says why it is refused (none of its messages could be changed).
fn apply_edit(
    tx: &rusqlite::Transaction<'_>,
    conv: ConvKey,
    edit: &Edit,
) -> rusqlite::Result<Result<(), ErrorCode>> {
    let (a, b) = (i(conv.0), i(conv.1));
    let mut refused = ErrorCode::NotRecallable;
    let mut changed = 0;
    for &seq in edit.seqs() {
        let payload: Option<Vec<u8>> = tx
            .prepare_cached("SELECT payload FROM messages WHERE conv_a = ?1 AND conv_b = ?2 AND seq = ?3")?
            .query_row(params![a, b, i(seq)], |r| r.get(0))
            .optional()?;
        let Some(payload) = payload else { continue };
        match edit.apply(&payload) {
            Ok(tombstone) => {
                tx.prepare_cached(
                    "UPDATE messages SET payload = ?4, burn_at_ms = 0 WHERE conv_a = ?1 AND conv_b = ?2 AND seq = ?3",
                )?
                .execute(params![a, b, i(seq), tombstone])?;
                changed += 1;
            }
            Err(code) => refused = code,
        }
    }
    Ok(if changed == 0 { Err(refused) } else { Ok(()) })
}

/// The stored message with `m`'s (conversation, sender, client message id).
fn original(tx: &rusqlite::Transaction<'_>, m: &StoredMessage) -> rusqlite::Result<RecentSend> {
    let mut stmt = tx.prepare_cached(
        "SELECT msg_id, seq, ts_ms FROM messages
         WHERE conv_a = ?1 AND conv_b = ?2 AND sender = ?3 AND client_msg_id = ?4",
    )?;
    stmt.query_row(params![i(m.conv.0), i(m.conv.1), i(m.sender), i(m.client_msg_id)], |r| {
        Ok(RecentSend {
            sender: m.sender,
            client_msg_id: m.client_msg_id,
            msg_id: u(r.get(0)?),
            seq: u(r.get(1)?),
            ts_ms: u(r.get(2)?),
        })
    })
}

/// Apply a group notice's changes (see [`GroupWrite`]) in the notice's transaction, in order;
/// `seq` is the notice's.
fn apply_group(tx: &rusqlite::Transaction<'_>, change: &GroupChange, seq: u64) -> rusqlite::Result<()> {
    let (g, seq) = (i(change.group), i(seq));
    for w in &change.writes {
        match w {
            GroupWrite::Group(row) => {
                let p = &row.profile;
                tx.prepare_cached(
                    "INSERT INTO groups (id, name, topic, avatar_url, extra, join_policy, invite_policy,
                                         founder, muted_all_until_ms, dissolved, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (id) DO UPDATE SET
                         name = excluded.name, topic = excluded.topic, avatar_url = excluded.avatar_url,
                         extra = excluded.extra, join_policy = excluded.join_policy,
                         invite_policy = excluded.invite_policy, founder = excluded.founder,
                         muted_all_until_ms = excluded.muted_all_until_ms,
                         dissolved = excluded.dissolved, created_ms = excluded.created_ms",
                )?
                .execute(params![
                    g,
                    p.name,
                    p.topic,
                    p.avatar_url,
                    p.extra,
                    p.join_policy,
                    p.invite_policy,
                    i(row.founder),
                    i(row.muted_all_until_ms),
                    row.dissolved,
                    i(row.created_ms),
                ])?;
            }
            GroupWrite::Join { user, role } => {
                tx.prepare_cached(
                    "INSERT INTO group_members (group_id, user_id, role, muted_until_ms, from_seq, until_seq)
                     VALUES (?1, ?2, ?3, 0, ?4, NULL)
                     ON CONFLICT (group_id, user_id) DO UPDATE SET
                         role = excluded.role, muted_until_ms = 0, from_seq = excluded.from_seq,
                         until_seq = NULL",
                )?
                .execute(params![g, i(*user), role, seq])?;
                tx.prepare_cached("DELETE FROM group_requests WHERE group_id = ?1 AND user_id = ?2")?
                    .execute(params![g, i(*user)])?;
            }
            GroupWrite::Member { user, role, muted_until_ms } => {
                tx.prepare_cached(
                    "UPDATE group_members SET role = ?3, muted_until_ms = ?4
                     WHERE group_id = ?1 AND user_id = ?2 AND until_seq IS NULL",
                )?
                .execute(params![g, i(*user), role, i(*muted_until_ms)])?;
            }
            GroupWrite::Leave { user } => {
                tx.prepare_cached(
                    "UPDATE group_members SET until_seq = ?3
                     WHERE group_id = ?1 AND user_id = ?2 AND until_seq IS NULL",
                )?
                .execute(params![g, i(*user), seq])?;
            }
            GroupWrite::LeaveAll => {
                tx.prepare_cached(
                    "UPDATE group_members SET until_seq = ?2 WHERE group_id = ?1 AND until_seq IS NULL",
                )?
                .execute(params![g, seq])?;
            }
            GroupWrite::Block { user } => {
                tx.prepare_cached("INSERT OR IGNORE INTO group_blocks (group_id, user_id) VALUES (?1, ?2)")?
                    .execute(params![g, i(*user)])?;
            }
            GroupWrite::Unblock { user } => {
                tx.prepare_cached("DELETE FROM group_blocks WHERE group_id = ?1 AND user_id = ?2")?
                    .execute(params![g, i(*user)])?;
            }
            GroupWrite::Unrequest { user } => {
                tx.prepare_cached("DELETE FROM group_requests WHERE group_id = ?1 AND user_id = ?2")?
                    .execute(params![g, i(*user)])?;
            }
        }
    }
    Ok(())
}

impl EmbeddedStore {
    /// Advance the positions of `table` (`cursors` or `reads`: same columns), in conversations
    /// that have a stored message.
    fn save_positions(&self, table: &str, positions: &[Cursor]) -> Result<(), StoreError> {
        self.with_aux(|c| {
            let tx = c.transaction()?;
            {
                let mut up = tx.prepare_cached(&format!(
                    "INSERT INTO {table} (user, device, conv_a, conv_b, seq) SELECT ?1, ?2, ?3, ?4, ?5
                     WHERE EXISTS (SELECT 1 FROM messages WHERE conv_a = ?3 AND conv_b = ?4)
                     ON CONFLICT (user, device, conv_a, conv_b) DO UPDATE SET seq = MAX(seq, excluded.seq)"
                ))?;
                for k in positions {
                    up.execute(params![i(k.user), i(k.device), i(k.conv.0), i(k.conv.1), i(k.seq)])?;
                }
            }
            tx.commit()
        })
        .map_err(unavailable)
    }
}

impl Store for EmbeddedStore {
    fn load_group(&self, group: u64) -> Result<Option<GroupLoad>, StoreError> {
        let g = i(group);
        self.with_reader(|c| {
            // One read transaction: the row, members, blocks and requests of one snapshot.
            let tx = c.unchecked_transaction()?;
            let row = tx
                .prepare_cached(
                    "SELECT name, topic, avatar_url, extra, join_policy, invite_policy, founder,
                            muted_all_until_ms, dissolved, created_ms
                     FROM groups WHERE id = ?1",
                )?
                .query_row(params![g], |r| {
                    Ok(GroupRow {
                        id: group,
                        profile: GroupProfile {
                            name: r.get(0)?,
                            topic: r.get(1)?,
                            avatar_url: r.get(2)?,
                            extra: r.get(3)?,
                            join_policy: r.get(4)?,
                            invite_policy: r.get(5)?,
                        },
                        founder: u(r.get(6)?),
                        muted_all_until_ms: u(r.get(7)?),
                        dissolved: r.get(8)?,
                        created_ms: u(r.get(9)?),
                    })
                })
                .optional()?;
            let Some(row) = row else { return Ok(None) };
            let members = tx
                .prepare_cached(
                    "SELECT user_id, role, muted_until_ms, from_seq FROM group_members
                     WHERE group_id = ?1 AND until_seq IS NULL ORDER BY user_id",
                )?
                .query_map(params![g], |r| {
                    Ok(MemberRow {
                        user: u(r.get(0)?),
                        role: r.get(1)?,
                        muted_until_ms: u(r.get(2)?),
                        from_seq: u(r.get(3)?),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let blocked = tx
                .prepare_cached("SELECT user_id FROM group_blocks WHERE group_id = ?1 ORDER BY user_id")?
                .query_map(params![g], |r| r.get(0).map(u))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let requests = tx
                .prepare_cached(
                    "SELECT user_id, note, ts_ms FROM group_requests WHERE group_id = ?1 ORDER BY user_id",
                )?
                .query_map(params![g], |r| {
                    Ok(JoinRequest { user_id: u(r.get(0)?), note: r.get(1)?, ts_ms: u(r.get(2)?) })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(GroupLoad { row, members, blocked, requests, reads: Vec::new() }))
        })
    }

    fn save_join_request(
        &self,
        group: u64,
        user: UserId,
        request: Option<&JoinRequest>,
    ) -> Result<(), StoreError> {
        self.with_aux(|c| {
            match request {
                // Only for a group that exists (as the memory store).
                Some(r) => c.prepare_cached(
                    "INSERT INTO group_requests (group_id, user_id, note, ts_ms)
                     SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM groups WHERE id = ?1)
                     ON CONFLICT (group_id, user_id) DO UPDATE SET note = excluded.note, ts_ms = excluded.ts_ms",
                )?
                .execute(params![i(group), i(user), r.note, i(r.ts_ms)])?,
                None => c
                    .prepare_cached("DELETE FROM group_requests WHERE group_id = ?1 AND user_id = ?2")?
                    .execute(params![i(group), i(user)])?,
            };
            Ok(())
        })
        .map_err(unavailable)
    }

    fn user_groups(&self, user: UserId, after: u64, limit: usize) -> Result<(Vec<u64>, bool), StoreError> {
        // Group ids lie below 2^63: a larger `after` lies past every group.
        if after >= i64::MAX as u64 {
            return Ok((Vec::new(), false));
        }
        let mut ids = self.with_reader(|c| {
            c.prepare_cached(
                "SELECT group_id FROM group_members
                 WHERE user_id = ?1 AND group_id > ?2 AND until_seq IS NULL
                 ORDER BY group_id LIMIT ?3",
            )?
            .query_map(
                params![i(user), i(after), i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)],
                |r| r.get(0).map(u),
            )?
            .collect::<rusqlite::Result<Vec<u64>>>()
        })?;
        let more = ids.len() > limit;
        ids.truncate(limit);
        Ok((ids, more))
    }

    fn group_count(&self, user: UserId) -> Result<usize, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT count(*) FROM group_members WHERE user_id = ?1 AND until_seq IS NULL")?
                .query_row(params![i(user)], |r| r.get::<_, i64>(0))
        })
        .map(|n| n as usize)
    }

    fn member_span(&self, user: UserId, group: u64) -> Result<Option<(u64, u64)>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT from_seq, until_seq FROM group_members WHERE group_id = ?1 AND user_id = ?2",
            )?
            .query_row(params![i(group), i(user)], |r| {
                Ok((u(r.get(0)?), r.get::<_, Option<i64>>(1)?.map_or(u64::MAX, u)))
            })
            .optional()
        })
    }

    fn durable(&self) -> bool {
        true
    }

    fn create_account_in(
        &self,
        name: &NameKey,
        password_hash: String,
        domain: u8,
    ) -> Result<UserId, StoreError> {
        let now = crate::clock::now_ms();
        // The next id of the domain's range (protocol::DOMAIN_SHIFT): ids are always given here,
        // so AUTOINCREMENT never picks one in another domain's range.
        let lo = crate::protocol::in_domain(0, domain);
        let hi = lo + (1 << crate::protocol::DOMAIN_SHIFT);
        let r = self.with_aux(|c| {
            c.execute(
                "INSERT INTO accounts (id, name_key, password_hash, created_ms)
                 VALUES ((SELECT COALESCE(MAX(id), ?4) + 1 FROM accounts WHERE id >= ?4 AND id < ?5),
                         ?1, ?2, ?3)",
                params![&name[..], password_hash, i(now), i(lo), i(hi)],
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
                "SELECT id, password_hash, banned_until_ms FROM accounts WHERE name_key = ?1",
                params![&name[..]],
                |r| Ok(Account { id: u(r.get(0)?), password_hash: r.get(1)?, banned_until_ms: u(r.get(2)?) }),
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

    fn set_ban(&self, user: UserId, until_ms: u64) -> Result<bool, StoreError> {
        self.with_aux(|c| {
            c.execute("UPDATE accounts SET banned_until_ms = ?2 WHERE id = ?1", params![i(user), i(until_ms)])
        })
        .map(|n| n > 0)
        .map_err(unavailable)
    }

    fn save_profile(&self, user: UserId, profile: &UserProfile, now_ms: u64) -> Result<(), StoreError> {
        let blob = super::profile_blob(profile);
        self.with_aux(|c| {
            c.execute(
                "INSERT INTO profiles (user_id, updated_ms, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id) DO UPDATE SET updated_ms = ?2, data = ?3",
                params![i(user), i(now_ms), blob],
            )
        })
        .map(|_| ())
        .map_err(unavailable)
    }

    fn profiles(&self, users: &[UserId]) -> Result<Vec<(UserId, u64, UserProfile)>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT p.updated_ms, p.data FROM accounts a LEFT JOIN profiles p ON p.user_id = a.id
                 WHERE a.id = ?1",
            )?;
            let mut out = Vec::with_capacity(users.len());
            for &user in users {
                let row = st
                    .query_row(params![i(user)], |r| {
                        Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
                    })
                    .optional()?;
                if let Some((updated, blob)) = row {
                    let profile =
                        blob.map_or_else(UserProfile::default, |b| super::profile_of_blob(user, &b));
                    out.push((user, updated.map_or(0, u), profile));
                }
            }
            Ok(out)
        })
    }

    fn ban_of(&self, user: UserId) -> Result<Option<u64>, StoreError> {
        self.with_reader(|c| {
            c.query_row("SELECT banned_until_ms FROM accounts WHERE id = ?1", params![i(user)], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|o| o.map(u))
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
            // A seq removed by the schema 2 migration stays used (`seq_floors`).
            let last_seq: Option<i64> = c.query_row(
                "SELECT MAX(seq) FROM (
                     SELECT MAX(seq) AS seq FROM messages WHERE conv_a = ?1 AND conv_b = ?2
                     UNION ALL SELECT seq FROM seq_floors WHERE conv_a = ?1 AND conv_b = ?2)",
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
            let pair = if conv.0 == 0 {
                0
            } else {
                let low = side(c, conv.0, conv.1)?;
                let high = side(c, conv.1, conv.0)?;
                crate::roster::pair_flags(&low, &high)
            };
            Ok(ConvLoad { last_seq: last_seq.map_or(0, u), recent, pair })
        })
    }

    fn roster_action(
        &self,
        user: UserId,
        other: UserId,
        action: u8,
        note: &str,
        now_ms: u64,
        max: usize,
    ) -> Result<Result<crate::roster::Outcome, ErrorCode>, StoreError> {
        self.with_aux(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)",
                params![i(other)],
                |r| r.get(0),
            )?;
            if !exists {
                return Ok(Err(ErrorCode::UnknownUser));
            }
            let (me, them) = (side(&tx, user, other)?, side(&tx, other, user)?);
            let count: i64 = tx.query_row(
                &format!(
                    "SELECT count(*) FROM roster WHERE user = ?1 AND {}",
                    crate::roster::count_filter(action)
                ),
                params![i(user)],
                |r| r.get(0),
            )?;
            let out = match crate::roster::apply(&me, &them, action, note, now_ms, count as usize, max) {
                Ok(out) => out,
                Err(code) => return Ok(Err(code)),
            };
            put_side(&tx, user, other, &out.me)?;
            put_side(&tx, other, user, &out.them)?;
            tx.commit()?;
            Ok(Ok(out))
        })
        .map_err(unavailable)
    }

    fn roster_list(
        &self,
        user: UserId,
        list: u8,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<crate::protocol::RosterEntry>, bool), StoreError> {
        let (filter, since, note) = roster_filter(list);
        let sql = format!(
            "SELECT other, {since}, {note} FROM roster WHERE user = ?1 AND other > ?2 AND {filter} ORDER BY other LIMIT ?3"
        );
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let rows =
                st.query_map(params![i(user), i(after.min(i64::MAX as u64)), limit as i64 + 1], |r| {
                    Ok(crate::protocol::RosterEntry {
                        user: u(r.get(0)?),
                        since_ms: u(r.get(1)?),
                        note: r.get(2)?,
                    })
                })?;
            let mut entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            let more = entries.len() > limit;
            entries.truncate(limit);
            Ok((entries, more))
        })
    }

    fn history(&self, conv: ConvKey, anchor: u64, older: bool, limit: PageLimit) -> Result<Page, StoreError> {
        let sql = if older {
            "SELECT payload FROM messages WHERE conv_a = ?1 AND conv_b = ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4"
        } else {
            "SELECT payload FROM messages WHERE conv_a = ?1 AND conv_b = ?2 AND seq > ?3 ORDER BY seq ASC LIMIT ?4"
        };
        // Sequence numbers stay below 2^63: a larger anchor lies past every message (going
        // older: from the newest; going newer: nothing), it must not wrap to a negative number.
        let anchor = if older && anchor == 0 { i64::MAX } else { i(anchor.min(i64::MAX as u64)) };
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows =
                stmt.query_map(params![i(conv.0), i(conv.1), anchor, limit.count as i64 + 1], |r| r.get(0))?;
            collect_page(rows, limit)
        })
    }

    fn catch_up(
        &self,
        user: UserId,
        device: u64,
        since_ms: u64,
        until_ms: u64,
        limit: PageLimit,
    ) -> Result<CatchUp, StoreError> {
        let page = self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                // Per conversation of the user, what lies past the device's cursor, by primary
                // key: the cost follows what is unread, not the user's traffic. A group's
                // conversation is read within the user's membership (`lo..=hi`): from the
                // notice that made it a member, up to the one that ended it.
                "SELECT m.payload FROM (
                     SELECT conv_a, conv_b, 0 AS lo, 9223372036854775807 AS hi
                     FROM user_convs WHERE user = ?1
                     UNION ALL
                     SELECT 0, group_id, from_seq, COALESCE(until_seq, 9223372036854775807)
                     FROM group_members WHERE user_id = ?1) uc
                 LEFT JOIN cursors c
                   ON c.user = ?1 AND c.device = ?2 AND c.conv_a = uc.conv_a AND c.conv_b = uc.conv_b
                 JOIN messages m
                   ON m.conv_a = uc.conv_a AND m.conv_b = uc.conv_b AND m.seq > COALESCE(c.seq, 0)
                  AND m.seq >= uc.lo AND m.seq <= uc.hi
                 WHERE m.ts_ms >= ?3 AND m.ts_ms <= ?5
                   AND NOT (m.sender = ?1 AND m.sender_device = ?2)
                 ORDER BY m.ts_ms, m.conv_a, m.conv_b, m.seq LIMIT ?4",
            )?;
            let args = params![i(user), i(device), i(since_ms), limit.count as i64 + 1, i(until_ms)];
            let rows = stmt.query_map(args, |r| r.get(0))?;
            collect_page(rows, limit)
        })?;
        Ok(CatchUp { page, unavailable: 0 })
    }

    fn close(&self) {
        self.shutdown();
    }

    fn save_cursors(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        self.save_positions("cursors", cursors)
    }

    fn save_reads(&self, reads: &[Cursor]) -> Result<(), StoreError> {
        self.save_positions("reads", reads)?;
        // A read makes the peer's burn-after-read messages up to it due now.
        let now = i(crate::clock::now_ms());
        self.with_aux(|c| {
            let tx = c.transaction()?;
            {
                let mut due = tx.prepare_cached(
                    "UPDATE messages INDEXED BY messages_burn_conv SET burn_at_ms = ?5
                     WHERE conv_a = ?1 AND conv_b = ?2 AND seq <= ?3 AND sender <> ?4
                       AND burn_at_ms > 0 AND burn_at_ms > ?5",
                )?;
                for r in reads.iter().filter(|r| r.conv.0 != 0) {
                    due.execute(params![i(r.conv.0), i(r.conv.1), i(r.seq), i(r.user), now])?;
                }
            }
            tx.commit()
        })
        .map_err(unavailable)
    }

    fn claim_due_burns(&self, now_ms: u64, limit: usize) -> Result<Vec<super::DueBurn>, StoreError> {
        let (now, stale) = (i(now_ms), i(now_ms.saturating_sub(super::BURN_CLAIM_MS)));
        // Most sweeps find nothing: a read first, without taking the write lock.
        let any: bool = self.with_reader(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM messages
                 WHERE burn_at_ms <> 0 AND ((burn_at_ms > 0 AND burn_at_ms <= ?1) OR (burn_at_ms < 0 AND -burn_at_ms <= ?2)))",
                params![now, stale],
                |r| r.get(0),
            )
        })?;
        if !any {
            return Ok(Vec::new());
        }
        self.with_aux(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let due: Vec<super::DueBurn> = {
                let mut st = tx.prepare_cached(
                    "SELECT conv_a, conv_b, seq, sender FROM messages
                     WHERE burn_at_ms <> 0 AND ((burn_at_ms > 0 AND burn_at_ms <= ?1) OR (burn_at_ms < 0 AND -burn_at_ms <= ?2))
                     LIMIT ?3",
                )?;
                let rows = st.query_map(params![now, stale, limit as i64], |r| {
                    Ok(super::DueBurn { conv: (u(r.get(0)?), u(r.get(1)?)), seq: u(r.get(2)?), sender: u(r.get(3)?) })
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            {
                let mut claim = tx.prepare_cached(
                    "UPDATE messages SET burn_at_ms = -?4 WHERE conv_a = ?1 AND conv_b = ?2 AND seq = ?3",
                )?;
                for d in &due {
                    claim.execute(params![i(d.conv.0), i(d.conv.1), i(d.seq), now.max(1)])?;
                }
            }
            tx.commit()?;
            Ok(due)
        })
        .map_err(unavailable)
    }

    fn reads_of(&self, conv: ConvKey) -> Result<Vec<(UserId, u64)>, StoreError> {
        self.with_aux(|c| {
            let mut st = c.prepare_cached(
                "SELECT user, MAX(seq) FROM reads WHERE conv_a = ?1 AND conv_b = ?2 GROUP BY user ORDER BY user",
            )?;
            let rows = st.query_map(params![i(conv.0), i(conv.1)], |r| Ok((u(r.get(0)?), u(r.get(1)?))))?;
            rows.collect()
        })
        .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn msg(conv: ConvKey, seq: u64, cmid: u64) -> StoredMessage {
        StoredMessage {
            conv,
            seq,
            msg_id: 1000 + seq,
            ts_ms: 1_700_000_000_000 + seq,
            sender: conv.0,
            sender_device: 7,
            client_msg_id: cmid,
            payload: Bytes::from(format!("s{seq}")),
            group: None,
            edit: None,
        }
    }

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig { data_dir: dir.to_path_buf(), synchronous: "normal".into(), ..StoreConfig::default() }
    }

    fn append(store: &EmbeddedStore, batch: Vec<StoredMessage>) -> Result<Duplicates, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        store.append(0, batch, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(Duration::from_secs(30)).unwrap()
    }

    /// A schema 1 database holding resent copies migrates at open: the lowest seq of each
    /// (conversation, sender, client message id) stays, the later copies go, the conversation
    /// continues above the highest seq it ever used, and resends are then detected.
    #[test]
    fn schema_1_with_resent_copies_migrates() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut conn = open(&dir.path().join("tim.db"), "normal").unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(SCHEMA_V1).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            let (a, b) = ((1, 2), (1, 3));
            // a: 10 stored at seq 1 and again at 3; 11 at 2 and again at 4 (the newest); b: clean.
            for m in
                [msg(a, 1, 10), msg(a, 2, 11), msg(a, 3, 10), msg(a, 4, 11), msg(a, 5, 11), msg(b, 1, 10)]
            {
                tx.execute(
                    "INSERT INTO messages VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        i(m.conv.0),
                        i(m.conv.1),
                        i(m.seq),
                        i(m.msg_id),
                        i(m.ts_ms),
                        i(m.sender),
                        i(m.sender_device),
                        i(m.client_msg_id),
                        &m.payload[..]
                    ],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let store = EmbeddedStore::open(&config(dir.path())).unwrap();
        let seqs = |conv| {
            let page = store.history(conv, 0, false, 100.into()).unwrap();
            page.payloads.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(seqs((1, 2)), ["s1", "s2"]);
        assert_eq!(seqs((1, 3)), ["s1"]);
        let load = store.load_conv((1, 2), 0, 10).unwrap();
        assert_eq!(load.last_seq, 5, "a removed copy's seq is not given again");
        assert_eq!(load.recent.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(store.load_conv((1, 3), 0, 10).unwrap().last_seq, 1);
        let dups = append(&store, vec![msg((1, 2), 6, 11), msg((1, 2), 7, 12)]).unwrap();
        assert_eq!(dups.len(), 1);
        assert_eq!(
            (dups[0].0, dups[0].1.original().unwrap().seq, dups[0].1.original().unwrap().msg_id),
            (0, 2, 1002)
        );
        // Schema 3 listed each user's conversations; user 2's catch-up reads from that list.
        let listed: Vec<(i64, i64, i64)> = store
            .with_reader(|c| {
                let mut st = c.prepare("SELECT user, conv_a, conv_b FROM user_convs ORDER BY 1, 2, 3")?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect()
            })
            .unwrap();
        assert_eq!(listed, [(1, 1, 2), (1, 1, 3), (2, 1, 2), (3, 1, 3)]);
        let caught = store.catch_up(2, 9, 0, u64::MAX >> 1, 100.into()).unwrap();
        let caught: Vec<_> =
            caught.page.payloads.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect();
        assert_eq!(caught, ["s1", "s2", "s7"], "user 2's catch-up after the migration");
        store.close();
        // Opening again does not migrate again.
        let store = EmbeddedStore::open(&config(dir.path())).unwrap();
        assert_eq!(store.load_conv((1, 2), 0, 10).unwrap().last_seq, 7);
    }

    /// A message whose seq and (sender, client message id) are both stored already: the
    /// identical message committed twice is reported as a duplicate of itself, not an error.
    #[test]
    fn same_message_twice_is_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&config(dir.path())).unwrap();
        assert!(append(&store, vec![msg((1, 2), 1, 10)]).unwrap().is_empty());
        let dups = append(&store, vec![msg((1, 2), 1, 10)]).unwrap();
        assert_eq!((dups[0].0, dups[0].1.original().unwrap().seq), (0, 1));
    }

    /// A delivery cursor is kept only for a conversation that has stored messages: acks of
    /// made-up conversations do not grow the store.
    #[test]
    fn cursors_only_for_stored_conversations() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&config(dir.path())).unwrap();
        assert!(append(&store, vec![msg((1, 2), 1, 10)]).unwrap().is_empty());
        let cursor = |conv| Cursor { user: 1, device: 5, conv, seq: 1 };
        store.save_cursors(&[cursor((1, 2)), cursor((1, 999)), cursor((1, 1000))]).unwrap();
        let kept: i64 =
            store.with_reader(|c| c.query_row("SELECT count(*) FROM cursors", [], |r| r.get(0))).unwrap();
        assert_eq!(kept, 1);
    }

    /// A store of schema 9 (a roster without watches) opens at schema 10: its roster rows are
    /// kept, with no watch, and take watches after.
    #[test]
    fn roster_rows_survive_the_watch_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tim.db");
        {
            let c = Connection::open(&path).unwrap();
            for (n, sql) in [
                SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8,
                SCHEMA_V9,
            ]
            .into_iter()
            .enumerate()
            {
                c.execute_batch(sql).unwrap();
                c.pragma_update(None, "user_version", n as i64 + 1).unwrap();
            }
            c.execute_batch(
                "INSERT INTO accounts (id, name_key, password_hash, created_ms) VALUES (1, x'01', '', 0), (2, x'02', '', 0);
                 INSERT INTO roster (user, other, state, blocks, note, since_ms) VALUES (1, 2, 3, 0, '', 5), (2, 1, 3, 0, '', 5);",
            )
            .unwrap();
        }
        let store = EmbeddedStore::open(&config(dir.path())).unwrap();
        let version: i64 =
            store.with_reader(|c| c.pragma_query_value(None, "user_version", |r| r.get(0))).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let friends = store.roster_list(1, crate::protocol::roster_list::FRIENDS, 0, 10).unwrap().0;
        assert_eq!(friends.iter().map(|e| (e.user, e.since_ms)).collect::<Vec<_>>(), [(2, 5)]);
        let out =
            store.roster_action(2, 1, crate::protocol::roster_action::WATCH, "", 9, 10).unwrap().unwrap();
        assert_eq!((out.me.state, out.me.watch), (crate::roster::state::FRIEND, crate::roster::watch::ASKED));
        let asks = store.roster_list(1, crate::protocol::roster_list::WATCH_INCOMING, 0, 10).unwrap().0;
        assert_eq!(asks.iter().map(|e| (e.user, e.since_ms)).collect::<Vec<_>>(), [(2, 9)]);
    }
}
