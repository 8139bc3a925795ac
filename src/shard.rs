//! One shard's state and its handling of [`Envelope`]s: the sessions it owns, the users and
//! conversations of its partitions, resend dedup, and routing to other shards.
//!
//! Key types: [`Shard`] (everything one core owns; shared by its tasks through `Rc`), [`Shared`]
//! (what all shards share: config, auth, store, workers), [`LocalNotify`].
//!
//! Everything here runs on the shard's own thread; `RefCell` borrows are never held across an
//! `.await`. Envelopes for the shard itself go through a local FIFO instead of the mesh, so that
//! handling one never re-enters another.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ahash::RandomState;
use bytes::Bytes;
use tim_shards::{mix64, shard_of, MeshPort, SendError};

use crate::{
    auth::Auth,
    config::{Config, DevicePolicy},
    conn::Session,
    envelope::{AckInfo, Attach, Envelope, SessionRef, Submit},
    frame::{self, AlignedBuf},
    protocol::{self, kind, DeviceType, ErrorCode, Stamp},
    store::{ConvKey, ConvLoad, Cursor, Store, StoreError, StoredMessage, UserId},
    workers::Workers,
};

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
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Message ids: 41 bits of milliseconds since 2024-01-01, 10 bits of shard, 13 bits of counter.
const ID_EPOCH_MS: u64 = 1_704_067_200_000;
pub const SHARDS_MAX: usize = 1024;
const ID_COUNTER_BITS: u32 = 13;

/// The shard owning a user's live state.
#[inline]
pub fn user_shard(user: UserId, shards: usize) -> usize {
    shard_of(mix64(user), shards)
}

/// The key of a 1:1 conversation: its two users, smaller first.
#[inline]
pub fn direct_key(a: UserId, b: UserId) -> (UserId, UserId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The hash that places a 1:1 conversation (on a shard, and on a store partition).
#[inline]
pub fn conv_hash(key: (UserId, UserId)) -> u64 {
    mix64(key.0 ^ mix64(key.1))
}

/// The shard owning a 1:1 conversation.
#[inline]
pub fn conv_shard(key: (UserId, UserId), shards: usize) -> usize {
    shard_of(conv_hash(key), shards)
}

/// A single-threaded, level-style notification: `notify` before `wait` is not lost.
#[derive(Default)]
pub struct LocalNotify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        NotifyWait(self)
    }
}

struct NotifyWait<'a>(&'a LocalNotify);

impl Future for NotifyWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.flag.replace(false) {
            return Poll::Ready(());
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

struct LiveSession {
    session: SessionRef,
    device_type: DeviceType,
}

/// A user's live state, held by the user's owner shard.
#[derive(Default)]
struct UserLive {
    /// Oldest login first.
    sessions: Vec<LiveSession>,
    tokens: Vec<([u8; 32], u64)>,
}

// Submits stay boxed: they are handed back to `on_submit` as `Envelope::Submit(Box<_>)`.
#[allow(clippy::vec_box)]
enum ConvState {
    /// Checking that the recipient exists (and, with a durable store, loading the last sequence).
    Loading(Vec<Box<Submit>>),
    Ready,
}

struct Conv {
    last_seq: u64,
    state: ConvState,
    /// Resend dedup: the conversation's latest sends (at most `dedup_per_conversation_max`,
    /// none older than `dedup_window_secs`), oldest first.
    recent: VecDeque<Sent>,
    /// Per sender of this conversation (at most two), the greatest client message id
    /// remembered: a send above it cannot be a resend, which spares the scan for clients whose
    /// ids rise.
    newest: [(UserId, u64); 2],
}

/// Submits waiting for one conversation to load.
const CONV_WAITERS_MAX: usize = 1024;
/// Recent sends loaded with a conversation to rebuild its resend dedup.
const CONV_RECENT_MAX: usize = 4096;

/// A sequenced message on its way out: the sender's ack and the shared `DELIVER` frame.
struct Outgoing {
    ack: AckInfo,
    origin: SessionRef,
    sender: UserId,
    to: UserId,
    frame: Bytes,
}

impl Outgoing {
    /// Length of the frame's payload (stamp + Send archive), from its header.
    fn payload_len(&self) -> usize {
        frame::Header::read(&self.frame).len as usize
    }
}

/// Sequenced messages of one store partition waiting for their commit.
#[derive(Default)]
struct CommitQueue {
    pending: VecDeque<(StoredMessage, Outgoing)>,
    /// A `run_commits` task is working on this queue.
    busy: bool,
}

/// A remembered send of a conversation: its ids, and whether its commit has succeeded (a resend
/// of a send whose commit is still open gets `Busy`).
#[derive(Clone, Copy)]
struct Sent {
    sender: UserId,
    ack: AckInfo,
    committed: bool,
}

impl Conv {
    /// The remembered send of `sender` with `client_msg_id`, forgetting sends older than the
    /// window first. Recent sends of one conversation sit together in memory, and a resend is
    /// almost always of one of the last few: scanning them costs less than a shard-wide map.
    fn find(&mut self, sender: UserId, client_msg_id: u64, now: u64, window_ms: u64) -> Option<&mut Sent> {
        while self.recent.front().is_some_and(|s| s.ack.ts_ms + window_ms < now) {
            self.recent.pop_front();
        }
        if self.newest.iter().any(|&(u, max)| u == sender && client_msg_id > max) {
            return None;
        }
        self.recent.iter_mut().rev().find(|s| s.ack.client_msg_id == client_msg_id && s.sender == sender)
    }

    fn remember(&mut self, sent: Sent, max: usize) {
        if self.recent.len() >= max {
            self.recent.pop_front();
        }
        let cmid = sent.ack.client_msg_id;
        match self.newest.iter_mut().find(|(u, _)| *u == sent.sender) {
            Some((_, m)) => *m = (*m).max(cmid),
            None => {
                if let Some(slot) = self.newest.iter_mut().find(|(u, _)| *u == 0) {
                    *slot = (sent.sender, cmid);
                }
            }
        }
        self.recent.push_back(sent);
    }
}

/// Counters of one shard.
#[derive(Default)]
pub struct Stats {
    pub accepted: Cell<u64>,
    pub messages_sequenced: Cell<u64>,
    pub deliveries: Cell<u64>,
    pub delivery_acks: Cell<u64>,
}

pub struct Shard {
    pub id: usize,
    pub shards: usize,
    pub shared: Arc<Shared>,
    port: MeshPort<Envelope>,
    local: RefCell<VecDeque<Envelope>>,
    draining: Cell<bool>,
    overflow: RefCell<Vec<VecDeque<Envelope>>>,
    overflow_len: Cell<usize>,
    pub sessions: RefCell<HashMap<u64, Rc<Session>, RandomState>>,
    next_session: Cell<u64>,
    users: RefCell<HashMap<UserId, UserLive, RandomState>>,
    convs: RefCell<HashMap<(UserId, UserId), Conv, RandomState>>,
    dedup_window_ms: u64,
    dedup_max: usize,
    commits: RefCell<Vec<CommitQueue>>,
    ids: Cell<(u64, u64)>,
    pool: RefCell<Vec<AlignedBuf>>,
    /// Delivery cursors acknowledged since the last flush: (user, device, conversation) → seq.
    cursors: RefCell<HashMap<(UserId, u64, ConvKey), u64, RandomState>>,
    pub shutting_down: Cell<bool>,
    pub shutdown: LocalNotify,
    pub stats: Stats,
}

impl Shard {
    pub fn new(id: usize, shards: usize, shared: Arc<Shared>, port: MeshPort<Envelope>) -> Shard {
        assert!(shards <= SHARDS_MAX);
        let l = &shared.cfg.limits;
        Shard {
            id,
            shards,
            port,
            local: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            overflow: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            overflow_len: Cell::new(0),
            sessions: RefCell::new(HashMap::default()),
            next_session: Cell::new(1),
            users: RefCell::new(HashMap::default()),
            convs: RefCell::new(HashMap::default()),
            dedup_window_ms: l.dedup_window_secs * 1000,
            dedup_max: l.dedup_per_conversation_max,
            commits: RefCell::new((0..shared.store.partitions()).map(|_| CommitQueue::default()).collect()),
            ids: Cell::new((0, 0)),
            pool: RefCell::new(Vec::new()),
            cursors: RefCell::new(HashMap::default()),
            shutting_down: Cell::new(false),
            shutdown: LocalNotify::default(),
            stats: Stats::default(),
            shared,
        }
    }

    pub fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    pub fn new_session_ref(&self) -> SessionRef {
        let n = self.next_session.get();
        self.next_session.set(n + 1);
        SessionRef::new(self.id, n)
    }

    // ---- read buffer pool ----

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

    /// Send `env` to shard `dst` (or handle it here when `dst` is this shard). A full mesh queue
    /// parks the envelope in a bounded per-destination overflow that the mesh loop retries.
    pub fn post(&self, dst: usize, env: Envelope) {
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
        if self.overflow_len.get() >= self.cfg().limits.mesh_overflow_max {
            // Refuse at the edge where a client can retry; anything further along is dropped
            // and counted (the inflight and connection limits keep this from happening).
            match env {
                Envelope::Submit(sub) => self.reject(sub.origin, sub.client_msg_id, ErrorCode::Busy),
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

    /// The mesh loop: drain envelopes in batches until the shard stops.
    pub async fn run_mesh(self: Rc<Self>) {
        let batch_max = self.cfg().limits.mesh_batch_max;
        let mut batch = Vec::with_capacity(batch_max);
        loop {
            if self.overflow_len.get() > 0 {
                self.flush_overflow();
            }
            batch.clear();
            let n = if self.overflow_len.get() > 0 {
                let wait = Duration::from_micros(100);
                monoio::time::timeout(wait, self.port.recv_batch(&mut batch, batch_max)).await.unwrap_or(0)
            } else {
                self.port.recv_batch(&mut batch, batch_max).await
            };
            if n == 0 && self.shared.stop.load(Ordering::Acquire) && !self.shutting_down.get() {
                self.begin_shutdown();
            }
            for env in batch.drain(..) {
                self.dispatch(env);
            }
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
        let tick = (login.min(idle) / 8).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut expired = Vec::new();
        while !self.shutting_down.get() {
            monoio::time::sleep(tick).await;
            let now = std::time::Instant::now();
            expired.extend(
                self.sessions
                    .borrow()
                    .values()
                    .filter_map(|s| s.timed_out(now, login, idle).map(|c| (s.clone(), c))),
            );
            for (s, code) in expired.drain(..) {
                s.fail(code);
            }
        }
    }

    /// Remember a device's delivery ack; written to the store by `run_cursor_flush`.
    pub fn note_cursor(&self, c: Cursor) {
        if !self.shared.store.durable() {
            return;
        }
        let mut cursors = self.cursors.borrow_mut();
        let seq = cursors.entry((c.user, c.device, c.conv)).or_insert(0);
        *seq = (*seq).max(c.seq);
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

    /// Write the cursors noted so far (the shard's last act before it stops, too). Cursors whose
    /// write fails are kept for the next flush.
    pub async fn flush_cursors(&self) {
        let batch: Vec<Cursor> = self
            .cursors
            .borrow_mut()
            .drain()
            .map(|((user, device, conv), seq)| Cursor { user, device, conv, seq })
            .collect();
        if batch.is_empty() {
            return;
        }
        let store = self.shared.store.clone();
        let kept = batch.clone();
        match self.shared.workers.run(move || store.save_cursors(&batch)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => log::warn!("store: saving cursors: {e}"),
            Err(_) => log::warn!("store: saving cursors: worker pool busy"),
        }
        for c in kept {
            self.note_cursor(c);
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

    // ---- envelope handling ----

    fn handle(&self, env: Envelope) {
        match env {
            Envelope::Submit(sub) => self.on_submit(sub),
            Envelope::Acked { session, ack } => {
                if let Some(s) = self.session(session) {
                    s.on_acked(&ack);
                }
            }
            Envelope::Rejected { session, client_msg_id, code } => {
                if let Some(s) = self.session(session) {
                    s.on_rejected(client_msg_id, code);
                }
            }
            Envelope::Fanout { user, skip, frame } => self.on_fanout(user, skip, frame),
            Envelope::Deliver { session, frame } => {
                if let Some(s) = self.session(session) {
                    self.stats.deliveries.set(self.stats.deliveries.get() + 1);
                    s.push(frame);
                }
            }
            Envelope::Attach(a) => self.on_attach(a),
            Envelope::AttachResult { session, user, result } => match self.session(session) {
                Some(s) => s.on_attach_result(user, result),
                None => {
                    if result.is_ok() {
                        // The connection ended while logging in: undo the attach.
                        self.post(user_shard(user, self.shards), Envelope::Detach { user, session });
                    }
                }
            },
            Envelope::Detach { user, session } => self.on_detach(user, session),
            Envelope::Kick { session, reason } => {
                if let Some(s) = self.session(session) {
                    s.kick(reason);
                }
            }
            Envelope::StoreToken { user, session, hash, expires_at_ms } => {
                let result = self.on_store_token(user, hash, expires_at_ms);
                self.post(session.shard(), Envelope::TokenResult { session, result });
            }
            Envelope::TokenResult { session, result } => {
                if let Some(s) = self.session(session) {
                    s.on_token_result(result);
                }
            }
        }
    }

    fn session(&self, r: SessionRef) -> Option<Rc<Session>> {
        debug_assert_eq!(r.shard(), self.id, "session envelope on the wrong shard");
        self.sessions.borrow().get(&r.0).cloned()
    }

    fn reject(&self, session: SessionRef, client_msg_id: u64, code: ErrorCode) {
        self.post(session.shard(), Envelope::Rejected { session, client_msg_id, code });
    }

    // conversation owner

    fn on_submit(&self, sub: Box<Submit>) {
        let key = direct_key(sub.sender, sub.to);
        debug_assert_eq!(conv_shard(key, self.shards), self.id, "submit on the wrong shard");
        let now = now_ms();
        let mut convs = self.convs.borrow_mut();
        match convs.get_mut(&key) {
            // Handling runs inside `drain_local`, so the posts made while sequencing only queue:
            // nothing re-enters while `convs` is borrowed.
            Some(conv) if matches!(conv.state, ConvState::Ready) => {
                match conv.find(sub.sender, sub.client_msg_id, now, self.dedup_window_ms).copied() {
                    Some(sent) if !sent.committed => {
                        self.reject(sub.origin, sub.client_msg_id, ErrorCode::Busy)
                    }
                    Some(sent) => {
                        let ack = AckInfo { duplicate: true, ..sent.ack };
                        self.post(sub.origin.shard(), Envelope::Acked { session: sub.origin, ack });
                    }
                    None => self.sequence(sub, conv, now),
                }
            }
            Some(Conv { state: ConvState::Ready, .. }) => unreachable!("handled above"),
            Some(Conv { state: ConvState::Loading(waiters), .. }) => {
                if waiters.len() < CONV_WAITERS_MAX {
                    waiters.push(sub);
                } else {
                    drop(convs);
                    self.reject(sub.origin, sub.client_msg_id, ErrorCode::Busy);
                }
            }
            None => {
                if convs.len() >= self.cfg().limits.conversations_per_shard_max {
                    drop(convs);
                    return self.reject(sub.origin, sub.client_msg_id, ErrorCode::Busy);
                }
                let (sender, to) = (sub.sender, sub.to);
                let conv = Conv {
                    last_seq: 0,
                    state: ConvState::Loading(vec![sub]),
                    recent: VecDeque::new(),
                    newest: [(0, 0); 2],
                };
                convs.insert(key, conv);
                drop(convs);
                self.spawn_conv_load(key, sender, to);
            }
        }
    }

    /// Check the recipient exists and load the conversation's last sequence number and recent
    /// sends (for resend dedup across restarts), then hand everything that waited back to
    /// `on_submit`, in order.
    fn spawn_conv_load(&self, key: (UserId, UserId), sender: UserId, to: UserId) {
        let me = self.rc();
        monoio::spawn(async move {
            let store = me.shared.store.clone();
            let l = &me.cfg().limits;
            let since = now_ms().saturating_sub(l.dedup_window_secs * 1000);
            let recent_max = l.dedup_per_conversation_max.min(CONV_RECENT_MAX);
            let job = move || -> Result<Option<ConvLoad>, StoreError> {
                if sender != to && !store.account_exists(to)? {
                    return Ok(None);
                }
                store.load_conv(key, since, recent_max).map(Some)
            };
            let loaded = match me.shared.workers.run(job).await {
                Ok(Ok(Some(load))) => Ok(load),
                Ok(Ok(None)) => Err(ErrorCode::UnknownRecipient),
                Ok(Err(e)) => {
                    log::warn!("store: {e}");
                    Err(ErrorCode::StoreUnavailable)
                }
                Err(_) => Err(ErrorCode::Busy),
            };
            let waiters = {
                let mut convs = me.convs.borrow_mut();
                let Some(conv) = convs.get_mut(&key) else { return };
                let state = std::mem::replace(&mut conv.state, ConvState::Ready);
                match &loaded {
                    Ok(load) => {
                        conv.last_seq = load.last_seq;
                        for r in load.recent.iter().rev() {
                            let ack = AckInfo {
                                client_msg_id: r.client_msg_id,
                                msg_id: r.msg_id,
                                seq: r.seq,
                                ts_ms: r.ts_ms,
                                duplicate: false,
                            };
                            conv.remember(Sent { sender: r.sender, ack, committed: true }, me.dedup_max);
                        }
                    }
                    Err(_) => {
                        convs.remove(&key);
                    }
                }
                match state {
                    ConvState::Loading(w) => w,
                    ConvState::Ready => Vec::new(),
                }
            };
            for sub in waiters {
                match loaded {
                    Ok(_) => me.dispatch(Envelope::Submit(sub)),
                    Err(code) => me.reject(sub.origin, sub.client_msg_id, code),
                }
            }
        });
    }

    fn rc(&self) -> Rc<Shard> {
        CURRENT.with(|c| c.borrow().clone()).expect("shard registered on its thread")
    }

    /// Give `sub` the next sequence number of its conversation, stamp it, ack it and fan it out.
    #[allow(clippy::boxed_local)] // it arrives boxed in its envelope
    fn sequence(&self, mut sub: Box<Submit>, conv: &mut Conv, now: u64) {
        conv.last_seq += 1;
        let last_seq = conv.last_seq;
        let ack = AckInfo {
            client_msg_id: sub.client_msg_id,
            msg_id: self.next_msg_id(now),
            seq: last_seq,
            ts_ms: now,
            duplicate: false,
        };
        let stamp = Stamp {
            msg_id: ack.msg_id,
            seq: ack.seq,
            ts_ms: now,
            from: sub.sender,
            to: sub.to,
            conv: sub.conv,
        };
        stamp.write(&mut sub.frame[frame::HEADER_BYTES..]);
        let durable = self.shared.store.durable();
        conv.remember(Sent { sender: sub.sender, ack, committed: !durable }, self.dedup_max);
        self.stats.messages_sequenced.set(self.stats.messages_sequenced.get() + 1);
        let Submit { origin, sender, to, frame, client_msg_id, sender_device, .. } = *sub;
        let frame = frame.freeze();
        let out = Outgoing { ack, origin, sender, to, frame };
        if !durable {
            return self.publish(out, true);
        }
        let msg = StoredMessage {
            conv: direct_key(sender, to),
            seq: ack.seq,
            msg_id: ack.msg_id,
            ts_ms: now,
            sender,
            sender_device,
            client_msg_id,
            payload: out.frame.slice(frame::HEADER_BYTES..frame::HEADER_BYTES + out.payload_len()),
        };
        let part = self.shared.store.partition_of(msg.conv);
        let mut commits = self.commits.borrow_mut();
        let q = &mut commits[part];
        q.pending.push_back((msg, out));
        if !q.busy {
            q.busy = true;
            monoio::spawn(self.rc().run_commits(part));
        }
    }

    /// Ack a message to its sender (if `ack`) and fan it out to both users' sessions.
    fn publish(&self, out: Outgoing, ack: bool) {
        let Outgoing { ack: info, origin, sender, to, frame } = out;
        if ack {
            self.post(origin.shard(), Envelope::Acked { session: origin, ack: info });
        }
        if to == sender {
            self.post(user_shard(to, self.shards), Envelope::Fanout { user: to, skip: origin, frame });
        } else {
            let fanout_to = Envelope::Fanout { user: to, skip: SessionRef::NONE, frame: frame.clone() };
            self.post(user_shard(to, self.shards), fanout_to);
            self.post(
                user_shard(sender, self.shards),
                Envelope::Fanout { user: sender, skip: origin, frame },
            );
        }
    }

    /// Commit queued messages of store partition `part`, one batch at a time, and publish each
    /// batch once it is committed: nothing is acked or delivered before it is durable. A commit
    /// that takes longer than `commit_timeout_ms` fails its sends with StoreUnavailable; if it
    /// succeeds later, its messages are delivered then, and a resend gets the original ack.
    async fn run_commits(self: Rc<Self>, part: usize) {
        let batch_max = self.shared.cfg.store.commit_batch_max;
        let timeout = Duration::from_millis(self.shared.cfg.store.commit_timeout_ms);
        let gather = Duration::from_micros(self.shared.cfg.store.commit_wait_us);
        loop {
            let short = self.commits.borrow()[part].pending.len() < batch_max;
            if short && !gather.is_zero() {
                // Let more messages join this commit (rounded up to the 1 ms timer).
                monoio::time::sleep(gather).await;
            }
            let batch: Vec<(StoredMessage, Outgoing)> = {
                let mut commits = self.commits.borrow_mut();
                let q = &mut commits[part];
                let n = q.pending.len().min(batch_max);
                if n == 0 {
                    q.busy = false;
                    return;
                }
                q.pending.drain(..n).collect()
            };
            let (tx, mut rx) = futures_channel::oneshot::channel();
            let msgs: Vec<StoredMessage> = batch.iter().map(|(m, _)| m.clone()).collect();
            self.shared.store.append(part, msgs, Box::new(move |r| drop(tx.send(r))));
            match monoio::time::timeout(timeout, &mut rx).await {
                Ok(outcome) => self.settle(batch, matches!(outcome, Ok(Ok(()))), true),
                Err(_) => {
                    for (_, out) in &batch {
                        self.reject(out.origin, out.ack.client_msg_id, ErrorCode::StoreUnavailable);
                    }
                    let me = self.clone();
                    monoio::spawn(async move {
                        let committed = matches!(rx.await, Ok(Ok(())));
                        me.settle(batch, committed, false);
                    });
                }
            }
        }
    }

    /// Record the outcome of a commit: publish what was committed (acking only a sender that is
    /// still waiting), refuse what failed.
    fn settle(&self, batch: Vec<(StoredMessage, Outgoing)>, committed: bool, sender_waiting: bool) {
        for (_, out) in batch {
            self.settle_sent(&out, committed);
            if committed {
                self.publish(out, sender_waiting);
            } else if sender_waiting {
                self.reject(out.origin, out.ack.client_msg_id, ErrorCode::StoreUnavailable);
            }
        }
    }

    /// Mark a remembered send committed, or forget it if its commit failed for good (a resend is
    /// then a new message).
    fn settle_sent(&self, out: &Outgoing, committed: bool) {
        let mut convs = self.convs.borrow_mut();
        let Some(conv) = convs.get_mut(&direct_key(out.sender, out.to)) else { return };
        let cmid = out.ack.client_msg_id;
        match conv.recent.iter().rposition(|s| s.ack.client_msg_id == cmid && s.sender == out.sender) {
            Some(i) if committed => conv.recent[i].committed = true,
            Some(i) => {
                conv.recent.remove(i);
            }
            None => {}
        }
    }

    fn next_msg_id(&self, now: u64) -> u64 {
        let now = now.saturating_sub(ID_EPOCH_MS);
        let (mut last, mut ctr) = self.ids.get();
        if now > last {
            last = now;
            ctr = 0;
        } else {
            ctr += 1;
            if ctr >= 1 << ID_COUNTER_BITS {
                last += 1; // borrow from the next millisecond: ids never repeat or go back
                ctr = 0;
            }
        }
        self.ids.set((last, ctr));
        (last << (ID_COUNTER_BITS + 10)) | ((self.id as u64) << ID_COUNTER_BITS) | ctr
    }

    // user owner

    fn on_fanout(&self, user: UserId, skip: SessionRef, frame: Bytes) {
        debug_assert_eq!(user_shard(user, self.shards), self.id, "fanout on the wrong shard");
        // Called only from `handle`, inside `drain_local`: a post to this shard only queues, so
        // holding `users` while posting cannot re-enter it.
        debug_assert!(self.draining.get());
        let users = self.users.borrow();
        let Some(live) = users.get(&user) else { return };
        for s in live.sessions.iter().filter(|s| s.session != skip) {
            self.post(s.session.shard(), Envelope::Deliver { session: s.session, frame: frame.clone() });
        }
    }

    fn on_attach(&self, a: Box<Attach>) {
        let result = self.attach(&a);
        self.post(a.session.shard(), Envelope::AttachResult { session: a.session, user: a.user, result });
    }

    fn attach(&self, a: &Attach) -> Result<(), ErrorCode> {
        let policy = &self.cfg().sessions;
        let now = now_ms();
        let mut users = self.users.borrow_mut();
        let live = users.entry(a.user).or_default();
        live.tokens.retain(|&(_, exp)| exp > now);
        let token_at = match a.token {
            Some(h) => match live.tokens.iter().position(|&(t, _)| t == h) {
                Some(i) => Some(i),
                None => {
                    if live.sessions.is_empty() && live.tokens.is_empty() {
                        users.remove(&a.user);
                    }
                    return Err(ErrorCode::InvalidToken);
                }
            },
            None => None,
        };
        // Decide every kick first, so that a refusal changes nothing.
        let mut kicks: Vec<usize> = Vec::new();
        let same_type: Vec<usize> =
            (0..live.sessions.len()).filter(|&i| live.sessions[i].device_type == a.device_type).collect();
        if same_type.len() >= policy.per_device_type_max {
            if policy.policy == DevicePolicy::Refuse {
                return Err(ErrorCode::DeviceLimit);
            }
            kicks.extend(&same_type[..same_type.len() + 1 - policy.per_device_type_max]);
        }
        let remaining = live.sessions.len() - kicks.len();
        if remaining >= policy.per_account_max {
            if policy.policy == DevicePolicy::Refuse {
                return Err(ErrorCode::DeviceLimit);
            }
            let more = remaining + 1 - policy.per_account_max;
            let extra: Vec<usize> =
                (0..live.sessions.len()).filter(|i| !kicks.contains(i)).take(more).collect();
            kicks.extend(extra);
        }
        if let Some(i) = token_at {
            live.tokens.swap_remove(i);
        }
        kicks.sort_unstable();
        let mut kicked = Vec::with_capacity(kicks.len());
        for &i in kicks.iter().rev() {
            kicked.push(live.sessions.remove(i).session);
        }
        live.sessions.push(LiveSession { session: a.session, device_type: a.device_type });
        drop(users);
        for session in kicked {
            self.post(session.shard(), Envelope::Kick { session, reason: ErrorCode::Replaced });
        }
        Ok(())
    }

    fn on_detach(&self, user: UserId, session: SessionRef) {
        let mut users = self.users.borrow_mut();
        if let Some(live) = users.get_mut(&user) {
            live.sessions.retain(|s| s.session != session);
            if live.sessions.is_empty() && live.tokens.is_empty() {
                users.remove(&user);
            }
        }
    }

    fn on_store_token(&self, user: UserId, hash: [u8; 32], expires_at_ms: u64) -> Result<(), ErrorCode> {
        let now = now_ms();
        let mut users = self.users.borrow_mut();
        let live = users.entry(user).or_default();
        live.tokens.retain(|&(_, exp)| exp > now);
        if live.tokens.len() >= self.cfg().limits.tokens_per_user_max {
            return Err(ErrorCode::TooManyTokens);
        }
        live.tokens.push((hash, expires_at_ms));
        Ok(())
    }

    /// Build an `Error` frame.
    pub fn error_frame(code: ErrorCode, request_kind: u16, client_msg_id: u64) -> Bytes {
        Bytes::from(frame::encode(
            kind::ERROR,
            &protocol::Error {
                code: code.code(),
                request_kind,
                client_msg_id,
                message: code.text().to_string(),
            },
        ))
    }
}

thread_local! {
    /// The shard of the current thread, for tasks spawned from `&Shard` methods.
    pub static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sender: UserId, cmid: u64, ts_ms: u64) -> Sent {
        let ack = AckInfo { client_msg_id: cmid, msg_id: cmid, seq: cmid, ts_ms, duplicate: false };
        Sent { sender, ack, committed: true }
    }

    /// Resend dedup finds remembered sends whatever order their ids come in, per sender, and
    /// forgets by count and by age.
    #[test]
    fn conversation_dedup() {
        let mut c =
            Conv { last_seq: 0, state: ConvState::Ready, recent: VecDeque::new(), newest: [(0, 0); 2] };
        for cmid in [50, 7, 900, 3] {
            c.remember(sent(1, cmid, 1000), 4);
        }
        c.remember(sent(2, 7, 1000), 4); // pushes out (1, 50)
        assert!(c.find(1, 50, 1000, 60_000).is_none(), "evicted by count");
        assert_eq!(c.find(1, 7, 1000, 60_000).map(|s| s.sender), Some(1));
        assert_eq!(c.find(2, 7, 1000, 60_000).map(|s| s.sender), Some(2));
        assert!(c.find(1, 3, 1000, 60_000).is_some(), "an id below the newest is still found");
        assert!(c.find(1, 901, 1000, 60_000).is_none());
        assert!(c.find(3, 7, 1000, 60_000).is_none(), "another sender's id");
        assert!(c.find(1, 900, 62_000, 60_000).is_none(), "forgotten after the window");
        assert!(c.recent.is_empty());
    }
}
