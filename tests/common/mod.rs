//! Test harness: start real `tim serve` processes on dynamic ports and talk to them over real
//! sockets with the project's client.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tim::client::Client;

pub mod gateway;
pub mod pg;
pub mod wait;

pub const PASSWORD: &str = "correct horse battery";
/// A fixed name key, so that accounts are found again after a restart on the same data.
pub const NAME_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Drivers every behaviour test runs on.
#[macro_export]
macro_rules! on_both_drivers {
    ($($name:ident),* $(,)?) => {
        mod io_uring { $( #[test] fn $name() { super::$name("io_uring") } )* }
        mod epoll { $( #[test] fn $name() { super::$name("epoll") } )* }
    };
}

/// `tim serve --config cfg`, its stdout piped (the listening lines), killed if the thread that
/// started it ends (so a killed test run leaves no server behind).
pub fn spawn_serve(cfg: &std::path::Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tim"));
    // SAFETY: prctl is async-signal-safe. The server dies with the thread that started it
    // (the test's own thread).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.args(["serve", "--config"])
        .arg(cfg)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tim")
}

/// The addresses a server printed at start.
#[derive(Default)]
struct Listening {
    addr: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
    /// The WebSocket listener (always on in tests, on a free port).
    pub ws_addr: Option<SocketAddr>,
    /// The TLS listeners, when `extra` configured them.
    pub tls_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    /// The admin API (always on in tests, on a free port, unless `extra` configures it).
    pub admin_addr: Option<SocketAddr>,
    dir: Option<tempfile::TempDir>,
    next_name: std::cell::Cell<u32>,
}

impl TestServer {
    /// A 2-shard server on `driver` with the memory store, test-speed argon2 and `extra` TOML
    /// appended (sections in `extra` must not repeat the ones written here: server, security,
    /// store).
    pub fn start(driver: &str, extra: &str) -> TestServer {
        Self::start_with_store(driver, "backend = \"memory\"", extra)
    }

    /// As [`TestServer::start`], with `store` as the body of the `[store]` section (it may end
    /// with `[store.postgres]` sub-tables); a `data_dir` in the server's temporary directory is
    /// added.
    pub fn start_with_store(driver: &str, store: &str, extra: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, driver, store, extra)
    }

    /// Start a server whose data lives in `dir` (to restart on the same data).
    pub fn start_in(dir: tempfile::TempDir, driver: &str, store: &str, extra: &str) -> TestServer {
        let cfg = dir.path().join("tim.toml");
        let data = dir.path().join("data");
        // The WebSocket listener on a free port, unless `extra` sets the gateway up itself.
        let mut gateway =
            if extra.contains("[gateway]") { "" } else { "[gateway]\nws_listen = \"127.0.0.1:0\"\n\n" }
                .to_string();
        // The admin API on a free port, unless `extra` sets it up itself.
        if !extra.contains("[admin]") {
            gateway.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n\n");
        }
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\ndriver = \"{driver}\"\npin_cores = false\n\
             worker_threads = 2\n\n[security]\nargon2_m_kib = 64\nargon2_t = 1\nname_key = \"{NAME_KEY}\"\n\n\
             {gateway}[store]\ndata_dir = \"{}\"\n{store}\n\n{extra}\n",
            data.display()
        );
        std::fs::write(&cfg, text).unwrap();
        let mut child = spawn_serve(&cfg);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut listening = Listening::default();
        let line = loop {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let word = |prefix: &str| -> Option<SocketAddr> {
                line.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok()
            };
            if let Some(a) = word("tim websocket listening on ") {
                listening.ws = Some(a);
            } else if let Some(a) = word("tim tls listening on ") {
                listening.tls = Some(a);
            } else if let Some(a) = word("tim wss listening on ") {
                listening.wss = Some(a);
            } else if let Some(a) = word("tim admin listening on ") {
                listening.admin = Some(a);
            } else if let Some(a) = word("tim listening on ") {
                listening.addr = Some(a);
                break line;
            } else {
                panic!("unexpected line from tim: {line:?}");
            }
        };
        assert!(line.contains(&format!("{driver} driver")), "driver: {line}");
        TestServer {
            child,
            addr: listening.addr.unwrap(),
            ws_addr: listening.ws,
            tls_addr: listening.tls,
            wss_addr: listening.wss,
            admin_addr: listening.admin,
            dir: Some(dir),
            next_name: std::cell::Cell::new(0),
        }
    }

    /// Send `sig` to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// The sum of every sample of metric `name` (all label sets) in the admin API's `/metrics`
    /// (the harness's admin listener is on loopback, without a token).
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let addr = self.admin_addr.expect("an admin listener");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr).unwrap()
    }

    /// A fresh unique account name.
    pub fn name(&self, prefix: &str) -> String {
        let n = self.next_name.get();
        self.next_name.set(n + 1);
        format!("{prefix}-{n}")
    }

    /// Register a new account; returns its name and id.
    pub fn register(&self, prefix: &str) -> (String, u64) {
        let name = self.name(prefix);
        let id = self.client().register(&name, PASSWORD).unwrap();
        (name, id)
    }

    /// A logged-in client of `name` (device type 3, desktop).
    pub fn login(&self, name: &str, device_type: u8) -> (Client, u64) {
        let mut c = self.client();
        let ok = c.login(name, PASSWORD, device_type, "dev").unwrap();
        (c, ok.session_id)
    }

    /// Logged-in clients of `name` whose sessions sit on shard `shard` (reconnects until so).
    pub fn login_on_shard(&self, name: &str, device_type: u8, shard: u64) -> Client {
        for _ in 0..200 {
            let (c, session) = self.login(name, device_type);
            if session >> 48 == shard {
                return c;
            }
            let mut c = c;
            c.logout().unwrap();
        }
        panic!("could not land a session on shard {shard}");
    }

    /// Send SIGTERM and wait for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "tim did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server with SIGKILL (a crash) and keep its data directory.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.take().unwrap()
    }

    /// Stop the server with SIGTERM (exit code 0 expected) and keep its data directory.
    pub fn stop_keep(mut self) -> tempfile::TempDir {
        assert!(self.terminate().success());
        self.dir.take().unwrap()
    }

    /// The server process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Two users who can talk, to show the server still serves others.
    pub fn assert_serves_others(&self) {
        let (a, _) = self.register("alive-a");
        let (b, b_id) = self.register("alive-b");
        let (mut ca, _) = self.login(&a, 3);
        let (mut cb, _) = self.login(&b, 3);
        let ack = ca.send_wait(b_id, 1, b"still here").unwrap();
        assert_eq!(ack.seq, 1);
        let d = cb.next_delivery().unwrap();
        assert_eq!(d.body, b"still here");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
