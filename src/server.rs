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
    transport::{self, stream::App, tcp, tls::TlsCerts},
    workers::Workers,
};

/// What a client listener's connections speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listen {
    /// The binary protocol.
    Tcp,
    /// The binary protocol over TLS.
    Tls,
    /// WebSocket (and the web page).
    Ws,
    /// WebSocket over TLS.
    Wss,
}

/// A running server.
pub struct Server {
    /// The binary protocol's address.
    pub addr: SocketAddr,
    /// The WebSocket listener's address (`gateway.ws_listen`).
    pub ws_addr: Option<SocketAddr>,
    /// The binary protocol over TLS (`tls.listen`).
    pub tls_addr: Option<SocketAddr>,
    /// WebSocket over TLS (`tls.ws_listen`).
    pub wss_addr: Option<SocketAddr>,
    tls: Option<Arc<TlsCerts>>,
    pub drivers: Vec<DriverKind>,
    shared: Arc<Shared>,
    shards: Shards<Envelope>,
    workers: Vec<JoinHandle<()>>,
    /// This node's membership and links, in a cluster.
    cluster: std::sync::Mutex<Option<crate::cluster::node::ClusterHandle>>,
    /// The admin API, when configured.
    admin: std::sync::Mutex<Option<crate::admin::AdminServer>>,
    /// The admin API's address.
    pub admin_addr: Option<SocketAddr>,
}

/// The security settings the node runs with: in a cluster on the memory store without a
/// `name_key`, the key of account names is derived from the cluster secret, so that every
/// replica finds a name under the same key.
fn security_of(cfg: &Config) -> crate::config::Security {
    let mut sec = cfg.security.clone();
    if sec.name_key.is_empty() && cfg.cluster.enabled() && cfg.store.backend == "memory" {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(cfg.cluster.secret.as_bytes())
            .expect("any key length");
        mac.update(b"tim name key v1");
        sec.name_key = hex::encode(mac.finalize().into_bytes());
    }
    sec
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
    let tls = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(cert), Some(key)) if cfg.tls.enabled() => Some(Arc::new(TlsCerts::load(cert, key)?)),
        _ => None,
    };
    // One group of SO_REUSEPORT listeners per client listener: each shard accepts on its own.
    let mut per_shard: Vec<Vec<(Listen, std::net::TcpListener)>> = (0..shards).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for (kind, addr) in [
        (Listen::Tcp, Some(cfg.server.listen)),
        (Listen::Ws, cfg.gateway.ws_listen),
        (Listen::Tls, cfg.tls.listen),
        (Listen::Wss, cfg.tls.ws_listen),
    ] {
        let Some(addr) = addr else { continue };
        let (got, listeners) = bind_reuseport_group(addr, shards, cfg.server.backlog)
            .with_context(|| format!("binding {addr} ({kind:?} listener)"))?;
        bound.push((kind, got));
        for (i, l) in listeners.into_iter().enumerate() {
            per_shard[i].push((kind, l));
        }
    }
    let addr_of = |k: Listen| bound.iter().find(|(b, _)| *b == k).map(|(_, a)| *a);
    let addr = addr_of(Listen::Tcp).expect("the binary listener is always bound");
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
    // In a cluster the memory store is a replica of every node's (see `store::memory`).
    let mut replica = None;
    let store: Arc<dyn Store> = match cfg.store.backend.as_str() {
        "memory" if cfg.cluster.enabled() => {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::store::memory::REPL_QUEUE_MAX);
            let m = Arc::new(MemoryStore::replicated(tx));
            replica = Some((m.clone(), rx));
            m
        }
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
            &security_of(&cfg),
            (cfg.store.backend == "embedded").then_some(cfg.store.data_dir.as_path()),
        )?,
        store,
        workers,
        stop: Default::default(),
        dropped_envelopes: Default::default(),
        table: Default::default(),
        pressure: Default::default(),
        cluster_bounced: Default::default(),
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
        // A cluster node's gateway is the mesh's endpoint after the shards'; the admin API's
        // comes after it.
        extra_ports: usize::from(cfg.cluster.enabled()) + usize::from(cfg.admin.listen.is_some()),
    };
    let listeners: Vec<_> = per_shard.into_iter().map(|l| std::sync::Mutex::new(Some(l))).collect();
    let listeners = Arc::new(listeners);
    let sh = shared.clone();
    let certs = tls.clone();
    let running = tim_shards::start::<Envelope, _, _>(&rt, move |ctx: ShardContext<Envelope>| {
        let listeners =
            listeners[ctx.id].lock().expect("not poisoned").take().expect("listeners for every shard");
        run_shard(ctx, sh.clone(), listeners, certs.clone())
    })?;
    let cluster = if cfg.cluster.enabled() {
        let port = running.mesh.port(shards, 0);
        let handle = match crate::cluster::node::start(
            &cfg,
            shards,
            port,
            shared.table.clone(),
            shared.pressure.clone(),
            shared.cluster_bounced.clone(),
            replica,
        ) {
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
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = match cfg.admin.listen {
        Some(a) => {
            let port = running.mesh.port(shards + usize::from(cfg.cluster.enabled()), 0);
            match crate::admin::start(&cfg, a, shared.clone(), port, shards, ready.clone()) {
                Ok(admin) => Some(admin),
                Err(e) => {
                    running.signal_all();
                    return Err(e);
                }
            }
        }
        None => None,
    };
    ready.store(true, Ordering::Release);
    Ok(Server {
        admin_addr: admin.as_ref().map(|a| a.addr),
        admin: std::sync::Mutex::new(admin),
        addr,
        ws_addr: addr_of(Listen::Ws),
        tls_addr: addr_of(Listen::Tls),
        wss_addr: addr_of(Listen::Wss),
        tls,
        drivers: running.drivers.clone(),
        shared,
        shards: running,
        workers: worker_handles,
        cluster: std::sync::Mutex::new(cluster),
    })
}

impl Server {
    /// Read the TLS certificate and key again (SIGHUP): new connections get them, open ones
    /// keep theirs. On an error the old ones stay. Without TLS listeners: nothing to do.
    pub fn reload_tls(&self) -> anyhow::Result<bool> {
        match &self.tls {
            Some(t) => t.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Begin a graceful stop: shards stop accepting, kick their sessions with ShuttingDown, drain.
    pub fn stop(&self) {
        if let Some(mut a) = self.admin.lock().expect("not poisoned").take() {
            a.stop();
        }
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

async fn run_shard(
    ctx: ShardContext<Envelope>,
    shared: Arc<Shared>,
    listeners: Vec<(Listen, std::net::TcpListener)>,
    tls: Option<Arc<TlsCerts>>,
) {
    let drain = Duration::from_millis(shared.cfg.limits.shutdown_drain_ms);
    let shard = Rc::new(Shard::new(ctx.id, ctx.shards, shared, ctx.port));
    CURRENT.with(|c| *c.borrow_mut() = Some(shard.clone()));
    crate::metrics::enable(shard.cfg().admin.metrics);
    monoio::spawn(shard.clone().run_mesh());
    monoio::spawn(shard.clone().run_timeouts());
    monoio::spawn(shard.clone().run_fanout());
    // Delivery cursors (durable stores) and read positions (every store).
    monoio::spawn(shard.clone().run_cursor_flush());
    if shard.cfg().limits.presence_coalesce_ms > 0 {
        monoio::spawn(shard.clone().run_presence_flush());
    }
    if shard.shared.store.durable() && shard.id == 0 {
        monoio::spawn(shard.clone().run_burn_sweep());
    }
    let mut loops = Vec::new();
    for (kind, listener) in listeners {
        if ctx.driver == DriverKind::Epoll {
            let _ = listener.set_nonblocking(true);
        }
        match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => loops.push(monoio::spawn(accept_loop(shard.clone(), l, kind, tls.clone()))),
            Err(e) => log::error!("shard {}: {kind:?} listener: {e}", ctx.id),
        }
    }
    for l in loops {
        l.await;
    }
    let deadline = Instant::now() + drain;
    while !shard.sessions.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    shard.flush_cursors().await;
    log::info!("shard {} stopped ({} sessions left)", shard.id, shard.sessions.borrow().len());
    CURRENT.with(|c| *c.borrow_mut() = None);
}

/// Accept connections on one listener until the shard stops.
async fn accept_loop(
    shard: Rc<Shard>,
    listener: monoio::net::TcpListener,
    kind: Listen,
    tls: Option<Arc<TlsCerts>>,
) {
    let conn_max = shard.cfg().limits.connections_per_shard_max;
    // A stop signalled before this loop first waits is seen here; later ones wake the wait.
    while !shard.shutting_down.get() {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let peer = Some(peer);
                    let sh = shard.clone();
                    if shard.sessions.borrow().len() >= conn_max {
                        if kind == Listen::Tcp {
                            transport::refuse(stream);
                        }
                    } else {
                        let certs = || tls.as_ref().map(|t| t.current());
                        match kind {
                            Listen::Tcp => drop(monoio::spawn(tcp::serve(sh, stream, peer))),
                            Listen::Tls => drop(monoio::spawn(transport::stream::serve(sh, stream, peer, certs(), App::Binary))),
                            Listen::Ws => drop(monoio::spawn(transport::stream::serve(sh, stream, peer, None, App::WebSocket))),
                            Listen::Wss => drop(monoio::spawn(transport::stream::serve(sh, stream, peer, certs(), App::WebSocket))),
                        }
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
    if kind == Listen::Tcp {
        kick_backlog(&listener);
    }
}
