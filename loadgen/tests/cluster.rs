//! tim-loadgen against a cluster of `tim serve` nodes on two throwaway PostgreSQL servers, its
//! clients spread over the nodes (`--addr` repeated):
//! - three nodes, one killed with SIGKILL in the middle of the run: the ledger shows every acked
//!   message delivered (the killed node's clients reconnect elsewhere and catch up; the others
//!   get `Resync` and catch up), none lost;
//! - two nodes, one stopped (SIGSTOP) for 3 s and continued: the other's link to it backs up,
//!   its backpressure holds new sends back, and no delivery is dropped at the link's limit.

#[path = "../../tests/common/pg.rs"]
mod pg;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_tim-loadgen");
const SECRET: &str = "the loadgen test cluster's secret";
const NAME_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The `tim` binary beside `tim-loadgen` (built first if missing).
fn tim_binary() -> PathBuf {
    let tim = PathBuf::from(LOADGEN).with_file_name(format!("tim{}", std::env::consts::EXE_SUFFIX));
    if !tim.exists() {
        let release =
            PathBuf::from(LOADGEN).parent().and_then(|d| d.file_name()).is_some_and(|n| n == "release");
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "-p", "tim", "--bin", "tim"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo build").success());
    }
    tim
}

struct Node {
    child: Child,
    addr: String,
    cluster: String,
    /// The admin API's address, when started with one.
    admin: Option<String>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(id: u16, store: &str, join: Option<&str>) -> Node {
        Self::start_with(id, store, join, "", false)
    }

    /// `cluster` is appended to the `[cluster]` section; `admin`: the admin API on a free
    /// loopback port.
    fn start_with(id: u16, store: &str, join: Option<&str>, cluster: &str, admin: bool) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tim.toml");
        let join = join.map_or(String::new(), |a| format!("\"{a}\""));
        let admin_listen = if admin { "127.0.0.1:0" } else { "" };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin_cores = false\n\n\
             [security]\nargon2_m_kib = 64\nargon2_t = 1\nname_key = \"{NAME_KEY}\"\n\n[store]\n{store}\n\n\
             [limits]\ncursor_flush_ms = 20\n\n[gateway]\nws_listen = \"\"\n[admin]\nlisten = \"{admin_listen}\"\n\n\
             [cluster]\nnode_id = {id}\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\njoin = [{join}]\n{cluster}\n"
        );
        std::fs::write(&cfg, text).unwrap();
        let mut child = Command::new(tim_binary())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tim");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut addr, mut cluster, mut admin) = (String::new(), String::new(), None);
        // "tim listening on" comes last.
        while addr.is_empty() {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let word =
                |p: &str| line.strip_prefix(p).and_then(|r| r.split_whitespace().next()).map(str::to_owned);
            if let Some(a) = word("tim cluster listening on ") {
                cluster = a;
            } else if let Some(a) = word("tim admin listening on ") {
                admin = Some(a);
            } else if let Some(a) = word("tim listening on ") {
                addr = a;
            } else {
                panic!("unexpected line from tim: {line:?}");
            }
        }
        Node { child, addr, cluster, admin, _dir: dir }
    }

    /// `tim cluster status` of this node, as JSON.
    fn status(&self) -> Value {
        let out = Command::new(tim_binary())
            .args(["cluster", "status", "--addr", &self.cluster])
            .env("TIM_CLUSTER_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The sum of every sample of metric `name` in the admin API's `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let addr = self.admin.as_deref().expect("an admin listener");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait until `tim cluster status` of this node shows `n` members owning partitions.
    fn wait_members(&self, n: usize) {
        let start = Instant::now();
        loop {
            let out = Command::new(tim_binary())
                .args(["cluster", "status", "--addr", &self.cluster])
                .env("TIM_CLUSTER_SECRET", SECRET)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let owning = text.matches("\"partitions\":").count() - text.matches("\"partitions\":0").count();
            if out.status.success() && owning == n {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "members: {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// A `[store]` body: two fresh databases, one on each shared PostgreSQL server; `store` is
/// added to `[store]`, `postgres` to `[store.postgres]`.
fn pg_store(store: &str, postgres: &str) -> String {
    let servers = pg::shared();
    format!(
        "backend = \"postgres\"\n{store}\n[store.postgres]\nconnect_timeout_ms = 1000\n{postgres}\n\
         [[store.postgres.partition]]\nslots = \"0-2047\"\nurl = \"{}\"\n\
         [[store.postgres.partition]]\nslots = \"2048-4095\"\nurl = \"{}\"\n",
        pg::fresh_db(&servers[0]),
        pg::fresh_db(&servers[1])
    )
}

/// Run tim-loadgen with `args`; `during` runs once every connection is ready. Returns the
/// JSON result, the loadgen's stderr and its exit status.
fn loadgen(args: &[&str], during: impl FnOnce()) -> (Value, String, std::process::ExitStatus) {
    let mut child =
        Command::new(LOADGEN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("[setup]") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let setup = rx.recv_timeout(Duration::from_secs(60)).expect("the run started");
    let connections = args[args.iter().position(|&a| a == "--connections").unwrap() + 1];
    assert!(setup.contains(&format!("{connections}/{connections} ready")), "{setup}");
    during();
    let out = child.wait_with_output().unwrap();
    let log = reader.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("no JSON ({e}): {text}\n{log}"));
    (v, log, out.status)
}

#[test]
fn kill_a_node_under_load() {
    let store = pg_store("", "");
    let n1 = Node::start(1, &store, None);
    let n2 = Node::start(2, &store, Some(&n1.cluster));
    let mut n3 = Node::start(3, &store, Some(&n1.cluster));
    for node in [&n1, &n2, &n3] {
        node.wait_members(3);
    }
    let args = [
        "--addr",
        &n1.addr,
        "--addr",
        &n2.addr,
        "--addr",
        &n3.addr,
        "--scenario",
        "one-to-one",
        "--connections",
        "30",
        "--users",
        "15",
        "--duration",
        "6",
        "--rate",
        "3000",
        "--drain",
        "30",
        "--reconnect-give-up",
        "20",
        "--json",
    ];
    let (v, log, status) = loadgen(&args, || {
        std::thread::sleep(Duration::from_secs(2));
        let _ = n3.child.kill();
        let _ = n3.child.wait();
    });
    let acked = n(&v, "acked");
    assert!(acked > 1000, "{v}");
    assert_eq!(n(&v, "lost"), 0, "no acked message lost: {v}\n{log}");
    assert_eq!(n(&v, "delivered"), n(&v, "expected_deliveries"), "{v}");
    assert!(n(&v, "reconnects") >= 10, "the killed node's connections reconnected: {v}");
    for key in ["duplicated", "misrouted", "unanswered", "given_up", "reconnect_gave_up"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}\n{log}");
    }
    // Live deliveries of a conversation stay in seq order across the table change (what a shard
    // sent toward the dead node is routed again before what it sends by the new table).
    assert_eq!(n(&v, "out_of_order"), 0, "out of order: {v}\n{log}");
    assert!(n(&v, "resyncs") > 0, "the other nodes' sessions caught up: {v}");
    assert!(status.success(), "exit status {status:?}\n{log}");
}

/// A node stopped under load (SIGSTOP, 3 s; `failure_detect_ms` long enough that it stays a
/// member) backs up the other node's link to it: deliveries for its sessions gather in the link's
/// queue once the kernel's socket buffers are full. Past half of `link_queue_bytes_max` (1 MiB
/// here) that queue raises the node's backpressure, which holds new sends back, so the queue
/// never reaches the limit where deliveries would be dropped. Once the node runs again,
/// everything flows: the ledger shows every acked message delivered, none lost or duplicated.
/// (Before the backpressure, commit 97ef401, the same run dropped deliveries at the limit.)
#[test]
fn pause_a_node_under_load() {
    // The stopped node's own timers run out when it is continued: a statement in flight at the
    // stop would be taken as timed out though PostgreSQL ran it (an ambiguous commit: answered
    // StoreUnavailable, its resend acked as a duplicate, the original delivered by catch-up, not
    // live). The store's timeouts are set above the pause.
    let store =
        pg_store("commit_timeout_ms = 15000", "statement_timeout_ms = 10000\nacquire_timeout_ms = 10000");
    let cluster = "failure_detect_ms = 20000\nlink_queue_bytes_max = 1048576\n";
    let n1 = Node::start_with(1, &store, None, cluster, true);
    let n2 = Node::start_with(2, &store, Some(&n1.cluster), cluster, false);
    for node in [&n1, &n2] {
        node.wait_members(2);
    }
    // One user per connection, user i on node i % 2 writing to user i + 1 on the other node:
    // every delivery crosses the link. 1 KB bodies fill the link quickly; the bytes that can
    // still come after the high watermark (a delivery and a send per message in flight,
    // 10 × 16 on node 1) stay well under the other half of the limit.
    let args = [
        "--addr",
        &n1.addr,
        "--addr",
        &n2.addr,
        "--scenario",
        "one-to-one",
        "--connections",
        "20",
        "--window",
        "16",
        "--body-bytes",
        "1000",
        "--duration",
        "7",
        "--drain",
        "20",
        "--json",
    ];
    // (sources raised, sends held back) at their highest during the pause.
    let mut seen = (0, 0);
    let (v, log, status) = loadgen(&args, || {
        std::thread::sleep(Duration::from_secs(2));
        n2.signal(libc::SIGSTOP);
        let stopped = Instant::now();
        while stopped.elapsed() < Duration::from_secs(3) {
            seen.0 = seen.0.max(n1.metric("tim_backpressure_sources"));
            seen.1 = seen.1.max(n1.metric("tim_sends_held_back"));
            std::thread::sleep(Duration::from_millis(50));
        }
        n2.signal(libc::SIGCONT);
    });
    // Envelopes dropped (or refused) at a link's limit, by both nodes (node 2 sends a backlog
    // back once continued).
    let dropped_at_link = [&n1, &n2].map(|node| node.status()["dropped_envelopes"].as_u64().unwrap());
    let dropped_at_mesh = n1.metric("tim_dropped_envelopes_total");
    eprintln!(
        "during the pause: {} source(s) raised, {} sends held back at most; dropped at the link \
         {dropped_at_link:?}, at node 1's mesh {dropped_at_mesh}; after: {} source(s) raised; ack max {} ms",
        seen.0,
        seen.1,
        n1.metric("tim_backpressure_sources"),
        n(&v, "ack_max_us") / 1000
    );
    eprintln!(
        "acked {}, delivered {} of {}, lost {}, duplicated {}, errors {}, {:.0} msgs/s",
        n(&v, "acked"),
        n(&v, "delivered"),
        n(&v, "expected_deliveries"),
        n(&v, "lost"),
        n(&v, "duplicated"),
        n(&v, "errors"),
        v["msgs_per_s"].as_f64().unwrap_or(0.0)
    );
    assert!(seen.0 >= 1, "node 1's link to the stopped node raised its backpressure: {v}\n{log}");
    assert!(seen.1 > 0, "sends were held back: {v}");
    assert!(n(&v, "acked") > 1000, "{v}");
    assert_eq!(n(&v, "lost"), 0, "no acked message lost: {v}\n{log}");
    assert_eq!(n(&v, "delivered"), n(&v, "expected_deliveries"), "{v}\n{log}");
    for key in ["duplicated", "misrouted", "unanswered", "given_up", "reconnects", "out_of_order", "errors"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}\n{log}");
    }
    assert_eq!(dropped_at_link, [0, 0], "nothing dropped (nor refused) at a link");
    assert_eq!(dropped_at_mesh, 0, "nothing dropped at node 1's mesh");
    assert!(status.success(), "exit status {status:?}\n{log}");
}
