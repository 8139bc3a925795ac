//! Configuration: the TOML file, its defaults, and every limit the server enforces, in one place.
//! README.md lists every option; keep the two in step.

use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub limits: Limits,
    pub sessions: SessionPolicy,
    pub messages: MessagePolicy,
    pub security: Security,
    pub cluster: ClusterConfig,
    pub gateway: GatewayConfig,
    pub tls: TlsConfig,
    pub admin: AdminConfig,
    /// Tenant domains (PROTOCOL 8.17); none by default: every account is in the default domain.
    pub domains: Vec<DomainConfig>,
}

/// A tenant domain: accounts named `NAME@name` live in it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    /// 1..=255; part of the ids of its users, groups and rooms, so never reused for another.
    pub id: u8,
}

impl Config {
    /// The domain id of an account name: that of the configured domain after its last `@`
    /// (compared case-insensitively, as names are), else 0 (the default domain: the whole string
    /// is the name).
    pub fn domain_of_name(&self, name: &str) -> u8 {
        let Some((_, domain)) = name.rsplit_once('@') else { return 0 };
        let domain = domain.to_lowercase();
        self.domains.iter().find(|d| d.name.to_lowercase() == domain).map_or(0, |d| d.id)
    }
}

/// The admin HTTP API, `/metrics` and the health checks (docs/ADMIN.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Its listener; "": none. A non-loopback address needs a `token`.
    #[serde(deserialize_with = "addr_or_off")]
    pub listen: Option<SocketAddr>,
    /// The bearer token every request but `/healthz` and `/readyz` must carry
    /// (`Authorization: Bearer TOKEN`); also from `TIM_ADMIN_TOKEN`. "": none needed, which
    /// only a loopback listener allows.
    pub token: String,
    /// Count messages, acks and their latency per shard for `/metrics`; false leaves those
    /// series at 0 (connections, sessions and queue depths are still reported).
    pub metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some("127.0.0.1:7190".parse().expect("valid")),
            token: String::new(),
            metrics: true,
        }
    }
}

/// The WebSocket listener (binary v1 frames or JSON, docs/JSON.md) and the web chat page it
/// serves.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// WebSocket listener (upgrade on path `/ws`; the web chat page on `/`); "": none.
    #[serde(deserialize_with = "addr_or_off")]
    pub ws_listen: Option<SocketAddr>,
    /// Milliseconds a new WebSocket or TLS connection may take for its handshake (the HTTP
    /// upgrade request, the TLS handshake) before it is closed.
    pub handshake_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            ws_listen: Some("0.0.0.0:7180".parse().expect("valid")),
            handshake_timeout_ms: 10_000,
        }
    }
}

/// An address, or "" for none (a listener that is on by default is turned off so).
fn addr_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
}

/// TLS for the client listeners (rustls). A certificate and key are needed when either TLS
/// listener is set; both files are read again on SIGHUP (new connections get the new
/// certificate; sessions already open keep theirs).
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file: the certificate chain, leaf first.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<std::path::PathBuf>,
    /// Binary protocol over TLS; unset: none.
    pub listen: Option<SocketAddr>,
    /// WebSocket over TLS (`wss://`, path `/ws`, and the web page over https); unset: none.
    pub ws_listen: Option<SocketAddr>,
}

impl TlsConfig {
    /// Whether a TLS listener is configured.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.ws_listen.is_some()
    }
}

/// Running as a node of a cluster (docs/CLUSTER.md). A node is clustered when it has a
/// `listen` address or a `join` list; otherwise it runs alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster, 1..=63 (it goes into message ids and session
    /// references). Required in a cluster.
    pub node_id: u16,
    /// Where this node listens for its peers' links; unset: it only dials out (a node behind
    /// NAT: its links, once up, carry traffic both ways).
    pub listen: Option<SocketAddr>,
    /// The address peers dial to reach this node (default: `listen`, which must then not be
    /// an unspecified address such as 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Addresses of members to join through (any one answering is enough); `--join ADDR` adds
    /// to them. Empty on the first node.
    pub join: Vec<String>,
    /// The shared secret every node proves on every link (at least 16 bytes); links are
    /// encrypted with keys agreed under it (Noise NNpsk0).
    pub secret: String,
    /// A node that does not answer for this long is taken as failed and its partitions move
    /// (milliseconds).
    pub failure_detect_ms: u64,
    /// Bytes queued for one peer's link at most; beyond it envelopes for that node are dropped
    /// and counted (sends among them are answered by their timeout).
    pub link_queue_bytes_max: usize,
    /// Milliseconds a dial to a peer may take.
    pub dial_timeout_ms: u64,
    /// Milliseconds `tim serve` waits for a first member to answer a join before it starts
    /// alone (it keeps trying in the background).
    pub join_wait_ms: u64,
    /// After a node failed, the sessions of each shard catch up (`Resync`) spread over this many
    /// milliseconds.
    pub resync_spread_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 0,
            listen: None,
            advertise: None,
            join: Vec::new(),
            secret: String::new(),
            failure_detect_ms: 2000,
            link_queue_bytes_max: 64 << 20,
            dial_timeout_ms: 1000,
            join_wait_ms: 5000,
            resync_spread_ms: 1000,
        }
    }
}

impl ClusterConfig {
    /// Whether this node is part of a cluster.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || !self.join.is_empty()
    }

    /// This node's id: 0 when it runs alone.
    pub fn node_id(&self) -> u16 {
        if self.enabled() {
            self.node_id
        } else {
            0
        }
    }

    /// The address peers dial, if any.
    pub fn advertised(&self) -> Option<SocketAddr> {
        self.advertise.or(self.listen)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the binary protocol listener.
    pub listen: SocketAddr,
    /// Number of shards (executor threads); 0 means one per available core.
    pub shards: usize,
    /// "auto" (io_uring, else epoll), "io_uring" or "epoll".
    pub driver: String,
    /// Pin each shard thread to a core.
    pub pin_cores: bool,
    /// Threads that hash and verify passwords (argon2id); 0 means one per shard.
    pub worker_threads: usize,
    /// Threads that run store calls (account lookups and writes, conversation loads, history,
    /// catch-up, cursor saves); 0 means one per shard, plus one per PostgreSQL connection
    /// (`connections_per_partition` × ranges) with the postgres store.
    pub store_threads: usize,
    /// io_uring submission queue entries per shard.
    pub ring_entries: u32,
    /// Executor turns a shard spins on an empty mesh before parking.
    pub spin_rounds: u32,
    /// Listen backlog per shard.
    pub backlog: i32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "embedded" (SQLite under `data_dir`, the default), "postgres" (partitioned over
    /// PostgreSQL servers) or "memory" (no-data mode: nothing survives a restart).
    pub backend: String,
    /// Directory of the embedded store.
    pub data_dir: std::path::PathBuf,
    /// Messages committed in one transaction at most.
    pub commit_batch_max: usize,
    /// Messages one shard holds waiting for their commit on one store partition at most; while
    /// a partition's store stalls, further sends to it get StoreUnavailable at once.
    pub commit_backlog_max: usize,
    /// Microseconds a shard's commit waits for more messages before it starts (0: it takes
    /// what is queued; the 1 ms timer rounds it up).
    pub commit_wait_us: u64,
    /// Milliseconds a send waits for its commit before it gets StoreUnavailable.
    pub commit_timeout_ms: u64,
    /// Conversations one shard loads from one store partition in one go at most: the first
    /// messages of many conversations (after a start) cost a round trip per batch, not per
    /// conversation.
    pub load_batch_max: usize,
    /// SQLite `synchronous` for the embedded store: "full" (durable against power loss) or
    /// "normal" (durable against a crash of tim, not of the machine).
    pub synchronous: String,
    pub postgres: PostgresConfig,
}

/// The PostgreSQL backend: ranges of the partition space, each on its own server or database.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connections tim opens to each partition range at most for everything but the send path
    /// (account calls, history, catch-up, cursors).
    pub connections_per_partition: usize,
    /// Connections to each partition range kept for the send path (commits and conversation
    /// loads), on top of `connections_per_partition`: a burst of logins' catch-ups never holds
    /// up a send.
    pub send_connections_per_partition: usize,
    /// Milliseconds a connection attempt may take, startup and authentication included.
    pub connect_timeout_ms: u64,
    /// Milliseconds a call waits for a free connection of a range's pool. While a range is not
    /// answering (a call to it timed out and none has succeeded since), a call that finds no
    /// free connection fails at once instead.
    pub acquire_timeout_ms: u64,
    /// Milliseconds one statement may take: enforced by tim (the connection is then dropped) and
    /// by the server (`statement_timeout`, set on every connection). Also the deadline of each
    /// range's part of a login's catch-up.
    pub statement_timeout_ms: u64,
    /// Threads of the runtime that drives the PostgreSQL connections.
    pub threads: usize,
    #[serde(rename = "partition")]
    pub partitions: Vec<PgPartition>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgPartition {
    /// An inclusive range of partitions, "FIRST-LAST", within 0..=4095.
    pub slots: String,
    /// A libpq-style connection URL, e.g. "postgres://tim@db1:5432/tim".
    pub url: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            connections_per_partition: 4,
            send_connections_per_partition: 2,
            connect_timeout_ms: 2000,
            acquire_timeout_ms: 2000,
            statement_timeout_ms: 2000,
            threads: 2,
            partitions: Vec::new(),
        }
    }
}

impl PgPartition {
    /// The inclusive slot range.
    pub fn range(&self) -> anyhow::Result<(u32, u32)> {
        let (a, b) = self
            .slots
            .split_once('-')
            .ok_or_else(|| anyhow::anyhow!("slots {:?} must look like \"0-2047\"", self.slots))?;
        let (a, b): (u32, u32) = (a.trim().parse()?, b.trim().parse()?);
        if a > b || b >= tim_shards::PARTITIONS {
            bail!("slots {:?} must be a range within 0-{}", self.slots, tim_shards::PARTITIONS - 1);
        }
        Ok((a, b))
    }
}

/// Every limit, named `*_max` or with its unit last.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame payload accepted from a client, in bytes.
    pub frame_bytes_max: usize,
    /// Largest message body, in bytes.
    pub body_bytes_max: usize,
    /// Largest body of a message sent in parts (a large message), in bytes.
    pub large_body_bytes_max: usize,
    /// Bytes of large messages one shard holds for its sessions at once (uploads in progress and
    /// large sends not yet answered); a large message beyond it gets Busy.
    pub large_shard_bytes_max: usize,
    /// Bytes of large frames queued for one session (shared with other recipients) before it is
    /// closed as a slow consumer.
    pub session_large_outbound_bytes_max: usize,
    /// A large message's upload is dropped (Timeout) when no part of it came for this long.
    pub upload_idle_timeout_ms: u64,
    /// Size of a pooled read buffer, in bytes.
    pub read_buffer_bytes: usize,
    /// Read buffers kept in each shard's pool.
    pub read_buffers_pooled_max: usize,
    /// Connections one shard accepts; further ones get TooManyConnections and are closed.
    pub connections_per_shard_max: usize,
    /// Unacknowledged sends per session; the server stops reading the socket at this count.
    pub inflight_per_session_max: u32,
    /// Bytes queued for a session before it is closed as a slow consumer.
    pub session_outbound_bytes_max: usize,
    /// Slots per ordered pair of shards in the mesh.
    pub mesh_queue_capacity: usize,
    /// Envelopes one shard holds back, over all destinations, while mesh queues are full.
    pub mesh_overflow_max: usize,
    /// Envelopes a shard handles per drain of the mesh.
    pub mesh_batch_max: usize,
    /// Milliseconds a new connection has to log in.
    pub login_timeout_ms: u64,
    /// Milliseconds without any bytes received after which a session is closed.
    pub idle_timeout_ms: u64,
    /// Milliseconds a frame may stay incomplete (its first bytes read, the rest not) before the
    /// session is closed, so that a client cannot hold a read buffer by stopping mid-frame.
    pub partial_frame_timeout_ms: u64,
    /// Milliseconds the server drains on shutdown before closing what is left.
    pub shutdown_drain_ms: u64,
    /// Latest sends remembered per conversation for resend dedup.
    pub dedup_per_conversation_max: usize,
    /// Seconds a client message id is remembered for resend dedup.
    pub dedup_window_secs: u64,
    /// Live conversations (sequence counters, resend dedup) per shard; at the cap the least
    /// recently used one that has nothing open is evicted to make room.
    pub conversations_per_shard_max: usize,
    /// Registrations one connection may ask for; beyond it: RateLimited.
    pub registrations_per_connection_max: u32,
    /// Registrations one source address may ask for per minute on one shard; beyond it:
    /// RateLimited.
    pub registrations_per_address_per_minute_max: u32,
    /// Sends one connection may address to accounts that do not exist per minute; beyond it
    /// the connection is closed with RateLimited.
    pub unknown_recipients_per_connection_per_minute_max: u32,
    /// The same per source address and shard.
    pub unknown_recipients_per_address_per_minute_max: u32,
    /// Typing notices one session may send per minute; beyond it: RateLimited (the session
    /// stays).
    pub typing_per_session_per_minute_max: u32,
    /// Read receipts one session may send per minute; beyond it: RateLimited.
    pub reads_per_session_per_minute_max: u32,
    /// Groups up to this many members push each read receipt to their members' sessions; a
    /// larger group only answers ReadGet with counts.
    pub receipts_live_members_max: usize,
    /// Bytes of a presence's status text (InvalidPresence).
    pub presence_text_bytes_max: usize,
    /// Bytes of a presence's extra data (InvalidPresence).
    pub presence_extra_bytes_max: usize,
    /// Users one PresenceGet may ask about (InvalidPresence).
    pub presence_query_max: usize,
    /// A user's presence changes within this window reach its friends as one notice (the
    /// latest); 0: each change at once.
    pub presence_coalesce_ms: u64,
    /// Friends plus outgoing friend requests, watches and outgoing watch requests one user may
    /// have; and, on their own, the users it allows to watch its presence (TooManyFriends).
    pub roster_entries_max: usize,
    /// Bytes of a friend request's note (InvalidRoster).
    pub roster_note_bytes_max: usize,
    /// Bytes of a profile's nickname, avatar URL or area (InvalidProfile).
    pub profile_text_bytes_max: usize,
    /// Bytes of a profile's extra data (InvalidProfile).
    pub profile_extra_bytes_max: usize,
    /// Users one ProfileGet may name (InvalidProfile).
    pub profiles_per_request_max: usize,
    /// Source addresses one shard keeps counters for.
    pub addresses_tracked_max: usize,
    /// Loopback addresses are not limited per address (local tools and load generators).
    pub rate_limit_exempt_loopback: bool,
    /// Milliseconds a request waits for an answer from another shard or the store pipeline
    /// (a Send's ack, a login's place among the user's sessions, a token) before it is answered
    /// with Timeout.
    pub answer_timeout_ms: u64,
    /// Seconds after which an unused conversation is evicted from memory (reloaded from the
    /// store when next used).
    pub conversation_idle_secs: u64,
    /// Live rooms one shard owns at most; a RoomCreate beyond it gets TooManyRooms.
    pub rooms_per_shard_max: usize,
    /// Subscribers of one live room at most (and the cap a creator may ask for).
    pub room_subscribers_max: u32,
    /// Rooms one session may be subscribed to at once.
    pub room_subscriptions_per_session_max: usize,
    /// Users a room's creator may list as publishers.
    pub room_publishers_max: usize,
    /// Room messages queued for one session at most; beyond it the oldest are dropped, counted
    /// and reported to the session with Missed (a slow reader never slows a room or a stream).
    pub room_queue_frames_max: usize,
    /// A room without a publish for this long is closed (its subscribers get RoomClosed).
    pub room_idle_secs: u64,
    /// Sessions one shard writes a room message to in one go; a room with more local
    /// subscribers is served in slices, other work running between them.
    pub fanout_slice: usize,
    /// Room messages one shard holds waiting for its fan-out task; beyond it a room message is
    /// dropped for the shard's subscribers, who are told with the room's next message (Missed).
    pub fanout_jobs_max: usize,
    /// Members of one group at most (joins, invites and approvals beyond it: GroupFull).
    pub group_members_max: usize,
    /// Groups one user may be a member of (create, join, invite, approve beyond it:
    /// TooManyGroups; checked when the request is made).
    pub groups_per_user_max: usize,
    /// Pending join requests of one group at most (TooManyJoinRequests).
    pub group_join_requests_max: usize,
    /// Bytes of a group's name, topic, avatar URL, and of a join request's note, each.
    pub group_text_bytes_max: usize,
    /// Bytes of a group's opaque extra data.
    pub group_extra_bytes_max: usize,
    /// Users one `GroupAddMembers` may add at once (InvalidGroup beyond).
    pub group_add_batch_max: usize,
    /// Members (or groups) in one `GroupMembers` (or `MyGroups`) page at most.
    pub group_page_max: u32,
    /// Groups one shard holds in memory at most; beyond it the least recently used idle group
    /// is dropped (reloaded from the store when next used).
    pub groups_per_shard_max: usize,
    /// Group changes waiting behind the one being stored, per group; beyond it: Busy.
    pub group_changes_waiting_max: usize,
    /// Default and greatest lifetime of a one-shot login token, in seconds.
    pub token_ttl_secs: u32,
    /// Live one-shot tokens per account.
    pub tokens_per_user_max: usize,
    /// Pending jobs per worker pool (password hashing; store calls); beyond it: Busy.
    pub worker_queue_max: usize,
    /// Messages in one history page at most.
    pub history_page_max: u32,
    /// Payload bytes in one history page at most (past its first message).
    pub history_page_bytes_max: usize,
    /// Stored messages sent to a device at login at most.
    pub catchup_messages_max: u32,
    /// Payload bytes of stored messages sent to a device at login at most (past the first).
    pub catchup_bytes_max: usize,
    /// How far back (seconds) catch-up at login looks.
    pub catchup_window_secs: u64,
    /// Milliseconds between flushes of delivery-ack cursors to the store.
    pub cursor_flush_ms: u64,
    /// Delivery cursors one shard holds between flushes; acks for further conversations are
    /// dropped until the next flush.
    pub cursors_pending_max: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DevicePolicy {
    /// A login over a limit kicks the oldest session in the way (it gets Kick(Replaced)).
    KickOldest,
    /// A login over a limit is refused with DeviceLimit.
    Refuse,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionPolicy {
    /// Sessions one account may hold at once.
    pub per_account_max: usize,
    /// Sessions one account may hold per device type.
    pub per_device_type_max: usize,
    /// What happens when a login would go over a limit.
    pub policy: DevicePolicy,
    /// When the last session of a user closes, the user goes offline (its presence is
    /// forgotten); false: the presence it set stays until it sets another.
    pub presence_auto_offline: bool,
}

/// What users may do with messages (docs/PROTOCOL.md 5.17).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagePolicy {
    /// How long after sending a message may be recalled (a group manager: anyone's); 0: no
    /// limit.
    pub recall_window_secs: u64,
    /// 1:1 messages only between friends (NotFriends otherwise).
    pub require_friendship: bool,
}

impl Default for MessagePolicy {
    fn default() -> Self {
        MessagePolicy { recall_window_secs: 120, require_friendship: false }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Hex key (32 bytes) for the keyed hash of account names. Empty: generated once and kept in
    /// `data_dir/name.key` with the embedded store, random per process with the memory store
    /// (whose accounts die with it) or derived from `cluster.secret` with the memory store in a
    /// cluster (every replica must find a name under the same key); the postgres store requires
    /// it.
    pub name_key: String,
    /// argon2id memory cost in KiB. Lower only for tests and benchmarks.
    pub argon2_m_kib: u32,
    /// argon2id iterations.
    pub argon2_t: u32,
    /// argon2id parallelism.
    pub argon2_p: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:7100".parse().expect("valid"),
            shards: 0,
            driver: "auto".into(),
            pin_cores: true,
            worker_threads: 0,
            store_threads: 0,
            ring_entries: 1024,
            spin_rounds: 64,
            backlog: 4096,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: "embedded".into(),
            data_dir: "tim-data".into(),
            commit_batch_max: 1024,
            commit_backlog_max: 8192,
            commit_wait_us: 0,
            commit_timeout_ms: 5000,
            load_batch_max: 256,
            synchronous: "full".into(),
            postgres: PostgresConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: 64 * 1024,
            body_bytes_max: 32 * 1024,
            large_body_bytes_max: 8 << 20,
            large_shard_bytes_max: 64 << 20,
            session_large_outbound_bytes_max: 32 << 20,
            upload_idle_timeout_ms: 30_000,
            read_buffer_bytes: 64 * 1024,
            read_buffers_pooled_max: 64,
            connections_per_shard_max: 200_000,
            inflight_per_session_max: 256,
            session_outbound_bytes_max: 4 * 1024 * 1024,
            mesh_queue_capacity: 65_536,
            mesh_overflow_max: 1 << 20,
            mesh_batch_max: 512,
            login_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            partial_frame_timeout_ms: 10_000,
            shutdown_drain_ms: 2_000,
            dedup_per_conversation_max: 256,
            dedup_window_secs: 600,
            conversations_per_shard_max: 4 << 20,
            conversation_idle_secs: 600,
            rooms_per_shard_max: 65_536,
            room_subscribers_max: 100_000,
            room_subscriptions_per_session_max: 64,
            room_publishers_max: 64,
            room_queue_frames_max: 256,
            room_idle_secs: 300,
            fanout_slice: 1024,
            fanout_jobs_max: 4096,
            group_members_max: 100_000,
            groups_per_user_max: 1000,
            group_join_requests_max: 100,
            group_text_bytes_max: 256,
            group_extra_bytes_max: 4096,
            group_add_batch_max: 1000,
            group_page_max: 1000,
            groups_per_shard_max: 1 << 20,
            group_changes_waiting_max: 256,
            answer_timeout_ms: 30_000,
            registrations_per_connection_max: 3,
            registrations_per_address_per_minute_max: 30,
            unknown_recipients_per_connection_per_minute_max: 32,
            typing_per_session_per_minute_max: 120,
            reads_per_session_per_minute_max: 600,
            receipts_live_members_max: 100,
            roster_entries_max: 5000,
            presence_text_bytes_max: 128,
            presence_extra_bytes_max: 256,
            presence_query_max: 100,
            presence_coalesce_ms: 250,
            roster_note_bytes_max: 256,
            profile_text_bytes_max: 256,
            profile_extra_bytes_max: 4096,
            profiles_per_request_max: 100,
            unknown_recipients_per_address_per_minute_max: 256,
            addresses_tracked_max: 65_536,
            rate_limit_exempt_loopback: true,
            token_ttl_secs: 300,
            tokens_per_user_max: 16,
            worker_queue_max: 4096,
            history_page_max: 200,
            history_page_bytes_max: 4 << 20,
            catchup_messages_max: 5000,
            catchup_bytes_max: 16 << 20,
            catchup_window_secs: 7 * 24 * 3600,
            cursor_flush_ms: 100,
            cursors_pending_max: 262_144,
        }
    }
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            per_account_max: 8,
            per_device_type_max: 2,
            policy: DevicePolicy::KickOldest,
            presence_auto_offline: true,
        }
    }
}

impl Default for Security {
    fn default() -> Self {
        // OWASP's argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
        Security { name_key: String::new(), argon2_m_kib: 19 * 1024, argon2_t: 2, argon2_p: 1 }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        Ok(cfg)
    }

    /// Check relations between options; called after overrides are applied.
    pub fn validate(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        for (i, d) in self.domains.iter().enumerate() {
            if d.id == 0 {
                bail!("domains: id 0 is the default domain's; give {:?} an id from 1 to 255", d.name);
            }
            let bad_name = d.name.is_empty()
                || d.name.len() > 63
                || d.name.contains('@')
                || d.name.chars().any(|c| c.is_control() || c.is_whitespace());
            if bad_name {
                bail!(
                    "domains: {:?} is not a domain name (1-63 bytes, no '@', spaces or control characters)",
                    d.name
                );
            }
            if self.domains[..i].iter().any(|o| o.id == d.id || o.name == d.name) {
                bail!("domains: {:?} (id {}) repeats another domain's name or id", d.name, d.id);
            }
        }
        if !["auto", "io_uring", "epoll"].contains(&self.server.driver.as_str()) {
            bail!("server.driver must be auto, io_uring or epoll, not {:?}", self.server.driver);
        }
        if !["memory", "embedded", "postgres"].contains(&self.store.backend.as_str()) {
            bail!("store.backend must be memory, embedded or postgres, not {:?}", self.store.backend);
        }
        if self.tls.enabled() && (self.tls.cert_file.is_none() || self.tls.key_file.is_none()) {
            bail!("tls.listen and tls.ws_listen need tls.cert_file and tls.key_file");
        }
        if let Some(a) = self.admin.listen {
            if !a.ip().is_loopback() && self.admin.token.is_empty() {
                bail!("admin.listen {a} is not a loopback address: set admin.token (or TIM_ADMIN_TOKEN)");
            }
        }
        if self.gateway.handshake_timeout_ms == 0 {
            bail!("gateway.handshake_timeout_ms must be at least 1");
        }
        if self.store.backend == "postgres" {
            let pg = &self.store.postgres;
            if pg.connections_per_partition == 0
                || pg.send_connections_per_partition == 0
                || pg.threads == 0
                || pg.connect_timeout_ms == 0
                || pg.acquire_timeout_ms == 0
                || pg.statement_timeout_ms == 0
            {
                bail!(
                    "store.postgres: connections_per_partition, send_connections_per_partition, \
                     threads, connect_timeout_ms, acquire_timeout_ms and statement_timeout_ms must be > 0"
                );
            }
            let mut owner = vec![false; tim_shards::PARTITIONS as usize];
            for p in &pg.partitions {
                let (a, b) = p.range()?;
                for slot in a..=b {
                    if std::mem::replace(&mut owner[slot as usize], true) {
                        bail!("store.postgres: partition {slot} is in two ranges");
                    }
                }
            }
            if let Some(slot) = owner.iter().position(|o| !o) {
                bail!("store.postgres: partition {slot} is in no range; the ranges must cover 0-4095");
            }
        }
        let c = &self.cluster;
        if c.enabled() {
            if c.node_id == 0 || c.node_id > crate::placement::NODE_ID_MAX {
                bail!("cluster.node_id must be within 1..={} in a cluster", crate::placement::NODE_ID_MAX);
            }
            if c.secret.len() < 16 {
                bail!("cluster.secret must be at least 16 bytes in a cluster");
            }
            if self.store.backend == "embedded" {
                bail!(
                    "the embedded store is single-node: a cluster needs store.backend = \"postgres\" \
                     (or \"memory\", no-data mode)"
                );
            }
            if self.shard_count() > crate::placement::CLUSTER_SHARDS_MAX {
                bail!("a cluster node runs at most {} shards", crate::placement::CLUSTER_SHARDS_MAX);
            }
            if c.advertise.is_none() && c.listen.is_some_and(|a| a.ip().is_unspecified()) {
                bail!("cluster.advertise is needed when cluster.listen is an unspecified address");
            }
            if c.failure_detect_ms < 200 || c.dial_timeout_ms == 0 || c.link_queue_bytes_max < 1 << 20 {
                bail!(
                    "cluster.failure_detect_ms must be at least 200, dial_timeout_ms above 0 and \
                     link_queue_bytes_max at least 1 MiB"
                );
            }
        }
        if !["full", "normal"].contains(&self.store.synchronous.as_str()) {
            bail!("store.synchronous must be full or normal");
        }
        if self.store.commit_batch_max == 0
            || self.store.commit_timeout_ms == 0
            || self.store.commit_backlog_max == 0
        {
            bail!("store.commit_batch_max, commit_backlog_max and commit_timeout_ms must be greater than 0");
        }
        if self.store.load_batch_max == 0 || self.store.load_batch_max > 4096 {
            bail!("store.load_batch_max must be within 1..=4096");
        }
        if self.store.commit_wait_us > 100_000 {
            bail!("store.commit_wait_us must be at most 100000");
        }
        if l.frame_bytes_max < 1024 || l.frame_bytes_max > 64 << 20 {
            bail!("limits.frame_bytes_max must be within 1 KiB..64 MiB");
        }
        if l.body_bytes_max + 1024 > l.frame_bytes_max {
            bail!("limits.body_bytes_max must leave 1 KiB of room under limits.frame_bytes_max");
        }
        if l.large_body_bytes_max < l.body_bytes_max || l.large_body_bytes_max > 1 << 30 {
            bail!("limits.large_body_bytes_max must be within limits.body_bytes_max..1 GiB");
        }
        if l.large_shard_bytes_max < l.large_body_bytes_max + 1024
            || l.session_large_outbound_bytes_max < l.large_body_bytes_max + 1024
        {
            bail!(
                "limits.large_shard_bytes_max and limits.session_large_outbound_bytes_max must each hold \
                 one large message (limits.large_body_bytes_max + 1 KiB)"
            );
        }
        // Answers that list a group's pending requests, or a page of members or groups, and the
        // notice of a GroupAddMembers, must each fit in one frame.
        let request_bytes = l.group_text_bytes_max + 64;
        if l.group_join_requests_max.saturating_mul(request_bytes) + 1024 > l.frame_bytes_max
            || (l.group_page_max as usize).saturating_mul(24) + 1024 > l.frame_bytes_max
            || l.group_add_batch_max.saturating_mul(8) + 1024 > l.frame_bytes_max
            || l.group_text_bytes_max.saturating_mul(3) + l.group_extra_bytes_max + 1024 > l.frame_bytes_max
        {
            bail!(
                "limits.group_join_requests_max x (group_text_bytes_max + 64), group_page_max x 24, \
                 group_add_batch_max x 8 and 3 x group_text_bytes_max + group_extra_bytes_max must \
                 each leave 1 KiB of room under limits.frame_bytes_max"
            );
        }
        if l.read_buffer_bytes < 4096 || !l.read_buffer_bytes.is_multiple_of(8) {
            bail!("limits.read_buffer_bytes must be a multiple of 8 and at least 4096");
        }
        for (name, v) in [
            ("limits.connections_per_shard_max", l.connections_per_shard_max),
            ("limits.inflight_per_session_max", l.inflight_per_session_max as usize),
            ("limits.mesh_queue_capacity", l.mesh_queue_capacity),
            ("limits.mesh_batch_max", l.mesh_batch_max),
            ("limits.dedup_per_conversation_max", l.dedup_per_conversation_max),
            ("limits.conversations_per_shard_max", l.conversations_per_shard_max),
            ("limits.rooms_per_shard_max", l.rooms_per_shard_max),
            ("limits.room_subscribers_max", l.room_subscribers_max as usize),
            ("limits.room_subscriptions_per_session_max", l.room_subscriptions_per_session_max),
            ("limits.room_queue_frames_max", l.room_queue_frames_max),
            ("limits.room_idle_secs", l.room_idle_secs as usize),
            ("limits.fanout_slice", l.fanout_slice),
            ("limits.fanout_jobs_max", l.fanout_jobs_max),
            ("limits.group_members_max", l.group_members_max),
            ("limits.groups_per_user_max", l.groups_per_user_max),
            ("limits.group_join_requests_max", l.group_join_requests_max),
            ("limits.group_text_bytes_max", l.group_text_bytes_max),
            ("limits.group_page_max", l.group_page_max as usize),
            ("limits.group_add_batch_max", l.group_add_batch_max),
            ("limits.groups_per_shard_max", l.groups_per_shard_max),
            ("limits.group_changes_waiting_max", l.group_changes_waiting_max),
            ("limits.tokens_per_user_max", l.tokens_per_user_max),
            ("limits.registrations_per_connection_max", l.registrations_per_connection_max as usize),
            (
                "limits.registrations_per_address_per_minute_max",
                l.registrations_per_address_per_minute_max as usize,
            ),
            ("limits.typing_per_session_per_minute_max", l.typing_per_session_per_minute_max as usize),
            ("limits.reads_per_session_per_minute_max", l.reads_per_session_per_minute_max as usize),
            ("limits.profile_text_bytes_max", l.profile_text_bytes_max),
            ("limits.profiles_per_request_max", l.profiles_per_request_max),
            (
                "limits.unknown_recipients_per_connection_per_minute_max",
                l.unknown_recipients_per_connection_per_minute_max as usize,
            ),
            (
                "limits.unknown_recipients_per_address_per_minute_max",
                l.unknown_recipients_per_address_per_minute_max as usize,
            ),
            ("limits.addresses_tracked_max", l.addresses_tracked_max),
            ("limits.worker_queue_max", l.worker_queue_max),
            ("sessions.per_account_max", self.sessions.per_account_max),
            ("sessions.per_device_type_max", self.sessions.per_device_type_max),
            ("limits.login_timeout_ms", l.login_timeout_ms as usize),
            ("limits.idle_timeout_ms", l.idle_timeout_ms as usize),
            ("limits.partial_frame_timeout_ms", l.partial_frame_timeout_ms as usize),
            ("limits.upload_idle_timeout_ms", l.upload_idle_timeout_ms as usize),
            ("limits.token_ttl_secs", l.token_ttl_secs as usize),
            ("limits.history_page_max", l.history_page_max as usize),
            ("limits.catchup_messages_max", l.catchup_messages_max as usize),
            ("limits.history_page_bytes_max", l.history_page_bytes_max),
            ("limits.catchup_bytes_max", l.catchup_bytes_max),
            ("limits.cursor_flush_ms", l.cursor_flush_ms as usize),
            ("limits.cursors_pending_max", l.cursors_pending_max),
        ] {
            if v == 0 {
                bail!("{name} must be greater than 0");
            }
        }
        if l.answer_timeout_ms < self.store.commit_timeout_ms + 100 {
            bail!("limits.answer_timeout_ms must exceed store.commit_timeout_ms by at least 100");
        }
        if l.session_outbound_bytes_max < l.frame_bytes_max * 2 {
            bail!("limits.session_outbound_bytes_max must be at least twice limits.frame_bytes_max");
        }
        if self.store.backend == "postgres" && self.security.name_key.is_empty() {
            bail!("security.name_key must be set with the postgres store (every node must use the same key)");
        }
        if !self.security.name_key.is_empty() {
            let key = hex::decode(&self.security.name_key).context("security.name_key is not hex")?;
            if key.len() != 32 {
                bail!("security.name_key must be 32 bytes (64 hex digits)");
            }
        }
        if self.security.argon2_m_kib < 8 * self.security.argon2_p.max(1) || self.security.argon2_t == 0 {
            bail!("security.argon2_* out of range (m_kib >= 8 * p, t >= 1)");
        }
        Ok(())
    }

    pub fn shard_count(&self) -> usize {
        if self.server.shards == 0 {
            tim_shards::runtime::available_cores()
        } else {
            self.server.shards
        }
    }
}

/// The default configuration, every option with its meaning. `tim default-config` prints it; a
/// test checks it equals [`Config::default`].
pub const DEFAULT_TOML: &str = r#"# tim configuration. Every option is shown with its default.

[server]
listen = "0.0.0.0:7100"     # binary protocol listener
shards = 0                  # executor threads; 0 = one per core
driver = "auto"             # auto (io_uring, else epoll) | io_uring | epoll
pin_cores = true            # pin each shard thread to a core
worker_threads = 0          # password hashing threads; 0 = one per shard
store_threads = 0           # store call threads; 0 = one per shard (+ one per PostgreSQL connection)
ring_entries = 1024         # io_uring submission queue entries per shard
spin_rounds = 64            # executor turns spent polling an empty mesh before parking
backlog = 4096              # listen backlog per shard

[store]
backend = "embedded"        # embedded: SQLite (WAL) under data_dir | postgres | memory: no-data mode
data_dir = "tim-data"       # directory of the embedded store
commit_batch_max = 1024     # messages committed in one transaction at most
commit_backlog_max = 8192   # messages waiting for their commit per shard and partition; then StoreUnavailable at once
commit_wait_us = 0          # a shard's commit waits this long for more messages (0: takes what is queued)
commit_timeout_ms = 5000    # a send gets StoreUnavailable if its commit takes longer
load_batch_max = 256        # conversations loaded from one partition in one go at most (first messages after a start)
synchronous = "full"        # embedded: full (survives power loss) | normal (survives a tim crash)

[store.postgres]
connections_per_partition = 4 # connections to each partition range at most, commits aside
send_connections_per_partition = 2 # more connections to each range, for commits and conversation loads only (sends never wait behind catch-ups)
connect_timeout_ms = 2000   # a connection attempt (startup and authentication included) may take this long
acquire_timeout_ms = 2000   # wait for a free pooled connection at most this long (not at all while a range is not answering)
statement_timeout_ms = 2000 # a statement may take this long (tim drops the connection; also set as the server's statement_timeout)
threads = 2                 # threads of the runtime driving the PostgreSQL connections
# Ranges of the 4096 partitions, each on its own server or database; together they cover 0-4095:
# [[store.postgres.partition]]
# slots = "0-2047"
# url = "postgres://tim@db1:5432/tim"
# [[store.postgres.partition]]
# slots = "2048-4095"
# url = "postgres://tim@db2:5432/tim"

[limits]
frame_bytes_max = 65536             # largest frame payload from a client (closes the connection)
body_bytes_max = 32768              # largest message body
large_body_bytes_max = 8388608     # largest body of a message sent in parts (a large message)
large_shard_bytes_max = 67108864   # large messages held per shard at once (uploads, unanswered sends)
session_large_outbound_bytes_max = 33554432 # large frames queued for a session before SlowConsumer
upload_idle_timeout_ms = 30000     # a large message's upload with no part for this long is dropped
read_buffer_bytes = 65536           # size of a pooled read buffer
read_buffers_pooled_max = 64        # read buffers kept per shard
connections_per_shard_max = 200000  # further connections get TooManyConnections
inflight_per_session_max = 256      # unacknowledged sends; the server stops reading at this count
session_outbound_bytes_max = 4194304 # queued output before a session is closed as SlowConsumer
mesh_queue_capacity = 65536         # slots per ordered pair of shards
mesh_overflow_max = 1048576         # envelopes held per shard while mesh queues are full; new sends wait from 1/16 of it
mesh_batch_max = 512                # envelopes handled per mesh drain
login_timeout_ms = 10000            # time to log in after connecting
idle_timeout_ms = 90000             # time without any bytes received before a session is closed
partial_frame_timeout_ms = 10000    # a frame begun must be complete within this time (IdleTimeout)
shutdown_drain_ms = 2000            # time sessions get to drain on shutdown
dedup_per_conversation_max = 256    # latest sends remembered per conversation for resend dedup
dedup_window_secs = 600             # how long a client message id is remembered
conversations_per_shard_max = 4194304 # live conversations per shard (least recently used evicted at the cap)
conversation_idle_secs = 600        # an unused conversation is evicted after this (reloaded when used)
rooms_per_shard_max = 65536         # live rooms per shard (RoomCreate beyond it: TooManyRooms)
room_subscribers_max = 100000       # subscribers per live room at most
room_subscriptions_per_session_max = 64 # rooms one session may be subscribed to
room_publishers_max = 64            # users a room's creator may list as publishers
room_queue_frames_max = 256         # room and stream messages queued per session; then the oldest are dropped (Missed)
room_idle_secs = 300                # a room without a publish for this long closes (RoomClosed)
fanout_slice = 1024                 # sessions a room message is written to in one go; then other work runs
fanout_jobs_max = 4096              # room messages waiting for a shard's fan-out; beyond it dropped (Missed)
group_members_max = 100000          # members per group (GroupFull)
groups_per_user_max = 1000          # groups one user may be in (TooManyGroups)
group_join_requests_max = 100       # pending join requests per group (TooManyJoinRequests; all listed in one frame)
group_text_bytes_max = 256          # bytes of a group name, topic, avatar URL or join note (InvalidGroup)
group_extra_bytes_max = 4096        # bytes of a group's extra data (InvalidGroup)
group_add_batch_max = 1000          # users one GroupAddMembers may add (InvalidGroup)
group_page_max = 1000               # members or groups per page
groups_per_shard_max = 1048576      # groups held in memory per shard (least recently used idle one dropped)
group_changes_waiting_max = 256     # changes queued per group behind the one being stored (Busy)
answer_timeout_ms = 30000           # a Send, login or token request unanswered this long gets Timeout
registrations_per_connection_max = 3 # Register requests per connection; then RateLimited
registrations_per_address_per_minute_max = 30 # per source address and shard; then RateLimited
unknown_recipients_per_connection_per_minute_max = 32 # sends to missing accounts; then the connection is closed
typing_per_session_per_minute_max = 120 # typing notices per session; beyond: RateLimited
reads_per_session_per_minute_max = 600 # read receipts per session; beyond: RateLimited
receipts_live_members_max = 100     # groups up to this size push read receipts live; larger: counts on request
roster_entries_max = 5000           # friends + outgoing requests + watches per user (and watchers); beyond: TooManyFriends
roster_note_bytes_max = 256         # a friend request's note; longer: InvalidRoster
presence_text_bytes_max = 128       # a presence's status text; longer: InvalidPresence
presence_extra_bytes_max = 256      # a presence's extra data; longer: InvalidPresence
presence_query_max = 100            # users one PresenceGet may ask about
presence_coalesce_ms = 250          # a user's presence changes within this window reach friends as one notice; 0 = each at once
profile_text_bytes_max = 256        # bytes of a profile's nickname, avatar URL or area (InvalidProfile)
profile_extra_bytes_max = 4096      # bytes of a profile's extra data (InvalidProfile)
profiles_per_request_max = 100      # users one ProfileGet may name (InvalidProfile)
unknown_recipients_per_address_per_minute_max = 256 # the same per source address and shard
addresses_tracked_max = 65536       # source addresses one shard counts
rate_limit_exempt_loopback = true   # loopback addresses are not limited per address
token_ttl_secs = 300                # default and greatest one-shot token lifetime
tokens_per_user_max = 16            # live one-shot tokens per account
worker_queue_max = 4096             # queued jobs per worker pool (hashing; store calls); beyond it: Busy
history_page_max = 200              # messages in one history page at most
history_page_bytes_max = 4194304    # payload bytes in one history page at most (past the first message)
catchup_messages_max = 5000         # stored messages sent to a device at login at most
catchup_bytes_max = 16777216        # payload bytes sent to a device at login at most (past the first)
catchup_window_secs = 604800        # how far back catch-up at login looks
cursor_flush_ms = 100               # delivery-ack cursors are written to the store this often
cursors_pending_max = 262144        # cursors a shard holds between flushes; acks beyond are dropped

[sessions]
per_account_max = 8                 # sessions per account
per_device_type_max = 2             # sessions per account and device type
policy = "kick_oldest"              # kick_oldest | refuse
presence_auto_offline = true        # the last session's end makes the user offline (else its presence stays)

[messages]
recall_window_secs = 120            # a message may be recalled this long after it was sent; 0 = no limit
require_friendship = false          # 1:1 messages only between friends

[security]
name_key = ""                       # 64 hex digits keying the account-name hash; "" = kept in data_dir/name.key (memory store: random, or from cluster.secret in a cluster)
                                    # (embedded), random per process (memory); required with postgres
argon2_m_kib = 19456                # argon2id memory cost (KiB); lower only for tests/benchmarks
argon2_t = 2                        # argon2id iterations
argon2_p = 1                        # argon2id lanes

[cluster]                           # clustered when listen or join is set (docs/CLUSTER.md)
node_id = 0                         # 1..=63, unique in the cluster; required in a cluster
# listen = "0.0.0.0:7200"           # where peers dial this node; unset: it only dials out
# advertise = "10.0.0.5:7200"       # the address peers dial (default: listen)
join = []                           # members' cluster addresses to join through (--join adds)
secret = ""                         # shared by every node, 16+ bytes (or TIM_CLUSTER_SECRET)
failure_detect_ms = 2000            # a node silent this long is taken as failed; its partitions move
link_queue_bytes_max = 67108864     # bytes queued for one peer; beyond: dropped (requests: NodeUnavailable)
dial_timeout_ms = 1000              # connecting and the handshake of a link
join_wait_ms = 5000                 # tim serve waits this long for a member to answer its join
resync_spread_ms = 1000             # after a node failed, each shard's sessions catch up over this long

[gateway]
ws_listen = "0.0.0.0:7180"          # WebSocket (path /ws, docs/JSON.md) and the web chat page (/); "" = off
handshake_timeout_ms = 10000        # a WebSocket upgrade or TLS handshake must finish within this

[tls]                               # TLS listeners need both files; SIGHUP reloads them
# cert_file = "/etc/tim/cert.pem"   # certificate chain (PEM), leaf first
# key_file = "/etc/tim/key.pem"     # private key (PEM: PKCS#8, PKCS#1 or SEC1)
# listen = "0.0.0.0:7443"           # binary protocol over TLS
# ws_listen = "0.0.0.0:7543"        # WebSocket over TLS (wss://HOST:7543/ws, https://HOST:7543/)

[admin]                             # the admin HTTP API, /metrics, /healthz, /readyz (docs/ADMIN.md)
listen = "127.0.0.1:7190"           # "" = off; an address other than loopback needs a token
token = ""                          # bearer token for every request but the health checks (or TIM_ADMIN_TOKEN)
metrics = true                      # count messages, acks and latencies per shard (false: not on the message path)

# Tenants (PROTOCOL 8.17): accounts named NAME@DOMAIN belong to that domain; nothing crosses
# domains. Each needs a fixed id (1-255, never reused: it is part of its users' and groups' ids).
# [[domains]]
# name = "acme.example"
# id = 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented default file parses to exactly the built-in defaults, and validates.
    #[test]
    fn default_toml_matches_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
        parsed.validate().unwrap();
    }

    /// README.md shows the whole default file: every option line of it, verbatim.
    #[test]
    fn readme_shows_every_option() {
        let readme = include_str!("../README.md");
        for line in DEFAULT_TOML.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            assert!(readme.contains(line), "README.md lacks config line {line:?}");
        }
    }

    /// Unknown options and broken relations are refused with a message naming the option.
    #[test]
    fn rejects_bad_config() {
        assert!(toml::from_str::<Config>("[limits]\nframe_bytes_mx = 1").is_err());
        let mut c = Config::default();
        c.limits.body_bytes_max = c.limits.frame_bytes_max;
        assert!(c.validate().unwrap_err().to_string().contains("body_bytes_max"));
    }
}
