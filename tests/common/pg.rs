//! Throwaway PostgreSQL 15 servers for integration tests.
//!
//! Each [`PgServer`] is a real `postgres` postmaster with its own data directory in a fresh
//! temporary directory (`$TMPDIR/tim-pg-<test pid>-XXXXXX`), listening on 127.0.0.1 on a
//! dynamically chosen port, with its unix socket in that directory and `trust` authentication.
//! Tests run as root and PostgreSQL refuses to, so `initdb` and `postgres` run as the `postgres`
//! system user.
//!
//! [`shared`] gives two servers started once per test process, for tests that only need a
//! database: take one with [`fresh_db`], which creates a uniquely named database and returns
//! its URL. Tests that stop, restart or pause a server must start a private one with
//! [`PgServer::start`].
//!
//! Cleanup — no server outlives the test process:
//! - a private server is stopped (immediate mode) and its directory removed on `Drop`;
//! - the shared servers, which live in a static and are never dropped, are stopped by a
//!   `libc::atexit` handler (normal exit, and also when tests fail: libtest then calls
//!   `process::exit`);
//! - every postmaster is spawned with `PR_SET_PDEATHSIG = SIGQUIT` (immediate shutdown), so it
//!   also goes away when the test process is killed (`kill -9`, aborts). Its directory is then
//!   left behind; [`sweep_stale`] (run once per process before the first server starts)
//!   removes directories of test processes that no longer exist, stopping any postmaster still
//!   running in them (one that was paused when its test process died, for instance).
#![allow(dead_code)]

use std::{
    fs,
    io::{self, Read, Seek, SeekFrom},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Mutex, MutexGuard, Once, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

/// Where Debian's PostgreSQL 15 server binaries live.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Prefix of the temporary directories; followed by the test process id and a dash.
const DIR_PREFIX: &str = "tim-pg-";
/// Bounded wait for a server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Bounded wait for a postmaster to exit after a shutdown request, before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on any psql run by [`PgServer::psql`].
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

/// One running (or stopped, between [`PgServer::stop`] and [`PgServer::restart`]) PostgreSQL
/// server.
pub struct PgServer {
    port: u16,
    root: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The postmaster, `None` while stopped.
    child: Option<Child>,
    /// Removed on drop; `None` once the server has been torn down.
    dir: Option<tempfile::TempDir>,
}

impl PgServer {
    /// initdb a new cluster in a fresh temporary directory, start it and wait until it accepts
    /// connections. Panics (with the server log) when it does not within 30 s.
    pub fn start() -> PgServer {
        sweep_stale_once();
        let (uid, gid) = postgres_ids();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("create a temporary directory for PostgreSQL");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the PostgreSQL directory");
        let root = dir.path().to_path_buf();
        let out = Command::new(format!("{PG_BIN}/initdb"))
            .args(["--no-sync", "-A", "trust", "-U", "postgres", "--no-instructions", "-E", "UTF8"])
            .args(["--no-locale", "-D"])
            .arg(root.join("data"))
            .current_dir(&root)
            .stdin(Stdio::null())
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port picked by binding port 0 can be taken by someone else before the postmaster
        // binds it; then start over with another one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let server =
                PgServer { port, root: root.clone(), inner: Mutex::new(Inner { child: None, dir: None }) };
            let log_start = fs::metadata(server.log_path()).map(|m| m.len()).unwrap_or(0);
            match server.spawn_and_wait() {
                Ok(child) => {
                    *server.lock() = Inner { child: Some(child), dir: Some(dir) };
                    return server;
                }
                Err(e) => {
                    let log = server.log_since(log_start);
                    let port_taken =
                        log.contains("could not bind") || log.contains("could not create any TCP/IP sockets");
                    if !(port_taken && attempt < 5) {
                        panic!(
                            "PostgreSQL on port {port} in {}: {e}\n--- server log ---\n{log}",
                            root.display()
                        );
                    }
                }
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq-style URL (accepted by tokio-postgres) for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The temporary directory: `data/` (the cluster), `postgres.log` and the unix socket.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The postmaster's process id, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.lock().child.as_ref().map(Child::id)
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.log_since(0)
    }

    /// `CREATE DATABASE name` (`name`: ASCII letters, digits and `_`).
    pub fn create_database(&self, name: &str) {
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "unsupported database name {name:?}"
        );
        if let Err(e) = self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")) {
            panic!("CREATE DATABASE {name} on port {}: {e}", self.port);
        }
    }

    /// Run `sql` with psql on database `db`: the unaligned, tuples-only output (trimmed), or
    /// psql's error output. Bounded by 60 s.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.psql_timeout(db, sql, PSQL_TIMEOUT)
    }

    /// As [`PgServer::psql`], killing psql after `limit` (then the error says "timed out").
    pub fn psql_timeout(&self, db: &str, sql: &str, limit: Duration) -> Result<String, String> {
        psql(self.port, db, sql, limit)
    }

    /// Fast shutdown (SIGINT: active sessions are disconnected) and wait for the postmaster to
    /// exit. The data directory and port are kept for [`PgServer::restart`]. No-op if stopped.
    pub fn stop(&mut self) {
        self.shutdown(libc::SIGINT);
    }

    /// Start again on the same data directory and port (stopping first if running); waits
    /// until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let log_start = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        match self.spawn_and_wait() {
            Ok(child) => self.lock().child = Some(child),
            Err(e) => panic!(
                "restarting PostgreSQL on port {}: {e}\n--- server log ---\n{}",
                self.port,
                self.log_since(log_start)
            ),
        }
    }

    /// SIGSTOP the postmaster and all its children (backends and auxiliary processes), to
    /// simulate a stalled server: connections are still accepted by the kernel but nothing
    /// answers. Undo with [`PgServer::resume`] (dropping a paused server is fine too).
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            // The postmaster first, so it forks no new children while we stop them.
            signal(pid, libc::SIGSTOP);
            for c in children_of(pid) {
                signal(c, libc::SIGSTOP);
            }
        }
    }

    /// SIGCONT everything [`PgServer::pause`] stopped.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            continue_tree(pid);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    fn log_since(&self, offset: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.seek(SeekFrom::Start(offset));
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    }

    /// Spawn the postmaster (through the keeper thread) and wait until it is ready; on failure
    /// the postmaster is killed and reaped.
    fn spawn_and_wait(&self) -> Result<Child, String> {
        let (uid, gid) = postgres_ids();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open the server log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("dup the server log: {e}"))?;
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.arg("-D").arg(self.root.join("data"));
        for setting in [
            format!("port={}", self.port),
            "listen_addresses=127.0.0.1".to_string(),
            format!("unix_socket_directories={}", self.root.display()),
            "shared_buffers=32MB".to_string(),
            "max_connections=100".to_string(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // The uid/gid change happens in the child before the pre_exec hook (and before
            // exec), so it does not clear the parent-death signal set there; `postgres` is not
            // a set-user-ID binary, so exec keeps it too.
            .uid(uid)
            .gid(gid);
        let parent = std::process::id();
        // SAFETY: the hook only makes async-signal-safe system calls (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                // SIGQUIT = immediate shutdown: the postmaster SIGQUITs its backends and exits
                // without waiting for clients (SIGTERM, a "smart" shutdown, would wait for
                // every session to end, e.g. those of `tim serve` children that outlive a
                // killed test process).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The test process may have died before the prctl.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("the test process is gone"));
                }
                Ok(())
            });
        }
        let mut child = keeper_spawn(cmd).map_err(|e| format!("spawn postgres: {e}"))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(format!("the postmaster exited during startup ({status})")),
                Ok(None) => {}
                Err(e) => return Err(format!("waiting for the postmaster: {e}")),
            }
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                && psql(self.port, "postgres", "select 1", Duration::from_secs(10)).is_ok()
            {
                return Ok(child);
            }
            if started.elapsed() > READY_TIMEOUT {
                kill_tree(&mut child);
                return Err(format!("not accepting connections after {READY_TIMEOUT:?}"));
            }
            thread::sleep(POLL);
        }
    }

    /// Send `sig` to the postmaster (after waking it and its children in case it is paused)
    /// and wait for it to exit; SIGKILL everything after [`STOP_TIMEOUT`].
    fn shutdown(&self, sig: libc::c_int) {
        let mut inner = self.lock();
        let Some(mut child) = inner.child.take() else { return };
        let pid = child.id();
        continue_tree(pid);
        signal(pid, sig);
        if !wait_timeout(&mut child, STOP_TIMEOUT) {
            kill_tree(&mut child);
        }
    }

    /// Immediate shutdown and removal of the directory (Drop and the atexit handler).
    fn teardown(&self) {
        self.shutdown(libc::SIGQUIT);
        let dir = self.lock().dir.take();
        drop(dir);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.teardown();
    }
}

// ---------------------------------------------------------------------------------------------
// Shared servers

static SHARED: OnceLock<Vec<PgServer>> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Two servers, started (in parallel) on first use and shared by all tests of this process.
/// Do not stop, restart or pause them; use [`fresh_db`] for isolation.
pub fn shared() -> &'static [PgServer] {
    SHARED.get_or_init(|| {
        let servers: Vec<PgServer> = thread::scope(|s| {
            let handles: Vec<_> = (0..2).map(|_| s.spawn(PgServer::start)).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        });
        // Statics are never dropped: stop them when the process exits.
        // SAFETY: registering a plain `extern "C"` function.
        let rc = unsafe { libc::atexit(stop_shared) };
        assert_eq!(rc, 0, "atexit");
        servers
    })
}

extern "C" fn stop_shared() {
    // Never unwind out of an `extern "C"` function.
    let _ = std::panic::catch_unwind(|| {
        if let Some(servers) = SHARED.get() {
            for s in servers {
                // A test thread could still hold the lock if the process exits mid-test; leave
                // that server to the parent-death signal then rather than deadlock.
                let Ok(mut inner) = s.inner.try_lock() else { continue };
                let child = inner.child.take();
                let dir = inner.dir.take();
                drop(inner);
                if let Some(mut child) = child {
                    continue_tree(child.id());
                    signal(child.id(), libc::SIGQUIT);
                    if !wait_timeout(&mut child, STOP_TIMEOUT) {
                        kill_tree(&mut child);
                    }
                }
                drop(dir);
            }
        }
    });
}

/// Create a database with a name unique in this test process (and among concurrently running
/// test processes: it contains the process id) on `server` and return its URL.
pub fn fresh_db(server: &PgServer) -> String {
    let name = fresh_db_name();
    server.create_database(&name);
    server.url(&name)
}

/// The name [`fresh_db`] uses next: `t_<process id>_<counter>`.
pub fn fresh_db_name() -> String {
    format!("t_{}_{}", std::process::id(), DB_COUNTER.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// The keeper thread

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawn `cmd` from the keeper thread.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. libtest
/// runs each test on its own thread, which ends with the test, so a postmaster spawned from a
/// test thread would be shut down at the end of the test that started it (a shared server
/// would die with the first test using it). All postmasters are therefore spawned by one
/// dedicated thread that lives as long as the process (it blocks on the channel, whose sender
/// lives in a static); the signal then fires only when the process dies.
fn keeper_spawn(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("pg-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the PostgreSQL keeper thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, tx)).expect("keeper thread alive");
    rx.recv().expect("keeper thread alive")
}

// ---------------------------------------------------------------------------------------------
// Leftovers of killed test processes

/// Remove the directories of test processes that no longer exist (left behind when a test
/// process was killed), first stopping any postmaster still running in them. Directories of
/// live processes are not touched. Runs automatically once per process before the first
/// server starts.
pub fn sweep_stale() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if owner == std::process::id() || process_alive(owner) {
            continue;
        }
        let path = entry.path();
        let data = path.join("data");
        let pm = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        // Only a postmaster that runs in this very data directory (the postmaster chdirs there).
        if let Some(pm) =
            pm.filter(|&pm| fs::read_link(format!("/proc/{pm}/cwd")).is_ok_and(|cwd| cwd == data))
        {
            continue_tree(pm);
            signal(pm, libc::SIGQUIT);
            let started = Instant::now();
            while process_alive(pm) && started.elapsed() < STOP_TIMEOUT {
                thread::sleep(POLL);
            }
            if process_alive(pm) {
                for c in children_of(pm) {
                    signal(c, libc::SIGKILL);
                }
                signal(pm, libc::SIGKILL);
            }
        }
        let _ = fs::remove_dir_all(&path);
    }
}

fn sweep_stale_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_stale);
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn psql(port: u16, db: &str, sql: &str, limit: Duration) -> Result<String, String> {
    let secs = format!("{:.3}", limit.as_secs_f64());
    let out = Command::new("timeout")
        .args(["--kill-after=1", &secs, "psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else if matches!(out.status.code(), Some(124) | Some(137)) || out.status.code().is_none() {
        Err(format!("psql timed out after {limit:?}"))
    } else {
        Err(format!("psql failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        passwd
            .lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() > 3 && f[0] == "postgres").then(|| (f[2].parse().ok(), f[3].parse().ok()))
            })
            .and_then(|(u, g)| Some((u?, g?)))
            .expect("no `postgres` user in /etc/passwd (is the PostgreSQL server package installed?)")
    })
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Parent pid and state of `pid`, from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(u32, char)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let mut rest = s[s.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z')
}

/// The direct children of `pid` (every PostgreSQL backend and auxiliary process is a direct
/// child of the postmaster).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat(p).is_some_and(|(ppid, _)| ppid == pid))
        .collect()
}

fn continue_tree(pid: u32) {
    for c in children_of(pid) {
        signal(c, libc::SIGCONT);
    }
    signal(pid, libc::SIGCONT);
}

/// SIGKILL the postmaster and its children and reap the postmaster.
fn kill_tree(child: &mut Child) {
    let pid = child.id();
    signal(pid, libc::SIGSTOP);
    for c in children_of(pid) {
        signal(c, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Wait for `child` to exit, at most `limit`; whether it did (and was reaped).
fn wait_timeout(child: &mut Child, limit: Duration) -> bool {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if started.elapsed() >= limit => return false,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A `[store]` body for the PostgreSQL store on two databases, each holding half of the
/// partitions.
pub fn two_range_store(url_low: &str, url_high: &str) -> String {
    format!(
        "backend = \"postgres\"\n[store.postgres]\nconnect_timeout_ms = 1000\n\
         [[store.postgres.partition]]\nslots = \"0-2047\"\nurl = \"{url_low}\"\n\
         [[store.postgres.partition]]\nslots = \"2048-4095\"\nurl = \"{url_high}\"\n"
    )
}

/// A `[store]` body for store `name` (memory, embedded, postgres): for postgres, two fresh
/// databases on the two shared throwaway PostgreSQL servers, each holding half of the partitions.
pub fn store_body(name: &str) -> String {
    match name {
        "memory" => "backend = \"memory\"".into(),
        "embedded" => "backend = \"embedded\"\nsynchronous = \"normal\"".into(),
        "postgres" => {
            let servers = shared();
            two_range_store(&fresh_db(&servers[0]), &fresh_db(&servers[1]))
        }
        other => panic!("unknown store {other}"),
    }
}
