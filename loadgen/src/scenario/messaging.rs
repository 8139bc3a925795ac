//! The message engine shared by one-to-one, echo and group: per connection a writer task that
//! issues sends (closed loop: keep `window` unacknowledged; open loop: paced to the connection's
//! share of `--rate`), resends refused ones and pings a connection that has written nothing for
//! a while, and the connection's own task that reads acks, refusals and deliveries and keeps the
//! connection's side of the ledger.
//!
//! A scenario supplies a [`Plan`]: the conversation kind, which connections send, the recipient
//! of each message, the connections it is owed to, and how to read incoming frames
//! ([`Incoming`]).
//!
//! With `--reconnect` a connection outlives its socket: when the socket fails or the server
//! closes it during the run, the connection's task ([`reconnect`]) waits a jittered backoff,
//! connects to the next server address, logs in again as the same user and device, and the
//! connection goes on with its ledger: every message in flight is resent with its client
//! message id ([`SendLog::resend_all`]), and the receiving side starts a new life
//! ([`RecvLog::new_life`]) so that what the catch-up brings again counts as redelivered. While
//! it is down the writer sends nothing (open loop: the sends that fall due are skipped and
//! counted).
//!
//! [`SendLog::resend_all`]: crate::ledger::SendLog::resend_all
//! [`RecvLog::new_life`]: crate::ledger::RecvLog::new_life

use std::{
    cell::{Cell, RefCell},
    future::{poll_fn, Future},
    pin::pin,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    task::Poll,
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use tim::{
    client::{decode_event, Event},
    frame,
    protocol::{self, conv, kind, ErrorCode, LoginOk, Stamp},
};

use super::{join_run, Joined};
use crate::{
    cli::Load,
    global::{mix, LiveSet, Phase},
    ledger::{self, BodyHeader, ConnLedger, Inflight, RecvLog, SendLog, BODY_HEADER_BYTES, FLAG_RESENT},
    net::{FrameReader, Io},
    session::{self, retryable, Fail},
    stats::{C, H},
    worker::{Notify, Worker},
};

/// An incoming frame as the engine sees it.
pub enum Incoming<'a> {
    /// The server accepted one of our messages.
    Ack {
        client_msg_id: u64,
        duplicate: bool,
        seq: u64,
    },
    /// A message delivered to this connection.
    Deliver {
        stamp: Option<Stamp>,
        body: &'a [u8],
    },
    /// A group notice (stamp `from` 0): no message of the run, but it holds a seq of its
    /// group's sequence.
    Notice {
        stamp: Stamp,
    },
    /// Our own frame came back (echo server): acknowledged and delivered in one.
    Echo {
        client_msg_id: u64,
        body: &'a [u8],
    },
    /// The server refused one of our messages.
    Refused {
        client_msg_id: u64,
        code: u16,
    },
    /// Any other `Error` frame.
    Error {
        code: u16,
        request_kind: u16,
    },
    Kick {
        reason: u16,
    },
    /// A durable server finished replaying stored messages after login.
    CatchUpEnd,
    Resync,
    /// The answer to one of our presence changes (`PresenceList`).
    PresenceAnswer,
    /// A friend's (or this user's other session's) presence change; `ours`: one of the run's
    /// (its status text starts with [`PRESENCE_TEXT`]), else a login's or a new friend's.
    PresenceNotice {
        ours: bool,
    },
    TypingNotice,
    /// Frames the engine ignores (Pong, …).
    Ignore,
    /// A kind the scenario does not expect, or a payload that fails validation.
    Unexpected(u16),
}

/// What a message scenario decides.
pub trait Plan: Send + Sync + 'static {
    /// Whether connections log in before sending (false for an echo server).
    fn logs_in(&self) -> bool {
        true
    }

    /// The conversation kind of the messages (`Send.conv`) and of the delivery acks.
    fn conv(&self) -> u8 {
        conv::DIRECT
    }

    /// Whether connection `conn` sends messages (the others only receive).
    fn sends(&self, _conn: u32) -> bool {
        true
    }

    /// Live connections that send: open loop, they share `--rate`.
    fn senders(&self, live: &LiveSet) -> u32 {
        live.live_count()
    }

    /// The recipient (`Send.to`) of message `counter` of connection `conn`; `None` when the
    /// connection has nobody to write to.
    fn to(&self, live: &LiveSet, conn: u32, counter: u64) -> Option<u64>;

    /// Push the connections message `counter` of `conn` is owed to, once acknowledged.
    fn receivers(&self, live: &LiveSet, conn: u32, counter: u64, out: &mut Vec<u32>);

    /// How many connections that message is owed to.
    fn fanout(&self, live: &LiveSet, conn: u32, counter: u64) -> u64 {
        let mut v = Vec::new();
        self.receivers(live, conn, counter, &mut v);
        v.len() as u64
    }

    /// Whether receivers acknowledge deliveries (`DeliveryAck`, per conversation, once per read
    /// batch), as real clients do so that a durable server does not replay them at next login.
    fn delivery_acks(&self) -> bool {
        true
    }

    /// Read an incoming frame.
    fn classify<'a>(&self, k: u16, payload: &'a [u8]) -> Incoming<'a> {
        classify_im(k, payload)
    }

    /// The shares of a connection's operations that are presence changes and typing notices
    /// (the rest are messages); one-to-one only.
    fn side_shares(&self) -> (f64, f64) {
        (0.0, 0.0)
    }

    /// How many sessions a presence change of connection `conn` is owed to (its user's friends'
    /// live connections and its user's other ones).
    fn presence_fanout(&self, _live: &LiveSet, _conn: u32) -> u64 {
        0
    }

    /// The one-to-one plan, for its setup steps.
    fn as_one_to_one(&self) -> Option<&super::one_to_one::OneToOne> {
        None
    }
}

/// The status text of the run's presence changes starts with this (so that their notices are
/// told from those of logins and new friendships).
pub const PRESENCE_TEXT: &str = "lg-churn";

/// How a tim server's frames read: deliveries in place (stamp + the sender's `Send` archive;
/// a group notice by its stamp alone), everything else through `tim::client::decode_event`.
pub fn classify_im(k: u16, payload: &[u8]) -> Incoming<'_> {
    if k == kind::DELIVER {
        let Some(stamp) = Stamp::read(payload) else {
            return Incoming::Unexpected(k);
        };
        return match frame::access::<protocol::ArchivedSend>(&payload[Stamp::BYTES..]) {
            Ok(_) if stamp.from == 0 && stamp.conv == conv::GROUP => Incoming::Notice { stamp },
            Ok(send) => Incoming::Deliver { stamp: Some(stamp), body: send.body.as_slice() },
            Err(_) => Incoming::Unexpected(k),
        };
    }
    match decode_event(k, payload) {
        Ok(Event::SendAck(a)) => {
            Incoming::Ack { client_msg_id: a.client_msg_id, duplicate: a.duplicate, seq: a.seq }
        }
        Ok(Event::Error(e)) if e.request_kind == kind::SEND && e.client_msg_id != 0 => {
            Incoming::Refused { client_msg_id: e.client_msg_id, code: e.code }
        }
        Ok(Event::Error(e)) => Incoming::Error { code: e.code, request_kind: e.request_kind },
        Ok(Event::Kick(k)) => Incoming::Kick { reason: k.reason },
        Ok(Event::CatchUpEnd(_)) => Incoming::CatchUpEnd,
        Ok(Event::Resync) => Incoming::Resync,
        Ok(Event::PresenceList(_)) => Incoming::PresenceAnswer,
        Ok(Event::PresenceNotice(p)) => Incoming::PresenceNotice { ours: p.text.starts_with(PRESENCE_TEXT) },
        Ok(Event::TypingNotice(_)) => Incoming::TypingNotice,
        Ok(_) => Incoming::Ignore,
        Err(_) => Incoming::Unexpected(k),
    }
}

/// One connection of a message scenario.
struct Conn {
    w: Rc<Worker>,
    plan: Arc<dyn Plan>,
    idx: u32,
    /// The current socket (a reconnect replaces it).
    io: RefCell<Rc<Io>>,
    /// Logged in on `io` and usable: false from a failure until a reconnect has logged in.
    up: Cell<bool>,
    wake: Rc<Notify>,
    send: RefCell<SendLog>,
    recv: RefCell<RecvLog>,
    /// Reused for every send (its body buffer keeps its allocation).
    msg: RefCell<protocol::Send>,
    dead: Cell<bool>,
    no_recipient: Cell<bool>,
    /// This connection's user id (0 without login).
    user_id: u64,
    /// `Send.conv` of this connection's messages, and the kind of the conversations it acks.
    conv: u8,
    /// Whether this connection sends (else it only receives, and pings).
    sends: bool,
    /// Ping when nothing was written for this long (µs).
    ping_us: u64,
    /// Highest seq received per conversation peer (a user, or a group), not yet acknowledged
    /// to the server.
    /// Per conversation (by peer, or group): what this connection holds of its sequence, for
    /// its delivery acks.
    pending_acks: RefCell<FxHashMap<u64, SeqTrack>>,
    send_delivery_acks: bool,
    /// Duplicates received before this connection's first CatchUpEnd (if one comes).
    dup_before_catch_up: Cell<u64>,
    /// A CatchUpEnd came: the server is durable and sends a catch-up after every login.
    caught_up: Cell<bool>,
    /// When the frames being handled were read (µs since base; one clock read per batch).
    rx_now: Cell<u64>,
    /// Deliveries received twice, and out of order (for a per-group breakdown).
    duplicated: Cell<u64>,
    out_of_order: Cell<u64>,
    /// Reconnects: deliveries received again in a later life, logins again, time down (µs:
    /// in all, the longest outage), and whether the connection gave up.
    redelivered: Cell<u64>,
    reconnects: Cell<u64>,
    down_us: Cell<u64>,
    down_max_us: Cell<u64>,
    gave_up: Cell<bool>,
    /// Shares of operations that are presence changes and typing notices; operations issued
    /// (all kinds), this connection's place in the low-discrepancy sequence that picks their
    /// kind, presence changes issued and not yet answered.
    presence_share: f64,
    typing_share: f64,
    ops: Cell<u64>,
    ops_offset: f64,
    presence_sets: Cell<u64>,
    presence_inflight: Cell<u32>,
}

/// Reconnect backoff: the first pause, and the most it doubles to (each pause is jittered
/// between half and all of it).
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest one reconnect attempt (connect and login) may take.
const RECONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(10);

/// Ping interval when the server announces no idle timeout (or there is no login).
const PING_DEFAULT: Duration = Duration::from_secs(30);

pub async fn run(w: &Rc<Worker>, idx: u32, plan: Arc<dyn Plan>) {
    let Some(joined) = join_run(w, idx, plan.logs_in()).await else {
        return;
    };
    run_joined(w, idx, plan, joined, RecvLog::default(), false).await
}

/// Run a connection that has joined the run (a scenario with setup steps of its own calls this
/// after them); `recv` is its ledger so far (seqs it saw during setup), `caught_up` whether
/// those steps read the login's `CatchUpEnd`.
pub async fn run_joined(
    w: &Rc<Worker>,
    idx: u32,
    plan: Arc<dyn Plan>,
    joined: Joined,
    recv: RecvLog,
    caught_up: bool,
) {
    let Joined { io, rd, login } = joined;
    if let (Some(ok), Load::Closed { window }) = (&login, w.g.cfg.load) {
        if idx == 0 && window > ok.inflight_max {
            eprintln!(
                "tim-loadgen: warning: --window {window} is over the server's in-flight limit {} \
                 (it stops reading a session at that count)",
                ok.inflight_max
            );
        }
    }
    let send_delivery_acks = plan.delivery_acks() && w.g.cfg.delivery_acks;
    let body_bytes = w.g.cfg.body_bytes;
    let ping_every = match login.as_ref().map(|l| l.idle_timeout_ms) {
        Some(ms) if ms > 0 => Duration::from_millis(ms as u64 / 3).max(Duration::from_millis(1)),
        _ => PING_DEFAULT,
    };
    let conv = plan.conv();
    let (presence_share, typing_share) = plan.side_shares();
    let c = Rc::new(Conn {
        w: w.clone(),
        idx,
        io: RefCell::new(Rc::new(io)),
        up: Cell::new(true),
        wake: Rc::new(Notify::default()),
        send: RefCell::new(SendLog::default()),
        recv: RefCell::new(recv),
        msg: RefCell::new(protocol::Send {
            conv,
            flags: 0,
            burn_secs: 0,
            to: 0,
            client_msg_id: 0,
            body: vec![b'.'; body_bytes],
        }),
        dead: Cell::new(false),
        no_recipient: Cell::new(false),
        user_id: login.map_or(0, |l| l.user_id),
        conv,
        sends: plan.sends(idx),
        ping_us: ping_every.as_micros() as u64,
        plan,
        pending_acks: RefCell::new(FxHashMap::default()),
        send_delivery_acks,
        dup_before_catch_up: Cell::new(0),
        caught_up: Cell::new(caught_up),
        rx_now: Cell::new(0),
        duplicated: Cell::new(0),
        out_of_order: Cell::new(0),
        redelivered: Cell::new(0),
        reconnects: Cell::new(0),
        down_us: Cell::new(0),
        down_max_us: Cell::new(0),
        gave_up: Cell::new(false),
        presence_share,
        typing_share,
        ops: Cell::new(0),
        ops_offset: (mix(0x0b5_5eed ^ idx as u64) >> 11) as f64 / (1u64 << 53) as f64,
        presence_sets: Cell::new(0),
        presence_inflight: Cell::new(0),
    });
    w.watch_phase(&c.wake);
    w.stats.add(C::Connected, 1);
    let writer = monoio::spawn(writer(c.clone()));
    let mut rd = rd;
    let mut connected = true;
    loop {
        read_loop(&c, &mut rd).await;
        rd.release(w);
        if w.phase() >= Phase::Stop {
            break;
        }
        // The socket failed or the server closed it.
        c.up.set(false);
        c.io.borrow().shutdown();
        w.stats.sub(C::Connected, 1);
        connected = false;
        if !w.g.cfg.reconnect {
            w.stats.error("disconnected during the run");
            break;
        }
        let down_at = Instant::now();
        w.stats.add(C::Down, 1);
        let back = reconnect(&c).await;
        w.stats.sub(C::Down, 1);
        c.note_down(down_at.elapsed());
        let Some(new_rd) = back else { break };
        rd = new_rd;
        w.stats.add(C::Connected, 1);
        connected = true;
        c.up.set(true);
        c.wake.notify();
    }
    c.dead.set(true);
    c.wake.notify();
    writer.await;
    rd.release(w);
    if connected {
        w.stats.sub(C::Connected, 1);
    }
    let send = std::mem::take(&mut *c.send.borrow_mut());
    w.stats.sub(C::Inflight, send.inflight.len() as u64);
    w.stats.sub(C::PresenceInflight, c.presence_inflight.replace(0) as u64);
    let recv = std::mem::take(&mut *c.recv.borrow_mut());
    let mut l = ConnLedger::new(idx, send, recv);
    (l.duplicated, l.out_of_order) = (c.duplicated.get(), c.out_of_order.get());
    (l.redelivered, l.reconnects) = (c.redelivered.get(), c.reconnects.get());
    (l.down_us, l.down_max_us, l.gave_up) = (c.down_us.get(), c.down_max_us.get(), c.gave_up.get());
    l.down_at_end = !connected;
    w.leave_ledger(l);
}

/// Get a failed connection back: pause (jittered, doubling), connect to the next address of
/// the list, log in again as the same user and device; repeat until that works, the run stops
/// (`None`) or every attempt failed for `--reconnect-give-up` (`None`, the connection gave
/// up). On success the new socket is the connection's and its ledger is ready for the new
/// life: the messages in flight queued for resending, the receiving side in a new life.
async fn reconnect(c: &Conn) -> Option<FrameReader> {
    let w = &c.w;
    let cfg = &w.g.cfg;
    let give_up_at = Instant::now() + cfg.reconnect_give_up;
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut addr = c.io.borrow().addr_index;
    for attempt in 0u64.. {
        let seed = mix(((w.g.run_id as u64) << 32) ^ ((c.idx as u64) << 12) ^ attempt ^ w.now_us());
        let pause = jittered(backoff, seed);
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        until_stop(w, monoio::time::sleep(pause)).await?;
        if Instant::now() >= give_up_at {
            c.gave_up.set(true);
            w.stats.add(C::ReconnectGaveUp, 1);
            w.stats.error("reconnect: gave up (no address let it log in again in time)");
            return None;
        }
        addr = (addr + 1) % cfg.addrs.len();
        let deadline = give_up_at.min(Instant::now() + RECONNECT_ATTEMPT_MAX);
        match until_stop(w, log_in_at(c, addr, attempt, deadline)).await? {
            Ok((io, rd, login)) => {
                c.resume(io, login.as_ref());
                return Some(rd);
            }
            Err(e) => w.stats.error(&e.name("reconnect")),
        }
    }
    None
}

/// One reconnect attempt: connect to address `addr`, log in (if the plan does).
async fn log_in_at(
    c: &Conn,
    addr: usize,
    attempt: u64,
    deadline: Instant,
) -> Result<(Io, FrameReader, Option<LoginOk>), Fail> {
    let w = &c.w;
    let timeout = w.g.cfg.connect_timeout.min(deadline.saturating_duration_since(Instant::now()));
    let io = session::connect_to(w, c.idx, addr, attempt, timeout.max(Duration::from_millis(1))).await?;
    let mut rd = FrameReader::default();
    if !c.plan.logs_in() {
        return Ok((io, rd, None));
    }
    match session::log_in_again(w, &io, &mut rd, c.idx, deadline).await {
        Ok(ok) => Ok((io, rd, Some(ok))),
        Err(e) => {
            rd.release(w);
            io.shutdown();
            Err(e)
        }
    }
}

/// Between half and all of `backoff`, picked by `seed`.
fn jittered(backoff: Duration, seed: u64) -> Duration {
    let us = backoff.as_micros() as u64;
    Duration::from_micros(us / 2 + seed % (us / 2 + 1))
}

/// Run `f` unless the run stops first (`None`).
async fn until_stop<F: Future>(w: &Worker, f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut stop = pin!(w.wait_past(Phase::Drain));
    poll_fn(|cx| {
        if let Poll::Ready(r) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

async fn read_loop(c: &Conn, rd: &mut FrameReader) {
    let io = c.io.borrow().clone();
    let mut new_batch = true;
    loop {
        match rd.next(&io, &c.w).await {
            Ok(Some((k, payload))) => {
                if new_batch {
                    c.rx_now.set(c.w.now_us());
                    new_batch = false;
                }
                c.handle(k, payload);
                if !rd.frame_ready() {
                    c.ack_deliveries();
                    new_batch = true;
                }
            }
            Ok(None) => return,
            Err(e) => {
                if !io.is_closed() {
                    c.w.stats.error(&format!("read: {:?}", e.kind()));
                }
                return;
            }
        }
    }
}

impl Conn {
    /// A reconnect logged in on `io`: make it the connection's socket and start the ledger's
    /// new life. The caller marks the connection up.
    fn resume(&self, io: Io, login: Option<&LoginOk>) {
        let w = &self.w;
        if login.is_some_and(|ok| ok.user_id != self.user_id) {
            w.stats.error("reconnect: logged in with another user id");
        }
        if let Some(a) = w.g.per_addr.get(io.addr_index) {
            a.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        *self.io.borrow_mut() = Rc::new(io);
        // Catch-up deliveries of the new login come mixed with live ones: order checks wait
        // for its CatchUpEnd (only a durable server, which sent one at the first login, sends
        // a catch-up).
        self.recv.borrow_mut().new_life(self.caught_up.get());
        // Presence changes in flight on the old socket are not answered any more.
        w.stats.sub(C::PresenceInflight, self.presence_inflight.replace(0) as u64);
        let resent = self.send.borrow_mut().resend_all(w.now_us());
        w.stats.add(C::ResentAfterReconnect, resent);
        w.stats.add(C::Reconnects, 1);
        self.reconnects.set(self.reconnects.get() + 1);
    }

    fn note_down(&self, d: Duration) {
        let us = d.as_micros() as u64;
        self.down_us.set(self.down_us.get() + us);
        self.down_max_us.set(self.down_max_us.get().max(us));
    }

    /// The writer could not write to `io`: shut it down (the reader sees the end and the
    /// connection's task takes over) and stop writing until the connection is up again.
    fn write_failed(&self, io: &Rc<Io>) {
        io.shutdown();
        if Rc::ptr_eq(&self.io.borrow(), io) {
            self.up.set(false);
        }
    }

    fn handle(&self, k: u16, payload: &[u8]) {
        match self.plan.classify(k, payload) {
            Incoming::Ack { client_msg_id, duplicate, seq } => self.on_ack(client_msg_id, duplicate, seq),
            Incoming::Deliver { stamp, body } => self.on_deliver(stamp.as_ref(), body),
            Incoming::Notice { stamp } => self.on_notice(&stamp),
            Incoming::Echo { client_msg_id, body } => {
                self.on_ack(client_msg_id, false, 0);
                self.on_deliver(None, body);
            }
            Incoming::Refused { client_msg_id, code } => self.on_refused(client_msg_id, code),
            Incoming::Error { code, request_kind } => {
                self.w.stats.server_error(code, request_kind);
                match request_kind {
                    kind::PRESENCE_SET => self.presence_done(false),
                    kind::TYPING => self.w.stats.add(C::TypingRefused, 1),
                    _ => {}
                }
            }
            Incoming::PresenceAnswer => self.presence_done(true),
            Incoming::PresenceNotice { ours: true } => self.w.stats.add(C::PresenceNotices, 1),
            Incoming::PresenceNotice { ours: false } => self.w.stats.add(C::PresenceOtherNotices, 1),
            Incoming::TypingNotice => self.w.stats.add(C::TypingNotices, 1),
            Incoming::Kick { reason } => {
                let name = ErrorCode::from_u16(reason).map_or_else(|| "Unknown".into(), |c| format!("{c:?}"));
                self.w.stats.error(&format!("kicked: {name}({reason})"));
            }
            // A cluster change may have lost live deliveries: a catch-up follows. What it
            // brings again counts as redelivered, and order checks wait for its end.
            Incoming::Resync => {
                self.recv.borrow_mut().new_life(true);
                self.w.stats.add(C::Resyncs, 1);
            }
            Incoming::CatchUpEnd => {
                self.recv.borrow_mut().caught_up();
                if !self.caught_up.replace(true) {
                    self.w.stats.add(C::DupInCatchUp, self.dup_before_catch_up.get());
                }
            }
            Incoming::Ignore => {}
            Incoming::Unexpected(k) => self.w.stats.error(&format!("unexpected frame: {}", kind::name(k))),
        }
    }

    fn on_ack(&self, client_msg_id: u64, duplicate: bool, seq: u64) {
        let stats = &self.w.stats;
        let Some((conn, counter)) =
            ledger::split_client_msg_id(self.w.g.run_id, client_msg_id).filter(|&(conn, _)| conn == self.idx)
        else {
            stats.error("ack of an unknown message");
            return;
        };
        debug_assert_eq!(conn, self.idx);
        let mut send = self.send.borrow_mut();
        let Some(m) = send.inflight.remove(&counter) else {
            stats.error("ack of a message not in flight");
            return;
        };
        if send.acked.set(counter) {
            stats.error("second ack of a message");
        }
        drop(send);
        match (duplicate, m.after_reconnect || m.resends > 0) {
            // A resend (after a reconnect, or after a refusal such as NodeUnavailable whose
            // message had been stored all the same) of a message the server had stored before.
            (true, true) => stats.add(C::AckedDuplicate, 1),
            (true, false) => stats.error("ack marked duplicate"),
            (false, _) => {}
        }
        if seq != 0 && self.send_delivery_acks {
            // This connection's own message holds its number of the conversation.
            self.pending_acks.borrow_mut().entry(m.to).or_default().hold(seq, self.rx_now.get());
        }
        stats.record(H::Ack, self.rx_now.get().saturating_sub(m.sent_us));
        stats.add(C::Acked, 1);
        stats.sub(C::Inflight, 1);
        stats.add(C::Expected, self.plan.fanout(self.w.g.live(), self.idx, counter));
        self.wake.notify();
    }

    fn on_refused(&self, client_msg_id: u64, code: u16) {
        let stats = &self.w.stats;
        stats.server_error(code, kind::SEND);
        let Some((_, counter)) =
            ledger::split_client_msg_id(self.w.g.run_id, client_msg_id).filter(|&(conn, _)| conn == self.idx)
        else {
            return;
        };
        let cfg = &self.w.g.cfg;
        let mut send = self.send.borrow_mut();
        let Some(m) = send.inflight.get_mut(&counter) else {
            return;
        };
        if retryable(code) && m.resends < cfg.retries_max {
            m.resends += 1;
            let due = self.rx_now.get() + cfg.retry.as_micros() as u64;
            send.resend.push_back((due, counter));
            drop(send);
            self.wake.notify();
        } else {
            send.inflight.remove(&counter);
            send.abandoned += 1;
            stats.sub(C::Inflight, 1);
            drop(send);
            stats.error("message given up");
            self.wake.notify();
        }
    }

    fn on_deliver(&self, stamp: Option<&Stamp>, body: &[u8]) {
        let stats = &self.w.stats;
        let Some(h) = BodyHeader::read(body) else {
            stats.add(C::Foreign, 1);
            return;
        };
        if h.run_id != self.w.g.run_id {
            stats.add(C::Foreign, 1);
            return;
        }
        let r = self.recv.borrow_mut().record(h.conn, h.counter, h.flags, stamp);
        if r.redelivered {
            stats.add(C::Redelivered, 1);
            self.redelivered.set(self.redelivered.get() + 1);
        } else if r.duplicate {
            stats.add(C::Duplicated, 1);
            self.duplicated.set(self.duplicated.get() + 1);
            if !self.caught_up.get() {
                self.dup_before_catch_up.set(self.dup_before_catch_up.get() + 1);
            }
        } else {
            stats.add(C::Delivered, 1);
            stats.record(H::Deliver, self.rx_now.get().saturating_sub(h.sent_us));
        }
        if r.out_of_order {
            self.out_of_order_seen();
        }
        if let Some(s) = stamp {
            self.to_ack(s);
        }
    }

    /// A group notice: not a message of the run, but it takes a seq of the group's sequence.
    fn on_notice(&self, stamp: &Stamp) {
        if !self.recv.borrow_mut().note_seq(stamp) {
            self.out_of_order_seen();
        }
        self.to_ack(stamp);
    }

    fn out_of_order_seen(&self) {
        self.w.stats.add(C::OutOfOrder, 1);
        self.out_of_order.set(self.out_of_order.get() + 1);
    }

    /// Remember a delivery's seq for this read batch's `DeliveryAck`s.
    fn to_ack(&self, s: &Stamp) {
        if !self.send_delivery_acks {
            return;
        }
        let peer = if s.conv == conv::GROUP || s.from == self.user_id { s.to } else { s.from };
        let now = self.rx_now.get();
        self.pending_acks.borrow_mut().entry(peer).or_default().hold(s.seq, now);
    }

    /// Queue a `DeliveryAck` per conversation with deliveries not yet acknowledged.
    fn ack_deliveries(&self) {
        let mut acks = self.pending_acks.borrow_mut();
        if acks.is_empty() || self.dead.get() || !self.up.get() {
            return;
        }
        let io = self.io.borrow();
        let now = self.rx_now.get();
        for (&peer, t) in acks.iter_mut() {
            if let Some(seq) = t.ack_due(now) {
                io.queue(kind::DELIVERY_ACK, &protocol::DeliveryAck { conv: self.conv, peer, seq });
            }
        }
        drop(io);
        drop(acks);
        self.wake.notify();
    }

    /// Queue message `counter` (new, or a resend) as a Send frame.
    fn queue(&self, counter: u64, m: &Inflight, resend: bool) {
        let g = &self.w.g;
        let mut msg = self.msg.borrow_mut();
        msg.to = m.to;
        msg.client_msg_id = ledger::client_msg_id(g.run_id, self.idx, counter);
        BodyHeader {
            run_id: g.run_id,
            conn: self.idx,
            flags: if resend { FLAG_RESENT } else { 0 },
            counter,
            sent_us: m.sent_us,
        }
        .write_as(&mut msg.body[..BODY_HEADER_BYTES], g.cfg.text_bodies);
        frame::encode_into(kind::SEND, &*msg, &mut self.io.borrow().out());
    }

    /// Issue the next new message, stamped as sent at `sent_us`. False when there is none.
    fn issue(&self, sent_us: u64) -> bool {
        let g = &self.w.g;
        let mut send = self.send.borrow_mut();
        let counter = send.next;
        if counter > ledger::COUNTER_MAX {
            return false;
        }
        let Some(to) = self.plan.to(g.live(), self.idx, counter) else {
            if !self.no_recipient.replace(true) {
                self.w.stats.error("connection has no recipient");
            }
            return false;
        };
        send.next += 1;
        let m = Inflight { sent_us, to, resends: 0, after_reconnect: false };
        send.inflight.insert(counter, m);
        drop(send);
        self.queue(counter, &m, false);
        self.w.stats.add(C::Sent, 1);
        self.w.stats.add(C::Inflight, 1);
        true
    }

    /// Queue the resends that are due; returns when the next one is due.
    fn resend_due(&self, now: u64) -> Option<u64> {
        loop {
            let mut send = self.send.borrow_mut();
            let &(due, counter) = send.resend.front()?;
            if due > now {
                return Some(due);
            }
            send.resend.pop_front();
            let Some(&m) = send.inflight.get(&counter) else {
                continue;
            };
            drop(send);
            self.queue(counter, &m, true);
            self.w.stats.add(C::Resent, 1);
        }
    }

    fn inflight(&self) -> usize {
        self.send.borrow().inflight.len() + self.presence_inflight.get() as usize
    }

    /// Issue the next operation: a presence change, a typing notice or (most often) the next
    /// new message, as the connection's low-discrepancy sequence picks (operation k's point is
    /// frac(offset + k × 0.618…): below the presence share, a presence change; below the sum of
    /// both shares, a typing notice; else a message), so that each kind's share holds over
    /// any stretch of operations, evenly spread. False when nothing could be issued.
    fn issue_op(&self, sent_us: u64) -> bool {
        if self.presence_share > 0.0 || self.typing_share > 0.0 {
            let k = self.ops.get();
            self.ops.set(k + 1);
            let x = (self.ops_offset + k as f64 * GOLDEN).fract();
            if x < self.presence_share {
                self.set_presence();
                return true;
            }
            if x < self.presence_share + self.typing_share && self.typing() {
                return true;
            }
        }
        self.issue(sent_us)
    }

    /// Queue a presence change: AWAY and ONLINE in turn, with a short status text naming the
    /// connection and the change (so that each one changes what friends see even when the
    /// user's other connections change it meanwhile: the server tells friends of changes only).
    fn set_presence(&self) {
        let n = self.presence_sets.get();
        self.presence_sets.set(n + 1);
        let (state, word) = if n.is_multiple_of(2) {
            (protocol::presence_state::AWAY, "away")
        } else {
            (protocol::presence_state::ONLINE, "back")
        };
        let p = protocol::PresenceSet {
            state,
            text: format!("{PRESENCE_TEXT} {word} c{} n{n}", self.idx),
            extra: Vec::new(),
        };
        self.io.borrow().queue(kind::PRESENCE_SET, &p);
        self.presence_inflight.set(self.presence_inflight.get() + 1);
        self.w.stats.add(C::PresenceSent, 1);
        self.w.stats.add(C::PresenceInflight, 1);
    }

    /// Queue a Typing (state 1) to the peer of the next message; false if there is none.
    fn typing(&self) -> bool {
        let counter = self.send.borrow().next;
        let Some(to) = self.plan.to(self.w.g.live(), self.idx, counter) else { return false };
        if to == self.user_id {
            return false;
        }
        self.io.borrow().queue(kind::TYPING, &protocol::Typing { to, conv: conv::DIRECT, state: 1 });
        self.w.stats.add(C::TypingSent, 1);
        true
    }

    /// A presence change was answered (`answered`) or refused.
    fn presence_done(&self, answered: bool) {
        let stats = &self.w.stats;
        if self.presence_inflight.get() == 0 {
            stats.error("presence answer without a change in flight");
            return;
        }
        self.presence_inflight.set(self.presence_inflight.get() - 1);
        stats.sub(C::PresenceInflight, 1);
        if answered {
            stats.add(C::PresenceAnswered, 1);
            stats.add(C::PresenceExpected, self.plan.presence_fanout(self.w.g.live(), self.idx));
        }
        self.wake.notify();
    }
}

/// Issue, pace and resend until the run stops; then shut the socket down. While the connection
/// is down it writes nothing: closed loop it waits, open loop it skips the sends that fall due.
async fn writer(c: Rc<Conn>) {
    let g = c.w.g.clone();
    let live = g.live();
    let run_start = g.run_start_us();
    // Open loop: this connection's k-th message is due at start + offset + k × interval.
    let (interval_us, offset_us) = match g.cfg.load {
        Load::Open { rate, .. } => {
            let per_conn = rate / c.plan.senders(live).max(1) as f64;
            let interval = 1e6 / per_conn;
            let jitter = (mix(g.run_id as u64 ^ c.idx as u64) % 1_000_000) as f64 / 1e6;
            (interval, interval * jitter)
        }
        Load::Closed { .. } => (0.0, 0.0),
    };
    let mut issued: u64 = 0;
    let mut last_write = c.w.now_us();
    let pacer_slot = c.w.pacer.register(&c.wake);
    loop {
        let phase = c.w.phase();
        if phase >= Phase::Stop || c.dead.get() {
            break;
        }
        let now = c.w.now_us();
        let up = c.up.get();
        let mut next_wake = if up { c.resend_due(now) } else { None };
        if phase == Phase::Run && c.sends {
            match g.cfg.load {
                Load::Closed { window } if up => while c.inflight() < window as usize && c.issue_op(now) {},
                Load::Closed { .. } => {}
                Load::Open { cap, .. } => {
                    let due_at = |k: u64| open_loop_due(run_start, offset_us, interval_us, k);
                    if up {
                        while due_at(issued) <= now
                            && c.inflight() < cap as usize
                            && c.issue_op(due_at(issued))
                        {
                            c.w.stats.record(H::Lag, now - due_at(issued));
                            issued += 1;
                        }
                    } else {
                        let first = issued;
                        while due_at(issued) <= now {
                            issued += 1;
                        }
                        c.w.stats.add(C::SkippedWhileDown, issued - first);
                    }
                    if !up || c.inflight() < cap as usize {
                        let t = due_at(issued);
                        next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
                    }
                }
            }
        }
        if !up {
            // Wait for the reconnect (or the next send due, to skip it).
            if let Some(t) = next_wake {
                c.w.pacer.wake_at(pacer_slot, t);
            }
            c.wake.wait().await;
            continue;
        }
        let io = c.io.borrow().clone();
        // A connection that sends nothing for a while (a group member that only receives, with
        // delivery acks off) pings, or the server's idle timeout closes it.
        if !io.has_output() && now >= last_write + c.ping_us {
            io.queue(kind::PING, &protocol::Ping { nonce: 0 });
        }
        if io.has_output() {
            if let Err(e) = io.flush().await {
                if !io.is_closed() {
                    c.w.stats.error(&format!("write: {:?}", e.kind()));
                }
                c.write_failed(&io);
                continue;
            }
            last_write = c.w.now_us();
            if next_wake.is_some_and(|t| t <= last_write) {
                continue;
            }
        }
        // The thread's pacer wakes us at `t` to the microsecond (a monoio timer would round
        // up to its next 1 ms tick, delaying the send and bunching sends into bursts).
        let ping_at = last_write + c.ping_us;
        c.w.pacer.wake_at(pacer_slot, next_wake.map_or(ping_at, |t| t.min(ping_at)));
        c.wake.wait().await;
    }
    c.io.borrow().shutdown();
}

/// The golden ratio's fractional part: the step of the operation-kind sequence.
const GOLDEN: f64 = 0.618_033_988_749_894_9;

/// Open loop: when a connection's `k`-th new message is due (µs since the run's base), its
/// messages being `interval_us` apart from `run_start + offset_us`.
pub fn open_loop_due(run_start: u64, offset_us: f64, interval_us: f64, k: u64) -> u64 {
    run_start + (offset_us + k as f64 * interval_us) as u64
}

#[cfg(test)]
mod tests {
    use super::open_loop_due;

    #[test]
    fn open_loop_schedule_is_evenly_spaced() {
        // 200 messages/s from 1 s in, offset 1.25 ms: due every 5 ms, not bunched per ms.
        let due: Vec<u64> = (0..4).map(|k| open_loop_due(1_000_000, 1_250.0, 5_000.0, k)).collect();
        assert_eq!(due, [1_001_250, 1_006_250, 1_011_250, 1_016_250]);
        // Fractional intervals do not drift: message 1000 at 3333.33 µs spacing.
        assert_eq!(open_loop_due(0, 0.0, 1e6 / 300.0, 1_000), 3_333_333);
    }
}

/// How long a gap in a conversation's sequence holds its delivery acks back (microseconds):
/// a message that comes out of order (a cluster node failed and its fan-outs were re-routed, or
/// it comes with a `Resync` catch-up) fills it; a number never used (a failed commit) does not,
/// and is passed over after this long.
const GAP_WAIT_US: u64 = 10_000_000;

/// What a connection holds of one conversation's sequence: a delivery ack says "everything up to
/// here" (PROTOCOL.md 5.8), so it never goes past a gap (which a later delivery may fill).
#[derive(Default)]
pub struct SeqTrack {
    /// Every number up to this one is held (0: nothing seen yet).
    held: u64,
    /// Numbers held above a gap.
    above: std::collections::BTreeSet<u64>,
    /// When the oldest open gap was first seen.
    gap_since_us: u64,
    /// The last number acknowledged.
    acked: u64,
}

impl SeqTrack {
    /// A delivery (or this connection's own message, from its ack) holds `seq`.
    pub fn hold(&mut self, seq: u64, now_us: u64) {
        if self.held == 0 && self.above.is_empty() {
            // The first number seen: a catch-up starts at the cursor, live traffic where it is.
            self.held = seq;
            return;
        }
        if seq <= self.held {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.held + 1)) {
            self.held += 1;
        }
        if self.above.is_empty() {
            self.gap_since_us = 0;
        } else if self.gap_since_us == 0 {
            self.gap_since_us = now_us.max(1);
        }
    }

    /// The number to acknowledge now, if it moved: up to the first gap, or past a gap open
    /// for longer than [`GAP_WAIT_US`].
    pub fn ack_due(&mut self, now_us: u64) -> Option<u64> {
        if self.gap_since_us != 0 && now_us.saturating_sub(self.gap_since_us) > GAP_WAIT_US {
            self.held = self.above.last().copied().unwrap_or(self.held).max(self.held);
            self.above.clear();
            self.gap_since_us = 0;
        }
        (self.held > self.acked).then(|| {
            self.acked = self.held;
            self.held
        })
    }
}

#[cfg(test)]
mod seq_track_tests {
    use super::*;

    /// Acks stop at a gap until it is filled, or until it has been open too long.
    #[test]
    fn acks_stop_at_gaps() {
        let mut t = SeqTrack::default();
        t.hold(5, 1);
        t.hold(6, 1);
        assert_eq!(t.ack_due(1), Some(6));
        t.hold(8, 2);
        assert_eq!(t.ack_due(3), None, "7 is missing");
        t.hold(7, 4);
        assert_eq!(t.ack_due(5), Some(8));
        t.hold(10, 10);
        assert_eq!(t.ack_due(11), None);
        assert_eq!(t.ack_due(10 + GAP_WAIT_US + 1), Some(10), "9 never came");
        t.hold(9, 20);
        assert_eq!(t.ack_due(21), None);
    }
}
