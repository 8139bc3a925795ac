//! Tests of the PostgreSQL test harness (tests/common/pg.rs) itself.

#[path = "common/pg.rs"]
mod pg;

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::TcpStream,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use pg::{fresh_db, PgServer};

#[test]
fn shared_servers_create_databases_and_answer_queries() {
    // Proves: both shared servers start, accept CREATE DATABASE, and serve queries on the new db.
    let servers = pg::shared();
    assert_eq!(servers.len(), 2);
    assert_ne!(servers[0].port(), servers[1].port());
    for server in servers {
        let url = fresh_db(server);
        let db = url.rsplit('/').next().unwrap();
        assert_eq!(url, format!("postgres://postgres@127.0.0.1:{}/{db}", server.port()));
        server.psql(db, "CREATE TABLE t (x int); INSERT INTO t VALUES (41), (1)").unwrap();
        assert_eq!(server.psql(db, "SELECT sum(x) FROM t").unwrap(), "42");
        assert_eq!(server.psql(db, "SELECT current_database()").unwrap(), db);
        assert_eq!(server.psql(db, "SHOW server_version_num").unwrap()[..2], *"15");
    }
}

#[test]
fn fresh_db_names_never_collide() {
    // Proves: fresh_db gives distinct databases, also when called from many threads at once.
    let server = &pg::shared()[0];
    let urls: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> =
            (0..4).map(|_| s.spawn(|| (0..5).map(|_| fresh_db(server)).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let unique: HashSet<&String> = urls.iter().collect();
    assert_eq!(unique.len(), urls.len(), "{urls:?}");
    for url in &urls {
        let db = url.rsplit('/').next().unwrap();
        assert!(db.starts_with(&format!("t_{}_", std::process::id())), "{db}");
        assert_eq!(server.psql(db, "SELECT 1").unwrap(), "1");
    }
}

#[test]
fn private_server_pause_resume_stop_restart() {
    // Proves: a private server can be paused (queries time out) and resumed, stopped (refused)
    // and restarted on the same port with its data intact.
    let mut server = PgServer::start();
    let port = server.port();
    server.create_database("keep");
    server.psql("keep", "CREATE TABLE t (x text); INSERT INTO t VALUES ('still here')").unwrap();

    server.pause();
    let started = Instant::now();
    let err = server.psql_timeout("keep", "SELECT 1", Duration::from_secs(1)).unwrap_err();
    assert!(err.contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.resume();
    assert_eq!(server.psql("keep", "SELECT x FROM t").unwrap(), "still here");

    let pid = server.pid().unwrap();
    server.stop();
    assert_eq!(server.pid(), None);
    assert!(!is_running(pid));
    let refused = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = server.psql("keep", "SELECT 1").unwrap_err();
    assert!(err.contains("refused"), "{err}");

    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.psql("keep", "SELECT x FROM t").unwrap(), "still here");

    // Dropping removes the directory and the server.
    let dir = server.dir().to_path_buf();
    let pid = server.pid().unwrap();
    drop(server);
    assert!(!dir.exists());
    assert!(!is_running(pid));
}

#[test]
fn dropping_a_paused_server_stops_it() {
    // Proves: Drop also cleans up a server that is paused at the time.
    let server = PgServer::start();
    let pid = server.pid().unwrap();
    let dir = server.dir().to_path_buf();
    server.pause();
    drop(server);
    assert!(!is_running(pid));
    assert!(!dir.exists());
}

const HOLD_ENV: &str = "TIM_PG_HARNESS_HOLD";

/// The child's part of `servers_die_with_a_killed_test_process`: start servers, report them on
/// stdout, and wait to be killed -9.
fn hold_servers_until_killed() {
    let private = PgServer::start();
    let paused = PgServer::start();
    paused.pause();
    let mut line = String::from("SERVERS");
    for s in pg::shared().iter().chain([&private, &paused]) {
        line += &format!(" {}:{}", s.pid().unwrap(), s.dir().display());
    }
    // The child runs with --nocapture, so this reaches the parent's pipe.
    println!("{line}");
    thread::sleep(Duration::from_secs(120));
}

#[test]
fn servers_die_with_a_killed_test_process() {
    // Proves: kill -9 of a test process takes its postmasters and backends down (parent-death
    // signal); sweep_stale then removes the left-behind directories, stopping the paused server.
    // The test runs itself again as the child that holds the servers (told so by HOLD_ENV).
    if std::env::var_os(HOLD_ENV).is_some() {
        return hold_servers_until_killed();
    }
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "servers_die_with_a_killed_test_process", "--nocapture", "--test-threads=1"])
            .env(HOLD_ENV, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut servers = Vec::new();
    for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // libtest's "test servers_die_with_a_killed_test_process ... " precedes it on the line.
        if let Some((_, rest)) = line.split_once("SERVERS ") {
            for s in rest.split(' ') {
                let (pid, dir) = s.split_once(':').unwrap();
                servers.push((pid.parse::<u32>().unwrap(), std::path::PathBuf::from(dir)));
            }
            break;
        }
    }
    assert_eq!(servers.len(), 4, "the helper did not report its servers");
    // The postmasters and their backends, all alive now.
    let mut processes: Vec<u32> = Vec::new();
    for (pid, _) in &servers {
        processes.push(*pid);
        processes.extend(pg::children_of(*pid));
    }
    assert!(servers.iter().all(|&(p, _)| is_running(p)));
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();

    // The three running servers go away by themselves; the paused one cannot act on the signal.
    let (paused_pid, _) = servers[3];
    let paused: Vec<u32> = std::iter::once(paused_pid).chain(pg::children_of(paused_pid)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<u32> =
            processes.iter().copied().filter(|p| !paused.contains(p) && is_running(*p)).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running after kill -9 of the test process: {left:?}");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(is_stopped(paused_pid), "the paused postmaster should still be there, stopped");

    pg::sweep_stale();
    for (_, dir) in &servers {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(processes.iter().all(|&p| !is_running(p)), "sweep_stale left processes running");
}

/// Kills the helper test process also when the test fails early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

/// Exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z')
}

fn is_stopped(pid: u32) -> bool {
    proc_state(pid) == Some('T')
}
