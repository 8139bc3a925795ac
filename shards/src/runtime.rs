//! Starting the shards: one OS thread per shard, pinned to a CPU, each running its own monoio
//! executor with a timer. Shard `i` is pinned to the `i`-th CPU of those the process may run on
//! ([`allowed_cpus`]), so that `taskset -c 2,3 tim serve` (or a cgroup cpuset, or systemd's
//! `CPUAffinity=`) puts the shards on CPUs 2 and 3 rather than on 0 and 1.
//!
//! Key types: [`RuntimeConfig`], [`Driver`] (asked for), [`DriverKind`] (obtained),
//! [`ShardContext`] (what a shard's main future receives), [`Shards`] (the running set).
//!
//! io_uring rings are built with DEFER_TASKRUN + SINGLE_ISSUER + COOP_TASKRUN (measured ~3.5 M
//! echo msgs/s here, against ~2.4 M without). Where such a ring cannot be built (old kernel,
//! seccomp, `io_uring_disabled`), `Driver::Auto` falls back to monoio's epoll driver and logs it
//! once per process.

use std::{
    future::Future,
    io,
    sync::{mpsc, Arc, Once},
    thread::JoinHandle,
};

use crate::mesh::{Mesh, MeshPort};

/// The I/O driver a shard should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// io_uring with the fast flags, else epoll.
    Auto,
    /// io_uring only; failing to build a ring is an error.
    IoUring,
    /// epoll (monoio's legacy driver) only.
    Epoll,
}

/// The I/O driver a shard actually runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl DriverKind {
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub shards: usize,
    pub driver: Driver,
    /// Pin shard `i` to the `i`-th allowed CPU (wrapping around), see [`allowed_cpus`].
    pub pin_cores: bool,
    /// io_uring submission queue entries per shard.
    pub ring_entries: u32,
    /// Slots per ordered pair of shards in the mesh.
    pub mesh_capacity: usize,
    /// Executor turns a shard's mesh receiver spins before parking.
    pub spin_rounds: u32,
    /// Name prefix of the shard threads.
    pub thread_name: String,
    /// Mesh endpoints beyond the shards' (indices `shards..`), for threads that are not shards
    /// but exchange messages with them (a cluster gateway): take them with [`Mesh::port`].
    pub extra_ports: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: available_cores(),
            driver: Driver::Auto,
            pin_cores: true,
            ring_entries: 1024,
            mesh_capacity: 65536,
            spin_rounds: 64,
            thread_name: "shard".into(),
            extra_ports: 0,
        }
    }
}

/// What a shard's main future is given.
pub struct ShardContext<T> {
    pub id: usize,
    pub shards: usize,
    pub port: MeshPort<T>,
    pub driver: DriverKind,
}

/// The running shards.
pub struct Shards<T> {
    pub mesh: Arc<Mesh<T>>,
    pub drivers: Vec<DriverKind>,
    threads: Vec<JoinHandle<()>>,
}

impl<T> Shards<T> {
    /// Make every shard's mesh receiver return from its wait (see [`Mesh::signal`]).
    pub fn signal_all(&self) {
        for s in 0..self.mesh.shards() {
            self.mesh.signal(s);
        }
    }

    /// Wait for every shard thread to end. Errors if one panicked.
    pub fn join(self) -> io::Result<()> {
        let mut panicked = 0;
        for t in self.threads {
            if t.join().is_err() {
                panicked += 1;
            }
        }
        if panicked > 0 {
            return Err(io::Error::other(format!("{panicked} shard thread(s) panicked")));
        }
        Ok(())
    }
}

pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

static FALLBACK_LOGGED: Once = Once::new();

/// Start `cfg.shards` shards. `make` is called on each shard's thread to build its main future;
/// a shard ends when that future completes.
pub fn start<T, F, Fut>(cfg: &RuntimeConfig, make: F) -> io::Result<Shards<T>>
where
    T: Send + 'static,
    F: Fn(ShardContext<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    assert!(cfg.shards > 0, "at least one shard");
    let mesh = Mesh::<T>::new(cfg.shards + cfg.extra_ports, cfg.mesh_capacity);
    let make = Arc::new(make);
    let cpus = if cfg.pin_cores { allowed_cpus() } else { Vec::new() };
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, io::Result<DriverKind>)>();
    let mut threads = Vec::with_capacity(cfg.shards);
    for id in 0..cfg.shards {
        let port = mesh.port(id, cfg.spin_rounds);
        let make = make.clone();
        let ready_tx = ready_tx.clone();
        let cfg = cfg.clone();
        let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
        let t = std::thread::Builder::new().name(format!("{}-{id}", cfg.thread_name)).spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            run_shard(&cfg, id, port, &*make, ready_tx);
        })?;
        threads.push(t);
    }
    drop(ready_tx);
    let mut drivers = vec![DriverKind::Epoll; cfg.shards];
    let mut first_err = None;
    for _ in 0..cfg.shards {
        match ready_rx.recv() {
            Ok((id, Ok(kind))) => drivers[id] = kind,
            Ok((_, Err(e))) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(io::Error::other("shard thread died at start"))),
        }
    }
    if let Some(e) = first_err {
        for s in 0..mesh.shards() {
            mesh.signal(s);
        }
        return Err(e);
    }
    Ok(Shards { mesh, drivers, threads })
}

fn run_shard<T, F, Fut>(
    cfg: &RuntimeConfig,
    id: usize,
    port: MeshPort<T>,
    make: &F,
    ready: mpsc::Sender<(usize, io::Result<DriverKind>)>,
) where
    F: Fn(ShardContext<T>) -> Fut,
    Fut: Future<Output = ()>,
{
    let shards = cfg.shards;
    if cfg.driver != Driver::Epoll {
        let mut urb = io_uring::IoUring::builder();
        urb.setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun();
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(cfg.ring_entries)
            .uring_builder(urb)
            .enable_timer()
            .build();
        match built {
            Ok(mut rt) => {
                let _ = ready.send((id, Ok(DriverKind::IoUring)));
                let driver = DriverKind::IoUring;
                rt.block_on(make(ShardContext { id, shards, port, driver }));
                return;
            }
            Err(e) if cfg.driver == Driver::IoUring => {
                let _ = ready.send((id, Err(e)));
                return;
            }
            Err(e) => FALLBACK_LOGGED.call_once(|| {
                log::warn!("io_uring unavailable ({e}); falling back to the epoll driver");
            }),
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            let _ = ready.send((id, Ok(DriverKind::Epoll)));
            let driver = DriverKind::Epoll;
            rt.block_on(make(ShardContext { id, shards, port, driver }));
        }
        Err(e) => {
            let _ = ready.send((id, Err(e)));
        }
    }
}

/// The CPUs the calling thread may run on, ascending: its `sched_getaffinity` set, which is what
/// `taskset`, cgroup cpusets and systemd's `CPUAffinity=` restrict (threads inherit it). Empty if
/// it cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread, and
    // CPU_ISSET reads it within CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            log::debug!("could not read the allowed CPUs: {}", io::Error::last_os_error());
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::debug!("could not pin shard thread to CPU {cpu}: {}", io::Error::last_os_error());
        }
    }
}
