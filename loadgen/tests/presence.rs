//! End to end: one-to-one with friends, presence churn and typing beside the messages, against
//! a real `tim serve` process (2 shards, test-speed argon2, config in a temporary directory,
//! port chosen by the system): the users make friends over the protocol before the run, the
//! presence changes' notices reach every friend's session (counted, not taken for deliveries),
//! typing notices arrive, and no message is lost or duplicated.
//!
//! The `tim` binary is taken from beside `tim-loadgen`; when it is not there (a plain
//! `cargo test -p tim-loadgen` builds only the library of `tim`), it is built first.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Mutex,
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

/// A `tim serve` child process on a port of its choosing, killed on drop.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Start a server; `store` is the body of its `[store]` section (`{data}`: a data directory
    /// in the server's temporary directory).
    fn start(store: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tim.toml");
        let store = store.replace("{data}", &dir.path().join("data").display().to_string());
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin_cores = false\n\n\
             [security]\nargon2_m_kib = 64\nargon2_t = 1\n\n[admin]\nlisten = \"\"\n\n\
             [limits]\npresence_coalesce_ms = 0\n\n[store]\n{store}\n"
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
        let addr = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "tim ended before listening");
            if let Some(rest) = line.strip_prefix("tim listening on ") {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
            assert!(line.starts_with("tim "), "unexpected line from tim: {line:?}");
        };
        Server { child, addr, _dir: dir }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run tim-loadgen with `args` (plus `--json --quiet`) within `limit`; its success and JSON line.
fn loadgen(addr: &str, args: &[&str], limit: Duration) -> (bool, Value) {
    let mut child = Command::new(LOADGEN)
        .args(["--addr", addr, "--json", "--quiet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tim-loadgen");
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
    println!("{stdout}");
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line; stdout:\n{stdout}\nstderr:\n{stderr}"));
    (out.status.success(), serde_json::from_str(line).expect("valid JSON"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

/// One at a time (two cores).
static SERIAL: Mutex<()> = Mutex::new(());

/// 24 connections over 12 users (2 sessions each), 4 friends per user; 10 % of operations are
/// presence changes, 1 % typing notices (about one per connection and second, under the
/// server's 2 per second), open loop: every presence change's notice reaches the 8 sessions of
/// the user's 4 friends and the user's other session, typing notices arrive, and the messages'
/// ledger holds.
fn presence_churn_run(addr: &str, run: &str) {
    let args = [
        "--scenario",
        "one-to-one",
        "--connections",
        "24",
        "--users",
        "12",
        "--friends",
        "4",
        "--presence-share",
        "0.1",
        "--typing-share",
        "0.01",
        "--duration",
        "3",
        "--rate",
        "2000",
    ];
    let (ok, v) = loadgen(addr, &args, Duration::from_secs(60));
    let acked = n(&v, "acked");
    assert!(acked > 0, "{run}: nothing acknowledged: {v}");
    assert_eq!(n(&v, "lost"), 0, "{run}: {v}");
    assert_eq!(n(&v, "duplicated"), 0, "{run}: {v}");
    assert_eq!(n(&v, "out_of_order"), 0, "{run}: {v}");
    assert_eq!(n(&v, "misrouted"), 0, "{run}: {v}");
    assert_eq!(n(&v, "expected_deliveries"), acked * 3, "{run}: {v}");
    assert_eq!(n(&v, "delivered"), acked * 3, "{run}: notices taken for deliveries? {v}");
    assert_eq!(n(&v, "friends"), 4, "{run}: {v}");
    let sets = n(&v, "presence_answered");
    assert!(sets > 0 && sets == n(&v, "presence_sent"), "{run}: {v}");
    // About a tenth of the operations (messages acked + changes answered + typing sent).
    let share = sets as f64 / (acked + sets + n(&v, "typing_sent")) as f64;
    assert!((0.08..0.12).contains(&share), "{run}: presence share {share}: {v}");
    // Each change: 4 friends × 2 sessions + the user's other session.
    assert_eq!(n(&v, "presence_notices_expected"), sets * 9, "{run}: {v}");
    assert_eq!(n(&v, "presence_notices"), sets * 9, "{run}: {v}");
    assert!(n(&v, "typing_sent") > 0, "{run}: {v}");
    assert_eq!(n(&v, "typing_refused"), 0, "{run}: {v}");
    assert!(n(&v, "typing_notices") > 0, "{run}: {v}");
    assert!(ok, "{run}: the run failed: {v}");
}

#[test]
fn presence_churn_beside_one_to_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"memory\"");
    presence_churn_run(&server.addr, "memory");
}

/// The durable embedded store, twice with the same users: the second run finds them friends
/// already (AlreadyFriends, NoFriendRequest are fine) and their friendships loaded at login.
#[test]
fn presence_churn_on_the_embedded_store_twice() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start("backend = \"embedded\"\ndata_dir = \"{data}\"");
    presence_churn_run(&server.addr, "first run");
    presence_churn_run(&server.addr, "second run");
}

/// The options are for one-to-one over TCP, with an even number of friends that the users
/// can hold, and shares below 1.
#[test]
fn presence_options_are_checked() {
    let bad: [&[&str]; 6] = [
        &["--friends", "3"],
        &["--friends", "10", "--users", "10"],
        &["--presence-share", "1"],
        &["--presence-share", "0.6", "--typing-share", "0.4"],
        &["--scenario", "idle", "--friends", "2"],
        &["--typing-share", "-0.1"],
    ];
    for args in bad {
        let out = Command::new(LOADGEN)
            .args(["--addr", "127.0.0.1:9", "--quiet", "--connections", "10"])
            .args(args)
            .output()
            .expect("run tim-loadgen");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
