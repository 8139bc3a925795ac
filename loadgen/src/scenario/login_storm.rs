//! login-storm: `--connections` workers each connect, log in, log out and start over, as fast as
//! they can for the duration. Users are registered during setup (by each user's first worker).
//! Login → LoginOk latency is recorded; logins per second are reported.

use std::{
    rc::Rc,
    time::{Duration, Instant},
};

use crate::{
    global::Phase,
    net::FrameReader,
    session,
    stats::{C, H},
    worker::Worker,
};

/// Longest one iteration (connect, login, logout) may take.
const ITERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed iteration.
const FAIL_PAUSE: Duration = Duration::from_millis(10);

pub async fn run(w: &Rc<Worker>, conn: u32) {
    let g = &w.g;
    let cfg = &g.cfg;
    let name = cfg.user_name(cfg.user_of(conn));
    {
        let _pass = w.setup_gate.pass().await;
        if cfg.rank_of(conn) == 0 {
            let deadline = g.setup_deadline();
            let Some(io) = session::connect(w, conn, 0, deadline).await else {
                g.setup_failed();
                return;
            };
            let mut rd = FrameReader::default();
            let r = session::register(w, &io, &mut rd, &name, deadline).await;
            rd.release(w);
            if let Err(e) = r {
                w.stats.error(&e.name("register"));
                g.setup_failed();
                return;
            }
        }
    }
    if !g.ready(conn, None) {
        return;
    }
    w.wait_past(Phase::Setup).await;
    let device_type = cfg.device_type_of(conn);
    let device_id = session::device_id(conn);
    let mut n = 1u64;
    while w.phase() == Phase::Run {
        w.stats.add(C::Busy, 1);
        let ok = once(w, conn, n, &name, device_type, &device_id).await;
        w.stats.sub(C::Busy, 1);
        if !ok {
            monoio::time::sleep(FAIL_PAUSE).await;
        }
        n += 1;
    }
}

/// One connect, login, logout. Errors are counted; returns whether all went well.
async fn once(w: &Worker, conn: u32, n: u64, name: &str, device_type: u8, device_id: &str) -> bool {
    let deadline = Instant::now() + ITERATION_TIMEOUT;
    let Some(io) = session::connect(w, conn, n, deadline).await else {
        return false;
    };
    let mut rd = FrameReader::default();
    let t0 = w.now_us();
    let ok = match session::login(w, &io, &mut rd, name, device_type, device_id, deadline).await {
        Ok(_) => {
            w.stats.record(H::Login, w.now_us().saturating_sub(t0));
            w.stats.add(C::Logins, 1);
            match session::log_out(w, &io, &mut rd, deadline).await {
                Ok(()) => true,
                Err(e) => {
                    w.stats.error(&e.name("logout"));
                    false
                }
            }
        }
        Err(e) => {
            w.stats.error(&e.name("login"));
            false
        }
    };
    rd.release(w);
    ok
}
