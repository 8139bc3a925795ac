//! `tim-loadgen`: a client swarm for tim, built on the project's own protocol code, with one
//! monoio executor per core like the server, and a ledger that checks every acknowledged
//! message reached every session it was meant for, exactly once and in order.
//!
//! Where things are:
//! - [`cli`]: flags and the checked run configuration;
//! - [`global`]: what threads share (phase, setup registry, live set, per-thread slots);
//! - [`worker`]: one executor thread, its control task and small local primitives;
//! - [`net`]: connect, the write queue, the frame reader; [`ws`]: the WebSocket client side
//!   (`--transport ws-binary|ws-json`), [`json`]: the JSON mapping from the client's side;
//! - [`session`]: register, log in, log out;
//! - [`scenario`]: what connections do (one-to-one, idle, login-storm, echo, room, group); the
//!   message engine ([`scenario::messaging`]) also reconnects failed connections (`--reconnect`)
//!   round the server addresses, keeping their ledger;
//! - [`ledger`]: per-connection send/receive tables and the final merge;
//! - [`stats`]: counters, histograms, error tallies;
//! - [`coordinator`]: phases and the progress line; [`report`]: the summary and JSON;
//! - [`server_cpu`]: the server's CPU time over the run (`--server-pid`).
//!
//! Exit status: 0 when the run passed, 1 when the ledger found lost, duplicated, out-of-order
//! or misrouted deliveries, a connection gave up reconnecting (or nothing was done), 2 on bad
//! arguments or a failure to start.

mod cli;
mod coordinator;
mod global;
mod json;
mod ledger;
mod net;
mod report;
mod scenario;
mod server_cpu;
mod session;
mod stats;
mod worker;
mod ws;

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use tim_shards::{Driver, RuntimeConfig};

use crate::{
    cli::{Args, Config, DriverArg},
    global::Global,
    scenario::Scenario,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tim-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let cfg = Config::from_args(args)?;
    let scenario = Scenario::new(&cfg);
    let rt = RuntimeConfig {
        shards: cfg.threads,
        driver: match cfg.driver {
            DriverArg::Auto => Driver::Auto,
            DriverArg::IoUring => Driver::IoUring,
            DriverArg::Epoll => Driver::Epoll,
        },
        pin_cores: cfg.pin,
        ring_entries: 4096,
        mesh_capacity: 1,
        spin_rounds: 0,
        thread_name: "loadgen".into(),
        extra_ports: 0,
    };
    raise_nofile_limit(cfg.connections as u64 + 1024);
    let g = Arc::new(Global::new(cfg, scenario));
    let g2 = g.clone();
    let shards = tim_shards::start::<(), _, _>(&rt, move |ctx| worker::run(g2.clone(), ctx.id, ctx.driver))?;
    if !g.cfg.quiet {
        eprintln!(
            "tim-loadgen: {} {} connections over {} on {} threads ({} driver), run {:08x}",
            g.cfg.scenario.as_str(),
            g.cfg.connections,
            g.cfg.transport.as_str(),
            g.cfg.threads,
            shards.drivers.first().map_or("?", |d| d.name()),
            g.run_id
        );
    }
    let outcome = coordinator::run(&g);
    shards.join()?;
    Ok(report::finish(&g, &outcome))
}

/// Make room for one file descriptor per connection (best effort).
fn raise_nofile_limit(want: u64) {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < want {
            l.rlim_cur = want.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
