//! The PostgreSQL store: the 4096 partitions are split into ranges, each range on its own
//! PostgreSQL server or database (`[[store.postgres.partition]]`). Every key lives on the
//! partition of its hash:
//!
//! - a conversation, with its messages and the delivery cursors of its readers, on the
//!   partition of the conversation's hash (the same hash that picks its owner shard);
//! - a group, with its members, block list, join requests and messages, on the partition of its
//!   conversation (0, group id); a user's memberships are thus spread over every range;
//! - an account on the partition of its name key; its user id carries that partition in its low
//!   12 bits (`id = n * 4096 + partition`), so the account is found from the id as well.
//!
//! Cursors live with their conversation (not with their user) so that catch-up is one local join
//! per server instead of a join across servers.
//!
//! The connections live on a dedicated multi-threaded tokio runtime (`store.postgres.threads`),
//! a bounded pool per range. [`Store::append`] hands the batch to that runtime and returns; the
//! batch goes to PostgreSQL as one statement, a multi-row `INSERT … SELECT FROM UNNEST(…) ON
//! CONFLICT DO NOTHING` on the resend dedup index (one round trip, one implicit transaction);
//! only when it inserted fewer rows than the batch, a second one reads the stored originals. A
//! batch holding group notices runs in an explicit transaction with the notices' changes (one
//! statement per change). A range that is down or stalled only fails or delays the calls that
//! need it: connecting, waiting for a pooled connection and every statement have a timeout
//! (`connect_timeout_ms`, `acquire_timeout_ms`, `statement_timeout_ms`, the last also set as the
//! server's `statement_timeout`); a connection whose statement timed out or broke is dropped and
//! replaced on the next use, so tim reconnects by itself when the server returns; while a range is
//! not answering, calls that find no free connection fail at once (a range's `stalled` flag). A
//! login's catch-up asks every range with a deadline and answers with what came back, counting the
//! ranges that did not answer. The schema is created and migrated at start, under an advisory lock,
//! and versioned in `tim_schema`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_postgres::{types::Type, Client, NoTls, Statement};

use super::{
    collect_page, group_conv, Account, CatchUp, CommitDone, ConvKey, ConvLoad, Cursor, Duplicates,
    GroupChange, GroupLoad, GroupRow, GroupWrite, LoadRequest, MemberRow, NameKey, Page, PageLimit,
    RecentSend, Store, StoreError, StoredMessage, Unstored, UserId, UserProfile,
};
use crate::{
    config::PostgresConfig,
    protocol::{ErrorCode, GroupProfile, JoinRequest},
};

/// Schema version written by this build.
pub const SCHEMA_VERSION: i32 = 10;

const SCHEMA_V1: &str = "
CREATE SEQUENCE user_ids;
CREATE TABLE accounts (
    id            int8 PRIMARY KEY,
    name_key      bytea NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_ms    int8 NOT NULL
);
CREATE TABLE messages (
    conv_a        int8 NOT NULL,
    conv_b        int8 NOT NULL,
    seq           int8 NOT NULL,
    msg_id        int8 NOT NULL,
    ts_ms         int8 NOT NULL,
    sender        int8 NOT NULL,
    sender_device int8 NOT NULL,
    client_msg_id int8 NOT NULL,
    payload       bytea NOT NULL,
    PRIMARY KEY (conv_a, conv_b, seq)
);
CREATE INDEX messages_by_a ON messages (conv_a, ts_ms);
CREATE INDEX messages_by_b ON messages (conv_b, ts_ms);
CREATE TABLE cursors (
    user_id int8 NOT NULL,
    device  int8 NOT NULL,
    conv_a  int8 NOT NULL,
    conv_b  int8 NOT NULL,
    seq     int8 NOT NULL,
    PRIMARY KEY (user_id, device, conv_a, conv_b)
);
";

/// Version 2: a message is stored once per (conversation, sender, client message id), so that a
/// resend whose first attempt was committed after all is not stored again. Copies already stored
/// twice (resends after an ambiguous commit, before this version) are removed first, keeping the
/// lowest seq (the first stored, as the dedup of version 2 would have kept). A removed copy's seq
/// stays used: `seq_floors` keeps, per conversation, the highest seq removed, and a conversation
/// continues above it (devices may have received it, and their cursors may stand on it).
///
/// The index is created only if missing: on a large table, build it beforehand without blocking
/// writes (`CREATE UNIQUE INDEX CONCURRENTLY messages_dedup ON messages (conv_a, conv_b, sender,
/// client_msg_id)`, which needs the table free of copies) and the migration has nothing left to
/// scan. [`migrate`] drops the index first if such a build failed and left it invalid.
const SCHEMA_V2_FLOORS: &str = "
CREATE TABLE seq_floors (
    conv_a int8 NOT NULL,
    conv_b int8 NOT NULL,
    seq    int8 NOT NULL,
    PRIMARY KEY (conv_a, conv_b)
);
";
const SCHEMA_V2_DEDUP: &str = "
CREATE TEMP TABLE resent ON COMMIT DROP AS
    SELECT conv_a, conv_b, seq FROM (
        SELECT conv_a, conv_b, seq, row_number() OVER (
            PARTITION BY conv_a, conv_b, sender, client_msg_id ORDER BY seq) AS copy
        FROM messages) t
    WHERE copy > 1;
INSERT INTO seq_floors (conv_a, conv_b, seq)
    SELECT conv_a, conv_b, max(seq) FROM resent GROUP BY conv_a, conv_b;
DELETE FROM messages m USING resent r WHERE m.conv_a = r.conv_a AND m.conv_b = r.conv_b AND m.seq = r.seq;
CREATE UNIQUE INDEX messages_dedup ON messages (conv_a, conv_b, sender, client_msg_id);
";

const PARTITIONS: u64 = tim_shards::PARTITIONS as u64;

/// How long each step of a store call may take.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    /// Connecting: TCP, startup and authentication.
    connect: Duration,
    /// Waiting for a free connection of the pool.
    acquire: Duration,
    /// One statement.
    statement: Duration,
}

/// One partition range: its server and a bounded pool of connections to it.
struct Range {
    url: String,
    config: tokio_postgres::Config,
    /// Connections not in use; never locked across an `.await`.
    idle: std::sync::Mutex<Vec<Pooled>>,
    /// Connections for everything but the send path (`connections_per_partition`).
    slots: Semaphore,
    /// Connections for the send path: commits and conversation loads
    /// (`send_connections_per_partition`).
    send_slots: Semaphore,
    timeouts: Timeouts,
    /// A call to this range timed out and none has succeeded since. Calls then take a free
    /// connection or fail at once, instead of queueing behind the stuck ones: a range that
    /// stops answering holds at most its pool's worth of callers.
    stalled: AtomicBool,
}

/// A pooled connection and the statements prepared on it.
struct Pooled {
    client: Client,
    /// The message insert, prepared once per connection: parsing it for every batch cost the
    /// server about as much as running it.
    insert: std::sync::OnceLock<Statement>,
}

/// A connection checked out of a range's pool. It goes back to the pool on drop only if its last
/// statement ended normally (answered, or refused by the server); a connection whose statement
/// timed out, broke, or was abandoned midway (its caller gave up) is dropped and closed.
struct Conn<'a> {
    range: &'a Range,
    client: Option<Pooled>,
    reusable: AtomicBool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Conn<'_> {
    fn client(&self) -> &Client {
        &self.client.as_ref().expect("present until dropped").client
    }

    /// The message insert prepared on this connection.
    async fn insert_statement(&self) -> Result<Statement, StoreError> {
        let pooled = self.client.as_ref().expect("present until dropped");
        if let Some(st) = pooled.insert.get() {
            return Ok(st.clone());
        }
        let sql = insert_messages_sql(false);
        let st = self.timed(pooled.client.prepare_typed(&sql, &INSERT_MESSAGES_TYPES)).await?;
        Ok(pooled.insert.get_or_init(|| st).clone())
    }

    /// Run one statement of this connection within the statement timeout.
    async fn timed<T>(
        &self,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        self.reusable.store(false, Ordering::Relaxed);
        let limit = self.range.timeouts.statement;
        match tokio::time::timeout(limit, statement).await {
            Ok(Ok(v)) => {
                self.reusable.store(true, Ordering::Relaxed);
                self.range.stalled.store(false, Ordering::Relaxed);
                Ok(v)
            }
            Err(_) => {
                self.range.stalled.store(true, Ordering::Relaxed);
                Err(StoreError::Unavailable(format!(
                    "postgres {}: statement timed out after {} ms",
                    redact(&self.range.url),
                    limit.as_millis()
                )))
            }
            Ok(Err(e)) => {
                // The server answered (e.g. a constraint, or its own statement_timeout): the
                // connection is sound. Anything else (I/O, protocol) leaves it suspect.
                if e.as_db_error().is_some() {
                    self.reusable.store(true, Ordering::Relaxed);
                }
                Err(pg_err(e))
            }
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if self.reusable.load(Ordering::Relaxed) && !c.client.is_closed() {
                self.range.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
            }
        }
    }
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // tokio-postgres says only "db error" for an error the server reported: its message too.
    match e.as_db_error() {
        Some(d) => StoreError::Unavailable(format!("{e}: {} ({})", d.message(), d.code().code())),
        None => StoreError::Unavailable(e.to_string()),
    }
}

impl Range {
    /// A connection of the pool for anything but the send path.
    async fn conn(&self) -> Result<Conn<'_>, StoreError> {
        self.conn_from(&self.slots).await
    }

    /// A connection of the pool for the send path (commits, conversation loads): they have
    /// connections of their own, so bulk reads (a burst of logins' catch-ups) never hold up a
    /// send.
    async fn send_conn(&self) -> Result<Conn<'_>, StoreError> {
        self.conn_from(&self.send_slots).await
    }

    /// A connection of the pool: an idle one, else a new one. Waits at most `acquire` for a
    /// free slot of `slots` (not at all while the range is stalled) and `connect` to connect.
    async fn conn_from<'a>(&'a self, slots: &'a Semaphore) -> Result<Conn<'a>, StoreError> {
        let unavailable =
            |what: &str| StoreError::Unavailable(format!("postgres {}: {what}", redact(&self.url)));
        let permit = if self.stalled.load(Ordering::Relaxed) {
            slots.try_acquire().map_err(|_| unavailable("not answering, every connection busy"))?
        } else {
            match tokio::time::timeout(self.timeouts.acquire, slots.acquire()).await {
                Ok(p) => p.map_err(|_| unavailable("pool closed"))?,
                Err(_) => {
                    self.stalled.store(true, Ordering::Relaxed);
                    return Err(unavailable(&format!(
                        "no free connection within {} ms",
                        self.timeouts.acquire.as_millis()
                    )));
                }
            }
        };
        let pooled = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match idle.pop() {
                    Some(c) if c.client.is_closed() => continue,
                    other => break other,
                }
            }
        };
        let client = match pooled {
            Some(c) => c,
            None => {
                // tokio-postgres's own connect_timeout covers only the TCP connect; a server that
                // accepts but does not answer (stopped, overloaded) would hang the startup.
                let (client, connection) =
                    match tokio::time::timeout(self.timeouts.connect, self.config.connect(NoTls)).await {
                        Ok(r) => r.map_err(pg_err)?,
                        Err(_) => {
                            self.stalled.store(true, Ordering::Relaxed);
                            return Err(unavailable(&format!(
                                "connecting timed out after {} ms",
                                self.timeouts.connect.as_millis()
                            )));
                        }
                    };
                let url = self.url.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        log::warn!("postgres {}: connection ended: {e}", redact(&url));
                    }
                });
                Pooled { client, insert: std::sync::OnceLock::new() }
            }
        };
        Ok(Conn { range: self, client: Some(client), reusable: AtomicBool::new(false), _permit: permit })
    }
}

/// A URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            let user = cred.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

pub struct PostgresStore {
    rt: tokio::runtime::Runtime,
    ranges: Vec<Arc<Range>>,
    /// Slot → index into `ranges`.
    owner: Vec<u16>,
}

fn i(v: u64) -> i64 {
    v as i64
}
fn u(v: i64) -> u64 {
    v as u64
}

impl PostgresStore {
    /// Advance the positions of `table` (`cursors` or `reads`: same columns) on the ranges of
    /// their conversations, in conversations that have a stored message.
    fn save_positions(&self, table: &'static str, cursors: &[Cursor]) -> Result<(), StoreError> {
        let mut by_range: Vec<Vec<&Cursor>> = vec![Vec::new(); self.ranges.len()];
        for c in cursors {
            let slot = tim_shards::partition_of(crate::placement::conv_hash(c.conv));
            by_range[self.owner[slot as usize] as usize].push(c);
        }
        for (index, group) in by_range.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let range = self.ranges[index].clone();
            let col = |f: fn(&Cursor) -> u64| group.iter().map(|c| i(f(c))).collect::<Vec<i64>>();
            let (users, devices, a, b, seqs) =
                (col(|c| c.user), col(|c| c.device), col(|c| c.conv.0), col(|c| c.conv.1), col(|c| c.seq));
            self.block_on(async move {
                let conn = range.conn().await?;
                let sql = format!(
                    "INSERT INTO {table} (user_id, device, conv_a, conv_b, seq)
                     SELECT k.* FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
                         AS k (user_id, device, conv_a, conv_b, seq)
                     WHERE EXISTS (SELECT 1 FROM messages m WHERE m.conv_a = k.conv_a AND m.conv_b = k.conv_b)
                     ON CONFLICT (user_id, device, conv_a, conv_b)
                     DO UPDATE SET seq = GREATEST({table}.seq, excluded.seq)"
                );
                conn.timed(conn.client().execute(&sql, &[&users, &devices, &a, &b, &seqs])).await?;
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn open(cfg: &PostgresConfig) -> anyhow::Result<PostgresStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .thread_name("store-pg")
            .enable_all()
            .build()?;
        let timeouts = Timeouts {
            connect: Duration::from_millis(cfg.connect_timeout_ms),
            acquire: Duration::from_millis(cfg.acquire_timeout_ms),
            statement: Duration::from_millis(cfg.statement_timeout_ms),
        };
        let mut ranges: Vec<Arc<Range>> = Vec::new();
        let mut owner = vec![u16::MAX; PARTITIONS as usize];
        for p in &cfg.partitions {
            let (a, b) = p.range()?;
            let mut config: tokio_postgres::Config =
                p.url.parse().map_err(|e| anyhow::anyhow!("store.postgres url {}: {e}", redact(&p.url)))?;
            config.connect_timeout(Duration::from_millis(cfg.connect_timeout_ms));
            // The server enforces the statement timeout too, so that a statement tim gave up on
            // does not run on; it is set at connection startup (no extra round trip).
            let options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
            config.options(format!("{options}-c statement_timeout={}", cfg.statement_timeout_ms));
            let index = ranges.len() as u16;
            ranges.push(Arc::new(Range {
                url: p.url.clone(),
                config,
                idle: std::sync::Mutex::new(Vec::new()),
                slots: Semaphore::new(cfg.connections_per_partition),
                send_slots: Semaphore::new(cfg.send_connections_per_partition),
                timeouts,
                stalled: AtomicBool::new(false),
            }));
            for slot in a..=b {
                owner[slot as usize] = index;
            }
        }
        anyhow::ensure!(owner.iter().all(|&o| o != u16::MAX), "store.postgres ranges must cover 0-4095");
        let store = PostgresStore { rt, ranges, owner };
        // Some ten statements, each under the server's statement_timeout; bounded here as well.
        let migrate_limit = timeouts.acquire + timeouts.connect + 10 * timeouts.statement;
        for r in &store.ranges {
            store
                .rt
                .block_on(async {
                    tokio::time::timeout(migrate_limit, migrate(r))
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Unavailable("migration timed out".into())))
                })
                .map_err(|e| anyhow::anyhow!("postgres {}: {e}", redact(&r.url)))?;
        }
        Ok(store)
    }

    fn range_of_slot(&self, slot: u64) -> &Arc<Range> {
        &self.ranges[self.owner[(slot % PARTITIONS) as usize] as usize]
    }

    fn conv_range(&self, conv: ConvKey) -> &Arc<Range> {
        self.range_of_slot(tim_shards::partition_of(crate::placement::conv_hash(conv)) as u64)
    }

    /// The partition of an account, from its name key (its id then carries it in its low 12 bits).
    pub fn name_slot(name: &NameKey) -> u64 {
        u64::from(u32::from_le_bytes([name[0], name[1], name[2], name[3]])) % PARTITIONS
    }

    fn block_on<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.rt.block_on(f)
    }

    /// Ask every range at once (for what is spread over all of them, such as a user's
    /// memberships), each within the statement timeout, connecting included; one answer per
    /// range, in range order, or the first failure.
    fn on_every_range<T, F, Fut>(&self, ask: F) -> Result<Vec<T>, StoreError>
    where
        F: Fn(Arc<Range>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let deadline = self.ranges.first().map_or(Duration::ZERO, |r| r.timeouts.statement);
        let tasks: Vec<_> = self
            .ranges
            .iter()
            .map(|range| {
                let (work, range) = (ask(range.clone()), range.clone());
                self.rt.spawn(async move {
                    tokio::time::timeout(deadline, work).await.unwrap_or_else(|_| {
                        range.stalled.store(true, Ordering::Relaxed);
                        Err(StoreError::Unavailable(format!(
                            "postgres {}: no answer within {} ms",
                            redact(&range.url),
                            deadline.as_millis()
                        )))
                    })
                })
            })
            .collect();
        self.rt.block_on(async move {
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(t.await.map_err(|e| StoreError::Unavailable(format!("postgres: {e}")))??);
            }
            Ok(out)
        })
    }
}

/// Version 3: `user_convs`, each user's conversations on this range, written with their
/// messages. A login's catch-up starts from it: per conversation, the messages past the device's
/// cursor, read by primary key. Before, catch-up read every message of the user within the
/// window and dropped those the device had already acknowledged, so its cost grew with the
/// user's traffic rather than with what was unread (a restart with 200 busy users then kept both
/// PostgreSQL servers busy for seconds, and every send waited behind that).
const SCHEMA_V3: &str = "
CREATE TABLE user_convs (
    user_id int8 NOT NULL,
    conv_a  int8 NOT NULL,
    conv_b  int8 NOT NULL,
    PRIMARY KEY (user_id, conv_a, conv_b)
);
INSERT INTO user_convs (user_id, conv_a, conv_b)
    SELECT DISTINCT v.u, c.conv_a, c.conv_b
    FROM (SELECT DISTINCT conv_a, conv_b FROM messages) c
    CROSS JOIN LATERAL (VALUES (c.conv_a), (c.conv_b)) AS v (u);
";

/// Version 4: groups. A group lives on the range of its conversation (0, group id): its row,
/// members, block list, join requests and messages (which are not listed in `user_convs`: its
/// readers are its members). A member's row stays when it leaves, with `until_seq` set: catch-up
/// still gives it the messages up to its leave, and `member_span` answers from it; a rejoin sets
/// `from_seq` anew and clears `until_seq`. A user's memberships are spread over every range, as
/// its conversations are.
const SCHEMA_V4: &str = "
CREATE TABLE groups (
    id                 int8 PRIMARY KEY,
    name               text NOT NULL,
    topic              text NOT NULL,
    avatar_url         text NOT NULL,
    extra              bytea NOT NULL,
    join_policy        int2 NOT NULL,
    invite_policy      int2 NOT NULL,
    founder            int8 NOT NULL,
    muted_all_until_ms int8 NOT NULL,
    dissolved          bool NOT NULL,
    created_ms         int8 NOT NULL
);
CREATE TABLE group_members (
    group_id       int8 NOT NULL,
    user_id        int8 NOT NULL,
    role           int2 NOT NULL,
    muted_until_ms int8 NOT NULL,
    from_seq       int8 NOT NULL,
    until_seq      int8,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_by_user ON group_members (user_id, group_id);
CREATE TABLE group_blocks (
    group_id int8 NOT NULL,
    user_id  int8 NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE TABLE group_requests (
    group_id int8 NOT NULL,
    user_id  int8 NOT NULL,
    note     text NOT NULL,
    ts_ms    int8 NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
";

/// Version 5: bans (`banned_until_ms`: 0 none, else banned until then).
const SCHEMA_V5: &str = "
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS banned_until_ms int8 NOT NULL DEFAULT 0;
";

/// Version 6: user profiles (postcard blobs), on the range of the user's account.
const SCHEMA_V6: &str = "
CREATE TABLE IF NOT EXISTS profiles (
    user_id    int8 PRIMARY KEY,
    updated_ms int8 NOT NULL,
    data       bytea NOT NULL
);
";

/// Version 7: read positions (read receipts), on the range of their conversation.
const SCHEMA_V7: &str = "
CREATE TABLE IF NOT EXISTS reads (
    user_id int8 NOT NULL,
    device  int8 NOT NULL,
    conv_a  int8 NOT NULL,
    conv_b  int8 NOT NULL,
    seq     int8 NOT NULL,
    PRIMARY KEY (conv_a, conv_b, user_id, device)
);
";

/// Version 8: when a burn-after-read message burns (see [`super::burn_at_ms`]; 0: never, below
/// 0: claimed by a sweep at minus that time).
const SCHEMA_V8: &str = "
ALTER TABLE messages ADD COLUMN IF NOT EXISTS burn_at_ms int8 NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS messages_burn ON messages (burn_at_ms) WHERE burn_at_ms <> 0;
CREATE INDEX IF NOT EXISTS messages_burn_conv ON messages (conv_a, conv_b, seq) WHERE burn_at_ms > 0;
";

/// Version 9: the roster, one row per user and other user it has a relation with (see
/// [`crate::roster::Side`]), both rows of a pair on the range of the pair's conversation.
const SCHEMA_V9: &str = "
CREATE TABLE IF NOT EXISTS roster (
    user_id  int8 NOT NULL,
    other    int8 NOT NULL,
    state    int2 NOT NULL,
    blocks   bool NOT NULL,
    note     text NOT NULL,
    since_ms int8 NOT NULL,
    PRIMARY KEY (user_id, other)
);
";

/// Version 10: presence watches on the roster ([`crate::roster::watch`] bits, and since when).
const SCHEMA_V10: &str = "
ALTER TABLE roster ADD COLUMN IF NOT EXISTS watch int2 NOT NULL DEFAULT 0;
ALTER TABLE roster ADD COLUMN IF NOT EXISTS watch_since_ms int8 NOT NULL DEFAULT 0;
";

async fn migrate(r: &Range) -> Result<(), StoreError> {
    let mut conn = r.conn().await?;
    let client = &mut conn.client.as_mut().expect("present").client;
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7100);
         CREATE TABLE IF NOT EXISTS tim_schema (version int4 NOT NULL);",
    )
    .await
    .map_err(pg_err)?;
    let version: Option<i32> = tx
        .query_opt("SELECT max(version) FROM tim_schema", &[])
        .await
        .map_err(pg_err)?
        .and_then(|r| r.get(0));
    let version = version.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError::Unavailable(format!(
            "schema version {version} is newer than this build's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        tx.batch_execute(SCHEMA_V1).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (1)", &[]).await.map_err(pg_err)?;
    }
    if version < 2 {
        tx.batch_execute(SCHEMA_V2_FLOORS).await.map_err(pg_err)?;
        // None: no index; Some(false): a concurrent build that failed left it invalid.
        let valid: Option<bool> = tx
            .query_opt(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('messages_dedup')",
                &[],
            )
            .await
            .map_err(pg_err)?
            .map(|r| r.get(0));
        if valid != Some(true) {
            if valid == Some(false) {
                tx.batch_execute("DROP INDEX messages_dedup").await.map_err(pg_err)?;
            }
            let before: i64 =
                tx.query_one("SELECT count(*) FROM messages", &[]).await.map_err(pg_err)?.get(0);
            tx.batch_execute(SCHEMA_V2_DEDUP).await.map_err(pg_err)?;
            let after: i64 = tx.query_one("SELECT count(*) FROM messages", &[]).await.map_err(pg_err)?.get(0);
            if before > after {
                log::warn!(
                    "postgres {}: schema 2 removed {} resent copies of stored messages (kept the lowest seq of each)",
                    redact(&r.url),
                    before - after
                );
            }
        }
        tx.execute("INSERT INTO tim_schema (version) VALUES (2)", &[]).await.map_err(pg_err)?;
    }
    if version < 3 {
        tx.batch_execute(SCHEMA_V3).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (3)", &[]).await.map_err(pg_err)?;
    }
    if version < 4 {
        tx.batch_execute(SCHEMA_V4).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (4)", &[]).await.map_err(pg_err)?;
    }
    if version < 5 {
        tx.batch_execute(SCHEMA_V5).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (5)", &[]).await.map_err(pg_err)?;
    }
    if version < 6 {
        tx.batch_execute(SCHEMA_V6).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (6)", &[]).await.map_err(pg_err)?;
    }
    if version < 7 {
        tx.batch_execute(SCHEMA_V7).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (7)", &[]).await.map_err(pg_err)?;
    }
    if version < 8 {
        tx.batch_execute(SCHEMA_V8).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (8)", &[]).await.map_err(pg_err)?;
    }
    if version < 9 {
        tx.batch_execute(SCHEMA_V9).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (9)", &[]).await.map_err(pg_err)?;
    }
    if version < 10 {
        tx.batch_execute(SCHEMA_V10).await.map_err(pg_err)?;
        tx.execute("INSERT INTO tim_schema (version) VALUES (10)", &[]).await.map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)?;
    conn.reusable.store(true, Ordering::Relaxed);
    Ok(())
}

/// The accounts among `ids` that exist on `range`.
async fn existing_accounts(range: &Range, ids: &[i64]) -> Result<HashSet<UserId>, StoreError> {
    let conn = range.send_conn().await?;
    let rows = conn.timed(conn.client().query("SELECT id FROM accounts WHERE id = ANY($1)", &[&ids])).await?;
    Ok(rows.iter().map(|r| u(r.get(0))).collect())
}

/// [`Store::load_conv`] for every (conv_a, conv_b, since_ms, recent_max) of `keys`, all
/// conversations of `range`, in two statements.
async fn load_batch(range: &Range, keys: &[(i64, i64, i64, i64)]) -> Result<Vec<ConvLoad>, StoreError> {
    let col = |f: fn(&(i64, i64, i64, i64)) -> i64| keys.iter().map(f).collect::<Vec<i64>>();
    let (a, b, since, max) = (col(|k| k.0), col(|k| k.1), col(|k| k.2), col(|k| k.3));
    let conn = range.send_conn().await?;
    let c = conn.client();
    let mut out = vec![ConvLoad::default(); keys.len()];
    // A seq removed by the schema 2 migration stays used (`seq_floors`). GREATEST skips NULLs.
    let last = conn
        .timed(c.query(
            "SELECT k.ord, GREATEST(
                 (SELECT max(seq) FROM messages m WHERE m.conv_a = k.a AND m.conv_b = k.b),
                 (SELECT max(seq) FROM seq_floors f WHERE f.conv_a = k.a AND f.conv_b = k.b))
             FROM UNNEST($1::int8[], $2::int8[]) WITH ORDINALITY AS k (a, b, ord)",
            &[&a, &b],
        ))
        .await?;
    for row in &last {
        let at = row.get::<_, i64>(0) as usize - 1;
        out[at].last_seq = row.get::<_, Option<i64>>(1).map_or(0, u);
    }
    let recent = conn
        .timed(c.query(
            "SELECT k.ord, r.sender, r.client_msg_id, r.msg_id, r.seq, r.ts_ms
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[]) WITH ORDINALITY
                 AS k (a, b, since, lim, ord)
             CROSS JOIN LATERAL (
                 SELECT sender, client_msg_id, msg_id, seq, ts_ms FROM messages m
                 WHERE m.conv_a = k.a AND m.conv_b = k.b AND m.ts_ms >= k.since
                 ORDER BY m.seq DESC LIMIT k.lim) r
             ORDER BY k.ord, r.seq DESC",
            &[&a, &b, &since, &max],
        ))
        .await?;
    for row in &recent {
        let at = row.get::<_, i64>(0) as usize - 1;
        out[at].recent.push(RecentSend {
            sender: u(row.get(1)),
            client_msg_id: u(row.get(2)),
            msg_id: u(row.get(3)),
            seq: u(row.get(4)),
            ts_ms: u(row.get(5)),
        });
    }
    // The 1:1 pairs' roster flags (a group's key (0, id) has no roster rows).
    let sides = conn
        .timed(c.query(
            "SELECT k.ord, r.user_id = k.a, r.state, r.blocks
             FROM UNNEST($1::int8[], $2::int8[]) WITH ORDINALITY AS k (a, b, ord)
             JOIN roster r ON (r.user_id = k.a AND r.other = k.b) OR (r.user_id = k.b AND r.other = k.a)",
            &[&a, &b],
        ))
        .await?;
    for row in &sides {
        let at = row.get::<_, i64>(0) as usize - 1;
        let (low, state, blocks): (bool, i16, bool) = (row.get(1), row.get(2), row.get(3));
        let s = crate::roster::Side { state: state as u8, blocks, ..Default::default() };
        let flags = if low {
            crate::roster::pair_flags(&s, &Default::default())
        } else {
            crate::roster::pair_flags(&Default::default(), &s) & !crate::roster::pair::FRIENDS
        };
        out[at].pair |= flags;
    }
    Ok(out)
}

/// A batch of messages as one statement (one array per column), which also records each
/// sender's and recipient's conversation in `user_convs` (for catch-up), in the same
/// transaction; not a group's conversation (0, group id), whose readers are its members.
/// Answers the number of messages inserted.
pub const INSERT_MESSAGES: &str = "WITH m AS (
         INSERT INTO messages (conv_a, conv_b, seq, msg_id, ts_ms, sender, sender_device, client_msg_id, payload,
                               burn_at_ms)
         SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                              $7::int8[], $8::int8[], $9::bytea[], $10::int8[])
         ON_CONFLICT
         RETURNING conv_a, conv_b),
     uc AS (
         INSERT INTO user_convs (user_id, conv_a, conv_b)
         SELECT DISTINCT v.u, c.conv_a, c.conv_b
         FROM (SELECT DISTINCT conv_a, conv_b FROM m WHERE conv_a <> 0) c
         CROSS JOIN LATERAL (VALUES (c.conv_a), (c.conv_b)) AS v (u)
         ON CONFLICT DO NOTHING)
     SELECT count(*) FROM m";

/// [`INSERT_MESSAGES`] as run: `on_conflict` skips the messages whose dedup key is stored.
pub fn insert_messages_sql(on_conflict: bool) -> String {
    let clause =
        if on_conflict { "ON CONFLICT (conv_a, conv_b, sender, client_msg_id) DO NOTHING" } else { "" };
    INSERT_MESSAGES.replace("ON_CONFLICT", clause)
}

/// The parameter types of [`INSERT_MESSAGES`].
pub const INSERT_MESSAGES_TYPES: [Type; 10] = [
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
];

async fn insert_batch(range: &Range, batch: &[StoredMessage]) -> Result<super::Duplicates, StoreError> {
    let conn = range.send_conn().await?;
    let insert = conn.insert_statement().await?;
    let stored = if batch.iter().any(|m| m.group.is_some() || m.edit.is_some()) {
        conn.timed(insert_with_groups(conn.client(), &insert, batch)).await?
    } else {
        conn.timed(insert_messages(conn.client(), Some(&insert), batch)).await?
    };
    stored.map_err(|e| StoreError::Unavailable(format!("postgres {}: {e}", redact(&range.url))))
}

/// [`insert_messages`] for a batch holding group notices or recalls, in one transaction with the
/// notices' changes and the recalls' edits (those of messages that were stored: a duplicate's
/// were made with its original). A recall whose edit is refused is deleted again.
/// On any failure the transaction is rolled back, so the connection is clean when it goes back
/// to the pool (if the rollback itself fails, its error is answered: the connection is
/// dropped unless the server answered it).
async fn insert_with_groups(
    client: &Client,
    insert: &Statement,
    batch: &[StoredMessage],
) -> Result<Result<Duplicates, String>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let stored = async {
        // A plain insert that trips the dedup index aborts the transaction: it starts anew.
        let dups = match insert_messages_in(client, Some(insert), batch, Some("ROLLBACK; BEGIN")).await? {
            Ok(dups) => dups,
            Err(e) => return Ok(Err(e)),
        };
        let mut dups = dups;
        let skip: HashSet<usize> = dups.iter().map(|(index, _)| *index).collect();
        for (index, m) in batch.iter().enumerate() {
            if skip.contains(&index) {
                continue;
            }
            if let Some(change) = m.group.as_deref() {
                apply_group(client, change, m.seq).await?;
            }
            if let Some(edit) = &m.edit {
                if let Err(code) = apply_edit(client, m.conv, edit).await? {
                    client
                        .query_typed(
                            "DELETE FROM messages WHERE conv_a = $1 AND conv_b = $2 AND seq = $3",
                            &[
                                (&i(m.conv.0), Type::INT8),
                                (&i(m.conv.1), Type::INT8),
                                (&i(m.seq), Type::INT8),
                            ],
                        )
                        .await?;
                    dups.push((index, Unstored::Refused(code)));
                }
            }
        }
        client.batch_execute("COMMIT").await?;
        Ok(Ok(dups))
    }
    .await;
    if !matches!(stored, Ok(Ok(_))) {
        client.batch_execute("ROLLBACK").await?;
    }
    stored
}

/// A pair's roster flags ([`crate::roster::pair_flags`]).
async fn pair_of(c: &Client, conv: ConvKey) -> Result<u8, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT user_id, state, blocks FROM roster
             WHERE (user_id = $1 AND other = $2) OR (user_id = $2 AND other = $1)",
            &[&i(conv.0), &i(conv.1)],
        )
        .await?;
    let (mut low, mut high) = (crate::roster::Side::default(), crate::roster::Side::default());
    for r in &rows {
        let s = if u(r.get(0)) == conv.0 { &mut low } else { &mut high };
        s.state = r.get::<_, i16>(1) as u8;
        s.blocks = r.get(2);
    }
    Ok(crate::roster::pair_flags(&low, &high))
}

/// A roster action in one transaction on the pair's range: both rows read (locked), changed by
/// [`crate::roster::apply`], written back (an empty side's row deleted). The caller rolls back
/// what did not commit.
#[allow(clippy::too_many_arguments)]
async fn roster_tx(
    c: &Client,
    user: UserId,
    other: UserId,
    action: u8,
    note: &str,
    now_ms: u64,
    count: usize,
    max: usize,
) -> Result<Result<crate::roster::Outcome, ErrorCode>, tokio_postgres::Error> {
    c.batch_execute("BEGIN").await?;
    let rows = c
        .query(
            "SELECT user_id, state, blocks, note, since_ms, watch, watch_since_ms FROM roster
             WHERE (user_id = $1 AND other = $2) OR (user_id = $2 AND other = $1) FOR UPDATE",
            &[&i(user), &i(other)],
        )
        .await?;
    let (mut me, mut them) = (crate::roster::Side::default(), crate::roster::Side::default());
    for r in &rows {
        let s = if u(r.get(0)) == user { &mut me } else { &mut them };
        *s = crate::roster::Side {
            state: r.get::<_, i16>(1) as u8,
            blocks: r.get(2),
            note: r.get(3),
            since_ms: u(r.get(4)),
            watch: r.get::<_, i16>(5) as u8,
            watch_since_ms: u(r.get(6)),
        };
    }
    let out = match crate::roster::apply(&me, &them, action, note, now_ms, count, max) {
        Ok(out) => out,
        Err(code) => return Ok(Err(code)),
    };
    for (a, b, s) in [(user, other, &out.me), (other, user, &out.them)] {
        if s.is_empty() {
            c.execute("DELETE FROM roster WHERE user_id = $1 AND other = $2", &[&i(a), &i(b)]).await?;
        } else {
            c.execute(
                "INSERT INTO roster (user_id, other, state, blocks, note, since_ms, watch, watch_since_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (user_id, other) DO UPDATE SET state = excluded.state, blocks = excluded.blocks,
                     note = excluded.note, since_ms = excluded.since_ms, watch = excluded.watch,
                     watch_since_ms = excluded.watch_since_ms",
                &[
                    &i(a),
                    &i(b),
                    &(s.state as i16),
                    &s.blocks,
                    &s.note,
                    &i(s.since_ms),
                    &(s.watch as i16),
                    &i(s.watch_since_ms),
                ],
            )
            .await?;
        }
    }
    c.batch_execute("COMMIT").await?;
    Ok(Ok(out))
}

/// Make `edit` to its message of `conv` in the transaction (the row locked, checked, rewritten);
/// the inner `Err` says why it is refused.
async fn apply_edit(
    client: &Client,
    conv: ConvKey,
    edit: &super::Edit,
) -> Result<Result<(), ErrorCode>, tokio_postgres::Error> {
    let (a, b) = (i(conv.0), i(conv.1));
    let mut refused = ErrorCode::NotRecallable;
    let mut changed = 0;
    for &seq in edit.seqs() {
        let seq = i(seq);
        let key = [
            (&a as &(dyn tokio_postgres::types::ToSql + Sync), Type::INT8),
            (&b, Type::INT8),
            (&seq, Type::INT8),
        ];
        let row = client
            .query_typed(
                "SELECT payload FROM messages WHERE conv_a = $1 AND conv_b = $2 AND seq = $3 FOR UPDATE",
                &key,
            )
            .await?;
        let Some(row) = row.first() else { continue };
        let payload: &[u8] = row.get(0);
        match edit.apply(payload) {
            Ok(tombstone) => {
                client
                    .query_typed(
                        "UPDATE messages SET payload = $4, burn_at_ms = 0 WHERE conv_a = $1 AND conv_b = $2 AND seq = $3",
                        &[key[0].clone(), key[1].clone(), key[2].clone(), (&tombstone, Type::BYTEA)],
                    )
                    .await?;
                changed += 1;
            }
            Err(code) => refused = code,
        }
    }
    Ok(if changed == 0 { Err(refused) } else { Ok(()) })
}

/// Apply a group notice's changes (see [`GroupWrite`]) in the notice's transaction, in order;
/// `seq` is the notice's. One round trip each (typed parameters: no separate prepare).
async fn apply_group(client: &Client, change: &GroupChange, seq: u64) -> Result<(), tokio_postgres::Error> {
    let (g, seq) = (i(change.group), i(seq));
    let int8 = || Type::INT8;
    for w in &change.writes {
        match w {
            GroupWrite::Group(row) => {
                let p = &row.profile;
                let (join, invite) = (i16::from(p.join_policy), i16::from(p.invite_policy));
                let (founder, muted, created) =
                    (i(row.founder), i(row.muted_all_until_ms), i(row.created_ms));
                client
                    .query_typed(
                        "INSERT INTO groups (id, name, topic, avatar_url, extra, join_policy, invite_policy,
                                             founder, muted_all_until_ms, dissolved, created_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                         ON CONFLICT (id) DO UPDATE SET
                             name = excluded.name, topic = excluded.topic, avatar_url = excluded.avatar_url,
                             extra = excluded.extra, join_policy = excluded.join_policy,
                             invite_policy = excluded.invite_policy, founder = excluded.founder,
                             muted_all_until_ms = excluded.muted_all_until_ms,
                             dissolved = excluded.dissolved, created_ms = excluded.created_ms",
                        &[
                            (&g, int8()),
                            (&p.name, Type::TEXT),
                            (&p.topic, Type::TEXT),
                            (&p.avatar_url, Type::TEXT),
                            (&p.extra, Type::BYTEA),
                            (&join, Type::INT2),
                            (&invite, Type::INT2),
                            (&founder, int8()),
                            (&muted, int8()),
                            (&row.dissolved, Type::BOOL),
                            (&created, int8()),
                        ],
                    )
                    .await?;
            }
            GroupWrite::Join { user, role } => {
                client
                    .query_typed(
                        "WITH settled AS (DELETE FROM group_requests WHERE group_id = $1 AND user_id = $2)
                         INSERT INTO group_members (group_id, user_id, role, muted_until_ms, from_seq, until_seq)
                         VALUES ($1, $2, $3, 0, $4, NULL)
                         ON CONFLICT (group_id, user_id) DO UPDATE SET
                             role = excluded.role, muted_until_ms = 0, from_seq = excluded.from_seq,
                             until_seq = NULL",
                        &[(&g, int8()), (&i(*user), int8()), (&i16::from(*role), Type::INT2), (&seq, int8())],
                    )
                    .await?;
            }
            GroupWrite::Member { user, role, muted_until_ms } => {
                client
                    .query_typed(
                        "UPDATE group_members SET role = $3, muted_until_ms = $4
                         WHERE group_id = $1 AND user_id = $2 AND until_seq IS NULL",
                        &[
                            (&g, int8()),
                            (&i(*user), int8()),
                            (&i16::from(*role), Type::INT2),
                            (&i(*muted_until_ms), int8()),
                        ],
                    )
                    .await?;
            }
            GroupWrite::Leave { user } => {
                client
                    .query_typed(
                        "UPDATE group_members SET until_seq = $3
                         WHERE group_id = $1 AND user_id = $2 AND until_seq IS NULL",
                        &[(&g, int8()), (&i(*user), int8()), (&seq, int8())],
                    )
                    .await?;
            }
            GroupWrite::LeaveAll => {
                client
                    .query_typed(
                        "UPDATE group_members SET until_seq = $2 WHERE group_id = $1 AND until_seq IS NULL",
                        &[(&g, int8()), (&seq, int8())],
                    )
                    .await?;
            }
            GroupWrite::Block { user } => {
                client
                    .query_typed(
                        "INSERT INTO group_blocks (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[(&g, int8()), (&i(*user), int8())],
                    )
                    .await?;
            }
            GroupWrite::Unblock { user } => {
                client
                    .query_typed(
                        "DELETE FROM group_blocks WHERE group_id = $1 AND user_id = $2",
                        &[(&g, int8()), (&i(*user), int8())],
                    )
                    .await?;
            }
            GroupWrite::Unrequest { user } => {
                client
                    .query_typed(
                        "DELETE FROM group_requests WHERE group_id = $1 AND user_id = $2",
                        &[(&g, int8()), (&i(*user), int8())],
                    )
                    .await?;
            }
        }
    }
    Ok(())
}

/// Insert every message of `batch` whose (conversation, sender, client message id) is not stored
/// yet, and answer the others with their stored originals (see [`Duplicates`]); a conflict on the
/// primary key (conversation, seq) fails the whole batch.
///
/// One statement (one round trip, one implicit transaction) in the common case: a plain
/// `INSERT … SELECT FROM UNNEST(…)`. If that trips the dedup index, the batch goes again as
/// `… ON CONFLICT (dedup key) DO NOTHING`, whose row count says how many it inserted. When that
/// is fewer than the batch (only resends after an ambiguous commit, and duplicates within the
/// batch), a second statement reads the stored row of every key of the batch: a later snapshot,
/// which also sees rows the insert itself wrote and an original committed by another transaction
/// while the insert waited on it. Answering the originals from the insert's own statement was
/// measured 2-3 times slower on every batch (docs/ARCHITECTURE.md, Storage). The inner `Err` is a
/// batch the store could not account for.
///
/// Public for the placement benchmark, which runs it on a shard-local connection.
pub async fn insert_messages(
    client: &Client,
    prepared: Option<&Statement>,
    batch: &[StoredMessage],
) -> Result<Result<Duplicates, String>, tokio_postgres::Error> {
    insert_messages_in(client, prepared, batch, None).await
}

/// [`insert_messages`], run within a transaction when `restart` is given: the SQL that starts it
/// anew after the plain insert tripped the dedup index (which aborted it).
async fn insert_messages_in(
    client: &Client,
    prepared: Option<&Statement>,
    batch: &[StoredMessage],
    restart: Option<&str>,
) -> Result<Result<Duplicates, String>, tokio_postgres::Error> {
    let col = |f: fn(&StoredMessage) -> u64| batch.iter().map(|m| i(f(m))).collect::<Vec<i64>>();
    let (a, b, seq, msg_id, ts) =
        (col(|m| m.conv.0), col(|m| m.conv.1), col(|m| m.seq), col(|m| m.msg_id), col(|m| m.ts_ms));
    let (sender, device, cmid) = (col(|m| m.sender), col(|m| m.sender_device), col(|m| m.client_msg_id));
    let payload: Vec<&[u8]> = batch.iter().map(|m| &m.payload[..]).collect();
    let burn: Vec<i64> = batch.iter().map(|m| i(super::burn_at_ms(&m.payload, m.ts_ms))).collect();
    let arr = Type::INT8_ARRAY;
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 10] = [
        (&a, arr.clone()),
        (&b, arr.clone()),
        (&seq, arr.clone()),
        (&msg_id, arr.clone()),
        (&ts, arr.clone()),
        (&sender, arr.clone()),
        (&device, arr.clone()),
        (&cmid, arr),
        (&payload, Type::BYTEA_ARRAY),
        (&burn, Type::INT8_ARRAY),
    ];
    // Almost every batch holds no duplicate: a plain insert (which the dedup index still guards)
    // costs less than ON CONFLICT's speculative insertion, measured about half at 1024 rows.
    // Only a batch that trips the dedup index goes again with ON CONFLICT.
    let plain = match prepared {
        Some(st) => {
            let values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(|(v, _)| *v).collect();
            client.query_one(st, &values).await.map(drop)
        }
        None => client.query_typed(&insert_messages_sql(false), &params).await.map(drop),
    };
    match plain {
        Ok(_) => return Ok(Ok(Vec::new())),
        Err(e) if e.as_db_error().is_some_and(|d| d.constraint() == Some("messages_dedup")) => {}
        Err(e) => return Err(e),
    }
    if let Some(restart) = restart {
        client.batch_execute(restart).await?;
    }
    // UNNEST feeds the insert in array order, so of two messages of the batch with the same key
    // the first is stored. The row count leaves out the messages not inserted.
    let on_conflict = insert_messages_sql(true);
    let inserted: i64 = client.query_typed(&on_conflict, &params).await?.first().map_or(0, |r| r.get(0));
    if inserted as usize == batch.len() {
        return Ok(Ok(Vec::new()));
    }
    // The LATERAL lookup probes the dedup index once per key (a join could be planned as a scan).
    let stored = client
        .query(
            "SELECT k.ord, m.msg_id, m.seq, m.ts_ms
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[]) WITH ORDINALITY
                 AS k (conv_a, conv_b, sender, client_msg_id, ord)
             JOIN LATERAL (
                 SELECT msg_id, seq, ts_ms FROM messages m
                 WHERE m.conv_a = k.conv_a AND m.conv_b = k.conv_b AND m.sender = k.sender
                   AND m.client_msg_id = k.client_msg_id
             ) m ON true",
            &[&a, &b, &sender, &cmid],
        )
        .await?;
    let mut originals: Vec<Option<(u64, u64, u64)>> = vec![None; batch.len()];
    for r in &stored {
        let index = r.get::<_, i64>(0) as usize - 1;
        originals[index] = Some((u(r.get(1)), u(r.get(2)), u(r.get(3))));
    }
    // A message is the one stored if the stored row is itself and no earlier message of the
    // batch had its key; every other is a duplicate.
    let mut keys = std::collections::HashSet::with_capacity(batch.len());
    let mut dups = Duplicates::new();
    for (index, (m, original)) in batch.iter().zip(originals).enumerate() {
        let Some((msg_id, seq, ts_ms)) = original else {
            return Ok(Err(format!(
                "message {} of the batch was neither inserted nor found stored",
                m.msg_id
            )));
        };
        let first = keys.insert((m.conv, m.sender, m.client_msg_id));
        if !(first && msg_id == m.msg_id && seq == m.seq) {
            let original =
                RecentSend { sender: m.sender, client_msg_id: m.client_msg_id, msg_id, seq, ts_ms };
            dups.push((index, Unstored::Duplicate(original)));
        }
    }
    Ok(Ok(dups))
}

/// Read the rows of `sql` one at a time, stopping once `limit` (count and bytes) is passed:
/// rows past it are never held in memory. Each row yields its payload from column `payload_col`
/// and a key from `key`.
async fn rows_within<K>(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    limit: PageLimit,
    payload_col: usize,
    key: impl Fn(&tokio_postgres::Row) -> K,
) -> Result<(Vec<(K, Vec<u8>)>, bool), tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let stream = client.query_raw(sql, params.iter().copied()).await?;
    futures_util::pin_mut!(stream);
    let (mut rows, mut bytes) = (Vec::new(), 0usize);
    while let Some(row) = stream.try_next().await? {
        let payload: Vec<u8> = row.get(payload_col);
        if !limit.admits(rows.len(), bytes, payload.len()) {
            return Ok((rows, true));
        }
        bytes += payload.len();
        rows.push((key(&row), payload));
    }
    Ok((rows, false))
}

impl Store for PostgresStore {
    fn load_group(&self, group: u64) -> Result<Option<GroupLoad>, StoreError> {
        let range = self.conv_range(group_conv(group)).clone();
        let rows = self.block_on(async move {
            let conn = range.conn().await?;
            // One statement, so one snapshot: the row (kind 0), current members (1), blocks (2)
            // and requests (3), each kind in the columns it needs, by user id.
            conn.timed(conn.client().query(
                "SELECT 0 AS kind, founder AS user_id, name AS t1, topic AS t2, avatar_url AS t3,
                        extra, join_policy AS s1, invite_policy AS s2, muted_all_until_ms AS n1,
                        created_ms AS n2, dissolved
                 FROM groups WHERE id = $1
                 UNION ALL
                 SELECT 1, user_id, NULL, NULL, NULL, NULL, role, NULL, muted_until_ms, from_seq, NULL
                 FROM group_members WHERE group_id = $1 AND until_seq IS NULL
                 UNION ALL
                 SELECT 2, user_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
                 FROM group_blocks WHERE group_id = $1
                 UNION ALL
                 SELECT 3, user_id, note, NULL, NULL, NULL, NULL, NULL, ts_ms, NULL, NULL
                 FROM group_requests WHERE group_id = $1
                 ORDER BY 1, 2",
                &[&i(group)],
            ))
            .await
        })?;
        let mut load: Option<GroupLoad> = None;
        for r in &rows {
            let user = u(r.get(1));
            let small = |col| r.get::<_, i16>(col) as u8;
            match (r.get::<_, i32>(0), load.as_mut()) {
                (0, _) => {
                    let row = GroupRow {
                        id: group,
                        profile: GroupProfile {
                            name: r.get(2),
                            topic: r.get(3),
                            avatar_url: r.get(4),
                            extra: r.get(5),
                            join_policy: small(6),
                            invite_policy: small(7),
                        },
                        founder: user,
                        muted_all_until_ms: u(r.get(8)),
                        dissolved: r.get(10),
                        created_ms: u(r.get(9)),
                    };
                    load = Some(GroupLoad { row, ..GroupLoad::default() });
                }
                (1, Some(l)) => l.members.push(MemberRow {
                    user,
                    role: small(6),
                    muted_until_ms: u(r.get(8)),
                    from_seq: u(r.get(9)),
                }),
                (2, Some(l)) => l.blocked.push(user),
                (3, Some(l)) => {
                    l.requests.push(JoinRequest { user_id: user, note: r.get(2), ts_ms: u(r.get(8)) })
                }
                // No row: the group was never created.
                _ => break,
            }
        }
        Ok(load)
    }

    fn save_join_request(
        &self,
        group: u64,
        user: UserId,
        request: Option<&JoinRequest>,
    ) -> Result<(), StoreError> {
        let range = self.conv_range(group_conv(group)).clone();
        let request = request.cloned();
        self.block_on(async move {
            let conn = range.conn().await?;
            let c = conn.client();
            let (g, user) = (i(group), i(user));
            match request {
                // Only for a group that exists (as the memory store).
                Some(r) => {
                    conn.timed(c.execute(
                        "INSERT INTO group_requests (group_id, user_id, note, ts_ms)
                         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM groups WHERE id = $1)
                         ON CONFLICT (group_id, user_id) DO UPDATE SET note = excluded.note, ts_ms = excluded.ts_ms",
                        &[&g, &user, &r.note, &i(r.ts_ms)],
                    ))
                    .await?
                }
                None => {
                    conn.timed(c.execute(
                        "DELETE FROM group_requests WHERE group_id = $1 AND user_id = $2",
                        &[&g, &user],
                    ))
                    .await?
                }
            };
            Ok(())
        })
    }

    fn user_groups(&self, user: UserId, after: u64, limit: usize) -> Result<(Vec<u64>, bool), StoreError> {
        // Group ids lie below 2^63: a larger `after` lies past every group.
        if after >= i64::MAX as u64 {
            return Ok((Vec::new(), false));
        }
        // Each range gives its first `limit + 1`: merged, the first `limit` are the page, and any
        // beyond says there is more.
        let count = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let pages = self.on_every_range(move |range| async move {
            let conn = range.conn().await?;
            let rows = conn
                .timed(conn.client().query(
                    "SELECT group_id FROM group_members
                     WHERE user_id = $1 AND group_id > $2 AND until_seq IS NULL
                     ORDER BY group_id LIMIT $3",
                    &[&i(user), &i(after), &count],
                ))
                .await?;
            Ok(rows.iter().map(|r| u(r.get(0))).collect::<Vec<u64>>())
        })?;
        let mut ids: Vec<u64> = pages.into_iter().flatten().collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        ids.truncate(limit);
        Ok((ids, more))
    }

    fn group_count(&self, user: UserId) -> Result<usize, StoreError> {
        let counts = self.on_every_range(move |range| async move {
            let conn = range.conn().await?;
            let row = conn
                .timed(conn.client().query_one(
                    "SELECT count(*) FROM group_members WHERE user_id = $1 AND until_seq IS NULL",
                    &[&i(user)],
                ))
                .await?;
            Ok(row.get::<_, i64>(0) as usize)
        })?;
        Ok(counts.into_iter().sum())
    }

    /// Two statements per range, every range at once: which of the users have an account
    /// there, and how many groups each is in there.
    fn group_counts(&self, users: &[UserId]) -> Result<Vec<Option<usize>>, StoreError> {
        let ids: Arc<Vec<i64>> = Arc::new(users.iter().map(|&u| i(u)).collect());
        let per_range = self.on_every_range(move |range| {
            let ids = ids.clone();
            async move {
                let conn = range.conn().await?;
                let c = conn.client();
                let known =
                    conn.timed(c.query("SELECT id FROM accounts WHERE id = ANY($1)", &[&*ids])).await?;
                let counts = conn
                    .timed(c.query(
                        "SELECT user_id, count(*) FROM group_members
                         WHERE user_id = ANY($1) AND until_seq IS NULL GROUP BY user_id",
                        &[&*ids],
                    ))
                    .await?;
                let known: Vec<UserId> = known.iter().map(|r| u(r.get(0))).collect();
                let counts: Vec<(UserId, usize)> =
                    counts.iter().map(|r| (u(r.get(0)), r.get::<_, i64>(1) as usize)).collect();
                Ok((known, counts))
            }
        })?;
        let mut known = HashSet::new();
        let mut total: HashMap<UserId, usize> = HashMap::new();
        for (k, counts) in per_range {
            known.extend(k);
            for (user, n) in counts {
                *total.entry(user).or_default() += n;
            }
        }
        Ok(users
            .iter()
            .map(|user| known.contains(user).then(|| total.get(user).copied().unwrap_or(0)))
            .collect())
    }

    fn member_span(&self, user: UserId, group: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let range = self.conv_range(group_conv(group)).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let row = conn
                .timed(conn.client().query_opt(
                    "SELECT from_seq, until_seq FROM group_members WHERE group_id = $1 AND user_id = $2",
                    &[&i(group), &i(user)],
                ))
                .await?;
            Ok(row.map(|r| (u(r.get(0)), r.get::<_, Option<i64>>(1).map_or(u64::MAX, u))))
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
        let slot = Self::name_slot(name);
        // The domain in bits 48-55 (protocol::DOMAIN_SHIFT); the sequence stays far below.
        let domain_bits = crate::protocol::in_domain(0, domain);
        let range = self.range_of_slot(slot).clone();
        let now = crate::clock::now_ms();
        self.block_on(async move {
            let conn = range.conn().await?;
            let row = conn
                .timed(conn.client().query_opt(
                    "INSERT INTO accounts (id, name_key, password_hash, created_ms)
                     VALUES (nextval('user_ids') * 4096 + $1 + $5, $2, $3, $4)
                     ON CONFLICT (name_key) DO NOTHING RETURNING id",
                    &[&i(slot), &&name[..], &password_hash, &i(now), &i(domain_bits)],
                ))
                .await?;
            row.map(|r| u(r.get(0))).ok_or(StoreError::NameTaken)
        })
    }

    fn account_by_name(&self, name: &NameKey) -> Result<Option<Account>, StoreError> {
        let range = self.range_of_slot(Self::name_slot(name)).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let row = conn
                .timed(conn.client().query_opt(
                    "SELECT id, password_hash, banned_until_ms FROM accounts WHERE name_key = $1",
                    &[&&name[..]],
                ))
                .await?;
            Ok(row.map(|r| Account {
                id: u(r.get(0)),
                password_hash: r.get(1),
                banned_until_ms: u(r.get(2)),
            }))
        })
    }

    fn set_ban(&self, user: UserId, until_ms: u64) -> Result<bool, StoreError> {
        let range = self.range_of_slot(user % PARTITIONS).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let n = conn
                .timed(conn.client().execute(
                    "UPDATE accounts SET banned_until_ms = $2 WHERE id = $1",
                    &[&i(user), &i(until_ms)],
                ))
                .await?;
            Ok(n > 0)
        })
    }

    fn save_profile(&self, user: UserId, profile: &UserProfile, now_ms: u64) -> Result<(), StoreError> {
        let range = self.range_of_slot(user % PARTITIONS).clone();
        let blob = super::profile_blob(profile);
        self.block_on(async move {
            let conn = range.conn().await?;
            conn.timed(conn.client().execute(
                "INSERT INTO profiles (user_id, updated_ms, data) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id) DO UPDATE SET updated_ms = $2, data = $3",
                &[&i(user), &i(now_ms), &blob],
            ))
            .await?;
            Ok(())
        })
    }

    /// One statement per range that holds some of the users, every range at once.
    fn profiles(&self, users: &[UserId]) -> Result<Vec<(UserId, u64, UserProfile)>, StoreError> {
        let ids: Arc<Vec<i64>> = Arc::new(users.iter().map(|&u| i(u)).collect());
        let per_range = self.on_every_range(move |range| {
            let ids = ids.clone();
            async move {
                let conn = range.conn().await?;
                let rows = conn
                    .timed(conn.client().query(
                        "SELECT a.id, p.updated_ms, p.data FROM accounts a
                         LEFT JOIN profiles p ON p.user_id = a.id WHERE a.id = ANY($1)",
                        &[&*ids],
                    ))
                    .await?;
                Ok(rows
                    .iter()
                    .map(|r| (u(r.get(0)), r.get::<_, Option<i64>>(1), r.get::<_, Option<Vec<u8>>>(2)))
                    .collect::<Vec<_>>())
            }
        })?;
        let mut found: HashMap<UserId, (u64, UserProfile)> = HashMap::new();
        for (user, updated, blob) in per_range.into_iter().flatten() {
            let profile = blob.map_or_else(UserProfile::default, |b| super::profile_of_blob(user, &b));
            found.insert(user, (updated.map_or(0, u), profile));
        }
        Ok(users.iter().filter_map(|&user| found.remove(&user).map(|(t, p)| (user, t, p))).collect())
    }

    fn ban_of(&self, user: UserId) -> Result<Option<u64>, StoreError> {
        let range = self.range_of_slot(user % PARTITIONS).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let row = conn
                .timed(
                    conn.client()
                        .query_opt("SELECT banned_until_ms FROM accounts WHERE id = $1", &[&i(user)]),
                )
                .await?;
            Ok(row.map(|r| u(r.get(0))))
        })
    }

    fn account_exists(&self, user: UserId) -> Result<bool, StoreError> {
        let range = self.range_of_slot(user % PARTITIONS).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let row = conn
                .timed(conn.client().query_opt("SELECT 1 FROM accounts WHERE id = $1", &[&i(user)]))
                .await?;
            Ok(row.is_some())
        })
    }

    fn partitions(&self) -> usize {
        self.ranges.len()
    }

    fn partition_of(&self, conv: ConvKey) -> usize {
        let slot = tim_shards::partition_of(crate::placement::conv_hash(conv));
        self.owner[slot as usize] as usize
    }

    fn append(&self, partition: usize, batch: Vec<StoredMessage>, done: CommitDone) {
        let range = self.ranges[partition].clone();
        self.rt.spawn(async move {
            done(insert_batch(&range, &batch).await);
        });
    }

    fn load_conv(&self, conv: ConvKey, since_ms: u64, recent_max: usize) -> Result<ConvLoad, StoreError> {
        let range = self.conv_range(conv).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let c = conn.client();
            // A seq removed by the schema 2 migration stays used (`seq_floors`).
            let last: Option<i64> = conn
                .timed(c.query_one(
                    "SELECT max(seq) FROM (
                         SELECT max(seq) AS seq FROM messages WHERE conv_a = $1 AND conv_b = $2
                         UNION ALL SELECT seq FROM seq_floors WHERE conv_a = $1 AND conv_b = $2) s",
                    &[&i(conv.0), &i(conv.1)],
                ))
                .await?
                .get(0);
            let rows = conn
                .timed(c.query(
                    "SELECT sender, client_msg_id, msg_id, seq, ts_ms FROM messages
                     WHERE conv_a = $1 AND conv_b = $2 AND ts_ms >= $3 ORDER BY seq DESC LIMIT $4",
                    &[&i(conv.0), &i(conv.1), &i(since_ms), &(recent_max as i64)],
                ))
                .await?;
            let recent = rows
                .iter()
                .map(|r| RecentSend {
                    sender: u(r.get(0)),
                    client_msg_id: u(r.get(1)),
                    msg_id: u(r.get(2)),
                    seq: u(r.get(3)),
                    ts_ms: u(r.get(4)),
                })
                .collect();
            let pair = if conv.0 == 0 { 0 } else { conn.timed(pair_of(c, conv)).await? };
            Ok(ConvLoad { last_seq: last.map_or(0, u), recent, pair })
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
        if !self.account_exists(other)? {
            return Ok(Err(ErrorCode::UnknownUser));
        }
        // The count spans every range; the pair's two rows change in one transaction on its own.
        let sql = format!(
            "SELECT count(*) FROM roster WHERE user_id = $1 AND {}",
            crate::roster::count_filter(action)
        );
        let counts = self.on_every_range(move |range| {
            let sql = sql.clone();
            async move {
                let conn = range.conn().await?;
                let row = conn.timed(conn.client().query_one(&sql, &[&i(user)])).await?;
                Ok(row.get::<_, i64>(0) as usize)
            }
        })?;
        let count: usize = counts.into_iter().sum();
        let range = self.conv_range(crate::placement::direct_key(user, other)).clone();
        let note = note.to_string();
        self.block_on(async move {
            let conn = range.conn().await?;
            let c = conn.client();
            let out = conn.timed(roster_tx(c, user, other, action, &note, now_ms, count, max)).await;
            if !matches!(out, Ok(Ok(_))) {
                let _ = conn.timed(c.batch_execute("ROLLBACK")).await;
            }
            out
        })
    }

    fn roster_list(
        &self,
        user: UserId,
        list: u8,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<crate::protocol::RosterEntry>, bool), StoreError> {
        let (filter, since, note) = super::embedded::roster_filter(list);
        let sql = format!(
            "SELECT other, {since}, {note}::text FROM roster WHERE user_id = $1 AND other > $2 AND {filter}
             ORDER BY other LIMIT $3"
        );
        let count = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let after = i(after.min(i64::MAX as u64));
        let pages = self.on_every_range(move |range| {
            let sql = sql.clone();
            async move {
                let conn = range.conn().await?;
                let rows = conn.timed(conn.client().query(&sql, &[&i(user), &after, &count])).await?;
                Ok(rows
                    .iter()
                    .map(|r| crate::protocol::RosterEntry {
                        user: u(r.get(0)),
                        since_ms: u(r.get(1)),
                        note: r.get(2),
                    })
                    .collect::<Vec<_>>())
            }
        })?;
        let mut entries: Vec<_> = pages.into_iter().flatten().collect();
        entries.sort_by_key(|e| e.user);
        let more = entries.len() > limit;
        entries.truncate(limit);
        Ok((entries, more))
    }

    /// Two statements for the whole batch on the partition's range (the last sequence numbers,
    /// then the recent sends), and one per other range holding a recipient to check, run at the
    /// same time. A range that fails fails only the requests that needed it.
    fn load_convs(
        &self,
        partition: usize,
        reqs: &[LoadRequest],
    ) -> Vec<Result<Option<ConvLoad>, StoreError>> {
        let range = self.ranges[partition].clone();
        let mut checks: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for to in reqs.iter().filter_map(|r| r.check_recipient) {
            checks.entry(self.owner[(to % PARTITIONS) as usize] as usize).or_default().push(i(to));
        }
        let checks: Vec<(usize, Arc<Range>, Vec<i64>)> =
            checks.into_iter().map(|(ix, ids)| (ix, self.ranges[ix].clone(), ids)).collect();
        let keys: Vec<(i64, i64, i64, i64)> =
            reqs.iter().map(|r| (i(r.key.0), i(r.key.1), i(r.since_ms), r.recent_max as i64)).collect();
        let (loads, existing) = self.rt.block_on(async move {
            let checking: Vec<_> = checks
                .into_iter()
                .map(|(ix, r, ids)| (ix, tokio::spawn(async move { existing_accounts(&r, &ids).await })))
                .collect();
            let loads = load_batch(&range, &keys).await;
            let mut existing = HashMap::new();
            for (ix, task) in checking {
                let found =
                    task.await.unwrap_or_else(|e| Err(StoreError::Unavailable(format!("postgres: {e}"))));
                existing.insert(ix, found);
            }
            (loads, existing)
        });
        reqs.iter()
            .enumerate()
            .map(|(at, r)| {
                if let Some(to) = r.check_recipient {
                    match &existing[&(self.owner[(to % PARTITIONS) as usize] as usize)] {
                        Ok(found) if !found.contains(&to) => return Ok(None),
                        Ok(_) => {}
                        Err(e) => return Err(e.clone()),
                    }
                }
                match &loads {
                    Ok(all) => Ok(Some(all[at].clone())),
                    Err(e) => Err(e.clone()),
                }
            })
            .collect()
    }

    fn history(&self, conv: ConvKey, anchor: u64, older: bool, limit: PageLimit) -> Result<Page, StoreError> {
        let range = self.conv_range(conv).clone();
        let sql = if older {
            "SELECT payload FROM messages WHERE conv_a = $1 AND conv_b = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
        } else {
            "SELECT payload FROM messages WHERE conv_a = $1 AND conv_b = $2 AND seq > $3 ORDER BY seq ASC LIMIT $4"
        };
        // Sequence numbers stay below 2^63: a larger anchor lies past every message (going
        // older: from the newest; going newer: nothing), it must not wrap to a negative number.
        let anchor = if older && anchor == 0 { i64::MAX } else { i(anchor.min(i64::MAX as u64)) };
        let (rows, more) = self.block_on(async move {
            let conn = range.conn().await?;
            let count = limit.count as i64 + 1;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&i(conv.0), &i(conv.1), &anchor, &count];
            conn.timed(rows_within(conn.client(), sql, &params, limit, 0, |_| ())).await
        })?;
        Ok(Page { payloads: rows.into_iter().map(|(_, p)| Bytes::from(p)).collect(), more })
    }

    fn catch_up(
        &self,
        user: UserId,
        device: u64,
        since_ms: u64,
        until_ms: u64,
        limit: PageLimit,
    ) -> Result<CatchUp, StoreError> {
        // A user's conversations are spread over every range: ask them all at once, each within
        // the statement timeout (connecting included), and merge by time what came back. A range
        // that fails or misses its deadline is counted, not waited for: the device gets the rest
        // now, and the missing messages at a later login (or with History).
        let ranges = self.ranges.clone();
        let deadline = ranges.first().map_or(Duration::ZERO, |r| r.timeouts.statement);
        let (mut rows, unavailable, cut) = self.rt.block_on(async move {
            let tasks: Vec<_> = ranges
                .into_iter()
                .map(|range| {
                    tokio::spawn(async move {
                        let work = async {
                            let conn = range.conn().await?;
                            let (user, device, since) = (i(user), i(device), i(since_ms));
                            let (count, until) = (limit.count as i64 + 1, i(until_ms));
                            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                                [&user, &device, &since, &count, &until];
                            conn.timed(rows_within(
                                conn.client(),
                                // Per conversation of the user, what lies past the
                                // device's cursor, by primary key: the cost follows what
                                // is unread, not the user's traffic. A group's
                                // conversation is read within the user's membership
                                // (`lo..=hi`): from the notice that made it a member, up
                                // to the one that ended it.
                                "SELECT m.ts_ms, m.conv_a, m.conv_b, m.seq, m.payload FROM (
                                     SELECT conv_a, conv_b, 0::int8 AS lo, 9223372036854775807::int8 AS hi
                                     FROM user_convs WHERE user_id = $1
                                     UNION ALL
                                     SELECT 0, group_id, from_seq, COALESCE(until_seq, 9223372036854775807)
                                     FROM group_members WHERE user_id = $1) uc
                                 LEFT JOIN cursors c ON c.user_id = $1 AND c.device = $2
                                                    AND c.conv_a = uc.conv_a AND c.conv_b = uc.conv_b
                                 CROSS JOIN LATERAL (
                                     SELECT m.ts_ms, m.conv_a, m.conv_b, m.seq, m.payload FROM messages m
                                     WHERE m.conv_a = uc.conv_a AND m.conv_b = uc.conv_b
                                       AND m.seq > COALESCE(c.seq, 0) AND m.seq >= uc.lo AND m.seq <= uc.hi
                                       AND m.ts_ms >= $3 AND m.ts_ms <= $5
                                       AND NOT (m.sender = $1 AND m.sender_device = $2)
                                     ORDER BY m.seq LIMIT $4) m
                                 ORDER BY m.ts_ms, m.conv_a, m.conv_b, m.seq LIMIT $4",
                                &params,
                                limit,
                                4,
                                |r| {
                                    (
                                        r.get::<_, i64>(0),
                                        r.get::<_, i64>(1),
                                        r.get::<_, i64>(2),
                                        r.get::<_, i64>(3),
                                    )
                                },
                            ))
                            .await
                        };
                        match tokio::time::timeout(deadline, work).await {
                            Ok(r) => r,
                            Err(_) => {
                                range.stalled.store(true, Ordering::Relaxed);
                                Err(StoreError::Unavailable(format!(
                                    "postgres {}: no answer within {} ms",
                                    redact(&range.url),
                                    deadline.as_millis()
                                )))
                            }
                        }
                    })
                })
                .collect();
            let (mut all, mut unavailable, mut cut) = (Vec::new(), 0u32, false);
            for t in tasks {
                match t.await.map_err(|e| StoreError::Unavailable(e.to_string())).and_then(|r| r) {
                    Ok((rows, more)) => {
                        all.extend(rows);
                        cut |= more;
                    }
                    Err(e) => {
                        log::warn!("store: catch-up of user {user}: {e}");
                        unavailable += 1;
                    }
                }
            }
            (all, unavailable, cut)
        });
        // Each range gave at most a page's worth: merged by time, the page is cut again. A
        // range cut short leaves the rest of its messages for the next catch-up (its cursors did
        // not move past them).
        rows.sort_by_key(|r| r.0);
        let mut page = collect_page(rows.into_iter().map(|(_, p)| Ok::<_, StoreError>(p)), limit)?;
        page.more |= cut;
        Ok(CatchUp { page, unavailable })
    }

    fn save_cursors(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        self.save_positions("cursors", cursors)
    }

    fn save_reads(&self, reads: &[Cursor]) -> Result<(), StoreError> {
        self.save_positions("reads", reads)?;
        // A read makes the peer's burn-after-read messages up to it due now: one statement per
        // range, through the partial index of burn messages (only they are looked at).
        let now = i(crate::clock::now_ms());
        let mut by_range: Vec<Vec<&Cursor>> = vec![Vec::new(); self.ranges.len()];
        for r in reads.iter().filter(|r| r.conv.0 != 0) {
            let slot = tim_shards::partition_of(crate::placement::conv_hash(r.conv));
            by_range[self.owner[slot as usize] as usize].push(r);
        }
        for (index, group) in by_range.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let range = self.ranges[index].clone();
            let col = |f: fn(&Cursor) -> u64| group.iter().map(|c| i(f(c))).collect::<Vec<i64>>();
            let (a, b, seq, user) = (col(|c| c.conv.0), col(|c| c.conv.1), col(|c| c.seq), col(|c| c.user));
            self.block_on(async move {
                let conn = range.conn().await?;
                conn.timed(conn.client().execute(
                    "UPDATE messages m SET burn_at_ms = $5
                     FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[]) AS k (a, b, seq, reader)
                     WHERE m.conv_a = k.a AND m.conv_b = k.b AND m.seq <= k.seq AND m.sender <> k.reader
                       AND m.burn_at_ms > 0 AND m.burn_at_ms > $5",
                    &[&a, &b, &seq, &user, &now],
                ))
                .await?;
                Ok(())
            })?;
        }
        Ok(())
    }

    fn claim_due_burns(&self, now_ms: u64, limit: usize) -> Result<Vec<super::DueBurn>, StoreError> {
        let (now, stale) = (i(now_ms), i(now_ms.saturating_sub(super::BURN_CLAIM_MS)));
        let mut out = Vec::new();
        for range in self.ranges.clone() {
            let lim = (limit - out.len().min(limit)) as i64;
            if lim == 0 {
                break;
            }
            let rows = self.block_on(async move {
                let conn = range.conn().await?;
                let rows = conn
                    .timed(conn.client().query(
                        "UPDATE messages SET burn_at_ms = -GREATEST($1, 1)
                         WHERE (conv_a, conv_b, seq) IN (
                             SELECT conv_a, conv_b, seq FROM messages
                             WHERE burn_at_ms <> 0
                               AND ((burn_at_ms > 0 AND burn_at_ms <= $1) OR (burn_at_ms < 0 AND -burn_at_ms <= $2))
                             LIMIT $3 FOR UPDATE SKIP LOCKED)
                         RETURNING conv_a, conv_b, seq, sender",
                        &[&now, &stale, &lim],
                    ))
                    .await?;
                Ok(rows)
            })?;
            out.extend(rows.iter().map(|r| super::DueBurn {
                conv: (u(r.get(0)), u(r.get(1))),
                seq: u(r.get(2)),
                sender: u(r.get(3)),
            }));
        }
        Ok(out)
    }

    fn reads_of(&self, conv: ConvKey) -> Result<Vec<(UserId, u64)>, StoreError> {
        let range = self.conv_range(conv).clone();
        self.block_on(async move {
            let conn = range.conn().await?;
            let rows = conn
                .timed(conn.client().query(
                    "SELECT user_id, MAX(seq) FROM reads WHERE conv_a = $1 AND conv_b = $2
                     GROUP BY user_id ORDER BY user_id",
                    &[&i(conv.0), &i(conv.1)],
                ))
                .await?;
            Ok(rows.iter().map(|r| (u(r.get(0)), u(r.get(1)))).collect())
        })
    }
}
