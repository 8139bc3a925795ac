//! The `tim` binary: `tim serve` runs a server from a TOML config file and command-line overrides.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use tim::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tim", version, about = "tim: an io_uring thread-per-core instant-messaging engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server node.
    Serve(ServeArgs),
    /// Print the default configuration as TOML.
    DefaultConfig,
    /// Ask a cluster node for its view of the cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// A terminal client: talk, send lines from stdin, watch messages, read history.
    Chat(tim::chat::ChatArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print a node's members, their state and the partitions each owns (JSON).
    Status {
        /// The node's config file: its cluster secret, and its cluster address unless --addr.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The node's cluster address (default: cluster.advertise, else cluster.listen).
        #[arg(long, value_name = "ADDR")]
        addr: Option<SocketAddr>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; options not in it keep their defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address of the binary protocol (overrides server.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Listen address of the WebSocket gateway and web page (overrides gateway.ws_listen);
    /// "off" for none.
    #[arg(long, value_name = "ADDR")]
    ws_listen: Option<String>,
    /// Number of shards; 0 = one per core (overrides server.shards).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Storage backend (overrides store.backend): embedded, postgres or memory.
    #[arg(long, value_name = "BACKEND")]
    store: Option<String>,
    /// I/O driver: auto, io_uring or epoll (overrides server.driver).
    #[arg(long, value_name = "DRIVER")]
    driver: Option<String>,
    /// This node's cluster id, 1..=63 (overrides cluster.node_id).
    #[arg(long, value_name = "N")]
    node_id: Option<u16>,
    /// Listen for cluster peers here (overrides cluster.listen).
    #[arg(long, value_name = "ADDR")]
    cluster_listen: Option<SocketAddr>,
    /// Join the cluster through this member's cluster address (repeatable; adds to
    /// cluster.join).
    #[arg(long, value_name = "ADDR")]
    join: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // A panic on any thread (a shard, a worker) aborts the whole process rather than leaving it
    // running without that thread; a supervisor restarts it (README, docs/ARCHITECTURE.md).
    tim_shards::abort_on_panic();
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", tim::config::DEFAULT_TOML);
            Ok(())
        }
        Command::Serve(args) => serve(args),
        Command::Cluster { command: ClusterCommand::Status { config, addr } } => cluster_status(config, addr),
        Command::Chat(args) => std::process::exit(tim::chat::run(args)),
    }
}

/// The config of `path` (defaults without one), with the cluster secret from
/// `TIM_CLUSTER_SECRET` when that is set (keeps it out of files and process lists).
fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let mut cfg = match path {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Ok(secret) = std::env::var("TIM_CLUSTER_SECRET") {
        cfg.cluster.secret = secret;
    }
    if let Ok(token) = std::env::var("TIM_ADMIN_TOKEN") {
        cfg.admin.token = token;
    }
    Ok(cfg)
}

fn cluster_status(config: Option<PathBuf>, addr: Option<SocketAddr>) -> anyhow::Result<()> {
    let cfg = load_config(config.as_ref())?;
    let addr = addr
        .or(cfg.cluster.advertised())
        .context("no cluster address: give --addr or a config with cluster.listen")?;
    let text = tim::cluster::node::ask_status(addr, &cfg.cluster.secret)?;
    println!("{text}");
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = load_config(args.config.as_ref())?;
    if let Some(a) = args.listen {
        cfg.server.listen = a;
    }
    if let Some(a) = args.ws_listen {
        cfg.gateway.ws_listen = match a.as_str() {
            "off" => None,
            a => Some(a.parse().with_context(|| format!("--ws-listen {a}"))?),
        };
    }
    if let Some(n) = args.shards {
        cfg.server.shards = n;
    }
    if let Some(s) = args.store {
        cfg.store.backend = s;
    }
    if let Some(d) = args.driver {
        cfg.server.driver = d;
    }
    if let Some(n) = args.node_id {
        cfg.cluster.node_id = n;
    }
    if let Some(a) = args.cluster_listen {
        cfg.cluster.listen = Some(a);
    }
    cfg.cluster.join.extend(args.join);
    // Register before starting so that no signal is missed.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let server = tim::server::start(cfg)?;
    let driver = server.drivers.first().map_or("?", |d| d.name());
    // Tests and scripts read these lines to learn the bound addresses; the last one is always
    // "tim listening on".
    for (what, addr) in [
        ("websocket", server.ws_addr),
        ("tls", server.tls_addr),
        ("wss", server.wss_addr),
        ("admin", server.admin_addr),
    ] {
        if let Some(a) = addr {
            println!("tim {what} listening on {a}");
        }
    }
    println!("tim listening on {} ({} shards, {driver} driver)", server.addr, server.drivers.len());
    use std::io::Write;
    std::io::stdout().flush()?;
    for sig in signals.forever() {
        if sig == SIGHUP {
            match server.reload_tls() {
                Ok(true) => log::info!("SIGHUP: TLS certificate and key reloaded"),
                Ok(false) => log::info!("SIGHUP: no TLS listener, nothing to reload"),
                Err(e) => log::error!("SIGHUP: TLS reload failed, the old certificate stays: {e:#}"),
            }
            continue;
        }
        log::info!("signal {sig}: shutting down");
        break;
    }
    server.stop();
    server.join()?;
    log::info!("stopped");
    Ok(())
}
