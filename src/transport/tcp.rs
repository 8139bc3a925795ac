//! The TCP transport of the binary protocol: a reader task (readiness, then `recv` into a
//! pooled aligned buffer; whole frames handed in place to the session's [`Requests`]) and a
//! writer task (queued frames written with one `sendmsg` of many iovecs, no copying).
//!
//! An idle connection holds no read buffer: one is taken from the shard's pool only when the
//! socket is readable, and kept only while a frame is incomplete.
//!
//! Closing is a lingering close: the writer flushes what is queued (the last frame says why),
//! shuts down its sending side (FIN), and waits briefly for the peer to close too, while the
//! reader keeps reading and discarding whatever the peer still sends. Closing a socket with
//! unread input makes the kernel answer with a reset, and a reset destroys whatever the peer
//! had not read yet: the queued frames and the Kick or Error that explains the close.

use std::{
    cell::Cell,
    io,
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
    sockio,
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
    fn shutdown(&self, how: Shutdown) {
        let _ = with_sock(&self.stream, |s| s.shutdown(how));
    }
}

/// Run `f` on the stream as a socket2 socket, for the calls that are not on the hot path (the `recv` and
/// `sendmsg` of every frame stay direct libc calls into the pooled buffer and the queued
/// frames).
fn with_sock<R>(stream: &TcpStream, f: impl FnOnce(SockRef<'_>) -> R) -> R {
    // SAFETY: the descriptor stays open while `stream` is borrowed (monoio's TcpStream
    // implements AsRawFd but not AsFd).
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    f(SockRef::from(&fd))
}

/// Serve one accepted connection until it closes, then clean up after it.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: Option<std::net::SocketAddr>) {
    let _ = stream.set_nodelay(true);
    let id = shard.new_session_ref();
    let session = Rc::new(Session::new(id, &shard.cfg().limits));
    session.peer.set(peer.map(|a| a.ip()));
    shard.sessions.borrow_mut().insert(id.0, session.clone());
    if shard.shutting_down.get() {
        session.kick(ErrorCode::ShuttingDown);
    }
    let conn = Rc::new(Conn {
        stream,
        input_ended: Cell::new(false),
        input_done: LocalNotify::default(),
        output_ended: Cell::new(false),
    });
    let writer = monoio::spawn(write_loop(conn.clone(), session.clone()));
    let mut reader = Reader { shard: &shard, session: &session, conn: &conn };
    reader.run().await;
    conn.input_ended.set(true);
    conn.input_done.notify();
    session.close();
    writer.await;
    shard.sessions.borrow_mut().remove(&id.0);
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

struct Reader<'a> {
    shard: &'a Rc<Shard>,
    session: &'a Rc<Session>,
    conn: &'a Rc<Conn>,
}

impl Reader<'_> {
    /// Read and handle frames until the input ends. Once the session is closing, read and
    /// discard instead, until the peer closes or the writer shuts the socket down.
    async fn run(&mut self) {
        let stream = &self.conn.stream;
        let fd = stream.as_raw_fd();
        let frame_max = self.shard.cfg().limits.frame_bytes_max;
        let mut held: Option<AlignedBuf> = None;
        let mut try_first = false;
        loop {
            if try_first {
                // Reading again at once: give the shard's other tasks their turn first.
                tim_shards::yield_now().await;
            } else if stream.readable(false).await.is_err() {
                // Timeouts and kicks close the session from elsewhere; the writer's
                // shutdown(SHUT_RD) after its lingering close ends this wait.
                break;
            }
            let closing = self.session.closing.get();
            let mut buf = held.take().unwrap_or_else(|| self.shard.take_buf());
            if closing {
                // What is left of an incomplete frame will never be handled.
                buf.clear();
            }
            let spare = buf.spare();
            let want = spare.len();
            // SAFETY: `spare` is valid writable memory of `want` bytes; MSG_DONTWAIT never blocks.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
            if n < 0 {
                let err = io::Error::last_os_error();
                let again =
                    err.kind() == io::ErrorKind::WouldBlock || err.kind() == io::ErrorKind::Interrupted;
                self.keep_or_return(&mut held, buf);
                try_first = false;
                if again {
                    continue;
                }
                break;
            }
            if n == 0 {
                self.shard.put_buf(buf);
                break;
            }
            // A full read suggests more is waiting: read again before arming readiness.
            try_first = n as usize == want;
            if closing {
                // Discarded: read only so that no unread input turns the close into a reset.
                self.shard.put_buf(buf);
                if self.conn.output_ended.get() {
                    // The peer had its linger time; a peer that still sends is not waited for.
                    break;
                }
                continue;
            }
            buf.end += n as usize;
            self.session.last_rx.set(Instant::now());
            if self.session.partial_since.get().is_some()
                && !matches!(frame::parse(buf.filled(), frame_max), Parsed::Partial { .. })
            {
                // The pending frame is whole now (or refused): its clock stops before it is
                // handled, which may wait (at the in-flight limit) for longer than the timeout.
                self.session.partial_since.set(None);
            }
            if let Flow::Close = self.frames(&mut buf).await {
                self.session.close();
                buf.clear();
            }
            if !buf.is_empty() && self.session.partial_since.get().is_none() {
                // A new incomplete frame: the sweep closes the session if it stays incomplete
                // for `partial_frame_timeout_ms`. Later bytes of it do not restart the clock.
                self.session.partial_since.set(Some(Instant::now()));
            }
            self.keep_or_return(&mut held, buf);
        }
        self.session.partial_since.set(None);
        if let Some(b) = held {
            self.shard.put_buf(b);
        }
    }

    fn keep_or_return(&self, held: &mut Option<AlignedBuf>, mut buf: AlignedBuf) {
        if buf.is_empty() {
            self.shard.put_buf(buf);
        } else {
            buf.compact();
            *held = Some(buf);
        }
    }

    /// Handle every whole frame at the front of `buf`. Grows `buf` when an incomplete frame
    /// is larger than it.
    async fn frames(&mut self, buf: &mut AlignedBuf) -> Flow {
        let frame_max = self.shard.cfg().limits.frame_bytes_max;
        loop {
            match frame::parse(buf.filled(), frame_max) {
                Parsed::Frame(h, total) => {
                    let payload_end = HEADER_BYTES + h.len as usize;
                    let flow = {
                        let payload = &buf.filled()[HEADER_BYTES..payload_end];
                        Requests { shard: self.shard, session: self.session }.frame(h.kind, payload).await
                    };
                    buf.start += total;
                    if let Flow::Close = flow {
                        return Flow::Close;
                    }
                    if self.session.closing.get() {
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
                    self.session.push(error_frame(ErrorCode::FrameTooLarge, h.kind, 0));
                    return Flow::Close;
                }
                Parsed::BadFlags(h) => {
                    self.session.push(error_frame(ErrorCode::BadHeader, h.kind, 0));
                    return Flow::Close;
                }
            }
        }
    }
}

/// Write queued frames until the session closes; then close lingering (see the module doc):
/// shut down the sending side, give the peer [`CLOSE_LINGER_MS`] to close its side while the
/// reader discards its input, and shut down the receiving side, which ends the reader.
async fn write_loop(conn: Rc<Conn>, session: Rc<Session>) {
    let fd = conn.stream.as_raw_fd();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(sockio::IOV_MAX);
    'outer: loop {
        session.refill_rooms();
        while session.outq.borrow().is_empty() {
            if session.closing.get() {
                break 'outer;
            }
            session.writer.wait().await;
            session.refill_rooms();
        }
        let written = loop {
            let sent = sockio::send_frames(fd, &session.outq.borrow(), &mut iov);
            match sent {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !Box::pin(wait_writable(&conn.stream, &session)).await {
                        break 'outer;
                    }
                }
                Err(_) => break 'outer,
            }
        };
        sockio::consume(&mut session.outq.borrow_mut(), written);
        session.out_bytes.set(session.out_bytes.get() - written);
        session.drained.notify();
    }
    session.closing.set(true);
    session.drained.notify();
    session.outq.borrow_mut().clear();
    session.out_bytes.set(0);
    // FIN after everything written: the peer reads all of it, then sees the end.
    conn.shutdown(Shutdown::Write);
    if !conn.input_ended.get() {
        // Boxed: the linger's timer lives only while closing, not in every idle writer task.
        Box::pin(linger(&conn)).await;
    }
    // Wakes the reader, whose reads then end once the input already here is discarded.
    conn.output_ended.set(true);
    conn.shutdown(Shutdown::Read);
}

/// Give the peer [`CLOSE_LINGER_MS`] to close its side.
async fn linger(conn: &Conn) {
    let done = conn.input_done.wait();
    monoio::select! {
        _ = done => {}
        _ = monoio::time::sleep(Duration::from_millis(CLOSE_LINGER_MS)) => {}
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
