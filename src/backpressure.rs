//! Backpressure from deliveries to senders.
//!
//! A conversation owner answers a send as soon as it is sequenced (and stored), before its
//! deliveries are written: the in-flight limit (`inflight_per_session_max`) bounds sends not yet
//! answered, not deliveries not yet written. When the shards that write deliveries fall behind
//! (a busy core, a loaded machine), the deliveries wait in mesh queues, then in the senders'
//! mesh overflow, then in a cluster link's buffer — and past those limits they would be dropped.
//!
//! So every place where deliveries wait is a *source* of pressure with two watermarks: above
//! its high one it raises the node's [`Backpressure`], back under its low one it lowers it.
//! While any source is raised, every shard of the node holds new sends (1:1, group and stream
//! `Submit`s) back in arrival order instead of handling them: no new deliveries are made, the
//! senders' answers stop, their in-flight windows fill, and their sessions stop being read.
//! What is held back is bounded by the in-flight limits of the sessions that sent it. Room
//! publishes are not held back: they are not counted in flight, and a live room that falls
//! behind drops messages and says so.
//!
//! Past `mesh_overflow_max` (which the watermarks keep it from reaching) a shard still refuses
//! requests with `Busy` and drops deliveries (counted in `tim_dropped_envelopes_total`); answers
//! to requests and state two owners share are never dropped.
//!
//! Sources (each one [`Watermark`]):
//! - a shard's mesh overflow: high at `limits.mesh_overflow_max / 16`;
//! - the fan-out jobs waiting on a shard: high at `2 × limits.fanout_jobs_max` (room messages
//!   beyond `fanout_jobs_max` are dropped and counted as `Missed`, so only group deliveries
//!   get there);
//! - a cluster link's unsent bytes: high at half of `cluster.link_queue_bytes_max`.
//!
//! Every low watermark is half its high one.

use std::{
    cell::Cell,
    sync::atomic::{AtomicUsize, Ordering},
};

/// A node's backpressure: the number of sources raised now.
#[derive(Default)]
pub struct Backpressure {
    raised: AtomicUsize,
}

impl Backpressure {
    /// Whether new sends are held back now.
    #[inline]
    pub fn on(&self) -> bool {
        self.raised.load(Ordering::Relaxed) != 0
    }

    /// Sources raised now.
    pub fn raised(&self) -> usize {
        self.raised.load(Ordering::Relaxed)
    }
}

/// One source of pressure: raised at `high` or more, lowered again at `high / 2` or less.
pub struct Watermark {
    high: usize,
    raised: Cell<bool>,
}

impl Watermark {
    /// A source raised at `high` (at least 1).
    pub fn new(high: usize) -> Watermark {
        Watermark { high: high.max(1), raised: Cell::new(false) }
    }

    /// Take the source's level now; raise or lower `bp` on crossing a watermark. Returns
    /// whether this source is raised.
    #[inline]
    pub fn update(&self, level: usize, bp: &Backpressure) -> bool {
        let raised = self.raised.get();
        if !raised && level >= self.high {
            self.raised.set(true);
            bp.raised.fetch_add(1, Ordering::Relaxed);
            true
        } else if raised && level <= self.high / 2 {
            self.lower(bp);
            false
        } else {
            raised
        }
    }

    /// The source is gone (a link closed): lower `bp` if it was raised.
    pub fn lower(&self, bp: &Backpressure) {
        if self.raised.replace(false) {
            bp.raised.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raised at the high watermark, held between the two, lowered at the low one; two sources
    /// count apart.
    #[test]
    fn hysteresis() {
        let bp = Backpressure::default();
        let (a, b) = (Watermark::new(100), Watermark::new(10));
        assert!(!a.update(99, &bp) && !bp.on());
        assert!(a.update(100, &bp) && bp.on());
        assert!(a.update(51, &bp) && bp.raised() == 1, "held above the low watermark");
        assert!(b.update(10, &bp) && bp.raised() == 2);
        assert!(!a.update(50, &bp) && bp.raised() == 1);
        assert!(!a.update(0, &bp) && bp.raised() == 1, "lowered once only");
        b.lower(&bp);
        b.lower(&bp);
        assert!(!bp.on());
        let zero = Watermark::new(0);
        assert!(!zero.update(0, &bp), "a high watermark of 0 is 1: an empty source never raises");
    }
}
