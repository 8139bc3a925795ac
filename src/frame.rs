//! Framing: an 8-byte header (payload length u32 LE, kind u16 LE, flags u16 LE), the payload, and
//! zero padding up to a multiple of 8. Every frame is a multiple of 8 bytes long, so in a buffer
//! that starts 8-aligned every payload starts 8-aligned too, which is what rkyv needs to read an
//! archive in place.
//!
//! Key types: [`Header`], [`AlignedBuf`] (an aligned byte buffer, used as read buffer),
//! [`Parsed`] (what [`parse`] finds at the front of a buffer), [`encode`].

use rkyv::{
    api::high::{HighSerializer, HighValidator},
    bytecheck::CheckBytes,
    rancor,
    util::AlignedVec,
    Archive, Portable, Serialize,
};

pub const HEADER_BYTES: usize = 8;
/// Alignment of payloads in read buffers.
pub const ALIGN: usize = 8;

/// Length of a payload once padded.
#[inline]
pub const fn padded(len: usize) -> usize {
    (len + (ALIGN - 1)) & !(ALIGN - 1)
}

/// Bytes a frame with a `len`-byte payload takes on the wire.
#[inline]
pub const fn frame_bytes(len: usize) -> usize {
    HEADER_BYTES + padded(len)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: u16,
    pub flags: u16,
}

impl Header {
    #[inline]
    pub fn read(b: &[u8]) -> Header {
        Header {
            len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            kind: u16::from_le_bytes([b[4], b[5]]),
            flags: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    #[inline]
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..6].copy_from_slice(&self.kind.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
    }
}

/// What the front of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame: its header and the total bytes it takes (header + padded payload).
    Frame(Header, usize),
    /// Not enough bytes yet; `need` is the total the frame will take once known (0 if the header
    /// itself is incomplete).
    Partial { need: usize },
    /// The header announces a payload over the cap.
    TooLarge(Header),
    /// The header's flags are not zero.
    BadFlags(Header),
}

/// Look at the front of `buf` (which must start 8-aligned inside its allocation).
#[inline]
pub fn parse(buf: &[u8], frame_bytes_max: usize) -> Parsed {
    if buf.len() < HEADER_BYTES {
        return Parsed::Partial { need: 0 };
    }
    let h = Header::read(buf);
    if h.len as usize > frame_bytes_max {
        return Parsed::TooLarge(h);
    }
    if h.flags != 0 {
        return Parsed::BadFlags(h);
    }
    let total = frame_bytes(h.len as usize);
    if buf.len() < total {
        return Parsed::Partial { need: total };
    }
    Parsed::Frame(h, total)
}

/// Validate `payload` as an archive of `T` (bytecheck) and return a reference into it.
#[inline]
pub fn access<T>(payload: &[u8]) -> Result<&T, rancor::Error>
where
    T: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    rkyv::access::<T, rancor::Error>(payload)
}

/// Append a whole frame of `kind` with `value`'s archive as payload to `out`.
pub fn encode_into<T>(kind: u16, value: &T, out: &mut Vec<u8>)
where
    T: Archive
        + for<'a> Serialize<HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>>,
{
    let start = out.len();
    debug_assert!(start.is_multiple_of(ALIGN));
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    // The payload is serialized after the header; rkyv aligns relative to the writer's start, and
    // the header is 8 bytes, so payload-relative alignment holds too.
    let mut body = std::mem::take(out);
    body = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, body)
        .expect("serializing into a Vec cannot fail");
    *out = body;
    let len = out.len() - start - HEADER_BYTES;
    out.resize(start + frame_bytes(len), 0);
    Header { len: len as u32, kind, flags: 0 }.write(&mut out[start..start + HEADER_BYTES]);
}

/// A whole frame of `kind` with `value`'s archive as payload.
pub fn encode<T>(kind: u16, value: &T) -> Vec<u8>
where
    T: Archive
        + for<'a> Serialize<HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>>,
{
    let mut out = Vec::with_capacity(64);
    encode_into(kind, value, &mut out);
    out
}

/// A whole frame of `kind` around `payload` (a stored archive, copied once), padded.
pub fn whole(kind: u16, payload: &[u8]) -> bytes::Bytes {
    raw(kind, &[payload])
}

/// A whole frame of `kind` whose payload is `pieces`, one after another, padded.
pub fn raw(kind: u16, pieces: &[&[u8]]) -> bytes::Bytes {
    use bytes::BufMut;
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let mut f = bytes::BytesMut::with_capacity(frame_bytes(len));
    f.put_u32_le(len as u32);
    f.put_u16_le(kind);
    f.put_u16_le(0);
    for p in pieces {
        f.put_slice(p);
    }
    f.put_bytes(0, padded(len) - len);
    f.freeze()
}

/// The payload length a whole frame's header gives.
pub fn payload_len(frame: &[u8]) -> usize {
    u32::from_le_bytes(frame[0..4].try_into().expect("a frame header")) as usize
}

/// The kind a whole frame's header gives.
pub fn kind_of(frame: &[u8]) -> u16 {
    u16::from_le_bytes([frame[4], frame[5]])
}

/// A whole frame of `kind` with an empty payload (the header alone).
pub fn encode_empty(kind: u16) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_BYTES];
    Header { len: 0, kind, flags: 0 }.write(&mut out);
    out
}

/// A fixed-capacity byte buffer whose start is 16-aligned. Holds bytes `[start, end)`; reads go
/// into the spare tail `[end, capacity)`.
///
/// Backed by rkyv's `AlignedVec`, zero-filled once when made, so that every byte is initialized
/// and this type needs no unsafe code of its own.
pub struct AlignedBuf {
    bytes: AlignedVec<{ AlignedBuf::BUF_ALIGN }>,
    pub start: usize,
    pub end: usize,
}

impl AlignedBuf {
    const BUF_ALIGN: usize = 16;

    pub fn new(cap: usize) -> AlignedBuf {
        assert!(cap > 0 && cap.is_multiple_of(ALIGN));
        let mut bytes = AlignedVec::with_capacity(cap);
        bytes.resize(cap, 0);
        AlignedBuf { bytes, start: 0, end: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.bytes.len()
    }

    /// A buffer holding a copy of `b`.
    pub fn copy_of(b: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(padded(b.len().max(1)));
        buf.spare()[..b.len()].copy_from_slice(b);
        buf.end = b.len();
        buf
    }

    /// The filled part.
    #[inline]
    pub fn filled(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// The free tail, to read into.
    #[inline]
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.bytes[self.end..]
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Move the filled part to the front (keeps 8-alignment because `start` is a frame boundary).
    pub fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        debug_assert!(self.start.is_multiple_of(ALIGN));
        self.bytes.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{kind, ArchivedSend, Logout, Send};

    /// A frame round-trips through encode, parse and validated access, and is 8-byte padded.
    #[test]
    fn round_trip() {
        let msg = Send { conv: 1, flags: 0, burn_secs: 0, to: 7, client_msg_id: 9, body: b"hello".to_vec() };
        let f = encode(kind::SEND, &msg);
        assert_eq!(f.len() % 8, 0);
        let mut buf = AlignedBuf::new(1024);
        buf.spare()[..f.len()].copy_from_slice(&f);
        buf.end = f.len();
        let Parsed::Frame(h, total) = parse(buf.filled(), 1 << 20) else { panic!() };
        assert_eq!((h.kind, total), (kind::SEND, f.len()));
        let payload = &buf.filled()[HEADER_BYTES..HEADER_BYTES + h.len as usize];
        let a = access::<ArchivedSend>(payload).unwrap();
        assert_eq!((a.to.to_native(), a.client_msg_id.to_native()), (7, 9));
        assert_eq!(a.body.as_slice(), b"hello");
        // an empty-ish struct still encodes a valid payload
        let f = encode(kind::LOGOUT, &Logout { reserved: 0 });
        assert_eq!(f.len(), 16);
    }

    /// The read buffer: reads land in the spare tail, compaction moves the unread rest to the
    /// (16-aligned) front, and a cleared buffer offers its whole capacity again.
    #[test]
    fn aligned_buf_cursors() {
        let mut buf = AlignedBuf::new(64);
        assert_eq!((buf.capacity(), buf.spare().len()), (64, 64));
        assert_eq!(buf.filled().as_ptr() as usize % 16, 0);
        buf.spare()[..24].copy_from_slice(&[7u8; 24]);
        buf.end = 24;
        buf.start = 16;
        buf.compact();
        assert_eq!((buf.start, buf.end, buf.filled()), (0, 8, &[7u8; 8][..]));
        assert_eq!(buf.spare().len(), 56);
        buf.start = 8;
        assert!(buf.is_empty());
        buf.clear();
        assert_eq!(buf.spare().len(), 64);
    }

    /// Oversized, flagged and incomplete headers are recognised before any payload is read.
    #[test]
    fn parse_rejects() {
        let mut h = [0u8; 8];
        Header { len: 100, kind: 6, flags: 0 }.write(&mut h);
        assert_eq!(parse(&h, 99), Parsed::TooLarge(Header { len: 100, kind: 6, flags: 0 }));
        assert_eq!(parse(&h, 100), Parsed::Partial { need: 8 + 104 });
        assert_eq!(parse(&h[..5], 100), Parsed::Partial { need: 0 });
        Header { len: 0, kind: 6, flags: 1 }.write(&mut h);
        assert!(matches!(parse(&h, 100), Parsed::BadFlags(_)));
    }
}
