//! The seeded simulation: several shards' owner roles, random clients and a fake store with
//! injected latency, failures and commit timeouts, all in one thread on virtual time, driven by
//! one seed (in the spirit of TigerBeetle's VOPR and FoundationDB's simulation testing).
//!
//! The simulator is a second runtime for the roles: it executes their effects the way
//! [`crate::shard`] does — envelopes through FIFO queues per ordered pair of shards, loads and
//! commits through [`CommitQueues`] against the fake store, a commit that outlives
//! `commit_timeout_ms` failing its senders and settling later — but picks what happens next from
//! the seed: which queue delivers, which client logs in, sends, resends or disconnects, how long
//! the store takes and whether it fails. After every step it checks the invariants:
//!
//! - every role's own invariants (device limits, remembered sends in order, …);
//! - per-conversation order: a session sees a conversation's sequence numbers strictly rising
//!   (so never a duplicate);
//! - one message per (conversation, seq) and one seq per (sender, conversation, client id):
//!   every ack and every delivery agree, a resend gets the original ack;
//! - durable mode: an acked message is in the store when its ack arrives;
//! - every send gets exactly one answer;
//! - at the end, once everything in flight has landed: every acked message reached every session
//!   that was logged in when it was sent and still is; no send is left unanswered; the user
//!   owners hold exactly the sessions that are open (no phantom session counts against a limit).
//!
//! Groups: each shard runs a group owner; the fake store keeps groups (rows, members with the
//! seq they joined at, block lists, join requests, and every past membership's span) and applies
//! a notice's changes when its commit stores it. Clients create groups on a few ids (so that
//! creations collide), act on them with plausible and implausible choices, send, resend and
//! stream to them. Checked as it happens, against the stored state at the moment the owner
//! decides (which the owner must agree with):
//!
//! - every change started, refused or answered is what the stored state says (a reference model
//!   of the rules), every send let through or refused likewise (member, not muted, not
//!   dissolved), every query answer equals the stored state, every fan-out goes to exactly the
//!   members at its seq;
//! - a stored notice did what it says (its actor could, its target is changed, no one else),
//!   and a live group has exactly one founder;
//! - every group request gets exactly one answer (also when its session closed), a change's
//!   `GroupOk` only once its notice is stored;
//! - per group and session, seqs rise; a message reaches only users who were members at its
//!   seq (and never its sending session), a notice its members and the users it removed; at the
//!   end every acked group message reached every session logged in at its send, still open, of
//!   every user who was a member at its seq; the owners' groups equal the store's.
//!
//! Every seed also simulates the cases the roles once got wrong (see [`Strict`]);
//! `TIM_SIM_STRICT=none` (or a comma-separated list of the names to keep) leaves them out.
//!
//! [`run`] returns the first violation with the seed's recent events; the same seed replays
//! exactly (tests/sim.rs prints the command).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use ahash::RandomState;
use bytes::{Bytes, BytesMut};

use crate::{
    commit::{CommitQueues, Queued},
    config::{DevicePolicy, Limits, SessionPolicy},
    envelope::{AckInfo, Attach, Envelope, GroupOp, GroupRequest, RoomOp, RoomRequest, SessionRef, Submit},
    frame::{Header, HEADER_BYTES},
    placement::{conv_hash, direct_key, Owner, Placement},
    protocol::{
        self, conv, group_action as act, group_event as ev, group_role as role, invite_policy, join_policy,
        kind, room_publish, DeviceType, ErrorCode, GroupNotice, GroupProfile, JoinRequest, RoomStamp, Stamp,
    },
    roles::{
        CommitOutcome, ConvOwner, Effect, Effects, GroupOwner, GroupPublish, RoomOwner, Sequenced, UserOwner,
    },
    store::{
        group_conv, ConvKey, ConvLoad, GroupChange, GroupLoad, GroupRow, GroupWrite, MemberRow, RecentSend,
        UserId,
    },
};

/// Decode an archive of `$ty` from `$bytes` (copied to an aligned buffer first).
macro_rules! decode {
    ($ty:ty, $bytes:expr) => {{
        let mut v = rkyv::util::AlignedVec::<16>::new();
        v.extend_from_slice($bytes);
        rkyv::from_bytes::<$ty, rkyv::rancor::Error>(&v).ok()
    }};
}

/// A deterministic generator (splitmix64): the whole run follows from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        tim_shards::mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The shape of one run, chosen from the seed.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub shards: usize,
    pub users: u64,
    pub durable: bool,
    pub store_partitions: usize,
    pub policy: SessionPolicy,
    pub inflight_max: usize,
    pub commit_batch_max: usize,
    pub commit_backlog_max: usize,
    pub commit_timeout_ms: u64,
    /// Store latency is uniform in `0..store_latency_ms`, with rare stalls past the timeout.
    pub store_latency_ms: u64,
    pub store_fail_percent: u64,
    /// Conversations per shard before the least recently used is evicted.
    pub convs_max: usize,
    pub conversation_idle_secs: u64,
    pub steps: usize,
    /// Group ids the clients draw, `GROUP_ID_MIN + 0..group_ids`: few, so that creations collide.
    pub group_ids: u64,
    /// Groups per shard in memory (`groups_per_shard_max`).
    pub groups_max: usize,
    pub group_members_max: usize,
    pub group_requests_max: usize,
    /// Changes waiting per group (`group_changes_waiting_max`).
    pub group_waiting_max: usize,
    /// The cases the roles once got wrong, simulated and checked (`TIM_SIM_STRICT`).
    pub strict: Strict,
}

/// Cases the roles once got wrong, found by this simulation and fixed: all simulated and
/// checked by default. `TIM_SIM_STRICT=none` leaves them out (the simulation then avoids or
/// forgives them), `TIM_SIM_STRICT=order,create` keeps only those named.
#[derive(Clone, Copy, Debug, Default)]
pub struct Strict {
    /// `ambiguous`: a group notice's commit that fails but is stored all the same, and a join
    /// request stored though its save failed. The group owner keeps believing the change did
    /// not happen (by default such a failed commit or save is never stored).
    pub ambiguous: bool,
    /// `order`: a group message or stream message published ahead of one sequenced before it
    /// (no-data mode: a message sequenced while a notice's commit is open; a send that waited
    /// for its group's load ahead of messages published meanwhile). By default those
    /// deliveries are exempt from the order and membership checks and from the end's
    /// expectations.
    pub order: bool,
    /// `create`: a creation refused for its profile leaves its group in memory as being
    /// created (by default the clients send no invalid profile on creation).
    pub create: bool,
}

impl Strict {
    fn from_env() -> Strict {
        let v = std::env::var("TIM_SIM_STRICT").unwrap_or_else(|_| "all".into());
        let on = |name: &str| v.split(',').any(|w| w.trim() == name || w.trim() == "all" || w.trim() == "1");
        Strict { ambiguous: on("ambiguous"), order: on("order"), create: on("create") }
    }
}

impl SimConfig {
    pub fn from_seed(seed: u64, steps: usize) -> SimConfig {
        let mut r = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
        let per_account_max = 1 + r.below(4) as usize;
        let strict = Strict::from_env();
        let mut cfg = SimConfig {
            shards: 1 + r.below(4) as usize,
            users: 2 + r.below(7),
            durable: r.chance(70),
            store_partitions: 1 + r.below(3) as usize,
            policy: SessionPolicy {
                per_account_max,
                per_device_type_max: 1 + r.below(per_account_max as u64) as usize,
                policy: if r.chance(50) { DevicePolicy::KickOldest } else { DevicePolicy::Refuse },
                presence_auto_offline: true,
            },
            inflight_max: 1 + r.below(6) as usize,
            commit_batch_max: 1 + r.below(8) as usize,
            commit_backlog_max: 2 + r.below(30) as usize,
            commit_timeout_ms: 20 + r.below(60),
            store_latency_ms: 1 + r.below(30),
            store_fail_percent: r.below(8),
            convs_max: if r.chance(50) { 2 + r.below(10) as usize } else { 1 << 20 },
            conversation_idle_secs: 1 + r.below(2),
            steps,
            group_ids: 2 + r.below(8),
            groups_max: if r.chance(30) { 1 + r.below(3) as usize } else { 1 << 20 },
            group_members_max: if r.chance(30) { 2 + r.below(3) as usize } else { 100_000 },
            group_requests_max: if r.chance(30) { 1 + r.below(2) as usize } else { 1000 },
            group_waiting_max: if r.chance(30) { 1 + r.below(2) as usize } else { 256 },
            strict,
        };
        if strict.ambiguous {
            // Ambiguous commits are what is looked at: more of them.
            cfg.store_fail_percent = cfg.store_fail_percent.max(10);
        }
        cfg
    }
}

/// A violated invariant, with what led to it.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: usize,
    pub what: String,
    pub config: SimConfig,
    /// The last events before the failure, oldest first.
    pub trace: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} failed at step {}: {}", self.seed, self.step, self.what)?;
        writeln!(f, "config: {:?}", self.config)?;
        writeln!(f, "last events:")?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

/// What a finished run did, for tests that want to see it exercised something.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub sends: u64,
    pub acks: u64,
    pub duplicate_acks: u64,
    pub rejections: u64,
    pub deliveries: u64,
    pub logins: u64,
    pub kicks: u64,
    pub commit_timeouts: u64,
    pub store_failures: u64,
    /// Conversations evicted (idle, or to make room at the cap).
    pub evictions: u64,
    /// Commits reported failed that were stored all the same.
    pub ambiguous_commits: u64,
    /// Messages the store already held (resends of ambiguous commits).
    pub store_duplicates: u64,
    /// Sends refused at once because their partition's commit backlog was full.
    pub backlog_full: u64,
    /// Stream messages sent, received by sessions, and refused.
    pub streams: u64,
    pub stream_deliveries: u64,
    pub stream_refusals: u64,
    /// Room requests sent, room messages received by sessions.
    pub room_requests: u64,
    pub room_deliveries: u64,
    /// Group requests sent, answered with success, refused.
    pub group_requests: u64,
    pub group_oks: u64,
    pub group_refusals: u64,
    /// Group creations refused because the id was taken.
    pub group_collisions: u64,
    /// Group notices stored.
    pub group_notices: u64,
    /// Group sends (and resends), acks of them, and group messages and notices delivered.
    pub group_sends: u64,
    pub group_acks: u64,
    pub group_deliveries: u64,
    pub group_stream_deliveries: u64,
    /// Join requests and decisions pushed to sessions.
    pub group_pushes: u64,
    /// Groups loaded from the store, and evicted idle.
    pub group_loads: u64,
    pub group_evictions: u64,
    /// Group notices whose commit failed but was stored (`Strict::ambiguous` only).
    pub group_ambiguous: u64,
}

impl SimReport {
    /// Add another run's counts (totals over many seeds).
    pub fn add(&mut self, r: &SimReport) {
        self.sends += r.sends;
        self.acks += r.acks;
        self.duplicate_acks += r.duplicate_acks;
        self.rejections += r.rejections;
        self.deliveries += r.deliveries;
        self.logins += r.logins;
        self.kicks += r.kicks;
        self.commit_timeouts += r.commit_timeouts;
        self.store_failures += r.store_failures;
        self.evictions += r.evictions;
        self.ambiguous_commits += r.ambiguous_commits;
        self.store_duplicates += r.store_duplicates;
        self.backlog_full += r.backlog_full;
        self.streams += r.streams;
        self.stream_deliveries += r.stream_deliveries;
        self.stream_refusals += r.stream_refusals;
        self.room_requests += r.room_requests;
        self.room_deliveries += r.room_deliveries;
        self.group_requests += r.group_requests;
        self.group_oks += r.group_oks;
        self.group_refusals += r.group_refusals;
        self.group_collisions += r.group_collisions;
        self.group_notices += r.group_notices;
        self.group_sends += r.group_sends;
        self.group_acks += r.group_acks;
        self.group_deliveries += r.group_deliveries;
        self.group_stream_deliveries += r.group_stream_deliveries;
        self.group_pushes += r.group_pushes;
        self.group_loads += r.group_loads;
        self.group_evictions += r.group_evictions;
        self.group_ambiguous += r.group_ambiguous;
    }
}

/// Client message ids of stream messages start here (apart from sends').
const STREAM_CMID_BASE: u64 = 1 << 40;

/// Events kept for a failure's report (`TIM_SIM_TRACE` overrides it when replaying a seed).
const TRACE_MAX: usize = 60;
/// Virtual start time (after the message id epoch).
const START_MS: u64 = 1_760_000_000_000;
/// Recipients that do not exist (above every account id).
const GHOST_USER: UserId = 1_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Login {
    Waiting,
    Attached,
}

struct Client {
    user: UserId,
    device_type: DeviceType,
    login: Login,
    /// Sends awaiting their answer: client message id → recipient.
    inflight: BTreeMap<u64, UserId>,
    /// Highest seq seen per conversation.
    seen: HashMap<ConvKey, u64>,
    delivered: BTreeSet<(ConvKey, u64)>,
    /// Per conversation, the greatest `seq` a stream message received here followed: a stored
    /// message at or below it arriving later came after a stream it should precede.
    stream_floor: HashMap<ConvKey, u64>,
    /// Stream messages received, as (sender, client message id): each arrives at most once.
    streams: BTreeSet<(UserId, u64)>,
    /// Rooms this session is subscribed to (as its shard's runtime records it), and the last
    /// room message `seq` it got in each.
    rooms: BTreeMap<u64, u64>,
}

/// A message the ledger knows: from its first ack or delivery.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Known {
    sender: UserId,
    client_msg_id: u64,
    msg_id: u64,
}

enum Timer {
    Load {
        shard: usize,
        key: ConvKey,
        result: Result<ConvLoad, ErrorCode>,
    },
    /// A committer of (shard, partition) takes its next batch.
    Committer {
        shard: usize,
        part: usize,
    },
    CommitDone {
        shard: usize,
        part: usize,
        id: u64,
    },
    CommitTimeout {
        shard: usize,
        part: usize,
        id: u64,
    },
    /// A group's load ends (read from the store when it does).
    LoadGroup {
        shard: usize,
        group: u64,
    },
    /// A join request's save ends.
    SaveRequest {
        shard: usize,
        group: u64,
        user: UserId,
        request: Option<JoinRequest>,
    },
}

struct OpenCommit {
    batch: Vec<Sequenced>,
    ok: bool,
    /// The sender was answered StoreUnavailable at the timeout; the outcome settles later.
    timed_out: bool,
    done: bool,
}

struct SimShard {
    users: UserOwner,
    convs: ConvOwner,
    commits: CommitQueues,
    rooms: RoomOwner,
    /// The runtime's index of this shard's subscribers per room.
    room_subs: HashMap<u64, Vec<SessionRef>>,
    groups: GroupOwner,
}

/// A stored message in the fake store: (sender, client message id, message id, time).
type Row = (UserId, u64, u64, u64);

/// The fake store: committed messages per conversation, and when each partition is next free.
#[derive(Default)]
struct FakeStore {
    messages: HashMap<ConvKey, BTreeMap<u64, Row>>,
    by_client_id: HashMap<(ConvKey, UserId, u64), u64>,
    free_at: HashMap<usize, u64>,
    /// Groups as stored (what `MemoryInner::apply` keeps).
    groups: BTreeMap<u64, StoredGroup>,
    /// Every membership of (user, group), current or past: (from seq, until seq), `u64::MAX`
    /// while it lasts.
    spans: HashMap<(UserId, u64), Vec<(u64, u64)>>,
    /// Stored notices: (group, seq) → the notice.
    notices: HashMap<(u64, u64), GroupNotice>,
}

/// A group as stored.
#[derive(Clone, Debug, Default, PartialEq)]
struct StoredGroup {
    row: GroupRow,
    members: BTreeMap<UserId, MemberRow>,
    blocked: BTreeSet<UserId>,
    requests: BTreeMap<UserId, JoinRequest>,
}

impl StoredGroup {
    fn load(&self) -> GroupLoad {
        GroupLoad {
            reads: Vec::new(),
            row: self.row.clone(),
            members: self.members.values().copied().collect(),
            blocked: self.blocked.iter().copied().collect(),
            requests: self.requests.values().cloned().collect(),
        }
    }

    fn role_of(&self, user: UserId) -> Option<u8> {
        self.members.get(&user).map(|m| m.role)
    }
}

/// A session's group request, as the simulation remembers it until its answer lands.
#[derive(Clone, Debug)]
struct GroupAsk {
    user: UserId,
    group: u64,
    ask: Ask,
    /// Its change has started: its notice (or join request) is on its way to the store.
    started: bool,
    /// When it reached its group's owner (0: not yet), which handles changes in that order.
    arrived: u64,
    /// Its answer is on its way.
    answered: bool,
}

/// A group request (the simulation's copy of a [`GroupOp`]).
#[derive(Clone, Debug)]
enum Ask {
    Create(GroupProfile),
    Update(GroupProfile),
    Action { action: u8, target: UserId, until_ms: u64, note: String },
    Get,
    Members,
    Requests,
}

impl Ask {
    fn op(&self) -> GroupOp {
        match self.clone() {
            Ask::Create(p) => GroupOp::Create(p),
            Ask::Update(p) => GroupOp::Update(p),
            Ask::Action { action, target, until_ms, note } => {
                GroupOp::Action { action, target, until_ms, note }
            }
            Ask::Get => GroupOp::Get,
            Ask::Members => GroupOp::Members { after: 0, limit: 0 },
            Ask::Requests => GroupOp::Requests,
        }
    }

    fn kind(&self) -> u16 {
        self.op().request_kind()
    }

    fn is_change(&self) -> bool {
        matches!(self, Ask::Create(_) | Ask::Update(_) | Ask::Action { .. })
    }

    /// The notice the change makes, as (event, target), if it makes one.
    fn event(&self, user: UserId) -> Option<(u8, UserId)> {
        Some(match self {
            Ask::Create(_) => (ev::CREATED, 0),
            Ask::Update(_) => (ev::PROFILE_CHANGED, 0),
            Ask::Action { action, target, .. } => {
                let t = *target;
                match *action {
                    act::JOIN => (ev::JOINED, user),
                    act::LEAVE => (ev::LEFT, user),
                    act::INVITE | act::APPROVE => (ev::ADDED, t),
                    act::KICK => (ev::KICKED, t),
                    act::ADD_MANAGER => (ev::MANAGER_ADDED, t),
                    act::REMOVE_MANAGER => (ev::MANAGER_REMOVED, t),
                    act::TRANSFER => (ev::TRANSFERRED, t),
                    act::MUTE => (ev::MUTED, t),
                    act::MUTE_ALL => (ev::MUTED_ALL, 0),
                    act::BLOCK => (ev::BLOCKED, t),
                    act::UNBLOCK => (ev::UNBLOCKED, t),
                    act::DISSOLVE => (ev::DISSOLVED, 0),
                    _ => return None,
                }
            }
            Ask::Get | Ask::Members | Ask::Requests => return None,
        })
    }
}

/// What the stored state says a group request comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// A notice of (event, target) is sequenced.
    Notice(u8, UserId),
    /// The user's join request is kept (true) or dropped.
    Request(UserId, bool),
    /// A query is answered.
    Answer,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    step: usize,
    placement: Placement,
    shards: Vec<SimShard>,
    /// FIFO per ordered pair of shards (src * n + dst).
    mesh: Vec<VecDeque<Envelope>>,
    timers: BTreeMap<(u64, u64), Timer>,
    timer_seq: u64,
    commits_open: HashMap<u64, OpenCommit>,
    commit_ids: u64,
    store: FakeStore,
    clients: BTreeMap<SessionRef, Client>,
    next_session: Vec<u64>,
    next_cmid: HashMap<UserId, u64>,
    /// Stream messages sent so far (their client message ids).
    next_stream: u64,
    /// Room ids drawn so far (created or not).
    room_ids: Vec<u64>,
    /// Client message ids each user has sent, for resends.
    sent_ids: HashMap<UserId, Vec<(u64, UserId)>>,
    /// (sender, conversation, client id, generation) → its ack, and whether an ack said it was
    /// new. The generation is that of the owner's conversation when it handled the send: with a
    /// memory store an evicted conversation forgets its dedup (0 with a durable store, whose
    /// dedup survives eviction).
    acked: HashMap<(UserId, ConvKey, u64, u64), (AckInfo, bool)>,
    /// The generation each send was handled in.
    handled_in: HashMap<(SessionRef, u64), u64>,
    /// (conversation, seq) → the message.
    known: HashMap<(ConvKey, u64), Known>,
    /// Per pending send: sessions that were logged in when it was submitted.
    expect_at_submit: HashMap<(SessionRef, u64), Vec<SessionRef>>,
    /// (conversation, seq, sessions) that must see an acked message.
    expectations: Vec<(ConvKey, u64, Vec<SessionRef>)>,
    trace: VecDeque<String>,
    trace_max: usize,
    report: SimReport,
    limits: Limits,
    /// Group requests in flight by asking session (a session waits for each answer, as the
    /// runtime's does), kept after the session ends until the answer lands.
    group_asks: BTreeMap<SessionRef, GroupAsk>,
    /// Group sends and stream messages: (session, client id) → (group, sender).
    group_sends: HashMap<(SessionRef, u64), (u64, UserId)>,
    /// Group stream messages: client id → the sending session.
    group_streams: HashMap<u64, SessionRef>,
    /// Per group, the event of its notice between its start and its outcome.
    notice_inflight: HashMap<u64, u8>,
    /// Notices whose commit is open: (group, seq).
    notices_open: BTreeSet<(u64, u64)>,
    /// Per group, the greatest seq published.
    group_published: HashMap<u64, u64>,
    /// (group, seq) of a message → the session that sent it.
    group_origin: HashMap<(u64, u64), SessionRef>,
    /// No-data mode: (group, seq) published out of order (a message sequenced while a notice
    /// before it was being committed, and that notice).
    raced: HashSet<(u64, u64)>,
    /// Group loads in flight, with the seqs published meanwhile (fanned out once loaded).
    group_loading: HashMap<u64, Vec<u64>>,
    /// Stored group messages never fanned out (their group's load failed): members get them at
    /// catch-up.
    lost_live: HashSet<(u64, u64)>,
    /// Acked group messages: (group, seq, sessions logged in at its send but the sender's).
    group_expectations: Vec<(u64, u64, Vec<SessionRef>)>,
    /// Group requests that reached their owner so far.
    group_arrivals: u64,
    /// While a group's load ends: the seqs published while it loaded, about to be fanned out.
    pending_publish: HashMap<u64, Vec<u64>>,
    /// Group stream messages published ahead of stored messages before them (see
    /// `Sim::group_published`).
    raced_streams: HashSet<u64>,
}

/// Run the simulation of `seed` for `steps` steps, then let everything in flight land.
pub fn run(seed: u64, steps: usize) -> Result<SimReport, Box<SimFailure>> {
    let cfg = SimConfig::from_seed(seed, steps);
    let mut sim = Sim::new(seed, cfg);
    match sim.run() {
        Ok(()) => Ok(sim.report),
        Err(what) => Err(Box::new(SimFailure {
            seed,
            step: sim.step,
            what,
            config: sim.cfg.clone(),
            trace: sim.trace.into_iter().collect(),
        })),
    }
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        let placement = Placement::new(cfg.shards);
        let limits = Limits {
            dedup_per_conversation_max: 100_000,
            conversations_per_shard_max: cfg.convs_max,
            conversation_idle_secs: cfg.conversation_idle_secs,
            // Rooms expire within a run: their closing races the requests that name them.
            room_idle_secs: 1,
            groups_per_shard_max: cfg.groups_max,
            group_members_max: cfg.group_members_max,
            group_join_requests_max: cfg.group_requests_max,
            group_changes_waiting_max: cfg.group_waiting_max,
            ..Limits::default()
        };
        let hasher = || RandomState::with_seeds(1, 2, 3, 4);
        let shards = (0..cfg.shards)
            .map(|id| SimShard {
                users: UserOwner::new(cfg.policy.clone(), limits.tokens_per_user_max, hasher()),
                convs: ConvOwner::new(Owner::new(0, id), placement.clone(), cfg.durable, &limits, hasher()),
                commits: CommitQueues::new(
                    cfg.store_partitions,
                    cfg.commit_batch_max,
                    cfg.commit_backlog_max,
                ),
                rooms: RoomOwner::new(Owner::new(0, id), placement.clone(), &limits),
                room_subs: HashMap::new(),
                groups: GroupOwner::new(Owner::new(0, id), placement.clone(), &limits),
            })
            .collect();
        Sim {
            rng: Rng::new(seed),
            now: START_MS,
            step: 0,
            placement,
            shards,
            mesh: (0..cfg.shards * cfg.shards).map(|_| VecDeque::new()).collect(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            commits_open: HashMap::new(),
            commit_ids: 0,
            store: FakeStore::default(),
            clients: BTreeMap::new(),
            next_session: vec![1; cfg.shards],
            next_cmid: HashMap::new(),
            next_stream: 0,
            room_ids: Vec::new(),
            sent_ids: HashMap::new(),
            acked: HashMap::new(),
            handled_in: HashMap::new(),
            known: HashMap::new(),
            expect_at_submit: HashMap::new(),
            expectations: Vec::new(),
            trace: VecDeque::new(),
            trace_max: std::env::var("TIM_SIM_TRACE").ok().and_then(|v| v.parse().ok()).unwrap_or(TRACE_MAX),
            report: SimReport::default(),
            limits,
            group_asks: BTreeMap::new(),
            group_sends: HashMap::new(),
            group_streams: HashMap::new(),
            notice_inflight: HashMap::new(),
            notices_open: BTreeSet::new(),
            group_published: HashMap::new(),
            group_origin: HashMap::new(),
            raced: HashSet::new(),
            group_loading: HashMap::new(),
            lost_live: HashSet::new(),
            group_expectations: Vec::new(),
            group_arrivals: 0,
            pending_publish: HashMap::new(),
            raced_streams: HashSet::new(),
            cfg,
        }
    }

    fn note(&mut self, event: String) {
        if self.trace.len() >= self.trace_max {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{} t+{}ms] {event}", self.step, self.now - START_MS));
    }

    fn run(&mut self) -> Result<(), String> {
        for step in 0..self.cfg.steps {
            self.step = step;
            self.now += self.rng.below(3);
            if self.rng.chance(1) && self.rng.chance(15) {
                // A quiet while (or a stalled process): idle conversations and groups can go.
                let gap = 300 + self.rng.below(2000);
                self.now += gap;
                self.note(format!("{gap} ms pass"));
            }
            if self.rng.chance(10) {
                let shard = self.rng.below(self.cfg.shards as u64) as usize;
                let n = self.shards[shard].convs.evict_idle(self.now, 64);
                if n > 0 {
                    self.note(format!("shard {shard}: evicted {n} idle conversations"));
                }
                let mut fx = Vec::new();
                self.shards[shard].rooms.expire(self.now, &mut fx);
                self.execute(shard, fx)?;
                let n = self.shards[shard].groups.evict_idle(self.now, 64);
                if n > 0 {
                    self.report.group_evictions += n as u64;
                    self.note(format!("shard {shard}: evicted {n} idle groups"));
                }
            }
            let busy = self.mesh.iter().any(|q| !q.is_empty()) || self.due_timer().is_some();
            if busy && self.rng.chance(65) {
                self.progress()?;
            } else {
                self.client_action()?;
            }
            self.check_roles()?;
        }
        // Let everything in flight land: no new client actions.
        self.step = self.cfg.steps;
        let mut rounds = 0u64;
        loop {
            rounds += 1;
            if rounds > 10_000_000 {
                return Err("the system never went quiet".into());
            }
            if self.mesh.iter().any(|q| !q.is_empty()) || self.due_timer().is_some() {
                self.progress()?;
                self.check_roles()?;
            } else if let Some((&(t, _), _)) = self.timers.iter().next() {
                self.now = self.now.max(t);
            } else {
                break;
            }
        }
        self.report.evictions = self.shards.iter().map(|s| s.convs.evicted).sum();
        self.check_end()
    }

    fn due_timer(&self) -> Option<(u64, u64)> {
        self.timers.keys().next().copied().filter(|&(t, _)| t <= self.now)
    }

    fn schedule(&mut self, at: u64, timer: Timer) {
        self.timer_seq += 1;
        self.timers.insert((at, self.timer_seq), timer);
    }

    /// Deliver one envelope from a random non-empty queue, or fire a due timer.
    fn progress(&mut self) -> Result<(), String> {
        let queues: Vec<usize> = (0..self.mesh.len()).filter(|&i| !self.mesh[i].is_empty()).collect();
        let timer_due = self.due_timer();
        let pick_timer = match (queues.is_empty(), timer_due) {
            (_, None) => false,
            (true, Some(_)) => true,
            (false, Some(_)) => self.rng.chance(30),
        };
        if pick_timer {
            let key = timer_due.expect("due");
            let timer = self.timers.remove(&key).expect("present");
            return self.fire(timer);
        }
        if queues.is_empty() {
            return Ok(());
        }
        let q = queues[self.rng.below(queues.len() as u64) as usize];
        let env = self.mesh[q].pop_front().expect("non-empty");
        let dst = q % self.cfg.shards;
        self.handle(dst, env)
    }

    fn post(&mut self, src: usize, dst: usize, env: Envelope) {
        self.mesh[src * self.cfg.shards + dst].push_back(env);
    }

    /// Carry out a role call's effects in order, as `Shard::execute` does: a group send or
    /// notice goes to this shard's conversation owner and a published group message to its
    /// group owner at once, store work after its latency.
    fn execute(&mut self, shard: usize, fx: Effects) -> Result<(), String> {
        for effect in fx {
            match effect {
                Effect::Post(dst, env) => self.post(shard, dst.shard(), env),
                Effect::Sequence(sub) => self.sequence(shard, sub)?,
                Effect::GroupPublish(p) => self.group_published(shard, p)?,
                // Read positions and presence are not part of the simulation.
                Effect::NoteRead(_) | Effect::FanoutUsers { .. } => {}
                Effect::NoticeFailed { group, code } => {
                    self.notice_inflight.remove(&group);
                    self.note(format!("shard {shard}: notice of group {group} failed {code:?}"));
                    self.group_call(shard, |g, now, fx| g.notice_failed(group, code, now, fx))?;
                }
                Effect::LoadGroup(group) => {
                    if self.placement.group(group).shard() != shard {
                        return Err(format!("group {group} loaded on shard {shard}"));
                    }
                    self.group_loading.entry(group).or_default();
                    let latency = self.store_latency();
                    self.schedule(self.now + latency, Timer::LoadGroup { shard, group });
                }
                Effect::SaveJoinRequest { group, user, request } => {
                    let latency = self.store_latency();
                    self.schedule(self.now + latency, Timer::SaveRequest { shard, group, user, request });
                }
                Effect::LoadConv(req) => {
                    let latency = self.store_latency();
                    let result = if self.rng.chance(self.cfg.store_fail_percent) {
                        Err(ErrorCode::StoreUnavailable)
                    } else if req.check_recipient.is_some_and(|u| u > self.cfg.users) {
                        Err(ErrorCode::UnknownRecipient)
                    } else {
                        Ok(self.store_load(req.key, req.since_ms, req.recent_max))
                    };
                    self.schedule(self.now + latency, Timer::Load { shard, key: req.key, result });
                }
                Effect::Commit(s) => {
                    if s.is_notice() {
                        self.notices_open.insert((s.to, s.ack.seq));
                    }
                    let part = (conv_hash(s.conv()) % self.cfg.store_partitions as u64) as usize;
                    match self.shards[shard].commits.push(part, s) {
                        Queued::Waiting => {}
                        Queued::Start => {
                            let gather = self.rng.below(2);
                            self.schedule(self.now + gather, Timer::Committer { shard, part });
                        }
                        Queued::Full(s) => {
                            self.report.backlog_full += 1;
                            if s.is_notice() {
                                self.notices_open.remove(&(s.to, s.ack.seq));
                            }
                            let mut fx = Vec::new();
                            self.shards[shard].convs.settled(s, CommitOutcome::Failed, true, &mut fx);
                            self.execute(shard, fx)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn store_latency(&mut self) -> u64 {
        if self.rng.chance(3) {
            self.cfg.commit_timeout_ms + self.rng.below(100) // a stall past the commit timeout
        } else {
            self.rng.below(self.cfg.store_latency_ms)
        }
    }

    fn store_load(&self, key: ConvKey, since_ms: u64, recent_max: usize) -> ConvLoad {
        if !self.cfg.durable {
            // The memory store keeps no messages (group notices are kept here all the same).
            return ConvLoad::default();
        }
        let Some(msgs) = self.store.messages.get(&key) else { return ConvLoad::default() };
        let last_seq = msgs.keys().next_back().copied().unwrap_or(0);
        let recent = msgs
            .iter()
            .rev()
            .filter(|(_, m)| m.3 >= since_ms)
            .take(recent_max)
            .map(|(&seq, &(sender, client_msg_id, msg_id, ts_ms))| RecentSend {
                sender,
                client_msg_id,
                msg_id,
                seq,
                ts_ms,
            })
            .collect();
        ConvLoad { last_seq, recent, pair: 0 }
    }

    fn fire(&mut self, timer: Timer) -> Result<(), String> {
        match timer {
            Timer::Load { shard, key, result } => {
                self.note(format!(
                    "shard {shard}: load of {key:?} -> {:?}",
                    result.as_ref().map(|l| l.last_seq)
                ));
                let mut fx = Vec::new();
                self.shards[shard].convs.loaded(key, result, self.now, &mut fx);
                self.execute(shard, fx)?;
            }
            Timer::Committer { shard, part } => {
                let Some(batch) = self.shards[shard].commits.next_batch(part) else { return Ok(()) };
                self.commit_ids += 1;
                let id = self.commit_ids;
                // A partition commits in order: this batch is done after the one before it.
                let start = self.now.max(self.store.free_at.get(&part).copied().unwrap_or(0));
                let done_at = start + self.store_latency();
                self.store.free_at.insert(part, done_at);
                // The memory store's commits (of group notices, in no-data mode) never fail.
                let ok = !self.cfg.durable || !self.rng.chance(self.cfg.store_fail_percent);
                self.note(format!(
                    "shard {shard}: commit {id} of {} on part {part}, done at +{} ok={ok}",
                    batch.len(),
                    done_at - START_MS
                ));
                // As the runtime does: a send's deadline runs from its sequencing.
                let oldest_ms = batch.iter().map(|s| s.ack.ts_ms).min().unwrap_or(self.now);
                let deadline = (oldest_ms + self.cfg.commit_timeout_ms).max(self.now);
                self.commits_open.insert(id, OpenCommit { batch, ok, timed_out: false, done: false });
                self.schedule(done_at, Timer::CommitDone { shard, part, id });
                self.schedule(deadline, Timer::CommitTimeout { shard, part, id });
            }
            Timer::CommitDone { shard, part, id } => {
                let mut open = self.commits_open.remove(&id).expect("open commit");
                open.done = true;
                // A failed commit may have been stored all the same (the connection dropped
                // after COMMIT): the store then holds what its sender was told had failed. (Not
                // a group notice's unless asked: see `Strict::ambiguous`.)
                let notices = open.batch.iter().any(Sequenced::is_notice);
                let stored = open.ok || ((self.cfg.strict.ambiguous || !notices) && self.rng.chance(30));
                if !open.ok && stored && notices {
                    self.report.group_ambiguous += 1;
                }
                let mut outcomes = Vec::with_capacity(open.batch.len());
                for s in &open.batch {
                    let m = s.stored();
                    let key = (m.conv, m.sender, m.client_msg_id);
                    let outcome = match self.store.by_client_id.get(&key) {
                        // The store's own dedup: the original stays, nothing new is stored.
                        Some(&seq) => {
                            let (sender, client_msg_id, msg_id, ts_ms) = self.store.messages[&m.conv][&seq];
                            CommitOutcome::Duplicate(RecentSend { sender, client_msg_id, msg_id, seq, ts_ms })
                        }
                        None if stored => {
                            self.store.by_client_id.insert(key, m.seq);
                            let conv = self.store.messages.entry(m.conv).or_default();
                            if conv.insert(m.seq, (m.sender, m.client_msg_id, m.msg_id, m.ts_ms)).is_some() {
                                return Err(format!("seq {} of {:?} stored twice", m.seq, m.conv));
                            }
                            if let Some(change) = &m.group {
                                self.store_change(change, m.seq, &s.frame)?;
                            }
                            CommitOutcome::Stored
                        }
                        None => CommitOutcome::Failed,
                    };
                    outcomes.push(if open.ok { outcome } else { CommitOutcome::Failed });
                }
                if !open.ok {
                    self.report.store_failures += 1;
                    if stored {
                        self.report.ambiguous_commits += 1;
                    }
                }
                self.report.store_duplicates +=
                    outcomes.iter().filter(|o| matches!(o, CommitOutcome::Duplicate(_))).count() as u64;
                self.note(format!(
                    "shard {shard}: commit {id} done ok={} stored={stored} late={}",
                    open.ok, open.timed_out
                ));
                let waiting = !open.timed_out;
                let mut fx = Vec::new();
                for (s, outcome) in open.batch.into_iter().zip(outcomes) {
                    if s.is_notice() {
                        self.notices_open.remove(&(s.to, s.ack.seq));
                    }
                    self.shards[shard].convs.settled(s, outcome, waiting, &mut fx);
                }
                self.execute(shard, fx)?;
                if waiting {
                    // The committer moves on to its next batch.
                    self.schedule(self.now, Timer::Committer { shard, part });
                }
            }
            Timer::CommitTimeout { shard, part, id } => {
                let Some(open) = self.commits_open.get_mut(&id) else { return Ok(()) };
                if open.done {
                    return Ok(());
                }
                open.timed_out = true;
                let mut fx = Vec::new();
                for s in &open.batch {
                    self.shards[shard].convs.commit_timed_out(s, &mut fx);
                }
                self.report.commit_timeouts += 1;
                self.note(format!("shard {shard}: commit {id} timed out"));
                self.execute(shard, fx)?;
                self.schedule(self.now, Timer::Committer { shard, part });
            }
            Timer::LoadGroup { shard, group } => {
                let waiting = self.group_loading.remove(&group).unwrap_or_default();
                let result = if self.rng.chance(self.cfg.store_fail_percent) {
                    Err(ErrorCode::StoreUnavailable)
                } else {
                    Ok(self.store.groups.get(&group).map(StoredGroup::load))
                };
                if !matches!(result, Ok(Some(_))) {
                    // Published meanwhile, stored, but not fanned out: members get them at
                    // catch-up or with History.
                    self.lost_live.extend(waiting.iter().map(|&seq| (group, seq)));
                }
                self.report.group_loads += 1;
                self.note(format!(
                    "shard {shard}: load of group {group} -> {:?}",
                    result.as_ref().map(|l| l.as_ref().map(|l| l.members.len()))
                ));
                self.pending_publish.insert(group, waiting);
                let r = self.group_call(shard, |g, now, fx| g.loaded(group, result, now, fx));
                self.pending_publish.remove(&group);
                r?;
            }
            Timer::SaveRequest { shard, group, user, request } => {
                self.notice_inflight.remove(&group);
                let ok = !self.rng.chance(self.cfg.store_fail_percent);
                // A failed save may have been stored all the same (`Strict::ambiguous` only).
                if ok || (self.cfg.strict.ambiguous && self.rng.chance(30)) {
                    if let Some(g) = self.store.groups.get_mut(&group) {
                        match &request {
                            Some(r) => g.requests.insert(user, r.clone()),
                            None => g.requests.remove(&user),
                        };
                    }
                }
                self.note(format!(
                    "shard {shard}: join request of user {user} to group {group} kept={} ok={ok}",
                    request.is_some()
                ));
                let result = if ok { Ok(()) } else { Err(ErrorCode::StoreUnavailable) };
                self.group_call(shard, |g, now, fx| g.request_saved(group, result, now, fx))?;
            }
        }
        Ok(())
    }

    /// One envelope arrives at shard `dst`: a role handles it, or a client's session does.
    fn handle(&mut self, dst: usize, env: Envelope) -> Result<(), String> {
        let now = self.now;
        let mut fx = Vec::new();
        match env {
            Envelope::DeliverMany(_) => unreachable!("the simulation fans group messages out itself"),
            Envelope::Remote(_)
            | Envelope::Placement(_)
            | Envelope::Fence { .. }
            | Envelope::Reattach { .. } => {
                unreachable!("the simulation runs one node")
            }
            Envelope::Admin(_) | Envelope::Ban { .. } => unreachable!("the simulation has no admin API"),
            Envelope::Pair { .. } | Envelope::Presence { .. } => unreachable!("the simulation has no roster"),
            Envelope::Sessions { .. } => unreachable!("the simulation's clients do not list sessions"),
            Envelope::Group(req) => {
                if self.placement.group(req.group).shard() != dst {
                    return Err(format!("group request for {} on shard {dst}", req.group));
                }
                self.group_arrivals += 1;
                if let Some(a) = self.group_asks.get_mut(&req.origin) {
                    a.arrived = self.group_arrivals;
                }
                return self.group_call(dst, |g, now, fx| g.request(req, now, fx));
            }
            Envelope::GroupReply { session, request_kind, result } => {
                self.on_group_reply(session, request_kind, &result)?
            }
            Envelope::GroupFanout(f) => {
                let users = &mut self.shards[dst].users;
                for &u in f.users.iter() {
                    if self.placement.user(u).shard() != dst {
                        return Err(format!("group fan-out for user {u} on shard {dst}"));
                    }
                    if f.lossy {
                        users.fanout_stream(u, f.skip, &f.frame, &mut fx);
                    } else {
                        users.fanout(u, f.skip, &f.frame, &mut fx);
                    }
                }
            }
            Envelope::Submit(sub) if sub.conv == conv::GROUP => {
                if self.placement.group(sub.to).shard() != dst {
                    return Err(format!("group send to {} on shard {dst}", sub.to));
                }
                return self.group_call(dst, |g, now, fx| g.submit(sub, now, fx));
            }
            Envelope::Submit(sub) => {
                let key = direct_key(sub.sender, sub.to);
                if self.placement.conv(key).shard() != dst {
                    return Err(format!("submit of {key:?} on shard {dst}"));
                }
                let (origin, cmid) = (sub.origin, sub.client_msg_id);
                let convs = &mut self.shards[dst].convs;
                convs.submit(sub, now, &mut fx);
                let generation = if self.cfg.durable { 0 } else { convs.generation(key).unwrap_or(0) };
                self.handled_in.insert((origin, cmid), generation);
            }
            Envelope::Fanout { user, skip, frame } => {
                if self.placement.user(user).shard() != dst {
                    return Err(format!("fanout of user {user} on shard {dst}"));
                }
                self.shards[dst].users.fanout(user, skip, &frame, &mut fx)
            }
            Envelope::Attach(a) => self.shards[dst].users.attach(&a, now, &mut fx),
            Envelope::Detach { user, session } => self.shards[dst].users.detach(user, session, now, &mut fx),
            Envelope::StoreToken { user, session, hash, expires_at_ms } => {
                self.shards[dst].users.store_token(user, session, hash, expires_at_ms, now, &mut fx)
            }
            Envelope::Acked { session, ack } => self.on_answer(session, ack.client_msg_id, Ok(ack))?,
            Envelope::Rejected { session, client_msg_id, code } => {
                self.on_answer(session, client_msg_id, Err(code))?
            }
            Envelope::Deliver { session, frame } => self.on_deliver(session, &frame)?,
            Envelope::AttachResult { session, user, result } => {
                match self.clients.get_mut(&session) {
                    Some(c) if c.login == Login::Waiting => match result {
                        Ok(()) => {
                            c.login = Login::Attached;
                            self.report.logins += 1;
                            self.note(format!("session {session:?} of user {user}: logged in"));
                        }
                        Err(code) => {
                            self.clients.remove(&session);
                            self.note(format!("session {session:?} of user {user}: login refused {code:?}"));
                        }
                    },
                    Some(_) => return Err(format!("second login answer for {session:?}")),
                    None => {
                        if result.is_ok() {
                            // As the runtime does: the connection ended while logging in.
                            self.post(
                                dst,
                                self.placement.user(user).shard(),
                                Envelope::Detach { user, session },
                            );
                        }
                    }
                }
            }
            Envelope::Kick { session, reason } => {
                if let Some(c) = self.clients.remove(&session) {
                    self.leave_rooms(session, &c);
                    self.report.kicks += 1;
                    self.note(format!("session {session:?} of user {}: kicked {reason:?}", c.user));
                    if c.login == Login::Attached {
                        self.post(
                            dst,
                            self.placement.user(c.user).shard(),
                            Envelope::Detach { user: c.user, session },
                        );
                    }
                }
            }
            Envelope::TokenResult { .. } => {}
            Envelope::StreamFanout { user, skip, frame } => {
                if self.placement.user(user).shard() != dst {
                    return Err(format!("stream fanout of user {user} on shard {dst}"));
                }
                self.shards[dst].users.fanout_stream(user, skip, &frame, &mut fx)
            }
            Envelope::StreamDeliver { session, frame } => self.on_stream(session, &frame)?,
            Envelope::StreamRefused { session, client_msg_id, code } => {
                self.report.stream_refusals += 1;
                self.note(format!("session {session:?}: stream {client_msg_id} refused {code:?}"));
            }
            Envelope::Room(req) => {
                if self.placement.room(req.room).shard() != dst {
                    return Err(format!("room request for {} on shard {dst}", req.room));
                }
                self.shards[dst].rooms.request(*req, now, &mut fx)
            }
            Envelope::RoomReply { session, room, request_kind, result } => {
                self.on_room_reply(dst, session, room, request_kind, result)
            }
            Envelope::RoomFanout { room, skip, frame } => self.on_room_fanout(dst, room, skip, &frame)?,
            Envelope::RoomClosed { room, .. } => {
                for s in self.shards[dst].room_subs.remove(&room).unwrap_or_default() {
                    if let Some(c) = self.clients.get_mut(&s) {
                        c.rooms.remove(&room);
                    }
                }
                self.note(format!("shard {dst}: room {room} closed"));
            }
        }
        self.execute(dst, fx)
    }

    fn on_answer(
        &mut self,
        session: SessionRef,
        cmid: u64,
        answer: Result<AckInfo, ErrorCode>,
    ) -> Result<(), String> {
        let Some(c) = self.clients.get_mut(&session) else { return Ok(()) };
        let Some(to) = c.inflight.remove(&cmid) else {
            return Err(format!("answer for client id {cmid} that {session:?} has not in flight"));
        };
        let sender = c.user;
        let group = protocol::is_group_id(to);
        let key = if group { group_conv(to) } else { direct_key(sender, to) };
        if group {
            self.group_sends.remove(&(session, cmid));
        }
        let expected = self.expect_at_submit.remove(&(session, cmid)).unwrap_or_default();
        let generation = self.handled_in.remove(&(session, cmid)).unwrap_or(0);
        let ack = match answer {
            Err(code) => {
                self.report.rejections += 1;
                self.note(format!("session {session:?}: send {cmid} to {to} refused {code:?}"));
                return Ok(());
            }
            Ok(ack) => ack,
        };
        self.note(format!(
            "session {session:?}: send {cmid} to {to} acked seq {} dup={}",
            ack.seq, ack.duplicate
        ));
        self.report.acks += 1;
        if group {
            self.report.group_acks += 1;
        }
        if ack.duplicate {
            self.report.duplicate_acks += 1;
        }
        // Acks to different sessions travel different queues: a resend's duplicate ack may
        // arrive before the original's. Only one ack per send may say it is new.
        let entry = self.acked.entry((sender, key, cmid, generation)).or_insert((ack, false));
        if (entry.0.seq, entry.0.msg_id) != (ack.seq, ack.msg_id) {
            return Err(format!(
                "send {cmid} of user {sender} in {key:?} acked as seq {} and as seq {}",
                entry.0.seq, ack.seq
            ));
        }
        if !ack.duplicate {
            if std::mem::replace(&mut entry.1, true) {
                return Err(format!("send {cmid} of user {sender} in {key:?} acked as new twice"));
            }
            if group {
                self.group_expectations.push((to, ack.seq, expected));
            } else {
                self.expectations.push((key, ack.seq, expected));
            }
        }
        self.learn(key, ack.seq, Known { sender, client_msg_id: cmid, msg_id: ack.msg_id })?;
        if self.cfg.durable {
            let stored = self.store.messages.get(&key).and_then(|m| m.get(&ack.seq));
            if stored.is_none_or(|&(s, id, _, _)| (s, id) != (sender, cmid)) {
                return Err(format!("acked seq {} of {key:?} is not in the store", ack.seq));
            }
        }
        Ok(())
    }

    /// Record what (conversation, seq) is, or check it agrees with what was seen before.
    fn learn(&mut self, key: ConvKey, seq: u64, k: Known) -> Result<(), String> {
        match self.known.get(&(key, seq)) {
            Some(prev) if *prev != k => {
                Err(format!("seq {seq} of {key:?} is two messages: {prev:?} and {k:?}"))
            }
            Some(_) => Ok(()),
            None => {
                self.known.insert((key, seq), k);
                Ok(())
            }
        }
    }

    fn on_deliver(&mut self, session: SessionRef, frame: &Bytes) -> Result<(), String> {
        match Header::read(frame).kind {
            kind::DELIVER => {}
            kind::GROUP_JOIN_REQUEST => {
                self.report.group_pushes += 1;
                return Ok(());
            }
            kind::GROUP_DECISION => {
                // To the requester: approved, it was made a member.
                let d = decode!(protocol::GroupDecision, payload(frame)).ok_or("undecodable decision")?;
                let Some(c) = self.clients.get(&session) else { return Ok(()) };
                if d.approved && !self.store.spans.contains_key(&(c.user, d.group_id)) {
                    return Err(format!("{session:?} of user {}: told {d:?}, never a member", c.user));
                }
                self.report.group_pushes += 1;
                return Ok(());
            }
            k => return Err(format!("{session:?} got a frame of kind {k}")),
        }
        let stamp = Stamp::read(&frame[HEADER_BYTES..]).ok_or("short frame")?;
        if stamp.conv == conv::GROUP {
            return self.on_group_deliver(session, stamp, frame);
        }
        let cmid = u64::from_le_bytes(frame[HEADER_BYTES + Stamp::BYTES..][..8].try_into().expect("8 bytes"));
        let key = direct_key(stamp.from, stamp.to);
        let Some(c) = self.clients.get_mut(&session) else { return Ok(()) };
        if c.user != stamp.from && c.user != stamp.to {
            return Err(format!("{session:?} of user {} got a message of {key:?}", c.user));
        }
        if let Some(&floor) = c.stream_floor.get(&key) {
            if stamp.seq <= floor {
                return Err(format!(
                    "{session:?} got seq {} of {key:?} (send {cmid} of user {}) after a stream message that follows seq {floor}",
                    stamp.seq, stamp.from
                ));
            }
        }
        let seen = c.seen.entry(key).or_insert(0);
        if stamp.seq <= *seen {
            return Err(format!("{session:?} got seq {} of {key:?} after seq {}", stamp.seq, *seen));
        }
        *seen = stamp.seq;
        c.delivered.insert((key, stamp.seq));
        if std::env::var("TIM_SIM_NOTE_DELIVERIES").is_ok() {
            self.note(format!(
                "session {session:?}: delivered seq {} of {key:?} cmid {cmid} from {}",
                stamp.seq, stamp.from
            ));
        }
        self.report.deliveries += 1;
        self.learn(key, stamp.seq, Known { sender: stamp.from, client_msg_id: cmid, msg_id: stamp.msg_id })
    }

    /// As the runtime does when a session ends: out of its shard's index, and the owner told.
    fn leave_rooms(&mut self, session: SessionRef, c: &Client) {
        for &room in c.rooms.keys() {
            self.forget_room_sub(session.shard(), room, session);
            self.room_request(session, 0, room, RoomOp::Unsubscribe { reply: false });
        }
    }

    fn forget_room_sub(&mut self, shard: usize, room: u64, session: SessionRef) {
        if let Some(list) = self.shards[shard].room_subs.get_mut(&room) {
            list.retain(|&s| s != session);
            if list.is_empty() {
                self.shards[shard].room_subs.remove(&room);
            }
        }
    }

    fn room_request(&mut self, session: SessionRef, user: UserId, room: u64, op: RoomOp) {
        self.report.room_requests += 1;
        let req = RoomRequest { origin: session, user, room, op };
        self.post(session.shard(), self.placement.room(room).shard(), Envelope::Room(Box::new(req)));
    }

    /// The room owner's answer, as the runtime handles it (`Shard::on_room_reply`).
    fn on_room_reply(
        &mut self,
        dst: usize,
        session: SessionRef,
        room: u64,
        kind_: u16,
        result: Result<u32, ErrorCode>,
    ) {
        let Some(c) = self.clients.get_mut(&session) else {
            if kind_ == kind::ROOM_SUBSCRIBE && result.is_ok() {
                // The session ended while subscribing: undone.
                self.room_request(session, 0, room, RoomOp::Unsubscribe { reply: false });
            }
            return;
        };
        if result.is_err() {
            return;
        }
        if kind_ == kind::ROOM_SUBSCRIBE && !c.rooms.contains_key(&room) {
            c.rooms.insert(room, 0);
            self.shards[dst].room_subs.entry(room).or_default().push(session);
        }
        if kind_ == kind::ROOM_UNSUBSCRIBE && c.rooms.remove(&room).is_some() {
            self.forget_room_sub(dst, room, session);
        }
    }

    /// A room message for this shard's subscribers: each gets it once, in `seq` order.
    fn on_room_fanout(
        &mut self,
        dst: usize,
        room: u64,
        skip: SessionRef,
        frame: &Bytes,
    ) -> Result<(), String> {
        let stamp = RoomStamp::read(&frame[HEADER_BYTES..]).ok_or("short room frame")?;
        if stamp.room_id != room {
            return Err(format!("room message of {} in a fan-out for {room}", stamp.room_id));
        }
        let subs = self.shards[dst].room_subs.get(&room).cloned().unwrap_or_default();
        for s in subs.into_iter().filter(|&s| s != skip) {
            let c =
                self.clients.get_mut(&s).ok_or_else(|| format!("room {room} indexes gone session {s:?}"))?;
            let last =
                c.rooms.get_mut(&room).ok_or_else(|| format!("{s:?} indexed in room {room} it is not in"))?;
            if stamp.seq <= *last {
                return Err(format!("{s:?} got room {room} seq {} after {}", stamp.seq, *last));
            }
            *last = stamp.seq;
            self.report.room_deliveries += 1;
        }
        Ok(())
    }

    /// A logged-in session does something with a room: create, subscribe, unsubscribe,
    /// publish or delete, on a room drawn so far (or a new one).
    fn room_action(&mut self, session: SessionRef) {
        let user = self.clients[&session].user;
        // Mostly one of the last rooms drawn (the older ones are likely closed by now).
        let pick = |sim: &mut Sim| -> Option<u64> {
            let n = sim.room_ids.len() as u64;
            if n == 0 {
                return None;
            }
            let back = if sim.rng.chance(80) { sim.rng.below(n.min(3)) } else { sim.rng.below(n) };
            Some(sim.room_ids[(n - 1 - back) as usize])
        };
        match self.rng.below(20) {
            0 | 1 => {
                let room = tim_shards::mix64(self.room_ids.len() as u64 + 1).max(1);
                self.room_ids.push(room);
                let publish =
                    if self.rng.chance(70) { room_publish::SUBSCRIBERS } else { self.rng.below(2) as u8 };
                let publishers = vec![1 + self.rng.below(self.cfg.users)];
                self.note(format!("session {session:?} of user {user}: creates room {room}"));
                self.room_request(
                    session,
                    user,
                    room,
                    RoomOp::Create { publish, subscribers_max: 0, publishers },
                );
            }
            2..=7 => {
                if let Some(room) = pick(self) {
                    self.note(format!("session {session:?}: subscribes to room {room}"));
                    self.room_request(session, user, room, RoomOp::Subscribe);
                }
            }
            8 | 9 => {
                if let Some(room) = pick(self) {
                    // As the runtime does: local delivery stops at once.
                    if self.clients.get_mut(&session).expect("client").rooms.remove(&room).is_some() {
                        self.forget_room_sub(session.shard(), room, session);
                    }
                    self.note(format!("session {session:?}: unsubscribes from room {room}"));
                    self.room_request(session, user, room, RoomOp::Unsubscribe { reply: true });
                }
            }
            10..=18 => {
                // Mostly to a room this session is in (the usual policy lets subscribers publish).
                let mine: Vec<u64> = self.clients[&session].rooms.keys().copied().collect();
                let room = if !mine.is_empty() && self.rng.chance(80) {
                    Some(mine[self.rng.below(mine.len() as u64) as usize])
                } else {
                    pick(self)
                };
                if let Some(room) = room {
                    let cmid = self.rng.below(1 << 30);
                    let frame = RoomRequest::blank_room_msg(&cmid.to_le_bytes());
                    self.room_request(session, user, room, RoomOp::Publish { client_msg_id: cmid, frame });
                }
            }
            _ => {
                if let Some(room) = pick(self) {
                    self.note(format!("session {session:?} of user {user}: deletes room {room}"));
                    self.room_request(session, user, room, RoomOp::Delete);
                }
            }
        }
    }

    /// A stream message reaches a session: once, for one of its user's conversations.
    fn on_stream(&mut self, session: SessionRef, frame: &Bytes) -> Result<(), String> {
        let stamp = Stamp::read(&frame[HEADER_BYTES..]).ok_or("short frame")?;
        let cmid = u64::from_le_bytes(frame[HEADER_BYTES + Stamp::BYTES..][..8].try_into().expect("8 bytes"));
        if stamp.conv == conv::GROUP {
            return self.on_group_stream(session, stamp, cmid);
        }
        let key = direct_key(stamp.from, stamp.to);
        let Some(c) = self.clients.get_mut(&session) else { return Ok(()) };
        if c.user != stamp.from && c.user != stamp.to {
            return Err(format!("{session:?} of user {} got a stream of {key:?}", c.user));
        }
        if stamp.msg_id != 0 || !c.streams.insert((stamp.from, cmid)) {
            return Err(format!(
                "{session:?} got stream {cmid} of user {} twice (or with an id)",
                stamp.from
            ));
        }
        let floor = c.stream_floor.entry(key).or_insert(0);
        *floor = (*floor).max(stamp.seq);
        self.report.stream_deliveries += 1;
        self.note(format!("session {session:?}: stream {cmid} of {key:?} (follows seq {})", stamp.seq));
        Ok(())
    }

    /// A logged-in session sends a stream message: to a user, itself or a ghost.
    fn send_stream(&mut self, session: SessionRef) {
        let sender = self.clients[&session].user;
        let to = match self.rng.below(20) {
            0 => GHOST_USER,
            1 => sender,
            _ => 1 + self.rng.below(self.cfg.users),
        };
        self.next_stream += 1;
        let cmid = STREAM_CMID_BASE + self.next_stream;
        self.report.streams += 1;
        self.note(format!("session {session:?} of user {sender}: streams {cmid} to {to}"));
        self.submit(session, sender, to, cmid, true);
    }

    fn client_action(&mut self) -> Result<(), String> {
        let roll = self.rng.below(100);
        let attached: Vec<SessionRef> =
            self.clients.iter().filter(|(_, c)| c.login == Login::Attached).map(|(&s, _)| s).collect();
        if roll < 12 || attached.is_empty() {
            self.connect();
        } else if roll < 18 {
            let all: Vec<SessionRef> = self.clients.keys().copied().collect();
            let s = all[self.rng.below(all.len() as u64) as usize];
            self.disconnect(s);
        } else if roll < 24 {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            if self.rng.chance(70) {
                self.send_stream(s);
            } else {
                self.send_group_stream(s);
            }
        } else if roll < 30 {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            self.room_action(s);
        } else if roll < 44 {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            self.group_action(s);
        } else {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            let resend = roll >= 88;
            let group = self.rng.chance(35);
            self.send(s, resend, group);
        }
        Ok(())
    }

    fn connect(&mut self) {
        let shard = self.rng.below(self.cfg.shards as u64) as usize;
        let user = 1 + self.rng.below(self.cfg.users);
        let device_type = DeviceType::from_u8(self.rng.below(3) as u8).expect("valid");
        let session = SessionRef::new(shard, self.next_session[shard]);
        self.next_session[shard] += 1;
        self.clients.insert(
            session,
            Client {
                user,
                device_type,
                login: Login::Waiting,
                inflight: BTreeMap::new(),
                seen: HashMap::new(),
                delivered: BTreeSet::new(),
                stream_floor: HashMap::new(),
                streams: BTreeSet::new(),
                rooms: BTreeMap::new(),
            },
        );
        self.note(format!("session {session:?}: user {user} logs in as {device_type:?}"));
        let attach = Attach { user, session, device_type, device_id: String::new(), token: None };
        self.post(shard, self.placement.user(user).shard(), Envelope::Attach(Box::new(attach)));
    }

    fn disconnect(&mut self, session: SessionRef) {
        let c = self.clients.remove(&session).expect("client");
        self.leave_rooms(session, &c);
        self.note(format!("session {session:?} of user {}: disconnects", c.user));
        if c.login == Login::Attached {
            self.post(
                session.shard(),
                self.placement.user(c.user).shard(),
                Envelope::Detach { user: c.user, session },
            );
        }
    }

    /// A send (or a resend) to a user, or to a group (`group`).
    fn send(&mut self, session: SessionRef, resend: bool, group: bool) {
        let c = &self.clients[&session];
        let sender = c.user;
        if c.inflight.len() >= self.cfg.inflight_max {
            return;
        }
        let previous: Vec<(u64, UserId)> = self
            .sent_ids
            .get(&sender)
            .map(|v| {
                v.iter()
                    .filter(|(id, to)| !c.inflight.contains_key(id) && protocol::is_group_id(*to) == group)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let (cmid, to) = if resend && !previous.is_empty() {
            previous[self.rng.below(previous.len() as u64) as usize]
        } else {
            let to = match self.rng.below(20) {
                _ if group => self.pick_group(sender, 85),
                0 => GHOST_USER,
                1 => sender,
                _ => 1 + self.rng.below(self.cfg.users),
            };
            let n = self.next_cmid.entry(sender).or_insert(0);
            *n += 1 + self.rng.below(3);
            let cmid = *n;
            self.sent_ids.entry(sender).or_default().push((cmid, to));
            (cmid, to)
        };
        self.report.sends += 1;
        // Sessions that must see the message if it is acked as new: the recipient's, and the
        // sender's other ones, logged in now (for a group: every session but the sender's, of
        // which those of members at its seq count).
        let watchers: Vec<SessionRef> = self
            .clients
            .iter()
            .filter(|(&s, o)| {
                o.login == Login::Attached && s != session && (group || o.user == to || o.user == sender)
            })
            .map(|(&s, _)| s)
            .collect();
        if group {
            self.report.group_sends += 1;
            self.group_sends.insert((session, cmid), (to, sender));
        }
        self.expect_at_submit.insert((session, cmid), watchers);
        let c = self.clients.get_mut(&session).expect("client");
        c.inflight.insert(cmid, to);
        self.note(format!("session {session:?} of user {sender}: sends {cmid} to {to} (resend={resend})"));
        self.submit(session, sender, to, cmid, false);
    }

    /// Post a send (or a stream message) of `session` to its conversation's owner, or to its
    /// group's owner.
    fn submit(&mut self, session: SessionRef, sender: UserId, to: UserId, cmid: u64, stream: bool) {
        let group = protocol::is_group_id(to);
        let sub = Submit {
            stream,
            origin: session,
            sender,
            to,
            conv: if group { conv::GROUP } else { conv::DIRECT },
            client_msg_id: cmid,
            sender_device: session.0,
            frame: submit_frame(cmid),
            change: None,
            refuse_new: None,
            by_manager: false,
        };
        let dst = if group {
            self.placement.group(to).shard()
        } else {
            self.placement.conv(direct_key(sender, to)).shard()
        };
        self.post(session.shard(), dst, Envelope::Submit(Box::new(sub)));
    }

    fn check_roles(&self) -> Result<(), String> {
        for (i, s) in self.shards.iter().enumerate() {
            s.users.check().map_err(|e| format!("shard {i}: {e}"))?;
            s.convs.check().map_err(|e| format!("shard {i}: {e}"))?;
            s.rooms.check().map_err(|e| format!("shard {i}: {e}"))?;
            s.groups.check().map_err(|e| format!("shard {i}: {e}"))?;
        }
        Ok(())
    }

    /// Once everything has landed.
    fn check_end(&mut self) -> Result<(), String> {
        // Room subscriptions agree everywhere: the owners count exactly the sessions that are
        // open and subscribed, and each shard's index lists exactly those of its sessions.
        let owned: BTreeSet<(u64, SessionRef)> =
            self.shards.iter().flat_map(|s| s.rooms.subscriptions()).collect();
        let held: BTreeSet<(u64, SessionRef)> =
            self.clients.iter().flat_map(|(&s, c)| c.rooms.keys().map(move |&r| (r, s))).collect();
        if owned != held {
            let phantom: Vec<_> = owned.difference(&held).take(3).collect();
            let missing: Vec<_> = held.difference(&owned).take(3).collect();
            return Err(format!(
                "room subscriptions disagree: owners only {phantom:?}, sessions only {missing:?}"
            ));
        }
        let indexed: BTreeSet<(u64, SessionRef)> = self
            .shards
            .iter()
            .flat_map(|s| s.room_subs.iter().flat_map(|(&r, l)| l.iter().map(move |&x| (r, x))))
            .collect();
        if indexed != held {
            return Err("a shard's room index disagrees with its sessions' subscriptions".into());
        }
        for (&s, c) in &self.clients {
            if c.login != Login::Attached {
                return Err(format!("{s:?} of user {} never got its login answer", c.user));
            }
            if let Some(cmid) = c.inflight.keys().next() {
                return Err(format!("{s:?}: send {cmid} never answered"));
            }
        }
        for (key, seq, watchers) in &self.expectations {
            for w in watchers {
                if let Some(c) = self.clients.get(w) {
                    if !c.delivered.contains(&(*key, *seq)) {
                        return Err(format!(
                            "acked seq {seq} of {key:?} never reached {w:?} of user {}",
                            c.user
                        ));
                    }
                }
            }
        }
        for user in 1..=self.cfg.users {
            let owner = &self.shards[self.placement.user(user).shard()].users;
            let live: BTreeSet<SessionRef> = owner.sessions(user).map(|(s, _)| s).collect();
            let open: BTreeSet<SessionRef> =
                self.clients.iter().filter(|(_, c)| c.user == user).map(|(&s, _)| s).collect();
            if live != open {
                return Err(format!("user {user}: the owner holds {live:?}, the open sessions are {open:?}"));
            }
            for (s, t) in owner.sessions(user) {
                if self.clients[&s].device_type != t {
                    return Err(format!("{s:?}: device type differs"));
                }
            }
        }
        if self.cfg.durable {
            for ((sender, key, cmid, _), (ack, _)) in &self.acked {
                let stored = self.store.messages.get(key).and_then(|m| m.get(&ack.seq));
                if stored.is_none_or(|&(s, id, _, _)| (s, id) != (*sender, *cmid)) {
                    return Err(format!("acked seq {} of {key:?} lost from the store", ack.seq));
                }
            }
        }
        self.check_groups_end()
    }
}

/// The local id of the session the end's checks ask the group owners as (no client has it).
const PROBE_LOCAL: u64 = 1 << 47;

/// Groups: the runtime's part (`Shard::with_groups` and the group arms of `Shard::execute`),
/// the clients' requests and sends, and the checks.
impl Sim {
    /// Call this shard's group owner, check what it decided against the stored state, and
    /// carry out its effects.
    fn group_call(
        &mut self,
        shard: usize,
        f: impl FnOnce(&mut GroupOwner, u64, &mut Effects),
    ) -> Result<(), String> {
        let mut fx = Vec::new();
        f(&mut self.shards[shard].groups, self.now, &mut fx);
        self.audit_group(&fx)?;
        self.execute(shard, fx)
    }

    /// `Effect::Sequence`: a group send (checked by its owner) or notice goes to this shard's
    /// conversation owner.
    fn sequence(&mut self, shard: usize, sub: Box<Submit>) -> Result<(), String> {
        let key = group_conv(sub.to);
        if self.placement.conv(key).shard() != shard {
            return Err(format!("group {} sequenced on shard {shard}", sub.to));
        }
        let (origin, cmid, send) = (sub.origin, sub.client_msg_id, sub.sender != 0 && !sub.stream);
        let mut fx = Vec::new();
        let convs = &mut self.shards[shard].convs;
        convs.submit(sub, self.now, &mut fx);
        if send {
            let generation = if self.cfg.durable { 0 } else { convs.generation(key).unwrap_or(0) };
            self.handled_in.insert((origin, cmid), generation);
        }
        self.execute(shard, fx)
    }

    /// `Effect::GroupPublish`: the group owner fans a published message out.
    fn group_published(&mut self, shard: usize, p: GroupPublish) -> Result<(), String> {
        let (g, seq, notice, stream) = (p.group, p.seq, p.notice, p.stream);
        if notice {
            self.notice_inflight.remove(&g);
        }
        if !stream {
            let top = self.group_published.entry(g).or_insert(0);
            if !self.cfg.durable {
                let notice_before_open = self.notices_open.range((g, 0)..(g, seq)).next().is_some();
                if (notice && *top > seq) || (!notice && notice_before_open) {
                    self.raced.insert((g, seq));
                }
            }
            *top = (*top).max(seq);
            if !notice {
                self.group_origin.insert((g, seq), p.skip);
            }
        }
        // The group owner's load ends with sends that waited for it ahead of messages published
        // meanwhile: a send it lets through is published by the conversation owner at once (a
        // stream message; a message too in no-data mode), and fanned out before those.
        let pending = self.pending_publish.get(&g).map_or(&[][..], |v| &v[..]);
        if !notice && pending.iter().any(|&s| s < seq || (stream && s <= seq)) {
            if stream {
                let cmid = u64::from_le_bytes(
                    p.frame[HEADER_BYTES + Stamp::BYTES..][..8].try_into().expect("8 bytes"),
                );
                self.raced_streams.insert(cmid);
            } else {
                let behind: Vec<u64> = pending.iter().copied().filter(|&s| s < seq).collect();
                self.raced.insert((g, seq));
                self.raced.extend(behind.into_iter().map(|s| (g, s)));
            }
        }
        self.note(format!(
            "shard {shard}: group {g} publishes seq {seq}{}",
            if notice {
                " (notice)"
            } else if stream {
                " (stream)"
            } else {
                ""
            }
        ));
        let mut fx = Vec::new();
        self.shards[shard].groups.published(p, self.now, &mut fx);
        // Its group is loading (or is loaded again for it): fanned out once loaded.
        let loads = fx.iter().any(|e| matches!(e, Effect::LoadGroup(x) if *x == g));
        if !stream && (loads || self.group_loading.contains_key(&g)) {
            self.group_loading.entry(g).or_default().push(seq);
        }
        self.audit_group(&fx)?;
        self.execute(shard, fx)
    }

    /// The stored state's answer to a group request now.
    fn model(&self, a: &GroupAsk) -> Result<Want, ErrorCode> {
        let creating = self.notice_inflight.get(&a.group) == Some(&ev::CREATED);
        model_request(self.store.groups.get(&a.group), creating, a.user, &a.ask, &self.limits)
    }

    /// Check a group owner's decisions (one call's effects) against the stored state: the
    /// owner's state must be the stored one, and its rules the reference model's.
    fn audit_group(&mut self, fx: &Effects) -> Result<(), String> {
        let mut fanouts: BTreeMap<(u64, u64, bool, usize), Vec<UserId>> = BTreeMap::new();
        for e in fx {
            match e {
                Effect::Sequence(sub) if sub.sender == 0 => {
                    let n = notice_in(&sub.frame).ok_or("an undecodable notice")?;
                    self.notice_started(sub.to, &n)?;
                }
                Effect::Sequence(sub) => {
                    // A refused send goes on marked (a resend may still find its stored
                    // original): the mark must be the stored state's answer.
                    let want = model_send(self.store.groups.get(&sub.to), sub.sender, self.now);
                    match (sub.refuse_new, want) {
                        (None, Ok(())) => {}
                        (Some(got), Err(code)) if got == code => {}
                        (got, want) => {
                            return Err(format!(
                                "group {}: send {} of user {} marked {got:?}, the stored state says {want:?}",
                                sub.to, sub.client_msg_id, sub.sender
                            ))
                        }
                    }
                }
                Effect::SaveJoinRequest { group, user, request } => {
                    self.request_started(*group, *user, request.is_some())?
                }
                Effect::Post(_, Envelope::GroupReply { session, request_kind, result }) => {
                    self.audit_reply(*session, *request_kind, result)?
                }
                Effect::Post(
                    _,
                    Envelope::Rejected { session, client_msg_id, code }
                    | Envelope::StreamRefused { session, client_msg_id, code },
                ) => self.audit_refusal(*session, *client_msg_id, *code)?,
                Effect::Post(_, Envelope::GroupFanout(f)) => {
                    let stamp = Stamp::read(&f.frame[HEADER_BYTES..]).ok_or("short frame")?;
                    let key = (stamp.to, stamp.seq, f.lossy, f.frame.as_ptr() as usize);
                    let users = fanouts.entry(key).or_default();
                    users.extend(f.users.iter().copied());
                }
                _ => {}
            }
        }
        // A fan-out goes to exactly the members at its seq (the store may hold later notices of
        // the same commit already), once each; a notice also to those it removed (whose span
        // ends at it).
        for ((g, seq, stream, _), mut users) in fanouts {
            users.sort_unstable();
            let mut members: Vec<UserId> = self
                .store
                .spans
                .iter()
                .filter(|((_, group), v)| {
                    *group == g
                        && v.iter()
                            .any(|&(from, until)| from <= seq && (seq < until || (!stream && seq == until)))
                })
                .map(|((u, _), _)| *u)
                .collect();
            members.sort_unstable();
            if stream && users != members {
                // A stream follows the last seq its conversation owner published, which lags the
                // store after a notice reported failed but stored: it goes to the members then
                // or now (the owner reloaded the group), never to anyone else.
                let now: BTreeSet<UserId> = self
                    .store
                    .spans
                    .iter()
                    .filter(|((_, group), v)| *group == g && v.iter().any(|&(_, until)| until == u64::MAX))
                    .map(|((u, _), _)| *u)
                    .collect();
                if let Some(u) = users.iter().find(|u| !members.contains(u) && !now.contains(u)) {
                    return Err(format!(
                        "group {g}: stream after seq {seq} fanned out to {u}, a member neither then ({members:?}) nor now ({now:?})"
                    ));
                }
                continue;
            }
            if users != members {
                return Err(format!(
                    "group {g}: seq {seq} fanned out to {users:?}, the members then are {members:?}"
                ));
            }
        }
        Ok(())
    }

    /// Start a change on `group` (event 0: a join request's save): one at a time.
    fn begin_change(&mut self, group: u64, event: u8) -> Result<(), String> {
        if let Some(e) = self.notice_inflight.insert(group, event) {
            return Err(format!("group {group}: a change ({event}) started while one ({e}) is in flight"));
        }
        Ok(())
    }

    /// A change's notice is on its way to be sequenced: a request in flight asked for it, and
    /// the stored state lets it.
    fn notice_started(&mut self, g: u64, n: &GroupNotice) -> Result<(), String> {
        // The owner starts a group's changes in the order they reached it: of identical
        // requests (sessions of one user), the first waiting.
        let found = self.waiting_asks(g).find(|(_, a)| {
            let until_ok = match a.ask {
                Ask::Action { action: act::MUTE | act::MUTE_ALL, until_ms, .. } => until_ms == n.until_ms,
                _ => true,
            };
            a.user == n.actor && until_ok && a.ask.event(a.user) == Some((n.event, n.target))
        });
        let Some((&session, a)) = found else {
            return Err(format!("group {g}: notice {n:?} started, which no request in flight asked for"));
        };
        let want = self.model(a);
        if want != Ok(Want::Notice(n.event, n.target)) {
            return Err(format!(
                "group {g}: {} of user {} ({session:?}) started (notice {n:?}), the stored state says {want:?}",
                a.ask.label(),
                a.user
            ));
        }
        self.group_asks.get_mut(&session).expect("found").started = true;
        self.note(format!("group {g}: notice {} of user {} starts", n.event, n.actor));
        self.begin_change(g, n.event)
    }

    /// The requests of group `g` that its owner may start, in the order they reached it.
    fn waiting_asks(&self, g: u64) -> impl Iterator<Item = (&SessionRef, &GroupAsk)> {
        let mut v: Vec<(&SessionRef, &GroupAsk)> = self
            .group_asks
            .iter()
            .filter(|(_, a)| a.group == g && a.arrived > 0 && !a.started && !a.answered)
            .collect();
        v.sort_by_key(|(_, a)| a.arrived);
        v.into_iter()
    }

    /// A join request is being kept (`keep`) or dropped.
    fn request_started(&mut self, g: u64, user: UserId, keep: bool) -> Result<(), String> {
        let found = self.waiting_asks(g).find(|(_, a)| match a.ask {
            Ask::Action { action: act::JOIN, .. } => keep && a.user == user,
            Ask::Action { action: act::REJECT, target, .. } => !keep && target == user,
            _ => false,
        });
        let Some((&session, a)) = found else {
            return Err(format!(
                "group {g}: join request of user {user} saved (kept={keep}), which no request in flight asked for"
            ));
        };
        let want = self.model(a);
        if want != Ok(Want::Request(user, keep)) {
            return Err(format!(
                "group {g}: {} of user {} ({session:?}) saves a join request, the stored state says {want:?}",
                a.ask.label(),
                a.user
            ));
        }
        self.group_asks.get_mut(&session).expect("found").started = true;
        self.begin_change(g, 0)
    }

    /// A group owner answers a request: the answer the stored state gives.
    fn audit_reply(
        &mut self,
        session: SessionRef,
        request_kind: u16,
        result: &Result<Bytes, ErrorCode>,
    ) -> Result<(), String> {
        let Some(a) = self.group_asks.get_mut(&session) else {
            return Err(format!("a group answer for {session:?}, which has no group request in flight"));
        };
        if std::mem::replace(&mut a.answered, true) {
            return Err(format!("{session:?}: a second answer to its group request"));
        }
        let a = &self.group_asks[&session];
        let what = format!("group {}: {} of user {} ({session:?})", a.group, a.ask.label(), a.user);
        if a.ask.kind() != request_kind {
            return Err(format!("{what}: answered as a request of kind {request_kind}"));
        }
        let stored = self.store.groups.get(&a.group);
        match result {
            Err(ErrorCode::Busy | ErrorCode::StoreUnavailable) => Ok(()),
            // Waiting behind a creation that failed.
            Err(ErrorCode::GroupNotFound) if matches!(a.ask, Ask::Create(_)) && stored.is_none() => Ok(()),
            Err(code) if a.started => Err(format!("{what}: refused {code:?} after it started")),
            Err(code) => {
                let want = self.model(a);
                if want != Err(*code) {
                    return Err(format!("{what}: refused {code:?}, the stored state says {want:?}"));
                }
                Ok(())
            }
            Ok(frame) => self.audit_answer(a, frame).map_err(|e| format!("{what}: {e}")),
        }
    }

    /// A successful answer: what the stored state holds.
    fn audit_answer(&self, a: &GroupAsk, frame: &[u8]) -> Result<(), String> {
        let g = a.group;
        let k = Header::read(frame).kind;
        let payload = payload(frame);
        let want = self.model(a);
        if k != kind::GROUP_OK && want != Ok(Want::Answer) {
            return Err(format!("answered (kind {k}), the stored state says {want:?}"));
        }
        let Some(sg) = self.store.groups.get(&g) else {
            return Err(format!("answered (kind {k}), the group is not stored"));
        };
        match (k, &a.ask) {
            (kind::GROUP_OK, ask) => {
                let ok = decode!(protocol::GroupOk, payload).ok_or("undecodable GroupOk")?;
                if !ask.is_change() || !a.started || ok.group_id != g || ok.request_kind != ask.kind() {
                    return Err(format!("{ok:?} for a request not started (or another)"));
                }
                if ok.seq == 0 {
                    let kept = match ask {
                        Ask::Action { action: act::JOIN, .. } => sg.requests.contains_key(&a.user),
                        Ask::Action { action: act::REJECT, target, .. } => !sg.requests.contains_key(target),
                        _ => false,
                    };
                    if !kept {
                        return Err(format!(
                            "{ok:?} with no notice, the stored requests are {:?}",
                            sg.requests
                        ));
                    }
                } else {
                    let n = self.store.notices.get(&(g, ok.seq));
                    if n.is_none_or(|n| n.actor != a.user || ask.event(a.user) != Some((n.event, n.target))) {
                        return Err(format!("{ok:?}, the stored notice at its seq is {n:?}"));
                    }
                }
            }
            (kind::GROUP_INFO, Ask::Get) => {
                let info = decode!(protocol::GroupInfo, payload).ok_or("undecodable GroupInfo")?;
                let want = protocol::GroupInfo {
                    group_id: g,
                    profile: sg.row.profile.clone(),
                    founder: sg.row.founder,
                    members: sg.members.len() as u32,
                    muted_all_until_ms: sg.row.muted_all_until_ms,
                    my_role: sg.role_of(a.user).unwrap_or(crate::roles::group::NOT_A_MEMBER),
                };
                if info != want {
                    return Err(format!("answered {info:?}, the stored state says {want:?}"));
                }
            }
            (kind::GROUP_MEMBER_PAGE, Ask::Members) => {
                let page = decode!(protocol::GroupMemberPage, payload).ok_or("undecodable member page")?;
                let want: Vec<protocol::GroupMember> = sg
                    .members
                    .values()
                    .map(|m| protocol::GroupMember {
                        user_id: m.user,
                        role: m.role,
                        muted_until_ms: m.muted_until_ms,
                    })
                    .collect();
                if page.group_id != g || page.members != want || page.more {
                    return Err(format!("answered {page:?}, the stored members are {want:?}"));
                }
            }
            (kind::GROUP_REQUEST_PAGE, Ask::Requests) => {
                let page = decode!(protocol::GroupRequestPage, payload).ok_or("undecodable request page")?;
                let want: Vec<JoinRequest> = sg.requests.values().cloned().collect();
                if page.group_id != g || page.requests != want {
                    return Err(format!("answered {page:?}, the stored requests are {want:?}"));
                }
            }
            (k, _) => return Err(format!("answered with a frame of kind {k}")),
        }
        Ok(())
    }

    /// A group owner refuses a send or stream message: for the reason the stored state gives.
    fn audit_refusal(&mut self, session: SessionRef, cmid: u64, code: ErrorCode) -> Result<(), String> {
        let Some(&(g, sender)) = self.group_sends.get(&(session, cmid)) else {
            return Err(format!("group owner refused send {cmid} of {session:?}, which it was not sent"));
        };
        if matches!(code, ErrorCode::Busy | ErrorCode::StoreUnavailable) {
            return Ok(());
        }
        let want = model_send(self.store.groups.get(&g), sender, self.now);
        if want != Err(code) {
            return Err(format!(
                "group {g}: send {cmid} of user {sender} refused {code:?}, the stored state says {want:?}"
            ));
        }
        Ok(())
    }

    /// A notice was stored: apply its changes and check they are what it says.
    fn store_change(&mut self, change: &GroupChange, seq: u64, frame: &[u8]) -> Result<(), String> {
        let g = change.group;
        let n = notice_in(frame).ok_or_else(|| format!("group {g}: undecodable notice {seq}"))?;
        let before = self.store.groups.get(&g).cloned();
        self.store.apply_group(g, seq, &change.writes);
        let after = &self.store.groups[&g];
        check_change(before.as_ref(), after, &n, seq).and_then(|()| check_founder(after)).map_err(|e| {
            format!("group {g}: stored notice {seq} {n:?}: {e} (before {before:?}, after {after:?})")
        })?;
        self.store.notices.insert((g, seq), n.clone());
        self.report.group_notices += 1;
        self.note(format!(
            "group {g}: notice {seq} stored: event {} by {} on {}",
            n.event, n.actor, n.target
        ));
        Ok(())
    }

    /// A group answer lands: the one answer of the session's request.
    fn on_group_reply(
        &mut self,
        session: SessionRef,
        request_kind: u16,
        result: &Result<Bytes, ErrorCode>,
    ) -> Result<(), String> {
        let Some(a) = self.group_asks.remove(&session) else {
            return Err(format!(
                "{session:?}: a group answer with no group request in flight (a second one?)"
            ));
        };
        if a.ask.kind() != request_kind {
            return Err(format!("{session:?}: {} answered as kind {request_kind}", a.ask.label()));
        }
        match result {
            Ok(_) => self.report.group_oks += 1,
            Err(code) => {
                self.report.group_refusals += 1;
                if *code == ErrorCode::Busy && matches!(a.ask, Ask::Create(_)) {
                    self.report.group_collisions += 1;
                }
            }
        }
        self.note(format!(
            "session {session:?}: group {} {} -> {:?}",
            a.group,
            a.ask.label(),
            result.as_ref().map(|_| ())
        ));
        Ok(())
    }

    /// A group message or notice reaches a session.
    fn on_group_deliver(&mut self, session: SessionRef, stamp: Stamp, frame: &Bytes) -> Result<(), String> {
        let (g, seq) = (stamp.to, stamp.seq);
        let key = group_conv(g);
        let notice = stamp.from == 0;
        let cmid = if notice {
            stamp.msg_id
        } else {
            u64::from_le_bytes(frame[HEADER_BYTES + Stamp::BYTES..][..8].try_into().expect("8 bytes"))
        };
        let Some(c) = self.clients.get(&session) else { return Ok(()) };
        let user = c.user;
        let exempt = !self.cfg.strict.order && self.raced.contains(&(g, seq));
        if !notice && self.group_origin.get(&(g, seq)) == Some(&session) {
            return Err(format!("{session:?} got its own message back: seq {seq} of group {g}"));
        }
        if !exempt && !self.store.member_at(user, g, seq, notice) {
            return Err(format!(
                "{session:?} of user {user} got seq {seq} of group {g} (from {}), not a member then (memberships {:?})",
                stamp.from,
                self.store.spans.get(&(user, g))
            ));
        }
        let c = self.clients.get_mut(&session).expect("client");
        if !exempt {
            if let Some(&floor) = c.stream_floor.get(&key) {
                if seq <= floor {
                    return Err(format!(
                        "{session:?} got seq {seq} of group {g} after a stream message that follows seq {floor}"
                    ));
                }
            }
            let seen = c.seen.get(&key).copied().unwrap_or(0);
            if seq <= seen {
                return Err(format!("{session:?} got seq {seq} of group {g} after seq {seen}"));
            }
        }
        let seen = c.seen.entry(key).or_insert(0);
        *seen = (*seen).max(seq);
        c.delivered.insert((key, seq));
        self.report.group_deliveries += 1;
        if std::env::var("TIM_SIM_NOTE_DELIVERIES").is_ok() {
            self.note(format!("session {session:?}: delivered seq {seq} of group {g} from {}", stamp.from));
        }
        self.learn(key, seq, Known { sender: stamp.from, client_msg_id: cmid, msg_id: stamp.msg_id })
    }

    /// A group stream message reaches a session: once, to a member, not to its sender.
    fn on_group_stream(&mut self, session: SessionRef, stamp: Stamp, cmid: u64) -> Result<(), String> {
        let g = stamp.to;
        let Some(c) = self.clients.get_mut(&session) else { return Ok(()) };
        let user = c.user;
        if self.group_streams.get(&cmid) == Some(&session) {
            return Err(format!("{session:?} got its own stream message {cmid} back (group {g})"));
        }
        if !self.store.member_at_stream(user, g, stamp.seq) {
            return Err(format!(
                "{session:?} of user {user} got stream {cmid} of group {g} (follows {}), not a member then (memberships {:?})",
                stamp.seq,
                self.store.spans.get(&(user, g))
            ));
        }
        if stamp.msg_id != 0 || !c.streams.insert((stamp.from, cmid)) {
            return Err(format!("{session:?} got stream {cmid} of group {g} twice (or with an id)"));
        }
        if self.cfg.strict.order || !self.raced_streams.contains(&cmid) {
            let floor = c.stream_floor.entry(group_conv(g)).or_insert(0);
            *floor = (*floor).max(stamp.seq);
        }
        self.report.group_stream_deliveries += 1;
        Ok(())
    }

    /// A group for `user` to act on or send to: mostly one it is in, or one that exists, else
    /// any id of the range.
    fn pick_group(&mut self, user: UserId, mine_percent: u64) -> u64 {
        let mine: Vec<u64> = self
            .store
            .groups
            .iter()
            .filter(|(_, g)| g.members.contains_key(&user))
            .map(|(&id, _)| id)
            .collect();
        let live: Vec<u64> =
            self.store.groups.iter().filter(|(_, g)| !g.row.dissolved).map(|(&id, _)| id).collect();
        let roll = self.rng.below(100);
        if roll < mine_percent && !mine.is_empty() {
            mine[self.rng.below(mine.len() as u64) as usize]
        } else if roll < 95 && !live.is_empty() {
            live[self.rng.below(live.len() as u64) as usize]
        } else {
            protocol::GROUP_ID_MIN + self.rng.below(self.cfg.group_ids)
        }
    }

    /// Whom to act on: a member, a requester or a blocked user of the group, or anyone.
    fn pick_target(&mut self, group: u64, user: UserId) -> UserId {
        let (known, blocked): (Vec<UserId>, Vec<UserId>) = match self.store.groups.get(&group) {
            Some(g) => (
                g.members.keys().chain(g.requests.keys()).copied().collect(),
                g.blocked.iter().copied().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        match self.rng.below(10) {
            0 => user,
            1 => 0,
            2..=5 if !known.is_empty() => known[self.rng.below(known.len() as u64) as usize],
            6 if !blocked.is_empty() => blocked[self.rng.below(blocked.len() as u64) as usize],
            _ => 1 + self.rng.below(self.cfg.users),
        }
    }

    /// A profile; with `bad`, sometimes one the owner must refuse.
    fn profile(&mut self, bad: bool) -> GroupProfile {
        let mut p = GroupProfile {
            name: format!("g{}", self.rng.below(100)),
            topic: "a topic".into(),
            avatar_url: String::new(),
            extra: vec![1, 2, 3],
            join_policy: if self.rng.chance(40) { join_policy::APPROVAL } else { join_policy::OPEN },
            invite_policy: self.rng.below(2) as u8,
        };
        if bad && self.rng.chance(10) {
            match self.rng.below(4) {
                0 => p.name.clear(),
                1 => p.topic = "x".repeat(self.limits.group_text_bytes_max + 1),
                2 => p.join_policy = 7,
                _ => p.extra = vec![0; self.limits.group_extra_bytes_max + 1],
            }
        }
        p
    }

    /// A logged-in session asks something of a group (when no group request of its is in
    /// flight: a session waits for each answer).
    fn group_action(&mut self, session: SessionRef) {
        if self.group_asks.contains_key(&session) {
            return;
        }
        let user = self.clients[&session].user;
        let roll = self.rng.below(100);
        let live = self.store.groups.values().filter(|g| !g.row.dissolved).count() as u64;
        let (group, ask) = if roll < 6 || (live < self.cfg.group_ids / 2 && self.rng.chance(30)) {
            // A new id drawn from a few: sometimes one that is taken.
            let group = protocol::GROUP_ID_MIN + self.rng.below(self.cfg.group_ids);
            (group, Ask::Create(self.profile(self.cfg.strict.create)))
        } else {
            let group = self.pick_group(user, 60);
            let ask = match roll {
                8..=9 => Ask::Update(self.profile(true)),
                10..=14 => Ask::Get,
                15..=17 => Ask::Members,
                18..=19 => Ask::Requests,
                _ => {
                    let action = match roll {
                        20..=31 => act::JOIN,
                        32..=36 => act::LEAVE,
                        37..=44 => act::INVITE,
                        45..=49 => act::KICK,
                        50..=55 => act::APPROVE,
                        56..=58 => act::REJECT,
                        59..=62 => act::ADD_MANAGER,
                        63..=65 => act::REMOVE_MANAGER,
                        66..=68 => act::TRANSFER,
                        69..=75 => act::MUTE,
                        76..=79 => act::MUTE_ALL,
                        80..=85 => act::BLOCK,
                        86..=90 => act::UNBLOCK,
                        91 if self.rng.chance(50) => act::DISSOLVE,
                        92 => 99, // no such action
                        _ => act::JOIN,
                    };
                    let target = match action {
                        act::JOIN | act::LEAVE | act::MUTE_ALL | act::DISSOLVE if self.rng.chance(90) => 0,
                        _ => self.pick_target(group, user),
                    };
                    let until_ms = match action {
                        act::MUTE | act::MUTE_ALL if self.rng.chance(70) => self.now + self.rng.below(80),
                        _ => 0,
                    };
                    let note = if self.rng.chance(5) {
                        "x".repeat(self.limits.group_text_bytes_max + 1)
                    } else {
                        "let me in".into()
                    };
                    Ask::Action { action, target, until_ms, note }
                }
            };
            (group, ask)
        };
        self.report.group_requests += 1;
        self.note(format!("session {session:?} of user {user}: group {group} {}", ask.label()));
        let req = GroupRequest { origin: session, user, group, op: ask.op() };
        self.group_asks
            .insert(session, GroupAsk { user, group, ask, started: false, arrived: 0, answered: false });
        self.post(session.shard(), self.placement.group(group).shard(), Envelope::Group(Box::new(req)));
    }

    /// A logged-in session sends a stream message to a group.
    fn send_group_stream(&mut self, session: SessionRef) {
        let sender = self.clients[&session].user;
        let group = self.pick_group(sender, 85);
        self.next_stream += 1;
        let cmid = STREAM_CMID_BASE + self.next_stream;
        self.report.streams += 1;
        self.group_sends.insert((session, cmid), (group, sender));
        self.group_streams.insert(cmid, session);
        self.note(format!("session {session:?} of user {sender}: streams {cmid} to group {group}"));
        self.submit(session, sender, group, cmid, true);
    }

    /// Once everything has landed: every group request answered, every acked group message
    /// delivered to the sessions that had to get it, and the group owners' groups equal to the
    /// store's.
    fn check_groups_end(&mut self) -> Result<(), String> {
        if let Some((s, a)) = self.group_asks.iter().next() {
            return Err(format!("{s:?}: group {} {} never answered", a.group, a.ask.label()));
        }
        if let Some((g, e)) = self.notice_inflight.iter().next() {
            return Err(format!("group {g}: change {e} still in flight"));
        }
        for (g, seq, watchers) in &self.group_expectations {
            let exempt = !self.cfg.strict.order && self.raced.contains(&(*g, *seq));
            if exempt || self.lost_live.contains(&(*g, *seq)) {
                continue;
            }
            for w in watchers {
                let Some(c) = self.clients.get(w) else { continue };
                if self.store.member_at(c.user, *g, *seq, false)
                    && !c.delivered.contains(&(group_conv(*g), *seq))
                {
                    return Err(format!(
                        "acked seq {seq} of group {g} never reached {w:?} of user {}, a member then",
                        c.user
                    ));
                }
            }
        }
        // Ask each group's owner what it holds, as its founder (or anyone once dissolved);
        // a group it does not hold is left alone.
        for id in 0..self.cfg.group_ids {
            let group = protocol::GROUP_ID_MIN + id;
            let shard = self.placement.group(group).shard();
            let user = self.store.groups.get(&group).map_or(1, |g| g.row.founder.max(1));
            let probe = SessionRef::new(shard, PROBE_LOCAL);
            for ask in [Ask::Get, Ask::Members, Ask::Requests] {
                let mut fx = Vec::new();
                let req = GroupRequest { origin: probe, user, group, op: ask.op() };
                self.shards[shard].groups.request(Box::new(req), self.now, &mut fx);
                if fx.iter().any(|e| matches!(e, Effect::LoadGroup(_))) {
                    break;
                }
                if !fx.iter().any(|e| matches!(e, Effect::Post(_, Envelope::GroupReply { .. }))) {
                    return Err(format!("group {group}: {} not answered at once", ask.label()));
                }
                let a = GroupAsk { user, group, ask, started: false, arrived: 1, answered: false };
                self.group_asks.insert(probe, a);
                self.audit_group(&fx).map_err(|e| format!("at the end: {e}"))?;
                self.group_asks.remove(&probe);
            }
        }
        Ok(())
    }
}

impl Ask {
    /// For traces.
    fn label(&self) -> String {
        match self {
            Ask::Create(p) | Ask::Update(p) => {
                let what = if matches!(self, Ask::Create(_)) { "create" } else { "update" };
                format!("{what} (join {}, invite {}, name {:?})", p.join_policy, p.invite_policy, p.name)
            }
            Ask::Action { action, target, until_ms, note } => {
                format!("action {action} on {target} until {until_ms} (note of {})", note.len())
            }
            Ask::Get => "get".into(),
            Ask::Members => "members".into(),
            Ask::Requests => "requests".into(),
        }
    }
}

impl FakeStore {
    /// Apply a stored notice's changes, as `MemoryInner::apply` does, keeping each membership's
    /// span.
    fn apply_group(&mut self, group: u64, seq: u64, writes: &[GroupWrite]) {
        let FakeStore { groups, spans, .. } = self;
        let g = groups.entry(group).or_default();
        for w in writes {
            match w {
                GroupWrite::Group(row) => g.row = row.clone(),
                GroupWrite::Join { user, role } => {
                    let m = MemberRow { user: *user, role: *role, muted_until_ms: 0, from_seq: seq };
                    g.members.insert(*user, m);
                    g.requests.remove(user);
                    let v = spans.entry((*user, group)).or_default();
                    if let Some(open) = v.last_mut().filter(|s| s.1 == u64::MAX) {
                        open.1 = seq;
                    }
                    v.push((seq, u64::MAX));
                }
                GroupWrite::Member { user, role, muted_until_ms } => {
                    if let Some(m) = g.members.get_mut(user) {
                        m.role = *role;
                        m.muted_until_ms = *muted_until_ms;
                    }
                }
                GroupWrite::Leave { user } => {
                    if g.members.remove(user).is_some() {
                        close_span(spans, *user, group, seq);
                    }
                }
                GroupWrite::LeaveAll => {
                    for user in std::mem::take(&mut g.members).into_keys() {
                        close_span(spans, user, group, seq);
                    }
                }
                GroupWrite::Block { user } => {
                    g.blocked.insert(*user);
                }
                GroupWrite::Unblock { user } => {
                    g.blocked.remove(user);
                }
                GroupWrite::Unrequest { user } => {
                    g.requests.remove(user);
                }
            }
        }
    }

    /// Whether `user` may get seq `seq` of `group`: a message sent while it was a member, or a
    /// notice from the one that made it a member to the one that ended it.
    fn member_at(&self, user: UserId, group: u64, seq: u64, notice: bool) -> bool {
        self.spans.get(&(user, group)).is_some_and(|v| {
            v.iter().any(
                |&(from, until)| if notice { from <= seq && seq <= until } else { from < seq && seq < until },
            )
        })
    }

    /// Whether `user` was a member once seq `follows` was published (a stream message after it).
    /// Whether `user` may get a group stream that follows `follows`: a member at that seq, or
    /// one that joined later (a stream follows the last seq its conversation owner published,
    /// which lags the store after a notice reported failed but stored).
    fn member_at_stream(&self, user: UserId, group: u64, follows: u64) -> bool {
        self.spans.get(&(user, group)).is_some_and(|v| v.iter().any(|&(_, until)| follows < until))
    }
}

fn close_span(spans: &mut HashMap<(UserId, u64), Vec<(u64, u64)>>, user: UserId, group: u64, seq: u64) {
    if let Some(open) = spans.get_mut(&(user, group)).and_then(|v| v.last_mut()).filter(|s| s.1 == u64::MAX) {
        open.1 = seq;
    }
}

/// A frame's payload.
fn payload(frame: &[u8]) -> &[u8] {
    let len = Header::read(frame).len as usize;
    &frame[HEADER_BYTES..HEADER_BYTES + len]
}

/// The notice a group notice's `DELIVER` frame carries.
fn notice_in(frame: &[u8]) -> Option<GroupNotice> {
    let send = decode!(protocol::Send, payload(frame).get(Stamp::BYTES..)?)?;
    decode!(GroupNotice, &send.body)
}

/// As the group owner checks a profile.
fn check_profile(p: &GroupProfile, l: &Limits) -> Result<(), ErrorCode> {
    let texts_ok = [&p.name, &p.topic, &p.avatar_url].iter().all(|t| t.len() <= l.group_text_bytes_max);
    if !texts_ok
        || p.name.is_empty()
        || p.extra.len() > l.group_extra_bytes_max
        || p.join_policy > join_policy::APPROVAL
        || p.invite_policy > invite_policy::MEMBERS
    {
        return Err(ErrorCode::InvalidGroup);
    }
    Ok(())
}

/// The reference model of the group rules (protocol.rs documents them): what a request comes
/// to on the stored group (`None`: not stored; `creating`: its creation is in flight).
fn model_request(
    stored: Option<&StoredGroup>,
    creating: bool,
    me: UserId,
    ask: &Ask,
    l: &Limits,
) -> Result<Want, ErrorCode> {
    use ErrorCode::*;
    let empty = StoredGroup::default();
    let g = match stored {
        Some(g) => g,
        None if creating => &empty,
        // Only a creation takes a group that does not exist.
        None => {
            return match ask {
                Ask::Create(p) => check_profile(p, l).map(|()| Want::Notice(ev::CREATED, 0)),
                _ => Err(GroupNotFound),
            }
        }
    };
    let dissolved = || if g.row.dissolved { Err(GroupDissolved) } else { Ok(()) };
    let my_role = g.role_of(me);
    let member = || my_role.ok_or(NotMember);
    // Queries are answered at once; changes are checked for size first.
    match ask {
        Ask::Get => {
            dissolved()?;
            return if stored.is_none() { Err(GroupNotFound) } else { Ok(Want::Answer) };
        }
        Ask::Members => {
            dissolved()?;
            if stored.is_none() {
                return Err(GroupNotFound);
            }
            member()?;
            return Ok(Want::Answer);
        }
        Ask::Requests => {
            dissolved()?;
            if stored.is_none() {
                return Err(GroupNotFound);
            }
            if member()? < role::MANAGER {
                return Err(NotManager);
            }
            return Ok(Want::Answer);
        }
        Ask::Create(p) => {
            check_profile(p, l)?;
            // The id is taken.
            return if stored.is_some() { Err(Busy) } else { Ok(Want::Notice(ev::CREATED, 0)) };
        }
        Ask::Update(p) => check_profile(p, l)?,
        Ask::Action { note, .. } => {
            if note.len() > l.group_text_bytes_max {
                return Err(InvalidGroup);
            }
        }
    }
    dissolved()?;
    let manager = || match my_role {
        None => Err(NotMember),
        Some(r) if r < role::MANAGER => Err(NotManager),
        Some(r) => Ok(r),
    };
    let founder = || match my_role {
        None => Err(NotMember),
        Some(role::FOUNDER) => Ok(()),
        Some(_) => Err(NotFounder),
    };
    let Ask::Action { action, target, .. } = ask else {
        manager()?;
        return Ok(Want::Notice(ev::PROFILE_CHANGED, 0));
    };
    let t = *target;
    let target_role = g.role_of(t);
    // Acted on: a member ranked below the actor.
    let below = |r: u8| match target_role {
        None => Err(NotMember),
        Some(tr) if tr >= r => Err(NotManager),
        Some(_) => Ok(()),
    };
    let room = || if g.members.len() >= l.group_members_max { Err(GroupFull) } else { Ok(()) };
    let blocked = |u: UserId| g.blocked.contains(&u);
    Ok(match *action {
        act::JOIN => {
            if my_role.is_some() {
                return Err(AlreadyMember);
            }
            if blocked(me) {
                return Err(BlockedFromGroup);
            }
            room()?;
            if g.row.profile.join_policy == join_policy::APPROVAL {
                if !g.requests.contains_key(&me) && g.requests.len() >= l.group_join_requests_max {
                    return Err(TooManyJoinRequests);
                }
                Want::Request(me, true)
            } else {
                Want::Notice(ev::JOINED, me)
            }
        }
        act::LEAVE => {
            if member()? == role::FOUNDER {
                return Err(FounderMustTransfer);
            }
            Want::Notice(ev::LEFT, me)
        }
        act::INVITE => {
            if member()? < role::MANAGER && g.row.profile.invite_policy != invite_policy::MEMBERS {
                return Err(NotManager);
            }
            if t == 0 || protocol::is_group_id(t) {
                return Err(InvalidGroup);
            }
            if target_role.is_some() {
                return Err(AlreadyMember);
            }
            if blocked(t) {
                return Err(BlockedFromGroup);
            }
            room()?;
            Want::Notice(ev::ADDED, t)
        }
        act::KICK => {
            below(manager()?)?;
            Want::Notice(ev::KICKED, t)
        }
        act::APPROVE | act::REJECT => {
            manager()?;
            if !g.requests.contains_key(&t) {
                return Err(NoJoinRequest);
            }
            if *action == act::REJECT {
                return Ok(Want::Request(t, false));
            }
            if blocked(t) {
                return Err(BlockedFromGroup);
            }
            room()?;
            Want::Notice(ev::ADDED, t)
        }
        act::ADD_MANAGER | act::REMOVE_MANAGER => {
            founder()?;
            let tr = target_role.ok_or(NotMember)?;
            let (want, event) = if *action == act::ADD_MANAGER {
                (role::MANAGER, ev::MANAGER_ADDED)
            } else {
                (role::MEMBER, ev::MANAGER_REMOVED)
            };
            if tr == role::FOUNDER || tr == want {
                return Err(InvalidGroup);
            }
            Want::Notice(event, t)
        }
        act::TRANSFER => {
            founder()?;
            target_role.ok_or(NotMember)?;
            if t == me {
                return Err(InvalidGroup);
            }
            Want::Notice(ev::TRANSFERRED, t)
        }
        act::MUTE => {
            below(manager()?)?;
            Want::Notice(ev::MUTED, t)
        }
        act::MUTE_ALL => {
            manager()?;
            Want::Notice(ev::MUTED_ALL, 0)
        }
        act::BLOCK => {
            let r = manager()?;
            if t == 0 || t == me || protocol::is_group_id(t) {
                return Err(InvalidGroup);
            }
            if target_role.is_some() {
                below(r)?;
            }
            Want::Notice(ev::BLOCKED, t)
        }
        act::UNBLOCK => {
            manager()?;
            if !blocked(t) {
                return Err(InvalidGroup);
            }
            Want::Notice(ev::UNBLOCKED, t)
        }
        act::DISSOLVE => {
            founder()?;
            Want::Notice(ev::DISSOLVED, 0)
        }
        _ => return Err(InvalidGroup),
    })
}

/// Whether the stored group takes a message (or stream message) of `sender` now.
fn model_send(stored: Option<&StoredGroup>, sender: UserId, now: u64) -> Result<(), ErrorCode> {
    let g = stored.ok_or(ErrorCode::GroupNotFound)?;
    if g.row.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    let m = g.members.get(&sender).ok_or(ErrorCode::NotMember)?;
    if m.muted_until_ms > now || (m.role == role::MEMBER && g.row.muted_all_until_ms > now) {
        return Err(ErrorCode::Muted);
    }
    Ok(())
}

/// A stored notice did what it says, on a group where its actor could, and nothing else.
fn check_change(
    before: Option<&StoredGroup>,
    after: &StoredGroup,
    n: &GroupNotice,
    seq: u64,
) -> Result<(), String> {
    let (a, t) = (n.actor, n.target);
    if n.event == ev::CREATED {
        let ok = before.is_none()
            && after.row.founder == a
            && after.members.len() == 1
            && after.role_of(a) == Some(role::FOUNDER)
            && !after.row.dissolved;
        return if ok { Ok(()) } else { Err("not a new group with its actor as founder".into()) };
    }
    let Some(b) = before else { return Err("a change of a group never created".into()) };
    if b.row.dissolved {
        return Err("a change of a dissolved group".into());
    }
    let ra = b.role_of(a);
    let manager = ra.is_some_and(|r| r >= role::MANAGER);
    let founder = ra == Some(role::FOUNDER);
    let outranks = |u: UserId| matches!((ra, b.role_of(u)), (Some(x), Some(y)) if y < x);
    let joined = |u: UserId| {
        b.role_of(u).is_none()
            && after.members.get(&u).is_some_and(|m| m.role == role::MEMBER && m.from_seq == seq)
            && !after.blocked.contains(&u)
            && !after.requests.contains_key(&u)
    };
    let (ok, touched) = match n.event {
        ev::JOINED => (t == a && joined(a), vec![a]),
        ev::LEFT => (t == a && ra.is_some_and(|r| r != role::FOUNDER) && after.role_of(a).is_none(), vec![a]),
        ev::ADDED => (
            ra.is_some() && (manager || b.row.profile.invite_policy == invite_policy::MEMBERS) && joined(t),
            vec![t],
        ),
        ev::KICKED => (manager && outranks(t) && after.role_of(t).is_none(), vec![t]),
        ev::MANAGER_ADDED => (
            founder && b.role_of(t) == Some(role::MEMBER) && after.role_of(t) == Some(role::MANAGER),
            vec![t],
        ),
        ev::MANAGER_REMOVED => (
            founder && b.role_of(t) == Some(role::MANAGER) && after.role_of(t) == Some(role::MEMBER),
            vec![t],
        ),
        ev::TRANSFERRED => (
            founder
                && t != a
                && b.role_of(t).is_some()
                && after.role_of(t) == Some(role::FOUNDER)
                && after.role_of(a) == Some(role::MANAGER)
                && after.row.founder == t,
            vec![a, t],
        ),
        ev::MUTED => (
            manager
                && outranks(t)
                && after
                    .members
                    .get(&t)
                    .is_some_and(|m| m.muted_until_ms == n.until_ms && Some(m.role) == b.role_of(t)),
            vec![t],
        ),
        ev::MUTED_ALL => (manager && after.row.muted_all_until_ms == n.until_ms, vec![]),
        ev::PROFILE_CHANGED => (manager, vec![]),
        ev::BLOCKED => (
            manager
                && t != a
                && (b.role_of(t).is_none() || outranks(t))
                && after.blocked.contains(&t)
                && after.role_of(t).is_none()
                && !after.requests.contains_key(&t),
            vec![t],
        ),
        ev::UNBLOCKED => (manager && b.blocked.contains(&t) && !after.blocked.contains(&t), vec![t]),
        ev::DISSOLVED => {
            let ok = founder && after.row.dissolved && after.members.is_empty();
            return if ok { Ok(()) } else { Err("not dissolved by its founder".into()) };
        }
        _ => (false, vec![]),
    };
    if !ok {
        return Err("its actor could not do it, or it did not do what it says".into());
    }
    // No one else changed, nor anything of the row the event does not name.
    for (u, m) in &b.members {
        if !touched.contains(u) && after.members.get(u) != Some(m) {
            return Err(format!("member {u} changed too"));
        }
    }
    if let Some(u) = after.members.keys().find(|u| !touched.contains(u) && !b.members.contains_key(u)) {
        return Err(format!("user {u} joined too"));
    }
    let row_ok = after.row.id == b.row.id
        && after.row.created_ms == b.row.created_ms
        && !after.row.dissolved
        && (after.row.founder == b.row.founder || n.event == ev::TRANSFERRED)
        && (after.row.muted_all_until_ms == b.row.muted_all_until_ms || n.event == ev::MUTED_ALL)
        && (after.row.profile == b.row.profile || n.event == ev::PROFILE_CHANGED);
    if !row_ok {
        return Err("the group's row changed otherwise".into());
    }
    Ok(())
}

/// A live group has one founder, its row's; a dissolved one no member.
fn check_founder(g: &StoredGroup) -> Result<(), String> {
    if g.row.dissolved {
        return if g.members.is_empty() { Ok(()) } else { Err("dissolved with members".into()) };
    }
    let founders: Vec<UserId> =
        g.members.values().filter(|m| m.role == role::FOUNDER).map(|m| m.user).collect();
    if founders != [g.row.founder] {
        return Err(format!("founders {founders:?}, the row says {}", g.row.founder));
    }
    Ok(())
}

/// A send's `DELIVER` frame, built as a session builds it, with a body that carries the client
/// message id (so deliveries can be matched to sends).
fn submit_frame(cmid: u64) -> BytesMut {
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&cmid.to_le_bytes());
    Submit::blank_deliver(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed replays exactly: same events, same figures.
    #[test]
    fn deterministic() {
        for seed in [3, 17] {
            let a = Sim::new(seed, SimConfig::from_seed(seed, 1500));
            let b = Sim::new(seed, SimConfig::from_seed(seed, 1500));
            let (mut a, mut b) = (a, b);
            a.run().expect("runs");
            b.run().expect("runs");
            assert_eq!(a.trace, b.trace);
            assert_eq!(format!("{:?}", a.report), format!("{:?}", b.report));
            assert!(a.report.acks > 0);
        }
    }
}
