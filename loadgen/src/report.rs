//! The end of a run: merge the ledgers, print a readable summary on stdout and, with `--json`,
//! one line of JSON last; decide the exit status.

use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::{
    cli::{Load, Pacing},
    coordinator::Outcome,
    global::Global,
    ledger,
    scenario::{group, room, Scenario},
    stats::{fmt_us, C, H},
};

/// Print the results; true if the run passed (no acknowledged message lost or duplicated,
/// nothing out of order or misrouted, no connection that gave up reconnecting, and something
/// was done at all; room: also no error during the run, and every publish received or reported
/// missed by every subscriber).
///
/// Every run reports its server addresses, with per address the connections assigned to it
/// (connection i: address i mod n), those that set up on it and the reconnects that landed on
/// it. With `--reconnect` it also reports the reconnects, resends, redeliveries, time down
/// and give-ups.
///
/// Group runs add per-group figures: in the summary the groups with a problem, in the JSON
/// `per_group` (every group when there are at most [`PER_GROUP_ALL_MAX`], else those with a
/// problem).
pub fn finish(g: &Global, o: &Outcome) -> bool {
    let cfg = &g.cfg;
    let r = g.results.lock().expect("results lock");
    let c = |x: C| r.counters[x as usize];
    let secs = o.run_time.as_secs_f64().max(1e-9);
    let room_verdict = match (&g.scenario, g.live.get()) {
        (Scenario::Room(rooms), Some(live)) => Some(room::verdict(rooms, live, &r.ledgers)),
        _ => None,
    };
    let group_verdict = match (&g.scenario, g.live.get()) {
        (Scenario::Group(groups), Some(live)) => Some(group::verdict(groups, live, &r.ledgers)),
        _ => None,
    };
    let verdict = match (&g.scenario, g.live.get()) {
        (Scenario::Messaging(plan), Some(live)) => {
            Some(ledger::merge(&r.ledgers, cfg.connections, |s, n, out| plan.receivers(live, s, n, out)))
        }
        _ => room_verdict.map(|rv| rv.v).or(group_verdict.as_ref().map(|gv| gv.v)),
    };
    let v = verdict.unwrap_or_default();
    let rv = room_verdict.unwrap_or_default();
    let (duplicated, out_of_order) = (c(C::Duplicated), c(C::OutOfOrder));
    let errors = c(C::Errors);
    let re = Reconnects::of(&r.ledgers);
    let mut problems = Vec::new();
    if v.lost > 0 && room_verdict.is_some() {
        problems.push(format!("{} deliveries neither received nor reported missed", v.lost));
    } else if v.lost > 0 {
        problems.push(format!("{} deliveries lost", v.lost));
    }
    if rv.over > 0 {
        problems.push(format!("{} more messages received or reported missed than published", rv.over));
    }
    if room_verdict.is_some() && c(C::RunErrors) > 0 {
        problems.push(format!("{} errors during the run", c(C::RunErrors)));
    }
    if duplicated > 0 {
        let in_catch_up = c(C::DupInCatchUp);
        if in_catch_up > 0 {
            problems.push(format!(
                "{duplicated} duplicate deliveries ({in_catch_up} before the session's CatchUpEnd)"
            ));
        } else {
            problems.push(format!("{duplicated} duplicate deliveries"));
        }
    }
    if out_of_order > 0 {
        problems.push(format!("{out_of_order} deliveries out of order"));
    }
    if v.misrouted > 0 {
        problems.push(format!("{} deliveries to a session they were not meant for", v.misrouted));
    }
    if re.gave_up > 0 {
        problems.push(format!(
            "{} connections gave up reconnecting (no address let them log in again within {:.1} s)",
            re.gave_up,
            cfg.reconnect_give_up.as_secs_f64()
        ));
    }
    if r.stuck > 0 {
        problems.push(format!("{} connections did not end (their ledger is missing)", r.stuck));
    }
    if matches!(g.scenario, Scenario::Idle) && o.connected_at_end < o.ready as u64 {
        problems.push(format!(
            "{} of {} connections dropped during the run",
            o.ready as u64 - o.connected_at_end,
            o.ready
        ));
    }
    if let Some(gv) = &group_verdict {
        let bad = gv.per_group.iter().filter(|t| !t.ok()).count();
        if bad > 0 {
            problems.push(format!("{bad} of {} groups failed the ledger", gv.per_group.len()));
        }
    }
    let did_nothing = match g.scenario {
        Scenario::Messaging(_) | Scenario::Room(_) | Scenario::Group(_) => v.acked == 0,
        Scenario::Idle => o.connected_at_end == 0,
        Scenario::LoginStorm => c(C::Logins) == 0,
    };
    if did_nothing {
        problems.push("nothing was done (no connection ready, or nothing answered)".into());
    }

    // One-to-one's side operations: friends, presence changes, typing notices.
    let side_ops = cfg.friends > 0 || cfg.presence_share > 0.0 || cfg.typing_share > 0.0;
    let roster = match &g.scenario {
        Scenario::Messaging(plan) => plan.as_one_to_one().map_or((0, 0.0), |o| {
            (
                o.roster_actions.load(Ordering::Relaxed) as u64,
                o.roster_setup_us.load(Ordering::Relaxed) as f64 / 1e6,
            )
        }),
        _ => (0, 0.0),
    };
    // Operations: messages acknowledged, presence changes answered, typing notices sent.
    let ops = v.acked + c(C::PresenceAnswered) + c(C::TypingSent);

    // ---- readable summary ----
    let per_conn = if room_verdict.is_some() { "publisher" } else { "connection" };
    let load = match cfg.load {
        Load::Closed { window } => format!("window {window}"),
        Load::Open { rate, cap } => {
            let pacer = if cfg.pacing == Pacing::Spin { "spinning" } else { "timer" };
            format!("rate {rate}/s (in flight ≤ {cap} per {per_conn}, {pacer} pacer)")
        }
    };
    println!(
        "tim-loadgen {} over {}: {} connections, {} users, {} threads; {}; body {} B; {:.1} s",
        cfg.scenario.as_str(),
        cfg.transport.as_str(),
        cfg.connections,
        cfg.users,
        cfg.threads,
        load,
        cfg.body_bytes,
        secs
    );
    println!(
        "  setup: {}/{} ready in {:.2} s ({} failed)",
        o.ready,
        cfg.connections,
        o.setup_time.as_secs_f64(),
        o.setup_failed
    );
    let per_addr = per_addr(g);
    if per_addr.len() > 1 {
        let list: Vec<String> = per_addr
            .iter()
            .map(|a| {
                format!(
                    "{} ({} assigned, {} ready, {} reconnects)",
                    a.addr, a.assigned, a.ready, a.reconnects
                )
            })
            .collect();
        println!("  addresses: {}", list.join(", "));
    }
    if cfg.reconnect {
        println!(
            "  reconnects {}  gave up {}  down at the end {}  resent after reconnect {}  acked as duplicate {}  \
             redelivered {}  resyncs {}  skipped while down {}  down {:.3} s in all, {:.3} s at most",
            re.reconnects,
            re.gave_up,
            re.down_at_end,
            c(C::ResentAfterReconnect),
            c(C::AckedDuplicate),
            c(C::Redelivered),
            c(C::Resyncs),
            c(C::SkippedWhileDown),
            re.down_s,
            re.down_max_s
        );
    }
    let hist = |x: H| &r.hists[x as usize];
    if let Some(gv) = &group_verdict {
        println!(
            "  groups {} × {} members, {} senders each ({} members live)",
            cfg.groups,
            cfg.members,
            cfg.senders,
            gv.per_group.iter().map(|t| t.members as u64).sum::<u64>()
        );
        if let Scenario::Group(groups) = &g.scenario {
            if groups.offline > 0 {
                let o = groups.offline_stats();
                println!(
                    "  offline members: {} of {} added ({} registered in {:.2} s, added in {:.2} s)",
                    o.added,
                    cfg.groups as u64 * groups.offline as u64,
                    o.registered,
                    o.register_s,
                    o.add_s
                );
            }
        }
        for t in gv.per_group.iter().filter(|t| !t.ok()) {
            println!(
                "  group {} ({:#x}): acked {}  delivered {} of {} owed  lost {}  duplicated {}  \
                 out of order {}  misrouted {}",
                t.group,
                t.id,
                t.acked,
                t.delivered,
                t.expected,
                t.lost,
                t.duplicated,
                t.out_of_order,
                t.misrouted
            );
        }
    }
    match g.scenario {
        Scenario::Messaging(_) | Scenario::Group(_) => {
            println!(
                "  sent {}  acked {}  delivered {} of {} owed  ({:.0} acked/s, {:.0} delivered/s)",
                c(C::Sent),
                v.acked,
                v.delivered,
                v.expected,
                v.acked as f64 / secs,
                v.delivered as f64 / secs
            );
            println!(
                "  lost {}  duplicated {duplicated}  out of order {out_of_order}  misrouted {}  \
                 unanswered {}  given up {}  resent {}  delivered before ack {}  replayed from earlier runs {}",
                v.lost,
                v.misrouted,
                v.unanswered,
                v.abandoned,
                c(C::Resent),
                v.delivered_unacked,
                c(C::Foreign)
            );
            if side_ops {
                println!(
                    "  friends {} per user ({} roster actions, {:.2} s)  presence changes {} sent, {} answered \
                     ({:.0}/s)  presence notices {} of {} owed (+{} others)  typing {} sent, {} refused, \
                     {} notices  ({:.0} operations/s)",
                    cfg.friends,
                    roster.0,
                    roster.1,
                    c(C::PresenceSent),
                    c(C::PresenceAnswered),
                    c(C::PresenceAnswered) as f64 / secs,
                    c(C::PresenceNotices),
                    c(C::PresenceExpected),
                    c(C::PresenceOtherNotices),
                    c(C::TypingSent),
                    c(C::TypingRefused),
                    c(C::TypingNotices),
                    ops as f64 / secs
                );
            }
            if !o.drained {
                println!("  drain timed out after {:.2} s", o.drain_time.as_secs_f64());
            }
            println!("  {}", latency_line("send→ack    ", hist(H::Ack)));
            println!("  {}", latency_line("send→deliver", hist(H::Deliver)));
            if let Load::Open { .. } = cfg.load {
                println!(
                    "  {}  (loadgen: send time after schedule)",
                    latency_line("send lag    ", hist(H::Lag))
                );
            }
        }
        Scenario::Room(_) => {
            println!(
                "  rooms {}  published {}  accepted {}  delivered {} of {} owed  missed {}  \
                 ({:.0} published/s, {:.0} delivered/s)",
                cfg.rooms,
                c(C::Sent),
                v.acked,
                v.delivered,
                v.expected,
                rv.missed,
                v.acked as f64 / secs,
                v.delivered as f64 / secs
            );
            println!(
                "  unaccounted {}  duplicated {duplicated}  out of order {out_of_order}  misrouted {}  \
                 refused {}  errors during the run {}  from earlier runs {}",
                v.lost,
                v.misrouted,
                v.abandoned,
                c(C::RunErrors),
                c(C::Foreign)
            );
            if !o.drained {
                println!("  drain timed out after {:.2} s", o.drain_time.as_secs_f64());
            }
            println!("  {}", latency_line("send→deliver", hist(H::Deliver)));
            if let Load::Open { .. } = cfg.load {
                println!(
                    "  {}  (loadgen: send time after schedule)",
                    latency_line("send lag    ", hist(H::Lag))
                );
            }
        }
        Scenario::Idle => {
            println!(
                "  connected at the end {}/{}  pings {}  pongs {}",
                o.connected_at_end,
                cfg.connections,
                c(C::Sent),
                c(C::Acked)
            );
            println!("  {}", latency_line("ping→pong", hist(H::Ack)));
        }
        Scenario::LoginStorm => {
            println!("  logins {}  ({:.0}/s)", c(C::Logins), c(C::Logins) as f64 / secs);
            println!("  {}", latency_line("login→ok", hist(H::Login)));
        }
    }
    // Server CPU over the window: seconds, cores busy, µs per delivery (none without one).
    let server_cpu = o.server_cpu.as_ref().map(|r| {
        r.as_ref().map(|cpu| {
            let s = cpu.as_secs_f64();
            (s, s / secs, (v.delivered > 0).then(|| s * 1e6 / v.delivered as f64))
        })
    });
    let pid = cfg.server_cpu.as_ref().map_or(0, |s| s.pid);
    match &server_cpu {
        Some(Ok((s, util, per_msg))) => println!(
            "  server CPU (pid {pid}): {s:.3} s in {secs:.1} s = {util:.2} cores busy{}",
            per_msg.map_or(String::new(), |us| format!("; {us:.2} µs per delivered message"))
        ),
        Some(Err(e)) => println!("  server CPU (pid {pid}): not measured: {e}"),
        None => {}
    }
    let own_s = o.loadgen_cpu.as_secs_f64();
    let own_per_msg = (v.delivered > 0).then(|| own_s * 1e6 / v.delivered as f64);
    println!(
        "  loadgen CPU: {own_s:.3} s in {secs:.1} s = {:.2} cores busy{}",
        own_s / secs,
        own_per_msg.map_or(String::new(), |us| format!("; {us:.2} µs per delivered message"))
    );
    println!("  errors {errors}");
    for (k, n) in &r.errors {
        println!("    {k}: {n}");
    }
    if problems.is_empty() {
        println!("  result: OK");
    } else {
        println!("  result: FAILED: {}", problems.join("; "));
    }

    // ---- JSON ----
    if cfg.json {
        let mut m = Map::new();
        m.insert("scenario".into(), json!(cfg.scenario.as_str()));
        m.insert("transport".into(), json!(cfg.transport.as_str()));
        m.insert("ok".into(), json!(problems.is_empty()));
        m.insert("addrs".into(), json!(cfg.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()));
        let per_addr: Vec<Value> = per_addr
            .iter()
            .map(|a| {
                json!({
                    "addr": a.addr,
                    "connections": a.assigned,
                    "ready": a.ready,
                    "reconnects": a.reconnects,
                })
            })
            .collect();
        m.insert("per_addr".into(), Value::Array(per_addr));
        m.insert("reconnect".into(), json!(cfg.reconnect));
        m.insert("reconnects".into(), json!(re.reconnects));
        m.insert("reconnect_gave_up".into(), json!(re.gave_up));
        m.insert("down_at_end".into(), json!(re.down_at_end));
        m.insert("resent_after_reconnect".into(), json!(c(C::ResentAfterReconnect)));
        m.insert("acked_duplicate".into(), json!(c(C::AckedDuplicate)));
        m.insert("redelivered".into(), json!(c(C::Redelivered)));
        m.insert("resyncs".into(), json!(c(C::Resyncs)));
        m.insert("skipped_while_down".into(), json!(c(C::SkippedWhileDown)));
        m.insert("down_total_s".into(), json!(round3(re.down_s)));
        m.insert("down_max_s".into(), json!(round3(re.down_max_s)));
        m.insert("connections".into(), json!(cfg.connections));
        m.insert("ready".into(), json!(o.ready));
        m.insert("setup_failed".into(), json!(o.setup_failed));
        m.insert("connected".into(), json!(o.connected_at_end));
        m.insert("users".into(), json!(cfg.users));
        m.insert("threads".into(), json!(cfg.threads));
        m.insert("body_bytes".into(), json!(cfg.body_bytes));
        match cfg.load {
            Load::Closed { window } => m.insert("window".into(), json!(window)),
            Load::Open { rate, .. } => {
                let pacer = if cfg.pacing == Pacing::Spin { "spin" } else { "timer" };
                m.insert("pacer".into(), json!(pacer));
                m.insert("rate".into(), json!(rate))
            }
        };
        m.insert("duration_s".into(), json!(round3(secs)));
        m.insert("setup_s".into(), json!(round3(o.setup_time.as_secs_f64())));
        m.insert("drain_s".into(), json!(round3(o.drain_time.as_secs_f64())));
        m.insert("drained".into(), json!(o.drained));
        m.insert("sent".into(), json!(c(C::Sent)));
        let acked = if verdict.is_some() { v.acked } else { c(C::Acked) };
        m.insert("acked".into(), json!(acked));
        m.insert("delivered".into(), json!(v.delivered));
        m.insert("expected_deliveries".into(), json!(v.expected));
        m.insert("lost".into(), json!(v.lost));
        m.insert("duplicated".into(), json!(duplicated));
        m.insert("duplicated_before_catch_up_end".into(), json!(c(C::DupInCatchUp)));
        m.insert("out_of_order".into(), json!(out_of_order));
        m.insert("misrouted".into(), json!(v.misrouted));
        m.insert("unanswered".into(), json!(v.unanswered));
        m.insert("given_up".into(), json!(v.abandoned));
        m.insert("resent".into(), json!(c(C::Resent)));
        m.insert("delivered_before_ack".into(), json!(v.delivered_unacked));
        m.insert("echoed_after_reconnect".into(), json!(v.echoed_after_reconnect));
        m.insert("foreign".into(), json!(c(C::Foreign)));
        m.insert("errors".into(), json!(errors));
        m.insert("errors_by_kind".into(), json!(r.errors));
        m.insert("msgs_per_s".into(), json!(round3(v.delivered as f64 / secs)));
        m.insert("acked_per_s".into(), json!(round3(v.acked as f64 / secs)));
        m.insert("logins".into(), json!(c(C::Logins)));
        m.insert("logins_per_s".into(), json!(round3(c(C::Logins) as f64 / secs)));
        for (name, h) in [
            ("ack", hist(H::Ack)),
            ("deliver", hist(H::Deliver)),
            ("login", hist(H::Login)),
            ("lag", hist(H::Lag)),
        ] {
            for (q, label) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")] {
                m.insert(format!("{name}_{label}_us"), json!(quantile(h, q)));
            }
            m.insert(format!("{name}_max_us"), json!(h.max()));
        }
        m.insert("stuck_connections".into(), json!(r.stuck));
        if side_ops {
            m.insert("friends".into(), json!(cfg.friends));
            m.insert("presence_share".into(), json!(cfg.presence_share));
            m.insert("typing_share".into(), json!(cfg.typing_share));
            m.insert("roster_actions".into(), json!(roster.0));
            m.insert("roster_setup_s".into(), json!(round3(roster.1)));
            m.insert("presence_sent".into(), json!(c(C::PresenceSent)));
            m.insert("presence_answered".into(), json!(c(C::PresenceAnswered)));
            m.insert("presence_per_s".into(), json!(round3(c(C::PresenceAnswered) as f64 / secs)));
            m.insert("presence_notices".into(), json!(c(C::PresenceNotices)));
            m.insert("presence_notices_expected".into(), json!(c(C::PresenceExpected)));
            m.insert("presence_notices_per_s".into(), json!(round3(c(C::PresenceNotices) as f64 / secs)));
            m.insert("presence_other_notices".into(), json!(c(C::PresenceOtherNotices)));
            m.insert("typing_sent".into(), json!(c(C::TypingSent)));
            m.insert("typing_refused".into(), json!(c(C::TypingRefused)));
            m.insert("typing_notices".into(), json!(c(C::TypingNotices)));
            m.insert("ops_per_s".into(), json!(round3(ops as f64 / secs)));
        }
        if room_verdict.is_some() {
            // sent: publishes; acked: publishes not refused; delivered, msgs_per_s: deliveries.
            m.insert("rooms".into(), json!(cfg.rooms));
            m.insert("missed".into(), json!(rv.missed));
            m.insert("over_accounted".into(), json!(rv.over));
            m.insert("run_errors".into(), json!(c(C::RunErrors)));
            m.insert("publishes_per_s".into(), json!(round3(v.acked as f64 / secs)));
            m.insert("deliveries_per_s".into(), json!(round3(v.delivered as f64 / secs)));
        }
        if let Some(gv) = &group_verdict {
            // sent, acked: group messages; delivered, msgs_per_s: deliveries (message × member).
            m.insert("groups".into(), json!(cfg.groups));
            m.insert("members".into(), json!(cfg.members));
            m.insert("senders".into(), json!(cfg.senders));
            if let Scenario::Group(groups) = &g.scenario {
                let o = groups.offline_stats();
                m.insert("offline_members".into(), json!(groups.offline));
                m.insert("offline_registered".into(), json!(o.registered));
                m.insert("offline_added".into(), json!(o.added));
                m.insert("offline_register_s".into(), json!(round3(o.register_s)));
                m.insert("offline_add_s".into(), json!(round3(o.add_s)));
            }
            m.insert("acked_msgs_per_s".into(), json!(round3(v.acked as f64 / secs)));
            m.insert("deliveries_per_s".into(), json!(round3(v.delivered as f64 / secs)));
            let all = gv.per_group.len() <= PER_GROUP_ALL_MAX;
            let per_group: Vec<Value> = gv
                .per_group
                .iter()
                .filter(|t| all || !t.ok())
                .map(|t| {
                    json!({
                        "group": t.group,
                        "group_id": t.id,
                        "members": t.members,
                        "acked": t.acked,
                        "expected_deliveries": t.expected,
                        "delivered": t.delivered,
                        "lost": t.lost,
                        "duplicated": t.duplicated,
                        "redelivered": t.redelivered,
                        "out_of_order": t.out_of_order,
                        "misrouted": t.misrouted,
                    })
                })
                .collect();
            m.insert("per_group".into(), Value::Array(per_group));
        }
        if let Some(cpu) = &server_cpu {
            let (s, util, per_msg) = match cpu {
                Ok((s, util, per_msg)) => (Some(round3(*s)), Some(round3(*util)), per_msg.map(round3)),
                Err(e) => {
                    m.insert("server_cpu_error".into(), json!(e));
                    (None, None, None)
                }
            };
            m.insert("server_pid".into(), json!(pid));
            m.insert("server_cpu_s".into(), json!(s));
            m.insert("server_cpu_util".into(), json!(util));
            m.insert("server_cpu_us_per_msg".into(), json!(per_msg));
        }
        m.insert("loadgen_cpu_s".into(), json!(round3(own_s)));
        m.insert("loadgen_cpu_us_per_msg".into(), json!(own_per_msg.map(round3)));
        println!("{}", Value::Object(m));
    }
    problems.is_empty()
}

/// What the connections' reconnects came to (from their ledgers).
#[derive(Clone, Copy, Debug, Default)]
struct Reconnects {
    reconnects: u64,
    gave_up: u64,
    /// Connections down when they ended.
    down_at_end: u64,
    /// Time connections spent down, in all and the longest outage (seconds).
    down_s: f64,
    down_max_s: f64,
}

impl Reconnects {
    fn of(ledgers: &[ledger::ConnLedger]) -> Reconnects {
        let mut out = Reconnects::default();
        let mut down_us = 0;
        let mut down_max_us = 0;
        for l in ledgers {
            out.reconnects += l.reconnects;
            out.gave_up += u64::from(l.gave_up);
            out.down_at_end += u64::from(l.down_at_end);
            down_us += l.down_us;
            down_max_us = down_max_us.max(l.down_max_us);
        }
        out.down_s = down_us as f64 / 1e6;
        out.down_max_s = down_max_us as f64 / 1e6;
        out
    }
}

/// One server address of the run and what happened on it.
struct AddrReport {
    addr: String,
    /// Connections whose address it is (connection i: address i mod n).
    assigned: u64,
    /// Connections that set up on it and took part in the run.
    ready: u64,
    /// Reconnects that landed on it.
    reconnects: u64,
}

fn per_addr(g: &Global) -> Vec<AddrReport> {
    let cfg = &g.cfg;
    let n = cfg.addrs.len() as u64;
    cfg.addrs
        .iter()
        .zip(&g.per_addr)
        .enumerate()
        .map(|(i, (addr, counts))| AddrReport {
            addr: addr.to_string(),
            assigned: cfg.connections as u64 / n + u64::from((i as u64) < cfg.connections as u64 % n),
            ready: counts.ready.load(Ordering::Relaxed),
            reconnects: counts.reconnects.load(Ordering::Relaxed),
        })
        .collect()
}

/// Group runs with at most this many groups list every group in the JSON's `per_group`.
pub const PER_GROUP_ALL_MAX: usize = 64;

fn quantile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn latency_line(label: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{label}  (none)");
    }
    format!(
        "{label}  p50 {}  p90 {}  p99 {}  p999 {}  max {}  (n = {})",
        fmt_us(h.value_at_quantile(0.5)),
        fmt_us(h.value_at_quantile(0.9)),
        fmt_us(h.value_at_quantile(0.99)),
        fmt_us(h.value_at_quantile(0.999)),
        fmt_us(h.max()),
        h.len()
    )
}
