//! Transports: bytes on a socket in, whole frames out to the session logic
//! ([`crate::session`]), and the session's queued frames back out. Only transports touch client
//! sockets.
//!
//! - [`tcp`]: the binary protocol over plain TCP (the hot path: no copies);
//! - [`stream`]: the layered connections — the binary protocol over TLS, and WebSocket (binary
//!   v1 frames or JSON, docs/JSON.md) with or without TLS;
//! - [`http`]: the HTTP/1.1 request that opens a WebSocket (or asks for the web page);
//! - [`tls`]: certificates and their reload;
//! - [`web`]: the web chat page's files.
//!
//! What every transport shares is here: the session's start and end, the frame loop over a read
//! buffer, and the lingering close.

pub mod http;
pub mod stream;
pub mod tcp;
pub mod tls;
pub mod web;

use std::{
    cell::Cell,
    net::Shutdown,
    os::fd::{AsRawFd, BorrowedFd},
    rc::Rc,
    time::{Duration, Instant},
};

use monoio::net::TcpStream;
use socket2::SockRef;

use crate::{
    envelope::Envelope,
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
    notify::LocalNotify,
    protocol::ErrorCode,
    session::{error_frame, requests::Requests, Flow, Session},
    shard::Shard,
};

/// Time a closing session's socket may accept nothing before the rest of its queue is dropped.
const CLOSE_FLUSH_MS: u64 = 1000;
/// Time the peer gets to close its side after ours is shut down, while its input is discarded.
const CLOSE_LINGER_MS: u64 = 500;
/// Time a writer waits for a socket that accepts nothing before giving the session up.
const WRITE_STALL_MS: u64 = 60_000;

/// What the reader and writer tasks of one connection share.
struct Conn {
    stream: TcpStream,
    /// The reader has seen the end of the input (EOF or an error): no more lingering.
    input_ended: Cell<bool>,
    input_done: LocalNotify,
    /// The writer has finished its lingering close: the reader stops discarding.
    output_ended: Cell<bool>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            input_ended: Cell::new(false),
            input_done: LocalNotify::default(),
            output_ended: Cell::new(false),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = with_sock(&self.stream, |s| s.shutdown(how));
    }

    /// The reader's input ended: the writer's linger stops waiting.
    fn end_input(&self) {
        self.input_ended.set(true);
        self.input_done.notify();
    }

    /// The end of a close (see the module doc of [`tcp`]): FIN after everything written, the
    /// peer's linger time, then the receiving side shut down, which ends the reader.
    async fn close_lingering(&self) {
        self.shutdown(Shutdown::Write);
        if !self.input_ended.get() {
            // Boxed: the linger's timer lives only while closing, not in every idle writer task.
            Box::pin(self.linger()).await;
        }
        // Wakes the reader, whose reads then end once the input already here is discarded.
        self.output_ended.set(true);
        self.shutdown(Shutdown::Read);
    }

    /// Give the peer [`CLOSE_LINGER_MS`] to close its side.
    async fn linger(&self) {
        let done = self.input_done.wait();
        monoio::select! {
            _ = done => {}
            _ = monoio::time::sleep(Duration::from_millis(CLOSE_LINGER_MS)) => {}
        }
    }
}

/// Run `f` on the stream as a socket2 socket, for the calls that are not on the hot path (the
/// `recv` and `sendmsg` of every frame stay direct libc calls into the pooled buffer and the
/// queued frames).
fn with_sock<R>(stream: &TcpStream, f: impl FnOnce(SockRef<'_>) -> R) -> R {
    // SAFETY: the descriptor stays open while `stream` is borrowed (monoio's TcpStream
    // implements AsRawFd but not AsFd).
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    f(SockRef::from(&fd))
}

/// A new session for an accepted connection, registered with its shard.
fn open_session(shard: &Rc<Shard>, peer: Option<std::net::SocketAddr>, transport: u8) -> Rc<Session> {
    crate::metrics::count_accepted(transport);
    let id = shard.new_session_ref();
    let session = Rc::new(Session::new(id, &shard.cfg().limits));
    session.transport.set(transport);
    session.peer.set(peer.map(|a| a.ip()));
    shard.sessions.borrow_mut().insert(id.0, session.clone());
    if shard.shutting_down.get() {
        session.kick(ErrorCode::ShuttingDown);
    }
    session
}

/// Clean up after a session whose connection is closed: its rooms and its user owner.
fn close_session(shard: &Rc<Shard>, session: &Session) {
    let id = session.id;
    shard.sessions.borrow_mut().remove(&id.0);
    session.drop_large();
    for room in session.take_rooms() {
        shard.forget_room_subscriber(id, room);
        shard.leave_room_owner(id, room);
    }
    let user = session.user();
    if user != 0 {
        shard.post(shard.place(|p| p.user(user)), Envelope::Detach { user, session: id });
    }
    shard.stats.accepted.set(shard.stats.accepted.get() + 1);
}

/// Refuse a connection over the shard's limit: one error frame, best effort, then close.
pub fn refuse(stream: TcpStream) {
    let f = error_frame(ErrorCode::TooManyConnections, 0, 0);
    let _ = with_sock(&stream, |s| s.send_with_flags(&f, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL));
}

/// Handle every whole frame at the front of `buf`. Grows `buf` when an incomplete frame is
/// larger than it.
async fn handle_frames(shard: &Rc<Shard>, session: &Rc<Session>, buf: &mut AlignedBuf) -> Flow {
    let frame_max = shard.cfg().limits.frame_bytes_max;
    loop {
        match frame::parse(buf.filled(), frame_max) {
            Parsed::Frame(h, total) => {
                let payload_end = HEADER_BYTES + h.len as usize;
                let flow = {
                    let payload = &buf.filled()[HEADER_BYTES..payload_end];
                    Requests { shard, session }.frame(h.kind, payload).await
                };
                buf.start += total;
                if let Flow::Close = flow {
                    return Flow::Close;
                }
                if session.closing.get() {
                    return Flow::Close;
                }
            }
            Parsed::Partial { need } => {
                if need > buf.capacity() {
                    let mut big = AlignedBuf::new(need);
                    let have = buf.filled().len();
                    big.spare()[..have].copy_from_slice(buf.filled());
                    big.end = have;
                    buf.clear();
                    *buf = big;
                }
                return Flow::Continue;
            }
            Parsed::TooLarge(h) => {
                session.push(error_frame(ErrorCode::FrameTooLarge, h.kind, 0));
                return Flow::Close;
            }
            Parsed::BadFlags(h) => {
                session.push(error_frame(ErrorCode::BadHeader, h.kind, 0));
                return Flow::Close;
            }
        }
    }
}

/// Wait until the socket takes more bytes. Gives up after `WRITE_STALL_MS`, or `CLOSE_FLUSH_MS`
/// once the session is closing (also when it starts closing during the wait).
async fn wait_writable(stream: &TcpStream, session: &Session) -> bool {
    let start = Instant::now();
    loop {
        let limit = if session.closing.get() { CLOSE_FLUSH_MS } else { WRITE_STALL_MS };
        let Some(left) = Duration::from_millis(limit).checked_sub(start.elapsed()) else {
            return false;
        };
        monoio::select! {
            r = monoio::time::timeout(left, stream.writable(false)) => return matches!(r, Ok(Ok(()))),
            _ = session.writer.wait() => {
                // Woken by new frames or by close(): re-check the limit and wait again.
            }
        }
    }
}
