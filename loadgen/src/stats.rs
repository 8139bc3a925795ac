//! Counters, latency histograms and error tallies.
//!
//! Each executor thread owns a [`Stats`] (plain `Cell`s and `RefCell`s, touched only by that
//! thread). Its control task copies the counters into the thread's [`Slot`] (atomics the
//! coordinator reads) every few milliseconds and hands over the histograms of the last interval
//! a few times a second, so no message pays for an atomic or a lock.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use hdrhistogram::Histogram;
use tim::protocol::{kind, ErrorCode};

/// Counters every thread keeps. Gauges (in flight, connected, busy) go up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum C {
    Sent,
    Acked,
    /// Distinct deliveries of our messages to live connections.
    Delivered,
    /// Deliveries owed by the acknowledged messages (sum of their fan-out).
    Expected,
    Duplicated,
    /// Of the duplicates, those received before the connection's CatchUpEnd (a durable
    /// server's replay at login overlapping live delivery).
    DupInCatchUp,
    OutOfOrder,
    /// Deliveries that are not this run's messages.
    Foreign,
    /// Room: messages the server reported a subscriber missed (`Missed`, source 1).
    Missed,
    /// Room: errors after setup (refusals, unexpected frames, closed rooms, disconnections);
    /// any fails the run.
    RunErrors,
    Resent,
    /// Deliveries received again after a reconnect: the first copy came before the reconnect,
    /// or one copy came in the new login's catch-up window (at-least-once across a reconnect;
    /// not duplicates; `ledger::RecvLog`).
    Redelivered,
    /// Connections logged in again after a failure, and those that gave up.
    Reconnects,
    ReconnectGaveUp,
    /// Of the resends, those after a reconnect (the messages in flight when it failed).
    ResentAfterReconnect,
    /// Acks marked duplicate of messages resent after a reconnect: the server had stored them.
    AckedDuplicate,
    /// Open loop: sends due while the connection was down, skipped.
    SkippedWhileDown,
    /// `Resync` pushes received (a cluster node failed; a catch-up followed).
    Resyncs,
    /// One-to-one side operations: presence changes sent (PresenceSet) and answered
    /// (PresenceList), the PresenceNotices they are owed (to every live session of the user's
    /// friends and to the user's other sessions, counted when answered) and received (those
    /// carrying the loadgen's status text), other PresenceNotices (logins, new friends during
    /// setup), Typing sent and refused, TypingNotices received.
    PresenceSent,
    PresenceAnswered,
    PresenceExpected,
    PresenceNotices,
    PresenceOtherNotices,
    TypingSent,
    TypingRefused,
    TypingNotices,
    /// Gauge: presence changes sent and not yet answered.
    PresenceInflight,
    Errors,
    Logins,
    /// Gauge: messages sent and not yet answered.
    Inflight,
    /// Gauge: connections up and logged in during the run.
    Connected,
    /// Gauge: connections down and reconnecting.
    Down,
    /// Gauge: login-storm workers in the middle of an iteration.
    Busy,
}

pub const COUNTERS: usize = C::Busy as usize + 1;

/// Latency histograms, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum H {
    /// Send → SendAck (idle: Ping → Pong).
    Ack,
    /// Send → Deliver, per delivery.
    Deliver,
    /// Login → LoginOk.
    Login,
    /// Open loop: how late each new message went out after its scheduled time (the
    /// loadgen's own lag, included in the figures above; large when it cannot keep up).
    Lag,
}

pub const HISTS: usize = 4;

/// Largest latency recorded (larger values are clamped): 10 minutes.
const LATENCY_MAX_US: u64 = 600_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

pub type Hists = [Histogram<u64>; HISTS];

pub fn new_hists() -> Hists {
    [new_hist(), new_hist(), new_hist(), new_hist()]
}

pub fn add_hists(into: &mut Hists, from: &Hists) {
    for (a, b) in into.iter_mut().zip(from) {
        a.add(b).expect("same bounds");
    }
}

/// One thread's statistics.
pub struct Stats {
    counters: [Cell<u64>; COUNTERS],
    /// Since the start, up to the last closed interval.
    pub total: RefCell<Hists>,
    /// Since the control task last closed an interval (values are recorded here only).
    pub interval: RefCell<Hists>,
    pub errors: RefCell<BTreeMap<String, u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            counters: std::array::from_fn(|_| Cell::new(0)),
            total: RefCell::new(new_hists()),
            interval: RefCell::new(new_hists()),
            errors: RefCell::new(BTreeMap::new()),
        }
    }
}

impl Stats {
    #[inline]
    pub fn add(&self, c: C, n: u64) {
        let cell = &self.counters[c as usize];
        cell.set(cell.get() + n);
    }

    #[inline]
    pub fn sub(&self, c: C, n: u64) {
        let cell = &self.counters[c as usize];
        cell.set(cell.get().saturating_sub(n));
    }

    #[inline]
    pub fn record(&self, h: H, us: u64) {
        self.interval.borrow_mut()[h as usize].saturating_record(us.max(1));
    }

    /// Add the interval histograms to the totals, hand them to `slot`, and start a new interval.
    pub fn close_interval(&self, slot: Option<&Slot>) {
        let mut iv = self.interval.borrow_mut();
        add_hists(&mut self.total.borrow_mut(), &iv);
        if let Some(slot) = slot {
            slot.hand_over(&iv);
        }
        for h in iv.iter_mut() {
            h.reset();
        }
    }

    /// Count an error under `what` (also in the Errors counter).
    pub fn error(&self, what: &str) {
        self.add(C::Errors, 1);
        let mut e = self.errors.borrow_mut();
        match e.get_mut(what) {
            Some(n) => *n += 1,
            None => {
                e.insert(what.to_owned(), 1);
            }
        }
    }

    /// Count an `Error` frame from the server answering `request_kind`.
    pub fn server_error(&self, code: u16, request_kind: u16) {
        self.error(&error_name(code, request_kind));
    }

    pub fn snapshot(&self) -> [u64; COUNTERS] {
        std::array::from_fn(|i| self.counters[i].get())
    }
}

/// `Busy(33) on Send` and the like.
pub fn error_name(code: u16, request_kind: u16) -> String {
    let name = ErrorCode::from_u16(code).map_or_else(|| "Unknown".to_owned(), |c| format!("{c:?}"));
    if request_kind == 0 {
        format!("{name}({code})")
    } else {
        format!("{name}({code}) on {}", kind::name(request_kind))
    }
}

/// What a thread shares with the coordinator.
pub struct Slot {
    counters: [AtomicU64; COUNTERS],
    /// Histograms handed over since the coordinator last took them.
    pub interval: Mutex<Option<Hists>>,
}

impl Default for Slot {
    fn default() -> Self {
        Slot { counters: std::array::from_fn(|_| AtomicU64::new(0)), interval: Mutex::new(None) }
    }
}

impl Slot {
    pub fn publish(&self, values: &[u64; COUNTERS]) {
        for (a, &v) in self.counters.iter().zip(values) {
            a.store(v, Ordering::Relaxed);
        }
    }

    pub fn read(&self) -> [u64; COUNTERS] {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    /// Add a thread's interval histograms to what waits for the coordinator.
    pub fn hand_over(&self, h: &Hists) {
        let mut slot = self.interval.lock().expect("slot lock");
        match slot.as_mut() {
            Some(acc) => add_hists(acc, h),
            None => *slot = Some(h.clone()),
        }
    }

    pub fn take_interval(&self) -> Option<Hists> {
        self.interval.lock().expect("slot lock").take()
    }
}

/// Sum of every thread's counters.
pub fn sum(slots: &[crossbeam_utils::CachePadded<Slot>]) -> [u64; COUNTERS] {
    let mut out = [0u64; COUNTERS];
    for s in slots {
        for (o, v) in out.iter_mut().zip(s.read()) {
            *o += v;
        }
    }
    out
}

/// Microseconds as a short human string.
pub fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

/// A rate as a short human string.
pub fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2}M", per_s / 1e6)
    } else if per_s >= 1e4 {
        format!("{:.1}k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

/// p50/p99 of a histogram, or "-" when empty.
pub fn p50_p99(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".into();
    }
    format!("{}/{}", fmt_us(h.value_at_quantile(0.5)), fmt_us(h.value_at_quantile(0.99)))
}
