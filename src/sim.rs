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
//! [`run`] returns the first violation with the seed's recent events; the same seed replays
//! exactly (tests/sim.rs prints the command).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use ahash::RandomState;
use bytes::{Bytes, BytesMut};

use crate::{
    commit::{CommitQueues, Queued},
    config::{DevicePolicy, Limits, SessionPolicy},
    envelope::{AckInfo, Attach, Envelope, RoomOp, RoomRequest, SessionRef, Submit},
    frame::HEADER_BYTES,
    placement::{conv_hash, direct_key, Placement},
    protocol::{conv, kind, room_publish, DeviceType, ErrorCode, RoomStamp, Stamp},
    roles::{CommitOutcome, ConvOwner, Effect, Effects, RoomOwner, Sequenced, UserOwner},
    store::{ConvKey, ConvLoad, RecentSend, UserId},
};

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
}

impl SimConfig {
    pub fn from_seed(seed: u64, steps: usize) -> SimConfig {
        let mut r = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
        let per_account_max = 1 + r.below(4) as usize;
        SimConfig {
            shards: 1 + r.below(4) as usize,
            users: 2 + r.below(7),
            durable: r.chance(70),
            store_partitions: 1 + r.below(3) as usize,
            policy: SessionPolicy {
                per_account_max,
                per_device_type_max: 1 + r.below(per_account_max as u64) as usize,
                policy: if r.chance(50) { DevicePolicy::KickOldest } else { DevicePolicy::Refuse },
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
        }
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
}

/// A stored message in the fake store: (sender, client message id, message id, time).
type Row = (UserId, u64, u64, u64);

/// The fake store: committed messages per conversation, and when each partition is next free.
#[derive(Default)]
struct FakeStore {
    messages: HashMap<ConvKey, BTreeMap<u64, Row>>,
    by_client_id: HashMap<(ConvKey, UserId, u64), u64>,
    free_at: HashMap<usize, u64>,
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
            ..Limits::default()
        };
        let hasher = || RandomState::with_seeds(1, 2, 3, 4);
        let shards = (0..cfg.shards)
            .map(|id| SimShard {
                users: UserOwner::new(cfg.policy.clone(), limits.tokens_per_user_max, hasher()),
                convs: ConvOwner::new(id, placement, cfg.durable, &limits, hasher()),
                commits: CommitQueues::new(
                    cfg.store_partitions,
                    cfg.commit_batch_max,
                    cfg.commit_backlog_max,
                ),
                rooms: RoomOwner::new(id, placement, &limits),
                room_subs: HashMap::new(),
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
            if self.rng.chance(10) {
                let shard = self.rng.below(self.cfg.shards as u64) as usize;
                let n = self.shards[shard].convs.evict_idle(self.now, 64);
                if n > 0 {
                    self.note(format!("shard {shard}: evicted {n} idle conversations"));
                }
                let mut fx = Vec::new();
                self.shards[shard].rooms.expire(self.now, &mut fx);
                self.execute(shard, fx);
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

    fn execute(&mut self, shard: usize, fx: Effects) {
        for effect in fx {
            match effect {
                Effect::Post(dst, env) => self.post(shard, dst, env),
                Effect::Sequence(_)
                | Effect::GroupPublish(_)
                | Effect::NoticeFailed { .. }
                | Effect::LoadGroup(_)
                | Effect::SaveJoinRequest { .. } => unreachable!("the simulation makes no groups"),
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
                    let part = (conv_hash(s.conv()) % self.cfg.store_partitions as u64) as usize;
                    match self.shards[shard].commits.push(part, s) {
                        Queued::Waiting => {}
                        Queued::Start => {
                            let gather = self.rng.below(2);
                            self.schedule(self.now + gather, Timer::Committer { shard, part });
                        }
                        Queued::Full(s) => {
                            self.report.backlog_full += 1;
                            let mut fx = Vec::new();
                            self.shards[shard].convs.settled(s, CommitOutcome::Failed, true, &mut fx);
                            self.execute(shard, fx);
                        }
                    }
                }
            }
        }
    }

    fn store_latency(&mut self) -> u64 {
        if self.rng.chance(3) {
            self.cfg.commit_timeout_ms + self.rng.below(100) // a stall past the commit timeout
        } else {
            self.rng.below(self.cfg.store_latency_ms)
        }
    }

    fn store_load(&self, key: ConvKey, since_ms: u64, recent_max: usize) -> ConvLoad {
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
        ConvLoad { last_seq, recent }
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
                self.execute(shard, fx);
            }
            Timer::Committer { shard, part } => {
                let Some(batch) = self.shards[shard].commits.next_batch(part) else { return Ok(()) };
                self.commit_ids += 1;
                let id = self.commit_ids;
                // A partition commits in order: this batch is done after the one before it.
                let start = self.now.max(self.store.free_at.get(&part).copied().unwrap_or(0));
                let done_at = start + self.store_latency();
                self.store.free_at.insert(part, done_at);
                let ok = !self.rng.chance(self.cfg.store_fail_percent);
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
                // after COMMIT): the store then holds what its sender was told had failed.
                let stored = open.ok || self.rng.chance(30);
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
                    self.shards[shard].convs.settled(s, outcome, waiting, &mut fx);
                }
                self.execute(shard, fx);
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
                self.execute(shard, fx);
                self.schedule(self.now, Timer::Committer { shard, part });
            }
        }
        Ok(())
    }

    /// One envelope arrives at shard `dst`: a role handles it, or a client's session does.
    fn handle(&mut self, dst: usize, env: Envelope) -> Result<(), String> {
        let now = self.now;
        let mut fx = Vec::new();
        match env {
            Envelope::Group(_)
            | Envelope::GroupReply { .. }
            | Envelope::GroupFanout(_)
            | Envelope::DeliverMany(_) => {
                unreachable!("the simulation makes no groups")
            }
            Envelope::Submit(sub) => {
                let key = direct_key(sub.sender, sub.to);
                if self.placement.conv(key) != dst {
                    return Err(format!("submit of {key:?} on shard {dst}"));
                }
                let (origin, cmid) = (sub.origin, sub.client_msg_id);
                let convs = &mut self.shards[dst].convs;
                convs.submit(sub, now, &mut fx);
                let generation = if self.cfg.durable { 0 } else { convs.generation(key).unwrap_or(0) };
                self.handled_in.insert((origin, cmid), generation);
            }
            Envelope::Fanout { user, skip, frame } => {
                if self.placement.user(user) != dst {
                    return Err(format!("fanout of user {user} on shard {dst}"));
                }
                self.shards[dst].users.fanout(user, skip, &frame, &mut fx)
            }
            Envelope::Attach(a) => self.shards[dst].users.attach(&a, now, &mut fx),
            Envelope::Detach { user, session } => self.shards[dst].users.detach(user, session),
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
                            self.post(dst, self.placement.user(user), Envelope::Detach { user, session });
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
                            self.placement.user(c.user),
                            Envelope::Detach { user: c.user, session },
                        );
                    }
                }
            }
            Envelope::TokenResult { .. } => {}
            Envelope::StreamFanout { user, skip, frame } => {
                if self.placement.user(user) != dst {
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
                if self.placement.room(req.room) != dst {
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
        self.execute(dst, fx);
        Ok(())
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
        let key = direct_key(sender, to);
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
            self.expectations.push((key, ack.seq, expected));
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
        let stamp = Stamp::read(&frame[HEADER_BYTES..]).ok_or("short frame")?;
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
        self.post(session.shard(), self.placement.room(room), Envelope::Room(Box::new(req)));
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
        } else if roll < 26 {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            self.send_stream(s);
        } else if roll < 34 {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            self.room_action(s);
        } else {
            let s = attached[self.rng.below(attached.len() as u64) as usize];
            let resend = roll >= 85;
            self.send(s, resend);
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
        let attach = Attach { user, session, device_type, token: None };
        self.post(shard, self.placement.user(user), Envelope::Attach(Box::new(attach)));
    }

    fn disconnect(&mut self, session: SessionRef) {
        let c = self.clients.remove(&session).expect("client");
        self.leave_rooms(session, &c);
        self.note(format!("session {session:?} of user {}: disconnects", c.user));
        if c.login == Login::Attached {
            self.post(
                session.shard(),
                self.placement.user(c.user),
                Envelope::Detach { user: c.user, session },
            );
        }
    }

    fn send(&mut self, session: SessionRef, resend: bool) {
        let c = &self.clients[&session];
        let sender = c.user;
        if c.inflight.len() >= self.cfg.inflight_max {
            return;
        }
        let previous: Vec<(u64, UserId)> = self
            .sent_ids
            .get(&sender)
            .map(|v| v.iter().filter(|(id, _)| !c.inflight.contains_key(id)).copied().collect())
            .unwrap_or_default();
        let (cmid, to) = if resend && !previous.is_empty() {
            previous[self.rng.below(previous.len() as u64) as usize]
        } else {
            let to = match self.rng.below(20) {
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
        // sender's other ones, logged in now.
        let watchers: Vec<SessionRef> = self
            .clients
            .iter()
            .filter(|(&s, o)| {
                o.login == Login::Attached && s != session && (o.user == to || o.user == sender)
            })
            .map(|(&s, _)| s)
            .collect();
        self.expect_at_submit.insert((session, cmid), watchers);
        let c = self.clients.get_mut(&session).expect("client");
        c.inflight.insert(cmid, to);
        self.note(format!("session {session:?} of user {sender}: sends {cmid} to {to} (resend={resend})"));
        self.submit(session, sender, to, cmid, false);
    }

    /// Post a send (or a stream message) of `session` to its conversation's owner.
    fn submit(&mut self, session: SessionRef, sender: UserId, to: UserId, cmid: u64, stream: bool) {
        let sub = Submit {
            stream,
            origin: session,
            sender,
            to,
            conv: conv::DIRECT,
            client_msg_id: cmid,
            sender_device: session.0,
            frame: submit_frame(cmid),
            change: None,
            refuse_new: None,
        };
        let dst = self.placement.conv(direct_key(sender, to));
        self.post(session.shard(), dst, Envelope::Submit(Box::new(sub)));
    }

    fn check_roles(&self) -> Result<(), String> {
        for (i, s) in self.shards.iter().enumerate() {
            s.users.check().map_err(|e| format!("shard {i}: {e}"))?;
            s.convs.check().map_err(|e| format!("shard {i}: {e}"))?;
            s.rooms.check().map_err(|e| format!("shard {i}: {e}"))?;
        }
        Ok(())
    }

    /// Once everything has landed.
    fn check_end(&self) -> Result<(), String> {
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
            let owner = &self.shards[self.placement.user(user)].users;
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
        Ok(())
    }
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
