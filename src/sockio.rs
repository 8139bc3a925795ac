//! Socket writes shared by tim's connections and the `echo-limit` baseline: queued frames are
//! written with one non-blocking `sendmsg` of many iovecs (no copying into a write buffer), and
//! what was written is dropped from the front of the queue.

use std::{collections::VecDeque, io, os::fd::RawFd};

use bytes::{Buf, Bytes};

/// Frames written by one `sendmsg` at most.
pub const IOV_MAX: usize = 64;

/// Write the front of `queue` (up to [`IOV_MAX`] frames) with one non-blocking `sendmsg`.
/// Returns the bytes written; `WouldBlock` when the socket takes nothing now. `iov` is scratch
/// space kept by the caller between calls.
pub fn send_frames(fd: RawFd, queue: &VecDeque<Bytes>, iov: &mut Vec<libc::iovec>) -> io::Result<usize> {
    iov.clear();
    iov.extend(
        queue.iter().take(IOV_MAX).map(|b| libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() }),
    );
    loop {
        // SAFETY: the iovecs point into Bytes borrowed from `queue` for this call; msghdr is
        // zeroed except for the iovec array.
        let r = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Drop `written` bytes from the front of `queue`: whole frames, then part of the next.
pub fn consume(queue: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let front = queue.front_mut().expect("wrote no more than was queued");
        if front.len() <= written {
            written -= front.len();
            queue.pop_front();
        } else {
            front.advance(written);
            written = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consuming across frame boundaries leaves the unwritten rest in order.
    #[test]
    fn consume_partial() {
        let mut q: VecDeque<Bytes> =
            [&b"abc"[..], b"defg", b"hi"].into_iter().map(Bytes::from_static).collect();
        consume(&mut q, 5);
        assert_eq!(q, [Bytes::from_static(b"fg"), Bytes::from_static(b"hi")]);
        consume(&mut q, 4);
        assert!(q.is_empty());
    }
}
