//! The WebSocket client side (RFC 6455) of `--transport ws-binary` and `ws-json`: the upgrade
//! handshake ([`handshake`]), the client's frames ([`push_frame`]: masked, never fragmented)
//! and the server's frames, parsed in place in the connection's receive buffer ([`parse`]).
//!
//! Hand-written framing rather than tungstenite's protocol engine: the loadgen reads each socket
//! itself (readiness, then `recv` into a pooled buffer) and hands v1 frames to the scenarios in
//! place, with a reader task and a writer task per connection that share no state but the
//! socket and the write queue. Here a server message costs a header parse and one copy of its
//! payload (binary) or one JSON parse (text), and a client message a header and one masking
//! pass over bytes already being copied, with no allocation per message. tungstenite's
//! `WebSocketContext` keeps reads and writes in one object, copies every message through its
//! own buffer into an owned `Bytes`/`Utf8Bytes`, and draws each mask from a CSPRNG: on two
//! cores shared with the server, that is CPU taken from the server being measured.
//! tungstenite's handshake helpers (the key and its accept value) are used as they are.
//!
//! Masks are drawn from a per-connection xorshift sequence: RFC 6455 asks for unpredictable
//! masks to protect intermediaries from browser scripts, not a concern for a load generator.

use std::{
    io,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use monoio::net::TcpStream;

/// Opcodes (RFC 6455 5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// The path of tim's WebSocket endpoint.
pub const PATH: &str = "/ws";
/// Longest HTTP response head taken from the server.
const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Largest server message accepted: the server's frames are at most `frame_bytes_max` (64 KiB
/// by default) plus their header, and a JSON text of one can be twice as long (escapes, base64).
pub const MESSAGE_BYTES_MAX: usize = 4 << 20;

fn failed(why: impl Into<String>) -> io::Error {
    io::Error::other(format!("websocket handshake: {}", why.into()))
}

/// Upgrade a connected socket to a WebSocket on [`PATH`], asking for `subprotocol`, within
/// `deadline`. Returns the bytes that came after the server's response (the first of its
/// WebSocket frames, if any). A refusal, a bad accept key or another subprotocol is an error of
/// kind `Other` whose text says what went wrong.
pub async fn handshake(
    stream: &TcpStream,
    host: &str,
    subprotocol: &str,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    let key = tungstenite::handshake::client::generate_key();
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    );
    send_all(stream, request.as_bytes(), deadline).await?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = recv_some(stream, &mut chunk, deadline).await?;
        if n == 0 {
            return Err(failed("the server closed the connection"));
        }
        head.extend_from_slice(&chunk[..n]);
        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
            if head.len() > RESPONSE_HEAD_BYTES_MAX {
                return Err(failed("response head too long"));
            }
            continue;
        };
        check_response(&head[..end + 4], &key, subprotocol)?;
        return Ok(head[end + 4..].to_vec());
    }
}

/// Whether `head` (a whole response head) accepts the upgrade asked for with `key`.
fn check_response(head: &[u8], key: &str, subprotocol: &str) -> io::Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(failed("incomplete response head")),
        Err(e) => return Err(failed(format!("bad response: {e}"))),
    }
    let code = r.code.unwrap_or(0);
    if code != 101 {
        return Err(failed(format!("HTTP {code} {}", r.reason.unwrap_or(""))));
    }
    let header = |name: &str| {
        r.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header("sec-websocket-accept").as_deref().map(str::trim) != Some(accept.as_str()) {
        return Err(failed("wrong Sec-WebSocket-Accept"));
    }
    match header("sec-websocket-protocol") {
        Some(p) if p.trim() == subprotocol => Ok(()),
        Some(p) => Err(failed(format!("the server chose subprotocol {:?}, not {subprotocol}", p.trim()))),
        None => Err(failed(format!("the server did not accept subprotocol {subprotocol}"))),
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "websocket handshake timed out")
}

async fn send_all(stream: &TcpStream, mut b: &[u8], deadline: Instant) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !b.is_empty() {
        // SAFETY: valid fd and buffer; MSG_DONTWAIT never blocks.
        let r =
            unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            b = &b[r as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                monoio::time::timeout(left, stream.writable(false)).await.map_err(|_| timed_out())??;
            }
            _ => return Err(err),
        }
    }
    Ok(())
}

async fn recv_some(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    loop {
        // SAFETY: `buf` is valid writable memory; MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                monoio::time::timeout(left, stream.readable(false)).await.map_err(|_| timed_out())??;
                if Instant::now() >= deadline {
                    return Err(timed_out());
                }
            }
            _ => return Err(err),
        }
    }
}

/// A connection's sequence of masking keys (xorshift64*).
#[derive(Clone, Copy, Debug)]
pub struct Masks(u64);

impl Masks {
    pub fn new(seed: u64) -> Masks {
        Masks(seed | 1)
    }

    pub fn next_key(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32).to_ne_bytes()
    }
}

/// Append one client frame (final, masked with `key`) of `opcode` carrying `payload`.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], key: [u8; 4]) {
    let n = payload.len();
    out.push(0x80 | opcode);
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key);
}

/// XOR `buf` with the repeated `key`, starting at key byte 0 (eight bytes at a time).
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k = u32::from_ne_bytes(key) as u64;
    let k8 = k | (k << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8 (of 4): at key byte 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A frame from the server, in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// What the front of the receive buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole frame and the bytes it takes.
    Frame(Frame<'a>, usize),
    /// Not a whole frame yet.
    Partial,
    /// A frame no server may send (what is wrong with it).
    Bad(&'static str),
}

/// Parse the server frame at the front of `buf`; a payload over `payload_max` is refused.
pub fn parse(buf: &[u8], payload_max: usize) -> Parsed<'_> {
    if buf.len() < 2 {
        return Parsed::Partial;
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Parsed::Bad("reserved bits set");
    }
    if b1 & 0x80 != 0 {
        return Parsed::Bad("a masked frame from the server");
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    let control = opcode & 0x8 != 0;
    if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Parsed::Bad("unknown opcode");
    }
    let (len, head) = match b1 & 0x7f {
        126 if buf.len() < 4 => return Parsed::Partial,
        126 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() < 10 => return Parsed::Partial,
        127 => (u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")), 10),
        n => (n as u64, 2),
    };
    if control && (!fin || len > 125) {
        return Parsed::Bad("a fragmented or long control frame");
    }
    if len > payload_max as u64 {
        return Parsed::Bad("a message over the size limit");
    }
    let total = head + len as usize;
    if buf.len() < total {
        return Parsed::Partial;
    }
    Parsed::Frame(Frame { fin, opcode, payload: &buf[head..total] }, total)
}

/// The close code and reason of a close frame's payload (1005: none given).
pub fn close_reason(payload: &[u8]) -> (u16, String) {
    if payload.len() < 2 {
        return (1005, String::new());
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (code, String::from_utf8_lossy(&payload[2..]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmask as a server does (byte by byte): the eight-bytes-at-a-time mask is the same XOR.
    #[test]
    fn masking_round_trips() {
        let mut masks = Masks::new(7);
        for n in [0usize, 1, 7, 8, 13, 125, 126, 300, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let key = masks.next_key();
            let mut out = Vec::new();
            push_frame(&mut out, OP_BINARY, &payload, key);
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0x80, "masked");
            let (len, head) = match out[1] & 0x7f {
                126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
                127 => (u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize, 10),
                l => (l as usize, 2),
            };
            assert_eq!(len, n);
            assert_eq!(&out[head..head + 4], &key);
            let unmasked: Vec<u8> = out[head + 4..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(unmasked, payload);
        }
    }

    /// Server frames of each length form parse whole, partial prefixes wait, and frames a
    /// server may not send are refused.
    #[test]
    fn server_frames() {
        let frame = |op: u8, payload: &[u8]| {
            let mut f = vec![0x80 | op];
            match payload.len() {
                n if n < 126 => f.push(n as u8),
                n if n <= 0xffff => {
                    f.push(126);
                    f.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    f.push(127);
                    f.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            f.extend_from_slice(payload);
            f
        };
        for n in [0, 5, 125, 126, 1000, 70_000] {
            let payload = vec![b'x'; n];
            let f = frame(OP_TEXT, &payload);
            assert_eq!(
                parse(&f, MESSAGE_BYTES_MAX),
                Parsed::Frame(Frame { fin: true, opcode: OP_TEXT, payload: &payload }, f.len())
            );
            assert_eq!(parse(&f[..f.len() - 1], MESSAGE_BYTES_MAX), Parsed::Partial);
            assert_eq!(parse(&f[..1], MESSAGE_BYTES_MAX), Parsed::Partial);
        }
        assert!(matches!(parse(&frame(OP_BINARY, &[0; 200]), 100), Parsed::Bad(_)));
        assert!(matches!(parse(&[0x82, 0x81, 0, 0, 0, 0, 0], 100), Parsed::Bad(_)), "masked");
        assert!(matches!(parse(&[0xc2, 0x00], 100), Parsed::Bad(_)), "RSV1");
        assert!(matches!(parse(&[0x09, 0x00], 100), Parsed::Bad(_)), "fragmented ping");
        assert!(matches!(parse(&[0x83, 0x00], 100), Parsed::Bad(_)), "opcode 3");
        let close = frame(OP_CLOSE, &[0x03, 0xf1, b'b', b'y', b'e']);
        let Parsed::Frame(f, _) = parse(&close, 100) else { panic!() };
        assert_eq!(close_reason(f.payload), (1009, "bye".to_owned()));
    }

    /// The response checks: status, accept key, subprotocol.
    #[test]
    fn handshake_response() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: tim.json\r\n\r\n";
        assert!(check_response(ok.as_bytes(), key, "tim.json").is_ok());
        assert!(check_response(ok.as_bytes(), key, "tim.v1").is_err());
        assert!(check_response(ok.as_bytes(), "AAAAAAAAAAAAAAAAAAAAAA==", "tim.json").is_err());
        let refused = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let e = check_response(refused.as_bytes(), key, "tim.json").unwrap_err();
        assert!(e.to_string().contains("HTTP 404"), "{e}");
    }
}
