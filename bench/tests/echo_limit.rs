// Proves echo-limit echoes tim frames byte-for-byte (split, batched, large) and closes on oversized ones, on io_uring and epoll.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tim::protocol::{kind, Send};

/// A running echo-limit process, killed on drop.
struct EchoLimit {
    child: Child,
    addr: SocketAddr,
}

impl EchoLimit {
    fn start(driver: &str) -> EchoLimit {
        let mut child = Command::new(env!("CARGO_BIN_EXE_echo-limit"))
            .args(["--listen", "127.0.0.1:0", "--shards", "2", "--no-pin", "--driver", driver])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start echo-limit");
        let out = child.stdout.take().unwrap();
        // From here on a panic kills the child.
        let mut server = EchoLimit { child, addr: ([0, 0, 0, 0], 0).into() };
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        server.addr = line
            .strip_prefix("echo-limit listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        assert!(line.ends_with(&format!("(2 shards, {driver} driver)\n")), "line: {line:?}");
        server
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for EchoLimit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_frame(id: u64, body_len: usize) -> Vec<u8> {
    let body = (0..body_len).map(|i| (i as u64 * 31 + id) as u8).collect();
    tim::frame::encode(kind::SEND, &Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: id, body })
}

fn expect_echo(s: &mut TcpStream, sent: &[u8]) {
    let mut got = vec![0u8; sent.len()];
    s.read_exact(&mut got).unwrap();
    assert!(got == sent, "echo differs from what was sent ({} bytes)", sent.len());
}

fn echo(driver: &str) {
    let server = EchoLimit::start(driver);
    let mut s = server.connect();

    // One frame, then several in one write.
    let f = send_frame(1, 5);
    s.write_all(&f).unwrap();
    expect_echo(&mut s, &f);
    let batch: Vec<u8> = (2..10).flat_map(|id| send_frame(id, id as usize * 10)).collect();
    s.write_all(&batch).unwrap();
    expect_echo(&mut s, &batch);

    // A frame split across two writes, the cut inside its header.
    let f = send_frame(10, 100);
    s.write_all(&f[..5]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&f[5..]).unwrap();
    expect_echo(&mut s, &f);

    // A ~40 KB frame, split inside its payload.
    let f = send_frame(11, 40_000);
    assert!(f.len() > 40_000);
    s.write_all(&f[..20_000]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&f[20_000..]).unwrap();
    expect_echo(&mut s, &f);

    // Many connections at once, so both shards serve some.
    let mut conns: Vec<TcpStream> = (0..8).map(|_| server.connect()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&send_frame(100 + i as u64, 64)).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        expect_echo(c, &send_frame(100 + i as u64, 64));
    }

    // A frame over the cap (65536 payload bytes): the frame before it comes back, then EOF.
    let ok = send_frame(12, 8);
    let mut big = vec![0u8; 8];
    tim::frame::Header { len: 65537, kind: kind::SEND, flags: 0 }.write(&mut big);
    s.write_all(&[ok.clone(), big].concat()).unwrap();
    expect_echo(&mut s, &ok);
    let mut rest = [0u8; 64];
    match s.read(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the connection closed: {e}"),
        Ok(n) => panic!("expected the connection closed, read {n} bytes"),
    }

    // The server still serves new connections.
    let mut s = server.connect();
    let f = send_frame(13, 64);
    s.write_all(&f).unwrap();
    expect_echo(&mut s, &f);
}

#[test]
fn echo_io_uring() {
    echo("io_uring");
}

#[test]
fn echo_epoll() {
    echo("epoll");
}
