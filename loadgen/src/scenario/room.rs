//! room: live rooms (N:N, never stored; PROTOCOL.md 5.11, 7.2, 8.14). Connection c is in room
//! c % rooms. Each room's first connection (c = room) is its publisher: during setup it creates
//! the room (publish policy 0, creator only) and shares the id; every other connection of the
//! room waits for that id (outside the setup gate) and subscribes, all before it reports ready,
//! so every subscription is in place when the run starts.
//!
//! The publisher sends `RoomPublish` frames whose body starts with a [`BodyHeader`] (its
//! connection, its counter, the send time), `client_msg_id` being the ledger's id of that
//! counter; nothing answers a publish that goes through. Open loop (`--rate`): the publishers
//! share the rate, paced by the thread's [`Pacer`](crate::worker::Pacer). Closed loop
//! (`--window W`): a publisher keeps at most W messages in flight, a message being done once
//! the room's *probe* (its first live subscriber) has received it or been told it missed it;
//! the probe publishes that count in the room's [`RoomShared`] and wakes the publisher, across
//! threads. (In open loop the window, 4096 by default, caps the same count.)
//!
//! Every subscriber checks each `RoomMsg`: its room, that `seq` rises and that a gap is covered
//! by the `Missed` counts received before it ([`SeqCheck`]), and that the publisher's counters
//! come in order and once; it records the delivery latency. At the end, [`verdict`] checks
//! that each subscriber received or was reported missing every message its room's publisher
//! published (and that the server did not refuse).

use std::{
    cell::{Cell, RefCell},
    future::{poll_fn, Future},
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use tim::{
    client::{decode_event, Event},
    frame,
    protocol::{self, kind, missed, room_publish, ErrorCode, RoomStamp},
};

use super::{enter_run, set_up, Joined};
use crate::{
    cli::{Config, Load},
    global::{mix, LiveSet, Phase},
    ledger::{self, Bits, BodyHeader, ConnLedger, RecvLog, SendLog, Verdict, BODY_HEADER_BYTES},
    net::{FrameReader, Io},
    scenario::messaging::open_loop_due,
    session::{self, retryable, Fail},
    stats::{C, H},
    worker::{Notify, Worker},
};

/// How often a subscriber looks whether its room was created yet.
const ROOM_ID_POLL: Duration = Duration::from_millis(1);
/// Pause before RoomCreate is retried after Busy.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Ping interval when the server announces no idle timeout.
const PING_DEFAULT: Duration = Duration::from_secs(30);

/// The rooms of a run and what their connections share across threads.
pub struct Rooms {
    pub rooms: u32,
    shared: Vec<RoomShared>,
}

/// What one room's connections share.
#[derive(Default)]
pub struct RoomShared {
    /// The room's id once its publisher created it (0 before).
    id: AtomicU64,
    /// The publisher failed to set up or to create the room: its subscribers give up.
    failed: AtomicBool,
    /// Messages the probe subscriber has received or been told it missed.
    probe_done: AtomicU64,
    /// The publisher waits for `probe_done` to move (its window is full).
    waiting: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl RoomShared {
    /// The probe has accounted for `n` messages: wake the publisher if it waits.
    fn probe_progress(&self, n: u64) {
        self.probe_done.store(n, SeqCst);
        if self.waiting.swap(false, SeqCst) {
            if let Some(w) = self.waker.lock().expect("room waker lock").take() {
                w.wake();
            }
        }
    }

    /// Wait until `probe_done` is no longer `seen`.
    async fn probe_moved(&self, seen: u64) {
        poll_fn(|cx| {
            if self.probe_done.load(SeqCst) != seen {
                return Poll::Ready(());
            }
            *self.waker.lock().expect("room waker lock") = Some(cx.waker().clone());
            self.waiting.store(true, SeqCst);
            if self.probe_done.load(SeqCst) != seen {
                self.waiting.store(false, SeqCst);
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await
    }
}

impl Rooms {
    pub fn new(cfg: &Config) -> Rooms {
        Rooms { rooms: cfg.rooms, shared: (0..cfg.rooms).map(|_| RoomShared::default()).collect() }
    }

    #[inline]
    pub fn room_of(&self, conn: u32) -> u32 {
        conn % self.rooms
    }

    /// The publisher of a room: its first connection.
    #[inline]
    pub fn publisher_of(&self, room: u32) -> u32 {
        room
    }

    #[inline]
    pub fn is_publisher(&self, conn: u32) -> bool {
        conn < self.rooms
    }

    /// The live subscribers of `room`, ascending.
    pub fn subscribers<'a>(&self, live: &'a LiveSet, room: u32) -> impl Iterator<Item = u32> + 'a {
        (room + self.rooms..live.connections)
            .step_by(self.rooms as usize)
            .filter(|&c| live.conn_live[c as usize])
    }

    /// The room's probe: its first live subscriber, whose receipts bound the closed loop.
    pub fn probe_of(&self, live: &LiveSet, room: u32) -> Option<u32> {
        self.subscribers(live, room).next()
    }
}

/// A subscriber's check of a room's `seq`: it rises by one per message, and a gap must be
/// covered by `Missed` counts received before it (the server reports drops before the next
/// message it sends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqCheck {
    /// Highest seq received (0: none yet; a room's first message has seq 1).
    pub last: u64,
    /// Missed messages not yet matched by a gap.
    pub credit: u64,
}

/// What [`SeqCheck::message`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqOutcome {
    /// In order; `gap` messages skipped, all covered by `Missed`.
    InOrder { gap: u64 },
    /// In order, but `uncovered` of the skipped messages were not reported missed.
    Gap { uncovered: u64 },
    /// At or below a seq already received.
    OutOfOrder,
}

impl SeqCheck {
    pub fn missed(&mut self, count: u64) {
        self.credit += count;
    }

    pub fn message(&mut self, seq: u64) -> SeqOutcome {
        if seq <= self.last {
            return SeqOutcome::OutOfOrder;
        }
        let gap = seq - self.last - 1;
        self.last = seq;
        let covered = gap.min(self.credit);
        self.credit -= covered;
        if covered < gap {
            SeqOutcome::Gap { uncovered: gap - covered }
        } else {
            SeqOutcome::InOrder { gap }
        }
    }
}

/// One connection of a room.
struct RoomConn {
    w: Rc<Worker>,
    rooms: Arc<Rooms>,
    idx: u32,
    room: u32,
    room_id: u64,
    io: Io,
    wake: Rc<Notify>,
    dead: Cell<bool>,
    /// When the frames being handled were read (µs since base).
    rx_now: Cell<u64>,
    /// Publisher: counter of the next message.
    next: Cell<u64>,
    /// Publisher: counters the server refused.
    refused: RefCell<Vec<u64>>,
    /// Publisher: live subscribers, each owed every message.
    fanout: Cell<u64>,
    /// Subscriber: the publisher's counters received (keyed by sender connection).
    recv: RefCell<RecvLog>,
    seq: Cell<SeqCheck>,
    /// Subscriber: distinct messages received, and messages reported missed.
    received: Cell<u64>,
    missed: Cell<u64>,
    probe: Cell<bool>,
    /// Reused for every publish.
    msg: RefCell<protocol::RoomPublish>,
}

pub async fn run(w: &Rc<Worker>, idx: u32, rooms: Arc<Rooms>) {
    let room = rooms.room_of(idx);
    let publisher = rooms.is_publisher(idx);
    let shared = &rooms.shared[room as usize];
    let Some((io, mut rd, login)) = set_up(w, idx, true).await else {
        if publisher {
            shared.failed.store(true, SeqCst);
        }
        return;
    };
    let deadline = w.g.setup_deadline();
    let step = if publisher {
        create(w, &io, &mut rd, deadline).await.inspect(|&id| shared.id.store(id, SeqCst))
    } else {
        subscribe(w, &io, &mut rd, shared, deadline).await
    };
    let room_id = match step {
        Ok(id) => id,
        Err(e) => {
            if publisher {
                shared.failed.store(true, SeqCst);
            }
            w.stats.error(&e.name(if publisher { "room create" } else { "room subscribe" }));
            rd.release(w);
            io.shutdown();
            w.g.setup_failed();
            return;
        }
    };
    let Some(Joined { io, mut rd, login }) = enter_run(w, idx, io, rd, login).await else {
        return;
    };
    let ping_every = match login.map(|l| l.idle_timeout_ms) {
        Some(ms) if ms > 0 => Duration::from_millis(ms as u64 / 3).max(Duration::from_millis(1)),
        _ => PING_DEFAULT,
    };
    let body_bytes = w.g.cfg.body_bytes;
    let live = w.g.live();
    let c = Rc::new(RoomConn {
        w: w.clone(),
        idx,
        room,
        room_id,
        io,
        wake: Rc::new(Notify::default()),
        dead: Cell::new(false),
        rx_now: Cell::new(0),
        next: Cell::new(0),
        refused: RefCell::new(Vec::new()),
        fanout: Cell::new(rooms.subscribers(live, room).count() as u64),
        recv: RefCell::new(RecvLog::default()),
        seq: Cell::new(SeqCheck::default()),
        received: Cell::new(0),
        missed: Cell::new(0),
        probe: Cell::new(rooms.probe_of(live, room) == Some(idx)),
        msg: RefCell::new(protocol::RoomPublish { room_id, client_msg_id: 0, body: vec![b'.'; body_bytes] }),
        rooms,
    });
    w.watch_phase(&c.wake);
    w.stats.add(C::Connected, 1);
    let writer = if publisher {
        monoio::spawn(publish(c.clone(), ping_every))
    } else {
        monoio::spawn(keep_alive(c.clone(), ping_every))
    };
    read_loop(&c, &mut rd).await;
    if w.phase() < Phase::Stop {
        c.run_error("disconnected during the run");
    }
    c.dead.set(true);
    c.wake.notify();
    writer.await;
    rd.release(w);
    w.stats.sub(C::Connected, 1);
    w.leave_ledger(c.ledger());
}

/// Publisher: create the room (policy 0: only its creator publishes); its id. Busy is retried.
async fn create(w: &Worker, io: &Io, rd: &mut FrameReader, deadline: Instant) -> Result<u64, Fail> {
    loop {
        let req =
            protocol::RoomCreate { publish: room_publish::OWNER, subscribers_max: 0, publishers: Vec::new() };
        io.queue(kind::ROOM_CREATE, &req);
        io.flush().await?;
        let got = session::answer(w, io, rd, kind::ROOM_CREATE, deadline, |e| match e {
            Event::RoomOk(ok) if ok.request_kind == kind::ROOM_CREATE => Some(ok.room_id),
            _ => None,
        })
        .await;
        match got {
            Err(Fail::Refused(code)) if retryable(code) && Instant::now() < deadline => {
                w.stats.error(&Fail::Refused(code).name("room create"));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Subscriber: wait (outside the setup gate) for the room's publisher to create it, then
/// subscribe; the room id.
async fn subscribe(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    shared: &RoomShared,
    deadline: Instant,
) -> Result<u64, Fail> {
    let room_id = loop {
        match shared.id.load(SeqCst) {
            0 if shared.failed.load(SeqCst) => return Err(Fail::Closed),
            0 if Instant::now() >= deadline || w.phase() != Phase::Setup => return Err(Fail::Timeout),
            0 => monoio::time::sleep(ROOM_ID_POLL).await,
            id => break id,
        }
    };
    io.queue(kind::ROOM_SUBSCRIBE, &protocol::RoomRef { room_id });
    io.flush().await?;
    session::answer(w, io, rd, kind::ROOM_SUBSCRIBE, deadline, |e| match e {
        Event::RoomOk(ok) if ok.request_kind == kind::ROOM_SUBSCRIBE && ok.room_id == room_id => {
            Some(room_id)
        }
        _ => None,
    })
    .await
}

async fn read_loop(c: &RoomConn, rd: &mut FrameReader) {
    let mut new_batch = true;
    loop {
        match rd.next(&c.io, &c.w).await {
            Ok(Some((k, payload))) => {
                if new_batch {
                    c.rx_now.set(c.w.now_us());
                    new_batch = false;
                }
                c.handle(k, payload);
                if !rd.frame_ready() {
                    if c.probe.get() {
                        c.rooms.shared[c.room as usize].probe_progress(c.received.get() + c.missed.get());
                    }
                    new_batch = true;
                }
            }
            Ok(None) => return,
            Err(e) => {
                if !c.io.is_closed() {
                    c.run_error(&format!("read: {:?}", e.kind()));
                }
                return;
            }
        }
    }
}

impl RoomConn {
    /// Count an error of the run (any fails it).
    fn run_error(&self, what: &str) {
        self.w.stats.error(what);
        self.w.stats.add(C::RunErrors, 1);
    }

    fn handle(&self, k: u16, payload: &[u8]) {
        if k == kind::ROOM_MSG {
            return self.on_room_msg(payload);
        }
        match decode_event(k, payload) {
            Ok(Event::Missed(m)) if m.source == missed::ROOM && m.id == self.room_id => {
                let mut s = self.seq.get();
                s.missed(m.count);
                self.seq.set(s);
                self.missed.set(self.missed.get() + m.count);
                self.w.stats.add(C::Missed, m.count);
            }
            Ok(Event::Error(e)) if e.request_kind == kind::ROOM_PUBLISH => {
                self.on_refused(e.client_msg_id, e.code)
            }
            Ok(Event::Error(e)) => {
                self.w.stats.server_error(e.code, e.request_kind);
                self.w.stats.add(C::RunErrors, 1);
            }
            Ok(Event::Kick(k)) => {
                let name =
                    ErrorCode::from_u16(k.reason).map_or_else(|| "Unknown".into(), |c| format!("{c:?}"));
                self.run_error(&format!("kicked: {name}({})", k.reason));
            }
            Ok(Event::RoomClosed(r)) => self.run_error(&format!("room closed (reason {})", r.reason)),
            Ok(Event::Pong(_) | Event::CatchUpEnd(_)) => {}
            // 1:1 messages of earlier runs to these users (a durable server's catch-up).
            Ok(Event::Deliver(_)) => self.w.stats.add(C::Foreign, 1),
            _ => self.run_error(&format!("unexpected frame: {}", kind::name(k))),
        }
    }

    fn on_room_msg(&self, payload: &[u8]) {
        let stats = &self.w.stats;
        let (Some(stamp), Ok(p)) = (
            RoomStamp::read(payload),
            frame::access::<protocol::ArchivedRoomPublish>(payload.get(RoomStamp::BYTES..).unwrap_or(&[])),
        ) else {
            return self.run_error("malformed RoomMsg");
        };
        if stamp.room_id != self.room_id || p.room_id.to_native() != self.room_id {
            return self.run_error("RoomMsg of another room");
        }
        let Some(h) = BodyHeader::read(p.body.as_slice()).filter(|h| h.run_id == self.w.g.run_id) else {
            stats.add(C::Foreign, 1);
            return;
        };
        if p.client_msg_id.to_native() != ledger::client_msg_id(self.w.g.run_id, h.conn, h.counter) {
            self.run_error("RoomMsg: client_msg_id does not match the body");
        }
        let mut seq = self.seq.get();
        match seq.message(stamp.seq) {
            SeqOutcome::InOrder { .. } => {}
            SeqOutcome::Gap { .. } => self.run_error("RoomMsg: seq gap not covered by Missed"),
            SeqOutcome::OutOfOrder => stats.add(C::OutOfOrder, 1),
        }
        self.seq.set(seq);
        let r = self.recv.borrow_mut().record(h.conn, h.counter, h.flags, None);
        if r.duplicate {
            stats.add(C::Duplicated, 1);
            return;
        }
        if r.out_of_order {
            stats.add(C::OutOfOrder, 1);
        }
        self.received.set(self.received.get() + 1);
        stats.add(C::Delivered, 1);
        stats.record(H::Deliver, self.rx_now.get().saturating_sub(h.sent_us));
    }

    /// Publisher: the server refused a publish (it reaches nobody).
    fn on_refused(&self, client_msg_id: u64, code: u16) {
        self.w.stats.server_error(code, kind::ROOM_PUBLISH);
        self.w.stats.add(C::RunErrors, 1);
        if let Some((conn, counter)) = ledger::split_client_msg_id(self.w.g.run_id, client_msg_id) {
            if conn == self.idx && counter < self.next.get() {
                self.refused.borrow_mut().push(counter);
                self.w.stats.sub(C::Expected, self.fanout.get());
                self.wake.notify();
            }
        }
    }

    /// Publisher: queue the next message, stamped as sent at `sent_us`.
    fn publish_one(&self, sent_us: u64) {
        let g = &self.w.g;
        let counter = self.next.get();
        self.next.set(counter + 1);
        let mut msg = self.msg.borrow_mut();
        msg.client_msg_id = ledger::client_msg_id(g.run_id, self.idx, counter);
        BodyHeader { run_id: g.run_id, conn: self.idx, flags: 0, counter, sent_us }
            .write(&mut msg.body[..BODY_HEADER_BYTES]);
        frame::encode_into(kind::ROOM_PUBLISH, &*msg, &mut self.io.out());
        self.w.stats.add(C::Sent, 1);
        self.w.stats.add(C::Expected, self.fanout.get());
    }

    /// Publisher: messages the probe has not accounted for yet.
    fn inflight(&self) -> u64 {
        let done = self.rooms.shared[self.room as usize].probe_done.load(SeqCst);
        (self.next.get() - self.refused.borrow().len() as u64).saturating_sub(done)
    }

    /// What this connection leaves for the merge: a publisher its accepted counters, a
    /// subscriber what it received and how many it was told it missed.
    fn ledger(&self) -> ConnLedger {
        let mut send = SendLog::default();
        if self.rooms.is_publisher(self.idx) {
            let refused = self.refused.borrow();
            for n in (0..self.next.get()).filter(|n| !refused.contains(n)) {
                send.acked.set(n);
            }
            send.abandoned = refused.len() as u64;
        }
        let mut l = ConnLedger::new(self.idx, send, std::mem::take(&mut *self.recv.borrow_mut()));
        l.missed = self.missed.get();
        l
    }
}

/// Publisher: publish until the run phase ends (paced or windowed, see the module), pinging
/// when nothing was written for a while; then shut the socket down.
async fn publish(c: Rc<RoomConn>, ping_every: Duration) {
    let g = c.w.g.clone();
    let live = g.live();
    let shared = &c.rooms.shared[c.room as usize];
    let publishers = (0..c.rooms.rooms).filter(|&r| live.conn_live[c.rooms.publisher_of(r) as usize]).count();
    let has_subscribers = c.fanout.get() > 0;
    let run_start = g.run_start_us();
    let (interval_us, offset_us, window) = match g.cfg.load {
        Load::Open { rate, cap } => {
            let interval = 1e6 / (rate / publishers.max(1) as f64);
            let jitter = (mix(g.run_id as u64 ^ c.idx as u64) % 1_000_000) as f64 / 1e6;
            (interval, interval * jitter, cap as u64)
        }
        Load::Closed { window } => (0.0, 0.0, window as u64),
    };
    let ping_us = ping_every.as_micros().max(1) as u64;
    let mut last_write = c.w.now_us();
    let mut issued: u64 = 0;
    let pacer_slot = c.w.pacer.register(&c.wake);
    loop {
        let phase = c.w.phase();
        if phase >= Phase::Stop || c.dead.get() {
            break;
        }
        let now = c.w.now_us();
        let mut next_wake = None;
        let mut window_full = false;
        if phase == Phase::Run && has_subscribers {
            match g.cfg.load {
                Load::Closed { .. } => {
                    while c.inflight() < window {
                        c.publish_one(now);
                    }
                }
                Load::Open { .. } => {
                    let due_at = |k: u64| open_loop_due(run_start, offset_us, interval_us, k);
                    while due_at(issued) <= now && c.inflight() < window {
                        c.publish_one(due_at(issued));
                        c.w.stats.record(H::Lag, now - due_at(issued));
                        issued += 1;
                    }
                    if due_at(issued) > now {
                        next_wake = Some(due_at(issued));
                    }
                }
            }
            window_full = c.inflight() >= window;
        }
        if !c.io.has_output() && now >= last_write + ping_us {
            c.io.queue(kind::PING, &protocol::Ping { nonce: 0 });
        }
        if c.io.has_output() {
            if let Err(e) = c.io.flush().await {
                if !c.io.is_closed() {
                    c.run_error(&format!("write: {:?}", e.kind()));
                }
                break;
            }
            last_write = c.w.now_us();
            if next_wake.is_some_and(|t| t <= last_write) {
                continue;
            }
        }
        let t = next_wake.map_or(last_write + ping_us, |t| t.min(last_write + ping_us));
        c.w.pacer.wake_at(pacer_slot, t);
        if window_full {
            let seen = shared.probe_done.load(SeqCst);
            if c.inflight() >= window {
                either(c.wake.wait(), shared.probe_moved(seen)).await;
            }
        } else {
            c.wake.wait().await;
        }
    }
    c.io.shutdown();
}

/// Wait for whichever of two futures is ready first.
async fn either(a: impl Future<Output = ()>, b: impl Future<Output = ()>) {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Subscriber: ping often enough for the server's idle timeout (a subscriber sends nothing
/// else) until the run stops; then shut the socket down.
async fn keep_alive(c: Rc<RoomConn>, every: Duration) {
    loop {
        if c.w.phase() >= Phase::Stop || c.dead.get() {
            break;
        }
        if monoio::time::timeout(every, c.wake.wait()).await.is_err() {
            c.io.queue(kind::PING, &protocol::Ping { nonce: 0 });
            if let Err(e) = c.io.flush().await {
                if !c.io.is_closed() {
                    c.run_error(&format!("write: {:?}", e.kind()));
                }
                break;
            }
        }
    }
    c.io.shutdown();
}

/// The verdict of a room run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoomVerdict {
    /// `acked`: messages published and not refused; `expected`: those × the room's live
    /// subscribers; `delivered`: of those, received; `lost`: neither received nor reported
    /// missed; `misrouted`: received from another room's publisher; `abandoned`: refused.
    pub v: Verdict,
    /// Reported missed (`Missed`) over all subscribers.
    pub missed: u64,
    /// Received or reported missed beyond what was published (counts the server over-reported).
    pub over: u64,
}

/// Check every live subscriber against its room's publisher: each message the publisher got
/// through was either received or counted in a `Missed`.
pub fn verdict(rooms: &Rooms, live: &LiveSet, ledgers: &[ConnLedger]) -> RoomVerdict {
    let mut by_conn: Vec<Option<&ConnLedger>> = vec![None; live.connections as usize];
    for l in ledgers {
        if let Some(slot) = by_conn.get_mut(l.conn as usize) {
            *slot = Some(l);
        }
    }
    let empty = Bits::default();
    let mut out = RoomVerdict::default();
    for room in 0..rooms.rooms {
        let p = rooms.publisher_of(room);
        let published = by_conn[p as usize].map_or(&empty, |l| &l.acked);
        if let Some(l) = by_conn[p as usize] {
            out.v.acked += published.count();
            out.v.abandoned += l.abandoned;
        }
        for s in rooms.subscribers(live, room) {
            let owed = published.count();
            out.v.expected += owed;
            let Some(l) = by_conn[s as usize] else {
                out.v.lost += owed;
                continue;
            };
            let (got, unpublished) = l.received.get(&p).map_or((0, 0), |b| b.overlap(published));
            out.v.delivered += got;
            out.v.delivered_unacked += unpublished;
            out.v.misrouted +=
                l.received.iter().filter(|(&from, _)| from != p).map(|(_, b)| b.count()).sum::<u64>();
            out.missed += l.missed;
            let accounted = got + l.missed;
            if accounted < owed {
                out.v.lost += owed - accounted;
            } else {
                out.over += accounted - owed;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaps are fine when `Missed` reported them first; a regression is out of order.
    #[test]
    fn seq_check() {
        let mut s = SeqCheck::default();
        assert_eq!(s.message(1), SeqOutcome::InOrder { gap: 0 });
        assert_eq!(s.message(2), SeqOutcome::InOrder { gap: 0 });
        s.missed(3);
        assert_eq!(s.message(6), SeqOutcome::InOrder { gap: 3 });
        assert_eq!(s.credit, 0);
        assert_eq!(s.message(8), SeqOutcome::Gap { uncovered: 1 });
        assert_eq!(s.message(8), SeqOutcome::OutOfOrder);
        assert_eq!(s.message(3), SeqOutcome::OutOfOrder);
        s.missed(1);
        assert_eq!(s.message(9), SeqOutcome::InOrder { gap: 0 });
        assert_eq!(s.credit, 1, "unused credit is kept");
    }

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

    /// Two rooms over 7 connections: room 0 = {0 publisher, 2, 4, 6}, room 1 = {1 publisher,
    /// 3, 5}; connection 4 is not live (and the probe of room 0 is 2).
    #[test]
    fn membership() {
        let rooms = Rooms { rooms: 2, shared: Vec::new() };
        let l = live(7, &[4]);
        assert_eq!(rooms.subscribers(&l, 0).collect::<Vec<_>>(), [2, 6]);
        assert_eq!(rooms.subscribers(&l, 1).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(rooms.probe_of(&l, 0), Some(2));
        assert!(rooms.is_publisher(1) && !rooms.is_publisher(2));
        assert_eq!(rooms.room_of(5), 1);
    }

    /// The publisher's counters 0..10, one refused; one subscriber gets all, one gets 6 and is
    /// told of 3 missed, one gets 5 and is told of 2 (2 unaccounted).
    #[test]
    fn verdict_accounts_for_missed() {
        let rooms = Rooms { rooms: 1, shared: Vec::new() };
        let l = live(4, &[]);
        let mut send = SendLog::default();
        for n in (0..10).filter(|&n| n != 4) {
            send.acked.set(n);
        }
        send.abandoned = 1;
        let sub = |got: &[u64], missed: u64, conn: u32| {
            let mut r = RecvLog::default();
            for &n in got {
                r.record(0, n, 0, None);
            }
            let mut cl = ConnLedger::new(conn, SendLog::default(), r);
            cl.missed = missed;
            cl
        };
        let ledgers = vec![
            ConnLedger::new(0, send, RecvLog::default()),
            sub(&[0, 1, 2, 3, 5, 6, 7, 8, 9], 0, 1),
            sub(&[0, 1, 2, 7, 8, 9], 3, 2),
            sub(&[0, 1, 2, 8, 9], 2, 3),
        ];
        let v = verdict(&rooms, &l, &ledgers);
        assert_eq!((v.v.acked, v.v.abandoned, v.v.expected), (9, 1, 27));
        assert_eq!((v.v.delivered, v.missed, v.v.lost, v.over), (20, 5, 2, 0));
        assert_eq!(v.v.misrouted, 0);
    }

    /// A publish body carries the ledger header at its start, whatever the padding.
    #[test]
    fn publish_body_round_trip() {
        let h = BodyHeader { run_id: 0xabcd, conn: 3, flags: 0, counter: 41, sent_us: 1_234_567 };
        let mut p = protocol::RoomPublish { room_id: 9, client_msg_id: 0, body: vec![b'.'; 64] };
        p.client_msg_id = ledger::client_msg_id(h.run_id, h.conn, h.counter);
        h.write(&mut p.body[..BODY_HEADER_BYTES]);
        let bytes = frame::encode(kind::ROOM_PUBLISH, &p);
        // As the server forwards it: the room stamp, then the publish archive verbatim.
        let mut payload = vec![0u8; RoomStamp::BYTES];
        RoomStamp { room_id: 9, seq: 1, ts_ms: 0, from: 7 }.write(&mut payload);
        payload.extend_from_slice(&bytes[frame::HEADER_BYTES..]);
        let m = tim::client::room_message(&payload).unwrap();
        assert_eq!(m.body.len(), 64);
        assert_eq!(BodyHeader::read(&m.body), Some(h));
        assert_eq!(ledger::split_client_msg_id(h.run_id, m.client_msg_id), Some((3, 41)));
    }
}
