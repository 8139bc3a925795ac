//! Layered connections: the binary protocol over TLS, and WebSocket (with or without TLS). They
//! feed the same sessions as [`super::tcp`]; what differs is how bytes become frames.
//!
//! - **TLS** (rustls): socket bytes are decrypted into plaintext; the session's frames are
//!   encrypted into TLS records.
//! - **WebSocket** (tungstenite's protocol engine over in-memory buffers, so tim's own socket
//!   code does the I/O): the connection starts with an HTTP/1.1 request ([`super::http`]): an
//!   upgrade on `/ws`, or a file of the web page, answered and closed. After the upgrade, each
//!   binary message carries one or more whole v1 frames; each text message one JSON request
//!   (docs/JSON.md). What the session queues goes out as binary messages, or as JSON texts when
//!   the connection speaks JSON: chosen by the subprotocol (`tim.json`, `tim.v1`) or else by its
//!   first data message.
//!
//! A reader task and a writer task share the connection's layers ([`Io`]) and never hold them
//! across a wait. The writer converts queued frames in batches of at most [`TX_BATCH_BYTES`]
//! into bytes for the socket, so a slow socket keeps frames in the session's queue, where the
//! slow-consumer limit sees them. Closing is lingering, as for TCP; a WebSocket close frame says
//! why ([`close_code`] and docs/JSON.md), and TLS ends with close_notify.
//!
//! Key items: [`serve`], [`Io`].

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    os::fd::AsRawFd,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use monoio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};
use tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig, WebSocketContext},
    Message,
};

use super::{
    close_session, handle_frames,
    http::{self, Head},
    open_session, wait_writable, Conn,
};
use crate::{
    frame::AlignedBuf,
    protocol::ErrorCode,
    session::{error_frame, requests::Requests, Flow, Session},
    shard::Shard,
};

/// Bytes of converted output the writer holds for the socket at most, before it takes more
/// frames from the session's queue.
pub const TX_BATCH_BYTES: usize = 256 * 1024;
/// Bytes one read takes from the socket at most (within the shard's pooled read buffer).
const READ_BYTES: usize = 64 * 1024;
/// Answers to refused JSON requests queued for the writer at most; beyond, the reader waits.
const JSON_REFUSALS_QUEUED_MAX: usize = 64;
/// Capacity of its plaintext buffer a connection keeps between reads.
const PLAIN_KEPT_BYTES: usize = 4096;
/// A WebSocket's read buffer (tungstenite's); grows only for larger messages.
const WS_READ_BUFFER_BYTES: usize = 4096;

/// What runs over the connection once its handshakes are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    /// Protocol v1 frames (over TLS).
    Binary,
    /// A WebSocket (an HTTP request first).
    WebSocket,
}

/// Serve one accepted connection of a TLS or WebSocket listener until it closes, then clean up
/// after it.
pub async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
    tls: Option<Arc<ServerConfig>>,
    app: App,
) {
    let _ = stream.set_nodelay(true);
    let tls = match tls.map(ServerConnection::new).transpose() {
        Ok(t) => t.map(|mut t| {
            // The writer bounds its batches; rustls must not cut them short.
            t.set_buffer_limit(None);
            Box::new(t)
        }),
        Err(e) => {
            log::warn!("tls: {e}");
            return;
        }
    };
    // Indices of metrics::TRANSPORTS.
    let transport = match (tls.is_some(), app) {
        (false, App::Binary) => 0,
        (true, App::Binary) => 1,
        (false, App::WebSocket) => 2,
        (true, App::WebSocket) => 3,
    };
    let session = open_session(&shard, peer, transport);
    let conn = Rc::new(Layered {
        conn: Conn::new(stream),
        io: std::cell::RefCell::new(Io { tls, ws: None, tx: Vec::new(), tx_at: 0 }),
    });
    let handshake = shard.cfg().gateway.handshake_timeout_ms;
    let first = handshake_phase(&shard, &conn, &session, app, Duration::from_millis(handshake)).await;
    if let Some(first) = first {
        let writer = monoio::spawn(write_loop(conn.clone(), session.clone()));
        Reader { shard: &shard, session: &session, conn: &conn }.run(first).await;
        conn.conn.end_input();
        session.close();
        writer.await;
    } else {
        session.close();
        conn.conn.end_input();
        conn.conn.close_lingering().await;
    }
    close_session(&shard, &session);
}

/// The connection's tasks' shared state.
struct Layered {
    conn: Conn,
    io: std::cell::RefCell<Io>,
}

/// The layers between the socket and the session.
pub struct Io {
    tls: Option<Box<ServerConnection>>,
    ws: Option<Box<Ws>>,
    /// Bytes for the socket (TLS records under TLS), unsent from `tx_at` on.
    tx: Vec<u8>,
    tx_at: usize,
}

/// A WebSocket's state.
struct Ws {
    ctx: WebSocketContext,
    mem: MemIo,
    /// The connection speaks JSON (`None`: not known until its first data message).
    json: Option<bool>,
    json_state: crate::json::Correlator,
    /// JSON answers made by the gateway itself (refused JSON requests), sent before the
    /// session's queued frames.
    texts: VecDeque<String>,
    /// The close frame to send when the connection closes.
    close: Option<(CloseCode, &'static str)>,
    /// Bytes arrived since the last whole frame came out: a frame (or a fragmented message)
    /// is incomplete, and the session's incomplete-frame timeout runs.
    incomplete: bool,
}

/// In-memory bytes for tungstenite: `rx` is what arrived, `tx` what it wrote.
#[derive(Default)]
struct MemIo {
    rx: Vec<u8>,
    rx_at: usize,
    tx: Vec<u8>,
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.rx[self.rx_at..];
        if rest.is_empty() {
            self.rx.clear();
            self.rx_at = 0;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.rx_at += n;
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a TLS layer failed (the alert is queued for the peer).
struct TlsFailed;

impl Io {
    /// Queue plaintext for the peer (encrypted under TLS).
    fn queue_plain(&mut self, b: &[u8]) {
        match &mut self.tls {
            // Never short: the send buffer limit is off, and the writer bounds its batches.
            Some(t) => {
                let _ = t.writer().write_all(b);
            }
            None => self.tx.extend_from_slice(b),
        }
    }

    /// Move TLS records (handshake messages, alerts, encrypted data) to `tx`.
    fn seal(&mut self) {
        if let Some(t) = &mut self.tls {
            while t.wants_write() {
                if t.write_tls(&mut self.tx).is_err() {
                    break;
                }
            }
        }
    }

    fn unsent(&self) -> &[u8] {
        &self.tx[self.tx_at..]
    }

    fn sent(&mut self, n: usize) {
        self.tx_at += n;
        if self.tx_at == self.tx.len() {
            self.tx.clear();
            self.tx_at = 0;
        }
    }

    /// Bytes from the socket: plaintext appended to `plain`. `Ok(false)`: the peer ended TLS
    /// (close_notify).
    fn feed(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<bool, TlsFailed> {
        let Some(t) = &mut self.tls else {
            plain.extend_from_slice(data);
            return Ok(true);
        };
        let mut rest = data;
        while !rest.is_empty() {
            match t.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    log::debug!("tls read: {e}");
                    return Err(TlsFailed);
                }
            }
            if let Err(e) = t.process_new_packets() {
                log::debug!("tls: {e}");
                self.seal();
                return Err(TlsFailed);
            }
            let mut chunk = [0u8; 8192];
            loop {
                match t.reader().read(&mut chunk) {
                    Ok(0) => return Ok(false),
                    Ok(n) => plain.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
            }
        }
        Ok(true)
    }

    /// Whether the writer has something besides the session's queue.
    fn has_output(&self) -> bool {
        !self.unsent().is_empty()
            || self.ws.as_ref().is_some_and(|w| !w.texts.is_empty() || !w.mem.tx.is_empty())
    }

    /// Convert queued frames (and the gateway's own texts) into bytes for the socket, up to
    /// [`TX_BATCH_BYTES`]. Returns the queued bytes taken.
    fn encode(&mut self, q: &mut VecDeque<Bytes>) -> usize {
        let mut taken = 0;
        if let Some(ws) = &mut self.ws {
            while let Some(t) = ws.texts.pop_front() {
                ws.write(Message::text(t));
            }
            while self.tx.len() + ws.mem.tx.len() < TX_BATCH_BYTES {
                let Some(f) = q.pop_front() else { break };
                taken += f.len();
                let m = if ws.json == Some(true) {
                    Message::text(crate::json::answer(&f, &mut ws.json_state))
                } else {
                    Message::Binary(f)
                };
                ws.write(m);
            }
            let out = std::mem::take(&mut ws.mem.tx);
            self.queue_plain(&out);
            if let Some(ws) = &mut self.ws {
                // Keep the buffer's capacity for the next batch.
                ws.mem.tx = out;
                ws.mem.tx.clear();
            }
        } else {
            while self.tx.len() < TX_BATCH_BYTES {
                let Some(f) = q.pop_front() else { break };
                taken += f.len();
                self.queue_plain(&f);
                self.seal();
            }
        }
        self.seal();
        taken
    }

    /// The last bytes of a closing connection: a WebSocket close frame, TLS close_notify.
    fn finish(&mut self) {
        if let Some(ws) = &mut self.ws {
            let (code, reason) = ws.close.unwrap_or((CloseCode::Normal, ""));
            let _ = ws.ctx.close(&mut ws.mem, Some(CloseFrame { code, reason: reason.into() }));
            let _ = ws.ctx.flush(&mut ws.mem);
            let out = std::mem::take(&mut ws.mem.tx);
            self.queue_plain(&out);
        }
        if let Some(t) = &mut self.tls {
            t.send_close_notify();
        }
        self.seal();
    }
}

impl Ws {
    fn new(tail: &[u8], json: Option<bool>, frame_bytes_max: usize) -> Ws {
        let mut cfg = WebSocketConfig::default();
        cfg.read_buffer_size = WS_READ_BUFFER_BYTES;
        cfg.write_buffer_size = 0;
        // A binary message carries whole frames; a JSON text is a request of similar size.
        cfg.max_message_size = Some(ws_message_bytes_max(frame_bytes_max));
        cfg.max_frame_size = cfg.max_message_size;
        Ws {
            ctx: WebSocketContext::from_partially_read(tail.to_vec(), Role::Server, Some(cfg)),
            mem: MemIo::default(),
            json,
            json_state: Default::default(),
            texts: VecDeque::new(),
            close: None,
            incomplete: !tail.is_empty(),
        }
    }

    fn write(&mut self, m: Message) {
        if let Err(e) = self.ctx.write(&mut self.mem, m) {
            // After a close (the peer's or ours) nothing more is sent.
            log::debug!("websocket write: {e}");
        }
    }
}

/// The largest WebSocket message taken in: whole frames of up to `frame_bytes_max`, or a JSON
/// text whose body is base64 (4/3 the bytes) or escaped text, with room for its other fields.
pub fn ws_message_bytes_max(frame_bytes_max: usize) -> usize {
    2 * frame_bytes_max + 4096
}

/// The close code for a WebSocket the gateway ends because of what the peer sent.
pub fn close_code(e: &tungstenite::Error) -> (CloseCode, &'static str) {
    use tungstenite::Error as E;
    match e {
        E::Capacity(_) => (CloseCode::Size, "message too large"),
        E::Utf8(_) => (CloseCode::Invalid, "text is not UTF-8"),
        E::Protocol(_) => (CloseCode::Protocol, "websocket protocol error"),
        _ => (CloseCode::Error, "websocket error"),
    }
}

/// Send what `io` holds for the socket. With `deadline`, give up at it; without, as the
/// session's writer does ([`wait_writable`]). False: the socket failed or stalled.
async fn send_out(c: &Layered, session: &Session, deadline: Option<Instant>) -> bool {
    let fd = c.conn.stream.as_raw_fd();
    loop {
        let r = {
            let io = c.io.borrow();
            let out = io.unsent();
            if out.is_empty() {
                return true;
            }
            // SAFETY: `out` is valid for its length; MSG_DONTWAIT never blocks.
            unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
        };
        if r >= 0 {
            c.io.borrow_mut().sent(r as usize);
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {}
            _ => return false,
        }
        let ok = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                matches!(monoio::time::timeout(left, c.conn.stream.writable(false)).await, Ok(Ok(())))
            }
            None => Box::pin(wait_writable(&c.conn.stream, session)).await,
        };
        if !ok {
            return false;
        }
    }
}

/// Read from the socket into `buf` once it is readable; `None` at EOF, on an error, or once
/// `deadline` passes.
async fn read_some(c: &Layered, buf: &mut [u8], deadline: Instant) -> Option<usize> {
    let fd = c.conn.stream.as_raw_fd();
    loop {
        // SAFETY: `buf` is valid writable memory; MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Some(n as usize);
        }
        if n == 0 {
            return None;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock && err.kind() != io::ErrorKind::Interrupted {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !matches!(monoio::time::timeout(left, c.conn.stream.readable(false)).await, Ok(Ok(()))) {
            return None;
        }
    }
}

/// The TLS handshake and the HTTP request of a WebSocket listener, within `limit`. Returns
/// the plaintext that followed them (the first bytes of the session), or `None` when the
/// connection ends here (answered, refused, failed or too slow).
async fn handshake_phase(
    shard: &Rc<Shard>,
    c: &Layered,
    session: &Session,
    app: App,
    limit: Duration,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        c.io.borrow_mut().seal();
        if !send_out(c, session, Some(deadline)).await || session.closing.get() {
            return None;
        }
        let handshaking = c.io.borrow().tls.as_ref().is_some_and(|t| t.is_handshaking());
        if !handshaking {
            match app {
                App::Binary => return Some(head),
                App::WebSocket => match http::route(&head) {
                    Head::Partial => {}
                    Head::Upgrade { response, consumed, json } => {
                        let mut io = c.io.borrow_mut();
                        io.queue_plain(&response);
                        io.ws = Some(Box::new(Ws::new(
                            &head[consumed..],
                            json,
                            shard.cfg().limits.frame_bytes_max,
                        )));
                        io.seal();
                        return Some(Vec::new());
                    }
                    Head::Respond(r) => {
                        {
                            let mut io = c.io.borrow_mut();
                            io.queue_plain(&r);
                            if let Some(t) = &mut io.tls {
                                t.send_close_notify();
                            }
                            io.seal();
                        }
                        send_out(c, session, Some(deadline)).await;
                        return None;
                    }
                },
            }
        }
        let n = read_some(c, &mut buf, deadline).await?;
        session.last_rx.set(Instant::now());
        let fed = c.io.borrow_mut().feed(&buf[..n], &mut head);
        match fed {
            Ok(true) => {}
            Ok(false) => return None,
            Err(TlsFailed) => {
                // The alert is queued: send it, best effort.
                send_out(c, session, Some(deadline)).await;
                return None;
            }
        }
    }
}

/// A message read from a WebSocket, handled after the layers are let go.
enum Inbound {
    Binary(Bytes),
    Text(tungstenite::Utf8Bytes),
}

struct Reader<'a> {
    shard: &'a Rc<Shard>,
    session: &'a Rc<Session>,
    conn: &'a Rc<Layered>,
}

impl Reader<'_> {
    /// Read and handle input until it ends; `first` is plaintext that came with the handshake.
    /// Once the session is closing, read and discard, as the TCP transport does.
    async fn run(&mut self, first: Vec<u8>) {
        let fd = self.conn.conn.stream.as_raw_fd();
        // Binary frames over TLS gather in an aligned buffer; a WebSocket needs none.
        let ws = self.conn.io.borrow().ws.is_some();
        let mut frames =
            (!ws).then(|| AlignedBuf::new(self.shard.cfg().limits.read_buffer_bytes.max(first.len())));
        let mut plain = first;
        let mut fresh = !plain.is_empty() || ws;
        loop {
            if !fresh {
                if self.conn.conn.stream.readable(false).await.is_err() {
                    break;
                }
                // An idle connection holds no read buffer: one is taken from the shard's pool
                // for each read, as on TCP.
                let mut raw = self.shard.take_buf();
                let spare = raw.spare();
                let want = spare.len().min(READ_BYTES);
                // SAFETY: `spare` is valid writable memory of at least `want` bytes; MSG_DONTWAIT
                // never blocks.
                let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
                let fed = (n > 0 && !self.session.closing.get())
                    .then(|| self.conn.io.borrow_mut().feed(&raw.spare()[..n as usize], &mut plain));
                self.shard.put_buf(raw);
                if n < 0 {
                    let kind = io::Error::last_os_error().kind();
                    if kind == io::ErrorKind::WouldBlock || kind == io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                if n == 0 {
                    break;
                }
                if self.session.closing.get() {
                    if self.conn.conn.output_ended.get() {
                        break;
                    }
                    continue;
                }
                self.session.last_rx.set(Instant::now());
                match fed.expect("fed when read and not closing") {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(TlsFailed) => {
                        self.session.close();
                        self.session.writer.notify();
                        continue;
                    }
                }
            }
            fresh = false;
            let flow = match &mut frames {
                None => self.websocket(&plain).await,
                Some(frames) => self.binary(&plain, frames).await,
            };
            plain.clear();
            if plain.capacity() > PLAIN_KEPT_BYTES {
                // A burst's buffer is not held by an idle connection.
                plain = Vec::new();
            }
            if let Flow::Close = flow {
                self.session.close();
            }
        }
        self.session.partial_since.set(None);
    }

    /// Binary v1 frames over TLS.
    async fn binary(&mut self, plain: &[u8], buf: &mut AlignedBuf) -> Flow {
        let mut rest = plain;
        while !rest.is_empty() {
            if buf.spare().is_empty() {
                buf.compact();
                if buf.spare().is_empty() {
                    let mut big = AlignedBuf::new(buf.capacity() * 2);
                    let have = buf.filled().len();
                    big.spare()[..have].copy_from_slice(buf.filled());
                    big.end = have;
                    *buf = big;
                }
            }
            let spare = buf.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            buf.end += n;
            rest = &rest[n..];
            if let Flow::Close = handle_frames(self.shard, self.session, buf).await {
                buf.clear();
                return Flow::Close;
            }
        }
        buf.compact();
        self.partial(!buf.is_empty());
        Flow::Continue
    }

    /// WebSocket messages.
    async fn websocket(&mut self, plain: &[u8]) -> Flow {
        let mut msgs = Vec::new();
        let mut end = false;
        {
            let mut io = self.conn.io.borrow_mut();
            let ws = io.ws.as_mut().expect("a websocket");
            ws.mem.rx.extend_from_slice(plain);
            ws.incomplete |= !plain.is_empty();
            loop {
                let read = ws.ctx.read(&mut ws.mem);
                if read.is_ok() {
                    ws.incomplete = false;
                }
                match read {
                    Ok(Message::Binary(b)) => msgs.push(Inbound::Binary(b)),
                    Ok(Message::Text(t)) => msgs.push(Inbound::Text(t)),
                    Ok(Message::Close(_)) => {
                        // tungstenite queued the reply close frame.
                        end = true;
                        break;
                    }
                    Ok(_) => {} // ping (the pong is queued), pong
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                        end = true;
                        break;
                    }
                    Err(e) => {
                        log::debug!("session {:?}: websocket: {e}", self.session.id);
                        ws.close = Some(close_code(&e));
                        end = true;
                        break;
                    }
                }
            }
            let partial = ws.incomplete;
            if !ws.mem.tx.is_empty() {
                self.session.writer.notify();
            }
            drop(io);
            self.partial(partial);
        }
        for m in msgs {
            let flow = match m {
                Inbound::Binary(b) => {
                    self.choose_format(false);
                    self.binary_message(&b).await
                }
                Inbound::Text(t) => {
                    self.choose_format(true);
                    self.json_message(&t).await
                }
            };
            if let Flow::Close = flow {
                return Flow::Close;
            }
            if self.session.closing.get() {
                return Flow::Close;
            }
        }
        if end {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn choose_format(&self, json: bool) {
        if let Some(ws) = self.conn.io.borrow_mut().ws.as_mut() {
            let json = *ws.json.get_or_insert(json);
            // A JSON message is not bound by frame_bytes_max: large frames go whole.
            self.session.parts_out.set(!json);
        }
    }

    fn partial(&self, partial: bool) {
        if !partial {
            self.session.partial_since.set(None);
        } else if self.session.partial_since.get().is_none() {
            self.session.partial_since.set(Some(Instant::now()));
        }
    }

    /// A binary message: one or more whole v1 frames.
    async fn binary_message(&mut self, b: &[u8]) -> Flow {
        let mut buf = AlignedBuf::new(b.len());
        buf.spare()[..b.len()].copy_from_slice(b);
        buf.end = b.len();
        if let Flow::Close = handle_frames(self.shard, self.session, &mut buf).await {
            return Flow::Close;
        }
        if !buf.is_empty() {
            // A frame cut at the message's end: the client is broken.
            self.session.push(error_frame(ErrorCode::Malformed, 0, 0));
            return Flow::Close;
        }
        Flow::Continue
    }

    /// A text message: one JSON request.
    async fn json_message(&mut self, text: &str) -> Flow {
        let converted = {
            let mut io = self.conn.io.borrow_mut();
            let ws = io.ws.as_mut().expect("a websocket");
            crate::json::request(text, &mut ws.json_state)
        };
        match converted {
            crate::json::Inbound::Frame(f) => {
                if f.payload().len() > self.shard.cfg().limits.frame_bytes_max {
                    self.session.push(error_frame(ErrorCode::FrameTooLarge, f.kind(), 0));
                    return Flow::Close;
                }
                Requests { shard: self.shard, session: self.session }.frame(f.kind(), f.payload()).await
            }
            crate::json::Inbound::Error(answer) => {
                if let Some(ws) = self.conn.io.borrow_mut().ws.as_mut() {
                    ws.texts.push_back(answer);
                }
                self.session.writer.notify();
                // A client that sends refused requests faster than it reads their answers
                // waits here (it reads nothing more) until the writer has sent them.
                while self
                    .conn
                    .io
                    .borrow()
                    .ws
                    .as_ref()
                    .is_some_and(|w| w.texts.len() >= JSON_REFUSALS_QUEUED_MAX)
                {
                    if self.session.closing.get() {
                        return Flow::Close;
                    }
                    self.session.drained.wait().await;
                }
                Flow::Continue
            }
        }
    }
}

/// Write what the session queues until it closes; then the close frame, close_notify and the
/// lingering close.
async fn write_loop(c: Rc<Layered>, session: Rc<Session>) {
    'outer: loop {
        session.refill();
        while session.outq.borrow().is_empty() && !c.io.borrow().has_output() {
            if session.closing.get() {
                break 'outer;
            }
            session.writer.wait().await;
            session.refill();
        }
        let taken = {
            let mut io = c.io.borrow_mut();
            let mut q = session.outq.borrow_mut();
            io.encode(&mut q)
        };
        session.out_bytes.set(session.out_bytes.get() - taken);
        session.drained.notify();
        if !send_out(&c, &session, None).await {
            break;
        }
    }
    session.closing.set(true);
    session.drained.notify();
    session.outq.borrow_mut().clear();
    session.out_bytes.set(0);
    c.io.borrow_mut().finish();
    send_out(&c, &session, None).await;
    c.conn.close_lingering().await;
}
