//! The TCP transport of the binary protocol: a reader task (readiness, then `recv` into a
//! pooled aligned buffer; whole frames handed in place to the session's [`Requests`]) and a
//! writer task (queued frames written with one `sendmsg` of many iovecs, no copying).
//!
//! An idle connection holds no read buffer: one is taken from the shard's pool only when the
//! socket is readable, and kept only while a frame is incomplete.

use std::{
    io,
    os::fd::AsRawFd,
    rc::Rc,
    time::{Duration, Instant},
};

use monoio::net::TcpStream;

use crate::{
    envelope::Envelope,
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
    protocol::ErrorCode,
    session::{error_frame, requests::Requests, Flow, Session},
    shard::Shard,
    sockio,
};

/// Time a closing session gets to flush its last frames.
const CLOSE_FLUSH_MS: u64 = 1000;
/// Time a writer waits for a socket that accepts nothing before giving the session up.
const WRITE_STALL_MS: u64 = 60_000;

/// Serve one accepted connection until it closes, then clean up after it.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let id = shard.new_session_ref();
    let session = Rc::new(Session::new(id, &shard.cfg().limits));
    shard.sessions.borrow_mut().insert(id.0, session.clone());
    if shard.shutting_down.get() {
        session.kick(ErrorCode::ShuttingDown);
    }
    let stream = Rc::new(stream);
    let writer = monoio::spawn(write_loop(stream.clone(), session.clone()));
    let mut reader = Reader { shard: &shard, session: &session, stream: &stream };
    reader.run().await;
    session.close();
    writer.await;
    shard.sessions.borrow_mut().remove(&id.0);
    let user = session.user();
    if user != 0 {
        shard.post(shard.placement.user(user), Envelope::Detach { user, session: id });
    }
    shard.stats.accepted.set(shard.stats.accepted.get() + 1);
}

/// Refuse a connection over the shard's limit: one error frame, best effort, then close.
pub fn refuse(stream: TcpStream) {
    let f = error_frame(ErrorCode::TooManyConnections, 0, 0);
    // SAFETY: valid fd and buffer; MSG_DONTWAIT never blocks.
    unsafe {
        libc::send(stream.as_raw_fd(), f.as_ptr().cast(), f.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

struct Reader<'a> {
    shard: &'a Rc<Shard>,
    session: &'a Rc<Session>,
    stream: &'a Rc<TcpStream>,
}

impl Reader<'_> {
    async fn run(&mut self) {
        let fd = self.stream.as_raw_fd();
        let mut held: Option<AlignedBuf> = None;
        let mut try_first = false;
        loop {
            if self.session.closing.get() {
                break;
            }
            if try_first {
                // Reading again at once: give the shard's other tasks their turn first.
                tim_shards::yield_now().await;
            } else {
                // Timeouts close the session from the shard's sweep; the writer's shutdown(2)
                // then wakes this wait.
                if self.stream.readable(false).await.is_err() {
                    break;
                }
                if self.session.closing.get() {
                    break;
                }
            }
            let mut buf = held.take().unwrap_or_else(|| self.shard.take_buf());
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
            buf.end += n as usize;
            self.session.last_rx.set(Instant::now());
            // A full read suggests more is waiting: read again before arming readiness.
            try_first = n as usize == want;
            match self.frames(&mut buf).await {
                Flow::Continue => {}
                Flow::Close => {
                    self.shard.put_buf(buf);
                    break;
                }
            }
            self.keep_or_return(&mut held, buf);
        }
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

/// Write queued frames until the session closes, then shut the socket down so the reader wakes.
async fn write_loop(stream: Rc<TcpStream>, session: Rc<Session>) {
    let fd = stream.as_raw_fd();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(sockio::IOV_MAX);
    'outer: loop {
        while session.outq.borrow().is_empty() {
            if session.closing.get() {
                break 'outer;
            }
            session.writer.wait().await;
        }
        let written = loop {
            let sent = sockio::send_frames(fd, &session.outq.borrow(), &mut iov);
            match sent {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !Box::pin(wait_writable(&stream, &session)).await {
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
    // SAFETY: fd is open (the stream is alive); shutdown wakes the reader with EOF.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    session.reader.notify();
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
