//! A cluster of three `tim serve` processes on loopback over two throwaway PostgreSQL servers:
//! 1:1 and group messages across nodes, logins on one node kicking sessions on another, the
//! loss of a node (kill -9) and its partitions moving, a SIGTERM leave and a rejoin, and the
//! refusals (a wrong secret, the embedded store in a cluster).

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use tim::{
    client::{Client, Event},
    protocol::{invite_policy, join_policy, ErrorCode, GroupProfile},
};

const SECRET: &str = "the test cluster's secret";

/// One node: a `tim serve` process with its addresses.
struct Node {
    id: u16,
    child: Child,
    addr: SocketAddr,
    /// Where it listens for peers (none for a node that only dials out).
    cluster: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Start node `id` on `store` (a `[store]` body), joining through `join`; `extra` TOML is
    /// appended. Returns once the node listens (and has joined, or waited `join_wait_ms`).
    fn start(id: u16, store: &str, join: &[SocketAddr], extra: &str) -> Node {
        Self::start_on(id, store, join, extra, Some("127.0.0.1:0"))
    }

    /// `cluster_listen` `None`: a node that only dials out (behind NAT).
    fn start_on(
        id: u16,
        store: &str,
        join: &[SocketAddr],
        extra: &str,
        cluster_listen: Option<&str>,
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tim.toml");
        let join: Vec<String> = join.iter().map(|a| format!("\"{a}\"")).collect();
        // The memory store in a cluster derives the key of names from the cluster secret.
        let name_key =
            if store.contains("\"memory\"") { String::new() } else { format!("name_key = \"{NAME_KEY}\"\n") };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin_cores = false\nworker_threads = 2\n\n\
             [security]\nargon2_m_kib = 64\nargon2_t = 1\n{name_key}\n\
             [store]\ndata_dir = \"{}\"\n{store}\n\n[gateway]\nws_listen = \"\"\n[admin]\nlisten = \"\"\n\n\
             [cluster]\nnode_id = {id}\n{}secret = \"{SECRET}\"\njoin = [{}]\n\n{extra}\n",
            dir.path().join("data").display(),
            cluster_listen.map_or(String::new(), |l| format!("listen = \"{l}\"\n")),
            join.join(", ")
        );
        std::fs::write(&cfg, text).unwrap();
        let mut child = spawn_serve(&cfg);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut addr = None;
        let mut cluster = None;
        while addr.is_none() {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let word = |prefix: &str| -> Option<SocketAddr> {
                line.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok()
            };
            if let Some(a) = word("tim cluster listening on ") {
                cluster = Some(a);
            } else if let Some(a) = word("tim listening on ") {
                addr = Some(a);
            } else {
                panic!("unexpected line from tim: {line:?}");
            }
        }
        Node { id, child, addr: addr.unwrap(), cluster, _dir: dir }
    }

    fn client(&self) -> Client {
        Client::connect(self.addr).unwrap()
    }

    fn login(&self, name: &str, device_type: u8) -> Client {
        let mut c = self.client();
        c.login(name, PASSWORD, device_type, "dev").unwrap();
        c
    }

    /// The node's view of the cluster.
    fn status(&self) -> serde_like::Status {
        serde_like::parse(
            &tim::cluster::node::ask_status(self.cluster.expect("a listening node"), SECRET).unwrap(),
        )
    }

    /// Wait until this node sees exactly `nodes` alive (itself included) and a table over them.
    fn wait_members(&self, nodes: &[u16], within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let st = self.status();
            let mut alive = st.alive_with_partitions();
            alive.sort_unstable();
            if alive == nodes {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "node {}: members {alive:?}, expected {nodes:?} (all: {:?})",
                self.id,
                st.members
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "node {} did not exit after SIGTERM", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The few fields of `tim cluster status` the tests read.
mod serde_like {
    pub struct Status {
        /// (node, state, partitions)
        pub members: Vec<(u16, String, usize)>,
    }

    impl Status {
        /// Nodes alive (or self) that own partitions.
        pub fn alive_with_partitions(&self) -> Vec<u16> {
            self.members
                .iter()
                .filter(|(_, s, p)| (s == "alive" || s == "self") && *p > 0)
                .map(|&(n, _, _)| n)
                .collect()
        }
    }

    fn field<'a>(obj: &'a str, name: &str) -> &'a str {
        let at =
            obj.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("{name} in {obj}")) + name.len() + 3;
        let rest = &obj[at..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim_matches('"')
    }

    pub fn parse(json: &str) -> Status {
        let members = json.split("{\"node\":").skip(2).map(|m| {
            let m = format!("{{\"node\":{m}");
            (
                field(&m, "node").parse().unwrap(),
                field(&m, "state").to_string(),
                field(&m, "partitions").parse().unwrap(),
            )
        });
        Status { members: members.collect() }
    }
}

fn register(node: &Node, name: &str) -> u64 {
    node.client().register(name, PASSWORD).unwrap()
}

/// Send and wait for the ack, resending with the same id on the answers that say "retry"
/// (PROTOCOL 8.11, 8.16): right after a table change a conversation's new owner may meet the
/// old owner's last write (StoreUnavailable) or a node not reached yet (NodeUnavailable).
fn send_retrying(c: &mut Client, to: u64, client_msg_id: u64, body: &[u8]) -> tim::protocol::SendAck {
    for _ in 0..100 {
        match c.send_wait(to, client_msg_id, body) {
            Ok(ack) => return ack,
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        ErrorCode::StoreUnavailable
                            | ErrorCode::NodeUnavailable
                            | ErrorCode::Timeout
                            | ErrorCode::Busy
                    )
                ) =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("send {client_msg_id} to {to}: {e}"),
        }
    }
    panic!("send {client_msg_id} to {to}: no ack after 100 tries")
}

fn next_body(c: &mut Client) -> Vec<u8> {
    c.next_delivery().unwrap().body
}

fn three_nodes(store: &str, extra: &str) -> Vec<Node> {
    let n1 = Node::start(1, store, &[], extra);
    let n2 = Node::start(2, store, &[n1.cluster.unwrap()], extra);
    let n3 = Node::start(3, store, &[n1.cluster.unwrap()], extra);
    let nodes = vec![n1, n2, n3];
    for n in &nodes {
        n.wait_members(&[1, 2, 3], Duration::from_secs(10));
    }
    nodes
}

/// Users on different nodes talk 1:1 and in a group; a login on one node kicks a session on
/// another (one user owner in the cluster).
#[test]
fn messages_cross_nodes() {
    let store = pg::store_body("postgres");
    let nodes = three_nodes(&store, "[sessions]\nper_device_type_max = 1\n");
    let users: Vec<(String, u64)> = (0..6)
        .map(|i| {
            let name = format!("user{i}");
            let id = register(&nodes[i % 3], &name);
            (name, id)
        })
        .collect();
    // Each user on the node after the one it registered on.
    let mut clients: Vec<Client> =
        users.iter().enumerate().map(|(i, (n, _))| nodes[(i + 1) % 3].login(n, 3)).collect();
    // 1:1, every ordered pair, in order per conversation.
    for a in 0..users.len() {
        for b in 0..users.len() {
            if a != b {
                let ack = clients[a]
                    .send_wait(users[b].1, (a * 100 + b) as u64 + 1, format!("{a}->{b}").as_bytes())
                    .unwrap();
                assert!(ack.seq >= 1);
                assert_eq!(next_body(&mut clients[b]), format!("{a}->{b}").into_bytes());
            }
        }
    }
    // A group created on node 3's session, every user a member, one message reaches all.
    let profile = GroupProfile {
        name: "across".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    };
    let group = clients[2].group_create(profile).unwrap();
    for c in clients.iter_mut().enumerate().filter(|(i, _)| *i != 2).map(|(_, c)| c) {
        c.group_action(group, tim::protocol::group_action::JOIN, 0, 0, "").unwrap();
    }
    let ack = clients[0].group_send_wait(group, 9_999, b"to all").unwrap();
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        loop {
            let d = c.next_delivery().unwrap();
            if d.stamp.seq == ack.seq {
                assert_eq!(d.body, b"to all", "member {i}");
                break;
            }
        }
    }
    // user0 logs in again (same device type) on another node: its first session is kicked.
    let mut again = nodes[2].login(&users[0].0, 3);
    loop {
        match clients[0].recv() {
            Ok(Event::Kick(k)) => {
                assert_eq!(k.reason, ErrorCode::Replaced as u16);
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("no kick: {e}"),
        }
    }
    again.send_wait(users[1].1, 77_777, b"from the new session").unwrap();
    loop {
        let d = clients[1].next_delivery().unwrap();
        if d.body == b"from the new session" {
            break;
        }
    }
}

/// kill -9 of a node: the others see it gone within the failure detection time, its
/// partitions move, conversations it owned go on with their sequences from the store, and
/// its users' sessions elsewhere are reached through their new owners.
#[test]
fn node_loss_moves_partitions() {
    let store = pg::store_body("postgres");
    let mut nodes = three_nodes(&store, "");
    // Users and sessions only on nodes 1 and 2; many of their owners are on node 3.
    let users: Vec<(String, u64)> = (0..12)
        .map(|i| {
            let name = format!("u{i}");
            (name.clone(), register(&nodes[i % 2], &name))
        })
        .collect();
    let mut clients: Vec<Client> =
        users.iter().enumerate().map(|(i, (n, _))| nodes[i % 2].login(n, 3)).collect();
    let mut last_seq = std::collections::HashMap::new();
    for a in 0..users.len() {
        let b = (a + 1) % users.len();
        for k in 0..3u64 {
            let ack = clients[a].send_wait(users[b].1, a as u64 * 10 + k + 1, b"before").unwrap();
            last_seq.insert((a, b), ack.seq);
            next_body(&mut clients[b]);
        }
    }
    let killed = Instant::now();
    nodes[2].kill();
    let t1 = nodes[0].wait_members(&[1, 2], Duration::from_secs(5));
    let t2 = nodes[1].wait_members(&[1, 2], Duration::from_secs(5));
    eprintln!("node 3 killed: node 1 converged after {t1:?}, node 2 after {:?}", killed.elapsed().max(t2));
    assert!(killed.elapsed() < Duration::from_secs(5), "routing converged in {:?}", killed.elapsed());
    // Every conversation goes on: a new message gets the next sequence (no number given
    // twice, none skipped by a stale counter), and reaches its recipient live.
    for a in 0..users.len() {
        let b = (a + 1) % users.len();
        let mut tries = 0;
        let ack = loop {
            match clients[a].send_wait(users[b].1, 1_000 + a as u64, b"after") {
                Ok(ack) => break ack,
                Err(e) if e.code() == Some(ErrorCode::NodeUnavailable) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("send {a}->{b} after the loss: {e}"),
            }
        };
        assert_eq!(ack.seq, last_seq[&(a, b)] + 1, "conversation {a}->{b}");
        loop {
            let d = clients[b].next_delivery().unwrap_or_else(|e| {
                let t3 = tim::placement::Table::new(0, &[(1, 2), (2, 2), (3, 2)]);
                let t2 = tim::placement::Table::new(0, &[(1, 2), (2, 2)]);
                let p = |t: &tim::placement::Table, u: u64| {
                    t.owner(tim_shards::partition_of(tim_shards::mix64(u)))
                };
                let k = tim::placement::direct_key(users[a].1, users[b].1);
                let c = |t: &tim::placement::Table| {
                    t.owner(tim_shards::partition_of(tim::placement::conv_hash(k)))
                };
                panic!(
                    "{a}->{b}: {e}; b's owner {:?} -> {:?}, a's {:?} -> {:?}, conv {:?} -> {:?}",
                    p(&t3, users[b].1),
                    p(&t2, users[b].1),
                    p(&t3, users[a].1),
                    p(&t2, users[a].1),
                    c(&t3),
                    c(&t2)
                )
            });
            if d.body == b"after" {
                break;
            }
        }
    }
}

/// SIGTERM: the node leaves at once (the others do not wait for failure detection); started
/// again with the same id, it rejoins and owns partitions again.
#[test]
fn leave_and_rejoin() {
    let store = pg::store_body("postgres");
    let mut nodes = three_nodes(&store, "");
    let a = register(&nodes[0], "a");
    let b = register(&nodes[0], "b");
    let left = Instant::now();
    assert!(nodes[1].terminate().success(), "a clean exit after SIGTERM");
    nodes[0].wait_members(&[1, 3], Duration::from_secs(3));
    nodes[2].wait_members(&[1, 3], Duration::from_secs(3));
    eprintln!("node 2 left: the others converged within {:?}", left.elapsed());
    let mut ca = nodes[0].login("a", 3);
    let mut cb = nodes[2].login("b", 3);
    ca.send_wait(b, 1, b"while 2 is away").unwrap();
    assert_eq!(next_body(&mut cb), b"while 2 is away");
    // Node 2 comes back (a new process, the same id): all three see it.
    let n2 = Node::start(2, &store, &[nodes[0].cluster.unwrap()], "");
    nodes[1] = n2;
    for n in &nodes {
        n.wait_members(&[1, 2, 3], Duration::from_secs(10));
    }
    let mut c2 = nodes[1].login("a", 4);
    c2.send_wait(b, 2, b"back").unwrap();
    assert_eq!(next_body(&mut cb), b"back");
    let _ = a;
}

/// A node with another secret cannot join (nor ask for status); the embedded store refuses to
/// start clustered; a node id out of range is refused.
#[test]
fn refusals() {
    let store = pg::store_body("postgres");
    let n1 = Node::start(1, &store, &[], "");
    assert!(tim::cluster::node::ask_status(n1.cluster.unwrap(), "not the secret at all").is_err());
    // A node with a wrong secret: its process runs, but the cluster never counts it.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 1\npin_cores = false\n[security]\nargon2_m_kib = 64\n\
             argon2_t = 1\nname_key = \"{NAME_KEY}\"\n[store]\n{store}\n[gateway]\nws_listen = \"\"\n[admin]\nlisten = \"\"\n[cluster]\nnode_id = 9\n\
             listen = \"127.0.0.1:0\"\nsecret = \"a different secret, long enough\"\njoin = [\"{}\"]\njoin_wait_ms = 500\n",
            n1.cluster.unwrap()
        ),
    )
    .unwrap();
    let mut bad = Command::new(env!("CARGO_BIN_EXE_tim"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(n1.status().alive_with_partitions(), [1]);
    let _ = bad.kill();
    let _ = bad.wait();
    // Refused configurations: a clear error and a non-zero exit.
    for (store, cluster, why) in [
        ("backend = \"embedded\"", "node_id = 1\nlisten = \"127.0.0.1:0\"", "embedded store is single-node"),
        ("backend = \"memory\"", "node_id = 64\nlisten = \"127.0.0.1:0\"", "node_id must be within 1..=63"),
        ("backend = \"memory\"", "node_id = 0\nlisten = \"127.0.0.1:0\"", "node_id must be within 1..=63"),
    ] {
        let cfg = dir.path().join("refused.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nshards = 1\n[gateway]\nws_listen = \"\"\n[admin]\nlisten = \"\"\n[store]\ndata_dir = \"{}\"\n{store}\n\
                 [cluster]\n{cluster}\nsecret = \"{SECRET}\"\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let out =
            Command::new(env!("CARGO_BIN_EXE_tim")).args(["serve", "--config"]).arg(&cfg).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{why}: {err}");
    }
}

/// A node without a listen address (behind NAT: it can only dial out) joins through the links
/// it opens, which carry traffic both ways: users on it and on the others talk.
#[test]
fn dial_only_node_joins() {
    let store = pg::store_body("postgres");
    let n1 = Node::start(1, &store, &[], "");
    let n2 = Node::start(2, &store, &[n1.cluster.unwrap()], "");
    let n4 = Node::start_on(4, &store, &[n1.cluster.unwrap()], "", None);
    assert!(n4.cluster.is_none());
    n1.wait_members(&[1, 2, 4], Duration::from_secs(10));
    n2.wait_members(&[1, 2, 4], Duration::from_secs(10));
    let a = register(&n4, "behind-nat");
    let b = register(&n2, "outside");
    let mut ca = n4.login("behind-nat", 3);
    let mut cb = n2.login("outside", 3);
    for i in 0..20u64 {
        send_retrying(&mut ca, b, 1 + i, format!("out {i}").as_bytes());
        assert_eq!(next_body(&mut cb), format!("out {i}").into_bytes());
        send_retrying(&mut cb, a, 100 + i, format!("in {i}").as_bytes());
        assert_eq!(next_body(&mut ca), format!("in {i}").into_bytes());
    }
}

/// A node joins while messages flow: partitions move to it (old owners drop what moved once
/// idle, the new owner loads from the store), no number of a conversation is skipped or given
/// twice, and every acknowledged message reaches its recipient: live, or in the catch-up after
/// the `Resync` a session gets when its user's owner moved (PROTOCOL 6.14).
#[test]
fn join_under_load() {
    let store = pg::store_body("postgres");
    let n1 = Node::start(1, &store, &[], "");
    let n2 = Node::start(2, &store, &[n1.cluster.unwrap()], "");
    for n in [&n1, &n2] {
        n.wait_members(&[1, 2], Duration::from_secs(10));
    }
    let nodes = [&n1, &n2];
    let users: Vec<(String, u64)> = (0..10)
        .map(|i| {
            let name = format!("j{i}");
            (name.clone(), register(nodes[i % 2], &name))
        })
        .collect();
    let mut clients: Vec<Client> =
        users.iter().enumerate().map(|(i, (n, _))| nodes[i % 2].login(n, 3)).collect();
    // (sender, receiver) → the seqs acknowledged, in order.
    let mut acked: std::collections::HashMap<(usize, usize), Vec<u64>> = Default::default();
    // The third node starts on this thread (a test server dies with the thread that started
    // it) while another thread sends.
    let done = std::sync::atomic::AtomicBool::new(false);
    let joined = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let started = Instant::now();
            let mut round = 0u64;
            // Keep sending until the third node has been in the table for a while.
            while round < 80
                || (!done.load(std::sync::atomic::Ordering::Acquire)
                    && started.elapsed() < Duration::from_secs(30))
            {
                round += 1;
                for (a, client) in clients.iter_mut().enumerate() {
                    let b = (a + 1) % users.len();
                    let client_msg_id = round * 100 + a as u64;
                    let mut tries = 0;
                    let ack = loop {
                        match client.send_wait(users[b].1, client_msg_id, format!("{round}").as_bytes()) {
                            Ok(ack) => break ack,
                            Err(e)
                                if matches!(
                                    e.code(),
                                    Some(ErrorCode::NodeUnavailable | ErrorCode::Timeout | ErrorCode::Busy)
                                ) && tries < 100 =>
                            {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            Err(e) => panic!("round {round}, {a}->{b}: {e}"),
                        }
                    };
                    acked.entry((a, b)).or_default().push(ack.seq);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let n3 = Node::start(3, &store, &[n1.cluster.unwrap()], "");
        n3.wait_members(&[1, 2, 3], Duration::from_secs(10));
        // A while longer under load with the new table.
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, std::sync::atomic::Ordering::Release);
        sender.join().unwrap();
        n3
    });
    for n in [&n1, &n2] {
        n.wait_members(&[1, 2, 3], Duration::from_secs(10));
    }
    assert!(joined.status().alive_with_partitions().len() == 3);
    for ((a, b), seqs) in &acked {
        // Acks rise by one per conversation: no number skipped, none given twice.
        let first = seqs[0];
        assert_eq!(*seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>(), "acks of {a}->{b}");
        // The receiver got each (repeats after a Resync are dropped by seq, as clients do).
        let mut got = std::collections::BTreeSet::new();
        clients[*b].set_timeout(Some(Duration::from_secs(10))).unwrap();
        while got.len() < seqs.len() {
            match clients[*b].recv() {
                Ok(tim::client::Event::Deliver(d)) if d.stamp.from == users[*a].1 => {
                    got.insert(d.stamp.seq);
                }
                Ok(
                    tim::client::Event::Deliver(_)
                    | tim::client::Event::SendAck(_)
                    | tim::client::Event::CatchUpEnd(_)
                    | tim::client::Event::Resync,
                ) => {}
                Ok(other) => panic!("{a}->{b}: unexpected {other:?}"),
                Err(e) => {
                    let missing: Vec<u64> = seqs.iter().filter(|s| !got.contains(s)).copied().collect();
                    panic!("{a}->{b}: {e}; missing seqs {missing:?} of {}", seqs.len())
                }
            }
        }
        assert_eq!(got.into_iter().collect::<Vec<_>>(), *seqs, "deliveries of {a}->{b}");
    }
}

/// When a node joins, the one-shot tokens of users whose owner moved to it move with them: a
/// token issued before the join logs in after it.
#[test]
fn tokens_move_with_their_users() {
    let store = pg::store_body("postgres");
    let n1 = Node::start(1, &store, &[], "");
    let n2 = Node::start(2, &store, &[n1.cluster.unwrap()], "");
    for n in [&n1, &n2] {
        n.wait_members(&[1, 2], Duration::from_secs(10));
    }
    let tokens: Vec<(u64, String)> = (0..24)
        .map(|i| {
            let name = format!("t{i}");
            let id = register(&n1, &name);
            let mut c = n1.login(&name, 3);
            (id, c.issue_token(600).unwrap().token)
        })
        .collect();
    let n3 = Node::start(3, &store, &[n1.cluster.unwrap()], "");
    for n in [&n1, &n2, &n3] {
        n.wait_members(&[1, 2, 3], Duration::from_secs(10));
    }
    // Let the handed tokens arrive (they travel with the table change).
    std::thread::sleep(Duration::from_millis(500));
    for (i, (id, token)) in tokens.iter().enumerate() {
        let node = [&n1, &n2, &n3][i % 3];
        let mut c = node.client();
        let ok = c.login_token(token, 4, "web").unwrap_or_else(|e| panic!("user {id}'s token: {e}"));
        assert_eq!(ok.user_id, *id);
    }
}

/// The memory store clustered (no-data mode): every node holds a replica of the accounts and
/// groups. Accounts registered on one node log in on the others (the key of names comes from the
/// cluster secret), ids do not collide, a group made on one node is used from another, a node
/// that joins later gets what was written before (a snapshot), and a conversation's sequence
/// numbers keep rising when its owner dies and another takes it over.
#[test]
fn memory_store_cluster() {
    let store = "backend = \"memory\"";
    let mut nodes = three_nodes(store, "");
    let alice = register(&nodes[0], "alice");
    let bob = register(&nodes[1], "bob");
    // Twenty peers, registered over all three nodes: some of alice's conversations with them
    // are owned by node 3.
    let peers: Vec<u64> = (0..20).map(|i| register(&nodes[i % 3], &format!("peer{i}"))).collect();
    let mut ids = peers.clone();
    ids.extend([alice, bob]);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 22, "ids are unique over the nodes");
    // A name taken on one node is taken on the others (replicated while the peers registered).
    match nodes[2].client().register("alice", PASSWORD) {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NameTaken), "{e}"),
        Ok(_) => panic!("alice registered twice"),
    }
    // Alice logs in on node 1, bob on node 3 (registered on node 2).
    let mut a = nodes[0].login("alice", 3);
    let mut b = nodes[2].login("bob", 3);
    let ack = send_retrying(&mut a, bob, 1, b"hello bob");
    assert_eq!(next_body(&mut b), b"hello bob");
    assert!(ack.seq >= 1);
    // A group made on node 3's session; alice (node 1) joins and writes to it.
    let profile = GroupProfile {
        name: "replicated".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    };
    let group = b.group_create(profile).unwrap();
    a.group_action(group, tim::protocol::group_action::JOIN, 0, 0, "").unwrap();
    let gack = a.group_send_wait(group, 2, b"to the group").unwrap();
    loop {
        let d = b.next_delivery().unwrap();
        if d.stamp.seq == gack.seq {
            assert_eq!(d.body, b"to the group");
            break;
        }
    }
    // A large message (PROTOCOL 5.22) crosses nodes whole, and reaches bob in parts.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    let lack = a.send_large_wait(tim::protocol::conv::DIRECT, bob, 3, &big).unwrap();
    loop {
        let d = b.next_delivery().unwrap();
        if d.stamp.seq == lack.seq {
            assert!(d.body == big, "the large body arrives intact across nodes");
            break;
        }
    }
    // The social layer across nodes: bob (node 3) asks alice (node 1) for friendship; she is
    // told, accepts, and they learn each other's presence; a block stops bob's messages (the
    // pair's owner may be any node) and is replicated: read back from another node's store.
    use tim::protocol::{presence_state as ps, roster_action as act, roster_list};
    b.roster_action(act::REQUEST, alice, "hi from node 3").unwrap();
    loop {
        match a.recv().unwrap() {
            tim::client::Event::RosterNotice(n) => {
                assert_eq!((n.from, n.note.as_str()), (bob, "hi from node 3"));
                break;
            }
            _ => continue,
        }
    }
    assert!(a.roster_action(act::ACCEPT, bob, "").unwrap().friends);
    a.presence_set(ps::BUSY, "across nodes", b"").unwrap();
    loop {
        match b.recv().unwrap() {
            tim::client::Event::PresenceNotice(p) if p.user == alice && p.state == ps::BUSY => break,
            _ => continue,
        }
    }
    assert_eq!(b.presence_get(&[alice]).unwrap()[0].text, "across nodes");
    a.roster_action(act::BLOCK, bob, "").unwrap();
    match b.send_wait(alice, 50, b"?") {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::Blocked), "{e}"),
        Ok(a) => panic!("a blocked user's message was taken: {a:?}"),
    }
    let mut a2 = nodes[1].login("alice", 1);
    let blocked = a2.roster_get(roster_list::BLOCKED, 0, 0).unwrap();
    assert_eq!(blocked.entries.iter().map(|e| e.user).collect::<Vec<_>>(), [bob]);
    a.roster_action(act::UNBLOCK, bob, "").unwrap();
    drop(a2);
    // Alice writes to every peer; the last seq of each conversation.
    let mut last = std::collections::HashMap::new();
    for (i, &p) in peers.iter().enumerate() {
        let ack = send_retrying(&mut a, p, 100 + i as u64, b"before");
        last.insert(p, ack.seq);
    }
    // Node 3 dies: its conversations move to nodes 1 and 2, which keep no sequence of them.
    nodes[2].kill();
    drop(b);
    for n in &nodes[..2] {
        n.wait_members(&[1, 2], Duration::from_secs(10));
    }
    for (i, &p) in peers.iter().enumerate() {
        let ack = send_retrying(&mut a, p, 200 + i as u64, b"after");
        assert!(ack.seq > last[&p], "peer {i}: seq {} after {} (it went back)", ack.seq, last[&p]);
    }
    // A fourth node joins through node 2: it has every account and the group.
    let n4 = Node::start(4, store, &[nodes[1].cluster.unwrap()], "");
    for n in [&nodes[0], &nodes[1], &n4] {
        n.wait_members(&[1, 2, 4], Duration::from_secs(10));
    }
    let mut b4 = n4.login("bob", 3);
    let info = b4.group_get(group).unwrap();
    assert_eq!(info.members, 2);
    let mut p4 = n4.login("peer7", 3);
    send_retrying(&mut p4, alice, 1, b"from node 4");
    loop {
        if next_body(&mut a) == b"from node 4" {
            break;
        }
    }
    assert!(nodes[0].client().login("peer7", "wrong password", 3, "dev").is_err());
}

/// A send whose conversation owner is on a node this node cannot reach now is answered
/// `NodeUnavailable` (53) at once, and the session goes on. Node 2 is stopped (SIGSTOP): its
/// link stays up and it stays a member (`failure_detect_ms` is long), so node 1 goes on writing
/// to it; once the kernel's socket buffers are full, the link's queue grows, and past
/// `link_queue_bytes_max` the gateway answers every further request for node 2 at once
/// (`bounce` in src/cluster/node.rs). Sends to a remote owner are not held back by the node's
/// backpressure (only the sends an owner of the node receives are), so they reach that limit.
/// When node 2 runs again, the sends that went out are acknowledged with one number each, a
/// refused one resent with its id is acknowledged, a new one too, and the recipient gets every
/// acknowledged message, once, in order.
#[test]
fn node_unavailable_over_a_full_link() {
    const SENDERS: usize = 3;
    const SENDS: u64 = 256; // limits.inflight_per_session_max: the server reads them all
    let store = pg::store_body("postgres");
    // A refused or unanswered send fails the test in 10 s rather than 30.
    let extra = "failure_detect_ms = 20000\nlink_queue_bytes_max = 1048576\n\n\
                 [limits]\nanswer_timeout_ms = 10000\n";
    let n1 = Node::start(1, &store, &[], extra);
    let n2 = Node::start(2, &store, &[n1.cluster.unwrap()], extra);
    for n in [&n1, &n2] {
        n.wait_members(&[1, 2], Duration::from_secs(10));
    }
    // Every owner on node 2: the conversations (so the sends cross the link) and the users (so
    // that what node 2 sends back is only the acks: the fan-outs of these 32 KB messages stay
    // on node 2, and no burst of them goes over node 2's own link limit on the way back).
    let table = tim::placement::Table::new(0, &[(1, 2), (2, 2)]);
    let on_2 = |hash: u64| table.owner(tim_shards::partition_of(hash)).node == 2;
    let user_on_2 = |id: u64| on_2(tim_shards::mix64(id));
    let conv_on_2 = |a: u64, b: u64| on_2(tim::placement::conv_hash(tim::placement::direct_key(a, b)));
    let (bob_name, bob) = (0..64)
        .map(|i| (format!("bob{i}"), register(&n1, &format!("bob{i}"))))
        .find(|&(_, id)| user_on_2(id))
        .expect("one of 64 users owned on node 2");
    let senders: Vec<(String, u64)> = (0..256)
        .map(|i| (format!("a{i}"), register(&n1, &format!("a{i}"))))
        .filter(|&(_, id)| user_on_2(id) && conv_on_2(id, bob))
        .take(SENDERS)
        .collect();
    assert_eq!(senders.len(), SENDERS);
    // One session each, on node 1.
    let mut clients: Vec<Client> = senders.iter().map(|(name, _)| n1.login(name, 3)).collect();
    for c in &mut clients {
        assert_eq!(send_retrying(c, bob, 1, b"before the pause").seq, 1);
    }

    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(n2.child.id() as i32, libc::SIGSTOP) };
    let paused = Instant::now();
    let body = vec![b'x'; 32_000];
    let refused = std::sync::atomic::AtomicUsize::new(0);
    // Per sender: its (client message id, seq) acknowledged, its client message ids refused.
    type Answers = (Vec<(u64, u64)>, Vec<u64>);
    let answers: Vec<Answers> = std::thread::scope(|scope| {
        let threads: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                let (body, refused) = (&body, &refused);
                scope.spawn(move || {
                    let ids: Vec<u64> = (0..SENDS).map(|k| 1_000 * (i as u64 + 1) + k).collect();
                    for &id in &ids {
                        c.send(bob, id, body).unwrap();
                    }
                    c.set_timeout(Some(Duration::from_secs(20))).unwrap();
                    let (mut acked, mut no) = (Vec::new(), Vec::new());
                    while acked.len() + no.len() < ids.len() {
                        match c.recv().unwrap_or_else(|e| panic!("sender {i}: {e}")) {
                            Event::SendAck(a) => acked.push((a.client_msg_id, a.seq)),
                            Event::Error(e) if e.request_kind == tim::protocol::kind::SEND => {
                                assert_eq!(
                                    e.code,
                                    ErrorCode::NodeUnavailable as u16,
                                    "sender {i}, send {}: {}",
                                    e.client_msg_id,
                                    e.message
                                );
                                no.push(e.client_msg_id);
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Event::CatchUpEnd(_) => {} // the login's (empty) catch-up
                            other => panic!("sender {i}: unexpected {other:?}"),
                        }
                    }
                    (acked, no)
                })
            })
            .collect();
        // Node 2 stays stopped until refusals have come (and a moment more, for every send
        // beyond the limit to be answered), or 10 s at most.
        while refused.load(std::sync::atomic::Ordering::Relaxed) == 0
            && paused.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let first_refusal = paused.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: as above.
        unsafe { libc::kill(n2.child.id() as i32, libc::SIGCONT) };
        eprintln!(
            "first NodeUnavailable {first_refusal:?} after the stop; {} refused when node 2 ran again",
            refused.load(std::sync::atomic::Ordering::Relaxed)
        );
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let acked: usize = answers.iter().map(|(a, _)| a.len()).sum();
    let refused: Vec<u64> = answers.iter().flat_map(|(_, n)| n.iter().copied()).collect();
    eprintln!("{acked} sends acknowledged, {} refused with NodeUnavailable", refused.len());
    assert!(!refused.is_empty(), "no send was refused with NodeUnavailable");
    assert!(acked > 0, "sends written before the link filled are acknowledged");
    // Per conversation, what bob should get: (seq, client message id) in order.
    let mut want: Vec<Vec<(u64, u64)>> = answers
        .iter()
        .map(|(acked, _)| {
            let mut w: Vec<(u64, u64)> = acked.iter().map(|&(id, seq)| (seq, id)).collect();
            w.sort_unstable();
            // One number per acknowledged send: 2, 3, … (1 went before the pause).
            let seqs: Vec<u64> = w.iter().map(|&(seq, _)| seq).collect();
            assert_eq!(seqs, (2..2 + w.len() as u64).collect::<Vec<_>>());
            w.insert(0, (1, 1));
            w
        })
        .collect();
    // The sessions go on: a refused send resent with its id, and a new one, are acknowledged
    // with the next numbers of their conversation.
    for (i, c) in clients.iter_mut().enumerate() {
        let next = want[i].len() as u64 + 1;
        if let Some(&id) = answers[i].1.first() {
            let again = send_retrying(c, bob, id, &body);
            assert!(!again.duplicate, "a refused send was not stored: {again:?}");
            assert_eq!(again.seq, next, "sender {i}'s resend of {id}");
            want[i].push((next, id));
        }
        let new = send_retrying(c, bob, 99_999, b"after");
        assert_eq!(new.seq, want[i].len() as u64 + 1, "sender {i}");
        want[i].push((new.seq, 99_999));
    }
    // The recipient (on node 1) gets every acknowledged message, once, in order.
    let mut b = n1.login(&bob_name, 3);
    b.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let (got, end) = b.catch_up().unwrap();
    assert_eq!(end.unavailable, 0);
    for (i, (_, id)) in senders.iter().enumerate() {
        let got: Vec<(u64, u64)> =
            got.iter().filter(|d| d.stamp.from == *id).map(|d| (d.stamp.seq, d.client_msg_id)).collect();
        assert_eq!(got, want[i], "bob's catch-up of sender {i}'s messages");
    }
    assert_eq!(got.len(), want.iter().map(Vec::len).sum::<usize>());
}
