//! Sockets: a bounded non-blocking connect (optionally bound to a source address), the write
//! side of a connection ([`Io`]: frames queued into one buffer, written with `send`), and the
//! read side ([`FrameReader`]: readiness, then `recv` into a pooled aligned buffer, frames handed
//! out in place), in the same style as the server's connections.

use std::{
    cell::{Cell, RefCell},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use monoio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};
use tim::{
    client::CLIENT_FRAME_BYTES_MAX,
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
};

use crate::worker::Worker;

/// How long a connection may stay unwritable before it is given up.
const WRITE_STALL: Duration = Duration::from_secs(10);

/// Connect to `addr` within `timeout`, from `source` (any port) when given.
pub async fn connect(addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            // Choose the port at connect time, by the whole 4-tuple: many source addresses then
            // each get the full ephemeral port range.
            let one: libc::c_int = 1;
            // SAFETY: valid fd, option value is a c_int of the given size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    match monoio::time::timeout(timeout, stream.writable(false)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd; `err` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(stream)
}

/// A connection's socket and its queue of outgoing bytes.
pub struct Io {
    pub stream: TcpStream,
    /// Which of the run's server addresses (`Config::addrs`) it is connected to.
    pub addr_index: usize,
    out: RefCell<Vec<u8>>,
    closed: Cell<bool>,
}

impl Io {
    pub fn new(stream: TcpStream, addr_index: usize) -> Io {
        Io { stream, addr_index, out: RefCell::new(Vec::with_capacity(4096)), closed: Cell::new(false) }
    }

    /// The outgoing queue, to append whole frames to.
    pub fn out(&self) -> std::cell::RefMut<'_, Vec<u8>> {
        self.out.borrow_mut()
    }

    pub fn has_output(&self) -> bool {
        !self.out.borrow().is_empty()
    }

    /// Append a frame of `k` carrying `value`'s archive.
    pub fn queue<T>(&self, k: u16, value: &T)
    where
        T: rkyv::Archive
            + for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    Vec<u8>,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rkyv::rancor::Error,
                >,
            >,
    {
        frame::encode_into(k, value, &mut self.out.borrow_mut());
    }

    /// Write everything queued (including what is queued while this waits).
    pub async fn flush(&self) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        loop {
            let buf = std::mem::take(&mut *self.out.borrow_mut());
            if buf.is_empty() {
                *self.out.borrow_mut() = buf;
                return Ok(());
            }
            let mut off = 0;
            while off < buf.len() {
                let rest = &buf[off..];
                // SAFETY: valid fd and buffer; MSG_DONTWAIT never blocks.
                let r = unsafe {
                    libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                };
                if r >= 0 {
                    off += r as usize;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => {
                        match monoio::time::timeout(WRITE_STALL, self.stream.writable(false)).await {
                            Ok(r) => r?,
                            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled")),
                        }
                    }
                    _ => return Err(err),
                }
            }
            let mut buf = buf;
            buf.clear();
            let mut out = self.out.borrow_mut();
            if out.is_empty() {
                *out = buf; // keep the allocation
            }
        }
    }

    /// Shut the socket down both ways (wakes a reader with end of stream).
    pub fn shutdown(&self) {
        if !self.closed.replace(true) {
            // SAFETY: the fd is open while `stream` lives.
            unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }
}

/// Reads frames into a pooled aligned buffer; holds the buffer only while a frame is incomplete.
#[derive(Default)]
pub struct FrameReader {
    buf: Option<AlignedBuf>,
    /// Bytes of the frame handed out last, dropped on the next call.
    consumed: usize,
    /// The last recv filled the buffer: read again before waiting for readiness.
    read_again: bool,
}

impl FrameReader {
    /// The next frame: its kind and payload. `Ok(None)` at end of stream.
    pub async fn next(&mut self, io: &Io, w: &Worker) -> io::Result<Option<(u16, &[u8])>> {
        let fd = io.stream.as_raw_fd();
        loop {
            let mut found = None;
            let mut release = false;
            if let Some(buf) = self.buf.as_mut() {
                buf.start += std::mem::take(&mut self.consumed);
                match frame::parse(buf.filled(), CLIENT_FRAME_BYTES_MAX) {
                    Parsed::Frame(h, total) => {
                        self.consumed = total;
                        found = Some((h.kind, h.len as usize));
                    }
                    Parsed::Partial { need } => {
                        if buf.is_empty() {
                            release = true;
                        } else {
                            buf.compact();
                            if need > buf.capacity() {
                                let mut big = AlignedBuf::new(frame::padded(need));
                                let have = buf.filled().len();
                                big.spare()[..have].copy_from_slice(buf.filled());
                                big.end = have;
                                *buf = big;
                            }
                        }
                    }
                    Parsed::TooLarge(h) | Parsed::BadFlags(h) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad frame header {h:?}"),
                        ));
                    }
                }
            }
            if let Some((k, len)) = found {
                let buf = self.buf.as_ref().expect("present");
                return Ok(Some((k, &buf.filled()[HEADER_BYTES..HEADER_BYTES + len])));
            }
            if release {
                w.put_buf(self.buf.take().expect("present"));
            }
            if !self.read_again {
                io.stream.readable(false).await?;
            }
            let mut buf = self.buf.take().unwrap_or_else(|| w.take_buf());
            let spare = buf.spare();
            let want = spare.len();
            // SAFETY: `spare` is valid writable memory of `want` bytes; MSG_DONTWAIT never blocks.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
            if n < 0 {
                let err = io::Error::last_os_error();
                self.read_again = false;
                self.keep_or_return(buf, w);
                match err.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            if n == 0 {
                self.keep_or_return(buf, w);
                return Ok(None);
            }
            buf.end += n as usize;
            self.read_again = n as usize == want;
            self.buf = Some(buf);
        }
    }

    /// Whether another whole frame is already buffered after the one handed out last (false:
    /// the next call will read from the socket).
    pub fn frame_ready(&self) -> bool {
        self.buf.as_ref().is_some_and(|b| {
            let rest = &b.filled()[self.consumed.min(b.filled().len())..];
            matches!(frame::parse(rest, CLIENT_FRAME_BYTES_MAX), Parsed::Frame(..))
        })
    }

    fn keep_or_return(&mut self, buf: AlignedBuf, w: &Worker) {
        if buf.is_empty() {
            w.put_buf(buf);
        } else {
            self.buf = Some(buf);
        }
    }

    /// Give the buffer back to the pool (the connection is done).
    pub fn release(&mut self, w: &Worker) {
        if let Some(b) = self.buf.take() {
            w.put_buf(b);
        }
    }
}
