//! A node link: a TCP connection, a Noise handshake keyed by the cluster secret, then a stream
//! of records in both directions.
//!
//! - Handshake: `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` with the pre-shared key
//!   SHA-256("tim cluster v1\0" ‖ secret). Both ends prove the secret (a wrong one fails the
//!   first message's authentication), and each link gets fresh keys (ephemeral X25519).
//! - Transport: Noise messages, each a u16 big-endian length and that many bytes of ciphertext
//!   (at most 65,535, so at most [`PLAIN_MAX`] bytes of plaintext each). The plaintexts, in
//!   order, form one byte stream of records.
//! - Records: the frame layout of the client protocol (8-byte header: u32 LE payload length,
//!   u16 LE kind, u16 LE reserved; payload padded to 8). Control records use the kinds in
//!   [`control`]; every other record is an envelope ([`super::wire`]).
//!
//! The first record each side sends is its [`Hello`]. A link, once up, carries traffic both
//! ways, whoever dialed: a node that can only dial out (behind NAT) is reachable through the
//! links it opened.

use std::{io, net::SocketAddr, time::Duration};

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snow::StatelessTransportState;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

use crate::frame;

/// The Noise pattern of every link.
pub const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message.
const MSG_MAX: usize = 65_535;
/// Authentication tag per message.
const TAG_BYTES: usize = 16;
/// Plaintext bytes per Noise message at most.
pub const PLAIN_MAX: usize = MSG_MAX - TAG_BYTES;

/// Kinds of the control records (never used by envelope records).
pub mod control {
    /// The first record on a link, each way: who the sender is ([`super::Hello`], postcard).
    pub const HELLO: u16 = 0xff01;
    /// A membership (SWIM) message.
    pub const MEMBERSHIP: u16 = 0xff02;
    /// An observer (`tim cluster status`) asks for the node's view.
    pub const STATUS_REQUEST: u16 = 0xff03;
    /// The node's view, as JSON text.
    pub const STATUS: u16 = 0xff04;
    /// Writes of the memory store's replica (a cluster on the memory store): postcard
    /// `ReplOp`s, one after another.
    pub const STORE_OPS: u16 = 0xff05;

    /// Whether `kind` is a control record's.
    pub fn is_control(kind: u16) -> bool {
        kind >= 0xff00
    }
}

/// Who is at the other end of a link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The node id; 0 for an observer (a tool asking for status, never a member).
    pub node: u16,
    /// When the node started (ms): a restarted node is a new incarnation of its id.
    pub incarnation: u64,
    pub shards: u16,
    /// Where it can be dialed; `None` for a node that only dials out.
    pub addr: Option<SocketAddr>,
}

/// The pre-shared key of a cluster secret.
pub fn psk(secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tim cluster v1\0");
    h.update(secret.as_bytes());
    h.finalize().into()
}

async fn send_msg(w: &mut (impl AsyncWriteExt + Unpin), msg: &[u8]) -> io::Result<()> {
    debug_assert!(msg.len() <= MSG_MAX);
    let mut b = Vec::with_capacity(2 + msg.len());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    w.write_all(&b).await
}

async fn recv_msg(r: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    r.read_exact(buf).await?;
    Ok(())
}

fn noise_err(e: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("noise: {e}"))
}

/// The two halves of an established link.
pub struct Link {
    pub reader: LinkReader,
    pub writer: LinkWriter,
    pub peer: Hello,
}

/// Run the handshake on `stream` and exchange hellos; `initiator` for the side that dialed.
pub async fn establish(
    mut stream: TcpStream,
    initiator: bool,
    psk: &[u8; 32],
    me: &Hello,
    timeout: Duration,
) -> io::Result<Link> {
    let _ = stream.set_nodelay(true);
    let run = async {
        let builder = snow::Builder::new(NOISE.parse().map_err(noise_err)?).psk(0, psk).map_err(noise_err)?;
        let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }
            .map_err(noise_err)?;
        let mut out = vec![0u8; MSG_MAX];
        let mut msg = Vec::new();
        if initiator {
            let n = hs.write_message(&[], &mut out).map_err(noise_err)?;
            send_msg(&mut stream, &out[..n]).await?;
            recv_msg(&mut stream, &mut msg).await?;
            hs.read_message(&msg, &mut out).map_err(noise_err)?;
        } else {
            recv_msg(&mut stream, &mut msg).await?;
            hs.read_message(&msg, &mut out).map_err(noise_err)?;
            let n = hs.write_message(&[], &mut out).map_err(noise_err)?;
            send_msg(&mut stream, &out[..n]).await?;
        }
        let noise = std::rc::Rc::new(hs.into_stateless_transport_mode().map_err(noise_err)?);
        let (rd, wr) = stream.into_split();
        let mut writer = LinkWriter { wr, noise: noise.clone(), nonce: 0, cipher: Vec::new() };
        let mut reader = LinkReader {
            rd,
            noise,
            nonce: 0,
            msg: Vec::new(),
            plain: vec![0; MSG_MAX],
            stream: BytesMut::new(),
        };
        let mut hello = BytesMut::new();
        put_record(&mut hello, control::HELLO, &postcard::to_allocvec(me).map_err(io::Error::other)?);
        writer.write(&hello).await?;
        let (kind, payload) = reader.next_record(4096).await?;
        if kind != control::HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the first record is not a hello"));
        }
        let peer: Hello = postcard::from_bytes(&payload[frame::HEADER_BYTES..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("hello: {e}")))?;
        Ok(Link { reader, writer, peer })
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "link handshake timed out"))?
}

/// Append a record of `kind` carrying `payload` (padded to 8) to `out`.
pub fn put_record(out: &mut impl BufMut, kind: u16, payload: &[u8]) {
    out.put_u32_le(payload.len() as u32);
    out.put_u16_le(kind);
    out.put_u16_le(0);
    out.put_slice(payload);
    out.put_bytes(0, frame::padded(payload.len()) - payload.len());
}

/// The receiving half: decrypts Noise messages into a stream and cuts records from it.
pub struct LinkReader {
    rd: OwnedReadHalf,
    noise: std::rc::Rc<StatelessTransportState>,
    nonce: u64,
    msg: Vec<u8>,
    plain: Vec<u8>,
    stream: BytesMut,
}

impl LinkReader {
    /// The next whole record (header included) and its kind; a record longer than
    /// `record_bytes_max` is an error (the link is then dropped).
    pub async fn next_record(&mut self, record_bytes_max: usize) -> io::Result<(u16, bytes::Bytes)> {
        loop {
            if self.stream.len() >= frame::HEADER_BYTES {
                let h = frame::Header::read(&self.stream);
                let total = frame::frame_bytes(h.len as usize);
                if total > record_bytes_max {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a record of {total} bytes (kind {:#x}) is over the limit", h.kind),
                    ));
                }
                if self.stream.len() >= total {
                    return Ok((h.kind, self.stream.split_to(total).freeze()));
                }
            }
            recv_msg(&mut self.rd, &mut self.msg).await?;
            let n = self.noise.read_message(self.nonce, &self.msg, &mut self.plain).map_err(noise_err)?;
            self.nonce += 1;
            self.stream.extend_from_slice(&self.plain[..n]);
        }
    }
}

/// The sending half: encrypts a batch of records into Noise messages and writes them at once.
pub struct LinkWriter {
    wr: OwnedWriteHalf,
    noise: std::rc::Rc<StatelessTransportState>,
    nonce: u64,
    cipher: Vec<u8>,
}

impl LinkWriter {
    /// Encrypt and write `plain` (whole records).
    pub async fn write(&mut self, plain: &[u8]) -> io::Result<()> {
        self.cipher.clear();
        for chunk in plain.chunks(PLAIN_MAX) {
            let at = self.cipher.len();
            self.cipher.resize(at + 2 + chunk.len() + TAG_BYTES, 0);
            let n =
                self.noise.write_message(self.nonce, chunk, &mut self.cipher[at + 2..]).map_err(noise_err)?;
            self.nonce += 1;
            self.cipher[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            self.cipher.truncate(at + 2 + n);
        }
        self.wr.write_all(&self.cipher).await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: u16) -> Hello {
        Hello { node, incarnation: 7, shards: 2, addr: Some("127.0.0.1:1".parse().unwrap()) }
    }

    async fn pair(a_secret: &str, b_secret: &str) -> (io::Result<Link>, io::Result<Link>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (pa, pb) = (psk(a_secret), psk(b_secret));
        let t = Duration::from_secs(2);
        let dial = async move {
            let s = TcpStream::connect(addr).await.unwrap();
            establish(s, true, &pa, &hello(1), t).await
        };
        let accept = async move {
            let (s, _) = l.accept().await.unwrap();
            establish(s, false, &pb, &hello(2), t).await
        };
        tokio::join!(dial, accept)
    }

    /// Hellos cross, records of any size (over one Noise message) arrive whole and in order.
    #[test]
    fn records_cross_both_ways() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (a, b) = pair("a secret of 16+ bytes", "a secret of 16+ bytes").await;
            let (mut a, mut b) = (a.unwrap(), b.unwrap());
            assert_eq!((a.peer.node, b.peer.node), (2, 1));
            let mut batch = BytesMut::new();
            put_record(&mut batch, 7, b"small");
            put_record(&mut batch, 8, &vec![0xab; 200_000]);
            put_record(&mut batch, control::STATUS, b"{}");
            a.writer.write(&batch).await.unwrap();
            let (k1, r1) = b.reader.next_record(1 << 20).await.unwrap();
            let (k2, r2) = b.reader.next_record(1 << 20).await.unwrap();
            let (k3, _) = b.reader.next_record(1 << 20).await.unwrap();
            assert_eq!((k1, k2, k3), (7, 8, control::STATUS));
            assert_eq!(&r1[8..13], b"small");
            assert_eq!(r2.len(), 8 + 200_000);
            assert!(r2[8..].iter().all(|&x| x == 0xab));
            let mut back = BytesMut::new();
            put_record(&mut back, 9, b"back");
            b.writer.write(&back).await.unwrap();
            assert_eq!(a.reader.next_record(1 << 20).await.unwrap().0, 9);
            // Over the limit: an error, not a huge allocation.
            a.writer.write(&batch).await.unwrap();
            b.reader.next_record(1 << 20).await.unwrap();
            assert!(b.reader.next_record(1024).await.is_err());
        });
    }

    /// A wrong secret fails the handshake on both sides.
    #[test]
    fn wrong_secret_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (a, b) = pair("a secret of 16+ bytes", "another secret, 16+ b").await;
            assert!(a.is_err() && b.is_err());
        });
    }
}
