//! The conversation owner: for each 1:1 conversation of its partitions, the sequence counter and
//! the resend dedup of its latest sends.
//!
//! A `Submit` for a conversation not held yet starts a load ([`Effect::LoadConv`]: the recipient
//! must exist; with a durable store the last sequence and the recent sends come back too), and
//! waits with the others that arrive meanwhile. A sequenced message is stamped in place, then
//! either published at once (no-data mode) or handed to the commit pipeline
//! ([`Effect::Commit`]) and published when [`ConvOwner::settled`] says it is committed: nothing
//! is acked or delivered before it is durable.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use ahash::RandomState;
use bytes::Bytes;
use smallvec::SmallVec;

use super::{Effect, Effects, GroupPublish, InvariantError};
use crate::{
    config::Limits,
    envelope::{conv_key, AckInfo, Envelope, SessionRef, Submit},
    frame,
    placement::{Owner, Placement, CLUSTER_SHARDS_MAX},
    protocol::{conv as conv_kind, send_flags, ArchivedSend, ErrorCode, Stamp},
    store::{ConvKey, ConvLoad, Edit, GroupChange, RecentSend, StoredMessage, UserId},
};

/// Submits waiting for one conversation to load.
pub const CONV_WAITERS_MAX: usize = 1024;
/// Recent sends loaded with a conversation to rebuild its resend dedup.
pub const CONV_RECENT_MAX: usize = 4096;
/// Stream messages one conversation holds back behind unsettled commits; beyond it the oldest
/// waiting stream is dropped (streams are never retried).
pub const CONV_STREAMS_WAITING_MAX: usize = 256;

/// A group conversation remembers at most this many times `dedup_per_conversation_max` sends
/// in all (each sender at most `dedup_per_conversation_max` of its own).
pub const GROUP_DEDUP_FACTOR: usize = 8;

/// Message ids: 41 bits of milliseconds since 2024-01-01, 12 bits of generator (the shard on a
/// single node; node id × 64 + shard in a cluster), 11 bits of counter.
const ID_EPOCH_MS: u64 = 1_704_067_200_000;
/// Shards whose ids fit the message id layout (on a single node).
pub const SHARDS_MAX: usize = 1024;
const ID_COUNTER_BITS: u32 = 11;
const ID_GENERATOR_BITS: u32 = 12;

/// The generator bits of `owner`'s message ids: unique over the cluster.
fn id_generator(owner: Owner) -> u64 {
    if owner.node == 0 {
        owner.shard as u64
    } else {
        debug_assert!((owner.shard as usize) < CLUSTER_SHARDS_MAX);
        ((owner.node as u64) << 6) | owner.shard as u64
    }
}

pub use crate::store::LoadRequest;

/// How a commit ended for one message.
#[derive(Clone, Copy, Debug)]
pub enum CommitOutcome {
    Stored,
    /// The store already held this (conversation, sender, client message id): a resend whose
    /// first attempt was committed after all (an ambiguous commit). Nothing new was stored.
    Duplicate(RecentSend),
    /// A recall whose edit the store refused (see [`crate::store::Unstored::Refused`]).
    Refused(ErrorCode),
    Failed,
}

/// A sequenced message on its way out: the sender's ack and the shared `DELIVER` frame.
pub struct Sequenced {
    pub ack: AckInfo,
    pub origin: SessionRef,
    pub sender: UserId,
    pub to: UserId,
    /// Conversation kind ([`conv_kind`]).
    pub conv: u8,
    pub sender_device: u64,
    pub frame: Bytes,
    /// A group notice's stored changes.
    pub change: Option<Arc<GroupChange>>,
    /// A recall's edit of the message it takes back.
    pub edit: Option<Edit>,
}

impl Sequenced {
    pub fn conv(&self) -> ConvKey {
        conv_key(self.conv, self.sender, self.to)
    }

    /// A group notice (sender 0): its outcome goes to the group owner, not to a session.
    pub fn is_notice(&self) -> bool {
        self.sender == 0
    }

    /// The message as stored: its `DELIVER` payload (stamp + Send archive) shares the frame.
    pub fn stored(&self) -> StoredMessage {
        let len = frame::Header::read(&self.frame).len as usize;
        StoredMessage {
            conv: self.conv(),
            seq: self.ack.seq,
            msg_id: self.ack.msg_id,
            ts_ms: self.ack.ts_ms,
            sender: self.sender,
            sender_device: self.sender_device,
            client_msg_id: self.ack.client_msg_id,
            payload: self.frame.slice(frame::HEADER_BYTES..frame::HEADER_BYTES + len),
            group: self.change.clone(),
            edit: self.edit.clone(),
        }
    }
}

// Submits stay boxed: they arrive as `Envelope::Submit(Box<_>)`.
#[allow(clippy::vec_box)]
enum ConvState {
    /// Checking that the recipient exists (and, with a durable store, loading the last sequence).
    Loading(Vec<Box<Submit>>),
    Ready,
}

struct Conv {
    last_seq: u64,
    /// A 1:1 pair's roster flags ([`crate::roster::pair`]).
    pair: u8,
    /// The flags came from a roster change (newer than what a load in flight may read).
    pair_set: bool,
    /// The greatest seq published (stored, or sequenced without a store): what a stream
    /// message's stamp says it follows. A seq whose commit failed is not published, and may be
    /// given again after a reload.
    published_seq: u64,
    state: ConvState,
    /// Resend dedup: the conversation's latest sends (at most `dedup_per_conversation_max` of
    /// each sender, none older than `dedup_window_secs`), oldest first.
    recent: VecDeque<Sent>,
    /// Per sender of this conversation with remembered sends (at most two in a 1:1
    /// conversation; any member in a group's): the greatest client message id remembered (a
    /// send above it cannot be a resend, which spares the scan for clients whose ids rise), and
    /// how many of the sender's sends are remembered.
    newest: SmallVec<[(UserId, u64, usize); 2]>,
    /// When a send last arrived, for eviction.
    last_used_ms: u64,
    /// Sequence numbers of the sends whose commit has not settled, rising: the conversation
    /// stays while any is open.
    open: VecDeque<u64>,
    /// Stream messages waiting for the stored messages sequenced before them. Made when the
    /// first has to wait; boxed so that the millions of conversations without one pay 8 bytes,
    /// not the 32 of an empty `VecDeque`.
    #[allow(clippy::box_collection)]
    streams: Option<Box<VecDeque<WaitingStream>>>,
    /// Tells this conversation's entries in the eviction queue from those of an earlier one.
    generation: u64,
}

/// A stream message held back behind unsettled commits.
struct WaitingStream {
    /// The last seq given when it arrived: it goes once every seq up to this one has settled.
    after: u64,
    arrived_ms: u64,
    sub: Box<Submit>,
}

/// A remembered send of a conversation: its ids, and whether its commit has succeeded (a resend
/// of a send whose commit is still open gets `Busy`).
#[derive(Clone, Copy)]
struct Sent {
    sender: UserId,
    ack: AckInfo,
    committed: bool,
    /// A plain message that may still be recalled: not a recall itself, not recalled yet. Kept
    /// for the recall checks of no-data mode, which has no stored message to check against.
    plain: bool,
}

impl Conv {
    fn new(state: ConvState, last_seq: u64, now: u64, generation: u64) -> Conv {
        Conv {
            last_seq,
            pair: 0,
            pair_set: false,
            published_seq: last_seq,
            state,
            recent: VecDeque::new(),
            newest: SmallVec::new(),
            last_used_ms: now,
            open: VecDeque::new(),
            streams: None,
            generation,
        }
    }

    fn evictable(&self) -> bool {
        matches!(self.state, ConvState::Ready) && self.open.is_empty()
    }

    /// The remembered send of `sender` with `client_msg_id`, forgetting sends older than the
    /// window first. Recent sends of one conversation sit together in memory, and a resend is
    /// almost always of one of the last few: scanning them costs less than a shard-wide map.
    fn find(&mut self, sender: UserId, client_msg_id: u64, now: u64, window_ms: u64) -> Option<&mut Sent> {
        while self.recent.front().is_some_and(|s| s.ack.ts_ms + window_ms < now) {
            let old = self.recent.pop_front().expect("non-empty");
            self.forget(old.sender);
        }
        if self.newest.iter().any(|&(u, max, _)| u == sender && client_msg_id > max) {
            return None;
        }
        self.recent.iter_mut().rev().find(|s| s.ack.client_msg_id == client_msg_id && s.sender == sender)
    }

    /// Remember a send. Each sender has room for `max` of its own: a peer's sends never push
    /// mine out.
    fn remember(&mut self, sent: Sent, max: usize) {
        let slot = match self.newest.iter().position(|&(u, _, _)| u == sent.sender) {
            Some(i) => i,
            None => {
                self.newest.push((sent.sender, 0, 0));
                self.newest.len() - 1
            }
        };
        if self.newest[slot].2 >= max {
            let i = self.recent.iter().position(|s| s.sender == sent.sender).expect("counted");
            self.recent.remove(i);
            self.newest[slot].2 -= 1;
        }
        let n = &mut self.newest[slot];
        n.1 = n.1.max(sent.ack.client_msg_id);
        n.2 += 1;
        self.recent.push_back(sent);
        // A group has any number of senders: all together keep at most `GROUP_DEDUP_FACTOR`
        // times one sender's share, the oldest going first.
        while self.recent.len() > max * GROUP_DEDUP_FACTOR {
            let old = self.recent.pop_front().expect("non-empty");
            self.forget(old.sender);
        }
    }

    /// Remember a send that is older than some remembered ones (a stored original found again),
    /// keeping the ring in sequence order.
    fn remember_at(&mut self, sent: Sent, max: usize) {
        self.remember(sent, max);
        let new = self.recent.pop_back().expect("just remembered");
        let at = self.recent.iter().position(|r| r.ack.seq > new.ack.seq).unwrap_or(self.recent.len());
        self.recent.insert(at, new);
    }

    /// A remembered send of `sender` was dropped.
    fn forget(&mut self, sender: UserId) {
        if let Some(i) = self.newest.iter().position(|n| n.0 == sender) {
            self.newest[i].2 -= 1;
            if self.newest[i].2 == 0 {
                // A group's senders come and go: keep only those with remembered sends.
                self.newest.swap_remove(i);
            }
        }
    }
}

/// Message ids of one shard: unique and rising, whatever the clock does.
struct MsgIds {
    generator: u64,
    last_ms: u64,
    counter: u64,
}

impl MsgIds {
    fn next(&mut self, now: u64) -> u64 {
        let now = now.saturating_sub(ID_EPOCH_MS);
        if now > self.last_ms {
            self.last_ms = now;
            self.counter = 0;
        } else {
            self.counter += 1;
            if self.counter >= 1 << ID_COUNTER_BITS {
                self.last_ms += 1; // borrow from the next millisecond: ids never repeat or go back
                self.counter = 0;
            }
        }
        (self.last_ms << (ID_COUNTER_BITS + ID_GENERATOR_BITS))
            | (self.generator << ID_COUNTER_BITS)
            | self.counter
    }
}

/// Where a conversation's numbering starts when an owner in a cluster on the memory store takes
/// it (no store keeps its last seq): `now_ms × 1024`. Numbers keep rising across owners as long
/// as a conversation averages fewer than 1024 messages a millisecond between two takeovers and
/// the nodes' clocks agree (NTP).
pub fn moved_seq_floor(now_ms: u64) -> u64 {
    now_ms.saturating_mul(1024)
}

pub struct ConvOwner {
    me: Owner,
    placement: Placement,
    durable: bool,
    convs: HashMap<ConvKey, Conv, RandomState>,
    dedup_window_ms: u64,
    dedup_max: usize,
    /// `messages.recall_window_secs` in ms; 0: no limit.
    recall_window_ms: u64,
    /// `messages.require_friendship`.
    require_friendship: bool,
    convs_max: usize,
    idle_ms: u64,
    /// Conversations in the order they were last used, roughly (a clock queue: an entry used
    /// since it was queued goes to the back again when it reaches the front), with the
    /// generation of the conversation each entry was queued for.
    lru: VecDeque<(ConvKey, u64, u64)>,
    generations: u64,
    /// Without a durable store an evicted conversation's counter cannot be reloaded: every
    /// conversation starts above the greatest sequence number ever evicted here, so a
    /// conversation's numbers keep rising across an eviction.
    evicted_seq_max: u64,
    /// Conversations whose partition moved to another owner, dropped once nothing is open.
    moved: Vec<ConvKey>,
    ids: MsgIds,
    /// Messages sequenced so far.
    pub sequenced: u64,
    /// Conversations evicted so far.
    pub evicted: u64,
}

/// Queue entries an eviction pass looks at, at most, to make room for a new conversation.
const MAKE_ROOM_SCAN_MAX: usize = 64;

impl ConvOwner {
    pub fn new(me: Owner, placement: Placement, durable: bool, l: &Limits, hasher: RandomState) -> ConvOwner {
        assert!(placement.shards() <= SHARDS_MAX && me.shard() < placement.shards());
        ConvOwner {
            me,
            placement,
            durable,
            convs: HashMap::with_hasher(hasher),
            dedup_window_ms: l.dedup_window_secs * 1000,
            dedup_max: l.dedup_per_conversation_max,
            recall_window_ms: 0,
            require_friendship: false,
            convs_max: l.conversations_per_shard_max,
            idle_ms: l.conversation_idle_secs * 1000,
            lru: VecDeque::new(),
            generations: 0,
            evicted_seq_max: 0,
            moved: Vec::new(),
            ids: MsgIds { generator: id_generator(me), last_ms: 0, counter: 0 },
            sequenced: 0,
            evicted: 0,
        }
    }

    /// The message policy: recalls may take back messages up to `recall_window_secs` old (0:
    /// any); `require_friendship` refuses 1:1 messages between users who are not friends.
    pub fn with_policy(mut self, p: &crate::config::MessagePolicy) -> ConvOwner {
        self.recall_window_ms = p.recall_window_secs.saturating_mul(1000);
        self.require_friendship = p.require_friendship;
        self
    }

    /// A pair's roster changed: its conversation (if held) checks sends by the new flags.
    pub fn set_pair(&mut self, key: ConvKey, flags: u8) {
        if let Some(c) = self.convs.get_mut(&key) {
            c.pair = flags;
            c.pair_set = true;
        }
    }

    /// A send arrives: answer a resend from dedup, sequence a new one, or wait for the load.
    pub fn submit(&mut self, sub: Box<Submit>, now: u64, out: &mut Effects) {
        let key = sub.key();
        let owner = self.placement.conv(key);
        if owner != self.me {
            // A message on the wrong owner would get a second, conflicting sequence. This is a
            // send accepted before the partition moved (it waited for the conversation's load,
            // and the cluster's table changed meanwhile): on to the new owner, which loads the
            // conversation from the store.
            out.push(Effect::Post(owner, Envelope::Submit(sub)));
            return;
        }
        match self.convs.get_mut(&key) {
            Some(conv) => {
                let by_pair = pair_refuses(conv.pair, self.require_friendship, &sub);
                match &mut conv.state {
                    ConvState::Ready if sub.stream && by_pair.is_some() => {
                        refuse(out, &sub, by_pair.expect("checked"))
                    }
                    ConvState::Ready if sub.stream => {
                        conv.last_used_ms = now;
                        if conv.open.is_empty() {
                            publish_stream(&self.placement, conv.published_seq, sub, now, out);
                        } else {
                            let waiting = conv.streams.get_or_insert_with(Default::default);
                            if waiting.len() >= CONV_STREAMS_WAITING_MAX {
                                waiting.pop_front();
                            }
                            waiting.push_back(WaitingStream { after: conv.last_seq, arrived_ms: now, sub });
                        }
                    }
                    ConvState::Ready if burn_notice(&sub) => {
                        // A burn notice of the sweep (never a resend: the sweep claims each burn
                        // once). Only durable stores have burns to sweep.
                        conv.last_used_ms = now;
                        let edit = edit_of(&sub, now, 0);
                        let s = sequence(conv, &mut self.ids, sub, edit, now, self.durable, self.dedup_max);
                        self.sequenced += 1;
                        conv.open.push_back(s.ack.seq);
                        out.push(Effect::Commit(s));
                    }
                    ConvState::Ready if sub.sender == 0 => {
                        // A group notice: never a resend (the group owner sends each once). Its
                        // change is committed in no-data mode too (the memory store keeps groups).
                        conv.last_used_ms = now;
                        let s = sequence(conv, &mut self.ids, sub, None, now, self.durable, self.dedup_max);
                        self.sequenced += 1;
                        conv.open.push_back(s.ack.seq);
                        out.push(Effect::Commit(s));
                    }
                    ConvState::Ready => {
                        conv.last_used_ms = now;
                        match conv.find(sub.sender, sub.client_msg_id, now, self.dedup_window_ms).copied() {
                            Some(sent) if !sent.committed => {
                                reject(out, sub.origin, sub.client_msg_id, ErrorCode::Busy)
                            }
                            Some(sent) => {
                                let ack = AckInfo { duplicate: true, ..sent.ack };
                                out.push(Effect::Post(
                                    sub.origin.owner(),
                                    Envelope::Acked { session: sub.origin, ack },
                                ));
                            }
                            None if sub.refuse_new.is_some() => {
                                let code = sub.refuse_new.expect("checked");
                                reject(out, sub.origin, sub.client_msg_id, code)
                            }
                            None if by_pair.is_some() => {
                                reject(out, sub.origin, sub.client_msg_id, by_pair.expect("checked"))
                            }
                            None => {
                                let edit = edit_of(&sub, now, self.recall_window_ms);
                                if let (Some(edit), false) = (&edit, self.durable) {
                                    if let Err(code) = check_recall(conv, edit) {
                                        return reject(out, sub.origin, sub.client_msg_id, code);
                                    }
                                }
                                let s = sequence(
                                    conv,
                                    &mut self.ids,
                                    sub,
                                    edit,
                                    now,
                                    self.durable,
                                    self.dedup_max,
                                );
                                self.sequenced += 1;
                                // Without a store a message is published at once, unless a group
                                // notice sequenced before it is still being committed (the memory
                                // store keeps groups): then it follows the notice through the same
                                // commit queue, so that nobody gets it ahead of the notice.
                                if self.durable || !conv.open.is_empty() {
                                    conv.open.push_back(s.ack.seq);
                                    out.push(Effect::Commit(s));
                                } else {
                                    conv.published_seq = s.ack.seq;
                                    publish(&self.placement, s, true, out);
                                }
                            }
                        }
                    }
                    ConvState::Loading(waiters) => {
                        if waiters.len() < CONV_WAITERS_MAX {
                            waiters.push(sub);
                        } else {
                            refuse(out, &sub, ErrorCode::Busy);
                        }
                    }
                }
            }
            None => {
                if self.convs.len() >= self.convs_max && !self.make_room() {
                    return refuse(out, &sub, ErrorCode::Busy);
                }
                // A group's members are checked by its owner; a 1:1 recipient must exist.
                let check_recipient =
                    (sub.conv == conv_kind::DIRECT && sub.sender != sub.to).then_some(sub.to);
                self.generations += 1;
                let generation = self.generations;
                // A durable store's load gives the counter; without one it starts past every
                // evicted conversation's, and in a cluster past what another owner may have
                // given it before: `now_ms × 1024` (see [`moved_seq_floor`]).
                let floor = match (self.durable, self.me.node) {
                    (true, _) => 0,
                    (false, 0) => self.evicted_seq_max,
                    (false, _) => self.evicted_seq_max.max(moved_seq_floor(now)),
                };
                let conv = Conv::new(ConvState::Loading(vec![sub]), floor, now, generation);
                self.convs.insert(key, conv);
                self.lru.push_back((key, now, generation));
                self.compact_lru();
                out.push(Effect::LoadConv(LoadRequest {
                    key,
                    check_recipient,
                    since_ms: now.saturating_sub(self.dedup_window_ms),
                    recent_max: self.dedup_max.min(CONV_RECENT_MAX),
                }));
            }
        }
    }

    /// A load finished: take the conversation over (or drop it) and handle, in order, every
    /// send that waited for it.
    pub fn loaded(&mut self, key: ConvKey, result: Result<ConvLoad, ErrorCode>, now: u64, out: &mut Effects) {
        let Some(conv) = self.convs.get_mut(&key) else { return };
        let ConvState::Loading(waiters) = std::mem::replace(&mut conv.state, ConvState::Ready) else {
            return;
        };
        conv.last_used_ms = now;
        match result {
            Ok(load) => {
                conv.last_seq = conv.last_seq.max(load.last_seq);
                if !conv.pair_set {
                    conv.pair = load.pair;
                }
                conv.published_seq = conv.last_seq;
                for r in load.recent.iter().rev().filter(|r| r.sender != 0) {
                    let ack = AckInfo {
                        client_msg_id: r.client_msg_id,
                        msg_id: r.msg_id,
                        seq: r.seq,
                        ts_ms: r.ts_ms,
                        duplicate: false,
                    };
                    conv.remember(
                        Sent { sender: r.sender, ack, committed: true, plain: true },
                        self.dedup_max,
                    );
                }
                for sub in waiters {
                    self.submit(sub, now, out);
                }
            }
            Err(code) => {
                self.convs.remove(&key);
                self.compact_lru();
                for sub in waiters {
                    refuse(out, &sub, code);
                }
            }
        }
    }

    /// A commit ended. Publish what was stored (acking only a sender still waiting), refuse
    /// what failed, and remember the outcome for resend dedup: a stored send answers its resends
    /// with the original ack; a failed one is forgotten (its resend is a new message). A send
    /// the store already held (its first attempt was committed after all) is answered with the
    /// stored original's ids; its own number stays a hole, and it is not delivered again (the
    /// original reaches devices by catch-up and history).
    pub fn settled(&mut self, s: Sequenced, outcome: CommitOutcome, sender_waiting: bool, out: &mut Effects) {
        let conv = self.convs.get_mut(&s.conv());
        // An open commit keeps its conversation from eviction, so it is still here.
        let conv = conv.expect("a conversation with an open commit is kept");
        let at = conv.open.iter().position(|&q| q == s.ack.seq).expect("a commit settled twice");
        conv.open.remove(at);
        let cmid = s.ack.client_msg_id;
        let at = conv.recent.iter().rposition(|r| r.ack.client_msg_id == cmid && r.sender == s.sender);
        match (outcome, at) {
            (CommitOutcome::Stored, Some(i)) => conv.recent[i].committed = true,
            (CommitOutcome::Stored, None) => {}
            (CommitOutcome::Failed | CommitOutcome::Duplicate(_) | CommitOutcome::Refused(_), Some(i)) => {
                conv.recent.remove(i);
                conv.forget(s.sender);
            }
            (CommitOutcome::Failed | CommitOutcome::Duplicate(_) | CommitOutcome::Refused(_), None) => {}
        }
        match outcome {
            CommitOutcome::Stored => {
                conv.published_seq = conv.published_seq.max(s.ack.seq);
                publish(&self.placement, s, sender_waiting, out)
            }
            // A notice is sent once, under a fresh id: the store cannot hold it already, and
            // its group owner waits for the outcome however long the commit took.
            CommitOutcome::Failed | CommitOutcome::Duplicate(_) | CommitOutcome::Refused(_)
                if s.is_notice() =>
            {
                out.push(Effect::NoticeFailed { group: s.to, code: ErrorCode::StoreUnavailable });
            }
            // Nothing of a refused recall was stored: its seq stays a hole.
            CommitOutcome::Refused(code) => {
                if sender_waiting {
                    reject(out, s.origin, cmid, code);
                }
            }
            CommitOutcome::Failed => {
                if sender_waiting {
                    reject(out, s.origin, cmid, ErrorCode::StoreUnavailable);
                }
            }
            CommitOutcome::Duplicate(original) => {
                let ack = AckInfo {
                    client_msg_id: cmid,
                    msg_id: original.msg_id,
                    seq: original.seq,
                    ts_ms: original.ts_ms,
                    duplicate: true,
                };
                // Remember the original, in sequence order, for the next resend.
                if conv.find(s.sender, cmid, s.ack.ts_ms, self.dedup_window_ms).is_none() {
                    let ack = AckInfo { duplicate: false, ..ack };
                    let sent = Sent { sender: s.sender, ack, committed: true, plain: false };
                    conv.remember_at(sent, self.dedup_max);
                }
                if sender_waiting && s.origin != SessionRef::NONE {
                    out.push(Effect::Post(s.origin.owner(), Envelope::Acked { session: s.origin, ack }));
                }
            }
        }
        // Streams that waited for this commit (and every earlier one) go now, after it.
        let first_open = conv.open.front().copied().unwrap_or(u64::MAX);
        if let Some(waiting) = conv.streams.as_mut() {
            while waiting.front().is_some_and(|w| w.after < first_open) {
                let w = waiting.pop_front().expect("non-empty");
                let follows = w.after.min(conv.published_seq);
                publish_stream(&self.placement, follows, w.sub, w.arrived_ms, out);
            }
            if waiting.is_empty() {
                conv.streams = None;
            }
        }
    }

    /// A commit took longer than `commit_timeout_ms`: its sender gets StoreUnavailable now; the
    /// commit's outcome comes later through [`ConvOwner::settled`] with `sender_waiting` false.
    pub fn commit_timed_out(&mut self, s: &Sequenced, out: &mut Effects) {
        // A notice's group owner waits for the real outcome: its change may still be stored.
        if !s.is_notice() {
            reject(out, s.origin, s.ack.client_msg_id, ErrorCode::StoreUnavailable);
        }
    }

    /// Evict conversations unused for `conversation_idle_secs` (with no load or commit open),
    /// looking at most at `budget` queue entries. With a durable store an evicted conversation
    /// is loaded again, with its resend dedup, when it is next used.
    pub fn evict_idle(&mut self, now: u64, budget: usize) -> usize {
        let mut evicted = self.drop_moved();
        for _ in 0..budget {
            let Some(&(key, queued_ms, generation)) = self.lru.front() else { break };
            let Some(conv) = self.convs.get(&key).filter(|c| c.generation == generation) else {
                self.lru.pop_front();
                continue;
            };
            if conv.last_used_ms > queued_ms || !conv.evictable() {
                // Used since it was queued, or busy: to the back, as of its last use.
                let at = conv.last_used_ms.max(if conv.evictable() { 0 } else { now });
                self.lru.pop_front();
                self.lru.push_back((key, at, generation));
                continue;
            }
            if now < queued_ms + self.idle_ms {
                break; // the rest were used later
            }
            self.lru.pop_front();
            self.evict(key);
            evicted += 1;
        }
        evicted
    }

    /// Drop the queue entries of conversations that are gone (a failed load removes its
    /// conversation without finding its entry), once they are as many as the live ones: the
    /// queue stays within twice the conversations held, at an amortized O(1) per insert.
    fn compact_lru(&mut self) {
        if self.lru.len() > 2 * self.convs.len() + 1024 {
            let convs = &self.convs;
            self.lru.retain(|(k, _, g)| convs.get(k).is_some_and(|c| c.generation == *g));
        }
    }

    /// At the cap: evict the least recently used conversation that can go, idle or not.
    fn make_room(&mut self) -> bool {
        // An entry used since it was queued goes back with its last use, and can go when seen
        // again: a short queue may be looked at more than once.
        for _ in 0..MAKE_ROOM_SCAN_MAX {
            let Some((key, queued_ms, generation)) = self.lru.pop_front() else { break };
            let Some(conv) = self.convs.get(&key).filter(|c| c.generation == generation) else { continue };
            if conv.last_used_ms > queued_ms || !conv.evictable() {
                self.lru.push_back((key, conv.last_used_ms, generation));
                continue;
            }
            self.evict(key);
            return true;
        }
        false
    }

    /// The cluster's members changed: place by `placement` from now on. Conversations whose
    /// partition moved to another owner are dropped (the new owner loads them from the store);
    /// those with a load or a commit open go once it has ended.
    pub fn set_placement(&mut self, placement: Placement) {
        self.placement = placement;
        self.moved = self.convs.keys().filter(|&&k| self.placement.conv(k) != self.me).copied().collect();
        self.drop_moved();
    }

    /// Drop the moved conversations that have nothing open; how many went.
    fn drop_moved(&mut self) -> usize {
        if self.moved.is_empty() {
            return 0;
        }
        let mut gone = 0;
        for k in std::mem::take(&mut self.moved) {
            match self.convs.get(&k) {
                Some(c) if self.placement.conv(k) != self.me => {
                    if c.evictable() {
                        self.evict(k);
                        gone += 1;
                    } else {
                        self.moved.push(k);
                    }
                }
                _ => {}
            }
        }
        gone
    }

    fn evict(&mut self, key: ConvKey) {
        let conv = self.convs.remove(&key).expect("evicting a held conversation");
        debug_assert!(conv.evictable());
        self.evicted_seq_max = self.evicted_seq_max.max(conv.last_seq);
        self.evicted += 1;
    }

    /// Conversations held (ready or loading).
    pub fn len(&self) -> usize {
        self.convs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.convs.is_empty()
    }

    /// The generation of the conversation held for `key` (a new one after each eviction).
    pub fn generation(&self, key: ConvKey) -> Option<u64> {
        self.convs.get(&key).map(|c| c.generation)
    }

    /// The last sequence number given in `key`, if held.
    pub fn last_seq(&self, key: ConvKey) -> Option<u64> {
        self.convs.get(&key).map(|c| c.last_seq)
    }

    /// Remembered sends never exceed their cap, go back in sequence, or belong to a third user;
    /// the eviction queue stays bounded by the conversations held.
    pub fn check(&self) -> Result<(), InvariantError> {
        if self.lru.len() > 2 * self.convs.len() + 1024 {
            let what = format!("eviction queue of {} for {} conversations", self.lru.len(), self.convs.len());
            return Err(InvariantError { key: 0, what });
        }
        for (&key, conv) in &self.convs {
            let fail =
                |what: String| Err(InvariantError { key: key.0, what: format!("conv {key:?}: {what}") });
            for &(u, _, n) in &conv.newest {
                let counted = conv.recent.iter().filter(|s| s.sender == u && u != 0).count();
                if u != 0 && (n != counted || n > self.dedup_max) {
                    return fail(format!(
                        "user {u}: {counted} remembered sends, counted {n}, max {}",
                        self.dedup_max
                    ));
                }
            }
            let uncommitted = conv.recent.iter().filter(|s| !s.committed).count();
            if uncommitted > conv.open.len() {
                return fail(format!("{uncommitted} uncommitted sends but {} open commits", conv.open.len()));
            }
            if conv.open.iter().zip(conv.open.iter().skip(1)).any(|(a, b)| a >= b) {
                return fail(format!("open commits out of order: {:?}", conv.open));
            }
            if conv.streams.as_ref().is_some_and(|w| w.is_empty() || conv.open.is_empty()) {
                return fail("streams held back with no commit open".into());
            }
            let mut prev = 0;
            for s in &conv.recent {
                if s.ack.seq <= prev || s.ack.seq > conv.last_seq {
                    return fail(format!(
                        "remembered seq {} out of order (last {})",
                        s.ack.seq, conv.last_seq
                    ));
                }
                if key.0 != 0 && s.sender != key.0 && s.sender != key.1 {
                    return fail(format!("remembered send of user {} outside the conversation", s.sender));
                }
                prev = s.ack.seq;
            }
        }
        Ok(())
    }
}

fn reject(out: &mut Effects, session: SessionRef, client_msg_id: u64, code: ErrorCode) {
    if session == SessionRef::NONE {
        return; // a burn notice of the sweep: nobody waits for it
    }
    out.push(Effect::Post(session.owner(), Envelope::Rejected { session, client_msg_id, code }));
}

/// Refuse a send, a stream message or (to its group owner) a group notice.
pub(crate) fn refuse(out: &mut Effects, sub: &Submit, code: ErrorCode) {
    if sub.sender == 0 {
        out.push(Effect::NoticeFailed { group: sub.to, code });
    } else if sub.stream {
        let (session, client_msg_id) = (sub.origin, sub.client_msg_id);
        out.push(Effect::Post(session.owner(), Envelope::StreamRefused { session, client_msg_id, code }));
    } else {
        reject(out, sub.origin, sub.client_msg_id, code);
    }
}

/// Why a 1:1 pair's roster flags refuse this send or stream message (the recipient blocks the
/// sender; not friends under `require_friendship`), if they do. Group sends, notices and burn
/// notices pass.
fn pair_refuses(pair: u8, require_friendship: bool, sub: &Submit) -> Option<ErrorCode> {
    if sub.conv != conv_kind::DIRECT || sub.sender == 0 || (pair == 0 && !require_friendship) {
        return None;
    }
    if burn_notice(sub) {
        return None;
    }
    crate::roster::may_message(pair, sub.sender, sub.to, require_friendship).err()
}

/// Stamp a stream message (msg_id 0; seq: the stored message it follows) and fan it out to
/// both users' live sessions, the sending session aside. No ack, no store.
#[allow(clippy::boxed_local)] // it arrives boxed in its envelope
fn publish_stream(placement: &Placement, follows: u64, mut sub: Box<Submit>, now: u64, out: &mut Effects) {
    let stamp = Stamp { msg_id: 0, seq: follows, ts_ms: now, from: sub.sender, to: sub.to, conv: sub.conv };
    stamp.write(&mut sub.frame[frame::HEADER_BYTES..]);
    let Submit { origin, sender, to, frame, conv, .. } = *sub;
    let frame = frame.freeze();
    if conv == conv_kind::GROUP {
        let p = GroupPublish { group: to, seq: follows, skip: origin, frame, notice: false, stream: true };
        out.push(Effect::GroupPublish(p));
        return;
    }
    if to != sender {
        let env = Envelope::StreamFanout { user: to, skip: SessionRef::NONE, frame: frame.clone() };
        out.push(Effect::Post(placement.user(to), env));
    }
    out.push(Effect::Post(
        placement.user(sender),
        Envelope::StreamFanout { user: sender, skip: origin, frame },
    ));
}

/// Give `sub` the next sequence number of its conversation and stamp its frame in place.
#[allow(clippy::boxed_local)] // it arrives boxed in its envelope
fn sequence(
    conv: &mut Conv,
    ids: &mut MsgIds,
    mut sub: Box<Submit>,
    edit: Option<Edit>,
    now: u64,
    durable: bool,
    dedup_max: usize,
) -> Sequenced {
    conv.last_seq += 1;
    let msg_id = ids.next(now);
    let burn = burn_notice(&sub);
    if sub.sender == 0 || burn {
        // A group or burn notice: its message id is also its (unique) client message id.
        sub.client_msg_id = msg_id;
    }
    let ack = AckInfo {
        client_msg_id: sub.client_msg_id,
        msg_id,
        seq: conv.last_seq,
        ts_ms: now,
        duplicate: false,
    };
    let stamp =
        Stamp { msg_id: ack.msg_id, seq: ack.seq, ts_ms: now, from: sub.sender, to: sub.to, conv: sub.conv };
    stamp.write(&mut sub.frame[frame::HEADER_BYTES..]);
    if sub.sender != 0 && !burn {
        if let (Some(Edit::Recall { seq, .. }), false) = (&edit, durable) {
            // No-data mode: the recall was checked against the remembered sends.
            if let Some(target) = conv.recent.iter_mut().find(|r| r.ack.seq == *seq) {
                target.plain = false;
            }
        }
        let sent = Sent { sender: sub.sender, ack, committed: !durable, plain: edit.is_none() };
        conv.remember(sent, dedup_max);
    }
    let Submit { origin, sender, to, frame, sender_device, conv, change, .. } = *sub;
    Sequenced { ack, origin, sender, to, conv, sender_device, frame: frame.freeze(), change, edit }
}

/// The `DELIVER` payload of a submitted frame.
fn payload(sub: &Submit) -> &[u8] {
    let len = frame::Header::read(&sub.frame).len as usize;
    &sub.frame[frame::HEADER_BYTES..frame::HEADER_BYTES + len]
}

/// A burn notice (made by the burn sweep; a session refuses the flag from clients).
fn burn_notice(sub: &Submit) -> bool {
    crate::store::payload_flags(payload(sub)) & send_flags::BURNED != 0
}

/// The edit a recall or burn notice makes (`None` for any other message). A recall takes back
/// the seq named by its body if it was sent by the recalling user (by anyone: a group
/// manager's recall) within `window_ms` (0: ever); the session checked the body. A burn notice
/// burns the seqs its body lists (u64 LE each).
fn edit_of(sub: &Submit, now: u64, window_ms: u64) -> Option<Edit> {
    let payload = payload(sub);
    let flags = crate::store::payload_flags(payload);
    if flags & (send_flags::RECALL | send_flags::BURNED) == 0 {
        return None;
    }
    let send = frame::access::<ArchivedSend>(&payload[Stamp::BYTES..]).ok()?;
    if flags & send_flags::BURNED != 0 {
        let seqs = send.body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        return Some(Edit::Burn { seqs: seqs.collect() });
    }
    let seq = crate::store::recalled_seq(&send.body)?;
    let since_ms = if window_ms == 0 { 0 } else { now.saturating_sub(window_ms) };
    Some(Edit::Recall { seq, by: sub.sender, any_sender: sub.by_manager, since_ms })
}

/// No-data mode keeps no message to check a recall against: it takes back only one of the
/// conversation's sends it still remembers (those of resend dedup, see [`Conv::remember`]).
fn check_recall(conv: &Conv, edit: &Edit) -> Result<(), ErrorCode> {
    let Edit::Recall { seq, by, any_sender, since_ms } = *edit else { return Ok(()) };
    let target = conv.recent.iter().find(|r| r.ack.seq == seq).ok_or(ErrorCode::NotRecallable)?;
    if !target.plain || (!any_sender && target.sender != by) {
        return Err(ErrorCode::NotRecallable);
    }
    if target.ack.ts_ms < since_ms {
        return Err(ErrorCode::RecallExpired);
    }
    Ok(())
}

/// Ack a message to its sender (if `ack`) and fan it out to both users' sessions.
fn publish(placement: &Placement, s: Sequenced, ack: bool, out: &mut Effects) {
    let Sequenced { ack: info, origin, sender, to, frame, conv, .. } = s;
    if ack && sender != 0 && origin != SessionRef::NONE {
        out.push(Effect::Post(origin.owner(), Envelope::Acked { session: origin, ack: info }));
    }
    if conv == conv_kind::GROUP {
        let notice = sender == 0;
        let p = GroupPublish { group: to, seq: info.seq, skip: origin, frame, notice, stream: false };
        out.push(Effect::GroupPublish(p));
        return;
    }
    if to == sender {
        out.push(Effect::Post(placement.user(to), Envelope::Fanout { user: to, skip: origin, frame }));
    } else {
        let fanout_to = Envelope::Fanout { user: to, skip: SessionRef::NONE, frame: frame.clone() };
        out.push(Effect::Post(placement.user(to), fanout_to));
        out.push(Effect::Post(
            placement.user(sender),
            Envelope::Fanout { user: sender, skip: origin, frame },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sender: UserId, cmid: u64, ts_ms: u64) -> Sent {
        let ack = AckInfo { client_msg_id: cmid, msg_id: cmid, seq: cmid, ts_ms, duplicate: false };
        Sent { sender, ack, committed: true, plain: true }
    }

    /// Resend dedup finds remembered sends whatever order their ids come in, per sender, and
    /// forgets by count and by age.
    #[test]
    fn conversation_dedup() {
        let mut c = Conv::new(ConvState::Ready, 0, 0, 1);
        for cmid in [50, 7, 900, 3] {
            c.remember(sent(1, cmid, 1000), 4);
        }
        for cmid in 1..=10 {
            c.remember(sent(2, cmid, 1000), 4); // a peer's sends push out only its own
        }
        assert!(c.find(1, 50, 1000, 60_000).is_some(), "not pushed out by the peer");
        c.remember(sent(1, 8, 1000), 4); // pushes out (1, 50)
        assert!(c.find(1, 50, 1000, 60_000).is_none(), "evicted by count");
        c.remember(sent(2, 7, 1000), 4);
        assert_eq!(c.find(1, 7, 1000, 60_000).map(|s| s.sender), Some(1));
        assert_eq!(c.find(2, 7, 1000, 60_000).map(|s| s.sender), Some(2));
        assert!(c.find(1, 3, 1000, 60_000).is_some(), "an id below the newest is still found");
        assert!(c.find(1, 901, 1000, 60_000).is_none());
        assert!(c.find(3, 7, 1000, 60_000).is_none(), "another sender's id");
        assert!(c.find(1, 900, 62_000, 60_000).is_none(), "forgotten after the window");
        assert!(c.recent.is_empty());
    }

    /// Message ids rise and never repeat, also when the clock stands still or goes back.
    #[test]
    fn message_ids_rise() {
        let mut ids = MsgIds { generator: id_generator(Owner::new(5, 3)), last_ms: 0, counter: 0 };
        let mut prev = 0;
        for i in 0..20_000u64 {
            let now = ID_EPOCH_MS + 5 - (i % 3);
            let id = ids.next(now);
            assert!(id > prev);
            assert_eq!((id >> ID_COUNTER_BITS) & ((1 << ID_GENERATOR_BITS) - 1), 5 << 6 | 3);
            prev = id;
        }
    }
}
