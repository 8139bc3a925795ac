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

use std::{io, os::fd::AsRawFd, rc::Rc, time::Instant};

use monoio::net::TcpStream;

use super::{close_session, handle_frames, open_session, wait_writable, Conn};
use crate::{
    frame::{self, AlignedBuf, Parsed},
    session::{Flow, Session},
    shard::Shard,
    sockio,
};

/// Serve one accepted connection until it closes, then clean up after it.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: Option<std::net::SocketAddr>) {
    let _ = stream.set_nodelay(true);
    let session = open_session(&shard, peer, 0);
    let conn = Rc::new(Conn::new(stream));
    let writer = monoio::spawn(write_loop(conn.clone(), session.clone()));
    let mut reader = Reader { shard: &shard, session: &session, conn: &conn };
    reader.run().await;
    conn.end_input();
    session.close();
    writer.await;
    close_session(&shard, &session);
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
            if let Flow::Close = handle_frames(self.shard, self.session, &mut buf).await {
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
}

/// Write queued frames until the session closes; then close lingering (see the module doc):
/// shut down the sending side, give the peer [`CLOSE_LINGER_MS`] to close its side while the
/// reader discards its input, and shut down the receiving side, which ends the reader.
async fn write_loop(conn: Rc<Conn>, session: Rc<Session>) {
    let fd = conn.stream.as_raw_fd();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(sockio::IOV_MAX);
    'outer: loop {
        session.refill();
        while session.outq.borrow().is_empty() {
            if session.closing.get() {
                break 'outer;
            }
            session.writer.wait().await;
            session.refill();
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
    conn.close_lingering().await;
}
