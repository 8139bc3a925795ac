//! What every executor thread and the coordinator share: the configuration, the run's phase, the
//! setup registry (who logged in, as which user id), the [`LiveSet`] frozen when the run starts,
//! the per-thread [`Slot`]s, and the results threads leave at the end.
//!
//! Per-message work never touches anything here except read-only data (`cfg`, `live`).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Mutex, OnceLock,
    },
    time::Instant,
};

use crossbeam_utils::CachePadded;

use crate::{
    cli::Config,
    ledger::ConnLedger,
    scenario::Scenario,
    stats::{add_hists, new_hists, Hists, Slot, COUNTERS},
};

/// Phases of a run, in order. The coordinator moves them forward; threads follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Connecting and logging in.
    Setup = 0,
    /// Measured load.
    Run = 1,
    /// No new messages; answers and deliveries still collected.
    Drain = 2,
    /// Close everything and report.
    Stop = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Setup,
            1 => Phase::Run,
            2 => Phase::Drain,
            _ => Phase::Stop,
        }
    }
}

/// Who is ready, filled in during setup.
pub struct Registry {
    /// Still taking connections (closed when the run starts).
    pub open: bool,
    pub live: Vec<bool>,
    pub user_ids: Vec<u64>,
    pub ready: u32,
    pub failed: u32,
}

/// The connections that were logged in when the run started, and the user ids they learned.
/// Only these send and receive; messages are owed only to them.
pub struct LiveSet {
    pub connections: u32,
    pub users: u32,
    pub conn_live: Vec<bool>,
    /// Live connections per user.
    pub per_user: Vec<u32>,
    /// User ids (0: unknown, no live connection learned it).
    pub user_ids: Vec<u64>,
    /// Users whose id is known, ascending.
    pub known: Vec<u32>,
    /// For each user, the first user after it (cyclically) whose id is known.
    pub next_known: Vec<u32>,
}

impl LiveSet {
    fn new(cfg: &Config, r: &Registry) -> LiveSet {
        let users = cfg.users;
        let mut per_user = vec![0u32; users as usize];
        for (c, &l) in r.live.iter().enumerate() {
            if l {
                per_user[cfg.user_of(c as u32) as usize] += 1;
            }
        }
        let known: Vec<u32> = (0..users).filter(|&u| r.user_ids[u as usize] != 0).collect();
        let next_known = (0..users)
            .map(|u| (1..=users).map(|d| (u + d) % users).find(|&v| r.user_ids[v as usize] != 0).unwrap_or(u))
            .collect();
        LiveSet {
            connections: cfg.connections,
            users,
            conn_live: r.live.clone(),
            per_user,
            user_ids: r.user_ids.clone(),
            known,
            next_known,
        }
    }

    /// The live connections of `user`.
    pub fn conns_of(&self, user: u32) -> impl Iterator<Item = u32> + '_ {
        (user..self.connections).step_by(self.users as usize).filter(|&c| self.conn_live[c as usize])
    }

    pub fn live_count(&self) -> u32 {
        self.conn_live.iter().filter(|&&l| l).count() as u32
    }
}

/// What threads leave when they end.
pub struct Results {
    pub hists: Hists,
    pub errors: BTreeMap<String, u64>,
    pub counters: [u64; COUNTERS],
    pub ledgers: Vec<ConnLedger>,
    /// Connection tasks that had not ended when their thread gave up waiting.
    pub stuck: u64,
}

/// What happened on one server address (`--addr`), counted by whichever thread did it.
#[derive(Default)]
pub struct AddrCounts {
    /// Connections that set up on it and took part in the run.
    pub ready: AtomicU64,
    /// Reconnects that landed on it.
    pub reconnects: AtomicU64,
}

pub struct Global {
    pub cfg: Config,
    /// Per server address, in `cfg.addrs` order.
    pub per_addr: Vec<AddrCounts>,
    pub scenario: Scenario,
    /// Random per run: in bodies and client message ids.
    pub run_id: u32,
    /// The clock origin of every timestamp of the run (bodies carry µs since it).
    pub base: Instant,
    phase: AtomicU8,
    /// µs since `base` when the run phase began.
    run_start_us: AtomicU64,
    pub registry: Mutex<Registry>,
    pub live: OnceLock<LiveSet>,
    pub slots: Vec<CachePadded<Slot>>,
    pub results: Mutex<Results>,
}

impl Global {
    pub fn new(cfg: Config, scenario: Scenario) -> Global {
        let n = cfg.connections as usize;
        let registry = Registry {
            open: true,
            live: vec![false; n],
            user_ids: vec![0; cfg.users as usize],
            ready: 0,
            failed: 0,
        };
        let slots = (0..cfg.threads).map(|_| CachePadded::new(Slot::default())).collect();
        Global {
            per_addr: cfg.addrs.iter().map(|_| AddrCounts::default()).collect(),
            run_id: random_u32(),
            base: Instant::now(),
            phase: AtomicU8::new(Phase::Setup as u8),
            run_start_us: AtomicU64::new(0),
            registry: Mutex::new(registry),
            live: OnceLock::new(),
            slots,
            results: Mutex::new(Results {
                hists: new_hists(),
                errors: BTreeMap::new(),
                counters: [0; COUNTERS],
                ledgers: Vec::new(),
                stuck: 0,
            }),
            cfg,
            scenario,
        }
    }

    #[inline]
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// Microseconds since the base instant.
    #[inline]
    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    pub fn run_start_us(&self) -> u64 {
        self.run_start_us.load(Ordering::Acquire)
    }

    /// A connection finished its setup. Returns whether it takes part in the run (false when
    /// the run started without it).
    pub fn ready(&self, conn: u32, user_id: Option<u64>) -> bool {
        let mut r = self.registry.lock().expect("registry lock");
        if !r.open {
            return false;
        }
        r.ready += 1;
        r.live[conn as usize] = true;
        if let Some(id) = user_id {
            let u = self.cfg.user_of(conn) as usize;
            r.user_ids[u] = id;
        }
        true
    }

    /// A connection gave up on setup.
    pub fn setup_failed(&self) {
        self.registry.lock().expect("registry lock").failed += 1;
    }

    /// (ready, failed) so far.
    pub fn setup_progress(&self) -> (u32, u32) {
        let r = self.registry.lock().expect("registry lock");
        (r.ready, r.failed)
    }

    /// Close the registry, freeze the live set and enter the run phase.
    pub fn start_run(&self) -> &LiveSet {
        let live = {
            let mut r = self.registry.lock().expect("registry lock");
            r.open = false;
            LiveSet::new(&self.cfg, &r)
        };
        let _ = self.live.set(live);
        self.run_start_us.store(self.now_us(), Ordering::Release);
        self.set_phase(Phase::Run);
        self.live.get().expect("just set")
    }

    /// The live set (only after the run started).
    pub fn live(&self) -> &LiveSet {
        self.live.get().expect("the run has started")
    }

    /// A thread's last word.
    pub fn leave(
        &self,
        hists: &Hists,
        errors: &BTreeMap<String, u64>,
        counters: &[u64; COUNTERS],
        ledgers: Vec<crate::ledger::ConnLedger>,
        stuck: u64,
    ) {
        let mut r = self.results.lock().expect("results lock");
        add_hists(&mut r.hists, hists);
        for (k, v) in errors {
            *r.errors.entry(k.clone()).or_default() += v;
        }
        for (a, b) in r.counters.iter_mut().zip(counters) {
            *a += b;
        }
        r.ledgers.extend(ledgers);
        r.stuck += stuck;
    }

    /// How long the setup may take.
    pub fn setup_deadline(&self) -> Instant {
        self.base + self.cfg.setup_timeout
    }
}

/// A random u32 from the OS (falls back to the clock).
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n == 4 {
        u32::from_le_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(0x5eed)
    }
}

/// splitmix64: a cheap deterministic mix (random peers, jitter).
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
