//! Where should tim's PostgreSQL connections live? One commit of a batch of 1, 64 or 1024
//! messages (tim's `messages` rows, 144-byte payloads, one `INSERT … SELECT FROM UNNEST(…)`),
//! driven from a monoio shard (io_uring with tim's ring flags, pinned like shard 0), with the
//! connections in one of two places:
//!
//! - `pool`: tim as built. The shard calls `PostgresStore::append`, which runs the insert on the
//!   store's dedicated tokio runtime (2 workers, 4 pooled connections), and awaits a
//!   `futures_channel::oneshot` that the completion callback fulfils from a pool thread.
//!   `pool_t1` is the same store with `store.postgres.threads = 1`: a client and its connection
//!   task then share the one worker, so a commit crosses threads only to the pool and back.
//! - `shard`: the tokio-postgres connections live on the shard itself. A monoio `TcpStream` is
//!   turned into a `TcpStreamPoll` (monoio's `poll-io`: readiness through an epoll fd polled by
//!   the ring), which implements tokio's `AsyncRead`/`AsyncWrite`; `Config::connect_raw` runs on
//!   it and the `Connection` future is `monoio::spawn`ed on the same thread. No thread hop.
//!
//! `commit/*` is the latency of one commit with nothing else in flight. `inflight4x64/*` keeps 4
//! commits of 64 rows in flight from the one shard (4 connections in every placement; and
//! `shard_1conn`, where the 4 share one pipelined connection) and reports the time per commit.
//!
//! `hop_only/*` is the hop of `pool` without PostgreSQL: shard → tokio worker → shard, back to
//! back (`hot`) or after 1 ms idle (`cold`: both threads parked, as during a real commit).
//!
//! Needs `TIM_BENCH_PG_URL` (a TCP URL; it is skipped otherwise). The bench works in its own
//! schema `tim_pg_placement` of that database and truncates its `messages` before every case.

use std::{
    cell::Cell,
    rc::Rc,
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::StreamExt;
use tim::{
    config::{PgPartition, PostgresConfig},
    store::{postgres::PostgresStore, Store, StoredMessage},
};
use tokio_postgres::{Client, NoTls};

const SCHEMA: &str = "tim_pg_placement";
const SIZES: [usize; 3] = [1, 64, 1024];
const INFLIGHT: usize = 4;
const INFLIGHT_ROWS: usize = 64;
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Placement {
    /// `PostgresStore::append` on the dedicated tokio runtime (2 workers, tim's default).
    Pool,
    /// The same with `store.postgres.threads = 1`.
    Pool1,
    /// tokio-postgres on the shard, one connection per in-flight commit.
    Shard,
    /// tokio-postgres on the shard, one connection shared (pipelined) by all commits.
    Shard1Conn,
    /// No PostgreSQL: only the hop, a task spawned on a bare 2-worker tokio runtime that
    /// fulfils the oneshot at once, back to back (threads hot).
    HopOnly,
    /// The same after 1 ms of idleness (untimed), so that both sides are parked as they are
    /// while a commit waits for PostgreSQL.
    HopCold,
}

/// `iters` commits of `rows` rows, `inflight` at a time; answers the summed commit latency
/// (`inflight == 1`) or the wall time of the whole run.
struct Job {
    placement: Placement,
    rows: usize,
    iters: u64,
    inflight: usize,
    reply: mpsc::Sender<Duration>,
}

/// What the shard's commit tasks share.
#[derive(Clone)]
struct Ctx {
    stores: [Arc<PostgresStore>; 2],
    hop: tokio::runtime::Handle,
    clients: Rc<Vec<Rc<Client>>>,
    next: Rc<Cell<u64>>,
}

/// `n` messages of distinct conversations (a stored payload of 144 bytes).
fn batch(next: &Cell<u64>, n: usize) -> Vec<StoredMessage> {
    let payload = Bytes::from(vec![7u8; 144]);
    (0..n)
        .map(|_| {
            let id = next.get() + 1;
            next.set(id);
            StoredMessage {
                conv: (1, 1_000_000 + id),
                seq: 1,
                msg_id: id,
                ts_ms: 1_800_000_000_000,
                sender: 1,
                sender_device: 9,
                client_msg_id: id,
                payload: payload.clone(),
                group: None,
                edit: None,
            }
        })
        .collect()
}

/// The commit as tim does it now (src/shard.rs `run_commits`).
async fn commit_pool(store: &PostgresStore, msgs: Vec<StoredMessage>) {
    let (tx, rx) = futures_channel::oneshot::channel();
    let part = store.partition_of(msgs[0].conv);
    store.append(part, msgs, Box::new(move |r| drop(tx.send(r))));
    let outcome = monoio::time::timeout(COMMIT_TIMEOUT, rx).await.expect("commit in time");
    outcome.expect("commit answered").expect("commit succeeded");
}

/// tim's own insert (`tim::store::postgres::insert_messages`), on a shard-local connection.
async fn commit_shard(client: &Client, batch: Vec<StoredMessage>) {
    let insert = tim::store::postgres::insert_messages(client, None, &batch);
    let dups = monoio::time::timeout(COMMIT_TIMEOUT, insert).await.expect("commit in time");
    assert!(dups.expect("commit succeeded").expect("batch accounted for").is_empty(), "every message new");
}

/// One commit task: takes commits from `left` until none remain; answers its summed latency.
async fn committer(
    ctx: Ctx,
    placement: Placement,
    worker: usize,
    rows: usize,
    left: Rc<Cell<u64>>,
) -> Duration {
    let mut busy = Duration::ZERO;
    while left.get() > 0 {
        left.set(left.get() - 1);
        let msgs = batch(&ctx.next, rows);
        if let Placement::HopCold = placement {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let t = Instant::now();
        match placement {
            Placement::Pool => commit_pool(&ctx.stores[0], msgs).await,
            Placement::Pool1 => commit_pool(&ctx.stores[1], msgs).await,
            Placement::Shard => commit_shard(&ctx.clients[worker], msgs).await,
            Placement::Shard1Conn => commit_shard(&ctx.clients[0], msgs).await,
            Placement::HopOnly | Placement::HopCold => {
                let (tx, rx) = futures_channel::oneshot::channel();
                ctx.hop.spawn(async move { drop(tx.send(msgs)) });
                rx.await.expect("hop answered");
            }
        }
        busy += t.elapsed();
    }
    busy
}

async fn run(ctx: &Ctx, job: &Job) -> Duration {
    let left = Rc::new(Cell::new(job.iters));
    if job.inflight == 1 {
        return committer(ctx.clone(), job.placement, 0, job.rows, left).await;
    }
    let t = Instant::now();
    let tasks: Vec<_> = (0..job.inflight)
        .map(|w| monoio::spawn(committer(ctx.clone(), job.placement, w, job.rows, left.clone())))
        .collect();
    for task in tasks {
        task.await;
    }
    t.elapsed()
}

/// A tokio-postgres connection living on this monoio thread.
async fn connect_on_shard(cfg: &tokio_postgres::Config) -> Client {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => panic!("pg_placement needs a TCP host in TIM_BENCH_PG_URL"),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let stream = monoio::net::TcpStream::connect((host.as_str(), port)).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay"); // as tokio-postgres does on its own sockets
    let stream = stream.try_into_poll_io().map_err(|(e, _)| e).expect("poll-io stream");
    let (client, connection) = cfg.connect_raw(stream, NoTls).await.expect("postgres handshake");
    monoio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("pg_placement: shard connection ended: {e}");
        }
    });
    client
}

/// The shard: a monoio io_uring executor built like shards/src/runtime.rs, pinned to core 0.
fn shard(
    cfg: tokio_postgres::Config,
    stores: [Arc<PostgresStore>; 2],
    hop: tokio::runtime::Handle,
    mut jobs: futures_channel::mpsc::UnboundedReceiver<Job>,
) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun();
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(1024)
        .uring_builder(urb)
        .enable_timer()
        .build()
        .expect("an io_uring monoio runtime");
    rt.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..INFLIGHT {
            clients.push(Rc::new(connect_on_shard(&cfg).await));
        }
        let ctx = Ctx { stores, hop, clients: Rc::new(clients), next: Rc::new(Cell::new(0)) };
        while let Some(job) = jobs.next().await {
            let d = run(&ctx, &job).await;
            let _ = job.reply.send(d);
        }
    });
}

/// `url` with the bench's schema first on the search path.
fn url_in_schema(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{SCHEMA}")
}

fn placement(c: &mut Criterion) {
    let Ok(url) = std::env::var("TIM_BENCH_PG_URL") else {
        eprintln!("pg_placement skipped: set TIM_BENCH_PG_URL to a database URL to measure it");
        return;
    };
    // Setup connection on a current-thread tokio runtime of the bench thread (driven by block_on).
    let setup_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sql = |cfg: &str, q: &str| {
        let cfg: tokio_postgres::Config = cfg.parse().expect("TIM_BENCH_PG_URL");
        setup_rt.block_on(async {
            let (client, conn) = cfg.connect(NoTls).await.expect("connect to TIM_BENCH_PG_URL");
            let conn = tokio::spawn(conn);
            let done = client.batch_execute(q).await;
            drop(client);
            let _ = conn.await;
            done
        })
    };
    sql(&url, &format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}")).expect("create the bench schema");
    let url = url_in_schema(&url);
    // Creates tim's tables (messages IF NOT EXISTS, with its indexes) in the bench's schema.
    let open = |threads: usize| {
        let partitions = vec![PgPartition { slots: "0-4095".into(), url: url.clone() }];
        let cfg = PostgresConfig { partitions, threads, ..PostgresConfig::default() };
        Arc::new(PostgresStore::open(&cfg).expect("open the PostgreSQL store"))
    };
    let stores = [open(PostgresConfig::default().threads), open(1)];
    let truncate = || {
        sql(&url, "TRUNCATE messages").expect("truncate messages");
        // Best effort (needs superuser or pg_checkpoint): start every case with a fresh checkpoint.
        let _ = sql(&url, "CHECKPOINT");
    };

    let hop_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let hop = hop_rt.handle().clone();
    let (jobs, rx) = futures_channel::mpsc::unbounded::<Job>();
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    let shard_thread = std::thread::Builder::new()
        .name("shard-0".into())
        .spawn(move || shard(cfg, stores, hop, rx))
        .unwrap();
    let run = |placement: Placement, rows: usize, inflight: usize, iters: u64| {
        let (reply, answer) = mpsc::channel();
        jobs.unbounded_send(Job { placement, rows, iters, inflight, reply }).expect("shard running");
        answer.recv().expect("shard answered")
    };

    let mut g = c.benchmark_group("pg_placement/hop_only");
    g.bench_function("hot", |b| b.iter_custom(|iters| run(Placement::HopOnly, 1, 1, iters)));
    // Each iteration idles 1 ms untimed: measure briefly to keep the wall time short.
    g.warm_up_time(Duration::from_millis(100)).measurement_time(Duration::from_millis(200));
    g.bench_function("cold", |b| b.iter_custom(|iters| run(Placement::HopCold, 1, 1, iters)));
    g.finish();

    let mut g = c.benchmark_group("pg_placement/commit");
    for rows in SIZES {
        g.throughput(Throughput::Elements(rows as u64));
        for (name, p) in
            [("pool", Placement::Pool), ("pool_t1", Placement::Pool1), ("shard", Placement::Shard)]
        {
            truncate();
            g.bench_with_input(BenchmarkId::new(name, rows), &rows, |b, &rows| {
                b.iter_custom(|iters| run(p, rows, 1, iters))
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group(format!("pg_placement/inflight{INFLIGHT}x{INFLIGHT_ROWS}"));
    g.throughput(Throughput::Elements(INFLIGHT_ROWS as u64));
    for (name, p) in [
        ("pool", Placement::Pool),
        ("pool_t1", Placement::Pool1),
        ("shard", Placement::Shard),
        ("shard_1conn", Placement::Shard1Conn),
    ] {
        truncate();
        g.bench_function(name, |b| b.iter_custom(|iters| run(p, INFLIGHT_ROWS, INFLIGHT, iters)));
    }
    g.finish();

    drop(jobs);
    shard_thread.join().expect("shard thread");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = placement
}
criterion_main!(benches);
