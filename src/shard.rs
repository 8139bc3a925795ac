//! The shard runtime: everything one core owns, and the only place that executes effects — it
//! touches the sockets' sessions, the mesh, timers and the store; the owner roles
//! ([`crate::roles`]) only decide.
//!
//! Key types: [`Shard`] (one core's runtime; shared by its tasks through `Rc`), [`Shared`] (what
//! all shards share: config, auth, store, workers).
//!
//! Everything here runs on the shard's own thread; `RefCell` borrows are never held across an
//! `.await` nor while effects run. Envelopes for the shard itself go through a local FIFO
//! instead of the mesh, so that handling one never re-enters another.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use ahash::RandomState;
use bytes::Bytes;
use tim_shards::{MeshPort, SendError};

use crate::{
    auth::Auth,
    backpressure::{Backpressure, Watermark},
    commit::{CommitQueues, LoadQueues, Queued},
    config::Config,
    envelope::{Envelope, Remote, RoomOp, SessionRef},
    frame::{self, AlignedBuf},
    guard::{Action, AddressGuard},
    notify::LocalNotify,
    placement::{NodeId, Owner, Placement, Table},
    protocol::{self, kind, ErrorCode},
    roles::{CommitOutcome, ConvOwner, Effect, Effects, GroupOwner, RoomOwner, Sequenced, UserOwner},
    session::{error_frame, Session},
    store::{
        CatchUp, ConvKey, ConvLoad, Cursor, Duplicates, GroupLoad, PageLimit, Store, StoreError, Unstored,
        UserId,
    },
    workers::Workers,
};

pub use crate::roles::conv::SHARDS_MAX;

/// Conversation eviction-queue entries one timeout tick looks at, at most.
const EVICT_PER_TICK_MAX: usize = 4096;
/// The longest a shard waits for its cluster gateway to echo a fence (see
/// [`Shard::recall_from_gateway`]); it goes on without the echo after that (logged).
const FENCE_WAIT_MAX: Duration = Duration::from_secs(1);

/// What every shard shares. Immutable after start, or atomic.
pub struct Shared {
    pub cfg: Config,
    pub auth: Auth,
    pub store: Arc<dyn Store>,
    pub workers: Workers,
    /// Set when the server should stop; shards are then signalled through the mesh.
    pub stop: AtomicBool,
    /// Envelopes dropped because a destination's overflow was full (should stay 0).
    pub dropped_envelopes: AtomicU64,
    /// This node's latest cluster table (unused on a single node).
    pub table: Arc<crate::placement::SharedTable>,
    /// Raised while deliveries wait past a watermark somewhere on this node: new sends are
    /// then held back ([`crate::backpressure`]).
    pub pressure: Arc<Backpressure>,
    /// Envelopes the cluster gateway could not carry (no link, or a full one): requests among
    /// them answered NodeUnavailable, the rest dropped.
    pub cluster_bounced: Arc<AtomicU64>,
}

pub use crate::clock::now_ms;

/// Counters of one shard.
#[derive(Default)]
pub struct Stats {
    pub accepted: Cell<u64>,
    pub deliveries: Cell<u64>,
    pub delivery_acks: Cell<u64>,
}

pub struct Shard {
    pub id: usize,
    pub shards: usize,
    /// This node (0 on a single node).
    pub node: NodeId,
    placement: RefCell<Placement>,
    /// The mesh index of this node's cluster gateway (the last one), in a cluster.
    gateway: Option<usize>,
    pub shared: Arc<Shared>,
    port: MeshPort<Envelope>,
    local: RefCell<VecDeque<Envelope>>,
    draining: Cell<bool>,
    overflow: RefCell<Vec<VecDeque<Envelope>>>,
    overflow_len: Cell<usize>,
    /// The overflow as a source of backpressure.
    overflow_mark: Watermark,
    /// Sends (and room publishes) held back while the node's backpressure is on, in arrival
    /// order; bounded by the senders' in-flight limits.
    deferred: RefCell<VecDeque<Envelope>>,
    /// Set while held-back sends are handled (they are not held back again).
    undeferring: Cell<bool>,
    pub sessions: RefCell<HashMap<u64, Rc<Session>, RandomState>>,
    next_session: Cell<u64>,
    /// Bytes of large messages this shard's sessions hold (`limits.large_shard_bytes_max`).
    pub(crate) large_bytes: Rc<Cell<usize>>,
    /// The user owner role for this shard's partitions.
    users: RefCell<UserOwner>,
    /// The conversation owner role for this shard's partitions.
    convs: RefCell<ConvOwner>,
    commits: RefCell<CommitQueues>,
    /// Conversations waiting for their load, per store partition.
    loads: RefCell<LoadQueues>,
    /// The room owner role for this shard's partitions.
    rooms: RefCell<RoomOwner>,
    /// The group owner role for this shard's partitions.
    groups: RefCell<GroupOwner>,
    /// This shard's subscribers of each live room (wherever the room's owner is).
    room_subs: RefCell<HashMap<u64, Vec<SessionRef>, RandomState>>,
    /// Draws new room ids.
    next_room: Cell<u64>,
    /// Room messages and closings for local subscribers still to be written, in arrival
    /// order; served `fanout_slice` sessions at a time by `run_fanout`.
    fanout_jobs: RefCell<VecDeque<FanoutJob>>,
    fanout_wake: LocalNotify,
    /// The fan-out jobs as a source of backpressure, at twice `fanout_jobs_max`: room messages
    /// beyond `fanout_jobs_max` are dropped, so only group deliveries (never dropped) get there.
    jobs_mark: Watermark,
    /// Room messages dropped here because `fanout_jobs_max` were waiting, per room: told to the
    /// room's subscribers with its next message.
    room_dropped: RefCell<HashMap<u64, u64, RandomState>>,
    /// Scratch for the effects of one role call (reused, so that handling allocates nothing).
    effects: RefCell<Effects>,
    pool: RefCell<Vec<AlignedBuf>>,
    /// Per-source-address budgets of costly requests.
    guard: RefCell<AddressGuard>,
    /// Fences sent to the cluster gateway so far (see [`Shard::recall_from_gateway`]).
    fences: Cell<u64>,
    /// Envelopes the gateway gave back (sent by an old table to a node now gone) that the mesh
    /// loop took in the batch of a new table: routed again right behind what the table returns.
    given_back: RefCell<Vec<Envelope>>,
    /// Envelopes taken from the gateway's queue ahead of their turn, while looking for a table
    /// or a fence's echo there: handled after the mesh loop's batch (which holds older ones from
    /// that queue), before the next one.
    readahead: RefCell<VecDeque<Envelope>>,
    /// Delivery cursors acknowledged since the last flush: (user, device, conversation) → seq.
    cursors: RefCell<HashMap<(UserId, u64, ConvKey), u64, RandomState>>,
    /// Read positions noted since the last flush (see [`Shard::note_read`]).
    reads: RefCell<HashMap<(UserId, u64, ConvKey), u64, RandomState>>,
    pub shutting_down: Cell<bool>,
    pub shutdown: LocalNotify,
    pub stats: Stats,
}

impl Shard {
    pub fn new(id: usize, shards: usize, shared: Arc<Shared>, port: MeshPort<Envelope>) -> Shard {
        assert!(shards <= SHARDS_MAX);
        let cfg = &shared.cfg;
        let node = cfg.cluster.node_id();
        // A cluster node places everything on itself until its gateway knows the members.
        let placement = match node {
            0 => Placement::new(shards),
            n => Placement::clustered(n, shards, Arc::new(Table::new(0, &[(n, shards as u16)]))),
        };
        let gateway = (node != 0).then_some(shards);
        let me = Owner::new(node, id);
        let store = &shared.store;
        Shard {
            id,
            shards,
            node,
            placement: RefCell::new(placement.clone()),
            gateway,
            local: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            overflow: RefCell::new((0..port.shards()).map(|_| VecDeque::new()).collect()),
            port,
            overflow_len: Cell::new(0),
            overflow_mark: Watermark::new(cfg.limits.mesh_overflow_max / 16),
            deferred: RefCell::new(VecDeque::new()),
            undeferring: Cell::new(false),
            sessions: RefCell::new(HashMap::default()),
            next_session: Cell::new(1),
            large_bytes: Rc::new(Cell::new(0)),
            users: RefCell::new(
                UserOwner::new(cfg.sessions.clone(), cfg.limits.tokens_per_user_max, RandomState::new())
                    .with_presence_coalescing(cfg.limits.presence_coalesce_ms),
            ),
            convs: RefCell::new(
                ConvOwner::new(me, placement.clone(), store.durable(), &cfg.limits, RandomState::new())
                    .with_policy(&cfg.messages),
            ),
            commits: RefCell::new(CommitQueues::new(
                store.partitions(),
                cfg.store.commit_batch_max,
                cfg.store.commit_backlog_max,
            )),
            // Every conversation held is loaded at most once at a time: the owner's bound on
            // conversations bounds the loads waiting.
            loads: RefCell::new(LoadQueues::new(
                store.partitions(),
                cfg.store.load_batch_max,
                cfg.limits.conversations_per_shard_max,
            )),
            rooms: RefCell::new(RoomOwner::new(me, placement.clone(), &cfg.limits)),
            groups: RefCell::new(GroupOwner::new(me, placement, &cfg.limits)),
            room_subs: RefCell::new(HashMap::default()),
            next_room: Cell::new(tim_shards::mix64(now_ms() ^ ((id as u64) << 48))),
            fanout_jobs: RefCell::new(VecDeque::new()),
            fanout_wake: LocalNotify::default(),
            jobs_mark: Watermark::new(cfg.limits.fanout_jobs_max * 2),
            room_dropped: RefCell::new(HashMap::default()),
            effects: RefCell::new(Vec::new()),
            pool: RefCell::new(Vec::new()),
            guard: RefCell::new(AddressGuard::new(&cfg.limits)),
            fences: Cell::new(0),
            given_back: RefCell::new(Vec::new()),
            readahead: RefCell::new(VecDeque::new()),
            cursors: RefCell::new(HashMap::default()),
            reads: RefCell::new(HashMap::default()),
            shutting_down: Cell::new(false),
            shutdown: LocalNotify::default(),
            stats: Stats::default(),
            shared,
        }
    }

    pub fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    /// A new room id: drawn at random (ids are not guessable in sequence), never 0.
    pub fn new_room_id(&self) -> u64 {
        let n = self.next_room.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.next_room.set(n);
        tim_shards::mix64(n ^ now_ms()).max(1)
    }

    pub fn new_session_ref(&self) -> SessionRef {
        let n = self.next_session.get();
        self.next_session.set(n + 1);
        SessionRef::on(self.node, self.id, n)
    }

    /// Messages this shard's conversation owner has sequenced.
    pub fn messages_sequenced(&self) -> u64 {
        self.convs.borrow().sequenced
    }

    /// Conversations this shard holds in memory.
    pub fn conversations(&self) -> usize {
        self.convs.borrow().len()
    }

    // ---- read buffer pool ----

    /// Envelopes waiting in this shard's queue to each mesh endpoint (for `/metrics`).
    pub fn mesh_queued(&self) -> Vec<usize> {
        (0..self.port.shards()).map(|d| if d == self.id { 0 } else { self.port.queued_to(d) }).collect()
    }

    /// Envelopes held back now because a mesh queue was full.
    pub fn overflow_len(&self) -> usize {
        self.overflow_len.get()
    }

    pub fn take_buf(&self) -> AlignedBuf {
        self.pool.borrow_mut().pop().unwrap_or_else(|| AlignedBuf::new(self.cfg().limits.read_buffer_bytes))
    }

    pub fn put_buf(&self, mut buf: AlignedBuf) {
        let l = &self.cfg().limits;
        let mut pool = self.pool.borrow_mut();
        if buf.capacity() == l.read_buffer_bytes && pool.len() < l.read_buffers_pooled_max {
            buf.clear();
            pool.push(buf);
        }
    }

    // ---- routing ----

    /// Where keys live (the cluster's current table, in a cluster).
    fn placement(&self) -> std::cell::Ref<'_, Placement> {
        self.placement.borrow()
    }

    /// Ask where something lives: the borrow ends before the answer is used, so that posting
    /// to the answer (which may handle envelopes, and so apply a new table) is safe.
    pub fn place<T>(&self, f: impl FnOnce(&Placement) -> T) -> T {
        f(&self.placement.borrow())
    }

    /// This shard as an owner.
    pub fn me(&self) -> Owner {
        Owner::new(self.node, self.id)
    }

    /// Send `env` to its owner `dst`: handled here when `dst` is this shard, through the mesh to
    /// another shard of this node, through the cluster gateway to another node's.
    pub fn post(&self, dst: Owner, env: Envelope) {
        if dst.node != self.node {
            return self.post_remote(dst, env);
        }
        self.post_shard(dst.shard(), env)
    }

    fn post_remote(&self, to: Owner, env: Envelope) {
        match self.gateway {
            Some(g) => {
                self.post_shard(g, Envelope::Remote(Box::new(Remote { to, from: self.id as u16, env })))
            }
            None => {
                // A single node has no other node: a bug, not a condition.
                debug_assert!(false, "an envelope for node {} on a single node", to.node);
                self.shared.dropped_envelopes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Send `env` to mesh endpoint `dst` of this node (a shard, or the gateway). A full mesh
    /// queue parks the envelope in a bounded per-destination overflow that the mesh loop
    /// retries.
    fn post_shard(&self, dst: usize, env: Envelope) {
        if dst == self.id {
            self.local.borrow_mut().push_back(env);
            self.drain_local();
            return;
        }
        if self.overflow.borrow()[dst].is_empty() {
            match self.port.try_send(dst, env) {
                Ok(()) => return,
                Err(SendError::Full(env)) => return self.overflow_push(dst, env),
                Err(SendError::ToSelf(_)) => unreachable!("dst != self.id"),
            }
        }
        self.overflow_push(dst, env);
    }

    fn overflow_push(&self, dst: usize, env: Envelope) {
        if self.overflow_len.get() >= self.cfg().limits.mesh_overflow_max && !env.never_dropped() {
            // Refuse at the edge where a client can retry; anything further along is dropped
            // and counted (the inflight and connection limits keep this from happening).
            let env = match env {
                Envelope::Remote(r) => r.env,
                env => env,
            };
            match env {
                Envelope::Submit(sub) => self.reject(sub.origin, sub.client_msg_id, ErrorCode::Busy),
                // A room request from one of this shard's sessions: Busy, as a Send (a refused
                // publish names its client message id).
                Envelope::Room(req) => {
                    let id = match req.op {
                        RoomOp::Publish { client_msg_id, .. } => client_msg_id,
                        _ => req.room,
                    };
                    self.on_room_reply(req.origin, id, req.op.request_kind(), Err(ErrorCode::Busy));
                }
                // A group request from one of this shard's sessions, waiting for its answer.
                Envelope::Group(req) => {
                    if let Some(s) = self.session(req.origin) {
                        s.on_group_reply(req.op.request_kind(), Err(ErrorCode::Busy));
                    }
                }
                _ => {
                    let n = self.shared.dropped_envelopes.fetch_add(1, Ordering::Relaxed);
                    if n == 0 {
                        log::warn!("shard {}: mesh overflow full, dropping envelopes", self.id);
                    }
                }
            }
            return;
        }
        self.overflow.borrow_mut()[dst].push_back(env);
        self.overflow_len.set(self.overflow_len.get() + 1);
        self.overflow_mark.update(self.overflow_len.get(), &self.shared.pressure);
    }

    /// Retry envelopes held back by full queues, in order.
    fn flush_overflow(&self) {
        let mut overflow = self.overflow.borrow_mut();
        let mut moved = 0;
        for (dst, q) in overflow.iter_mut().enumerate() {
            while let Some(env) = q.pop_front() {
                match self.port.try_send(dst, env) {
                    Ok(()) => moved += 1,
                    Err(e) => {
                        q.push_front(e.into_inner());
                        break;
                    }
                }
            }
        }
        self.overflow_len.set(self.overflow_len.get() - moved);
        self.overflow_mark.update(self.overflow_len.get(), &self.shared.pressure);
    }

    /// Whether `env` is held back now: a send (1:1, group or stream) while the node's
    /// backpressure is on, or while earlier ones still wait (order is kept). Room publishes are
    /// not: they are not counted in flight (nothing would bound them here), and a room that
    /// falls behind drops messages for its subscribers, who are told (`Missed`).
    #[inline]
    fn held_back(&self, env: &Envelope) -> bool {
        matches!(env, Envelope::Submit(_))
            && !self.undeferring.get()
            && (self.shared.pressure.on() || !self.deferred.borrow().is_empty())
    }

    /// Handle held-back sends, in order, while the node's backpressure stays off (at most
    /// `max` of them, so that the mesh loop goes on).
    fn undefer(&self, max: usize) {
        for _ in 0..max {
            if self.shared.pressure.on() {
                return;
            }
            let Some(env) = self.deferred.borrow_mut().pop_front() else { return };
            self.undeferring.set(true);
            self.dispatch(env);
            self.undeferring.set(false);
        }
    }

    /// Sends held back now.
    pub fn deferred_len(&self) -> usize {
        self.deferred.borrow().len()
    }

    fn drain_local(&self) {
        if self.draining.replace(true) {
            return;
        }
        loop {
            let next = self.local.borrow_mut().pop_front();
            match next {
                Some(env) => self.handle(env),
                None => break,
            }
        }
        self.draining.set(false);
    }

    fn dispatch(&self, env: Envelope) {
        self.local.borrow_mut().push_back(env);
        self.drain_local();
    }

    /// Handle what was taken from the gateway's queue ahead of its turn (see `readahead`).
    fn dispatch_readahead(&self) {
        loop {
            let next = self.readahead.borrow_mut().pop_front();
            match next {
                Some(env) => self.dispatch(env),
                None => return,
            }
        }
    }

    /// The mesh loop: drain envelopes in batches until the shard stops.
    pub async fn run_mesh(self: Rc<Self>) {
        let batch_max = self.cfg().limits.mesh_batch_max;
        let mut batch = Vec::with_capacity(batch_max);
        loop {
            if self.overflow_len.get() > 0 {
                self.flush_overflow();
            }
            if !self.deferred.borrow().is_empty() {
                self.undefer(batch_max);
            }
            self.dispatch_readahead();
            batch.clear();
            // Held back envelopes are retried soon, whether or not anything arrives (the
            // backpressure may be lowered by another shard or the cluster gateway).
            let n = if self.overflow_len.get() > 0 || !self.deferred.borrow().is_empty() {
                let wait = Duration::from_micros(100);
                monoio::time::timeout(wait, self.port.recv_batch(&mut batch, batch_max)).await.unwrap_or(0)
            } else {
                self.port.recv_batch(&mut batch, batch_max).await
            };
            if n == 0 && self.shared.stop.load(Ordering::Acquire) && !self.shutting_down.get() {
                self.begin_shutdown();
            }
            if self.gateway.is_some() {
                // A new table (with what this shard sent to a node now gone) goes first: the
                // rest of the batch is handled by it, after those returned envelopes, and after
                // those the gateway gave back (`Remote`: sent by the old table after the
                // gateway had taken its inbox) — they may be anywhere in the batch, behind
                // envelopes from other shards sent by the new table.
                if let Some(i) = batch.iter().position(|e| matches!(e, Envelope::Placement(_))) {
                    let p = batch.remove(i);
                    let mut given_back = self.given_back.borrow_mut();
                    let mut rest = Vec::with_capacity(batch.len() + 1);
                    rest.push(p);
                    for env in batch.drain(..) {
                        match env {
                            Envelope::Remote(r) => given_back.push(r.env),
                            env => rest.push(env),
                        }
                    }
                    drop(given_back);
                    batch = rest;
                }
            }
            for env in batch.drain(..) {
                self.dispatch(env);
            }
            self.dispatch_readahead();
            // Under steady traffic `recv_batch` never waits: let the connections run.
            tim_shards::yield_now().await;
        }
    }

    /// Close sessions that ran into the login or idle timeout. One sweep per tick over the
    /// shard's sessions replaces a timer per connection.
    pub async fn run_timeouts(self: Rc<Self>) {
        let l = &self.cfg().limits;
        let login = Duration::from_millis(l.login_timeout_ms);
        let idle = Duration::from_millis(l.idle_timeout_ms);
        let answer_timeout = Duration::from_millis(l.answer_timeout_ms);
        let partial = Duration::from_millis(l.partial_frame_timeout_ms);
        let upload_timeout = Duration::from_millis(l.upload_idle_timeout_ms);
        let tick = (login.min(idle).min(answer_timeout).min(partial) / 8)
            .clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut expired = Vec::new();
        let mut next_room_sweep = 0;
        while !self.shutting_down.get() {
            monoio::time::sleep(tick).await;
            let now = std::time::Instant::now();
            for s in self.sessions.borrow().values() {
                match s.timed_out(now, login, idle) {
                    Some(code) => expired.push((s.clone(), code)),
                    // Sends whose answer was lost or held up get Timeout: an in-flight count
                    // never leaks.
                    None => {
                        s.fail_overdue_sends(now, answer_timeout);
                        s.expire_upload(now, upload_timeout);
                    }
                }
            }
            for (s, code) in expired.drain(..) {
                s.fail(code);
            }
            // Idle conversations go, a bounded number per tick.
            self.convs.borrow_mut().evict_idle(now_ms(), EVICT_PER_TICK_MAX);
            // Rooms without a publish for `room_idle_secs` close, looked at once a second.
            let now = now_ms();
            if now >= next_room_sweep {
                next_room_sweep = now + 1000;
                let mut fx = Vec::new();
                self.rooms.borrow_mut().expire(now, &mut fx);
                self.execute(&mut fx);
                self.groups.borrow_mut().evict_idle(now, EVICT_PER_TICK_MAX);
            }
        }
    }

    /// Remember a device's delivery ack; written to the store by `run_cursor_flush`.
    pub fn note_cursor(&self, c: Cursor) {
        if !self.shared.store.durable() {
            return;
        }
        let mut cursors = self.cursors.borrow_mut();
        let key = (c.user, c.device, c.conv);
        if let Some(seq) = cursors.get_mut(&key) {
            *seq = (*seq).max(c.seq);
        } else if cursors.len() < self.cfg().limits.cursors_pending_max {
            cursors.insert(key, c.seq);
        }
        // Else dropped: acks for more conversations than that within one flush interval are
        // not real use, and a lost cursor only means the device gets those messages again.
    }

    /// Remember a read position; written to the store by `run_cursor_flush` (on every store:
    /// the memory store keeps read positions too).
    pub fn note_read(&self, c: Cursor) {
        let mut reads = self.reads.borrow_mut();
        let key = (c.user, c.device, c.conv);
        if let Some(seq) = reads.get_mut(&key) {
            *seq = (*seq).max(c.seq);
        } else if reads.len() < self.cfg().limits.cursors_pending_max {
            reads.insert(key, c.seq);
        }
    }

    /// Every `presence_coalesce_ms`: tell friends the presence of the users that changed.
    pub async fn run_presence_flush(self: Rc<Self>) {
        let every = Duration::from_millis(self.cfg().limits.presence_coalesce_ms.max(1));
        while !self.shutting_down.get() {
            monoio::time::sleep(every).await;
            let mut fx = Vec::new();
            self.users.borrow_mut().flush_presence(now_ms(), &mut fx);
            self.execute(&mut fx);
        }
    }

    /// Send `frame` to the live sessions of `users`: one `GroupFanout` per user owner.
    fn fanout_users(&self, users: Vec<UserId>, frame: Bytes) {
        let mut by_owner: Vec<(crate::placement::Owner, Vec<UserId>)> = Vec::new();
        self.place(|p| {
            for u in users {
                let o = p.user(u);
                match by_owner.iter_mut().find(|(x, _)| *x == o) {
                    Some((_, list)) => list.push(u),
                    None => by_owner.push((o, vec![u])),
                }
            }
        });
        for (owner, users) in by_owner {
            let f = crate::envelope::GroupFanout {
                users: users.into(),
                skip: SessionRef::NONE,
                frame: frame.clone(),
                lossy: false,
            };
            self.post(owner, Envelope::GroupFanout(Box::new(f)));
        }
    }

    /// Burn what is due, every second (durable stores): claim the due burn-after-read messages
    /// and hand each conversation's owner a burn notice per sender, which burns them in its
    /// commit (see [`crate::store::Edit::Burn`]). A claim whose notice is not stored is claimed
    /// again after `BURN_CLAIM_MS`; every node may sweep (claims are exclusive).
    pub async fn run_burn_sweep(self: Rc<Self>) {
        const BATCH: usize = 1024;
        while !self.shutting_down.get() {
            let store = self.shared.store.clone();
            let due =
                match self.shared.workers.store.run(move || store.claim_due_burns(now_ms(), BATCH)).await {
                    Ok(Ok(due)) => due,
                    Ok(Err(e)) => {
                        log::warn!("store: claiming due burns: {e}");
                        Vec::new()
                    }
                    Err(e) => {
                        log::warn!("store: claiming due burns: {e}");
                        Vec::new()
                    }
                };
            let full = due.len() >= BATCH;
            self.post_burns(due);
            if !full {
                monoio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// One burn notice per (conversation, sender of the burned messages), from its recipient.
    fn post_burns(&self, due: Vec<crate::store::DueBurn>) {
        let mut by_conv: HashMap<(ConvKey, UserId), Vec<u64>, RandomState> = HashMap::default();
        for d in due.into_iter().filter(|d| d.conv.0 != 0) {
            by_conv.entry((d.conv, d.sender)).or_default().push(d.seq);
        }
        for ((conv, sender), mut seqs) in by_conv {
            seqs.sort_unstable();
            let reader = if conv.0 == sender { conv.1 } else { conv.0 };
            let body = seqs.iter().flat_map(|s| s.to_le_bytes()).collect();
            let send = protocol::Send {
                conv: protocol::conv::DIRECT,
                flags: protocol::send_flags::BURNED,
                burn_secs: 0,
                to: sender,
                client_msg_id: 0,
                body,
            };
            let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&send).expect("a Send archives");
            let sub = crate::envelope::Submit {
                origin: SessionRef::NONE,
                sender: reader,
                to: sender,
                conv: protocol::conv::DIRECT,
                client_msg_id: 0,
                sender_device: 0,
                stream: false,
                frame: crate::envelope::Submit::blank_deliver(&archive),
                change: None,
                refuse_new: None,
                by_manager: false,
            };
            self.post(self.place(|p| p.conv(conv)), Envelope::Submit(Box::new(sub)));
        }
    }

    /// Write acknowledged cursors to the store every `cursor_flush_ms`, in one batch. A cursor
    /// lost in a crash only means a device gets those messages again at its next login.
    pub async fn run_cursor_flush(self: Rc<Self>) {
        let every = Duration::from_millis(self.cfg().limits.cursor_flush_ms);
        while !self.shutting_down.get() {
            monoio::time::sleep(every).await;
            self.flush_cursors().await;
        }
    }

    /// Write the cursors and read positions noted so far (the shard's last act before it
    /// stops, too). Those whose write fails are kept for the next flush.
    pub async fn flush_cursors(&self) {
        self.flush_positions(&self.reads, "read positions", |s, b| s.save_reads(b), Self::note_read).await;
        self.flush_positions(&self.cursors, "cursors", |s, b| s.save_cursors(b), Self::note_cursor).await;
    }

    async fn flush_positions(
        &self,
        pending: &RefCell<HashMap<(UserId, u64, ConvKey), u64, RandomState>>,
        what: &str,
        save: fn(&dyn Store, &[Cursor]) -> Result<(), StoreError>,
        keep: fn(&Self, Cursor),
    ) {
        let batch: Vec<Cursor> = pending
            .borrow_mut()
            .drain()
            .map(|((user, device, conv), seq)| Cursor { user, device, conv, seq })
            .collect();
        if batch.is_empty() {
            return;
        }
        let store = self.shared.store.clone();
        let kept = batch.clone();
        match self.shared.workers.store.run(move || save(&*store, &batch)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => log::warn!("store: saving {what}: {e}"),
            Err(e) => log::warn!("store: saving {what}: {e}"),
        }
        for c in kept {
            keep(self, c);
        }
    }

    /// Stop accepting and tell every session the server is going away.
    pub fn begin_shutdown(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        self.shutdown.notify();
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
        for s in sessions {
            s.kick(ErrorCode::ShuttingDown);
        }
    }

    // ---- envelope handling: sessions here, roles through effects ----

    fn handle(&self, env: Envelope) {
        // The clock is read only by the arms that need it: deliveries and acks, the bulk of the
        // traffic, do not.
        // An envelope for an owner that is not (or no longer) this shard: the sender placed it
        // by another table (the cluster's members just changed here or there). On to the owner.
        if self.gateway.is_some() {
            if let Some(owner) = self.owner_of(&env) {
                if owner != self.me() {
                    // Placed by a newer table than this shard's, perhaps: look first. If it is,
                    // what this shard had sent by the old table came back into `local` with it
                    // (`take_returned`, `recall_from_gateway`): this envelope goes behind those
                    // (and is placed again), or it would overtake its conversation's earlier
                    // deliveries among them.
                    if self.refresh_table() {
                        self.local.borrow_mut().push_back(env);
                        return;
                    }
                    return self.post(owner, env);
                }
            }
        }
        if self.held_back(&env) {
            self.deferred.borrow_mut().push_back(env);
            return;
        }
        let mut fx = std::mem::take(&mut *self.effects.borrow_mut());
        match env {
            Envelope::Submit(sub) if sub.conv == protocol::conv::GROUP => {
                self.groups.borrow_mut().submit(sub, now_ms(), &mut fx)
            }
            Envelope::Submit(sub) => self.convs.borrow_mut().submit(sub, now_ms(), &mut fx),
            Envelope::Fanout { user, skip, frame } => {
                debug_assert_eq!(self.place(|p| p.user(user)), self.me(), "fanout on the wrong shard");
                self.users.borrow().fanout(user, skip, &frame, &mut fx);
            }
            Envelope::Attach(a) => self.users.borrow_mut().attach(&a, now_ms(), &mut fx),
            Envelope::Detach { user, session } => {
                self.users.borrow_mut().detach(user, session, now_ms(), &mut fx)
            }
            Envelope::StoreToken { user, session, hash, expires_at_ms } => {
                self.users.borrow_mut().store_token(user, session, hash, expires_at_ms, now_ms(), &mut fx)
            }
            Envelope::Acked { session, ack } => {
                if let Some(s) = self.session(session) {
                    s.on_acked(&ack);
                }
            }
            Envelope::Rejected { session, client_msg_id, code } => {
                if let Some(s) = self.session(session) {
                    s.on_rejected(client_msg_id, code);
                    if code == ErrorCode::UnknownRecipient {
                        self.count_unknown_recipient(&s, now_ms());
                    }
                }
            }
            Envelope::Deliver { session, frame } => {
                if let Some(s) = self.session(session) {
                    self.stats.deliveries.set(self.stats.deliveries.get() + 1);
                    s.push(frame);
                }
            }
            Envelope::AttachResult { session, user, result } => {
                let taken = self.session(session).is_some_and(|s| s.on_attach_result(user, result));
                if !taken && result.is_ok() {
                    // The connection ended, or its login timed out, while the user owner gave it
                    // a place: undo the attach, or a phantom session would count against the
                    // user's device limits.
                    self.post(self.place(|p| p.user(user)), Envelope::Detach { user, session });
                }
            }
            Envelope::Kick { session, reason } => {
                if let Some(s) = self.session(session) {
                    s.kick(reason);
                }
            }
            Envelope::TokenResult { session, result } => {
                if let Some(s) = self.session(session) {
                    s.on_token_result(result);
                }
            }
            Envelope::StreamFanout { user, skip, frame } => {
                self.users.borrow().fanout_stream(user, skip, &frame, &mut fx);
            }
            Envelope::StreamDeliver { session, frame } => {
                if let Some(s) = self.session(session) {
                    // Missed streams are counted per conversation: by the other user.
                    let stamp = protocol::Stamp::read(&frame[frame::HEADER_BYTES..]).expect("stamped");
                    let peer = if stamp.from == s.user() || stamp.conv == protocol::conv::GROUP {
                        stamp.to
                    } else {
                        stamp.from
                    };
                    let max = self.cfg().limits.room_queue_frames_max;
                    s.push_lossy((protocol::missed::STREAM, peer), frame, max);
                }
            }
            Envelope::StreamRefused { session, client_msg_id, code } => {
                if let Some(s) = self.session(session) {
                    s.push(error_frame(code, kind::STREAM, client_msg_id));
                    if code == ErrorCode::UnknownRecipient {
                        self.count_unknown_recipient(&s, now_ms());
                    }
                }
            }
            Envelope::Room(req) => self.rooms.borrow_mut().request(*req, now_ms(), &mut fx),
            Envelope::RoomReply { session, room, request_kind, result } => {
                self.on_room_reply(session, room, request_kind, result)
            }
            Envelope::RoomFanout { room, skip, frame } => {
                self.room_job(FanoutJob::Message { room, skip, frame: Some(frame), next: 0, missed: 0 })
            }
            Envelope::RoomClosed { room, reason } => self.room_job(FanoutJob::Closed { room, reason }),
            Envelope::Group(req) => self.groups.borrow_mut().request(req, now_ms(), &mut fx),
            Envelope::GroupReply { session, request_kind, result } => {
                if let Some(s) = self.session(session) {
                    s.on_group_reply(request_kind, result);
                }
            }
            Envelope::DeliverMany(m) => self.deliver_many(&m.sessions, &m.frame, m.lossy),
            Envelope::GroupFanout(f) => {
                let crate::envelope::GroupFanout { users, skip, frame, lossy } = *f;
                self.room_job(FanoutJob::Users { users, skip, frame, lossy, next: 0 })
            }
            Envelope::Reattach { user, session, device_type, info } => {
                self.users.borrow_mut().reattach(user, session, device_type, *info)
            }
            Envelope::Sessions { user, origin, logout } => {
                self.users.borrow_mut().sessions_request(user, origin, logout, &mut fx)
            }
            Envelope::Ban { user, until_ms } => {
                self.users.borrow_mut().ban(user, until_ms, now_ms(), &mut fx)
            }
            Envelope::Pair { conv, flags, origin } => {
                self.convs.borrow_mut().set_pair(conv, flags);
                let result = Ok(Bytes::new());
                let reply =
                    Envelope::GroupReply { session: origin, request_kind: kind::ROSTER_ACTION, result };
                self.post(origin.owner(), reply);
            }
            Envelope::Presence { msg, .. } => {
                match postcard::from_bytes::<crate::envelope::PresenceMsg>(&msg) {
                    Ok(m) => self.users.borrow_mut().presence(m, now_ms(), &mut fx),
                    Err(e) => log::error!("a presence message does not decode: {e}"),
                }
            }
            // The gateway sends back an envelope this shard placed by a table it has left.
            Envelope::Remote(r) => self.take_back(r.env),
            // The gateway's word that a new table is out (the table itself is taken from
            // `Shared::table`, the latest one).
            Envelope::Placement(u) => self.on_placement(*u),
            // The echo of a fence that was given up on (`recall_from_gateway`): nothing to do.
            Envelope::Fence { .. } => {}
            Envelope::Admin(task) => {
                if let Some(me) = CURRENT.with(|c| c.borrow().clone()) {
                    (task.0)(&me as &dyn std::any::Any);
                }
            }
        }
        self.execute(&mut fx);
        *self.effects.borrow_mut() = fx;
    }

    /// The owner an owner-addressed envelope is for (`None` for envelopes addressed to a
    /// session's shard or to this shard as such).
    fn owner_of(&self, env: &Envelope) -> Option<Owner> {
        env.owner(&self.placement())
    }

    /// Apply this node's latest table if it is newer than the one in use; whether it was.
    /// Called from envelope handling, where no placement borrow is held (callers of `post` never
    /// hold one: see [`Shard::place`]).
    fn refresh_table(&self) -> bool {
        let seen = self.placement.borrow().epoch();
        let Some(t) = self.shared.table.newer_than(seen) else { return false };
        let epoch = t.epoch;
        let dropped = self.apply_table(t);
        self.take_returned(epoch);
        if dropped {
            self.recall_from_gateway();
        }
        true
    }

    /// A table from the gateway, with what this shard had sent to a node now gone.
    fn on_placement(&self, update: crate::envelope::PlacementUpdate) {
        let crate::envelope::PlacementUpdate { table, returned } = update;
        let dropped = table.epoch > self.placement.borrow().epoch() && self.apply_table(table);
        for env in returned {
            self.take_back(env);
        }
        let given_back: Vec<Envelope> = self.given_back.borrow_mut().drain(..).collect();
        for env in given_back {
            self.take_back(env);
        }
        if dropped {
            self.recall_from_gateway();
        }
    }

    /// An envelope this shard sent that the gateway gives back (it waited there for a node now
    /// gone, or was placed by an old table): routed again by the current table, behind the
    /// current envelope and ahead of the rest. A send whose session was answered meanwhile
    /// (NodeUnavailable when the node's loss was seen) goes no further: the client resends it.
    fn take_back(&self, env: Envelope) {
        if let Envelope::Submit(sub) = &env {
            if !sub.stream && sub.sender != 0 && sub.origin.owner() == self.me() {
                let pending = self.session(sub.origin).is_some_and(|s| s.is_pending(sub.client_msg_id));
                if !pending {
                    return;
                }
            }
        }
        self.local.borrow_mut().push_back(env);
    }

    /// After taking table `epoch` from `Shared::table` (before its `Placement` came): take
    /// that `Placement` now from the gateway's queue — the gateway queues it before it
    /// publishes the table, so it is there — with the envelopes it returns. Sent again before
    /// anything this shard sends by the new table, they keep a conversation's deliveries in
    /// order. What the gateway queued ahead of it goes to `readahead`, in order: behind what
    /// this shard took from that queue before (the rest of the mesh loop's batch).
    fn take_returned(&self, epoch: u64) {
        let Some(g) = self.gateway else { return };
        let mut batch = Vec::new();
        loop {
            batch.clear();
            if self.port.try_recv_from(g, &mut batch, 512) == 0 {
                return;
            }
            let mut found = false;
            for env in batch.drain(..) {
                match env {
                    Envelope::Placement(u) if u.table.epoch >= epoch && !found => {
                        found = true;
                        for env in u.returned {
                            self.take_back(env);
                        }
                    }
                    // Given back by the gateway (sent by an older table still): routed again
                    // with what the table returns.
                    Envelope::Remote(r) => self.take_back(r.env),
                    env => self.readahead.borrow_mut().push_back(env),
                }
            }
            if found {
                return;
            }
        }
    }

    /// After a table that dropped a node (its loss, or its leave): take back now what this shard
    /// sent the gateway by the old table after the gateway had emptied its inbox to publish the
    /// new one. Those envelopes did not wait at the gateway to come back with the table
    /// (`Placement`'s `returned`): the gateway hands each back as it reaches it, an envelope for
    /// a node gone, and by then this shard would have routed later envelopes of the same
    /// conversation by the new table: a receiver would get a block of a conversation's
    /// messages after a later one (the fan-outs of a conversation owner here, or those this
    /// shard passed on as the users' owner it was not yet).
    ///
    /// The gateway carries what a shard sends in order, so once it echoes a fence sent now,
    /// everything it gave back is in this shard's queue from it, ahead of the echo (or, taken
    /// already, in the mesh loop's batch: `given_back`, taken with the table). The shard waits
    /// for the echo (a table change is rare, and the gateway answers at once) and takes what
    /// was given back into `local`, behind the envelopes the table returned: nothing else runs
    /// on the shard meanwhile, so nothing is routed by the new table ahead of them. The rest
    /// of what it takes from the gateway's queue meanwhile waits in `readahead`, behind the
    /// batch.
    fn recall_from_gateway(&self) {
        let Some(g) = self.gateway else { return };
        let n = self.fences.get() + 1;
        self.fences.set(n);
        self.post_shard(g, Envelope::Fence { shard: self.id as u16, n });
        let start = std::time::Instant::now();
        let mut batch = Vec::new();
        let mut idle = 0u32;
        loop {
            if self.overflow_len.get() > 0 {
                self.flush_overflow();
            }
            batch.clear();
            if self.port.try_recv_from(g, &mut batch, 512) == 0 {
                if start.elapsed() > FENCE_WAIT_MAX {
                    log::error!(
                        "shard {}: the cluster gateway did not echo a fence in {FENCE_WAIT_MAX:?}",
                        self.id
                    );
                    return;
                }
                idle += 1;
                if idle < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
                continue;
            }
            let mut found = false;
            for env in batch.drain(..) {
                match env {
                    Envelope::Fence { n: m, .. } if m == n => found = true,
                    Envelope::Remote(r) => self.take_back(r.env),
                    env => self.readahead.borrow_mut().push_back(env),
                }
            }
            if found {
                return;
            }
        }
    }

    /// Place by `table` from now on (the cluster's members changed): roles drop what moved
    /// away, this shard's sessions are announced to their users' new owners, and rooms whose
    /// owner changed are closed for their subscribers here (rooms are never stored).
    /// Whether a node of the old table is not in this one (lost, or left): false also when
    /// `table` is not newer than the one in use (nothing is done).
    fn apply_table(&self, table: Arc<Table>) -> bool {
        let old = self.placement.replace(Placement::clustered(self.node, self.shards, table.clone()));
        if old.epoch() >= table.epoch && old.epoch() != 0 {
            self.placement.replace(old);
            return false;
        }
        let new = self.placement().clone();
        let me = self.me();
        let live = |n: NodeId| table.nodes.iter().any(|&(id, _)| id == n);
        log::info!(
            "node {} shard {}: placement epoch {} ({} nodes), owning {} partitions",
            self.node,
            self.id,
            table.epoch,
            table.nodes.len(),
            (0..tim_shards::PARTITIONS).filter(|&p| new.owner_of_partition(p) == me).count()
        );
        let (handed, presences) = self.users.borrow_mut().drop_moved(|u| new.user(u) == me, live, now_ms());
        // So do their presences (what they set, and who their friends are).
        for msg in presences {
            self.post(new.user(msg.user), msg.envelope());
        }
        // One-shot tokens of users that moved go to their new owner (SessionRef::NONE: no
        // answer is wanted).
        for (user, hash, expires_at_ms) in handed {
            let session = SessionRef::NONE;
            self.post(new.user(user), Envelope::StoreToken { user, session, hash, expires_at_ms });
        }
        self.convs.borrow_mut().set_placement(new.clone());
        self.groups.borrow_mut().set_placement(new.clone());
        self.rooms.borrow_mut().set_placement(new.clone(), live);
        // Sessions whose user owner changed are announced to the new one.
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
        let mut moved_users = Vec::new();
        for s in &sessions {
            if let Some((user, device_type)) = s.logged_in() {
                let owner = new.user(user);
                if owner != old.user(user) {
                    let info = Box::new(s.device_info());
                    self.post(owner, Envelope::Reattach { user, session: s.id(), device_type, info });
                    moved_users.push(s.clone());
                }
            }
        }
        // A node that failed may have taken live deliveries with it (fan-outs it had not
        // sent, or that were on their way to it): every session here catches up from its
        // cursors, spread over `resync_spread_ms` so that the store is not asked all at once,
        // starting `failure_detect_ms / 2` from now.
        let lost = old.table().is_some_and(|t| t.nodes.iter().any(|&(n, _)| !live(n)));
        if lost {
            // Sends in flight to owners on the nodes gone may never be answered: answer now.
            for s in &sessions {
                s.fail_sends_to(|n| !live(n));
            }
        }
        // Without a loss (a node joined, or left in good order), only the sessions whose user
        // owner moved may have missed deliveries: fan-outs that reached the new owner before
        // the session's announcement did. They catch up the same way.
        let resyncing = if lost {
            sessions.into_iter().filter(|s| s.logged_in().is_some()).collect()
        } else {
            moved_users
        };
        if !resyncing.is_empty() && self.shared.store.durable() {
            let spread = self.cfg().cluster.resync_spread_ms.max(1);
            let sessions: Vec<Rc<Session>> = resyncing;
            let n = sessions.len().max(1) as u64;
            // Not at once: the other nodes see the loss up to a probe round later, and until
            // they have changed tables too, a session's announcement or a delivery for it may
            // still go the old way. Half the detection time covers that.
            let settle = self.cfg().cluster.failure_detect_ms / 2;
            for (i, s) in sessions.into_iter().enumerate() {
                let delay = Duration::from_millis(settle + spread * i as u64 / n);
                monoio::spawn(resync(self.rc(), s, delay));
            }
        }
        // Rooms with subscribers here whose owner changed are gone.
        let moved: Vec<u64> =
            self.room_subs.borrow().keys().filter(|&&r| new.room(r) != old.room(r)).copied().collect();
        for room in moved {
            self.room_job(FanoutJob::Closed { room, reason: protocol::room_closed::OWNER_LOST });
        }
        lost
    }

    /// Carry out the effects of a role call, in order. Runs with no role borrowed: a post to
    /// this shard only queues (handling runs inside `drain_local`).
    fn execute(&self, fx: &mut Effects) {
        for effect in fx.drain(..) {
            match effect {
                Effect::Post(dst, env) => self.post(dst, env),
                Effect::LoadConv(req) => {
                    let part = self.shared.store.partition_of(req.key);
                    let queued = self.loads.borrow_mut().push(part, req);
                    match queued {
                        Queued::Waiting => {}
                        Queued::Start => drop(monoio::spawn(self.rc().run_loads(part))),
                        Queued::Full(req) => self.with_convs(|c, fx| {
                            c.loaded(req.key, Err(ErrorCode::StoreUnavailable), now_ms(), fx)
                        }),
                    }
                }
                Effect::Commit(s) => {
                    let part = self.shared.store.partition_of(s.conv());
                    let queued = self.commits.borrow_mut().push(part, s);
                    match queued {
                        Queued::Waiting => {}
                        Queued::Start => drop(monoio::spawn(self.rc().run_commits(part))),
                        // A stalled partition's backlog is full: StoreUnavailable now, not later.
                        Queued::Full(s) => {
                            self.with_convs(|c, fx| c.settled(s, CommitOutcome::Failed, true, fx))
                        }
                    }
                }
                Effect::Sequence(sub) => self.with_convs(|c, fx| c.submit(sub, now_ms(), fx)),
                Effect::GroupPublish(p) => self.with_groups(|g, fx| g.published(p, now_ms(), fx)),
                Effect::NoticeFailed { group, code } => {
                    self.with_groups(|g, fx| g.notice_failed(group, code, now_ms(), fx))
                }
                Effect::LoadGroup(group) => drop(monoio::spawn(self.rc().load_group(group))),
                Effect::NoteRead(c) => self.note_read(c),
                Effect::FanoutUsers { users, frame } => self.fanout_users(users, frame),
                Effect::SaveJoinRequest { group, user, request } => {
                    drop(monoio::spawn(self.rc().save_join_request(group, user, request)))
                }
            }
        }
    }

    /// Call a role outside envelope handling (from a task) and carry out its effects.
    /// Write a room message (or closing) to this shard's subscribers: at once when the room has
    /// few here and nothing is waiting, else in slices by `run_fanout`, in arrival order.
    ///
    /// At most `fanout_jobs_max` wait: a room message beyond it is dropped for this shard and
    /// counted, and the room's next message here tells each subscriber it missed it (`Missed`).
    fn room_job(&self, mut job: FanoutJob) {
        let l = &self.cfg().limits;
        if let FanoutJob::Message { room, missed, .. } = &mut job {
            *missed = self.room_dropped.borrow_mut().remove(room).unwrap_or(0);
        }
        if self.fanout_jobs.borrow().is_empty() && job.serve(self, l.fanout_slice) {
            return;
        }
        if self.fanout_jobs.borrow().len() >= l.fanout_jobs_max {
            if let FanoutJob::Message { room, missed, .. } = job {
                *self.room_dropped.borrow_mut().entry(room).or_default() += missed + 1;
                return;
            }
        }
        self.fanout_jobs.borrow_mut().push_back(job);
        self.jobs_mark.update(self.fanout_jobs.borrow().len(), &self.shared.pressure);
        self.fanout_wake.notify();
    }

    /// Serve the waiting room jobs, `fanout_slice` sessions per executor turn, so that a room
    /// with many subscribers here never holds up the shard's other work.
    pub async fn run_fanout(self: Rc<Self>) {
        let slice = self.cfg().limits.fanout_slice;
        while !self.shutting_down.get() {
            if self.fanout_jobs.borrow().is_empty() {
                // The backlog is gone: subscribers still owed a count of dropped messages are
                // told now, not only with a next message that may never come.
                let dropped: Vec<(u64, u64)> = self.room_dropped.borrow_mut().drain().collect();
                if dropped.is_empty() {
                    self.fanout_wake.wait().await;
                    continue;
                }
                let skip = SessionRef::NONE;
                let mut jobs = self.fanout_jobs.borrow_mut();
                jobs.extend(dropped.into_iter().map(|(room, missed)| FanoutJob::Message {
                    room,
                    skip,
                    frame: None,
                    next: 0,
                    missed,
                }));
            }
            let mut budget = slice;
            while budget > 0 {
                let Some(mut job) = self.fanout_jobs.borrow_mut().pop_front() else { break };
                let before = job.progress();
                if !job.serve(&self, budget) {
                    // The slice is used up: the rest of this job waits for the next turn.
                    self.fanout_jobs.borrow_mut().push_front(job);
                    break;
                }
                budget = budget.saturating_sub((job.progress() - before).max(1));
            }
            self.jobs_mark.update(self.fanout_jobs.borrow().len(), &self.shared.pressure);
            tim_shards::yield_now().await;
        }
    }

    /// The room owner's answer to one of this shard's sessions.
    fn on_room_reply(
        &self,
        session: SessionRef,
        room: u64,
        request_kind: u16,
        result: Result<u32, ErrorCode>,
    ) {
        let s = self.session(session).filter(|s| !s.closing.get());
        let Some(s) = s else {
            if request_kind == kind::ROOM_SUBSCRIBE && result.is_ok() {
                // The connection ended while subscribing: undo it, or the room would count a
                // subscriber that is gone.
                self.leave_room_owner(session, room);
            }
            return;
        };
        if request_kind != kind::ROOM_PUBLISH {
            s.room_requests.set(s.room_requests.get().saturating_sub(1));
        }
        match result {
            Ok(subscribers) => {
                if request_kind == kind::ROOM_SUBSCRIBE && s.joined_room(room) {
                    self.room_subs.borrow_mut().entry(room).or_default().push(session);
                }
                // An unsubscribe sent while a subscribe was in flight: the subscribe's answer
                // (which comes first) put the room back; the owner no longer counts it.
                if request_kind == kind::ROOM_UNSUBSCRIBE && s.left_room(room) {
                    self.forget_room_subscriber(session, room);
                }
                let ok = protocol::RoomOk { room_id: room, request_kind, subscribers };
                s.push(Bytes::from(frame::encode(kind::ROOM_OK, &ok)));
            }
            // A refused publish carries its client message id in place of the room.
            Err(code) => s.push(error_frame(code, request_kind, room)),
        }
    }

    /// Write `frame` to this shard's `sessions` (lossily for a stream message).
    fn deliver_many(&self, sessions: &[SessionRef], frame: &Bytes, lossy: bool) {
        let max = self.cfg().limits.room_queue_frames_max;
        // A typing notice or read receipt goes to the sessions that keep up, uncounted; a stream
        // message's drops are counted by its group (the stamp's `to`).
        let typing =
            lossy && matches!(frame::Header::read(frame).kind, kind::TYPING_NOTICE | kind::READ_NOTICE);
        let group = if lossy && !typing {
            protocol::Stamp::read(&frame[frame::HEADER_BYTES..]).expect("stamped").to
        } else {
            0
        };
        let mut delivered = 0;
        for &r in sessions {
            let Some(s) = self.session(r) else { continue };
            delivered += 1;
            if typing {
                s.push_if_keeping_up(frame.clone());
            } else if lossy {
                s.push_lossy((protocol::missed::STREAM, group), frame.clone(), max);
            } else {
                s.push(frame.clone());
            }
        }
        self.stats.deliveries.set(self.stats.deliveries.get() + delivered);
    }

    /// Drop `session` from this shard's subscribers of `room`.
    pub fn forget_room_subscriber(&self, session: SessionRef, room: u64) {
        let mut subs = self.room_subs.borrow_mut();
        if let Some(list) = subs.get_mut(&room) {
            list.retain(|&s| s != session);
            if list.is_empty() {
                subs.remove(&room);
            }
        }
    }

    /// Tell a room's owner that `session` left it (its connection ended).
    pub fn leave_room_owner(&self, session: SessionRef, room: u64) {
        let op = crate::envelope::RoomOp::Unsubscribe { reply: false };
        let req = crate::envelope::RoomRequest { origin: session, user: 0, room, op };
        self.post(self.place(|p| p.room(room)), Envelope::Room(Box::new(req)));
    }

    fn with_groups(&self, f: impl FnOnce(&mut GroupOwner, &mut Effects)) {
        let mut fx = Vec::new();
        f(&mut self.groups.borrow_mut(), &mut fx);
        self.execute(&mut fx);
    }

    /// Load a group on the store pool for its owner.
    async fn load_group(self: Rc<Self>, group: u64) {
        let store = self.shared.store.clone();
        let loaded: Result<Option<GroupLoad>, ErrorCode> = match self
            .shared
            .workers
            .store
            .run(move || {
                let mut load = store.load_group(group)?;
                if let Some(l) = load.as_mut() {
                    l.reads = store.reads_of(crate::store::group_conv(group))?;
                }
                Ok::<_, StoreError>(load)
            })
            .await
        {
            Ok(Ok(load)) => Ok(load),
            Ok(Err(e)) => {
                log::warn!("store: loading group {group}: {e}");
                Err(ErrorCode::StoreUnavailable)
            }
            Err(e) => Err(e.code_or(ErrorCode::StoreUnavailable)),
        };
        self.with_groups(|g, fx| g.loaded(group, loaded, now_ms(), fx));
    }

    /// Keep or drop a join request on the store pool for its group's owner.
    async fn save_join_request(
        self: Rc<Self>,
        group: u64,
        user: UserId,
        request: Option<protocol::JoinRequest>,
    ) {
        let store = self.shared.store.clone();
        let saved = match self
            .shared
            .workers
            .store
            .run(move || store.save_join_request(group, user, request.as_ref()))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                log::warn!("store: join request of user {user} to group {group}: {e}");
                Err(ErrorCode::StoreUnavailable)
            }
            Err(e) => Err(e.code_or(ErrorCode::StoreUnavailable)),
        };
        self.with_groups(|g, fx| g.request_saved(group, saved, now_ms(), fx));
    }

    fn with_convs(&self, f: impl FnOnce(&mut ConvOwner, &mut Effects)) {
        let mut fx = Vec::new();
        f(&mut self.convs.borrow_mut(), &mut fx);
        self.execute(&mut fx);
    }

    /// Count a send of `s` to an account that does not exist (each cost a store lookup): a
    /// connection or source address over its budget is closed with RateLimited.
    fn count_unknown_recipient(&self, s: &Session, now: u64) {
        let l = &self.cfg().limits;
        let mut budget = s.unknown_recipients.get();
        let conn_ok = budget.take(now, l.unknown_recipients_per_connection_per_minute_max);
        s.unknown_recipients.set(budget);
        if !conn_ok || !self.guard(s.peer.get(), Action::UnknownRecipient) {
            s.fail(ErrorCode::RateLimited);
        }
    }

    /// Count `action` against the source address `addr`; false if it is over its budget.
    pub fn guard(&self, addr: Option<std::net::IpAddr>, action: Action) -> bool {
        self.guard.borrow_mut().allow(addr, action, now_ms())
    }

    fn session(&self, r: SessionRef) -> Option<Rc<Session>> {
        debug_assert_eq!(r.shard(), self.id, "session envelope on the wrong shard");
        self.sessions.borrow().get(&r.0).cloned()
    }

    fn reject(&self, session: SessionRef, client_msg_id: u64, code: ErrorCode) {
        self.post(session.owner(), Envelope::Rejected { session, client_msg_id, code });
    }

    fn rc(&self) -> Rc<Shard> {
        CURRENT.with(|c| c.borrow().clone()).expect("shard registered on its thread")
    }

    // ---- store work asked for by the roles ----

    /// Check a conversation's recipient and load its last sequence and recent sends on a worker,
    /// then hand the outcome to the conversation owner.
    /// The loader of store partition `part`: load its waiting conversations a batch at a time
    /// (after a start, the first messages of many conversations arrive together; each batch is
    /// one store job and, on PostgreSQL, a few statements, not a few per conversation).
    async fn run_loads(self: Rc<Self>, part: usize) {
        loop {
            let Some(batch) = self.loads.borrow_mut().next_batch(part) else { return };
            let keys: Vec<ConvKey> = batch.iter().map(|r| r.key).collect();
            let store = self.shared.store.clone();
            let loaded: Vec<Result<ConvLoad, ErrorCode>> =
                match self.shared.workers.load.run(move || store.load_convs(part, &batch)).await {
                    Ok(results) => results.into_iter().map(load_result).collect(),
                    Err(e) => vec![Err(e.code_or(ErrorCode::StoreUnavailable)); keys.len()],
                };
            let now = now_ms();
            self.with_convs(|c, fx| {
                for (key, loaded) in keys.into_iter().zip(loaded) {
                    c.loaded(key, loaded, now, fx);
                }
            });
        }
    }

    /// The committer of store partition `part`: commit its queued messages one batch at a time
    /// and settle each batch once committed, so nothing is acked or delivered before it is
    /// durable. A send whose commit has not ended `commit_timeout_ms` after it was sequenced
    /// gets StoreUnavailable; if the commit succeeds later, its messages are delivered then, and a
    /// resend gets the original ack.
    ///
    /// The deadline runs from the sequencing (the stamp's `ts_ms`), not from the append: messages
    /// that queued behind a stalled batch have already waited for it, and counting their
    /// timeout from their own append made them wait up to twice `commit_timeout_ms`.
    async fn run_commits(self: Rc<Self>, part: usize) {
        let timeout = Duration::from_millis(self.shared.cfg.store.commit_timeout_ms);
        let gather = Duration::from_micros(self.shared.cfg.store.commit_wait_us);
        loop {
            if !gather.is_zero() && !self.commits.borrow().full(part) {
                // Let more messages join this commit (rounded up to the 1 ms timer).
                monoio::time::sleep(gather).await;
            }
            let Some(batch) = self.commits.borrow_mut().next_batch(part) else { return };
            let (tx, mut rx) = futures_channel::oneshot::channel();
            let msgs = batch.iter().map(Sequenced::stored).collect();
            // Wall-clock milliseconds, as stamped; a clock step is clamped to 0..=timeout.
            let oldest_ms = batch.iter().map(|s| s.ack.ts_ms).min().unwrap_or(0);
            let waited = Duration::from_millis(now_ms().saturating_sub(oldest_ms));
            let left = timeout.saturating_sub(waited);
            let started = std::time::Instant::now();
            let count = batch.len();
            self.shared.store.append(part, msgs, Box::new(move |r| drop(tx.send(r))));
            match monoio::time::timeout(left, &mut rx).await {
                Ok(outcome) => {
                    crate::metrics::observe_commit(started.elapsed(), count);
                    self.settle(batch, outcome.ok().and_then(Result::ok), true)
                }
                Err(_) => {
                    self.with_convs(|c, fx| batch.iter().for_each(|s| c.commit_timed_out(s, fx)));
                    let me = self.clone();
                    monoio::spawn(async move {
                        let outcome = rx.await.ok().and_then(Result::ok);
                        crate::metrics::observe_commit(started.elapsed(), count);
                        me.settle(batch, outcome, false);
                    });
                }
            }
        }
    }

    /// Hand a batch's outcome to the conversation owner: `None` if the commit failed, else the
    /// messages the store already held.
    fn settle(&self, batch: Vec<Sequenced>, committed: Option<Duplicates>, sender_waiting: bool) {
        self.with_convs(|c, fx| {
            for (i, s) in batch.into_iter().enumerate() {
                let outcome = match &committed {
                    None => CommitOutcome::Failed,
                    Some(dups) => match dups.iter().find(|(at, _)| *at == i) {
                        Some(&(_, Unstored::Duplicate(original))) => CommitOutcome::Duplicate(original),
                        Some(&(_, Unstored::Refused(code))) => CommitOutcome::Refused(code),
                        None => CommitOutcome::Stored,
                    },
                };
                c.settled(s, outcome, sender_waiting, fx);
            }
        });
    }
}

/// After a login: read the user's audience (its friends and the users it allowed to watch its
/// presence) and the users it blocks, and hand them to its user owner, which keeps them for its
/// presence (and tells the audience it came online).
pub async fn presence_hello(shard: Rc<Shard>, user: UserId) {
    use protocol::roster_list as l;
    let store = shard.shared.store.clone();
    let max = shard.cfg().limits.roster_entries_max;
    let read = shard
        .shared
        .workers
        .store
        .run(move || {
            let ids =
                |list| store.roster_list(user, list, 0, max).map(|(e, _)| e.iter().map(|e| e.user).collect());
            let mut audience: Vec<UserId> = ids(l::FRIENDS)?;
            audience.extend(ids(l::WATCHERS)?);
            audience.sort_unstable();
            audience.dedup();
            Ok::<_, StoreError>((audience, ids(l::BLOCKED)?))
        })
        .await;
    let (audience, blocks) = match read {
        Ok(Ok(lists)) => lists,
        Ok(Err(e)) => return log::warn!("store: reading the roster of user {user}: {e}"),
        Err(e) => return log::warn!("store: reading the roster of user {user}: {e}"),
    };
    let msg = crate::envelope::PresenceMsg {
        user,
        origin: 0,
        op: crate::envelope::PresenceOp::Roster { audience, blocks },
    };
    shard.post(shard.place(|p| p.user(user)), msg.envelope());
}

/// After a login on a durable store: send the device what it has not acknowledged and that was
/// stamped up to its attach (as `DELIVER` frames, paced by the writer), then `CATCHUP_END`. Live
/// deliveries (stamped after the attach) may interleave. Store ranges that did not answer in
/// time are left out and counted in `CATCHUP_END`'s `unavailable`.
pub async fn catch_up(shard: Rc<Shard>, session: Rc<Session>, login_kind: u16, until: u64) {
    let l = &shard.cfg().limits;
    let (user, device) = (session.user(), session.device.get());
    let since = now_ms().saturating_sub(l.catchup_window_secs * 1000);
    let limit = PageLimit { count: l.catchup_messages_max, bytes: l.catchup_bytes_max };
    let store = shard.shared.store.clone();
    let found = shard.shared.workers.store.run(move || store.catch_up(user, device, since, until, limit));
    let CatchUp { page, unavailable } = match found.await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            log::warn!("store: catch-up of user {user}: {e}");
            session.push(error_frame(ErrorCode::StoreUnavailable, login_kind, 0));
            return;
        }
        Err(e) => {
            session.push(error_frame(e.code_or(ErrorCode::StoreUnavailable), login_kind, 0));
            return;
        }
    };
    let count = page.payloads.len() as u32;
    for p in page.payloads {
        if session.closing.get() {
            return;
        }
        session.push_paced(frame::whole(kind::DELIVER, &p)).await;
    }
    // After the last large message, not between its parts.
    session.large_sent().await;
    session.push(Bytes::from(frame::encode(
        kind::CATCHUP_END,
        &protocol::CatchUpEnd { count, more: page.more, unavailable },
    )));
}

/// After `delay`, tell `session` a catch-up follows and run it (see `Shard::apply_table`).
async fn resync(shard: Rc<Shard>, session: Rc<Session>, delay: Duration) {
    monoio::time::sleep(delay).await;
    let Some((user, device_type)) = session.logged_in() else { return };
    // Announce the session to its user's owner again: the first announcement, made when this
    // shard changed tables, may have met a node that had not changed yet (and forwarded it to
    // the failed node). Announcing twice changes nothing.
    let owner = shard.place(|p| p.user(user));
    let info = Box::new(session.device_info());
    shard.post(owner, Envelope::Reattach { user, session: session.id(), device_type, info });
    // The flushed cursors are where the catch-up starts: flush what was acked so far first.
    shard.flush_cursors().await;
    session.push(Bytes::from(frame::encode_empty(kind::RESYNC)));
    catch_up(shard, session, kind::RESYNC, now_ms()).await;
}

/// Room work for this shard's subscribers (see [`Shard::room_job`]).
enum FanoutJob {
    /// Write `frame` to the room's local subscribers from index `next` on, after telling each
    /// that it missed `missed` messages dropped for this shard before this one (no frame: only
    /// that).
    Message { room: u64, skip: SessionRef, frame: Option<Bytes>, next: usize, missed: u64 },
    /// The room is gone: tell its local subscribers and forget them.
    Closed { room: u64, reason: u16 },
    /// A group message: hand `frame` to the sessions of `users` (members whose user owner is
    /// this shard) from index `next` on; `lossy` for a stream message. Never dropped.
    Users { users: std::sync::Arc<[UserId]>, skip: SessionRef, frame: Bytes, lossy: bool, next: usize },
}

impl FanoutJob {
    /// Sessions served so far.
    fn progress(&self) -> usize {
        match self {
            FanoutJob::Message { next, .. } | FanoutJob::Users { next, .. } => *next,
            FanoutJob::Closed { .. } => 0,
        }
    }

    /// Serve up to `budget` sessions; true when the job is done. A subscriber that leaves
    /// meanwhile shifts the list, and the one after it may miss this message (room messages
    /// are lossy); none gets it twice.
    fn serve(&mut self, shard: &Shard, budget: usize) -> bool {
        match self {
            FanoutJob::Message { room, skip, frame, next, missed } => {
                let max = shard.cfg().limits.room_queue_frames_max;
                let subs = shard.room_subs.borrow();
                let Some(list) = subs.get(room) else { return true };
                let end = list.len().min(*next + budget);
                for &s in list[(*next).min(end)..end].iter().filter(|&&s| s != *skip) {
                    if let Some(s) = shard.session(s) {
                        if *missed > 0 {
                            s.count_missed((protocol::missed::ROOM, *room), *missed);
                        }
                        if let Some(frame) = frame {
                            s.push_room(*room, frame.clone(), max);
                        }
                    }
                }
                *next = end;
                end >= list.len()
            }
            FanoutJob::Users { users, skip, frame, lossy, next } => {
                // The slice's sessions by shard: this shard's are written here, each other
                // shard gets one envelope with its list.
                let end = users.len().min(*next + budget);
                let mut by_shard: Vec<Vec<SessionRef>> = vec![Vec::new(); shard.shards];
                let mut remote = Vec::new();
                let mut moved = Vec::new();
                {
                    let owner = shard.users.borrow();
                    let placement = shard.placement();
                    let clustered = placement.table().is_some();
                    let me = shard.me();
                    for &u in &users[(*next).min(end)..end] {
                        if clustered && placement.user(u) != me {
                            // The user's partition moved since the group owner listed it.
                            moved.push((placement.user(u), u));
                            continue;
                        }
                        owner.sessions_by_shard(u, *skip, shard.node, &mut by_shard, &mut remote);
                    }
                }
                let local = by_shard.into_iter().enumerate().map(|(i, l)| (Owner::new(shard.node, i), l));
                for (dst, sessions) in local.chain(remote).filter(|(_, l)| !l.is_empty()) {
                    if dst == shard.me() {
                        shard.deliver_many(&sessions, frame, *lossy);
                    } else {
                        let many =
                            crate::envelope::DeliverMany { sessions, frame: frame.clone(), lossy: *lossy };
                        shard.post(dst, Envelope::DeliverMany(Box::new(many)));
                    }
                }
                for (dst, user) in moved {
                    let env = if *lossy {
                        Envelope::StreamFanout { user, skip: *skip, frame: frame.clone() }
                    } else {
                        Envelope::Fanout { user, skip: *skip, frame: frame.clone() }
                    };
                    shard.post(dst, env);
                }
                *next = end;
                end >= users.len()
            }
            FanoutJob::Closed { room, reason } => {
                shard.room_dropped.borrow_mut().remove(room);
                let subs = shard.room_subs.borrow_mut().remove(room).unwrap_or_default();
                let closed = protocol::RoomClosed { room_id: *room, reason: *reason };
                let f = Bytes::from(frame::encode(kind::ROOM_CLOSED, &closed));
                for s in subs.into_iter().filter_map(|s| shard.session(s)) {
                    s.left_room(*room);
                    s.push(f.clone());
                }
                true
            }
        }
    }
}

/// A conversation load's answer for its owner: an unknown recipient or an unavailable store
/// becomes the code its waiting sends get.
fn load_result(r: Result<Option<ConvLoad>, StoreError>) -> Result<ConvLoad, ErrorCode> {
    match r {
        Ok(Some(load)) => Ok(load),
        Ok(None) => Err(ErrorCode::UnknownRecipient),
        Err(e) => {
            log::warn!("store: {e}");
            Err(ErrorCode::StoreUnavailable)
        }
    }
}

thread_local! {
    /// The shard of the current thread, for tasks spawned from `&Shard` methods.
    pub static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}
