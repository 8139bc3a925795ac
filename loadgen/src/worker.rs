//! One executor thread: its [`Worker`] context (stats, read-buffer pool, local view of the
//! phase, setup gate), the control task that links it to the coordinator, and [`run`], the
//! thread's main future, which starts its share of the connections (connection `c` runs on
//! thread `c % threads`) and hands everything over when they have ended.
//!
//! Also the small single-thread primitives the connection tasks wait on: [`Notify`] (one
//! waiter), the phase watch, [`Gate`] (a counting semaphore bounding setups in progress) and
//! [`Pacer`] (wakes tasks at microsecond times, for open-loop sends).

use std::{
    cell::{Cell, RefCell},
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    future::{poll_fn, Future},
    rc::{Rc, Weak},
    sync::Arc,
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use tim::frame::AlignedBuf;
use tim_shards::DriverKind;

use crate::{
    cli::Pacing,
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

/// Wakes tasks at given times (µs since the run's base) with sub-millisecond precision: one
/// per thread, driven by [`pacer`]. A task takes a slot for its [`Notify`] and asks for a
/// wake-up with [`Pacer::wake_at`]; an earlier request replaces a later one, a later one
/// waits for the earlier wake-up (which the task then treats as spurious).
#[derive(Default)]
pub struct Pacer {
    /// (due, slot), earliest first; entries whose due is no longer the slot's are stale.
    heap: RefCell<BinaryHeap<Reverse<(u64, u32)>>>,
    /// Per slot: the wake-up asked for (`u64::MAX`: none) and whom to notify.
    slots: RefCell<Vec<(u64, Weak<Notify>)>>,
    /// Wakes the pacer task when a request becomes the earliest.
    wake: Notify,
    /// The pacer's timer, once it has one (io_uring driver): a new earliest request re-arms
    /// it directly, since the pacer task is then waiting on it rather than on `wake`.
    timer: RefCell<Option<Rc<TimerFd>>>,
}

impl Pacer {
    pub fn register(&self, n: &Rc<Notify>) -> u32 {
        let mut slots = self.slots.borrow_mut();
        slots.push((u64::MAX, Rc::downgrade(n)));
        (slots.len() - 1) as u32
    }

    /// Notify `slot` at `t` (or at its earlier pending wake-up).
    pub fn wake_at(&self, slot: u32, t: u64) {
        let mut slots = self.slots.borrow_mut();
        let due = &mut slots[slot as usize].0;
        if t >= *due {
            return;
        }
        *due = t;
        let mut heap = self.heap.borrow_mut();
        let earliest = heap.peek().is_none_or(|Reverse((d, _))| t < *d);
        heap.push(Reverse((t, slot)));
        if earliest {
            if let Some(timer) = &*self.timer.borrow() {
                timer.arm(t);
            }
            self.wake.notify();
        }
    }

    /// Notify every slot due at `now`; the next due time, if any.
    pub fn fire(&self, now: u64) -> Option<u64> {
        let mut heap = self.heap.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        while let Some(&Reverse((t, slot))) = heap.peek() {
            let s = &mut slots[slot as usize];
            if s.0 != t {
                heap.pop();
                continue;
            }
            if t > now {
                return Some(t);
            }
            heap.pop();
            s.0 = u64::MAX;
            if let Some(n) = s.1.upgrade() {
                n.notify();
            }
        }
        None
    }
}

/// A timer that fires at a given microsecond of the run (µs since the run's base instant),
/// with the kernel's high-resolution timers: a `timerfd` on `CLOCK_MONOTONIC` (the clock of
/// [`Instant`]), read through the io_uring ring, so that waiting on it is a parked thread, not a
/// spinning one. monoio's own timer wheel has 1 ms ticks, too coarse for open-loop pacing.
pub struct TimerFd {
    file: monoio::fs::File,
    /// `CLOCK_MONOTONIC` nanoseconds at the run's µs 0.
    base_ns: i128,
}

fn monotonic_ns() -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl TimerFd {
    /// A timer for the calling thread's runtime; `now_us` is the run's current µs.
    fn new(now_us: u64) -> std::io::Result<TimerFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the descriptor it returns is owned by the File below.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let std_file = unsafe { std::fs::File::from_raw_fd(fd) };
        let file = monoio::fs::File::from_std(std_file)?;
        Ok(TimerFd { file, base_ns: monotonic_ns() - now_us as i128 * 1000 })
    }

    /// Fire at run µs `t` (at once if that is past), replacing the previous setting.
    fn arm(&self, t: u64) {
        use std::os::fd::AsRawFd;
        // 0 would disarm the timer: a time in the past is given as 1 ns.
        let ns = (self.base_ns + t as i128 * 1000).max(1);
        let it_value =
            libc::timespec { tv_sec: (ns / 1_000_000_000) as _, tv_nsec: (ns % 1_000_000_000) as _ };
        let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value };
        // SAFETY: the descriptor is a timerfd owned by `self.file`; the specs are plain data.
        unsafe {
            libc::timerfd_settime(self.file.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
    }

    /// Wait until the timer fires.
    async fn wait(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        self.file.read_at(buf, 0).await
    }
}

/// The thread's pacer task: notifies [`Pacer`] requests when due, in one of three ways.
///
/// - `--pacer timer` (io_uring driver): waits on a [`TimerFd`] set to the next due time
///   (re-armed by [`Pacer::wake_at`] when an earlier request comes in). The thread parks in the
///   ring until then, with every completion (acks, deliveries) still reaped as it comes; its
///   timer slack is 1 ns, so the kernel does not defer the wake-up by its default 50 µs. It
///   costs no CPU while waiting; each wake-up adds the scheduler's wake-up latency.
/// - `--pacer spin` (io_uring driver): [`spin_pacer`], precise to a few µs, but the thread's
///   core stays busy. On a machine where the loadgen shares its cores with the server or a
///   database, that CPU is taken from them: a spinning pacer took 1.2 cores at 5 k msgs/s here
///   and added hundreds of milliseconds to durable acks. `--pacer auto` spins only when the
///   server cannot run on the loadgen's CPUs.
/// - The epoll driver has no ring to read through: monoio's timer (1 ms granularity).
async fn pacer(w: Rc<Worker>, ring: bool) {
    if ring && w.g.cfg.pacing == Pacing::Spin {
        return spin_pacer(w).await;
    }
    let mut timer = if ring { TimerFd::new(w.now_us()).ok().map(Rc::new) } else { None };
    if timer.is_some() {
        // SAFETY: prctl on the calling thread with an integer argument.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    }
    *w.pacer.timer.borrow_mut() = timer.clone();
    let mut buf = Some(Vec::<u8>::with_capacity(8));
    while w.phase() < Phase::Stop {
        let now = w.now_us();
        let Some(t) = w.pacer.fire(now) else {
            w.pacer.wake.wait().await;
            continue;
        };
        match (timer.clone(), buf.take()) {
            (Some(tfd), Some(b)) => {
                tfd.arm(t);
                let (res, b) = tfd.wait(b).await;
                buf = Some(b);
                if let Err(e) = res {
                    eprintln!("tim-loadgen: the pacer's timer failed ({e}); pacing with the 1 ms timer");
                    timer = None;
                    *w.pacer.timer.borrow_mut() = None;
                }
            }
            _ => {
                let sleep = Duration::from_micros(t.saturating_sub(now));
                let _ = monoio::time::timeout(sleep, w.pacer.wake.wait()).await;
            }
        }
    }
}

/// Below this much time before the next due wake-up the spinning pacer spins (goes round the
/// executor and reads the clock) instead of sleeping: monoio's timer wheel has 1 ms ticks,
/// rounds a deadline up to the next one and parks for whole ticks, so a sleep can end up to
/// 2 ms late. Above it, the pacer sleeps for the part that cannot overshoot ([`pacer_sleep_us`]).
pub const PACER_SPIN_US: u64 = 2_500;

/// How long the spinning pacer may sleep when the next wake-up is `wait_us` away: 0 means spin.
/// A monoio sleep of `d` ends within `d + 2 ms` (plus scheduling), so it sleeps `wait - 2.5 ms`.
pub fn pacer_sleep_us(wait_us: u64) -> u64 {
    wait_us.saturating_sub(PACER_SPIN_US)
}

/// `--pacer spin`: sleeps while the next due time is far ([`PACER_SPIN_US`]), spins otherwise.
///
/// A spin step must go through the kernel: the io_uring driver sets up the ring with
/// `DEFER_TASKRUN`, so completions (acks, deliveries, finished writes) only come in when the
/// runtime enters the ring to wait, which it does only once no task is ready. A task that just
/// yields keeps one ready and holds every completion back until monoio's next timer tick (up to
/// 1 ms). So each step reads a byte of `/dev/zero` through the ring (it completes at once; the
/// runtime parks without blocking, reaps completions and runs due timers), then yields. Once a
/// millisecond it also waits on a timer already due, so that the runtime parks whatever happens.
async fn spin_pacer(w: Rc<Worker>) {
    let mut zero = monoio::fs::File::open("/dev/zero").await.ok();
    let mut buf = Some(Vec::<u8>::with_capacity(1));
    let mut last_ms = 0;
    while w.phase() < Phase::Stop {
        let now = w.now_us();
        let Some(t) = w.pacer.fire(now) else {
            w.pacer.wake.wait().await;
            continue;
        };
        let sleep = pacer_sleep_us(t.saturating_sub(now));
        if sleep > 0 || zero.is_none() {
            let wait = if zero.is_none() { t.saturating_sub(now) } else { sleep };
            let _ = monoio::time::timeout(Duration::from_micros(wait), w.pacer.wake.wait()).await;
            continue;
        }
        if let (Some(f), Some(b)) = (&zero, buf.take()) {
            let (res, b) = f.read_at(b, 0).await;
            buf = Some(b);
            if res.is_err() {
                zero = None;
            }
        }
        if now / 1000 != last_ms {
            // A deadline in the past but after the wheel's last processed tick waits for the
            // next park, which does not block (the wheel has a due entry).
            last_ms = now / 1000;
            let past = monoio::time::Instant::now() - Duration::from_millis(1);
            monoio::time::sleep_until(past).await;
        } else {
            tim_shards::yield_now().await;
        }
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
    /// Open-loop send times.
    pub pacer: Pacer,
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
            pacer: Pacer::default(),
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
pub async fn run(g: Arc<Global>, id: usize, driver: DriverKind) {
    let w = Rc::new(Worker::new(g.clone(), id));
    let threads = g.cfg.threads;
    monoio::spawn(control(w.clone()));
    monoio::spawn(pacer(w.clone(), driver == DriverKind::IoUring));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(n: &Notify) -> bool {
        n.flag.replace(false)
    }

    #[test]
    fn pacer_wakes_in_time_order() {
        let p = Pacer::default();
        let (a, b) = (Rc::new(Notify::default()), Rc::new(Notify::default()));
        let (sa, sb) = (p.register(&a), p.register(&b));
        p.wake_at(sa, 300);
        p.wake_at(sb, 100);
        assert!(fired(&p.wake), "a new earliest request wakes the pacer");
        assert_eq!(p.fire(99), Some(100));
        assert!(!fired(&a) && !fired(&b));
        assert_eq!(p.fire(100), Some(300));
        assert!(!fired(&a) && fired(&b));
        // An earlier request replaces a later one; a later one does not.
        p.wake_at(sa, 200);
        p.wake_at(sa, 250);
        assert_eq!(p.fire(150), Some(200));
        assert_eq!(p.fire(200), None, "the stale 300 entry is dropped");
        assert!(fired(&a));
        assert_eq!(p.fire(1_000), None);
        assert!(!fired(&a));
    }

    #[test]
    fn spinning_pacer_sleeps_only_the_part_that_cannot_overshoot() {
        assert_eq!(pacer_sleep_us(0), 0);
        assert_eq!(pacer_sleep_us(PACER_SPIN_US), 0);
        assert_eq!(pacer_sleep_us(5_000), 5_000 - PACER_SPIN_US);
    }
}
