//! `echo-limit`: a minimal frame echo server, the ceiling a relay can reach on this machine.
//!
//! It runs on tim's runtime (`tim-shards`: same ring flags, same per-shard SO_REUSEPORT
//! listeners, same pinning) and does the per-frame I/O work tim does for a relayed message,
//! minus the IM logic: readiness, then `recv` into a pooled aligned buffer (an idle connection
//! holds none), header parse and cap check, one copy of each whole frame into a `Bytes`, and a
//! writer that flushes its queue with one `sendmsg` of up to 64 iovecs. Every frame comes back
//! unchanged; a frame over the cap (or with flags set) closes the connection. No cross-shard
//! traffic: each shard serves the connections it accepted. tim's throughput divided by this
//! one's, under the same load generator, is the share the IM logic costs.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::Future,
    io::{self, Write},
    net::SocketAddr,
    os::fd::AsRawFd,
    rc::Rc,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use monoio::net::{TcpListener, TcpStream};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tim::frame::{self, AlignedBuf, Parsed};
use tim_shards::{listener::bind_reuseport_group, Driver, DriverKind, RuntimeConfig, ShardContext};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Size of a pooled read buffer, and buffers kept per shard (tim's defaults).
const READ_BUFFER_BYTES: usize = 64 * 1024;
const READ_BUFFERS_POOLED_MAX: usize = 64;
/// Queued outbound bytes at which a connection stops reading until its writer catches up.
const OUT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Time a closing connection gets to flush what it has queued (as in tim).
const CLOSE_FLUSH_MS: u64 = 1000;
/// Time a connection may stay unwritable before it is dropped (as in tim).
const WRITABLE_WAIT_MS: u64 = 60_000;
/// Listen backlog (tim's default).
const BACKLOG: i32 = 4096;

#[derive(Parser)]
#[command(name = "echo-limit", about = "Frame echo server on tim's runtime: the relay ceiling")]
struct Cli {
    /// Listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7200")]
    listen: SocketAddr,
    /// Number of shards (default: one per available core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    shards: Option<u64>,
    /// I/O driver.
    #[arg(long, value_enum, default_value = "auto")]
    driver: DriverArg,
    /// Largest frame payload accepted; a larger one closes the connection.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    frame_bytes_max: usize,
    /// Do not pin shard threads to cores (tim's `server.pin_cores = false`).
    #[arg(long)]
    no_pin: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum DriverArg {
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Epoll,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("echo-limit: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> io::Result<()> {
    let shards = cli.shards.map_or_else(tim_shards::runtime::available_cores, |n| n as usize);
    let driver = match cli.driver {
        DriverArg::Auto => Driver::Auto,
        DriverArg::IoUring => Driver::IoUring,
        DriverArg::Epoll => Driver::Epoll,
    };
    // Register before starting so that no signal is missed.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (addr, listeners) = bind_reuseport_group(cli.listen, shards, BACKLOG)?;
    let listeners: Arc<Vec<_>> = Arc::new(listeners.into_iter().map(|l| Mutex::new(Some(l))).collect());
    let frame_max = cli.frame_bytes_max;
    let rt = RuntimeConfig {
        shards,
        driver,
        pin_cores: !cli.no_pin,
        mesh_capacity: 1,
        thread_name: "echo-shard".into(),
        ..RuntimeConfig::default()
    };
    let running = tim_shards::start::<(), _, _>(&rt, move |ctx: ShardContext<()>| {
        let listener = listeners[ctx.id].lock().expect("not poisoned").take().expect("one per shard");
        run_shard(ctx, listener, frame_max)
    })?;
    let first = running.drivers[0];
    let driver = if running.drivers.iter().all(|&d| d == first) { first.name() } else { "mixed" };
    // Scripts read this line to learn the bound address.
    println!("echo-limit listening on {addr} ({shards} shards, {driver} driver)");
    io::stdout().flush()?;
    signals.forever().next();
    std::process::exit(0);
}

async fn run_shard(ctx: ShardContext<()>, listener: std::net::TcpListener, frame_max: usize) {
    if ctx.driver == DriverKind::Epoll {
        let _ = listener.set_nonblocking(true);
    }
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("echo-limit: shard {}: listener: {e}", ctx.id);
            return;
        }
    };
    let pool = Rc::new(Pool::default());
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                monoio::spawn(serve(stream, pool.clone(), frame_max));
            }
            Err(_) => monoio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The shard's read buffers.
#[derive(Default)]
struct Pool(RefCell<Vec<AlignedBuf>>);

impl Pool {
    fn take(&self) -> AlignedBuf {
        self.0.borrow_mut().pop().unwrap_or_else(|| AlignedBuf::new(READ_BUFFER_BYTES))
    }

    fn put(&self, mut buf: AlignedBuf) {
        let mut pool = self.0.borrow_mut();
        if buf.capacity() == READ_BUFFER_BYTES && pool.len() < READ_BUFFERS_POOLED_MAX {
            buf.clear();
            pool.push(buf);
        }
    }

    /// Return an empty buffer to the pool; keep one that holds a partial frame.
    fn keep_or_put(&self, held: &mut Option<AlignedBuf>, mut buf: AlignedBuf) {
        if buf.is_empty() {
            self.put(buf);
        } else {
            buf.compact();
            *held = Some(buf);
        }
    }
}

/// A single-task wakeup flag, as tim's `LocalNotify`.
#[derive(Default)]
struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx: &mut Context<'_>| {
            if self.flag.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// What the reader and the writer of one connection share.
#[derive(Default)]
struct Conn {
    outq: RefCell<VecDeque<Bytes>>,
    out_bytes: Cell<usize>,
    writer: Notify,
    reader: Notify,
    closing: Cell<bool>,
}

impl Conn {
    fn push(&self, frame: Bytes) {
        self.out_bytes.set(self.out_bytes.get() + frame.len());
        self.outq.borrow_mut().push_back(frame);
        self.writer.notify();
    }

    fn close(&self) {
        if !self.closing.replace(true) {
            self.writer.notify();
            self.reader.notify();
        }
    }
}

async fn serve(stream: TcpStream, pool: Rc<Pool>, frame_max: usize) {
    let _ = stream.set_nodelay(true);
    let stream = Rc::new(stream);
    let conn = Rc::new(Conn::default());
    let writer = monoio::spawn(write_loop(stream.clone(), conn.clone()));
    read_loop(&stream, &conn, &pool, frame_max).await;
    conn.close();
    writer.await;
}

async fn read_loop(stream: &TcpStream, conn: &Conn, pool: &Pool, frame_max: usize) {
    let fd = stream.as_raw_fd();
    let mut held: Option<AlignedBuf> = None;
    let mut try_first = false;
    loop {
        // Backpressure: a peer that does not read stops being read.
        while conn.out_bytes.get() >= OUT_BYTES_MAX && !conn.closing.get() {
            conn.reader.wait().await;
        }
        if conn.closing.get() {
            break;
        }
        if !try_first && (stream.readable(false).await.is_err() || conn.closing.get()) {
            break;
        }
        let mut buf = held.take().unwrap_or_else(|| pool.take());
        let spare = buf.spare();
        let want = spare.len();
        // SAFETY: `spare` is valid writable memory of `want` bytes; MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
        if n < 0 {
            let err = io::Error::last_os_error();
            let again = matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
            pool.keep_or_put(&mut held, buf);
            try_first = false;
            if again {
                continue;
            }
            break;
        }
        if n == 0 {
            pool.put(buf);
            break;
        }
        buf.end += n as usize;
        // A full read suggests more is waiting: read again before arming readiness.
        try_first = n as usize == want;
        if !echo_frames(&mut buf, conn, frame_max) {
            pool.put(buf);
            break;
        }
        pool.keep_or_put(&mut held, buf);
    }
    if let Some(b) = held {
        pool.put(b);
    }
}

/// Echo every whole frame at the front of `buf`, each copied once into its own `Bytes`. Grows
/// `buf` when an incomplete frame is larger than it. False: close the connection.
fn echo_frames(buf: &mut AlignedBuf, conn: &Conn, frame_max: usize) -> bool {
    loop {
        match frame::parse(buf.filled(), frame_max) {
            Parsed::Frame(_, total) => {
                conn.push(Bytes::copy_from_slice(&buf.filled()[..total]));
                buf.start += total;
            }
            Parsed::Partial { need } => {
                if need > buf.capacity() {
                    let mut big = AlignedBuf::new(need);
                    let have = buf.filled().len();
                    big.spare()[..have].copy_from_slice(buf.filled());
                    big.end = have;
                    *buf = big;
                }
                return true;
            }
            Parsed::TooLarge(_) | Parsed::BadFlags(_) => return false,
        }
    }
}

/// Write queued frames until the connection closes, then shut the socket down so the reader
/// wakes.
async fn write_loop(stream: Rc<TcpStream>, conn: Rc<Conn>) {
    let fd = stream.as_raw_fd();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(tim::sockio::IOV_MAX);
    'outer: loop {
        while conn.outq.borrow().is_empty() {
            if conn.closing.get() {
                break 'outer;
            }
            conn.writer.wait().await;
        }
        let written = loop {
            let sent = tim::sockio::send_frames(fd, &conn.outq.borrow(), &mut iov);
            match sent {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let wait = if conn.closing.get() {
                        Duration::from_millis(CLOSE_FLUSH_MS)
                    } else {
                        Duration::from_millis(WRITABLE_WAIT_MS)
                    };
                    if !matches!(monoio::time::timeout(wait, stream.writable(false)).await, Ok(Ok(()))) {
                        break 'outer;
                    }
                }
                Err(_) => break 'outer,
            }
        };
        tim::sockio::consume(&mut conn.outq.borrow_mut(), written);
        let before = conn.out_bytes.get();
        conn.out_bytes.set(before - written);
        if before >= OUT_BYTES_MAX && before - written < OUT_BYTES_MAX {
            conn.reader.notify();
        }
    }
    conn.closing.set(true);
    conn.outq.borrow_mut().clear();
    conn.out_bytes.set(0);
    // SAFETY: fd is open (the stream is alive); shutdown wakes the reader with EOF.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    conn.reader.notify();
}
