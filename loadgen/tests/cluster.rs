//! tim-loadgen against a cluster of three `tim serve` nodes on two throwaway PostgreSQL servers,
//! its clients spread over the nodes (`--addr` three times), and one node killed with SIGKILL
//! in the middle of the run: the ledger shows every acked message delivered (the killed node's
//! clients reconnect elsewhere and catch up; the others get `Resync` and catch up), none lost.

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
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(id: u16, store: &str, join: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tim.toml");
        let join = join.map_or(String::new(), |a| format!("\"{a}\""));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin_cores = false\n\n\
             [security]\nargon2_m_kib = 64\nargon2_t = 1\nname_key = \"{NAME_KEY}\"\n\n[store]\n{store}\n\n\
             [limits]\ncursor_flush_ms = 20\n\n[gateway]\nws_listen = \"\"\n[admin]\nlisten = \"\"\n\n\
             [cluster]\nnode_id = {id}\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\njoin = [{join}]\n"
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
        let (mut addr, mut cluster) = (String::new(), String::new());
        for _ in 0..2 {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let word =
                |p: &str| line.strip_prefix(p).and_then(|r| r.split_whitespace().next()).map(str::to_owned);
            if let Some(a) = word("tim cluster listening on ") {
                cluster = a;
            } else if let Some(a) = word("tim listening on ") {
                addr = a;
            } else {
                panic!("unexpected line from tim: {line:?}");
            }
        }
        Node { child, addr, cluster, _dir: dir }
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

#[test]
fn kill_a_node_under_load() {
    let servers = pg::shared();
    let store = format!(
        "backend = \"postgres\"\n[store.postgres]\nconnect_timeout_ms = 1000\n\
         [[store.postgres.partition]]\nslots = \"0-2047\"\nurl = \"{}\"\n\
         [[store.postgres.partition]]\nslots = \"2048-4095\"\nurl = \"{}\"\n",
        pg::fresh_db(&servers[0]),
        pg::fresh_db(&servers[1])
    );
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
    assert!(setup.contains("30/30 ready"), "{setup}");
    std::thread::sleep(Duration::from_secs(2));
    let _ = n3.child.kill();
    let _ = n3.child.wait();
    let out = child.wait_with_output().unwrap();
    let log = reader.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("no JSON ({e}): {text}\n{log}"));
    let acked = n(&v, "acked");
    assert!(acked > 1000, "{v}");
    assert_eq!(n(&v, "lost"), 0, "no acked message lost: {v}\n{log}");
    assert_eq!(n(&v, "delivered"), n(&v, "expected_deliveries"), "{v}");
    assert!(n(&v, "reconnects") >= 10, "the killed node's connections reconnected: {v}");
    for key in ["duplicated", "misrouted", "unanswered", "given_up", "reconnect_gave_up"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}\n{log}");
    }
    // Known: in one run in six to ten, one conversation's messages of the outage reach one
    // receiver after a later one of that conversation (none lost); docs/CLUSTER.md. Shown, not
    // asserted, until it is found.
    eprintln!("out of order: {}", n(&v, "out_of_order"));
    assert!(n(&v, "resyncs") > 0, "the other nodes' sessions caught up: {v}");
    assert!(out.status.success(), "exit status {:?}\n{log}", out.status);
}
