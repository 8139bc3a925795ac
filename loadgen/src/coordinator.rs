//! The coordinator, on the main thread: it waits for setup, starts the run, prints a progress
//! line each second (stderr), stops new work at the end of the duration, drains, and stops.

use std::{
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::{
    global::{Global, Phase},
    scenario::Scenario,
    stats::{self, fmt_rate, new_hists, p50_p99, Hists, C, COUNTERS, H},
};

/// What the coordinator saw.
pub struct Outcome {
    /// Time from the start of the run to the end of the duration.
    pub run_time: Duration,
    pub setup_time: Duration,
    pub ready: u32,
    pub setup_failed: u32,
    /// Connections up at the end of the duration.
    pub connected_at_end: u64,
    /// Every answer and delivery came in before the drain period ran out.
    pub drained: bool,
    pub drain_time: Duration,
    /// With --server-pid: the server's CPU time over `run_time`, or why it could not be read.
    pub server_cpu: Option<Result<Duration, String>>,
    /// The loadgen's own CPU time over `run_time`.
    pub loadgen_cpu: Duration,
}

const SETUP_POLL: Duration = Duration::from_millis(20);
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// The drain check must hold this long (counters are published every few ms).
const DRAIN_SETTLE: Duration = Duration::from_millis(30);

pub fn run(g: &Global) -> Outcome {
    let cfg = &g.cfg;
    let total = cfg.connections;
    let t0 = Instant::now();
    let mut last_print = t0;
    loop {
        let (ready, failed) = g.setup_progress();
        if ready + failed >= total || Instant::now() >= g.setup_deadline() {
            break;
        }
        if !cfg.quiet && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let errors = stats::sum(&g.slots)[C::Errors as usize];
            eprintln!(
                "[setup {:>5.1}s] ready {ready}/{total}  failed {failed}  errors {errors}",
                t0.elapsed().as_secs_f64()
            );
        }
        thread::sleep(SETUP_POLL);
    }
    let live = g.start_run();
    let ready = live.live_count();
    let setup_time = t0.elapsed();
    let (_, setup_failed) = g.setup_progress();
    if !cfg.quiet {
        let next = if ready == 0 {
            "nothing to run".to_owned()
        } else {
            format!("running {:.1}s", cfg.duration.as_secs_f64())
        };
        eprintln!(
            "[setup] {ready}/{total} ready in {:.2}s ({setup_failed} failed); {next}",
            setup_time.as_secs_f64()
        );
    }
    let mut out = Outcome {
        run_time: Duration::ZERO,
        setup_time,
        ready,
        setup_failed,
        connected_at_end: 0,
        drained: true,
        drain_time: Duration::ZERO,
        server_cpu: cfg.server_cpu.as_ref().map(|_| Err("no measured window".to_owned())),
        loadgen_cpu: Duration::ZERO,
    };
    if ready == 0 {
        g.set_phase(Phase::Stop);
        return out;
    }
    // The server's CPU time is read right around the instants that bound `run_time`.
    let cpu_start = cfg.server_cpu.as_ref().map(|s| s.read());
    let own_start = crate::server_cpu::own_cpu();
    let start = Instant::now();
    let end = start + cfg.duration;
    let mut prev = stats::sum(&g.slots);
    let mut prev_t = start;
    loop {
        let next = (prev_t + Duration::from_secs(1)).min(end);
        thread::sleep(next.saturating_duration_since(Instant::now()));
        let now = stats::sum(&g.slots);
        let t = Instant::now();
        let mut iv = new_hists();
        for s in &g.slots {
            if let Some(h) = s.take_interval() {
                stats::add_hists(&mut iv, &h);
            }
        }
        if !cfg.quiet {
            eprintln!("{}", progress_line(g, t - start, (t - prev_t).as_secs_f64(), &prev, &now, &iv));
        }
        prev = now;
        prev_t = t;
        if t >= end {
            break;
        }
    }
    out.run_time = start.elapsed();
    out.loadgen_cpu = crate::server_cpu::own_cpu().saturating_sub(own_start);
    if let (Some(s), Some(cpu_start)) = (&cfg.server_cpu, cpu_start) {
        out.server_cpu = Some(match (cpu_start, s.read()) {
            (Ok(a), Ok(b)) => Ok(b.saturating_sub(a)),
            (Err(e), _) | (_, Err(e)) => Err(format!("{e:#}")),
        });
    }
    out.connected_at_end = stats::sum(&g.slots)[C::Connected as usize];
    if g.scenario.drains() {
        g.set_phase(Phase::Drain);
        let d0 = Instant::now();
        let mut settled_since: Option<Instant> = None;
        loop {
            let s = stats::sum(&g.slots);
            let done = match g.scenario {
                Scenario::LoginStorm => s[C::Busy as usize] == 0,
                // Every publish received or reported missed by every subscriber.
                Scenario::Room(_) => {
                    s[C::Delivered as usize] + s[C::Missed as usize] >= s[C::Expected as usize]
                }
                // One-to-one with presence changes: also every change answered and its notices in.
                _ => {
                    s[C::Inflight as usize] == 0
                        && s[C::Delivered as usize] >= s[C::Expected as usize]
                        && s[C::PresenceInflight as usize] == 0
                        && s[C::PresenceNotices as usize] >= s[C::PresenceExpected as usize]
                }
            };
            if done {
                let since = *settled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DRAIN_SETTLE && d0.elapsed() >= DRAIN_SETTLE {
                    break;
                }
            } else {
                settled_since = None;
            }
            if d0.elapsed() >= cfg.drain {
                out.drained = false;
                break;
            }
            thread::sleep(DRAIN_POLL);
        }
        out.drain_time = d0.elapsed();
        if !cfg.quiet {
            let s = stats::sum(&g.slots);
            let missed = match g.scenario {
                Scenario::Room(_) => format!("  missed {}", s[C::Missed as usize]),
                _ => String::new(),
            };
            let down = if cfg.reconnect { format!("  down {}", s[C::Down as usize]) } else { String::new() };
            eprintln!(
                "[drain {:.2}s] {}  in flight {}  delivered {}/{}{missed}{down}",
                out.drain_time.as_secs_f64(),
                if out.drained { "complete" } else { "timed out" },
                s[C::Inflight as usize],
                s[C::Delivered as usize],
                s[C::Expected as usize]
            );
        }
    }
    g.set_phase(Phase::Stop);
    out
}

fn progress_line(
    g: &Global,
    since_start: Duration,
    dt: f64,
    prev: &[u64; COUNTERS],
    now: &[u64; COUNTERS],
    iv: &Hists,
) -> String {
    let rate = |c: C| fmt_rate((now[c as usize].saturating_sub(prev[c as usize])) as f64 / dt.max(1e-3));
    let h = |x: H| -> &Histogram<u64> { &iv[x as usize] };
    let head = format!("[{:>5.1}s]", since_start.as_secs_f64());
    let errors = now[C::Errors as usize];
    // Reconnecting runs: connections down now, and reconnects so far.
    let down = if g.cfg.reconnect {
        format!("  down {}  reconnects {}", now[C::Down as usize], now[C::Reconnects as usize])
    } else {
        String::new()
    };
    match g.scenario {
        Scenario::Messaging(_) | Scenario::Group(_) => format!(
            "{head} sent {}/s  acked {}/s  delivered {}/s  ack p50/p99 {}  deliver p50/p99 {}  in flight {}{down}  errors {errors}",
            rate(C::Sent),
            rate(C::Acked),
            rate(C::Delivered),
            p50_p99(h(H::Ack)),
            p50_p99(h(H::Deliver)),
            now[C::Inflight as usize],
        ),
        Scenario::Room(_) => format!(
            "{head} published {}/s  delivered {}/s  missed {}/s  deliver p50/p99 {}  errors {errors}",
            rate(C::Sent),
            rate(C::Delivered),
            rate(C::Missed),
            p50_p99(h(H::Deliver)),
        ),
        Scenario::Idle => format!(
            "{head} connected {}/{}  pings {}/s  rtt p50/p99 {}  errors {errors}",
            now[C::Connected as usize],
            g.cfg.connections,
            rate(C::Sent),
            p50_p99(h(H::Ack)),
        ),
        Scenario::LoginStorm => format!(
            "{head} logins {}/s  login p50/p99 {}  errors {errors}",
            rate(C::Logins),
            p50_p99(h(H::Login)),
        ),
    }
}
