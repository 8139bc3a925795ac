//! group: groups (1:N, stored; PROTOCOL.md on groups). There are `--groups` G groups of
//! `--members` M members, one user and one session each: connection c is member c / G of group
//! c % G. Each group's first member (c = g) creates it (open join policy) and shares its id;
//! the others wait for that id (outside the setup gate, before connecting) and JOIN.
//!
//! With `--offline-members` N, each group also has N members without a session: before it
//! logs in, the creator registers N more users (`{prefix}-off{g}-{i}`) over short connections
//! of their own (`--register-per-connection` each, `--register-concurrency` at once), and once
//! it has created the group it adds them with `GroupAddMembers` (at most [`ADD_BATCH`] per
//! request; each makes one MEMBERS_ADDED notice, which the creator reads like the others). Only
//! then does it share the group id, so the online members join after the offline ones are in
//! and none of that setup fans out to them. Offline members are owed nothing live: the ledger
//! does not know them. Every member then waits until
//! every member of its group has joined (or given up), and reads the group's notices (CREATED,
//! JOINED: stamp `from` 0) up to the last join's, so that no notice fan-out is left when the
//! run starts; only then does it report ready.
//!
//! The run is the message engine's ([`messaging`]): the first `--senders` S members of each
//! group send group messages (`Send` conv GROUP, `to` = the group id) with rising client
//! message ids, closed loop (`--window` unacknowledged per sender) or open loop (`--rate` over
//! all senders). The server delivers each message to every member's sessions but the sending
//! one, so each acknowledged message is owed to every other live member of its group. Notices
//! that still come only take their seq in the group's sequence (the ledger checks that seqs
//! rise per group, notices included).
//!
//! [`verdict`] checks every member against every sender of its group, and breaks lost,
//! duplicated and out-of-order deliveries down per group.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use tim::{
    client::{decode_event, Event},
    protocol::{self, conv, group_action, join_policy, kind, ErrorCode, GroupOk, Stamp},
};

use super::{enter_run, messaging, set_up, Plan};
use crate::{
    cli::Config,
    global::{LiveSet, Phase},
    ledger::{Bits, ConnLedger, RecvLog, Verdict},
    net::{FrameReader, Io},
    session::{self, retryable, Fail},
    worker::Worker,
};

/// How often a member looks whether its group was created: first, and at most (doubling in
/// between; a creator that registers and adds offline members first takes a while).
const POLL: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(100);
/// User ids per `GroupAddMembers` (the server's default `group_add_batch_max`).
pub const ADD_BATCH: usize = 1000;
/// How often a member looks whether every member has joined (reading notices meanwhile). Each
/// look cancels a pending read: with a thousand members, 2 ms would be half a million a second.
const JOINED_POLL: Duration = Duration::from_millis(20);
/// Pause before a refused (Busy) group request is retried; the group owner queues at most
/// `group_changes_waiting_max` (256) changes per group, so a crowd of joins meets Busy.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Longest wait for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Offline members registered and added, and how long it took.
#[derive(Clone, Copy, Debug, Default)]
pub struct OfflineStats {
    pub registered: u64,
    pub added: u64,
    pub register_s: f64,
    pub add_s: f64,
}

/// The groups of a run and what their members share across threads.
pub struct Groups {
    pub groups: u32,
    pub members: u32,
    pub senders: u32,
    /// Offline members per group, and how they are registered.
    pub offline: u32,
    register_per_connection: u32,
    register_concurrency: u32,
    /// Offline members registered and added, over all groups.
    pub offline_registered: AtomicU64,
    pub offline_added: AtomicU64,
    /// The longest a group's creator took to register its offline members, and to add them
    /// (microseconds).
    pub offline_register_us: AtomicU64,
    pub offline_add_us: AtomicU64,
    shared: Vec<GroupShared>,
    /// Live members per group (from the live set, once the run has started).
    live_members: OnceLock<Vec<u32>>,
}

/// What one group's members share during setup.
#[derive(Default)]
struct GroupShared {
    /// The group's id once its creator has it (0 before).
    id: AtomicU64,
    /// The creator failed to set up or to create the group: its members give up.
    failed: AtomicBool,
    /// Members that are in (the creator included), and members that gave up before.
    joined: AtomicU32,
    gave_up: AtomicU32,
    /// The highest seq of the group's notices so far (its creation, the joins).
    last_seq: AtomicU64,
}

impl Groups {
    pub fn new(cfg: &Config) -> Groups {
        let mut g = Groups::with(cfg.groups, cfg.members, cfg.senders);
        g.offline = cfg.offline_members;
        g.register_per_connection = cfg.register_per_connection;
        g.register_concurrency = cfg.register_concurrency;
        g
    }

    fn with(groups: u32, members: u32, senders: u32) -> Groups {
        Groups {
            groups,
            members,
            senders,
            offline: 0,
            register_per_connection: 3,
            register_concurrency: 1,
            offline_registered: AtomicU64::new(0),
            offline_added: AtomicU64::new(0),
            offline_register_us: AtomicU64::new(0),
            offline_add_us: AtomicU64::new(0),
            shared: (0..groups).map(|_| GroupShared::default()).collect(),
            live_members: OnceLock::new(),
        }
    }

    #[inline]
    pub fn group_of(&self, conn: u32) -> u32 {
        conn % self.groups
    }

    /// Which member of its group `conn` is (0: the creator).
    #[inline]
    pub fn rank_of(&self, conn: u32) -> u32 {
        conn / self.groups
    }

    /// The members of `group` (live or not), ascending.
    pub fn members_of(&self, group: u32) -> impl Iterator<Item = u32> {
        let groups = self.groups;
        (0..self.members).map(move |r| group + r * groups)
    }

    /// The live members of `group`, ascending.
    pub fn live_members<'a>(&self, live: &'a LiveSet, group: u32) -> impl Iterator<Item = u32> + 'a {
        self.members_of(group).filter(|&c| live.conn_live.get(c as usize).copied().unwrap_or(false))
    }

    fn live_count(&self, live: &LiveSet, group: u32) -> u32 {
        self.live_members
            .get_or_init(|| (0..self.groups).map(|g| self.live_members(live, g).count() as u32).collect())
            [group as usize]
    }

    /// What the offline-member setup did (all groups; the times are the slowest group's).
    pub fn offline_stats(&self) -> OfflineStats {
        OfflineStats {
            registered: self.offline_registered.load(SeqCst),
            added: self.offline_added.load(SeqCst),
            register_s: self.offline_register_us.load(SeqCst) as f64 / 1e6,
            add_s: self.offline_add_us.load(SeqCst) as f64 / 1e6,
        }
    }

    /// The group id of `group`, once created (0 before).
    pub fn id_of(&self, group: u32) -> u64 {
        self.shared[group as usize].id.load(SeqCst)
    }
}

impl Plan for Groups {
    fn conv(&self) -> u8 {
        conv::GROUP
    }

    fn sends(&self, conn: u32) -> bool {
        self.rank_of(conn) < self.senders
    }

    fn senders(&self, live: &LiveSet) -> u32 {
        (0..self.groups * self.senders).filter(|&c| live.conn_live[c as usize]).count() as u32
    }

    fn to(&self, _live: &LiveSet, conn: u32, _counter: u64) -> Option<u64> {
        Some(self.id_of(self.group_of(conn))).filter(|&id| id != 0)
    }

    fn receivers(&self, live: &LiveSet, conn: u32, _counter: u64, out: &mut Vec<u32>) {
        out.extend(self.live_members(live, self.group_of(conn)).filter(|&c| c != conn));
    }

    fn fanout(&self, live: &LiveSet, conn: u32, _counter: u64) -> u64 {
        let me = u32::from(live.conn_live[conn as usize]);
        self.live_count(live, self.group_of(conn)).saturating_sub(me) as u64
    }
}

pub async fn run(w: &Rc<Worker>, idx: u32, groups: Arc<Groups>) {
    let group = groups.group_of(idx);
    let creator = groups.rank_of(idx) == 0;
    let shared = &groups.shared[group as usize];
    let give_up = || {
        if creator {
            shared.failed.store(true, SeqCst);
        }
        shared.gave_up.fetch_add(1, SeqCst);
    };
    let deadline = w.g.setup_deadline();
    // The creator registers the offline members before it logs in; the others connect once
    // the group is there.
    let mut offline = Vec::new();
    if creator && groups.offline > 0 {
        let t = Instant::now();
        offline = register_offline(w, idx, group, &groups, deadline).await;
        groups.offline_registered.fetch_add(offline.len() as u64, SeqCst);
        groups.offline_register_us.fetch_max(t.elapsed().as_micros() as u64, SeqCst);
    }
    let group_id = if creator {
        0
    } else {
        match wait_for_id(w, shared, deadline).await {
            Ok(id) => id,
            Err(e) => {
                give_up();
                w.stats.error(&e.name("group: waiting for the group"));
                w.g.setup_failed();
                return;
            }
        }
    };
    let Some((io, mut rd, login)) = set_up(w, idx, true).await else {
        give_up();
        return;
    };
    let mut notices = Notices::default();
    let step = if creator {
        match create(w, &io, &mut rd, &mut notices, deadline).await {
            Ok(ok) => {
                let t = Instant::now();
                let added = add_offline(w, &io, &mut rd, &mut notices, ok.group_id, &offline, deadline).await;
                groups.offline_add_us.fetch_max(t.elapsed().as_micros() as u64, SeqCst);
                added.map(|last| {
                    shared.last_seq.fetch_max(last, SeqCst);
                    groups.offline_added.fetch_add(offline.len() as u64, SeqCst);
                    shared.id.store(ok.group_id, SeqCst);
                    ok
                })
            }
            Err(e) => Err(e),
        }
    } else {
        join(w, &io, &mut rd, group_id, &mut notices, deadline).await
    };
    let ok = match step {
        Ok(ok) => ok,
        Err(e) => {
            give_up();
            w.stats.error(&e.name(if creator { "group create" } else { "group join" }));
            rd.release(w);
            io.shutdown();
            w.g.setup_failed();
            return;
        }
    };
    let group_id = ok.group_id;
    shared.last_seq.fetch_max(ok.seq, SeqCst);
    shared.joined.fetch_add(1, SeqCst);
    if let Err(e) = all_in(w, &io, &mut rd, &groups, group, &mut notices, deadline).await {
        w.stats.error(&e.name("group: waiting for the other members"));
        rd.release(w);
        io.shutdown();
        w.g.setup_failed();
        return;
    }
    let Some(joined) = enter_run(w, idx, io, rd, login).await else {
        return;
    };
    // The member's place in the group's sequence: the last notice it read.
    let mut recv = RecvLog::default();
    let last = notices.last(group_id);
    if last > 0 {
        recv.note_seq(&Stamp { msg_id: 0, seq: last, ts_ms: 0, from: 0, to: group_id, conv: conv::GROUP });
    }
    messaging::run_joined(w, idx, groups.clone(), joined, recv, notices.catch_up_end).await
}

/// The highest notice seq read per group during setup, and whether the login's catch-up ended
/// meanwhile (a `CatchUpEnd`: the server is durable and sends a catch-up after every login).
#[derive(Default)]
struct Notices {
    last: FxHashMap<u64, u64>,
    catch_up_end: bool,
}

impl Notices {
    /// Note a group notice (a `DELIVER` with stamp `from` 0, conv GROUP); false for any other
    /// frame.
    fn note(&mut self, k: u16, payload: &[u8]) -> bool {
        match (k, Stamp::read(payload)) {
            (kind::DELIVER, Some(s)) if s.from == 0 && s.conv == conv::GROUP => {
                let last = self.last.entry(s.to).or_insert(0);
                *last = (*last).max(s.seq);
                true
            }
            _ => false,
        }
    }

    fn last(&self, group: u64) -> u64 {
        self.last.get(&group).copied().unwrap_or(0)
    }
}

/// Read one frame within `deadline` (at most [`ANSWER_TIMEOUT`]): notices are noted, anything
/// else decoded. `Ok(None)` for a notice, or a frame of a kind this build does not know.
async fn read_event(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    notices: &mut Notices,
    wait: Duration,
) -> Result<Option<Event>, Fail> {
    match monoio::time::timeout(wait, rd.next(io, w)).await {
        Err(_) => Err(Fail::Timeout),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(Fail::Closed),
        Ok(Ok(Some((k, payload)))) => {
            if notices.note(k, payload) {
                return Ok(None);
            }
            let ev = decode_event(k, payload).ok();
            notices.catch_up_end |= matches!(ev, Some(Event::CatchUpEnd(_)));
            Ok(ev)
        }
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).min(ANSWER_TIMEOUT)
}

/// Send a group request (`GroupCreate` or `GroupAction`) until it is not refused with a
/// retryable code, noting the notices that come meanwhile; its `GroupOk`.
async fn group_request(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    notices: &mut Notices,
    deadline: Instant,
    request_kind: u16,
    queue: impl Fn(&Io),
) -> Result<GroupOk, Fail> {
    let what = kind::name(request_kind);
    loop {
        queue(io);
        io.flush().await?;
        let got = loop {
            match read_event(w, io, rd, notices, left(deadline)).await? {
                Some(Event::GroupOk(ok)) if ok.request_kind == request_kind => break Ok(ok),
                Some(Event::Error(e)) if e.request_kind == request_kind => break Err(Fail::Refused(e.code)),
                Some(Event::Kick(k)) => return Err(Fail::Kicked(k.reason)),
                _ => {}
            }
        };
        match got {
            Err(Fail::Refused(code)) if retryable(code) && Instant::now() < deadline => {
                w.stats.error(&Fail::Refused(code).name(what));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Creator: create the group (open join policy).
async fn create(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    notices: &mut Notices,
    deadline: Instant,
) -> Result<GroupOk, Fail> {
    let profile = protocol::GroupProfile {
        name: format!("tim-loadgen {:08x}", w.g.run_id),
        join_policy: join_policy::OPEN,
        ..Default::default()
    };
    group_request(w, io, rd, notices, deadline, kind::GROUP_CREATE, |io| {
        io.queue(kind::GROUP_CREATE, &protocol::GroupCreate { profile: profile.clone() })
    })
    .await
}

/// Member: wait (before connecting) for the creator's group id.
async fn wait_for_id(w: &Worker, shared: &GroupShared, deadline: Instant) -> Result<u64, Fail> {
    let mut poll = POLL;
    loop {
        match shared.id.load(SeqCst) {
            0 if shared.failed.load(SeqCst) => return Err(Fail::Closed),
            0 if Instant::now() >= deadline || w.phase() != Phase::Setup => return Err(Fail::Timeout),
            0 => {
                monoio::time::sleep(poll).await;
                poll = (poll * 2).min(POLL_MAX);
            }
            id => return Ok(id),
        }
    }
}

/// Member: join the group.
async fn join(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    group_id: u64,
    notices: &mut Notices,
    deadline: Instant,
) -> Result<GroupOk, Fail> {
    let join = protocol::GroupAction {
        group_id,
        action: group_action::JOIN,
        user_id: 0,
        until_ms: 0,
        note: String::new(),
    };
    group_request(w, io, rd, notices, deadline, kind::GROUP_ACTION, |io| io.queue(kind::GROUP_ACTION, &join))
        .await
}

/// The name of offline member `i` of `group`.
fn offline_name(prefix: &str, group: u32, i: u32) -> String {
    format!("{prefix}-off{group}-{i}")
}

/// Creator: register the group's offline members over `register_concurrency` connections at
/// once, `register_per_connection` each (a connection refused with RateLimited is replaced);
/// their user ids. A name that is taken already (a database not fresh) is counted as an
/// error and left out.
async fn register_offline(
    w: &Rc<Worker>,
    conn: u32,
    group: u32,
    groups: &Groups,
    deadline: Instant,
) -> Vec<u64> {
    let n = groups.offline;
    let next = Rc::new(Cell::new(0u32));
    let ids = Rc::new(RefCell::new(Vec::with_capacity(n as usize)));
    let per_conn = groups.register_per_connection;
    let tasks: Vec<_> = (0..groups.register_concurrency.min(n))
        .map(|t| {
            let (w, next, ids) = (w.clone(), next.clone(), ids.clone());
            monoio::spawn(async move {
                register_some(&w, conn, t, group, n, per_conn, &next, &ids, deadline).await;
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let ids = ids.borrow().clone();
    ids
}

/// One registering task of [`register_offline`]: take the next name, register it, `per_conn`
/// to a connection, until all `n` are taken or `deadline`.
#[allow(clippy::too_many_arguments)]
async fn register_some(
    w: &Worker,
    conn: u32,
    task: u32,
    group: u32,
    n: u32,
    per_conn: u32,
    next: &Cell<u32>,
    ids: &RefCell<Vec<u64>>,
    deadline: Instant,
) {
    let prefix = &w.g.cfg.user_prefix;
    let mut pending: Option<u32> = None;
    for attempt in 0u64.. {
        if Instant::now() >= deadline {
            w.stats.error("offline register: timeout");
            return;
        }
        let Some(io) = session::connect(w, conn, attempt * 1024 + task as u64, deadline).await else {
            return;
        };
        let mut rd = FrameReader::default();
        let mut done = 0;
        while done < per_conn {
            let i = match pending.take() {
                Some(i) => i,
                None if next.get() < n => {
                    next.set(next.get() + 1);
                    next.get() - 1
                }
                None => break,
            };
            match register_one(w, &io, &mut rd, &offline_name(prefix, group, i), deadline).await {
                Ok(id) => ids.borrow_mut().push(id),
                Err(e @ (Fail::Refused(_) | Fail::Malformed)) if !matches!(e, Fail::Refused(c) if c == ErrorCode::RateLimited.code()) =>
                {
                    w.stats.error(&e.name("offline register"));
                }
                Err(e) => {
                    // Rate limited, or the connection failed: the name again on a new one.
                    w.stats.error(&e.name("offline register"));
                    pending = Some(i);
                    break;
                }
            }
            done += 1;
        }
        rd.release(w);
        io.shutdown();
        if pending.is_none() && next.get() >= n {
            return;
        }
    }
}

/// Register `name`; its user id. Retries Busy/Internal until `deadline`.
async fn register_one(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    name: &str,
    deadline: Instant,
) -> Result<u64, Fail> {
    loop {
        let r = protocol::Register { name: name.into(), password: w.g.cfg.password.clone() };
        io.queue(kind::REGISTER, &r);
        io.flush().await?;
        let got = session::answer(w, io, rd, kind::REGISTER, deadline, |e| match e {
            Event::RegisterOk(ok) => Some(ok.user_id),
            _ => None,
        })
        .await;
        match got {
            Err(Fail::Refused(c)) if retryable(c) && Instant::now() < deadline => {
                w.stats.error(&Fail::Refused(c).name("offline register"));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Creator: add `users` to the group, [`ADD_BATCH`] per `GroupAddMembers`; the seq of the last
/// MEMBERS_ADDED notice (0 if none).
async fn add_offline(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    notices: &mut Notices,
    group_id: u64,
    users: &[u64],
    deadline: Instant,
) -> Result<u64, Fail> {
    let mut last = 0;
    for batch in users.chunks(ADD_BATCH) {
        let add = protocol::GroupAddMembers { group_id, user_ids: batch.to_vec() };
        let k = kind::GROUP_ADD_MEMBERS;
        let ok = group_request(w, io, rd, notices, deadline, k, |io| io.queue(k, &add)).await?;
        last = last.max(ok.seq);
    }
    Ok(last)
}

/// Wait until every member of the group has joined or given up, then read the group's notices
/// up to the last join's: when this returns, nothing of the setup is left on the way to this
/// member.
async fn all_in(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    groups: &Groups,
    group: u32,
    notices: &mut Notices,
    deadline: Instant,
) -> Result<(), Fail> {
    let shared = &groups.shared[group as usize];
    let group_id = shared.id.load(SeqCst);
    loop {
        let done = shared.joined.load(SeqCst) + shared.gave_up.load(SeqCst) >= groups.members;
        if done && notices.last(group_id) >= shared.last_seq.load(SeqCst) {
            return Ok(());
        }
        if Instant::now() >= deadline || w.phase() != Phase::Setup {
            return Err(Fail::Timeout);
        }
        // Read what comes (the notices of later joins) while the others join; once all are in,
        // wait for the last notice without looking again.
        let wait = if done { left(deadline) } else { JOINED_POLL };
        match read_event(w, io, rd, notices, wait).await {
            Ok(Some(Event::Kick(k))) => return Err(Fail::Kicked(k.reason)),
            Ok(_) => {}
            Err(Fail::Timeout) if !done => {}
            Err(e) => return Err(e),
        }
    }
}

/// Deliveries, lost, duplicated and out-of-order counts of one group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupTally {
    pub group: u32,
    pub id: u64,
    /// Live members.
    pub members: u32,
    /// Messages acknowledged to its senders.
    pub acked: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Received again after a member's reconnect (at-least-once; not a failure).
    pub redelivered: u64,
    pub out_of_order: u64,
    /// Received by a member from a sender of another group, or its own message.
    pub misrouted: u64,
}

impl GroupTally {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.misrouted == 0
    }
}

/// The verdict of a group run: the totals, and per group.
#[derive(Clone, Debug, Default)]
pub struct GroupVerdict {
    pub v: Verdict,
    pub per_group: Vec<GroupTally>,
}

/// Check every live member of every group against every sender of its group: each message the
/// sender got acknowledged must have been received by each other live member (received twice
/// and out of order the members counted as they went).
pub fn verdict(groups: &Groups, live: &LiveSet, ledgers: &[ConnLedger]) -> GroupVerdict {
    let mut by_conn: Vec<Option<&ConnLedger>> = vec![None; live.connections as usize];
    for l in ledgers {
        if let Some(slot) = by_conn.get_mut(l.conn as usize) {
            *slot = Some(l);
        }
    }
    let empty = Bits::default();
    let mut out = GroupVerdict::default();
    for group in 0..groups.groups {
        let mut t = GroupTally {
            group,
            id: groups.shared.get(group as usize).map_or(0, |s| s.id.load(SeqCst)),
            members: groups.live_members(live, group).count() as u32,
            ..Default::default()
        };
        let members: Vec<u32> = groups.members_of(group).collect();
        for &s in &members {
            let Some(sl) = by_conn[s as usize] else { continue };
            t.acked += sl.acked.count();
            out.v.unanswered += sl.unanswered;
            out.v.abandoned += sl.abandoned;
            if sl.acked.count() == 0 {
                continue;
            }
            for r in groups.live_members(live, group).filter(|&r| r != s) {
                let owed = sl.acked.count();
                t.expected += owed;
                let got = by_conn[r as usize].and_then(|rl| rl.received.get(&s)).unwrap_or(&empty);
                let (both, only) = got.overlap(&sl.acked);
                t.delivered += both;
                t.lost += owed - both;
                out.v.delivered_unacked += only;
            }
        }
        for &r in &members {
            let Some(rl) = by_conn[r as usize] else { continue };
            t.duplicated += rl.duplicated;
            t.redelivered += rl.redelivered;
            t.out_of_order += rl.out_of_order;
            t.misrouted += rl
                .received
                .iter()
                .filter(|(&from, _)| from == r || groups.group_of(from) != group)
                .map(|(_, b)| b.count())
                .sum::<u64>();
        }
        out.v.acked += t.acked;
        out.v.expected += t.expected;
        out.v.delivered += t.delivered;
        out.v.lost += t.lost;
        out.v.misrouted += t.misrouted;
        out.per_group.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::SendLog;

    fn live(connections: u32, dead: &[u32]) -> LiveSet {
        LiveSet {
            connections,
            users: connections,
            conn_live: (0..connections).map(|c| !dead.contains(&c)).collect(),
            per_user: vec![1; connections as usize],
            user_ids: (1..=connections as u64).collect(),
            known: (0..connections).collect(),
            next_known: (0..connections).map(|u| (u + 1) % connections).collect(),
        }
    }

    /// 2 groups × 4 members, 2 senders each: group 0 = {0, 2, 4, 6}, group 1 = {1, 3, 5, 7};
    /// the senders are 0, 2 and 1, 3. Connection 6 is not live.
    #[test]
    fn membership() {
        let g = Groups::with(2, 4, 2);
        let l = live(8, &[6]);
        assert_eq!(g.members_of(0).collect::<Vec<_>>(), [0, 2, 4, 6]);
        assert_eq!(g.live_members(&l, 0).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!((g.group_of(5), g.rank_of(5)), (1, 2));
        assert!(g.sends(3) && !g.sends(4));
        assert_eq!(g.senders(&l), 4);
        let mut out = Vec::new();
        g.receivers(&l, 2, 0, &mut out);
        assert_eq!(out, [0, 4]);
        assert_eq!((g.fanout(&l, 2, 0), g.fanout(&l, 1, 0)), (2, 3));
        assert_eq!(g.to(&l, 1, 0), None, "not created yet");
        g.shared[1].id.store(protocol::GROUP_ID_MIN + 9, SeqCst);
        assert_eq!(g.to(&l, 3, 0), Some(protocol::GROUP_ID_MIN + 9));
    }

    fn sender(conn: u32, acked: impl IntoIterator<Item = u64>) -> ConnLedger {
        let mut send = SendLog::default();
        for n in acked {
            send.acked.set(n);
        }
        ConnLedger::new(conn, send, RecvLog::default())
    }

    fn member(conn: u32, got: &[(u32, &[u64])], duplicated: u64, out_of_order: u64) -> ConnLedger {
        let mut r = RecvLog::default();
        for &(from, counters) in got {
            for &n in counters {
                r.record(from, n, 0, None);
            }
        }
        let mut l = ConnLedger::new(conn, SendLog::default(), r);
        (l.duplicated, l.out_of_order) = (duplicated, out_of_order);
        l
    }

    /// Group 0 = {0 sender, 2, 4}, group 1 = {1 sender, 3, 5}; each sender has 0..5 acked.
    /// In group 0 member 4 misses message 3 and got one twice; in group 1 member 5 also got a
    /// message of group 0's sender, and member 3 one out of order.
    #[test]
    fn verdict_per_group() {
        let g = Groups::with(2, 3, 1);
        let l = live(6, &[]);
        let all: &[u64] = &[0, 1, 2, 3, 4];
        let mut s0 = sender(0, 0..5);
        s0.received.insert(0, {
            let mut b = Bits::default();
            b.set(9); // its own message came back: misrouted
            b
        });
        let ledgers = vec![
            s0,
            sender(1, 0..5),
            member(2, &[(0, all)], 0, 0),
            member(3, &[(1, all)], 0, 1),
            member(4, &[(0, &[0, 1, 2, 4])], 1, 0),
            member(5, &[(1, all), (0, &[0])], 0, 0),
        ];
        let v = verdict(&g, &l, &ledgers);
        let (g0, g1) = (v.per_group[0], v.per_group[1]);
        assert_eq!((g0.acked, g0.expected, g0.delivered, g0.lost), (5, 10, 9, 1));
        assert_eq!((g0.duplicated, g0.out_of_order, g0.misrouted), (1, 0, 1));
        assert_eq!((g1.acked, g1.expected, g1.delivered, g1.lost), (5, 10, 10, 0));
        assert_eq!((g1.duplicated, g1.out_of_order, g1.misrouted), (0, 1, 1));
        assert!(!g0.ok() && !g1.ok());
        assert_eq!((v.v.acked, v.v.expected, v.v.delivered, v.v.lost, v.v.misrouted), (10, 20, 19, 1, 2));
        // Delivered to a member who is not live: not owed, so not lost.
        let v = verdict(&g, &live(6, &[4]), &ledgers);
        assert_eq!((v.per_group[0].expected, v.per_group[0].lost, v.per_group[0].members), (5, 0, 2));
    }

    /// A member's notices during setup: the highest seq per group; messages are not notices.
    #[test]
    fn notices_during_setup() {
        let mut n = Notices::default();
        let frame = |seq, from, to| {
            let mut p = vec![0u8; Stamp::BYTES];
            Stamp { msg_id: 0, seq, ts_ms: 0, from, to, conv: conv::GROUP }.write(&mut p);
            p
        };
        let gid = protocol::GROUP_ID_MIN + 1;
        assert!(n.note(kind::DELIVER, &frame(3, 0, gid)));
        assert!(n.note(kind::DELIVER, &frame(2, 0, gid)));
        assert!(!n.note(kind::DELIVER, &frame(9, 42, gid)), "a message");
        assert!(!n.note(kind::PONG, &frame(9, 0, gid)));
        assert_eq!((n.last(gid), n.last(gid + 1)), (3, 0));
    }
}
