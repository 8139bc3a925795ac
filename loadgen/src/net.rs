//! Sockets: a bounded non-blocking connect (optionally bound to a source address) and, for the
//! WebSocket transports, the upgrade ([`open`]); the write side of a connection ([`Io`]: frames
//! queued into one buffer, written with `send`), and the read side ([`FrameReader`]: readiness,
//! then `recv` into a pooled aligned buffer, frames handed out in place), in the same style as
//! the server's connections.
//!
//! Scenarios deal in v1 frames whatever the transport. Over WebSocket ([`crate::ws`]) the
//! queued frames are wrapped when they are written: ws-binary sends each flush as one binary
//! message (whole frames), ws-json each frame as its JSON text ([`crate::json`]); the reader
//! takes the server's messages apart into the same aligned buffer of v1 frames (a JSON text
//! becomes the frame it stands for), so the scenarios read what a TCP connection would give.

use std::{
    cell::{Cell, RefCell},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use monoio::net::TcpStream;
use rkyv::util::AlignedVec;
use socket2::{Domain, Protocol, Socket, Type};
use tim::{
    client::CLIENT_FRAME_BYTES_MAX,
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
};

use crate::{
    cli::{Config, Transport},
    json,
    worker::{Worker, READ_BUFFER_BYTES},
    ws,
};

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

/// Connect to address `addr_index` of the run (from `source`, when given) and, over a
/// WebSocket transport, upgrade the connection, all within `timeout`. `seed` seeds the
/// connection's WebSocket masks.
pub async fn open(
    cfg: &Config,
    addr_index: usize,
    source: Option<IpAddr>,
    timeout: Duration,
    seed: u64,
) -> io::Result<Io> {
    let deadline = std::time::Instant::now() + timeout;
    let stream = connect(cfg.addrs[addr_index], source, timeout).await?;
    let ws = match cfg.transport {
        Transport::Tcp => None,
        t => {
            let json = t == Transport::WsJson;
            let subprotocol = if json { "tim.json" } else { "tim.v1" };
            let tail = ws::handshake(&stream, &cfg.hosts[addr_index], subprotocol, deadline).await?;
            Some(WsOut {
                json,
                b64_bodies: json && !cfg.text_bodies,
                masks: Cell::new(ws::Masks::new(seed)),
                wire: RefCell::new(Vec::with_capacity(4096)),
                control: RefCell::new(Vec::new()),
                tail: RefCell::new(tail),
                scratch: RefCell::new((Vec::with_capacity(256), AlignedVec::new())),
            })
        }
    };
    Ok(Io {
        stream,
        addr_index,
        out: RefCell::new(Vec::with_capacity(4096)),
        closed: Cell::new(false),
        sending: Cell::new(false),
        ws: ws.map(Box::new),
    })
}

/// How an error of [`open`] is tallied: the kind, or the handshake's own words.
pub fn error_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::Other => e.to_string(),
        k => format!("{k:?}"),
    }
}

/// A connection's socket and its queue of outgoing bytes.
pub struct Io {
    pub stream: TcpStream,
    /// Which of the run's server addresses (`Config::addrs`) it is connected to.
    pub addr_index: usize,
    /// Whole v1 frames queued for the server.
    out: RefCell<Vec<u8>>,
    closed: Cell<bool>,
    /// A flush is under way (the socket may hold part of a WebSocket frame).
    sending: Cell<bool>,
    /// The WebSocket layer (None: TCP).
    ws: Option<Box<WsOut>>,
}

/// The write side of a WebSocket connection.
struct WsOut {
    /// JSON texts (else binary messages).
    json: bool,
    /// JSON: bodies always as `body_b64`.
    b64_bodies: bool,
    masks: Cell<ws::Masks>,
    /// The bytes of the flush in progress (kept for its capacity).
    wire: RefCell<Vec<u8>>,
    /// Control frames (pongs, the close) to send before the next messages.
    control: RefCell<Vec<u8>>,
    /// What came after the handshake response, for the reader.
    tail: RefCell<Vec<u8>>,
    /// A JSON text being written; an aligned copy of a frame's payload.
    scratch: RefCell<(Vec<u8>, AlignedVec<16>)>,
}

/// Most bytes of v1 frames in one ws-binary message (a single larger frame goes alone): well
/// under the server's message limit, 2 × `frame_bytes_max` + 4 KiB.
const WS_BATCH_BYTES_MAX: usize = 64 * 1024;

impl WsOut {
    /// Wrap the whole v1 frames of `frames` into WebSocket messages appended to `wire`.
    fn wrap(&self, frames: &[u8], wire: &mut Vec<u8>) -> io::Result<()> {
        let mut masks = self.masks.get();
        wire.append(&mut self.control.borrow_mut());
        let mut rest = frames;
        while !rest.is_empty() {
            // The queue holds whole frames only. JSON: one text per frame; binary: as many
            // frames per message as fit the batch.
            let mut batch = 0;
            loop {
                let total = frame::frame_bytes(frame::Header::read(&rest[batch..]).len as usize);
                if batch > 0 && batch + total > WS_BATCH_BYTES_MAX {
                    break;
                }
                batch += total;
                if self.json || batch >= rest.len() {
                    break;
                }
            }
            let (msg, next) = rest.split_at(batch.min(rest.len()));
            if self.json {
                let h = frame::Header::read(msg);
                let payload = &msg[HEADER_BYTES..HEADER_BYTES + h.len as usize];
                let mut scratch = self.scratch.borrow_mut();
                let (text, aligned) = &mut *scratch;
                text.clear();
                json::request_text(h.kind, payload, self.b64_bodies, aligned, text)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                ws::push_frame(wire, ws::OP_TEXT, text, masks.next_key());
            } else {
                ws::push_frame(wire, ws::OP_BINARY, msg, masks.next_key());
            }
            rest = next;
        }
        self.masks.set(masks);
        Ok(())
    }
}

impl Io {
    /// The outgoing queue, to append whole frames to.
    pub fn out(&self) -> std::cell::RefMut<'_, Vec<u8>> {
        self.out.borrow_mut()
    }

    pub fn has_output(&self) -> bool {
        !self.out.borrow().is_empty() || self.ws.as_ref().is_some_and(|w| !w.control.borrow().is_empty())
    }

    /// Whether the connection is a WebSocket speaking JSON (`Some(false)`: binary messages).
    pub fn websocket_json(&self) -> Option<bool> {
        self.ws.as_ref().map(|w| w.json)
    }

    /// Queue a WebSocket control frame (sent before the next flush's messages).
    fn queue_control(&self, opcode: u8, payload: &[u8]) {
        if let Some(w) = &self.ws {
            let mut masks = w.masks.get();
            ws::push_frame(&mut w.control.borrow_mut(), opcode, payload, masks.next_key());
            w.masks.set(masks);
        }
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
        self.sending.set(true);
        let r = self.flush_all().await;
        self.sending.set(false);
        r
    }

    async fn flush_all(&self) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        loop {
            let frames = std::mem::take(&mut *self.out.borrow_mut());
            let buf = match &self.ws {
                None => frames,
                Some(w) => {
                    // The frames as WebSocket messages, in `wire`; the frames' buffer goes back
                    // to the queue for its capacity.
                    let mut wire = std::mem::take(&mut *w.wire.borrow_mut());
                    let wrapped = w.wrap(&frames, &mut wire);
                    self.give_back(frames, false);
                    if let Err(e) = wrapped {
                        self.give_back(wire, true);
                        return Err(e);
                    }
                    wire
                }
            };
            if buf.is_empty() {
                self.give_back(buf, true);
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
            self.give_back(buf, true);
        }
    }

    /// Keep a buffer's allocation: as the WebSocket's wire buffer (`wire`), else as the queue
    /// when nothing was queued meanwhile.
    fn give_back(&self, mut buf: Vec<u8>, wire: bool) {
        buf.clear();
        match &self.ws {
            Some(w) if wire => *w.wire.borrow_mut() = buf,
            _ => {
                let mut out = self.out.borrow_mut();
                if out.is_empty() && out.capacity() < buf.capacity() {
                    *out = buf;
                }
            }
        }
    }

    /// Shut the socket down both ways (wakes a reader with end of stream); a WebSocket first
    /// sends a close frame (1000) if the socket takes it at once and no frame is half sent.
    pub fn shutdown(&self) {
        if !self.closed.get() && !self.sending.get() && self.ws.is_some() {
            let mut close = Vec::with_capacity(8);
            let key = self.ws.as_ref().map(|w| w.masks.get().next_key()).unwrap_or_default();
            ws::push_frame(&mut close, ws::OP_CLOSE, &1000u16.to_be_bytes(), key);
            // SAFETY: valid fd and buffer; MSG_DONTWAIT never blocks. Best effort.
            unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    close.as_ptr().cast(),
                    close.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
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
/// Over WebSocket the socket's bytes go to a buffer of their own first ([`WsIn`]), and the
/// messages' frames into the aligned one.
#[derive(Default)]
pub struct FrameReader {
    buf: Option<AlignedBuf>,
    /// Bytes of the frame handed out last, dropped on the next call.
    consumed: usize,
    /// The last recv filled the buffer: read again before waiting for readiness.
    read_again: bool,
    ws: Option<Box<WsIn>>,
}

/// The read side of a WebSocket connection.
struct WsIn {
    /// Received bytes not yet taken apart: at most one incomplete WebSocket frame between reads.
    raw: Vec<u8>,
    /// `raw` holds bytes that came with the handshake, not yet taken apart.
    fresh: bool,
    /// JSON texts (else binary messages).
    json: bool,
    /// A fragmented message being put together: its opcode (0: none) and bytes.
    frag_op: u8,
    frag: Vec<u8>,
    /// The server sent its close frame: the stream ends after the frames before it.
    closed: bool,
    /// The v1 frame a JSON text stands for.
    scratch: Vec<u8>,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl WsIn {
    /// Take every whole WebSocket frame out of `raw`: messages' v1 frames appended to `buf`,
    /// pings answered (queued on `io`), the close noted.
    fn take_apart(&mut self, buf: &mut AlignedBuf, io: &Io, w: &Worker) -> io::Result<()> {
        let mut at = 0;
        while !self.closed {
            let (f, used) = match ws::parse(&self.raw[at..], ws::MESSAGE_BYTES_MAX) {
                ws::Parsed::Frame(f, used) => (f, used),
                ws::Parsed::Partial => break,
                ws::Parsed::Bad(why) => return Err(invalid(format!("websocket: {why}"))),
            };
            at += used;
            match f.opcode {
                ws::OP_PING => io.queue_control(ws::OP_PONG, f.payload),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    self.closed = true;
                    let (code, reason) = ws::close_reason(f.payload);
                    if code != 1000 {
                        w.stats.error(&format!("websocket closed by the server: {code} {reason}"));
                    }
                }
                ws::OP_CONTINUATION => {
                    if self.frag_op == 0 {
                        return Err(invalid("websocket: a continuation outside a message"));
                    }
                    self.frag.extend_from_slice(f.payload);
                    if f.fin {
                        let op = std::mem::take(&mut self.frag_op);
                        message(self.json, &mut self.scratch, op, &self.frag, buf, w)?;
                        self.frag.clear();
                    }
                }
                op => {
                    if self.frag_op != 0 {
                        return Err(invalid("websocket: a new message inside a fragmented one"));
                    }
                    if f.fin {
                        message(self.json, &mut self.scratch, op, f.payload, buf, w)?;
                    } else {
                        self.frag_op = op;
                        self.frag.extend_from_slice(f.payload);
                    }
                }
            }
        }
        self.raw.drain(..at);
        Ok(())
    }
}

/// One whole WebSocket message (`json`: the connection speaks JSON): its v1 frames appended to
/// `buf` (a JSON text's through `scratch`).
fn message(
    json: bool,
    scratch: &mut Vec<u8>,
    op: u8,
    payload: &[u8],
    buf: &mut AlignedBuf,
    w: &Worker,
) -> io::Result<()> {
    let frames = match (op, json) {
        (ws::OP_BINARY, false) => payload,
        (ws::OP_TEXT, true) => {
            scratch.clear();
            match json::server_frame(payload, scratch) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    w.stats.error("json: skipped a server message of a type tim-loadgen does not read");
                    return Ok(());
                }
                Err(e) => return Err(invalid(format!("json: {e}"))),
            }
            &scratch[..]
        }
        (ws::OP_TEXT, false) => return Err(invalid("websocket: a text message on a tim.v1 connection")),
        _ => return Err(invalid("websocket: a binary message on a tim.json connection")),
    };
    if buf.spare().len() < frames.len() {
        buf.compact();
        if buf.spare().len() < frames.len() {
            let mut big =
                AlignedBuf::new(frame::padded((buf.capacity() * 2).max(buf.filled().len() + frames.len())));
            let have = buf.filled().len();
            big.spare()[..have].copy_from_slice(buf.filled());
            big.end = have;
            *buf = big;
        }
    }
    buf.spare()[..frames.len()].copy_from_slice(frames);
    buf.end += frames.len();
    Ok(())
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
            if let Some(json) = io.websocket_json() {
                if !self.read_websocket(io, w, json).await? {
                    return Ok(None);
                }
                continue;
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

    /// Read from a WebSocket connection and take its messages apart into the frame buffer.
    /// False at the end of the stream (end of file, or the server's close frame).
    async fn read_websocket(&mut self, io: &Io, w: &Worker, json: bool) -> io::Result<bool> {
        let st = self.ws.get_or_insert_with(|| {
            let raw = std::mem::take(&mut *io.ws.as_ref().expect("a websocket").tail.borrow_mut());
            Box::new(WsIn {
                fresh: !raw.is_empty(),
                raw,
                json,
                frag_op: 0,
                frag: Vec::new(),
                closed: false,
                scratch: Vec::with_capacity(256),
            })
        });
        if st.closed {
            return Ok(false);
        }
        if !std::mem::take(&mut st.fresh) {
            if !self.read_again {
                io.stream.readable(false).await?;
            }
            if st.raw.capacity() - st.raw.len() < READ_BUFFER_BYTES / 2 {
                st.raw.reserve(READ_BUFFER_BYTES);
            }
            let have = st.raw.len();
            let want = st.raw.capacity() - have;
            // SAFETY: the spare capacity is valid writable memory of `want` bytes; MSG_DONTWAIT
            // never blocks.
            let n = unsafe {
                libc::recv(
                    io.stream.as_raw_fd(),
                    st.raw.as_mut_ptr().add(have).cast(),
                    want,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                self.read_again = false;
                return match err.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(true),
                    _ => Err(err),
                };
            }
            if n == 0 {
                return Ok(false);
            }
            // SAFETY: recv wrote `n` bytes after the `have` already there.
            unsafe { st.raw.set_len(have + n as usize) };
            self.read_again = n as usize == want;
        }
        let mut buf = self.buf.take().unwrap_or_else(|| w.take_buf());
        let r = st.take_apart(&mut buf, io, w);
        let closed = st.closed;
        self.keep_or_return(buf, w);
        if let Err(e) = &r {
            // The reader's caller tallies the error's kind; this says what it was.
            let what: String = e.to_string().chars().take(160).collect();
            w.stats.error(&what);
        }
        r?;
        Ok(!closed || self.buf.is_some())
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
