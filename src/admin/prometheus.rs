//! `/metrics` in the Prometheus text format (version 0.0.4), from every shard's
//! [`Snapshot`]: one series per shard (label `shard`), and per transport or code where given.

use std::fmt::Write as _;

use crate::{
    metrics::{HistogramSnapshot, Snapshot, LATENCY_BUCKETS_US, TRANSPORTS},
    protocol::ErrorCode,
};

/// Render the snapshots; `dropped` is the node's count of envelopes dropped (a full mesh overflow),
/// `pressure` its backpressure sources raised now.
/// `bounced` the envelopes its cluster gateway could not carry.
pub fn render(snaps: &[Snapshot], dropped: u64, pressure: usize, bounced: u64) -> String {
    let mut w = String::with_capacity(16 * 1024);
    let mut head = |w: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(&mut w, "tim_connections", "gauge", "Connections open now, by shard and transport.");
    for s in snaps {
        for (t, name) in TRANSPORTS.iter().enumerate() {
            let _ = writeln!(
                w,
                "tim_connections{{shard=\"{}\",transport=\"{name}\"}} {}",
                s.shard, s.connections[t]
            );
        }
    }
    head(&mut w, "tim_sessions", "gauge", "Logged-in sessions now, by shard and transport.");
    for s in snaps {
        for (t, name) in TRANSPORTS.iter().enumerate() {
            let _ =
                writeln!(w, "tim_sessions{{shard=\"{}\",transport=\"{name}\"}} {}", s.shard, s.sessions[t]);
        }
    }
    head(
        &mut w,
        "tim_connections_accepted_total",
        "counter",
        "Connections accepted, by shard and transport.",
    );
    for s in snaps {
        for (t, name) in TRANSPORTS.iter().enumerate() {
            let _ = writeln!(
                w,
                "tim_connections_accepted_total{{shard=\"{}\",transport=\"{name}\"}} {}",
                s.shard, s.accepted[t]
            );
        }
    }
    type Counter = (&'static str, &'static str, fn(&Snapshot) -> u64);
    let counters: [Counter; 6] = [
        ("tim_logins_total", "Logins that succeeded (password or token).", |s| s.logins),
        ("tim_messages_in_total", "Send and Stream requests taken in.", |s| s.sends),
        ("tim_messages_acked_total", "Sends acknowledged.", |s| s.acks),
        ("tim_deliveries_total", "Messages delivered to sessions (messages out).", |s| s.deliveries),
        ("tim_delivery_acks_total", "Delivery acks received from clients.", |s| s.delivery_acks),
        ("tim_store_commit_messages_total", "Messages committed to the store.", |s| s.commit_messages),
    ];
    for (name, help, get) in counters {
        head(&mut w, name, "counter", help);
        for s in snaps {
            let _ = writeln!(w, "{name}{{shard=\"{}\"}} {}", s.shard, get(s));
        }
    }
    head(
        &mut w,
        "tim_store_commits_total",
        "counter",
        "Store commits (batches); messages per batch = messages / commits.",
    );
    for s in snaps {
        let _ = writeln!(w, "tim_store_commits_total{{shard=\"{}\"}} {}", s.shard, s.commits);
    }
    histogram(
        &mut w,
        &mut head,
        "tim_ack_latency_seconds",
        "From a Send's arrival to its ack.",
        snaps,
        |s| &s.ack_latency,
    );
    histogram(
        &mut w,
        &mut head,
        "tim_store_commit_seconds",
        "Duration of a store commit (one batch).",
        snaps,
        |s| &s.commit_latency,
    );
    head(
        &mut w,
        "tim_mesh_queued",
        "gauge",
        "Envelopes waiting in a shard's queue to another mesh endpoint.",
    );
    for s in snaps {
        for (dst, n) in s.mesh_queued.iter().enumerate().filter(|&(d, _)| d != s.shard) {
            let _ = writeln!(w, "tim_mesh_queued{{shard=\"{}\",to=\"{dst}\"}} {n}", s.shard);
        }
    }
    head(&mut w, "tim_mesh_overflow", "gauge", "Envelopes held back now because a mesh queue was full.");
    for s in snaps {
        let _ = writeln!(w, "tim_mesh_overflow{{shard=\"{}\"}} {}", s.shard, s.overflow);
    }
    head(
        &mut w,
        "tim_dropped_envelopes_total",
        "counter",
        "Envelopes dropped: a shard's mesh overflow was full (limits.mesh_overflow_max).",
    );
    let _ = writeln!(w, "tim_dropped_envelopes_total {dropped}");
    head(
        &mut w,
        "tim_backpressure_sources",
        "gauge",
        "Places where deliveries wait past their high watermark now (new sends are held back while above 0).",
    );
    let _ = writeln!(w, "tim_backpressure_sources {pressure}");
    head(
        &mut w,
        "tim_cluster_bounced_envelopes_total",
        "counter",
        "Envelopes for another node that no link could carry (none, or over link_queue_bytes_max): requests answered NodeUnavailable, deliveries dropped.",
    );
    let _ = writeln!(w, "tim_cluster_bounced_envelopes_total {bounced}");
    head(&mut w, "tim_sends_held_back", "gauge", "Sends held back by the node's backpressure now.");
    for s in snaps {
        let _ = writeln!(w, "tim_sends_held_back{{shard=\"{}\"}} {}", s.shard, s.deferred);
    }
    for (name, help, get) in [
        (
            "tim_errors_total",
            "Error frames sent, by shard and code.",
            (|s: &Snapshot| &s.errors) as fn(&Snapshot) -> &Vec<(u16, u64)>,
        ),
        ("tim_kicks_total", "Kick frames sent, by shard and reason code.", |s: &Snapshot| &s.kicks),
    ] {
        head(&mut w, name, "counter", help);
        for s in snaps {
            for &(code, n) in get(s) {
                let label =
                    ErrorCode::from_u16(code).map_or_else(|| "Other".to_string(), |c| format!("{c:?}"));
                let _ = writeln!(w, "{name}{{shard=\"{}\",code=\"{code}\",name=\"{label}\"}} {n}", s.shard);
            }
        }
    }
    w
}

fn histogram(
    w: &mut String,
    head: &mut impl FnMut(&mut String, &str, &str, &str),
    name: &str,
    help: &str,
    snaps: &[Snapshot],
    get: fn(&Snapshot) -> &HistogramSnapshot,
) {
    head(w, name, "histogram", help);
    for s in snaps {
        let h = get(s);
        let mut cumulative = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le =
                LATENCY_BUCKETS_US.get(i).map_or("+Inf".to_string(), |&us| format!("{}", us as f64 / 1e6));
            let _ = writeln!(w, "{name}_bucket{{shard=\"{}\",le=\"{le}\"}} {cumulative}", s.shard);
        }
        let _ = writeln!(w, "{name}_sum{{shard=\"{}\"}} {}", s.shard, h.sum_us as f64 / 1e6);
        let _ = writeln!(w, "{name}_count{{shard=\"{}\"}} {}", s.shard, h.count());
    }
}
