//! One executor thread: its [`Worker`] context (stats, read-buffer pool, local view of the
//! phase, setup gate), the control task that links it to the coordinator, and [`run`], the
//! thread's main future, which starts its share of the connections (connection `c` runs on
//! thread `c % threads`) and hands everything over when they have ended.
//!
//! Also the small single-thread primitives the connection tasks wait on: [`Notify`] (one
//! waiter), the phase watch, and [`Gate`] (a counting semaphore bounding setups in progress).

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::{poll_fn, Future},
    rc::{Rc, Weak},
    sync::Arc,
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use tim::frame::AlignedBuf;

use crate::{
    global::{Global, Phase},
    ledger::ConnLedger,
    scenario,
    stats::Stats,
};

/// How often the control task looks at the coordinator's phase and publishes counters.
const CONTROL_TICK: Duration = Duration::from_millis(5);
/// How often interval histograms are handed to the coordinator.
const HAND_OVER_EVERY: Duration = Duration::from_millis(250);
/// How long a thread waits for its connection tasks once the run is stopped.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Read buffers: size and how many a thread keeps.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;
const READ_BUFFERS_POOLED_MAX: usize = 64;

/// A wake-up for one waiting task; a notify before the wait is not lost.
#[derive(Default)]
pub struct Notify {
    flag: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.flag.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// A counting semaphore for tasks of one thread.
pub struct Gate {
    free: Cell<u32>,
    waiters: RefCell<VecDeque<Waker>>,
}

pub struct GatePass<'a>(&'a Gate);

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        self.0.free.set(self.0.free.get() + 1);
        if let Some(w) = self.0.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }
}

impl Gate {
    pub fn new(n: u32) -> Gate {
        Gate { free: Cell::new(n.max(1)), waiters: RefCell::new(VecDeque::new()) }
    }

    pub async fn pass(&self) -> GatePass<'_> {
        poll_fn(|cx| {
            if self.free.get() > 0 {
                self.free.set(self.free.get() - 1);
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        GatePass(self)
    }
}

/// Everything one executor thread owns.
pub struct Worker {
    pub g: Arc<Global>,
    pub id: usize,
    pub stats: Stats,
    pool: RefCell<Vec<AlignedBuf>>,
    phase: Cell<Phase>,
    phase_waiters: RefCell<Vec<Waker>>,
    /// Notifies of tasks to wake on every phase change (writers, pingers).
    watchers: RefCell<Vec<Weak<Notify>>>,
    pub setup_gate: Gate,
    ledgers: RefCell<Vec<ConnLedger>>,
    /// Connection tasks still running.
    active: Cell<u64>,
}

impl Worker {
    fn new(g: Arc<Global>, id: usize) -> Worker {
        let per_thread = g.cfg.setup_concurrency.div_ceil(g.cfg.threads as u32);
        Worker {
            id,
            stats: Stats::default(),
            pool: RefCell::new(Vec::new()),
            phase: Cell::new(Phase::Setup),
            phase_waiters: RefCell::new(Vec::new()),
            watchers: RefCell::new(Vec::new()),
            setup_gate: Gate::new(per_thread),
            ledgers: RefCell::new(Vec::new()),
            active: Cell::new(0),
            g,
        }
    }

    /// The phase as this thread last saw it.
    #[inline]
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Wait until the phase is past `p`.
    pub async fn wait_past(&self, p: Phase) {
        poll_fn(|cx| {
            if self.phase.get() > p {
                Poll::Ready(())
            } else {
                self.phase_waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Have `n` notified on every phase change.
    pub fn watch_phase(&self, n: &Rc<Notify>) {
        self.watchers.borrow_mut().push(Rc::downgrade(n));
    }

    fn set_phase(&self, p: Phase) {
        self.phase.set(p);
        for w in self.phase_waiters.borrow_mut().drain(..) {
            w.wake();
        }
        self.watchers.borrow_mut().retain(|w| match w.upgrade() {
            Some(n) => {
                n.notify();
                true
            }
            None => false,
        });
    }

    pub fn take_buf(&self) -> AlignedBuf {
        self.pool.borrow_mut().pop().unwrap_or_else(|| AlignedBuf::new(READ_BUFFER_BYTES))
    }

    pub fn put_buf(&self, mut buf: AlignedBuf) {
        let mut pool = self.pool.borrow_mut();
        if buf.capacity() == READ_BUFFER_BYTES && pool.len() < READ_BUFFERS_POOLED_MAX {
            buf.clear();
            pool.push(buf);
        }
    }

    /// A connection's ledger, for the merge.
    pub fn leave_ledger(&self, l: ConnLedger) {
        self.ledgers.borrow_mut().push(l);
    }

    /// Microseconds since the run's base instant.
    #[inline]
    pub fn now_us(&self) -> u64 {
        self.g.now_us()
    }
}

/// The thread's main future.
pub async fn run(g: Arc<Global>, id: usize) {
    let w = Rc::new(Worker::new(g.clone(), id));
    let threads = g.cfg.threads;
    monoio::spawn(control(w.clone()));
    for conn in (id..g.cfg.connections as usize).step_by(threads) {
        let w2 = w.clone();
        w.active.set(w.active.get() + 1);
        monoio::spawn(async move {
            scenario::run_slot(&w2, conn as u32).await;
            w2.active.set(w2.active.get() - 1);
        });
    }
    let mut stop_seen: Option<Instant> = None;
    while w.active.get() > 0 {
        if w.phase() == Phase::Stop {
            let t = *stop_seen.get_or_insert_with(Instant::now);
            if t.elapsed() > STOP_GRACE {
                break;
            }
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    let stuck = w.active.get();
    w.stats.close_interval(None);
    let ledgers = std::mem::take(&mut *w.ledgers.borrow_mut());
    g.leave(&w.stats.total.borrow(), &w.stats.errors.borrow(), &w.stats.snapshot(), ledgers, stuck);
    g.slots[id].publish(&w.stats.snapshot());
}

/// Follow the coordinator's phase; publish counters; hand over interval histograms.
async fn control(w: Rc<Worker>) {
    let slot = &w.g.slots[w.id];
    let mut last_hand_over = Instant::now();
    loop {
        let p = w.g.phase();
        if p != w.phase() {
            w.set_phase(p);
        }
        slot.publish(&w.stats.snapshot());
        if last_hand_over.elapsed() >= HAND_OVER_EVERY {
            last_hand_over = Instant::now();
            w.stats.close_interval(Some(slot));
        }
        monoio::time::sleep(CONTROL_TICK).await;
    }
}
