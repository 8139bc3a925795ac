//! Scenarios: what each connection slot does. A slot is one connection (one-to-one, echo, idle)
//! or one worker that keeps reconnecting (login-storm).
//!
//! Message scenarios share one engine ([`messaging`]) and differ only in a [`Plan`]: who a
//! message goes to, which connections it is owed to, how frames are read. The engine also
//! reconnects a connection whose socket fails during the run (`--reconnect`). Groups ([`group`])
//! are such a plan with setup steps of their own (create, join) and a verdict per group. Live
//! rooms ([`room`]) have no acks, so they run on their own loop with their own verdict.
//!
//! [`ScenarioName`]: crate::cli::ScenarioName

pub mod echo;
pub mod group;
pub mod idle;
pub mod login_storm;
pub mod messaging;
pub mod one_to_one;
pub mod room;

use std::{
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

pub use messaging::Plan;
use tim::protocol::{self, kind, LoginOk};

use crate::{
    cli::{Config, ScenarioName},
    global::Phase,
    net::{FrameReader, Io},
    session,
    worker::Worker,
};

/// The scenario of a run.
#[derive(Clone)]
pub enum Scenario {
    /// Connections sending messages, checked by the ledger.
    Messaging(Arc<dyn Plan>),
    Idle,
    LoginStorm,
    /// Live rooms: publishers and subscribers, checked by [`room::verdict`].
    Room(Arc<room::Rooms>),
    /// Groups: messages on the message engine, checked per group by [`group::verdict`].
    Group(Arc<group::Groups>),
}

impl Scenario {
    pub fn new(cfg: &Config) -> Scenario {
        match cfg.scenario {
            ScenarioName::OneToOne => Scenario::Messaging(Arc::new(one_to_one::OneToOne::new(cfg))),
            ScenarioName::Echo => Scenario::Messaging(Arc::new(echo::Echo)),
            ScenarioName::Idle => Scenario::Idle,
            ScenarioName::LoginStorm => Scenario::LoginStorm,
            ScenarioName::Room => Scenario::Room(Arc::new(room::Rooms::new(cfg))),
            ScenarioName::Group => Scenario::Group(Arc::new(group::Groups::new(cfg))),
        }
    }

    /// Whether the run ends with a drain period (answers still collected, nothing new started).
    pub fn drains(&self) -> bool {
        !matches!(self, Scenario::Idle)
    }
}

/// Run connection slot `conn` on its thread until the run stops.
pub async fn run_slot(w: &Rc<Worker>, conn: u32) {
    match &w.g.scenario {
        Scenario::Messaging(plan) if plan.as_one_to_one().is_some_and(|o| o.friends > 0) => {
            one_to_one::run(w, conn, plan.clone()).await
        }
        Scenario::Messaging(plan) => messaging::run(w, conn, plan.clone()).await,
        Scenario::Idle => idle::run(w, conn).await,
        Scenario::LoginStorm => login_storm::run(w, conn).await,
        Scenario::Room(rooms) => room::run(w, conn, rooms.clone()).await,
        Scenario::Group(groups) => group::run(w, conn, groups.clone()).await,
    }
}

/// A connection that is set up and takes part in the run.
pub struct Joined {
    pub io: Io,
    pub rd: FrameReader,
    pub login: Option<LoginOk>,
}

/// Connect (and log in, if `log_in`), report ready, and wait for the run to start. `None` if
/// setup failed (counted) or the run started without this connection.
pub async fn join_run(w: &Worker, conn: u32, log_in: bool) -> Option<Joined> {
    let (io, rd, login) = set_up(w, conn, log_in).await?;
    enter_run(w, conn, io, rd, login).await
}

/// The first half of [`join_run`]: connect and log in, within the thread's setup gate. `None`
/// if setup failed (counted) or the run already started.
pub async fn set_up(w: &Worker, conn: u32, log_in: bool) -> Option<(Io, FrameReader, Option<LoginOk>)> {
    let g = &w.g;
    let deadline: Instant = g.setup_deadline();
    let _pass = w.setup_gate.pass().await;
    if w.phase() != Phase::Setup {
        return None;
    }
    let Some(io) = session::connect(w, conn, 0, deadline).await else {
        g.setup_failed();
        return None;
    };
    let mut rd = FrameReader::default();
    let login = if log_in {
        match session::log_in(w, &io, &mut rd, conn, deadline).await {
            Ok(ok) => Some(ok),
            Err(e) => {
                w.stats.error(&e.name("login"));
                rd.release(w);
                g.setup_failed();
                return None;
            }
        }
    } else {
        None
    };
    Some((io, rd, login))
}

/// The second half of [`join_run`] (a scenario may do its own setup steps in between, outside
/// the setup gate): report ready and keep the session alive until the run starts. `None` if
/// the run started without this connection.
pub async fn enter_run(
    w: &Worker,
    conn: u32,
    io: Io,
    mut rd: FrameReader,
    login: Option<LoginOk>,
) -> Option<Joined> {
    let g = &w.g;
    if !g.ready(conn, login.as_ref().map(|l| l.user_id)) {
        rd.release(w);
        io.shutdown();
        return None;
    }
    if let Some(a) = g.per_addr.get(io.addr_index) {
        a.ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // Keep the session alive while the rest of the swarm logs in (a Ping with nonce 0).
    let keepalive = login.as_ref().map(|l| Duration::from_millis(l.idle_timeout_ms as u64 / 3));
    match keepalive.filter(|d| !d.is_zero()) {
        Some(every) => {
            while monoio::time::timeout(every, w.wait_past(Phase::Setup)).await.is_err() {
                io.queue(kind::PING, &protocol::Ping { nonce: 0 });
                let _ = io.flush().await; // a dead connection shows when the run reads it
            }
        }
        None => w.wait_past(Phase::Setup).await,
    }
    Some(Joined { io, rd, login })
}
