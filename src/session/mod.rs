//! Sessions: a connection's login state, outbound queue and in-flight sends, whatever transport
//! carries its bytes; and ([`requests`]) the handling of the requests it sends.
//!
//! A transport ([`crate::transport`]) turns bytes into whole frames and hands each to
//! [`requests::Requests::frame`]; it writes what the session queues. The session never touches a
//! socket, so a WebSocket transport can feed the same logic.
//!
//! Key types: [`Session`], [`Flow`].

pub mod requests;

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;

use crate::{
    config::Limits,
    envelope::{AckInfo, SessionRef},
    frame,
    notify::LocalNotify,
    placement::NodeId,
    protocol::{self, kind, DeviceType, ErrorCode},
    store::UserId,
};

/// What the transport does after a frame.
pub enum Flow {
    Continue,
    Close,
}

/// Answers that a request waits for after posting to another shard.
pub(crate) enum Reply {
    Attach(Result<UserId, ErrorCode>),
    Token(Result<(), ErrorCode>),
    /// A group owner's answer: the frame to write, or a refusal.
    Group(Result<Bytes, ErrorCode>),
}

/// Build a `Kick` frame.
pub fn kick_frame(reason: ErrorCode) -> Bytes {
    crate::metrics::count_kick(reason.code());
    Bytes::from(frame::encode(
        kind::KICK,
        &protocol::Kick { reason: reason.code(), message: reason.text().into() },
    ))
}

/// Build an `Error` frame.
pub fn error_frame(code: ErrorCode, request_kind: u16, client_msg_id: u64) -> Bytes {
    crate::metrics::count_error(code.code());
    Bytes::from(frame::encode(
        kind::ERROR,
        &protocol::Error { code: code.code(), request_kind, client_msg_id, message: code.text().to_string() },
    ))
}

/// Where a lossy message comes from: ([`protocol::missed`] source, room id or peer user id).
pub(crate) type LossySource = (u8, u64);

/// A session's live rooms and its queue of lossy messages (room and stream messages); made
/// when first needed (most sessions never have one).
#[derive(Default)]
pub(crate) struct SessionRooms {
    /// Rooms this session is subscribed to.
    pub(crate) subscribed: Vec<u64>,
    /// Lossy messages waiting for the writer, oldest first. Bounded by `room_queue_frames_max`:
    /// beyond it the oldest is dropped and counted in `missed`.
    queue: VecDeque<(LossySource, Bytes)>,
    /// Messages dropped per source since the session was last told (`MISSED`).
    missed: Vec<(LossySource, u64)>,
}

/// Room requests one session may have unanswered at once (their answers are never dropped
/// between shards, so they must be bounded); beyond it a request gets Busy.
pub const ROOM_REQUESTS_INFLIGHT_MAX: u16 = 64;

/// Lossy frames move from a session's lossy queue to its outbound queue only while fewer bytes
/// than this wait there: a slow reader's room and stream messages pile up (and are dropped) in
/// the lossy queue, never in the outbound queue that would close it as a slow consumer.
const ROOM_REFILL_BYTES: usize = 64 * 1024;

/// Bytes taken from a shard's budget for large messages (`large_shard_bytes_max`), given back
/// when dropped.
pub(crate) struct Reservation {
    pool: Rc<Cell<usize>>,
    bytes: usize,
}

impl Reservation {
    /// Take `bytes` from `pool` if it stays within `max`.
    pub(crate) fn take(pool: &Rc<Cell<usize>>, bytes: usize, max: usize) -> Option<Reservation> {
        let used = pool.get();
        (used + bytes <= max).then(|| {
            pool.set(used + bytes);
            Reservation { pool: pool.clone(), bytes }
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.set(self.pool.get() - self.bytes);
    }
}

/// A large `Send` arriving in parts: assembled in place as the `Deliver` frame it becomes.
pub(crate) struct Upload {
    /// The `client_msg_id` the parts carry.
    pub(crate) id: u64,
    /// The whole `Send` payload's length.
    pub(crate) total: usize,
    /// Payload bytes received so far.
    pub(crate) received: usize,
    /// The Deliver frame being built: header, blank stamp, then the payload received so far.
    pub(crate) frame: BytesMut,
    /// When the last part came.
    pub(crate) last_part: Instant,
    pub(crate) _reserved: Reservation,
}

/// The one large message a session may have at a time.
pub(crate) enum Large {
    Uploading(Upload),
    /// Handed to its conversation owner; its memory counts until the send is answered.
    InFlight {
        id: u64,
        _reserved: Reservation,
    },
}

/// A frame too large for one, on its way out in parts.
struct LargeOut {
    /// The whole frame.
    frame: Bytes,
    /// The payload bytes already sent in parts.
    next: usize,
}

pub struct Session {
    pub id: SessionRef,
    /// 0 until logged in.
    pub(crate) user: Cell<UserId>,
    pub(crate) outq: RefCell<VecDeque<Bytes>>,
    pub(crate) out_bytes: Cell<usize>,
    pub(crate) out_bytes_max: usize,
    pub(crate) writer: LocalNotify,
    pub(crate) reader: LocalNotify,
    pub(crate) inflight: Cell<u32>,
    pub(crate) inflight_max: u32,
    /// The sends in flight (`inflight` of them), oldest first: client message id and when its
    /// bytes arrived. One unanswered past `answer_timeout_ms` is answered with Timeout.
    pub(crate) pending: RefCell<VecDeque<(u64, Instant, NodeId)>>,
    pub(crate) closing: Cell<bool>,
    pub(crate) reply: RefCell<Option<oneshot::Sender<Reply>>>,
    /// When the connection was accepted (for the login timeout).
    pub created: Instant,
    /// When bytes last arrived (for the idle timeout).
    pub(crate) last_rx: Cell<Instant>,
    /// A login is being checked: the login timeout waits for its answer.
    pub(crate) login_pending: Cell<bool>,
    /// Hash of the logged-in device id (see `store::device_hash`).
    pub(crate) device: Cell<u64>,
    /// The logged-in device's type.
    pub(crate) device_type: Cell<DeviceType>,
    /// The logged-in device's id and login time (for the user owner's list of sessions).
    pub(crate) device_info: RefCell<crate::envelope::DeviceInfo>,
    /// The client's address, for per-address limits (`None` if unknown).
    pub(crate) peer: Cell<Option<std::net::IpAddr>>,
    /// Register requests seen (`registrations_per_connection_max`).
    pub(crate) registrations: Cell<u32>,
    /// Sends answered UnknownRecipient this minute.
    pub(crate) unknown_recipients: Cell<crate::guard::Budget>,
    /// Typing notices this minute (`typing_per_session_per_minute_max`).
    pub(crate) typing: Cell<crate::guard::Budget>,
    /// Read receipts this minute (`reads_per_session_per_minute_max`).
    pub(crate) reads: Cell<crate::guard::Budget>,
    /// Notified by the writer each time it has written: paced pushes wait on it.
    pub(crate) drained: LocalNotify,
    /// Since when the transport has held an incomplete frame (set and cleared by the transport).
    pub(crate) partial_since: Cell<Option<Instant>>,
    /// `limits.partial_frame_timeout_ms`.
    pub(crate) partial_frame_timeout: Duration,
    pub(crate) rooms: RefCell<Option<Box<SessionRooms>>>,
    /// Room requests (create, subscribe, unsubscribe, delete) sent and not answered yet.
    pub(crate) room_requests: Cell<u16>,
    /// The transport, as an index of [`crate::metrics::TRANSPORTS`].
    pub(crate) transport: Cell<u8>,
    /// A large message uploading or in flight.
    pub(crate) large: RefCell<Option<Large>>,
    /// Frames too large for one frame, waiting to go out in parts (or whole, see `parts_out`).
    large_out: RefCell<VecDeque<LargeOut>>,
    /// Bytes of the frames in `large_out`.
    large_out_bytes: Cell<usize>,
    large_out_bytes_max: usize,
    /// `limits.frame_bytes_max`: frames with longer payloads go out in parts.
    frame_bytes_max: usize,
    /// Large frames go out in `PART_OUT` frames (binary clients); false for the JSON gateway,
    /// whose messages are not bound by `frame_bytes_max`.
    pub(crate) parts_out: Cell<bool>,
    /// The id of the next frame sent in parts.
    parts_sent: Cell<u64>,
}

impl Session {
    pub fn new(id: SessionRef, l: &Limits) -> Session {
        Session {
            id,
            user: Cell::new(0),
            outq: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            out_bytes_max: l.session_outbound_bytes_max,
            writer: LocalNotify::default(),
            reader: LocalNotify::default(),
            inflight: Cell::new(0),
            inflight_max: l.inflight_per_session_max,
            pending: RefCell::new(VecDeque::new()),
            peer: Cell::new(None),
            registrations: Cell::new(0),
            unknown_recipients: Cell::new(Default::default()),
            typing: Cell::new(Default::default()),
            reads: Cell::new(Default::default()),
            closing: Cell::new(false),
            reply: RefCell::new(None),
            created: Instant::now(),
            last_rx: Cell::new(Instant::now()),
            login_pending: Cell::new(false),
            device: Cell::new(0),
            device_type: Cell::new(DeviceType::Other),
            device_info: RefCell::new(crate::envelope::DeviceInfo { device_id: String::new(), login_ms: 0 }),
            drained: LocalNotify::default(),
            partial_since: Cell::new(None),
            partial_frame_timeout: Duration::from_millis(l.partial_frame_timeout_ms),
            rooms: RefCell::new(None),
            room_requests: Cell::new(0),
            transport: Cell::new(0),
            large: RefCell::new(None),
            large_out: RefCell::new(VecDeque::new()),
            large_out_bytes: Cell::new(0),
            large_out_bytes_max: l.session_large_outbound_bytes_max,
            frame_bytes_max: l.frame_bytes_max,
            parts_out: Cell::new(true),
            parts_sent: Cell::new(0),
        }
    }

    /// The timeout this session has run into at `now`, if any. Checked by the shard's sweep
    /// ([`crate::shard::Shard::run_timeouts`]) rather than by a timer per read, which would be re-armed on
    /// every readiness wait. A session paused at its in-flight limit is not idle. A frame left
    /// incomplete for `partial_frame_timeout` closes the session too (logged in or not):
    /// bytes that never complete a frame hold a read buffer, and keep the idle clock from running.
    pub fn timed_out(&self, now: Instant, login: Duration, idle: Duration) -> Option<ErrorCode> {
        let partial_late =
            self.partial_since.get().is_some_and(|t| now.duration_since(t) >= self.partial_frame_timeout);
        if self.closing.get() {
            None
        } else if partial_late {
            Some(ErrorCode::PartialFrameTimeout)
        } else if self.user() == 0 {
            let late = now.duration_since(self.created) >= login && !self.login_pending.get();
            late.then_some(ErrorCode::LoginTimeout)
        } else if self.inflight.get() < self.inflight_max && now.duration_since(self.last_rx.get()) >= idle {
            Some(ErrorCode::IdleTimeout)
        } else {
            None
        }
    }

    /// Close with an `Error` frame carrying `code`.
    pub fn fail(&self, code: ErrorCode) {
        self.push(error_frame(code, 0, 0));
        self.close();
    }

    pub fn user(&self) -> UserId {
        self.user.get()
    }

    /// The user and device type of a logged-in session.
    pub fn logged_in(&self) -> Option<(UserId, DeviceType)> {
        let user = self.user.get();
        (user != 0 && !self.closing.get()).then(|| (user, self.device_type.get()))
    }

    pub fn id(&self) -> SessionRef {
        self.id
    }

    /// Queue a frame for writing. A session over its outbound limit is closed as a slow consumer.
    pub fn push(&self, frame: Bytes) {
        if self.closing.get() {
            return;
        }
        if frame::payload_len(&frame) > self.frame_bytes_max {
            self.push_large(frame);
            return;
        }
        if self.out_bytes.get() + frame.len() > self.out_bytes_max {
            self.push_unchecked(error_frame(ErrorCode::SlowConsumer, 0, 0));
            self.close();
            return;
        }
        self.push_unchecked(frame);
    }

    /// Queue a frame once the outbound queue is under half its limit: for long streams of
    /// stored messages, which must not trip the slow-consumer limit by themselves.
    pub async fn push_paced(&self, frame: Bytes) {
        self.large_sent().await;
        let large = frame::payload_len(&frame) > self.frame_bytes_max;
        while !large && !self.closing.get() && self.out_bytes.get() + frame.len() > self.out_bytes_max / 2 {
            self.drained.wait().await;
        }
        self.push(frame);
    }

    /// Wait until every large frame queued so far has gone to the outbound queue (its last part
    /// queued): frames pushed after this come after it. Catch-up and history pages keep their
    /// order so; live frames do not wait (they interleave with a large frame's parts).
    pub async fn large_sent(&self) {
        while !self.closing.get() && !self.large_out.borrow().is_empty() {
            self.drained.wait().await;
        }
    }

    /// Queue a frame whose payload is over `frame_bytes_max`: it goes out in parts, one at a time
    /// as the outbound queue runs short, so that other frames interleave. Bytes of such frames
    /// queued beyond `session_large_outbound_bytes_max` close the session as a slow consumer.
    fn push_large(&self, frame: Bytes) {
        if self.large_out_bytes.get() + frame.len() > self.large_out_bytes_max {
            self.push_unchecked(error_frame(ErrorCode::SlowConsumer, 0, 0));
            self.close();
            return;
        }
        self.large_out_bytes.set(self.large_out_bytes.get() + frame.len());
        self.large_out.borrow_mut().push_back(LargeOut { frame, next: 0 });
        self.writer.notify();
    }

    /// Move the next parts of queued large frames to the outbound queue while it is short.
    fn refill_large(&self) {
        while self.out_bytes.get() < ROOM_REFILL_BYTES {
            let mut q = self.large_out.borrow_mut();
            let Some(l) = q.front_mut() else { break };
            let len = frame::payload_len(&l.frame);
            if !self.parts_out.get() {
                let l = q.pop_front().expect("front");
                drop(q);
                self.large_out_bytes.set(self.large_out_bytes.get() - l.frame.len());
                self.push_unchecked(l.frame);
                continue;
            }
            if l.next == 0 {
                self.parts_sent.set(self.parts_sent.get() + 1);
            }
            let payload = &l.frame[frame::HEADER_BYTES..frame::HEADER_BYTES + len];
            let n = protocol::part::data_max(self.frame_bytes_max).min(len - l.next);
            let h = protocol::part::PartHeader {
                id: self.parts_sent.get(),
                total: len as u32,
                offset: l.next as u32,
                kind: frame::kind_of(&l.frame),
            };
            let part = frame::raw(kind::PART_OUT, &[&h.bytes(), &payload[l.next..l.next + n]]);
            l.next += n;
            if l.next == len {
                let l = q.pop_front().expect("front");
                self.large_out_bytes.set(self.large_out_bytes.get() - l.frame.len());
            }
            drop(q);
            self.push_unchecked(part);
        }
    }

    /// Move lossy and large frames to the outbound queue while it is short. Called by the writer.
    pub(crate) fn refill(&self) {
        self.refill_rooms();
        if !self.closing.get() {
            self.refill_large();
        }
    }

    fn push_unchecked(&self, frame: Bytes) {
        self.out_bytes.set(self.out_bytes.get() + frame.len());
        self.outq.borrow_mut().push_back(frame);
        self.writer.notify();
    }

    /// Queue a room message (for a subscribed session).
    pub fn push_room(&self, room: u64, frame: Bytes, max: usize) {
        if self.rooms.borrow().is_some() {
            self.push_lossy((protocol::missed::ROOM, room), frame, max);
        }
    }

    /// Queue a lossy message. While the session keeps up (nothing lossy waiting, little in its
    /// outbound queue) it goes straight to the outbound queue, in order with everything else;
    /// else it waits in the lossy queue, where at `max` queued the oldest is dropped and counted:
    /// a session that reads too slowly misses room and stream messages (and is told how many),
    /// it is not closed, and its other frames do not wait behind them.
    pub fn push_lossy(&self, source: LossySource, frame: Bytes, max: usize) {
        if self.closing.get() {
            return;
        }
        let mut rooms = self.rooms.borrow_mut();
        let r = rooms.get_or_insert_with(Default::default);
        if r.queue.is_empty() && r.missed.is_empty() && self.out_bytes.get() < ROOM_REFILL_BYTES {
            // A reader that keeps up: straight to the outbound queue, in order with the rest.
            drop(rooms);
            self.push_unchecked(frame);
            return;
        }
        let dropped = if r.queue.len() >= max { r.queue.pop_front().map(|(s, _)| s) } else { None };
        r.queue.push_back((source, frame));
        drop(rooms);
        if let Some(dropped) = dropped {
            self.count_missed(dropped, 1);
        }
        self.writer.notify();
    }

    /// Push `frame` if this session keeps up (nothing lossy queued, little output waiting), else
    /// drop it without a count: for typing notices, stale a moment later.
    pub fn push_if_keeping_up(&self, frame: Bytes) {
        let idle = self.rooms.borrow().as_ref().is_none_or(|r| r.queue.is_empty() && r.missed.is_empty());
        if !self.closing.get() && idle && self.out_bytes.get() < ROOM_REFILL_BYTES {
            self.push_unchecked(frame);
        }
    }

    /// Count `n` lossy messages of `source` this session missed; told with its next `MISSED`.
    pub fn count_missed(&self, source: LossySource, n: u64) {
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.as_mut() else { return };
        match r.missed.iter_mut().find(|(s, _)| *s == source) {
            Some((_, m)) => *m += n,
            None => r.missed.push((source, n)),
        }
        drop(rooms);
        self.writer.notify();
    }

    /// Move lossy messages to the outbound queue while it is short (see [`ROOM_REFILL_BYTES`]),
    /// a `MISSED` for each source that lost some first.
    fn refill_rooms(&self) {
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.as_mut() else { return };
        for ((source, id), count) in r.missed.drain(..) {
            let f = frame::encode(kind::MISSED, &protocol::Missed { id, count, source });
            self.push_unchecked(Bytes::from(f));
        }
        while self.out_bytes.get() < ROOM_REFILL_BYTES {
            let Some((_, f)) = r.queue.pop_front() else { break };
            self.push_unchecked(f);
        }
    }

    /// Record a subscription; false if it was already there.
    pub(crate) fn joined_room(&self, room: u64) -> bool {
        let mut rooms = self.rooms.borrow_mut();
        let r = rooms.get_or_insert_with(Default::default);
        if r.subscribed.contains(&room) {
            return false;
        }
        r.subscribed.push(room);
        true
    }

    /// Forget a subscription; false if there was none.
    pub(crate) fn left_room(&self, room: u64) -> bool {
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.as_mut() else { return false };
        let before = r.subscribed.len();
        r.subscribed.retain(|&id| id != room);
        let source = (protocol::missed::ROOM, room);
        r.queue.retain(|(s, _)| *s != source);
        r.missed.retain(|(s, _)| *s != source);
        r.subscribed.len() < before
    }

    /// Rooms subscribed to.
    pub(crate) fn room_count(&self) -> usize {
        self.rooms.borrow().as_ref().map_or(0, |r| r.subscribed.len())
    }

    /// The rooms subscribed to, forgotten (the session is ending).
    pub(crate) fn take_rooms(&self) -> Vec<u64> {
        self.rooms.borrow_mut().take().map(|r| r.subscribed).unwrap_or_default()
    }

    /// Flush what is queued, then close.
    pub fn close(&self) {
        if !self.closing.replace(true) {
            self.writer.notify();
            self.reader.notify();
        }
    }

    pub fn kick(&self, reason: ErrorCode) {
        if self.closing.get() {
            return;
        }
        self.push_unchecked(kick_frame(reason));
        self.close();
    }

    /// A send is handed to its conversation owner.
    /// `owner_node`: the node of the send's conversation (or group) owner.
    pub(crate) fn send_started(&self, client_msg_id: u64, owner_node: NodeId) {
        self.inflight.set(self.inflight.get() + 1);
        self.pending.borrow_mut().push_back((client_msg_id, self.last_rx.get(), owner_node));
    }

    /// Answer NodeUnavailable to every send in flight to an owner on a node that `lost` says
    /// failed: its answer may never come (the send or its ack may have died with the node).
    /// The client resends; if the message was stored, the resend gets its original ack.
    pub fn fail_sends_to(&self, lost: impl Fn(NodeId) -> bool) {
        let failed: Vec<u64> = {
            let mut pending = self.pending.borrow_mut();
            let failed = pending.iter().filter(|p| lost(p.2)).map(|p| p.0).collect();
            pending.retain(|p| !lost(p.2));
            failed
        };
        for cmid in failed {
            self.push(error_frame(ErrorCode::NodeUnavailable, kind::SEND, cmid));
            self.release_inflight();
        }
    }

    pub fn on_acked(&self, ack: &AckInfo) {
        let Some(arrived) = self.answered(ack.client_msg_id) else { return };
        crate::metrics::observe_ack(arrived);
        let f = frame::encode(
            kind::SEND_ACK,
            &protocol::SendAck {
                client_msg_id: ack.client_msg_id,
                msg_id: ack.msg_id,
                seq: ack.seq,
                ts_ms: ack.ts_ms,
                duplicate: ack.duplicate,
            },
        );
        self.push(Bytes::from(f));
    }

    pub fn on_rejected(&self, client_msg_id: u64, code: ErrorCode) {
        if self.answered(client_msg_id).is_some() {
            self.push(error_frame(code, kind::SEND, client_msg_id));
        }
    }

    /// Whether a send with `client_msg_id` is waiting for its answer.
    pub fn is_pending(&self, client_msg_id: u64) -> bool {
        self.pending.borrow().iter().any(|p| p.0 == client_msg_id)
    }

    /// Take a send off the in-flight list; returns when its bytes arrived. `None` for an answer
    /// that comes after the send was already answered with Timeout: the client has its answer,
    /// and must not get a second.
    fn answered(&self, client_msg_id: u64) -> Option<Instant> {
        let mut pending = self.pending.borrow_mut();
        let i = pending.iter().position(|&(c, _, _)| c == client_msg_id)?;
        let (_, arrived, _) = pending.remove(i).expect("found");
        drop(pending);
        self.large_answered(client_msg_id);
        self.release_inflight();
        Some(arrived)
    }

    /// Answer Timeout to every send in flight since before `now - timeout`.
    pub fn fail_overdue_sends(&self, now: Instant, timeout: Duration) {
        loop {
            let overdue = {
                let mut pending = self.pending.borrow_mut();
                match pending.front() {
                    Some(&(cmid, since, _)) if now.duration_since(since) >= timeout => {
                        pending.pop_front();
                        Some(cmid)
                    }
                    _ => None,
                }
            };
            let Some(cmid) = overdue else { break };
            self.push(error_frame(ErrorCode::Timeout, kind::SEND, cmid));
            self.release_inflight();
        }
    }

    /// A send was answered: if it was the large message in flight, its memory is free again.
    fn large_answered(&self, client_msg_id: u64) {
        let mut large = self.large.borrow_mut();
        if matches!(&*large, Some(Large::InFlight { id, .. }) if *id == client_msg_id) {
            *large = None;
        }
    }

    /// Drop an upload that had no part for `timeout`, with `Error{Timeout}` for its id.
    pub fn expire_upload(&self, now: Instant, timeout: Duration) {
        let mut large = self.large.borrow_mut();
        let id = match &*large {
            Some(Large::Uploading(u)) if now.duration_since(u.last_part) >= timeout => u.id,
            _ => return,
        };
        *large = None;
        drop(large);
        self.push(error_frame(ErrorCode::Timeout, kind::PART, id));
    }

    /// The session ends: its large messages' memory is free again.
    pub(crate) fn drop_large(&self) {
        self.large.borrow_mut().take();
        self.large_out.borrow_mut().clear();
        self.large_out_bytes.set(0);
    }

    fn release_inflight(&self) {
        let n = self.inflight.get();
        assert!(n > 0, "an answer without a send in flight");
        self.inflight.set(n - 1);
        if n == self.inflight_max {
            // The reader resumes: the idle clock starts again from here.
            self.last_rx.set(Instant::now());
            self.reader.notify();
        }
    }

    /// The user owner's answer to this session's login. Returns false when no login waits for
    /// it any more (it timed out): the runtime then undoes an attach that succeeded, so that no
    /// phantom session counts against the user's device limits.
    pub fn on_attach_result(&self, user: UserId, result: Result<(), ErrorCode>) -> bool {
        self.answer(Reply::Attach(result.map(|()| user)))
    }

    pub fn on_token_result(&self, result: Result<(), ErrorCode>) {
        self.answer(Reply::Token(result));
    }

    /// A group owner's answer to this session's group request (dropped if the request gave up
    /// waiting: it was answered with Timeout).
    /// The logged-in device's id and login time.
    pub fn device_info(&self) -> crate::envelope::DeviceInfo {
        self.device_info.borrow().clone()
    }

    pub fn on_group_reply(&self, request_kind: u16, result: Result<Bytes, ErrorCode>) {
        if request_kind == kind::TYPING || request_kind == kind::READ {
            // A typing notice or read receipt is not waited for: only its refusal comes back.
            if let Err(code) = result {
                self.push(error_frame(code, request_kind, 0));
            }
            return;
        }
        self.answer(Reply::Group(result));
    }

    fn answer(&self, r: Reply) -> bool {
        match self.reply.borrow_mut().take() {
            Some(tx) => tx.send(r).is_ok(),
            None => false,
        }
    }

    /// Stop waiting for an answer (its request timed out).
    pub(crate) fn forget_reply(&self) {
        self.reply.borrow_mut().take();
    }

    pub(crate) fn expect_reply(&self) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        *self.reply.borrow_mut() = Some(tx);
        rx
    }
}
