//! The command line ([`Args`], parsed by clap) and the checked run configuration built from it
//! ([`Config`]): resolved server addresses, the source address list, users, window or rate.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

use crate::server_cpu::ServerCpu;

/// Connections one user can hold with the server's default session policy
/// (`sessions.per_account_max` = 8; `per_device_type_max` = 2 × 5 device types = 10).
pub const SESSIONS_PER_USER_DEFAULT: u32 = 8;
/// Connection indices fit in 20 bits of a client message id.
pub const CONNECTIONS_MAX: u32 = 1 << 20;
const _: () = assert!(CONNECTIONS_MAX <= crate::ledger::TEXT_CONNECTIONS_MAX);
/// Device types of protocol v1 (0..=4).
pub const DEVICE_TYPES: u8 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// Each connection sends 1:1 messages to a peer user; every delivery is checked.
    OneToOne,
    /// Logged-in connections held open with pings (server memory per idle connection).
    Idle,
    /// Connect, log in, log out, as fast as possible.
    LoginStorm,
    /// Send frames to an `echo-limit` server and count the echoes (no login).
    Echo,
    /// Live rooms: connection c is in room c % rooms; each room's first connection creates it
    /// and publishes, the others subscribe; every delivery and Missed count is checked.
    Room,
    /// Groups: connection c is member c / groups of group c % groups (one user each); each
    /// group's first member creates it, the others join; its first --senders members send
    /// group messages; every delivery to every other member is checked, per group.
    Group,
}

impl ScenarioName {
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioName::OneToOne => "one-to-one",
            ScenarioName::Idle => "idle",
            ScenarioName::LoginStorm => "login-storm",
            ScenarioName::Echo => "echo",
            ScenarioName::Room => "room",
            ScenarioName::Group => "group",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PeerChoice {
    /// User i writes to user (i + 1) % users.
    Fixed,
    /// Each message goes to a random other user.
    Random,
}

/// How open-loop sends are timed (`--pacer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PacerArg {
    /// `spin` when --server-pid shows the server on other CPUs than the loadgen, else `timer`.
    Auto,
    /// Poll the clock between sends: precise to a few µs, but keeps each loadgen thread's core
    /// busy, taking it from a server (or database) that shares it.
    Spin,
    /// Sleep on a high-resolution kernel timer: costs no CPU while waiting; each wake-up adds
    /// the scheduler's wake-up latency (tens of µs here) to the measured latencies.
    Timer,
}

/// The pacing a run uses, `--pacer auto` resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacing {
    Spin,
    Timer,
}

/// How connections reach the server (`--transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Protocol v1 frames over TCP (`[server] listen`).
    Tcp,
    /// WebSocket (`[gateway] ws_listen`, path `/ws`, subprotocol `tim.v1`): binary messages
    /// carrying v1 frames, each flush of a connection's queue as one message.
    WsBinary,
    /// WebSocket with subprotocol `tim.json`: every request one JSON text, every server frame
    /// read from a JSON text (docs/JSON.md).
    WsJson,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::WsBinary => "ws-binary",
            Transport::WsJson => "ws-json",
        }
    }

    pub fn is_websocket(self) -> bool {
        self != Transport::Tcp
    }
}

/// How message bodies travel in JSON (`--json-body`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum JsonBody {
    /// Text: the ledger header is written in printable characters, so bodies go as `"body"`
    /// strings, as a chat client's would.
    Text,
    /// Bytes: the binary ledger header, so bodies are not UTF-8 and go as `"body_b64"`
    /// (base64 both ways, on the server too).
    Base64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DriverArg {
    Auto,
    IoUring,
    Epoll,
}

/// tim-loadgen: a thread-per-core client swarm for tim, with a delivery ledger.
///
/// Users are named `{prefix}-{i}`; connection c belongs to user c % users and is that user's
/// (c / users)-th connection, which logs in with device type (device-type + c / users) % 5. The
/// server's `sessions.per_account_max` (default 8) and `per_device_type_max` (default 2 per
/// type) bound the connections one user can hold: with more, the server kicks older sessions.
#[derive(Parser, Debug, Clone)]
#[command(name = "tim-loadgen", version)]
pub struct Args {
    /// Server address HOST:PORT. Repeatable (the nodes of a cluster): connection i uses
    /// address i mod n, in every scenario, and reconnects go round the list (--reconnect).
    /// With a WebSocket --transport, the server's `[gateway] ws_listen` address.
    /// [default: 127.0.0.1:7100; WebSocket: 127.0.0.1:7180]
    #[arg(long = "addr", value_name = "HOST:PORT")]
    pub addrs: Vec<String>,
    /// How connections reach the server: tcp (protocol v1 frames), ws-binary (v1 frames in
    /// WebSocket binary messages) or ws-json (JSON texts over WebSocket, docs/JSON.md). The
    /// WebSocket transports connect to `ws://ADDR/ws`; ws-json runs one-to-one, idle and
    /// login-storm, ws-binary every scenario but echo.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// ws-json: message bodies as JSON text (the ledger header in printable characters) or
    /// as base64 (`body_b64`, the binary ledger header).
    #[arg(long, value_enum, default_value = "text")]
    pub json_body: JsonBody,
    /// Reconnect (one-to-one, group, echo; on by default with more than one --addr): when a
    /// connection fails or the server closes it during the run, it waits a backoff (50 ms,
    /// doubling up to 1 s, jittered), connects to the next address of the list, logs in again
    /// as the same user and device (password login), resends its unacknowledged messages with
    /// the same client message ids, and goes on; the server's catch-up (durable store) brings
    /// what it missed. Open loop: sends due while it is down are skipped (skipped_while_down);
    /// closed loop: it pauses. A delivery received again after a reconnect (its first copy
    /// before it, or one copy in the new login's catch-up) counts as redelivered, not
    /// duplicated.
    #[arg(long, conflicts_with = "no_reconnect")]
    pub reconnect: bool,
    /// Do not reconnect: a connection that fails during the run stays down.
    #[arg(long)]
    pub no_reconnect: bool,
    /// Seconds a reconnecting connection keeps trying (every address down) before it gives up;
    /// a connection that gave up fails the run.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub reconnect_give_up: f64,
    /// What the connections do.
    #[arg(long, value_enum, default_value = "one-to-one")]
    pub scenario: ScenarioName,
    /// Connections (login-storm: concurrent workers) [default: 100; group: groups × members].
    #[arg(long)]
    pub connections: Option<u32>,
    /// Distinct users (accounts); default: one per connection. At most --connections.
    #[arg(long)]
    pub users: Option<u32>,
    /// Seconds of measured load (after every connection has logged in).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Message body size in bytes (at least 32: the ledger header).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Open loop: messages per second over all connections (room: publishes per second over
    /// all rooms; group: messages per second over all senders). With --window too, the window
    /// caps each connection's unacknowledged messages.
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,
    /// Closed loop: unacknowledged messages kept in flight per connection (default 16; room:
    /// per publisher, a message being done once the room's probe subscriber has it or was told
    /// it missed it).
    #[arg(long)]
    pub window: Option<u32>,
    /// Room: live rooms; connection c is in room c % rooms (at least 2 connections per room).
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Group: groups; connection c is member c / groups of group c % groups.
    #[arg(long, default_value_t = 1)]
    pub groups: u32,
    /// Group: members per group, one user with one session each (at least 2) [default:
    /// --connections / --groups].
    #[arg(long)]
    pub members: Option<u32>,
    /// Group: members of each group that send messages (its first ones; the first one creates
    /// the group); the others only receive.
    #[arg(long, default_value_t = 1)]
    pub senders: u32,
    /// Group: offline members per group, on top of --members: before the online members join,
    /// this many more users per group are registered (no session kept) and added by the
    /// group's creator with `GroupAddMembers`, in batches of at most 1,000.
    #[arg(long, default_value_t = 0)]
    pub offline_members: u32,
    /// Group: Register requests per connection while registering offline members (the server
    /// allows `registrations_per_connection_max`, 3 by default), over
    /// --register-concurrency connections at once.
    #[arg(long, default_value_t = 3)]
    pub register_per_connection: u32,
    /// Group: connections registering offline members at once (per group).
    #[arg(long, default_value_t = 32)]
    pub register_concurrency: u32,
    /// Local addresses to bind outgoing connections to, round-robin: a range
    /// `127.0.0.2-127.0.0.9` or a comma-separated list.
    #[arg(long, value_name = "ADDRS")]
    pub source_addrs: Option<String>,
    /// Print one line of JSON with the results last on stdout.
    #[arg(long)]
    pub json: bool,
    /// Executor threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Password of every user.
    #[arg(long, default_value = "tim-loadgen-password")]
    pub password: String,
    /// User name prefix: users are `{prefix}-{i}`.
    #[arg(long, default_value = "lg")]
    pub user_prefix: String,
    /// Device type of each user's first connection; further ones take the next types.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..5))]
    pub device_type: u8,
    /// Recipient choice for one-to-one.
    #[arg(long, value_enum, default_value = "fixed")]
    pub peer: PeerChoice,
    /// One-to-one: before the measured run each user becomes friends with N others (N even;
    /// --users at least N + 1): user u sends a RosterAction REQUEST to the N/2 users after it
    /// (u + 1 ..= u + N/2, mod --users) and ACCEPTs the requests of the N/2 before it, over
    /// the protocol, on its first connection. A user's presence changes reach its friends'
    /// sessions (PresenceNotice).
    #[arg(long, default_value_t = 0)]
    pub friends: u32,
    /// One-to-one: the fraction of each connection's operations (messages, presence changes,
    /// typing notices) that are presence changes: a PresenceSet alternating AWAY and ONLINE
    /// with a short status text, answered by PresenceList and pushed by the server to every
    /// session of the user's friends (and to the user's other sessions) as a PresenceNotice.
    /// Closed loop: an unanswered PresenceSet counts against --window like a message; open
    /// loop: --rate is then operations per second.
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    pub presence_share: f64,
    /// One-to-one: the fraction of each connection's operations that are Typing (state 1) to
    /// the peer of its next message (TypingNotice to the peer's sessions). Not answered; the
    /// server refuses more than `limits.typing_per_session_per_minute_max` (default 120) per
    /// session per minute with RateLimited (counted as errors and as typing_refused).
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    pub typing_share: f64,
    /// Seconds after the duration during which acks and deliveries are still collected.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,
    /// Seconds allowed for connecting and logging in every connection.
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,
    /// Connection setups (connect + login) in progress at once, over all threads.
    #[arg(long, default_value_t = 256)]
    pub setup_concurrency: u32,
    /// Milliseconds one TCP connect may take.
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Connect attempts per connection before it counts as failed.
    #[arg(long, default_value_t = 3)]
    pub connect_attempts: u32,
    /// Milliseconds before a send refused with Busy/Internal is resent (same client_msg_id).
    #[arg(long, default_value_t = 20)]
    pub retry_ms: u64,
    /// Resends of one message before it is given up.
    #[arg(long, default_value_t = 50)]
    pub retries_max: u32,
    /// Idle: milliseconds between pings (default: a third of LoginOk.idle_timeout_ms).
    #[arg(long)]
    pub ping_ms: Option<u64>,
    /// Refuse to start when a user would need more connections than this (the server's
    /// session limits; see above).
    #[arg(long, default_value_t = SESSIONS_PER_USER_DEFAULT)]
    pub sessions_per_user_max: u32,
    /// I/O driver of the executors.
    #[arg(long, value_enum, default_value = "auto")]
    pub driver: DriverArg,
    /// How open-loop sends (--rate) are timed: spin, timer, or auto (spin only when --server-pid
    /// shows that the server cannot run on the loadgen's CPUs, e.g. both under taskset on
    /// different cores; else timer, so the loadgen never takes CPU the server could use).
    #[arg(long, value_enum, default_value = "auto")]
    pub pacer: PacerArg,
    /// Pin executor threads to cores (off by default: the server usually shares the machine).
    #[arg(long)]
    pub pin: bool,
    /// Do not acknowledge deliveries (by default receivers send a DeliveryAck per conversation
    /// and read batch, as real clients do).
    #[arg(long)]
    pub no_delivery_acks: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// PID of the server, on this machine: report the CPU time it used in the measured window
    /// (user + system over all its threads, from /proc/PID/stat) as server_cpu_s, the cores it
    /// kept busy on average (server_cpu_util), and server_cpu_us_per_msg: server CPU µs per
    /// delivered message, the denominator being the delivered messages (`delivered`), so one
    /// message's send, ack and delivery count as one (none without deliveries).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
}

/// Whether sends are paced (open loop) or bounded by a window (closed loop).
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Keep `window` messages in flight per connection.
    Closed { window: u32 },
    /// `rate` messages per second over all connections; at most `cap` in flight per connection.
    Open { rate: f64, cap: u32 },
}

/// The checked configuration of a run.
#[derive(Clone, Debug)]
pub struct Config {
    pub scenario: ScenarioName,
    pub transport: Transport,
    /// Bodies start with the ledger header in printable characters (ws-json, `--json-body
    /// text`), so that they are UTF-8 text.
    pub text_bodies: bool,
    pub addrs: Vec<SocketAddr>,
    /// `--addr` as given (the WebSocket handshake's `Host`), in `addrs` order.
    pub hosts: Vec<String>,
    pub sources: Vec<IpAddr>,
    pub connections: u32,
    pub users: u32,
    pub threads: usize,
    pub duration: Duration,
    pub drain: Duration,
    pub setup_timeout: Duration,
    pub setup_concurrency: u32,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub body_bytes: usize,
    pub load: Load,
    /// Room: live rooms.
    pub rooms: u32,
    /// Group: groups, members per group, senders per group.
    pub groups: u32,
    pub members: u32,
    pub senders: u32,
    /// Group: offline members per group, and how they are registered.
    pub offline_members: u32,
    pub register_per_connection: u32,
    pub register_concurrency: u32,
    pub peer: PeerChoice,
    /// One-to-one: friends per user (set up before the run), and the shares of operations
    /// that are presence changes and typing notices.
    pub friends: u32,
    pub presence_share: f64,
    pub typing_share: f64,
    pub password: String,
    pub user_prefix: String,
    pub device_type: u8,
    pub retry: Duration,
    pub retries_max: u32,
    pub ping: Option<Duration>,
    pub driver: DriverArg,
    pub pacing: Pacing,
    pub pin: bool,
    pub json: bool,
    pub quiet: bool,
    pub delivery_acks: bool,
    /// Reconnect failed connections (message scenarios), and for how long at most.
    pub reconnect: bool,
    pub reconnect_give_up: Duration,
    /// The server process whose CPU time is measured (--server-pid).
    pub server_cpu: Option<ServerCpu>,
}

/// In-flight cap per connection in open loop when no --window is given.
const OPEN_LOOP_CAP_DEFAULT: u32 = 4096;

impl Config {
    pub fn from_args(a: Args) -> anyhow::Result<Config> {
        let mut hosts = a.addrs.clone();
        if hosts.is_empty() {
            hosts.push(if a.transport.is_websocket() { "127.0.0.1:7180" } else { "127.0.0.1:7100" }.into());
        }
        let mut addrs = Vec::new();
        for s in &hosts {
            let addr = s
                .to_socket_addrs()
                .with_context(|| format!("resolving --addr {s}"))?
                .next()
                .with_context(|| format!("--addr {s} resolves to nothing"))?;
            addrs.push(addr);
        }
        let sources = match &a.source_addrs {
            Some(s) => parse_sources(s)?,
            None => Vec::new(),
        };
        if let Some(bad) = sources.iter().find(|ip| addrs.iter().any(|a| a.is_ipv4() != ip.is_ipv4())) {
            bail!("--source-addrs {bad} is not of the same family as every --addr");
        }
        let (connections, members) = if a.scenario == ScenarioName::Group {
            group_shape(&a)?
        } else {
            (a.connections.unwrap_or(CONNECTIONS_DEFAULT), 0)
        };
        if connections == 0 || connections > CONNECTIONS_MAX {
            bail!("--connections must be within 1..={CONNECTIONS_MAX}");
        }
        let users = a.users.unwrap_or(connections);
        if users == 0 || users > connections {
            bail!("--users must be within 1..=--connections ({connections})");
        }
        if a.offline_members > 0 && a.scenario != ScenarioName::Group {
            bail!("--offline-members is for --scenario group");
        }
        if a.scenario == ScenarioName::Group && users != connections {
            bail!("group: every member is a user of its own (--users must be --connections, {connections})");
        }
        let per_user = connections.div_ceil(users);
        let needs_sessions = a.scenario != ScenarioName::Echo;
        if needs_sessions && per_user > a.sessions_per_user_max {
            bail!(
                "{} connections over {users} users is {per_user} sessions per user, over the {} a \
                 user can hold (the server's sessions.per_account_max / per_device_type_max; raise \
                 --users, or --sessions-per-user-max if the server allows more)",
                connections,
                a.sessions_per_user_max
            );
        }
        let ok = |x: f64, zero_ok: bool| x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0));
        if !ok(a.duration, false) || !ok(a.setup_timeout, false) {
            bail!("--duration and --setup-timeout must be positive");
        }
        if !ok(a.drain, true) {
            bail!("--drain must not be negative");
        }
        if a.body_bytes < crate::ledger::BODY_HEADER_BYTES {
            bail!("--body-bytes must be at least {} (the ledger header)", crate::ledger::BODY_HEADER_BYTES);
        }
        let load = match (a.rate, a.window) {
            (Some(rate), window) => {
                if !(rate > 0.0 && rate.is_finite()) {
                    bail!("--rate must be positive");
                }
                Load::Open { rate, cap: window.unwrap_or(OPEN_LOOP_CAP_DEFAULT).max(1) }
            }
            (None, Some(0)) => bail!("--window must be at least 1"),
            (None, window) => Load::Closed { window: window.unwrap_or(16) },
        };
        if a.scenario == ScenarioName::Room && (a.rooms == 0 || connections < a.rooms.saturating_mul(2)) {
            bail!(
                "--rooms must be at least 1, with at least 2 connections per room (a publisher and a \
                 subscriber): --connections {} allows at most {}",
                connections,
                connections / 2
            );
        }
        check_side_ops(&a, users)?;
        check_transport(&a)?;
        let threads = a.threads.unwrap_or_else(tim_shards::runtime::available_cores).max(1);
        if a.password.len() < 8 {
            bail!("--password must have at least 8 bytes (the server's password rule)");
        }
        let reconnects_supported =
            matches!(a.scenario, ScenarioName::OneToOne | ScenarioName::Group | ScenarioName::Echo);
        if a.reconnect && !reconnects_supported {
            bail!("--reconnect is for the message scenarios (one-to-one, group, echo)");
        }
        let reconnect = reconnects_supported && !a.no_reconnect && (a.reconnect || addrs.len() > 1);
        if !ok(a.reconnect_give_up, false) {
            bail!("--reconnect-give-up must be positive");
        }
        let server_cpu = a.server_pid.map(ServerCpu::open).transpose()?;
        let pacing = match a.pacer {
            PacerArg::Spin => Pacing::Spin,
            PacerArg::Timer => Pacing::Timer,
            PacerArg::Auto => match a.server_pid {
                Some(pid) if cpus_disjoint(&tim_shards::runtime::allowed_cpus(), &server_cpus(pid)) => {
                    Pacing::Spin
                }
                _ => Pacing::Timer,
            },
        };
        Ok(Config {
            scenario: a.scenario,
            transport: a.transport,
            text_bodies: a.transport == Transport::WsJson && a.json_body == JsonBody::Text,
            addrs,
            hosts,
            sources,
            connections,
            users,
            threads: threads.min(connections as usize),
            duration: Duration::from_secs_f64(a.duration),
            drain: Duration::from_secs_f64(a.drain),
            setup_timeout: Duration::from_secs_f64(a.setup_timeout),
            setup_concurrency: a.setup_concurrency.max(1),
            connect_timeout: Duration::from_millis(a.connect_timeout_ms.max(1)),
            connect_attempts: a.connect_attempts.max(1),
            body_bytes: a.body_bytes,
            load,
            rooms: a.rooms,
            groups: a.groups,
            members,
            senders: a.senders,
            offline_members: a.offline_members,
            register_per_connection: a.register_per_connection.max(1),
            register_concurrency: a.register_concurrency.max(1),
            peer: a.peer,
            friends: a.friends,
            presence_share: a.presence_share,
            typing_share: a.typing_share,
            password: a.password,
            user_prefix: a.user_prefix,
            device_type: a.device_type,
            retry: Duration::from_millis(a.retry_ms),
            retries_max: a.retries_max,
            ping: a.ping_ms.map(|ms| Duration::from_millis(ms.max(1))),
            driver: a.driver,
            pacing,
            pin: a.pin,
            json: a.json,
            quiet: a.quiet,
            delivery_acks: !a.no_delivery_acks,
            reconnect,
            reconnect_give_up: Duration::from_secs_f64(a.reconnect_give_up),
            server_cpu,
        })
    }

    /// The user connection `conn` belongs to.
    #[inline]
    pub fn user_of(&self, conn: u32) -> u32 {
        conn % self.users
    }

    /// Which of its user's connections `conn` is (0 = the first, which registers the user).
    #[inline]
    pub fn rank_of(&self, conn: u32) -> u32 {
        conn / self.users
    }

    pub fn user_name(&self, user: u32) -> String {
        format!("{}-{user}", self.user_prefix)
    }

    /// Device type of connection `conn`: consecutive connections of a user take consecutive types.
    pub fn device_type_of(&self, conn: u32) -> u8 {
        ((self.device_type as u32 + self.rank_of(conn)) % DEVICE_TYPES as u32) as u8
    }

    /// The index in `addrs` of the server address for connection `conn`, attempt `n` (for
    /// workers that connect again): round robin from address `conn mod addrs`.
    pub fn addr_index(&self, conn: u32, n: u64) -> usize {
        ((conn as u64 + n) % self.addrs.len() as u64) as usize
    }

    /// Local address to bind for connection `conn` (attempt `n`), if any were given.
    pub fn source_for(&self, conn: u32, n: u64) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        Some(self.sources[((conn as u64 + n * self.connections as u64) % self.sources.len() as u64) as usize])
    }
}

/// Which scenarios a transport runs: echo servers speak TCP only; the JSON mapping of the
/// loadgen covers accounts, sessions and 1:1 messages (not rooms and groups).
fn check_transport(a: &Args) -> anyhow::Result<()> {
    match (a.transport, a.scenario) {
        (Transport::Tcp, _) => {}
        (_, ScenarioName::Echo) => bail!("--scenario echo runs over --transport tcp only (echo-limit has no WebSocket)"),
        (Transport::WsJson, ScenarioName::Room | ScenarioName::Group) => bail!(
            "--transport ws-json runs one-to-one, idle and login-storm; --scenario {} runs over tcp or ws-binary",
            a.scenario.as_str()
        ),
        _ => {}
    }
    if a.json_body != JsonBody::Text && a.transport != Transport::WsJson {
        bail!("--json-body is for --transport ws-json");
    }
    Ok(())
}

/// One-to-one's friends, presence changes and typing notices.
fn check_side_ops(a: &Args, users: u32) -> anyhow::Result<()> {
    let (p, t) = (a.presence_share, a.typing_share);
    let used = a.friends > 0 || p != 0.0 || t != 0.0;
    if used && a.scenario != ScenarioName::OneToOne {
        bail!("--friends, --presence-share and --typing-share are for --scenario one-to-one");
    }
    if used && a.transport != Transport::Tcp {
        bail!("--friends, --presence-share and --typing-share run over --transport tcp");
    }
    if !a.friends.is_multiple_of(2) {
        bail!("--friends must be even (each user asks the N/2 users after it and accepts the N/2 before it)");
    }
    if a.friends > 0 && users < a.friends + 1 {
        bail!("--friends {} needs at least {} users (--users {users})", a.friends, a.friends + 1);
    }
    let share_ok = |x: f64| x.is_finite() && (0.0..1.0).contains(&x);
    if !share_ok(p) || !share_ok(t) || p + t >= 1.0 {
        bail!("--presence-share and --typing-share must be within 0..1, their sum below 1");
    }
    Ok(())
}

/// Connections when --connections is not given.
const CONNECTIONS_DEFAULT: u32 = 100;

/// Group: (connections, members per group) from --groups, --members and --connections, which
/// must agree: connections = groups × members.
fn group_shape(a: &Args) -> anyhow::Result<(u32, u32)> {
    if a.groups == 0 {
        bail!("--groups must be at least 1");
    }
    let members = match (a.members, a.connections) {
        (Some(m), _) => m,
        (None, c) => c.unwrap_or(CONNECTIONS_DEFAULT) / a.groups,
    };
    if members < 2 {
        bail!("--members must be at least 2 (a sender and a member to deliver to)");
    }
    let connections = a
        .groups
        .checked_mul(members)
        .filter(|&c| c <= CONNECTIONS_MAX)
        .with_context(|| format!("--groups × --members must be at most {CONNECTIONS_MAX}"))?;
    if a.connections.is_some_and(|c| c != connections) {
        bail!(
            "--connections {} is not --groups × --members ({} × {members} = {connections}); leave it out",
            a.connections.unwrap_or(0),
            a.groups
        );
    }
    if a.senders == 0 || a.senders > members {
        bail!("--senders must be within 1..=--members ({members})");
    }
    Ok((connections, members))
}

/// `127.0.0.2-127.0.0.9` (IPv4 range, inclusive) or `a,b,c` (any addresses).
pub fn parse_sources(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((lo, hi)) = part.split_once('-') {
            let lo: Ipv4Addr = lo.trim().parse().with_context(|| format!("bad address {lo:?}"))?;
            let hi: Ipv4Addr = hi.trim().parse().with_context(|| format!("bad address {hi:?}"))?;
            let (lo, hi) = (u32::from(lo), u32::from(hi));
            if hi < lo || hi - lo >= 1 << 16 {
                bail!("bad source address range {part:?}");
            }
            out.extend((lo..=hi).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(part.parse().with_context(|| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        bail!("--source-addrs names no address");
    }
    Ok(out)
}

/// The CPUs any thread of process `pid` may run on (the union of its threads'
/// `Cpus_allowed_list`); empty if unknown.
fn server_cpus(pid: u32) -> Vec<usize> {
    let mut cpus = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return cpus };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else { continue };
        if let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) {
            cpus.extend(parse_cpu_list(list.trim()));
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Parse a kernel CPU list such as `0-3,8,10-11`; items that do not parse are skipped.
pub fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let range: Option<(usize, usize)> = match part.split_once('-') {
            Some((a, b)) => a.parse().ok().zip(b.parse().ok()),
            None => part.parse().ok().map(|c| (c, c)),
        };
        if let Some((a, b)) = range {
            out.extend(a..=b);
        }
    }
    out
}

/// Whether two known, non-empty CPU sets have no CPU in common.
pub fn cpus_disjoint(a: &[usize], b: &[usize]) -> bool {
    !a.is_empty() && !b.is_empty() && a.iter().all(|c| !b.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges are inclusive and lists may mix in single addresses.
    #[test]
    fn sources() {
        let v = parse_sources("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(parse_sources("127.0.0.2, 127.0.0.7").unwrap().len(), 2);
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_sources("").is_err());
    }

    /// A room run needs a publisher and a subscriber per room.
    #[test]
    fn room_args() {
        let cfg = |extra: &[&str]| {
            let mut argv = vec!["tim-loadgen", "--scenario", "room", "--threads", "1"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::parse_from(argv))
        };
        let ok = cfg(&["--connections", "8", "--rooms", "4"]).unwrap();
        assert_eq!((ok.rooms, ok.scenario), (4, ScenarioName::Room));
        assert!(matches!(ok.load, Load::Closed { window: 16 }));
        assert_eq!(cfg(&["--connections", "3"]).unwrap().rooms, 1, "one room by default");
        assert!(cfg(&["--connections", "7", "--rooms", "4"]).is_err());
        assert!(cfg(&["--connections", "8", "--rooms", "0"]).is_err());
        let open = cfg(&["--connections", "8", "--rooms", "2", "--rate", "1000"]).unwrap();
        assert!(matches!(open.load, Load::Open { rate, .. } if rate == 1000.0));
    }

    /// A group run: connections = groups × members, one user each, 1 ≤ senders ≤ members.
    #[test]
    fn group_args() {
        let cfg = |extra: &[&str]| {
            let mut argv = vec!["tim-loadgen", "--scenario", "group", "--threads", "1"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::parse_from(argv))
        };
        let ok = cfg(&["--groups", "4", "--members", "250", "--senders", "2"]).unwrap();
        assert_eq!((ok.connections, ok.users, ok.groups, ok.members, ok.senders), (1000, 1000, 4, 250, 2));
        let ok = cfg(&["--groups", "2", "--connections", "10"]).unwrap();
        assert_eq!((ok.connections, ok.members, ok.senders), (10, 5, 1));
        assert_eq!(cfg(&[]).unwrap().members, 100, "one group of the default 100 connections");
        assert!(cfg(&["--groups", "2", "--members", "5", "--connections", "11"]).is_err());
        assert!(cfg(&["--members", "1"]).is_err());
        assert!(cfg(&["--members", "4", "--senders", "5"]).is_err());
        assert!(cfg(&["--members", "4", "--senders", "0"]).is_err());
        assert!(cfg(&["--members", "4", "--users", "2"]).is_err());
        assert!(cfg(&["--groups", "0"]).is_err());
        let off = cfg(&["--members", "10", "--offline-members", "90"]).unwrap();
        assert_eq!((off.connections, off.members, off.offline_members), (10, 10, 90));
        assert_eq!((off.register_per_connection, off.register_concurrency), (3, 32));
        let other = ["tim-loadgen", "--scenario", "one-to-one", "--offline-members", "1"];
        assert!(Config::from_args(Args::parse_from(other)).is_err());
    }

    /// Reconnect is on by default with several addresses (message scenarios only), off with
    /// one unless asked for; --no-reconnect turns it off. Connection i starts on address i mod n
    /// and goes round the list.
    #[test]
    fn reconnect_args() {
        let cfg = |extra: &[&str]| {
            let mut argv = vec!["tim-loadgen", "--threads", "1"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv)?)
        };
        let two = ["--addr", "127.0.0.1:7100", "--addr", "127.0.0.1:7101"];
        let c = cfg(&two).unwrap();
        assert!(c.reconnect);
        assert_eq!(c.reconnect_give_up, Duration::from_secs(30));
        assert_eq!((c.addr_index(0, 0), c.addr_index(1, 0), c.addr_index(2, 0)), (0, 1, 0));
        assert_eq!((c.addr_index(1, 1), c.addr_index(1, 2)), (0, 1), "round robin from its own");
        assert!(!cfg(&[&two[..], &["--no-reconnect"]].concat()).unwrap().reconnect);
        assert!(!cfg(&[]).unwrap().reconnect, "one address: off by default");
        let one = cfg(&["--reconnect", "--reconnect-give-up", "2.5"]).unwrap();
        assert!(one.reconnect);
        assert_eq!(one.reconnect_give_up, Duration::from_millis(2500));
        assert!(cfg(&["--reconnect", "--no-reconnect"]).is_err());
        assert!(cfg(&["--reconnect-give-up", "0"]).is_err());
        let group = cfg(&[&two[..], &["--scenario", "group", "--members", "2"]].concat()).unwrap();
        assert!(group.reconnect);
        let room = cfg(&[&two[..], &["--scenario", "room", "--connections", "4"]].concat()).unwrap();
        assert!(!room.reconnect, "rooms do not reconnect");
        assert!(cfg(&["--scenario", "idle", "--reconnect"]).is_err());
    }

    /// WebSocket transports: their default address, the scenarios each runs, text bodies.
    #[test]
    fn transport_args() {
        let cfg = |extra: &[&str]| {
            let mut argv = vec!["tim-loadgen", "--threads", "1"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv)?)
        };
        let tcp = cfg(&[]).unwrap();
        assert_eq!((tcp.transport, tcp.addrs[0].port(), tcp.text_bodies), (Transport::Tcp, 7100, false));
        let json = cfg(&["--transport", "ws-json"]).unwrap();
        assert_eq!(
            (json.addrs[0].port(), json.hosts[0].as_str(), json.text_bodies),
            (7180, "127.0.0.1:7180", true)
        );
        assert!(!cfg(&["--transport", "ws-json", "--json-body", "base64"]).unwrap().text_bodies);
        assert!(cfg(&["--json-body", "base64"]).is_err(), "JSON bodies need ws-json");
        let bin = cfg(&["--transport", "ws-binary", "--addr", "localhost:9000"]).unwrap();
        assert_eq!((bin.hosts[0].as_str(), bin.text_bodies), ("localhost:9000", false));
        assert!(cfg(&["--transport", "ws-binary", "--scenario", "room", "--connections", "4"]).is_ok());
        assert!(cfg(&["--transport", "ws-json", "--scenario", "room", "--connections", "4"]).is_err());
        assert!(cfg(&["--transport", "ws-json", "--scenario", "group", "--members", "2"]).is_err());
        assert!(cfg(&["--transport", "ws-binary", "--scenario", "echo"]).is_err());
        assert!(cfg(&["--transport", "ws-json", "--scenario", "login-storm"]).is_ok());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5, 7-8"), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(parse_cpu_list("3"), vec![3]);
        assert!(cpus_disjoint(&[0], &[1]));
        assert!(!cpus_disjoint(&[0, 1], &[1]));
        assert!(!cpus_disjoint(&[], &[1]), "unknown is not disjoint");
    }
}
