//! Benchmarks of the cross-shard mesh of `tim-shards`.
//!
//! - `mesh/batched_throughput`: shard 0 pushes `iters * BATCH` u64s to shard 1 (yielding on
//!   `Full`), shard 1 drains them with `recv_batch` in batches of up to 256. Timed in the shards,
//!   from the producer's first send to the consumer's last receipt.
//! - `mesh/one_message_latency`: one message ping-pongs between shard 0 and shard 1; the reported
//!   time per iteration is one hop (round trip / 2), once with receivers spinning 64 executor turns
//!   before parking, once with `spin_rounds = 0` so that every hop parks and needs a wake-up.
//! - `mesh/try_send_try_recv_single_thread`: push then pop in one thread, no executors: the raw
//!   queue cost.
//!
//! The shards are started once per benchmark function and driven from the bench thread through
//! an atomic command slot (waking the shard's executor) and an std channel back; they are stopped
//! at the end of the function. Every wait has a timeout, so a broken shard fails the run instead
//! of hanging it.

use std::{
    future::Future,
    hint::black_box,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tim_shards::{MeshPort, RuntimeConfig, SendError, ShardContext, Shards};

/// Messages sent per criterion iteration in the throughput benchmark.
const BATCH: u64 = 1024;
/// Largest batch a receiver drains at once.
const RECV_MAX: usize = 256;
/// How long the bench thread waits for a shard before declaring it stuck.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Command that makes a shard's main future return.
const STOP: u64 = u64::MAX;

/// A one-slot mailbox from the bench thread to one shard's main future. `0` means "empty".
struct Cmd {
    slot: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl Cmd {
    fn new() -> Self {
        Cmd { slot: AtomicU64::new(0), waker: Mutex::new(None) }
    }

    /// Post `v` (non-zero) and wake the shard if it is waiting.
    fn post(&self, v: u64) {
        debug_assert_ne!(v, 0);
        self.slot.store(v, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Wait (parking the executor) for the next posted value.
    fn next(&self) -> NextCmd<'_> {
        NextCmd(self)
    }
}

struct NextCmd<'a>(&'a Cmd);

impl Future for NextCmd<'_> {
    type Output = u64;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let cmd = self.0;
        let v = cmd.slot.swap(0, Ordering::SeqCst);
        if v != 0 {
            return Poll::Ready(v);
        }
        // Register under the lock, then re-check: `post` stores before it takes the waker.
        *cmd.waker.lock().unwrap() = Some(cx.waker().clone());
        match cmd.slot.swap(0, Ordering::SeqCst) {
            0 => Poll::Pending,
            v => Poll::Ready(v),
        }
    }
}

/// Send `msg` to `dst`, yielding to the executor while the queue is full.
async fn send_until_accepted(port: &MeshPort<u64>, dst: usize, mut msg: u64) {
    loop {
        match port.try_send(dst, msg) {
            Ok(()) => return,
            Err(SendError::Full(m)) => {
                msg = m;
                tim_shards::yield_now().await;
            }
            Err(SendError::ToSelf(_)) => unreachable!("benchmarks never send to self"),
        }
    }
}

/// State shared by the bench thread and the two shards.
struct Ctl {
    /// Commands for shard 0 (the driver of each benchmark).
    cmd: Cmd,
    /// Set before the final `signal_all`, so that shard 1's empty wake-up means "stop".
    stop: AtomicBool,
    /// Throughput: cumulative number of messages shard 1 must have received when a run ends.
    target: AtomicU64,
    /// Throughput: when shard 0 started the current run.
    started: Mutex<Option<Instant>>,
    /// Shard → bench thread: the measured duration of a run.
    done: mpsc::Sender<Duration>,
}

fn config(spin_rounds: u32) -> RuntimeConfig {
    RuntimeConfig { shards: 2, spin_rounds, thread_name: "bench-shard".into(), ..RuntimeConfig::default() }
}

/// Start two shards running `body` and hand back what the bench thread needs to drive them.
fn start_rig<F, Fut>(spin_rounds: u32, body: F) -> (Shards<u64>, Arc<Ctl>, mpsc::Receiver<Duration>)
where
    F: Fn(ShardContext<u64>, Arc<Ctl>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (done, done_rx) = mpsc::channel();
    let ctl = Arc::new(Ctl {
        cmd: Cmd::new(),
        stop: AtomicBool::new(false),
        target: AtomicU64::new(0),
        started: Mutex::new(None),
        done,
    });
    let shard_ctl = ctl.clone();
    let shards = tim_shards::start(&config(spin_rounds), move |ctx| body(ctx, shard_ctl.clone()))
        .expect("start shards");
    eprintln!(
        "shards: {} (spin_rounds {spin_rounds}), drivers {:?}",
        shards.drivers.len(),
        shards.drivers.iter().map(|d| d.name()).collect::<Vec<_>>()
    );
    (shards, ctl, done_rx)
}

fn stop_rig(shards: Shards<u64>, ctl: &Ctl) {
    ctl.stop.store(true, Ordering::SeqCst);
    ctl.cmd.post(STOP);
    shards.signal_all();
    shards.join().expect("shard threads ended cleanly");
}

/// Shard 1 of the throughput benchmark: drain, count, report when the target is reached.
async fn drain(ctx: ShardContext<u64>, ctl: Arc<Ctl>) {
    let mut buf = Vec::with_capacity(RECV_MAX);
    let mut received = 0u64;
    let mut sum = 0u64;
    loop {
        buf.clear();
        let k = ctx.port.recv_batch(&mut buf, RECV_MAX).await;
        if k == 0 {
            if ctl.stop.load(Ordering::SeqCst) {
                break;
            }
            continue;
        }
        sum = buf.iter().fold(sum, |s, &m| s.wrapping_add(m));
        received += k as u64;
        // `target` is stored before shard 0 is told to send, so every message of a run sees it.
        if received == ctl.target.load(Ordering::Acquire) {
            let end = Instant::now();
            let start = ctl.started.lock().unwrap().take().expect("run start recorded");
            let _ = ctl.done.send(end - start);
        }
    }
    black_box(sum);
}

/// Shard 0 of the throughput benchmark: on each command `n`, push `n` messages to shard 1.
async fn flood(ctx: ShardContext<u64>, ctl: Arc<Ctl>) {
    loop {
        let n = ctl.cmd.next().await;
        if n == STOP {
            break;
        }
        *ctl.started.lock().unwrap() = Some(Instant::now());
        for i in 0..n {
            send_until_accepted(&ctx.port, 1, i).await;
        }
    }
}

fn batched_throughput(c: &mut Criterion) {
    let (shards, ctl, done_rx) = start_rig(64, |ctx, ctl| async move {
        match ctx.id {
            0 => flood(ctx, ctl).await,
            _ => drain(ctx, ctl).await,
        }
    });
    let mut total = 0u64;
    let mut g = c.benchmark_group("mesh/batched_throughput");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function(format!("u64_x{BATCH}_recv{RECV_MAX}"), |b| {
        b.iter_custom(|iters| {
            let n = iters * BATCH;
            total += n;
            ctl.target.store(total, Ordering::Release);
            ctl.cmd.post(n);
            done_rx.recv_timeout(TIMEOUT).expect("consumer shard finished the run")
        })
    });
    g.finish();
    stop_rig(shards, &ctl);
}

/// Shard 1 of the latency benchmark: send every message straight back to shard 0.
async fn echo(ctx: ShardContext<u64>, ctl: Arc<Ctl>) {
    let mut buf = Vec::with_capacity(RECV_MAX);
    loop {
        buf.clear();
        if ctx.port.recv_batch(&mut buf, RECV_MAX).await == 0 {
            if ctl.stop.load(Ordering::SeqCst) {
                break;
            }
            continue;
        }
        for &m in &buf {
            send_until_accepted(&ctx.port, 0, m).await;
        }
    }
}

/// Shard 0 of the latency benchmark: on each command `n`, do `n` round trips and report the time.
async fn ping(ctx: ShardContext<u64>, ctl: Arc<Ctl>) {
    let mut buf = Vec::with_capacity(1);
    loop {
        let n = ctl.cmd.next().await;
        if n == STOP {
            break;
        }
        let start = Instant::now();
        for i in 0..n {
            send_until_accepted(&ctx.port, 1, i).await;
            buf.clear();
            // 0 would mean "signalled", which only happens at shutdown, after this run ended.
            while ctx.port.recv_batch(&mut buf, 1).await == 0 {}
            debug_assert_eq!(buf[0], i);
        }
        let _ = ctl.done.send(start.elapsed());
    }
}

fn one_message_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesh/one_message_latency");
    // One iteration = one hop: the measured round trip is halved.
    g.throughput(Throughput::Elements(1));
    for (name, spin_rounds) in [("hop_spin_64", 64), ("hop_spin_0_parked", 0)] {
        let (shards, ctl, done_rx) = start_rig(spin_rounds, |ctx, ctl| async move {
            match ctx.id {
                0 => ping(ctx, ctl).await,
                _ => echo(ctx, ctl).await,
            }
        });
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                ctl.cmd.post(iters);
                done_rx.recv_timeout(TIMEOUT).expect("ping shard finished the run") / 2
            })
        });
        eprintln!(
            "{name}: wake-ups from park: shard 0 {}, shard 1 {}",
            shards.mesh.wakeups(0),
            shards.mesh.wakeups(1)
        );
        stop_rig(shards, &ctl);
    }
    g.finish();
}

fn try_send_try_recv_single_thread(c: &mut Criterion) {
    let mesh = tim_shards::Mesh::<u64>::new(2, 1024);
    let tx = mesh.port(0, 0);
    let rx = mesh.port(1, 0);
    let mut buf = Vec::with_capacity(RECV_MAX);
    let mut g = c.benchmark_group("mesh/try_send_try_recv_single_thread");

    g.throughput(Throughput::Elements(1));
    g.bench_function("one", |b| {
        b.iter(|| {
            tx.try_send(1, black_box(7)).expect("queue has room");
            buf.clear();
            let k = rx.try_recv_batch(&mut buf, 1);
            black_box((k, buf[0]))
        })
    });

    const N: u64 = 64;
    g.throughput(Throughput::Elements(N));
    g.bench_function(format!("batch_{N}"), |b| {
        b.iter(|| {
            for i in 0..N {
                tx.try_send(1, black_box(i)).expect("queue has room");
            }
            buf.clear();
            let k = rx.try_recv_batch(&mut buf, RECV_MAX);
            assert_eq!(k, N as usize);
            black_box(&buf);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(1000))
        .measurement_time(Duration::from_secs(3));
    targets = batched_throughput, one_message_latency, try_send_try_recv_single_thread
}
criterion_main!(benches);
