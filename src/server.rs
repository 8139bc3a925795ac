//! Starting and stopping a server: bind one SO_REUSEPORT listener per shard, start the worker
//! threads and the shards, and on stop let every shard drain its sessions and end.
//!
//! Key types: [`Server`] (a running server), [`start`].

use std::{
    net::SocketAddr,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use tim_shards::{listener::bind_reuseport_group, Driver, DriverKind, RuntimeConfig, ShardContext, Shards};

use crate::{
    auth::Auth,
    config::Config,
    envelope::Envelope,
    protocol::ErrorCode,
    shard::{Shard, Shared, CURRENT, SHARDS_MAX},
    store::{embedded::EmbeddedStore, postgres::PostgresStore, MemoryStore, Store},
    transport::tcp,
    workers::Workers,
};

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub drivers: Vec<DriverKind>,
    shared: Arc<Shared>,
    shards: Shards<Envelope>,
    workers: Vec<JoinHandle<()>>,
    /// This node's membership and links, in a cluster.
    cluster: std::sync::Mutex<Option<crate::cluster::node::ClusterHandle>>,
}

pub fn start(cfg: Config) -> anyhow::Result<Server> {
    cfg.validate()?;
    let shards = cfg.shard_count();
    anyhow::ensure!(shards <= SHARDS_MAX, "at most {SHARDS_MAX} shards");
    let driver = match cfg.server.driver.as_str() {
        "io_uring" => Driver::IoUring,
        "epoll" => Driver::Epoll,
        _ => Driver::Auto,
    };
    let (addr, listeners) = bind_reuseport_group(cfg.server.listen, shards, cfg.server.backlog)
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    let hash_threads = if cfg.server.worker_threads == 0 { shards } else { cfg.server.worker_threads };
    let store_threads = match cfg.server.store_threads {
        // A store call holds its thread while it waits on the database, and a range that stops
        // answering can hold at most one thread per connection of its pool (further calls to it
        // fail at once): one thread per connection leaves the other ranges theirs.
        0 if cfg.store.backend == "postgres" => {
            let pg = &cfg.store.postgres;
            shards + pg.connections_per_partition * pg.partitions.len()
        }
        0 => shards,
        n => n,
    };
    let store: Arc<dyn Store> = match cfg.store.backend.as_str() {
        "memory" => Arc::new(MemoryStore::default()),
        "postgres" => {
            Arc::new(PostgresStore::open(&cfg.store.postgres).context("opening the postgres store")?)
        }
        _ => Arc::new(EmbeddedStore::open(&cfg.store).context("opening the embedded store")?),
    };
    let load_threads = shards * store.partitions();
    let (workers, worker_handles) =
        Workers::start(hash_threads, store_threads, load_threads, cfg.limits.worker_queue_max);
    let shared = Arc::new(Shared {
        auth: Auth::new(
            &cfg.security,
            (cfg.store.backend == "embedded").then_some(cfg.store.data_dir.as_path()),
        )?,
        store,
        workers,
        stop: Default::default(),
        dropped_envelopes: Default::default(),
        table: Default::default(),
        cfg: cfg.clone(),
    });
    let rt = RuntimeConfig {
        shards,
        driver,
        pin_cores: cfg.server.pin_cores,
        ring_entries: cfg.server.ring_entries,
        mesh_capacity: cfg.limits.mesh_queue_capacity,
        spin_rounds: cfg.server.spin_rounds,
        thread_name: "tim-shard".into(),
        // A cluster node's gateway is the mesh's endpoint after the shards'.
        extra_ports: usize::from(cfg.cluster.enabled()),
    };
    let listeners: Vec<_> = listeners.into_iter().map(|l| std::sync::Mutex::new(Some(l))).collect();
    let listeners = Arc::new(listeners);
    let sh = shared.clone();
    let running = tim_shards::start::<Envelope, _, _>(&rt, move |ctx: ShardContext<Envelope>| {
        let listener =
            listeners[ctx.id].lock().expect("not poisoned").take().expect("one listener per shard");
        run_shard(ctx, sh.clone(), listener)
    })?;
    let cluster = if cfg.cluster.enabled() {
        let port = running.mesh.port(shards, 0);
        let handle = match crate::cluster::node::start(&cfg, shards, port, shared.table.clone()) {
            Ok(h) => h,
            Err(e) => {
                running.signal_all();
                return Err(e);
            }
        };
        if !handle.wait_joined(Duration::from_millis(cfg.cluster.join_wait_ms)) {
            log::warn!(
                "cluster: no member answered within {} ms; running alone until one does",
                cfg.cluster.join_wait_ms
            );
        }
        Some(handle)
    } else {
        None
    };
    Ok(Server {
        addr,
        drivers: running.drivers.clone(),
        shared,
        shards: running,
        workers: worker_handles,
        cluster: std::sync::Mutex::new(cluster),
    })
}

impl Server {
    /// Begin a graceful stop: shards stop accepting, kick their sessions with ShuttingDown, drain.
    pub fn stop(&self) {
        // A cluster node first tells the others it leaves: they take its partitions now, and
        // its clients, kicked with ShuttingDown, find their owners moved when they reconnect.
        if let Some(c) = self.cluster.lock().expect("not poisoned").take() {
            c.leave();
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shards.signal_all();
    }

    /// Wait for the shards (and then the workers) to end.
    pub fn join(self) -> anyhow::Result<()> {
        self.shards.join()?;
        if let Some(c) = self.cluster.lock().expect("not poisoned").take() {
            c.leave();
        }
        // Tasks left on a stopped executor are not dropped, so Shared may outlive the shards:
        // end the workers explicitly.
        self.shared.workers.stop();
        self.shared.store.close();
        for w in self.workers {
            let _ = w.join();
        }
        Ok(())
    }
}

/// Connections the kernel completed but the shard had not accepted when it stopped would be
/// reset when the listener closes: accept each and tell it the server is going away.
fn kick_backlog(listener: &monoio::net::TcpListener) {
    use std::os::fd::AsRawFd;
    let kick = crate::session::kick_frame(ErrorCode::ShuttingDown);
    let lfd = listener.as_raw_fd();
    // With io_uring the listener is blocking: accept4 must not wait for a connection.
    // SAFETY: fcntl on a valid fd.
    unsafe { libc::fcntl(lfd, libc::F_SETFL, libc::fcntl(lfd, libc::F_GETFL) | libc::O_NONBLOCK) };
    for _ in 0..BACKLOG_KICK_MAX {
        // SAFETY: a valid listening fd; null address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                lfd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            break;
        }
        // SAFETY: `fd` is ours to write to and close; MSG_DONTWAIT never blocks.
        unsafe {
            libc::send(fd, kick.as_ptr().cast(), kick.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
            libc::shutdown(fd, libc::SHUT_WR);
            libc::close(fd);
        }
    }
}

/// Pending connections one shard answers at shutdown, at most (the rest are reset).
const BACKLOG_KICK_MAX: usize = 4096;

async fn run_shard(ctx: ShardContext<Envelope>, shared: Arc<Shared>, listener: std::net::TcpListener) {
    if ctx.driver == DriverKind::Epoll {
        let _ = listener.set_nonblocking(true);
    }
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("shard {}: listener: {e}", ctx.id);
            return;
        }
    };
    let drain = Duration::from_millis(shared.cfg.limits.shutdown_drain_ms);
    let conn_max = shared.cfg.limits.connections_per_shard_max;
    let shard = Rc::new(Shard::new(ctx.id, ctx.shards, shared, ctx.port));
    CURRENT.with(|c| *c.borrow_mut() = Some(shard.clone()));
    monoio::spawn(shard.clone().run_mesh());
    monoio::spawn(shard.clone().run_timeouts());
    monoio::spawn(shard.clone().run_fanout());
    if shard.shared.store.durable() {
        monoio::spawn(shard.clone().run_cursor_flush());
    }
    // A stop signalled before this loop first waits is seen here; later ones wake the wait.
    while !shard.shutting_down.get() {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if shard.sessions.borrow().len() >= conn_max {
                        tcp::refuse(stream);
                    } else {
                        monoio::spawn(tcp::serve(shard.clone(), stream, Some(peer)));
                    }
                }
                Err(e) => {
                    log::warn!("shard {}: accept: {e}", shard.id);
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shard.shutdown.wait() => break,
        }
    }
    kick_backlog(&listener);
    drop(listener);
    let deadline = Instant::now() + drain;
    while !shard.sessions.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    shard.flush_cursors().await;
    log::info!("shard {} stopped ({} sessions left)", shard.id, shard.sessions.borrow().len());
    CURRENT.with(|c| *c.borrow_mut() = None);
}
