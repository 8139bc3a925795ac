//! End to end: a real `tim serve` process (2 shards, test-speed argon2, config in a temporary
//! directory), `tim-loadgen` run against it, and its `--json` line checked: every acknowledged
//! message delivered exactly once to every session it was meant for, and logins that work.
//!
//! The `tim` binary is taken from beside `tim-loadgen`; when it is not there (a plain
//! `cargo test -p tim-loadgen` builds only the library of `tim`), it is built first.
//!
//! Several addresses and reconnects: connections spread over two servers, and a durable server
//! killed with SIGKILL in the middle of a run and started again on the same port, the swarm
//! reconnecting to it and losing nothing.
//!
//! WebSocket: one-to-one over `--transport ws-json` and `ws-binary` against the server's
//! WebSocket listener, checked by the same ledger.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_tim-loadgen");

/// The `tim` binary of the same build profile, built on first use if missing.
fn tim_binary() -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let tim = PathBuf::from(LOADGEN).with_file_name(format!("tim{}", std::env::consts::EXE_SUFFIX));
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built && !tim.exists() {
        let profile_dir = PathBuf::from(LOADGEN);
        let release = profile_dir.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "release");
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "-p", "tim", "--bin", "tim"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build -p tim");
        assert!(status.success(), "cargo build -p tim --bin tim failed");
    }
    *built = true;
    assert!(tim.exists(), "no tim binary at {}", tim.display());
    tim
}

/// A `tim serve` child process, killed on drop.
struct Server {
    child: Child,
    addr: String,
    /// The WebSocket listener's address, when it has one.
    ws_addr: Option<String>,
    dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Start a server; `store` is the body of its `[store]` section (`{data}` is replaced by a
    /// data directory inside the server's temporary directory).
    fn start(store: &str) -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), "127.0.0.1:0", store)
    }

    /// Start a server in `dir` (its config and data; a restart finds the data of the last
    /// start there), listening on `listen`.
    fn start_in(dir: tempfile::TempDir, listen: &str, store: &str) -> Server {
        Server::start_with(dir, listen, "", store)
    }

    /// Start a server with a WebSocket listener on a free port of 127.0.0.1 too.
    fn start_websocket(store: &str) -> Server {
        Server::start_with(tempfile::tempdir().unwrap(), "127.0.0.1:0", "127.0.0.1:0", store)
    }

    /// Start a server in `dir` listening on `listen`, and on `ws_listen` for WebSocket (`""`:
    /// none).
    fn start_with(dir: tempfile::TempDir, listen: &str, ws_listen: &str, store: &str) -> Server {
        let cfg = dir.path().join("tim.toml");
        let data = dir.path().join("data");
        let store = store.replace("{data}", &data.display().to_string());
        let text = format!(
            "[server]\nlisten = \"{listen}\"\nshards = 2\npin_cores = false\n\n\
             [security]\nargon2_m_kib = 64\nargon2_t = 1\n\n[gateway]\nws_listen = \"{ws_listen}\"\n[admin]\nlisten = \"\"\n\n[store]\n{store}\n"
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
        // "tim websocket listening on ADDR" (and other listeners) first; "tim listening on" last.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut ws_addr = None;
        let addr = loop {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let addr_after = |prefix: &str| {
                line.strip_prefix(prefix).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned)
            };
            if let Some(a) = addr_after("tim websocket listening on ") {
                ws_addr = Some(a);
            } else if let Some(a) = addr_after("tim listening on ") {
                break a;
            } else if !line.starts_with("tim ") {
                panic!("unexpected line from tim: {line:?}");
            }
        };
        Server { child, addr, ws_addr, dir: Some(dir) }
    }

    /// Kill the server with SIGKILL (no shutdown, no flush); its directory, to start it again.
    fn kill(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.take().expect("the directory is kept until the server is dropped")
    }
}

/// A TCP port of 127.0.0.1 that was free a moment ago (a server to restart on the same port
/// must be given one, not port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run tim-loadgen with `args` (plus `--json --quiet`), within `limit`; returns its exit
/// status and the JSON line.
fn loadgen(addr: &str, args: &[&str], limit: Duration) -> (Output, Value) {
    let child = Command::new(LOADGEN)
        .args(["--addr", addr, "--json", "--quiet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tim-loadgen");
    wait_loadgen(child, args, limit)
}

/// Wait for a tim-loadgen run within `limit`; its exit status and JSON line.
fn wait_loadgen(mut child: Child, args: &[&str], limit: Duration) -> (Output, Value) {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tim-loadgen {args:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line; stdout:\n{stdout}\nstderr:\n{stderr}"));
    let v: Value = serde_json::from_str(line).expect("valid JSON");
    println!("{stdout}");
    (out, v)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

/// The tests run one at a time: on two cores a loaded neighbour would slow the readers of the
/// swarm until the server closes them as slow consumers (as it should), which is not what these
/// tests are about.
static SERIAL: Mutex<()> = Mutex::new(());

/// 20 connections over 10 users (2 sessions each), each writing to the next user (30 k msgs/s in
/// all, open loop, so that receivers in a debug build keep up): every message is owed to the
/// peer's 2 sessions and to the sender's other session, and the ledger finds every one of them,
/// once.
#[test]
fn one_to_one_ledger() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    let args = [
        "--scenario",
        "one-to-one",
        "--connections",
        "20",
        "--users",
        "10",
        "--duration",
        "3",
        "--rate",
        "30000",
    ];
    let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(30));
    let acked = n(&v, "acked");
    assert!(acked > 0, "nothing acknowledged: {v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert_eq!(n(&v, "duplicated"), 0, "{v}");
    assert_eq!(n(&v, "out_of_order"), 0, "{v}");
    assert_eq!(n(&v, "misrouted"), 0, "{v}");
    assert_eq!(n(&v, "expected_deliveries"), acked * 3, "{v}");
    assert_eq!(n(&v, "delivered"), acked * 3, "{v}");
    assert_eq!(n(&v, "connections"), 20);
    assert!(v["msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(n(&v, "deliver_p99_us") >= n(&v, "deliver_p50_us"));
    assert!(out.status.success(), "exit status {:?}", out.status);
}

/// Eight workers logging in and out for 2 seconds: logins happen and nothing fails.
#[test]
fn login_storm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    let args = ["--scenario", "login-storm", "--connections", "8", "--duration", "2"];
    let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(30));
    assert!(n(&v, "logins") > 0, "{v}");
    assert_eq!(n(&v, "errors"), 0, "{v}");
    assert!(out.status.success(), "exit status {:?}", out.status);
}

/// With the durable embedded store, the same users run twice: the second run's sessions get a
/// catch-up at login, which must not repeat messages they also get live.
#[test]
fn durable_store_second_run_has_no_duplicates() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"embedded\"\ndata_dir = \"{data}\"");
    let args = ["--scenario", "one-to-one", "--connections", "40", "--users", "20", "--duration", "2"];
    for run in 0..2 {
        let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(30));
        assert!(n(&v, "acked") > 0, "run {run}: {v}");
        assert_eq!(n(&v, "lost"), 0, "run {run}: {v}");
        assert_eq!(n(&v, "duplicated"), 0, "run {run}: {v}");
        assert!(out.status.success(), "run {run}: exit status {:?}", out.status);
    }
}

/// `--server-pid`: the server's CPU time over the measured window is reported, and divided by
/// the deliveries gives a finite, positive cost per message.
#[test]
fn server_cpu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    let pid = server.child.id().to_string();
    let args = [
        "--scenario",
        "one-to-one",
        "--connections",
        "8",
        "--users",
        "4",
        "--duration",
        "2",
        "--rate",
        "20000",
        "--server-pid",
        &pid,
    ];
    let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(30));
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(n(&v, "delivered") > 0, "{v}");
    assert_eq!(v["server_pid"].as_u64(), Some(server.child.id() as u64), "{v}");
    let cpu = v["server_cpu_s"].as_f64().unwrap_or_else(|| panic!("no server_cpu_s in {v}"));
    assert!(cpu > 0.0, "{v}");
    let util = v["server_cpu_util"].as_f64().unwrap_or_else(|| panic!("no server_cpu_util in {v}"));
    assert!(util > 0.0 && util.is_finite(), "{v}");
    let per_msg =
        v["server_cpu_us_per_msg"].as_f64().unwrap_or_else(|| panic!("no server_cpu_us_per_msg in {v}"));
    assert!(per_msg > 0.0 && per_msg.is_finite(), "{v}");
    // the per-message figure is the CPU time over the deliveries
    let expect = cpu * 1e6 / n(&v, "delivered") as f64;
    assert!((per_msg - expect).abs() <= expect * 0.01 + 0.01, "{per_msg} vs {expect}: {v}");
}

/// A PID that is not a running process is refused before anything starts (exit status 2).
#[test]
fn server_pid_missing() {
    let out = Command::new(LOADGEN)
        .args(["--addr", "127.0.0.1:9", "--quiet", "--server-pid", "4294967295"])
        .output()
        .expect("run tim-loadgen");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--server-pid 4294967295") && stderr.contains("/proc/4294967295/stat"),
        "{stderr}"
    );
}

/// Live rooms: 20 connections in 2 rooms (a publisher and 9 subscribers each), closed loop for
/// 2 seconds: deliveries happen, in order, and every publish reached every subscriber or was
/// reported missed; nothing failed during the run.
#[test]
fn room_fan_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    let args =
        ["--scenario", "room", "--rooms", "2", "--connections", "20", "--duration", "2", "--window", "8"];
    let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(30));
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert!(n(&v, "delivered") > 0, "{v}");
    assert_eq!(n(&v, "out_of_order"), 0, "{v}");
    assert_eq!(n(&v, "duplicated"), 0, "{v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert_eq!(n(&v, "run_errors"), 0, "{v}");
    assert_eq!(n(&v, "rooms"), 2, "{v}");
    // 9 subscribers per room: each publish is owed 9 times, received or reported missed.
    assert_eq!(n(&v, "expected_deliveries"), n(&v, "acked") * 9, "{v}");
    assert_eq!(n(&v, "delivered") + n(&v, "missed"), n(&v, "expected_deliveries"), "{v}");
    assert!(n(&v, "deliver_p99_us") >= n(&v, "deliver_p50_us"));
    assert!(out.status.success(), "exit status {:?}", out.status);
}

/// Groups: 2 groups of 10 members on both shards, 2 senders each, open loop for 2 seconds:
/// every acknowledged message reaches the 9 other members of its group, once, in the group's
/// sequence (the join notices of the setup included), and the figures come per group.
#[test]
fn group_fan_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    let args = [
        "--scenario",
        "group",
        "--groups",
        "2",
        "--members",
        "10",
        "--senders",
        "2",
        "--duration",
        "2",
        "--rate",
        "2000",
    ];
    let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(60));
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert_eq!((n(&v, "connections"), n(&v, "ready")), (20, 20), "{v}");
    assert!(n(&v, "acked") > 0, "{v}");
    assert_eq!(n(&v, "expected_deliveries"), n(&v, "acked") * 9, "{v}");
    assert_eq!(n(&v, "delivered"), n(&v, "expected_deliveries"), "{v}");
    for key in ["lost", "duplicated", "out_of_order", "misrouted"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
    let groups = v["per_group"].as_array().expect("per_group");
    assert_eq!(groups.len(), 2, "{v}");
    for g in groups {
        assert_eq!((n(g, "members"), n(g, "lost")), (10, 0), "{g}");
        assert!(n(g, "group_id") >= 1 << 62, "{g}");
    }
    assert!(v["deliveries_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(n(&v, "ack_p99_us") > 0, "{v}");
    assert!(out.status.success(), "exit status {:?}", out.status);
}

/// Start tim-loadgen with `args` (plus `--json`, progress lines on) and a channel that gets
/// the first line of its stderr that starts with `prefix`; the rest of stderr is echoed.
fn loadgen_watching(args: &[&str], prefix: &'static str) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(LOADGEN)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tim-loadgen");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("loadgen: {line}");
            if !sent && line.starts_with(prefix) {
                sent = tx.send(line).is_ok();
            }
        }
    });
    (child, rx)
}

/// `--addr` twice, two servers: connection i goes to address i mod 2, so each server holds
/// half of the connections, as the JSON's `per_addr` counts say.
#[test]
fn addresses_spread_connections() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = Server::start("backend = \"memory\"");
    let b = Server::start("backend = \"memory\"");
    let args = ["--addr", &b.addr, "--scenario", "idle", "--connections", "10", "--duration", "1"];
    let (out, v) = loadgen(&a.addr, &args, Duration::from_secs(30));
    assert!(out.status.success(), "exit status {:?}: {v}", out.status);
    assert_eq!(v["addrs"], serde_json::json!([a.addr, b.addr]), "{v}");
    let per_addr = v["per_addr"].as_array().expect("per_addr");
    assert_eq!(per_addr.len(), 2, "{v}");
    for (p, addr) in per_addr.iter().zip([&a.addr, &b.addr]) {
        assert_eq!(p["addr"].as_str(), Some(addr.as_str()), "{v}");
        assert_eq!((n(p, "connections"), n(p, "ready"), n(p, "reconnects")), (5, 5, 0), "{v}");
    }
    assert_eq!(n(&v, "connected"), 10, "{v}");
    assert_eq!(v["reconnect"], Value::Bool(false), "idle does not reconnect: {v}");
}

/// The durable server (embedded store) is killed with SIGKILL a second into the run and started
/// again on the same port; the address is given twice, so reconnects go round the list. Every
/// connection reconnects, logs in again, resends what was in flight (acknowledged once, as a
/// duplicate if the server had stored it), and gets what it missed from the catch-up: nothing
/// acknowledged is lost, and what comes again after the reconnect counts as redelivered.
#[test]
fn reconnect_after_kill() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let listen = format!("127.0.0.1:{}", free_port());
    let store = "backend = \"embedded\"\ndata_dir = \"{data}\"";
    let server = Server::start_in(tempfile::tempdir().unwrap(), &listen, store);
    assert_eq!(server.addr, listen);
    let args = [
        "--addr",
        &listen,
        "--addr",
        &listen,
        "--scenario",
        "one-to-one",
        "--connections",
        "20",
        "--users",
        "10",
        "--duration",
        "4",
        "--rate",
        "2000",
        "--drain",
        "20",
        "--reconnect-give-up",
        "20",
    ];
    let (child, setup_done) = loadgen_watching(&args, "[setup]");
    let line = setup_done.recv_timeout(Duration::from_secs(30)).expect("the run started");
    assert!(line.contains("20/20 ready"), "{line}");
    std::thread::sleep(Duration::from_secs(1));
    let dir = server.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _server = Server::start_in(dir, &listen, store);
    let (out, v) = wait_loadgen(child, &args, Duration::from_secs(90));
    let acked = n(&v, "acked");
    assert!(acked > 0, "{v}");
    assert!(n(&v, "reconnects") >= 20, "every connection reconnected: {v}");
    assert_eq!((n(&v, "reconnect_gave_up"), n(&v, "down_at_end")), (0, 0), "{v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert_eq!(n(&v, "expected_deliveries"), acked * 3, "{v}");
    assert_eq!(n(&v, "delivered"), n(&v, "expected_deliveries"), "{v}");
    for key in ["duplicated", "out_of_order", "misrouted", "unanswered", "given_up"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
    assert!(n(&v, "skipped_while_down") > 0, "open-loop sends fell due while down: {v}");
    assert!(v["down_max_s"].as_f64().is_some_and(|s| s > 0.0), "{v}");
    assert!(v["down_total_s"].as_f64() >= v["down_max_s"].as_f64(), "{v}");
    let per_addr = v["per_addr"].as_array().expect("per_addr");
    assert_eq!(per_addr.iter().map(|p| n(p, "connections")).collect::<Vec<_>>(), [10, 10], "{v}");
    assert_eq!(per_addr.iter().map(|p| n(p, "reconnects")).sum::<u64>(), n(&v, "reconnects"), "{v}");
    assert!(out.status.success(), "exit status {:?}", out.status);
}

/// With the only server gone for good, a connection gives up after --reconnect-give-up and the
/// run fails (exit status 1), saying so.
#[test]
fn reconnect_gives_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    let addr = server.addr.clone();
    let args = [
        "--addr",
        &addr,
        "--reconnect",
        "--reconnect-give-up",
        "1",
        "--connections",
        "4",
        "--duration",
        "3",
        "--drain",
        "1",
        "--rate",
        "400",
    ];
    let (child, setup_done) = loadgen_watching(&args, "[setup]");
    setup_done.recv_timeout(Duration::from_secs(30)).expect("the run started");
    std::thread::sleep(Duration::from_millis(500));
    drop(server.kill());
    let (out, v) = wait_loadgen(child, &args, Duration::from_secs(60));
    assert_eq!((n(&v, "reconnect_gave_up"), n(&v, "down_at_end")), (4, 4), "{v}");
    assert_eq!(n(&v, "reconnects"), 0, "{v}");
    assert_eq!(v["ok"], Value::Bool(false), "{v}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// One-to-one over WebSocket, JSON texts and binary messages, against the server's WebSocket
/// listener (2 sessions per user, as in `one_to_one_ledger`): every acknowledged message reaches
/// the peer's sessions and the sender's other one exactly once, in order, with no error.
#[test]
fn one_to_one_over_websocket() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start_websocket("backend = \"memory\"");
    let ws = server.ws_addr.clone().expect("a websocket listener");
    for (transport, json_body, users) in
        [("ws-json", "text", "j"), ("ws-json", "base64", "b"), ("ws-binary", "text", "w")]
    {
        let mut args = vec!["--transport", transport, "--scenario", "one-to-one", "--connections", "20"];
        args.extend(["--users", "10", "--duration", "2", "--rate", "5000", "--user-prefix", users]);
        if transport == "ws-json" {
            args.extend(["--json-body", json_body]);
        }
        let (out, v) = loadgen(&ws, &args, Duration::from_secs(30));
        let acked = n(&v, "acked");
        assert_eq!(v["transport"], transport, "{v}");
        assert!(acked > 1000, "{transport}: too few acknowledged: {v}");
        assert_eq!(n(&v, "lost"), 0, "{transport}: {v}");
        assert_eq!(n(&v, "duplicated"), 0, "{transport}: {v}");
        assert_eq!(n(&v, "out_of_order"), 0, "{transport}: {v}");
        assert_eq!(n(&v, "misrouted"), 0, "{transport}: {v}");
        assert_eq!(n(&v, "errors"), 0, "{transport}: {v}");
        assert_eq!(n(&v, "delivered"), acked * 3, "{transport}: {v}");
        assert!(out.status.success(), "{transport}: exit status {:?}", out.status);
    }
    // The WebSocket port speaks HTTP: a TCP loadgen there fails to set up, and a WebSocket one
    // pointed at the TCP port fails its handshake, saying so.
    let (out, v) = loadgen(
        &server.addr,
        &["--transport", "ws-json", "--connections", "1", "--setup-timeout", "3", "--connect-attempts", "1"],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(v.to_string().contains("websocket handshake"), "{v}");
}

/// Senders faster than receivers (closed loop, window 64, on a debug server whose mesh queues
/// hold 8 envelopes and whose overflow holds 8192): acknowledgements come back before the
/// deliveries are written, so deliveries pile up. The node must hold new sends back (its
/// backpressure) rather than drop deliveries of acknowledged messages: the ledger finds every
/// one.
#[test]
fn deliveries_outrun_by_sends_are_held_back_not_dropped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(
        "backend = \"memory\"\n\n[limits]\nmesh_queue_capacity = 8\nmesh_overflow_max = 8192\n",
    );
    let args = ["--scenario", "one-to-one", "--connections", "40", "--users", "20", "--duration", "3"];
    let args = [&args[..], &["--window", "64"]].concat();
    let (out, v) = loadgen(&server.addr, &args, Duration::from_secs(60));
    let acked = n(&v, "acked");
    assert!(acked > 1000, "too few acknowledged: {v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert_eq!(n(&v, "duplicated"), 0, "{v}");
    assert_eq!(n(&v, "out_of_order"), 0, "{v}");
    assert_eq!(n(&v, "errors"), 0, "{v}");
    assert_eq!(n(&v, "delivered"), acked * 3, "{v}");
    assert!(out.status.success(), "exit status {:?}", out.status);
}
