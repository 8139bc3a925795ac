//! Per-shard counters and histograms for `/metrics` (docs/ADMIN.md). Each shard thread has its
//! own ([`thread_local!`]) plain cells: counting on the message path is a load and a store on
//! the shard's own cache lines, with no atomic and no cross-core traffic. The admin API reads
//! them by asking each shard for a [`Snapshot`] (an admin task runs on the shard's thread).
//!
//! Key items: [`Snapshot`], the `count_*`/`observe_*` functions, [`LATENCY_BUCKETS_US`].

use std::{cell::Cell, time::Duration};

/// Upper bounds of the latency histograms' buckets, in microseconds (Prometheus `le` labels,
/// in seconds); the last bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 15] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000,
];
/// Error codes counted one by one (codes at or above it are counted as `ERROR_CODES - 1`).
pub const ERROR_CODES: usize = 128;

/// A histogram of durations.
#[derive(Default)]
struct Histogram {
    buckets: [Cell<u64>; LATENCY_BUCKETS_US.len() + 1],
    sum_us: Cell<u64>,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(LATENCY_BUCKETS_US.len());
        bump(&self.buckets[i], 1);
        bump(&self.sum_us, us);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot { buckets: self.buckets.iter().map(Cell::get).collect(), sum_us: self.sum_us.get() }
    }
}

/// A histogram's counts: per bucket (not cumulative) and the sum of the observed microseconds.
#[derive(Clone, Debug, Default)]
pub struct HistogramSnapshot {
    pub buckets: Vec<u64>,
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// Transports, as counted (index into the per-transport arrays).
pub const TRANSPORTS: [&str; 4] = ["tcp", "tls", "ws", "wss"];

struct Counters {
    accepted: [Cell<u64>; 4],
    logins: Cell<u64>,
    sends: Cell<u64>,
    acks: Cell<u64>,
    ack_latency: Histogram,
    commits: Cell<u64>,
    commit_messages: Cell<u64>,
    commit_latency: Histogram,
    errors: [Cell<u64>; ERROR_CODES],
    kicks: [Cell<u64>; ERROR_CODES],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            accepted: Default::default(),
            logins: Cell::new(0),
            sends: Cell::new(0),
            acks: Cell::new(0),
            ack_latency: Histogram::default(),
            commits: Cell::new(0),
            commit_messages: Cell::new(0),
            commit_latency: Histogram::default(),
            errors: std::array::from_fn(|_| Cell::new(0)),
            kicks: std::array::from_fn(|_| Cell::new(0)),
        }
    }
}

thread_local! {
    static COUNTERS: Counters = Counters::default();
    /// `admin.metrics`: whether the message path counts.
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turn the message path's counting on or off for this thread (a shard, at start).
pub fn enable(on: bool) {
    ENABLED.with(|e| e.set(on));
}

#[inline]
fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// A connection was accepted on transport `t` (index of [`TRANSPORTS`]).
pub fn count_accepted(t: u8) {
    COUNTERS.with(|c| bump(&c.accepted[usize::from(t) % 4], 1));
}

/// A login (password or token) succeeded.
pub fn count_login() {
    COUNTERS.with(|c| bump(&c.logins, 1));
}

/// A Send (or Stream) request was taken in.
#[inline]
pub fn count_send() {
    if enabled() {
        COUNTERS.with(|c| bump(&c.sends, 1));
    }
}

/// A send was acknowledged; its bytes arrived at `arrived`.
#[inline]
pub fn observe_ack(arrived: std::time::Instant) {
    if enabled() {
        COUNTERS.with(|c| {
            bump(&c.acks, 1);
            c.ack_latency.observe(arrived.elapsed());
        });
    }
}

/// A store commit of `messages` ended after `d`.
pub fn observe_commit(d: Duration, messages: usize) {
    if !enabled() {
        return;
    }
    COUNTERS.with(|c| {
        bump(&c.commits, 1);
        bump(&c.commit_messages, messages as u64);
        c.commit_latency.observe(d);
    });
}

/// An Error frame with `code` was sent.
pub fn count_error(code: u16) {
    COUNTERS.with(|c| bump(&c.errors[usize::from(code).min(ERROR_CODES - 1)], 1));
}

/// A Kick frame with `code` was sent.
pub fn count_kick(code: u16) {
    COUNTERS.with(|c| bump(&c.kicks[usize::from(code).min(ERROR_CODES - 1)], 1));
}

/// One shard's figures at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub shard: usize,
    /// Connections open now, by transport.
    pub connections: [u64; 4],
    /// Logged-in sessions now, by transport.
    pub sessions: [u64; 4],
    /// Connections accepted, by transport.
    pub accepted: [u64; 4],
    pub logins: u64,
    pub sends: u64,
    pub acks: u64,
    pub ack_latency: HistogramSnapshot,
    /// Frames delivered to sessions (messages out).
    pub deliveries: u64,
    pub delivery_acks: u64,
    pub commits: u64,
    pub commit_messages: u64,
    pub commit_latency: HistogramSnapshot,
    /// Envelopes waiting in this shard's queue to each mesh endpoint.
    pub mesh_queued: Vec<usize>,
    /// Envelopes held back because a mesh queue was full, now.
    pub overflow: usize,
    /// Sends held back by the node's backpressure, now.
    pub deferred: usize,
    /// (code, count) of Error frames sent, codes with a count only.
    pub errors: Vec<(u16, u64)>,
    /// (code, count) of Kick frames sent.
    pub kicks: Vec<(u16, u64)>,
}

/// Fill the thread-local part of `s` (the caller, on the shard's thread, adds the rest).
pub fn snapshot_counters(s: &mut Snapshot) {
    COUNTERS.with(|c| {
        for i in 0..4 {
            s.accepted[i] = c.accepted[i].get();
        }
        s.logins = c.logins.get();
        s.sends = c.sends.get();
        s.acks = c.acks.get();
        s.ack_latency = c.ack_latency.snapshot();
        s.commits = c.commits.get();
        s.commit_messages = c.commit_messages.get();
        s.commit_latency = c.commit_latency.snapshot();
        let nonzero = |a: &[Cell<u64>; ERROR_CODES]| {
            a.iter().enumerate().filter(|(_, c)| c.get() > 0).map(|(i, c)| (i as u16, c.get())).collect()
        };
        s.errors = nonzero(&c.errors);
        s.kicks = nonzero(&c.kicks);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations land in the right bucket and the sum; counters count per thread.
    #[test]
    fn histogram_and_counters() {
        COUNTERS.with(|c| {
            for us in [50, 3_000, 60_000_000] {
                bump(&c.acks, 1);
                c.ack_latency.observe(Duration::from_micros(us));
            }
        });
        count_error(12);
        count_error(12);
        count_error(9999);
        let mut s = Snapshot::default();
        snapshot_counters(&mut s);
        assert_eq!(s.acks, 3);
        assert_eq!(s.ack_latency.buckets[0], 1);
        assert_eq!(s.ack_latency.buckets[5], 1, "3 ms is in the 5 ms bucket");
        assert_eq!(*s.ack_latency.buckets.last().unwrap(), 1, "+Inf");
        assert_eq!(s.ack_latency.sum_us, 50 + 3_000 + 60_000_000);
        assert_eq!(s.errors, vec![(12, 2), (ERROR_CODES as u16 - 1, 1)]);
        let other = std::thread::spawn(|| {
            let mut s = Snapshot::default();
            snapshot_counters(&mut s);
            s.acks
        });
        assert_eq!(other.join().unwrap(), 0, "another thread has its own counters");
    }
}
