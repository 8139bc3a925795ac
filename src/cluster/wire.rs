//! Envelopes on a node link: [`encode`] appends one [`Envelope`] for a shard of the receiving
//! node to a batch as one record; [`decode`] takes the next whole record off the front of a batch
//! read from the link. The link below (encryption, authentication) sees only these bytes.
//!
//! # Record layout
//!
//! A record is a frame of the client protocol's format (see [`crate::frame`]), 8-aligned and a
//! multiple of 8 bytes long:
//!
//! | bytes       | field                                                                  |
//! |-------------|------------------------------------------------------------------------|
//! | 0..4        | payload length in bytes, u32 LE (the archive, without padding)         |
//! | 4..6        | kind, u16 LE: [`ENVELOPE_KIND`] (any other kind is refused)            |
//! | 6..8        | destination shard on the receiving node, u16 LE                        |
//! | 8..8+len    | payload: the rkyv 0.8 archive of a `WireEnvelope` (root at its end)    |
//! | ..          | zero padding up to a multiple of 8 (checked: non-zero is refused)      |
//!
//! Within the payload, rkyv puts the out-of-line parts (frames, lists, strings) first and the
//! root last: the root is the payload's final 72 bytes, 8-aligned, opening with the variant's u8
//! tag; relative pointers in it point back into the payload.
//!
//! The shard sits in the header, where a client frame keeps its (zero) flags, so that a link
//! reader can route a record without reading its archive. `WireEnvelope` mirrors [`Envelope`]
//! variant for variant, in the same order (the archive's u8 tag is the variant's index):
//! frames are rkyv `Vec<u8>`s, a [`SessionRef`] is its u64, a user id a u64, an [`ErrorCode`]
//! its u16 (an unknown code is refused), a [`DeviceType`] its u8, and a `Result` an explicit
//! two-variant enum (tag 0: ok, tag 1: error code). A `Submit`'s group change never crosses
//! nodes: a group's notices are made and sequenced on one shard, so [`encode`] refuses one.
//!
//! # Alignment and copies
//!
//! rkyv reads an archive in place only from an 8-aligned address. Records are multiples of 8
//! bytes, so in a batch whose start is 8-aligned every payload is too: [`decode`] then validates
//! the archive in place (bytecheck, once per record) and hands out the envelope's `Bytes` frames
//! as slices of the batch, without a copy. If the batch does not start 8-aligned, the payload is
//! first copied once into an aligned buffer, and the frames are slices of that copy. The
//! `BytesMut` frames of an envelope (`Submit.frame`, `RoomOp::Publish`'s frame) are copied once
//! in either case. A frame shared with a batch keeps the whole batch's memory alive while it is
//! queued somewhere. [`encode`] writes frames straight from the envelope into the batch.
//!
//! Key items: [`encode`], [`decode`], [`WireError`], [`ENVELOPE_KIND`].

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rkyv::{
    rancor::{self, Fallible},
    ser::{Allocator, Writer},
    util::AlignedVec,
    vec::{ArchivedVec, VecResolver},
    with::{ArchiveWith, AsString, AsVec, Inline, SerializeWith},
    Archive, Archived, Place, Serialize,
};

use crate::{
    envelope::{
        AckInfo, Attach, DeliverMany, Envelope, GroupFanout, GroupOp, GroupRequest, RoomOp, RoomRequest,
        SessionRef, Submit,
    },
    frame::{self, Header, ALIGN, HEADER_BYTES},
    protocol::{DeviceType, ErrorCode, GroupProfile},
};

/// The header kind of an envelope record (kinds are per link, not the client protocol's).
pub const ENVELOPE_KIND: u16 = 1;

/// What was wrong with an envelope to encode or a record read from a link. A decoding error
/// means the link's byte stream cannot be trusted any further: drop the link.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("record of {bytes} bytes is over the cap of {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    #[error("record payload is not a valid envelope archive: {0}")]
    Invalid(rancor::Error),
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    #[error("unknown device type {0}")]
    UnknownDeviceType(u8),
    #[error("a Submit carrying a group change never crosses nodes")]
    GroupChange,
    #[error("a gateway envelope or a placement table never crosses nodes")]
    LocalOnly,
    #[error("an envelope archive of {0} bytes does not fit a record")]
    EncodeTooLarge(usize),
    #[error("serializing an envelope failed: {0}")]
    Serialize(rancor::Error),
}

// ---- the wire mirror of `Envelope` ----

/// [`Envelope`], borrowed from the envelope being encoded; see the module doc for the mapping.
#[derive(Archive, Serialize)]
enum WireEnvelope<'a> {
    Submit {
        origin: u64,
        sender: u64,
        to: u64,
        conv: u8,
        client_msg_id: u64,
        sender_device: u64,
        stream: bool,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
        refuse_new: Option<u16>,
    },
    Acked {
        session: u64,
        client_msg_id: u64,
        msg_id: u64,
        seq: u64,
        ts_ms: u64,
        duplicate: bool,
    },
    Rejected {
        session: u64,
        client_msg_id: u64,
        code: u16,
    },
    Fanout {
        user: u64,
        skip: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    Deliver {
        session: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    Attach {
        user: u64,
        session: u64,
        device_type: u8,
        token: Option<[u8; 32]>,
        #[rkyv(with = AsString)]
        device_id: &'a str,
    },
    AttachResult {
        session: u64,
        user: u64,
        result: UnitOrCode,
    },
    Detach {
        user: u64,
        session: u64,
    },
    Kick {
        session: u64,
        reason: u16,
    },
    StoreToken {
        user: u64,
        session: u64,
        hash: [u8; 32],
        expires_at_ms: u64,
    },
    TokenResult {
        session: u64,
        result: UnitOrCode,
    },
    StreamFanout {
        user: u64,
        skip: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    StreamDeliver {
        session: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    StreamRefused {
        session: u64,
        client_msg_id: u64,
        code: u16,
    },
    Room {
        origin: u64,
        user: u64,
        room: u64,
        op: WireRoomOp<'a>,
    },
    RoomReply {
        session: u64,
        room: u64,
        request_kind: u16,
        result: CountOrCode,
    },
    RoomFanout {
        room: u64,
        skip: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    RoomClosed {
        room: u64,
        reason: u16,
    },
    Group {
        origin: u64,
        user: u64,
        group: u64,
        op: WireGroupOp<'a>,
    },
    GroupReply {
        session: u64,
        request_kind: u16,
        result: FrameOrCode<'a>,
    },
    GroupFanout {
        #[rkyv(with = AsVec)]
        users: &'a [u64],
        skip: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
        lossy: bool,
    },
    DeliverMany {
        #[rkyv(with = SessionList)]
        sessions: &'a [SessionRef],
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
        lossy: bool,
    },
    Reattach {
        user: u64,
        session: u64,
        device_type: u8,
        #[rkyv(with = AsString)]
        device_id: &'a str,
        login_ms: u64,
    },
    Sessions {
        user: u64,
        origin: u64,
        logout: u64,
    },
    Ban {
        user: u64,
        until_ms: u64,
    },
    Pair {
        a: u64,
        b: u64,
        flags: u8,
        origin: u64,
    },
    /// A [`crate::envelope::PresenceMsg`] as postcard (rare, and of varied shapes).
    Presence {
        user: u64,
        #[rkyv(with = AsVec)]
        msg: &'a [u8],
    },
}

/// [`RoomOp`].
#[derive(Archive, Serialize)]
enum WireRoomOp<'a> {
    Create {
        publish: u8,
        subscribers_max: u32,
        #[rkyv(with = AsVec)]
        publishers: &'a [u64],
    },
    Subscribe,
    Unsubscribe {
        reply: bool,
    },
    Publish {
        client_msg_id: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    Delete,
}

/// [`GroupOp`].
#[derive(Archive, Serialize)]
enum WireGroupOp<'a> {
    Create {
        #[rkyv(with = Inline)]
        profile: &'a GroupProfile,
    },
    Update {
        #[rkyv(with = Inline)]
        profile: &'a GroupProfile,
    },
    Action {
        action: u8,
        target: u64,
        until_ms: u64,
        #[rkyv(with = AsString)]
        note: &'a str,
    },
    AddMembers {
        #[rkyv(with = AsVec)]
        users: &'a [u64],
    },
    Get,
    Members {
        after: u64,
        limit: u32,
    },
    Requests,
    Typing {
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    Read {
        seq: u64,
        device: u64,
        #[rkyv(with = AsVec)]
        frame: &'a [u8],
    },
    ReadGet {
        seq: u64,
    },
}

/// `Result<(), ErrorCode>`.
#[derive(Archive, Serialize)]
enum UnitOrCode {
    Ok,
    Err(u16),
}

/// `Result<u32, ErrorCode>`.
#[derive(Archive, Serialize)]
enum CountOrCode {
    Ok(u32),
    Err(u16),
}

/// `Result<Bytes, ErrorCode>`.
#[derive(Archive, Serialize)]
enum FrameOrCode<'a> {
    Ok(#[rkyv(with = AsVec)] &'a [u8]),
    Err(u16),
}

// The archive's shape (rkyv is pinned exactly; a change of its layout fails here, not on a link
// between nodes of two builds). Its alignment is the 8 every payload start gives.
const _: () = assert!(std::mem::align_of::<ArchivedWireEnvelope<'static>>() == ALIGN);
const _: () = assert!(std::mem::size_of::<ArchivedWireEnvelope<'static>>() == 72);

/// Archives `&[SessionRef]` as a `Vec<u64>` of the sessions' ids, without an intermediate vector.
struct SessionList;

impl ArchiveWith<&[SessionRef]> for SessionList {
    type Archived = ArchivedVec<Archived<u64>>;
    type Resolver = VecResolver;

    fn resolve_with(field: &&[SessionRef], resolver: VecResolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_len(field.len(), resolver, out);
    }
}

impl<S> SerializeWith<&[SessionRef], S> for SessionList
where
    S: Fallible + Allocator + Writer + ?Sized,
{
    fn serialize_with(field: &&[SessionRef], serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::<Archived<u64>>::serialize_from_iter::<u64, _, _>(field.iter().map(|s| s.0), serializer)
    }
}

// ---- encode ----

fn unit_or_code(r: &Result<(), ErrorCode>) -> UnitOrCode {
    match r {
        Ok(()) => UnitOrCode::Ok,
        Err(c) => UnitOrCode::Err(c.code()),
    }
}

impl<'a> WireEnvelope<'a> {
    fn from_envelope(env: &'a Envelope) -> Result<WireEnvelope<'a>, WireError> {
        Ok(match env {
            Envelope::Submit(s) => {
                if s.change.is_some() {
                    return Err(WireError::GroupChange);
                }
                WireEnvelope::Submit {
                    origin: s.origin.0,
                    sender: s.sender,
                    to: s.to,
                    conv: s.conv,
                    client_msg_id: s.client_msg_id,
                    sender_device: s.sender_device,
                    stream: s.stream,
                    frame: &s.frame,
                    refuse_new: s.refuse_new.map(ErrorCode::code),
                }
            }
            Envelope::Acked { session, ack } => WireEnvelope::Acked {
                session: session.0,
                client_msg_id: ack.client_msg_id,
                msg_id: ack.msg_id,
                seq: ack.seq,
                ts_ms: ack.ts_ms,
                duplicate: ack.duplicate,
            },
            Envelope::Rejected { session, client_msg_id, code } => WireEnvelope::Rejected {
                session: session.0,
                client_msg_id: *client_msg_id,
                code: code.code(),
            },
            Envelope::Fanout { user, skip, frame } => {
                WireEnvelope::Fanout { user: *user, skip: skip.0, frame }
            }
            Envelope::Deliver { session, frame } => WireEnvelope::Deliver { session: session.0, frame },
            Envelope::Attach(a) => WireEnvelope::Attach {
                user: a.user,
                session: a.session.0,
                device_type: a.device_type as u8,
                token: a.token,
                device_id: &a.device_id,
            },
            Envelope::AttachResult { session, user, result } => {
                WireEnvelope::AttachResult { session: session.0, user: *user, result: unit_or_code(result) }
            }
            Envelope::Detach { user, session } => WireEnvelope::Detach { user: *user, session: session.0 },
            Envelope::Kick { session, reason } => {
                WireEnvelope::Kick { session: session.0, reason: reason.code() }
            }
            Envelope::StoreToken { user, session, hash, expires_at_ms } => WireEnvelope::StoreToken {
                user: *user,
                session: session.0,
                hash: *hash,
                expires_at_ms: *expires_at_ms,
            },
            Envelope::TokenResult { session, result } => {
                WireEnvelope::TokenResult { session: session.0, result: unit_or_code(result) }
            }
            Envelope::StreamFanout { user, skip, frame } => {
                WireEnvelope::StreamFanout { user: *user, skip: skip.0, frame }
            }
            Envelope::StreamDeliver { session, frame } => {
                WireEnvelope::StreamDeliver { session: session.0, frame }
            }
            Envelope::StreamRefused { session, client_msg_id, code } => WireEnvelope::StreamRefused {
                session: session.0,
                client_msg_id: *client_msg_id,
                code: code.code(),
            },
            Envelope::Room(r) => WireEnvelope::Room {
                origin: r.origin.0,
                user: r.user,
                room: r.room,
                op: match &r.op {
                    RoomOp::Create { publish, subscribers_max, publishers } => WireRoomOp::Create {
                        publish: *publish,
                        subscribers_max: *subscribers_max,
                        publishers,
                    },
                    RoomOp::Subscribe => WireRoomOp::Subscribe,
                    RoomOp::Unsubscribe { reply } => WireRoomOp::Unsubscribe { reply: *reply },
                    RoomOp::Publish { client_msg_id, frame } => {
                        WireRoomOp::Publish { client_msg_id: *client_msg_id, frame }
                    }
                    RoomOp::Delete => WireRoomOp::Delete,
                },
            },
            Envelope::RoomReply { session, room, request_kind, result } => WireEnvelope::RoomReply {
                session: session.0,
                room: *room,
                request_kind: *request_kind,
                result: match result {
                    Ok(n) => CountOrCode::Ok(*n),
                    Err(c) => CountOrCode::Err(c.code()),
                },
            },
            Envelope::RoomFanout { room, skip, frame } => {
                WireEnvelope::RoomFanout { room: *room, skip: skip.0, frame }
            }
            Envelope::RoomClosed { room, reason } => {
                WireEnvelope::RoomClosed { room: *room, reason: *reason }
            }
            Envelope::Group(g) => WireEnvelope::Group {
                origin: g.origin.0,
                user: g.user,
                group: g.group,
                op: match &g.op {
                    GroupOp::Create(profile) => WireGroupOp::Create { profile },
                    GroupOp::Update(profile) => WireGroupOp::Update { profile },
                    GroupOp::Action { action, target, until_ms, note } => {
                        WireGroupOp::Action { action: *action, target: *target, until_ms: *until_ms, note }
                    }
                    GroupOp::AddMembers(users) => WireGroupOp::AddMembers { users },
                    GroupOp::Get => WireGroupOp::Get,
                    GroupOp::Members { after, limit } => {
                        WireGroupOp::Members { after: *after, limit: *limit }
                    }
                    GroupOp::Requests => WireGroupOp::Requests,
                    GroupOp::Typing(frame) => WireGroupOp::Typing { frame },
                    GroupOp::Read { seq, device, frame } => {
                        WireGroupOp::Read { seq: *seq, device: *device, frame }
                    }
                    GroupOp::ReadGet { seq } => WireGroupOp::ReadGet { seq: *seq },
                },
            },
            Envelope::GroupReply { session, request_kind, result } => WireEnvelope::GroupReply {
                session: session.0,
                request_kind: *request_kind,
                result: match result {
                    Ok(frame) => FrameOrCode::Ok(frame),
                    Err(c) => FrameOrCode::Err(c.code()),
                },
            },
            Envelope::GroupFanout(f) => {
                WireEnvelope::GroupFanout { users: &f.users, skip: f.skip.0, frame: &f.frame, lossy: f.lossy }
            }
            Envelope::DeliverMany(d) => {
                WireEnvelope::DeliverMany { sessions: &d.sessions, frame: &d.frame, lossy: d.lossy }
            }
            Envelope::Reattach { user, session, device_type, info } => WireEnvelope::Reattach {
                user: *user,
                session: session.0,
                device_type: *device_type as u8,
                device_id: &info.device_id,
                login_ms: info.login_ms,
            },
            Envelope::Sessions { user, origin, logout } => {
                WireEnvelope::Sessions { user: *user, origin: origin.0, logout: *logout }
            }
            Envelope::Ban { user, until_ms } => WireEnvelope::Ban { user: *user, until_ms: *until_ms },
            Envelope::Pair { conv, flags, origin } => {
                WireEnvelope::Pair { a: conv.0, b: conv.1, flags: *flags, origin: origin.0 }
            }
            Envelope::Presence { user, msg } => WireEnvelope::Presence { user: *user, msg },
            // A shard's envelope for its gateway, and the gateway's tables for its shards, stay
            // on their node.
            Envelope::Remote(_) | Envelope::Placement(_) | Envelope::Fence { .. } | Envelope::Admin(_) => {
                return Err(WireError::LocalOnly)
            }
        })
    }
}

/// One envelope for shard `shard` of the receiving node, appended to `out` as one record.
///
/// `out` must hold whole records only (its length a multiple of 8): the archive's alignment is
/// reckoned from the start of `out`. On an error `out` is left as it was.
pub fn encode(shard: u16, env: &Envelope, out: &mut Vec<u8>) -> Result<(), WireError> {
    assert!(out.len().is_multiple_of(ALIGN), "a link batch holds whole records only");
    let wire = WireEnvelope::from_envelope(env)?;
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    if let Err(e) = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&wire, &mut *out) {
        out.truncate(start);
        return Err(WireError::Serialize(e));
    }
    let len = out.len() - start - HEADER_BYTES;
    let Ok(len32) = u32::try_from(len) else {
        out.truncate(start);
        return Err(WireError::EncodeTooLarge(len));
    };
    out.resize(start + frame::frame_bytes(len), 0);
    Header { len: len32, kind: ENVELOPE_KIND, flags: shard }.write(&mut out[start..start + HEADER_BYTES]);
    Ok(())
}

// ---- decode ----

/// The next whole record at the start of `buf` (a batch read from the link, shared): the
/// destination shard, the envelope, and the record's length in bytes. `Ok(None)`: `buf` holds no
/// whole record yet (read more). A record over `record_bytes_max` bytes (header and padding
/// included) is refused as soon as its header is in. Frames inside the envelope are `Bytes`
/// slices of `buf` (zero copy) where the envelope holds `Bytes`, and copied once where it holds
/// `BytesMut`; see the module doc for a batch that does not start 8-aligned.
pub fn decode(buf: &Bytes, record_bytes_max: usize) -> Result<Option<(u16, Envelope, usize)>, WireError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let h = Header::read(buf);
    let len = h.len as usize;
    let bytes = frame::frame_bytes(len);
    if bytes > record_bytes_max {
        return Err(WireError::TooLarge { bytes, max: record_bytes_max });
    }
    if h.kind != ENVELOPE_KIND {
        return Err(WireError::UnknownKind(h.kind));
    }
    if buf.len() < bytes {
        return Ok(None);
    }
    let payload_end = HEADER_BYTES + len;
    if buf[payload_end..bytes].iter().any(|&b| b != 0) {
        return Err(WireError::Malformed("padding is not zero"));
    }
    let payload = if (buf.as_ptr() as usize).is_multiple_of(ALIGN) {
        buf.slice(HEADER_BYTES..payload_end)
    } else {
        let mut aligned = AlignedVec::<{ ALIGN }>::with_capacity(len);
        aligned.extend_from_slice(&buf[HEADER_BYTES..payload_end]);
        Bytes::from_owner(aligned)
    };
    let archived =
        rkyv::access::<ArchivedWireEnvelope<'_>, rancor::Error>(&payload).map_err(WireError::Invalid)?;
    let env = envelope(archived, &payload)?;
    Ok(Some((h.flags, env, bytes)))
}

fn code(v: &Archived<u16>) -> Result<ErrorCode, WireError> {
    let v = v.to_native();
    ErrorCode::from_u16(v).ok_or(WireError::UnknownErrorCode(v))
}

fn session(v: &Archived<u64>) -> SessionRef {
    SessionRef(v.to_native())
}

fn users(v: &[Archived<u64>]) -> impl Iterator<Item = u64> + '_ {
    v.iter().map(|u| u.to_native())
}

/// `part`, a slice of the validated archive in `payload`, as a `Bytes` sharing `payload`.
fn shared(payload: &Bytes, part: &[u8]) -> Result<Bytes, WireError> {
    if part.is_empty() {
        return Ok(Bytes::new());
    }
    // bytecheck keeps every slice inside the archive; checked anyway, as it costs nothing.
    let start = (part.as_ptr() as usize).wrapping_sub(payload.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= payload.len() => Ok(payload.slice(start..end)),
        _ => Err(WireError::Malformed("a frame lies outside its record")),
    }
}

fn unit_result(r: &ArchivedUnitOrCode) -> Result<Result<(), ErrorCode>, WireError> {
    Ok(match r {
        ArchivedUnitOrCode::Ok => Ok(()),
        ArchivedUnitOrCode::Err(c) => Err(code(c)?),
    })
}

fn profile(p: &<GroupProfile as Archive>::Archived) -> Result<GroupProfile, WireError> {
    rkyv::deserialize::<GroupProfile, rancor::Error>(p).map_err(WireError::Invalid)
}

/// The envelope of a validated archive; `payload` is the buffer the archive lies in.
fn envelope(a: &ArchivedWireEnvelope<'_>, payload: &Bytes) -> Result<Envelope, WireError> {
    use ArchivedWireEnvelope as W;
    Ok(match a {
        W::Submit { origin, sender, to, conv, client_msg_id, sender_device, stream, frame, refuse_new } => {
            Envelope::Submit(Box::new(Submit {
                origin: session(origin),
                sender: sender.to_native(),
                to: to.to_native(),
                conv: *conv,
                client_msg_id: client_msg_id.to_native(),
                sender_device: sender_device.to_native(),
                stream: *stream,
                frame: BytesMut::from(frame.as_slice()),
                change: None,
                refuse_new: match refuse_new.as_ref() {
                    Some(c) => Some(code(c)?),
                    None => None,
                },
                // Set by a group owner for its own shard only.
                by_manager: false,
            }))
        }
        W::Acked { session: s, client_msg_id, msg_id, seq, ts_ms, duplicate } => Envelope::Acked {
            session: session(s),
            ack: AckInfo {
                client_msg_id: client_msg_id.to_native(),
                msg_id: msg_id.to_native(),
                seq: seq.to_native(),
                ts_ms: ts_ms.to_native(),
                duplicate: *duplicate,
            },
        },
        W::Rejected { session: s, client_msg_id, code: c } => Envelope::Rejected {
            session: session(s),
            client_msg_id: client_msg_id.to_native(),
            code: code(c)?,
        },
        W::Fanout { user, skip, frame } => {
            Envelope::Fanout { user: user.to_native(), skip: session(skip), frame: shared(payload, frame)? }
        }
        W::Deliver { session: s, frame } => {
            Envelope::Deliver { session: session(s), frame: shared(payload, frame)? }
        }
        W::Attach { user, session: s, device_type, token, device_id } => Envelope::Attach(Box::new(Attach {
            device_id: device_id.as_str().to_owned(),
            user: user.to_native(),
            session: session(s),
            device_type: DeviceType::from_u8(*device_type)
                .ok_or(WireError::UnknownDeviceType(*device_type))?,
            token: token.as_ref().copied(),
        })),
        W::AttachResult { session: s, user, result } => Envelope::AttachResult {
            session: session(s),
            user: user.to_native(),
            result: unit_result(result)?,
        },
        W::Detach { user, session: s } => Envelope::Detach { user: user.to_native(), session: session(s) },
        W::Kick { session: s, reason } => Envelope::Kick { session: session(s), reason: code(reason)? },
        W::StoreToken { user, session: s, hash, expires_at_ms } => Envelope::StoreToken {
            user: user.to_native(),
            session: session(s),
            hash: *hash,
            expires_at_ms: expires_at_ms.to_native(),
        },
        W::TokenResult { session: s, result } => {
            Envelope::TokenResult { session: session(s), result: unit_result(result)? }
        }
        W::StreamFanout { user, skip, frame } => Envelope::StreamFanout {
            user: user.to_native(),
            skip: session(skip),
            frame: shared(payload, frame)?,
        },
        W::StreamDeliver { session: s, frame } => {
            Envelope::StreamDeliver { session: session(s), frame: shared(payload, frame)? }
        }
        W::StreamRefused { session: s, client_msg_id, code: c } => Envelope::StreamRefused {
            session: session(s),
            client_msg_id: client_msg_id.to_native(),
            code: code(c)?,
        },
        W::Room { origin, user, room, op } => Envelope::Room(Box::new(RoomRequest {
            origin: session(origin),
            user: user.to_native(),
            room: room.to_native(),
            op: match op {
                ArchivedWireRoomOp::Create { publish, subscribers_max, publishers } => RoomOp::Create {
                    publish: *publish,
                    subscribers_max: subscribers_max.to_native(),
                    publishers: users(publishers).collect(),
                },
                ArchivedWireRoomOp::Subscribe => RoomOp::Subscribe,
                ArchivedWireRoomOp::Unsubscribe { reply } => RoomOp::Unsubscribe { reply: *reply },
                ArchivedWireRoomOp::Publish { client_msg_id, frame } => RoomOp::Publish {
                    client_msg_id: client_msg_id.to_native(),
                    frame: BytesMut::from(frame.as_slice()),
                },
                ArchivedWireRoomOp::Delete => RoomOp::Delete,
            },
        })),
        W::RoomReply { session: s, room, request_kind, result } => Envelope::RoomReply {
            session: session(s),
            room: room.to_native(),
            request_kind: request_kind.to_native(),
            result: match result {
                ArchivedCountOrCode::Ok(n) => Ok(n.to_native()),
                ArchivedCountOrCode::Err(c) => Err(code(c)?),
            },
        },
        W::RoomFanout { room, skip, frame } => Envelope::RoomFanout {
            room: room.to_native(),
            skip: session(skip),
            frame: shared(payload, frame)?,
        },
        W::RoomClosed { room, reason } => {
            Envelope::RoomClosed { room: room.to_native(), reason: reason.to_native() }
        }
        W::Group { origin, user, group, op } => Envelope::Group(Box::new(GroupRequest {
            origin: session(origin),
            user: user.to_native(),
            group: group.to_native(),
            op: match op {
                ArchivedWireGroupOp::Create { profile: p } => GroupOp::Create(profile(p)?),
                ArchivedWireGroupOp::Update { profile: p } => GroupOp::Update(profile(p)?),
                ArchivedWireGroupOp::Action { action, target, until_ms, note } => GroupOp::Action {
                    action: *action,
                    target: target.to_native(),
                    until_ms: until_ms.to_native(),
                    note: note.as_str().to_owned(),
                },
                ArchivedWireGroupOp::AddMembers { users: u } => GroupOp::AddMembers(users(u).collect()),
                ArchivedWireGroupOp::Get => GroupOp::Get,
                ArchivedWireGroupOp::Members { after, limit } => {
                    GroupOp::Members { after: after.to_native(), limit: limit.to_native() }
                }
                ArchivedWireGroupOp::Requests => GroupOp::Requests,
                ArchivedWireGroupOp::Typing { frame } => GroupOp::Typing(shared(payload, frame)?),
                ArchivedWireGroupOp::Read { seq, device, frame } => GroupOp::Read {
                    seq: seq.to_native(),
                    device: device.to_native(),
                    frame: shared(payload, frame)?,
                },
                ArchivedWireGroupOp::ReadGet { seq } => GroupOp::ReadGet { seq: seq.to_native() },
            },
        })),
        W::GroupReply { session: s, request_kind, result } => Envelope::GroupReply {
            session: session(s),
            request_kind: request_kind.to_native(),
            result: match result {
                ArchivedFrameOrCode::Ok(frame) => Ok(shared(payload, frame)?),
                ArchivedFrameOrCode::Err(c) => Err(code(c)?),
            },
        },
        W::GroupFanout { users: u, skip, frame, lossy } => Envelope::GroupFanout(Box::new(GroupFanout {
            users: users(u).collect::<Arc<[u64]>>(),
            skip: session(skip),
            frame: shared(payload, frame)?,
            lossy: *lossy,
        })),
        W::DeliverMany { sessions, frame, lossy } => Envelope::DeliverMany(Box::new(DeliverMany {
            sessions: sessions.iter().map(session).collect(),
            frame: shared(payload, frame)?,
            lossy: *lossy,
        })),
        W::Reattach { user, session: s, device_type, device_id, login_ms } => Envelope::Reattach {
            user: user.to_native(),
            session: session(s),
            device_type: DeviceType::from_u8(*device_type)
                .ok_or(WireError::UnknownDeviceType(*device_type))?,
            info: Box::new(crate::envelope::DeviceInfo {
                device_id: device_id.as_str().to_owned(),
                login_ms: login_ms.to_native(),
            }),
        },
        W::Sessions { user, origin, logout } => {
            Envelope::Sessions { user: user.to_native(), origin: session(origin), logout: logout.to_native() }
        }
        W::Ban { user, until_ms } => Envelope::Ban { user: user.to_native(), until_ms: until_ms.to_native() },
        W::Pair { a, b, flags, origin } => {
            Envelope::Pair { conv: (a.to_native(), b.to_native()), flags: *flags, origin: session(origin) }
        }
        W::Presence { user, msg } => {
            Envelope::Presence { user: user.to_native(), msg: shared(payload, msg)? }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::GroupChange;

    const MAX: usize = 1 << 20;

    fn frame_of(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    fn b(tag: u8, len: usize) -> Bytes {
        Bytes::from(frame_of(tag, len))
    }

    fn bm(tag: u8, len: usize) -> BytesMut {
        BytesMut::from(&frame_of(tag, len)[..])
    }

    fn s(v: u64) -> SessionRef {
        SessionRef(v)
    }

    fn submit(change: Option<Arc<GroupChange>>, refuse_new: Option<ErrorCode>) -> Envelope {
        Envelope::Submit(Box::new(Submit {
            origin: SessionRef::new(3, 77),
            sender: 11,
            to: 12,
            conv: 2,
            client_msg_id: 13,
            sender_device: 0xdead_beef,
            stream: true,
            frame: bm(1, 61),
            change,
            refuse_new,
            by_manager: false,
        }))
    }

    fn profile(n: u8) -> GroupProfile {
        GroupProfile {
            name: format!("group {n}"),
            topic: "topic ü".into(),
            avatar_url: String::new(),
            extra: vec![n; 5],
            join_policy: 1,
            invite_policy: n,
        }
    }

    fn room(op: RoomOp) -> Envelope {
        Envelope::Room(Box::new(RoomRequest { origin: s(1 << 48 | 5), user: 6, room: 7, op }))
    }

    fn group(op: GroupOp) -> Envelope {
        Envelope::Group(Box::new(GroupRequest { origin: s(9), user: 10, group: 1 << 62, op }))
    }

    /// One envelope of every variant (and of every room and group op), with distinct values.
    fn every_variant() -> Vec<Envelope> {
        vec![
            Envelope::Reattach {
                user: 42,
                session: SessionRef::on(5, 3, 9),
                device_type: DeviceType::Web,
                info: Box::new(crate::envelope::DeviceInfo { device_id: "laptop".into(), login_ms: 17 }),
            },
            Envelope::Sessions { user: 44, origin: SessionRef::on(5, 3, 10), logout: 12 },
            Envelope::Ban { user: 43, until_ms: 1_767_225_600_000 },
            Envelope::Pair { conv: (44, 45), flags: 5, origin: SessionRef::on(5, 3, 11) },
            Envelope::Presence { user: 46, msg: Bytes::from_static(b"postcard") },
            submit(None, None),
            submit(None, Some(ErrorCode::Muted)),
            Envelope::Acked {
                session: s(1),
                ack: AckInfo { client_msg_id: 2, msg_id: 3, seq: 4, ts_ms: 5, duplicate: true },
            },
            Envelope::Rejected { session: s(2), client_msg_id: 3, code: ErrorCode::BodyTooLarge },
            Envelope::Fanout { user: 4, skip: SessionRef::NONE, frame: b(2, 40) },
            Envelope::Deliver { session: s(5), frame: b(3, 8) },
            Envelope::Deliver { session: s(5), frame: Bytes::new() },
            Envelope::Attach(Box::new(Attach {
                user: 6,
                session: s(7),
                device_type: DeviceType::Tablet,
                device_id: "phone of ann".into(),
                token: Some([9; 32]),
            })),
            Envelope::Attach(Box::new(Attach {
                user: 6,
                session: s(7),
                device_type: DeviceType::Web,
                device_id: String::new(),
                token: None,
            })),
            Envelope::AttachResult { session: s(8), user: 9, result: Ok(()) },
            Envelope::AttachResult { session: s(8), user: 9, result: Err(ErrorCode::DeviceLimit) },
            Envelope::Detach { user: 10, session: s(11) },
            Envelope::Kick { session: s(12), reason: ErrorCode::Replaced },
            Envelope::StoreToken { user: 13, session: s(14), hash: [0xab; 32], expires_at_ms: 15 },
            Envelope::TokenResult { session: s(16), result: Err(ErrorCode::TooManyTokens) },
            Envelope::TokenResult { session: s(16), result: Ok(()) },
            Envelope::StreamFanout { user: 17, skip: s(18), frame: b(4, 19) },
            Envelope::StreamDeliver { session: s(20), frame: b(5, 21) },
            Envelope::StreamRefused { session: s(22), client_msg_id: 23, code: ErrorCode::Busy },
            room(RoomOp::Create { publish: 1, subscribers_max: 500, publishers: vec![1, 2, 3] }),
            room(RoomOp::Subscribe),
            room(RoomOp::Unsubscribe { reply: true }),
            room(RoomOp::Publish { client_msg_id: 24, frame: bm(6, 45) }),
            room(RoomOp::Delete),
            Envelope::RoomReply { session: s(25), room: 26, request_kind: 21, result: Ok(27) },
            Envelope::RoomReply {
                session: s(25),
                room: 26,
                request_kind: 21,
                result: Err(ErrorCode::RoomFull),
            },
            Envelope::RoomFanout { room: 28, skip: s(29), frame: b(7, 30) },
            Envelope::RoomClosed { room: 31, reason: 2 },
            group(GroupOp::Create(profile(1))),
            group(GroupOp::Update(profile(2))),
            group(GroupOp::Action { action: 3, target: 32, until_ms: 33, note: "let me in".into() }),
            group(GroupOp::AddMembers(vec![34, 35, 36, 37])),
            group(GroupOp::AddMembers(Vec::new())),
            group(GroupOp::Get),
            group(GroupOp::Members { after: 38, limit: 39 }),
            group(GroupOp::Requests),
            group(GroupOp::Typing(b(11, 24))),
            group(GroupOp::Read { seq: 7, device: 0xfeed, frame: b(12, 40) }),
            group(GroupOp::ReadGet { seq: 9 }),
            Envelope::GroupReply { session: s(40), request_kind: 33, result: Ok(b(8, 64)) },
            Envelope::GroupReply { session: s(40), request_kind: 33, result: Err(ErrorCode::NotMember) },
            Envelope::GroupFanout(Box::new(GroupFanout {
                users: Arc::from(vec![41, 42, 43]),
                skip: s(44),
                frame: b(9, 72),
                lossy: true,
            })),
            Envelope::DeliverMany(Box::new(DeliverMany {
                sessions: vec![s(45), s(46), SessionRef::new(7, 47)],
                frame: b(10, 33),
                lossy: false,
            })),
        ]
    }

    /// Every field of an envelope, as text: two envelopes are equal when their texts are.
    fn show(e: &Envelope) -> String {
        match e {
            Envelope::Submit(s) => format!(
                "Submit {:?}",
                (
                    s.origin,
                    s.sender,
                    s.to,
                    s.conv,
                    s.client_msg_id,
                    s.sender_device,
                    s.stream,
                    &s.frame[..],
                    s.change.is_some(),
                    s.refuse_new
                )
            ),
            Envelope::Acked { session, ack } => format!("Acked {:?}", (session, ack)),
            Envelope::Rejected { session, client_msg_id, code } => {
                format!("Rejected {:?}", (session, client_msg_id, code))
            }
            Envelope::Fanout { user, skip, frame } => format!("Fanout {:?}", (user, skip, frame)),
            Envelope::Deliver { session, frame } => format!("Deliver {:?}", (session, frame)),
            Envelope::Attach(a) => {
                format!("Attach {:?}", (a.user, a.session, a.device_type, a.token, &a.device_id))
            }
            Envelope::AttachResult { session, user, result } => {
                format!("AttachResult {:?}", (session, user, result))
            }
            Envelope::Detach { user, session } => format!("Detach {:?}", (user, session)),
            Envelope::Kick { session, reason } => format!("Kick {:?}", (session, reason)),
            Envelope::StoreToken { user, session, hash, expires_at_ms } => {
                format!("StoreToken {:?}", (user, session, hash, expires_at_ms))
            }
            Envelope::TokenResult { session, result } => format!("TokenResult {:?}", (session, result)),
            Envelope::StreamFanout { user, skip, frame } => format!("StreamFanout {:?}", (user, skip, frame)),
            Envelope::StreamDeliver { session, frame } => format!("StreamDeliver {:?}", (session, frame)),
            Envelope::StreamRefused { session, client_msg_id, code } => {
                format!("StreamRefused {:?}", (session, client_msg_id, code))
            }
            Envelope::Room(r) => {
                let op = match &r.op {
                    RoomOp::Create { publish, subscribers_max, publishers } => {
                        format!("Create {:?}", (publish, subscribers_max, publishers))
                    }
                    RoomOp::Subscribe => "Subscribe".into(),
                    RoomOp::Unsubscribe { reply } => format!("Unsubscribe {reply}"),
                    RoomOp::Publish { client_msg_id, frame } => {
                        format!("Publish {:?}", (client_msg_id, &frame[..]))
                    }
                    RoomOp::Delete => "Delete".into(),
                };
                format!("Room {:?} {op}", (r.origin, r.user, r.room))
            }
            Envelope::RoomReply { session, room, request_kind, result } => {
                format!("RoomReply {:?}", (session, room, request_kind, result))
            }
            Envelope::RoomFanout { room, skip, frame } => format!("RoomFanout {:?}", (room, skip, frame)),
            Envelope::RoomClosed { room, reason } => format!("RoomClosed {:?}", (room, reason)),
            Envelope::Group(g) => {
                let op = match &g.op {
                    GroupOp::Create(p) => format!("Create {p:?}"),
                    GroupOp::Update(p) => format!("Update {p:?}"),
                    GroupOp::Action { action, target, until_ms, note } => {
                        format!("Action {:?}", (action, target, until_ms, note))
                    }
                    GroupOp::AddMembers(u) => format!("AddMembers {u:?}"),
                    GroupOp::Get => "Get".into(),
                    GroupOp::Members { after, limit } => format!("Members {:?}", (after, limit)),
                    GroupOp::Requests => "Requests".into(),
                    GroupOp::Typing(f) => format!("Typing {f:?}"),
                    GroupOp::Read { seq, device, frame } => format!("Read {seq} {device} {frame:?}"),
                    GroupOp::ReadGet { seq } => format!("ReadGet {seq}"),
                };
                format!("Group {:?} {op}", (g.origin, g.user, g.group))
            }
            Envelope::GroupReply { session, request_kind, result } => {
                format!("GroupReply {:?}", (session, request_kind, result))
            }
            Envelope::GroupFanout(f) => format!("GroupFanout {:?}", (&f.users, f.skip, &f.frame, f.lossy)),
            Envelope::DeliverMany(d) => format!("DeliverMany {:?}", (&d.sessions, &d.frame, d.lossy)),
            Envelope::Reattach { user, session, device_type, info } => {
                format!("Reattach {:?}", (user, session, device_type, info))
            }
            Envelope::Sessions { user, origin, logout } => format!("Sessions {:?}", (user, origin, logout)),
            Envelope::Ban { user, until_ms } => format!("Ban {:?}", (user, until_ms)),
            Envelope::Pair { conv, flags, origin } => format!("Pair {:?}", (conv, flags, origin)),
            Envelope::Presence { user, msg } => format!("Presence {user} {msg:?}"),
            Envelope::Remote(_) | Envelope::Placement(_) | Envelope::Fence { .. } | Envelope::Admin(_) => {
                unreachable!("never encoded")
            }
        }
    }

    /// `bytes` in a `Bytes` whose start is `misalign` bytes past an 8-aligned address.
    fn placed(bytes: &[u8], misalign: usize) -> Bytes {
        let mut v = Vec::with_capacity(bytes.len() + 2 * ALIGN);
        let pad = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN + misalign;
        v.resize(pad, 0);
        v.extend_from_slice(bytes);
        let b = Bytes::from(v).slice(pad..);
        assert_eq!(b.as_ptr() as usize % ALIGN, misalign);
        b
    }

    /// Every whole record of `buf`, in order, or the first error.
    fn decode_all(buf: &Bytes, max: usize) -> Result<Vec<(u16, Envelope, usize)>, WireError> {
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((shard, env, used)) = decode(&buf.slice(at..), max)? {
            assert!(used >= HEADER_BYTES && used.is_multiple_of(ALIGN) && at + used <= buf.len());
            at += used;
            out.push((shard, env, used));
        }
        Ok(out)
    }

    /// A batch of one record of every variant, to shard `i` for the `i`th, and each record's length.
    fn batch() -> (Vec<Envelope>, Vec<u8>, Vec<usize>) {
        let envs = every_variant();
        let mut out = Vec::new();
        let mut lens = Vec::new();
        for (i, e) in envs.iter().enumerate() {
            let before = out.len();
            encode(i as u16 * 1000, e, &mut out).unwrap();
            lens.push(out.len() - before);
        }
        (envs, out, lens)
    }

    /// Every variant round-trips through one batch, with its shard and length, whether the batch
    /// starts aligned (frames shared with it) or not (frames shared with an aligned copy).
    #[test]
    fn round_trip_every_variant() {
        let (envs, bytes, lens) = batch();
        assert!(bytes.len().is_multiple_of(ALIGN));
        for misalign in [0, 1, 4] {
            let buf = placed(&bytes, misalign);
            let got = decode_all(&buf, MAX).unwrap();
            assert_eq!(got.len(), envs.len());
            for (i, ((shard, env, used), want)) in got.iter().zip(&envs).enumerate() {
                assert_eq!(*shard as usize, i * 1000);
                assert_eq!(*used, lens[i]);
                assert_eq!(show(env), show(want));
                if let Envelope::Deliver { frame, .. } = env {
                    let inside = buf.as_ptr_range().contains(&frame.as_ptr());
                    assert_eq!(inside, misalign == 0 && !frame.is_empty(), "zero copy only in place");
                }
            }
        }
    }

    /// The header says where the record goes and how long it is, byte for byte.
    #[test]
    fn header_layout() {
        let mut out = Vec::new();
        encode(0x0102, &Envelope::RoomClosed { room: 5, reason: 1 }, &mut out).unwrap();
        let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
        assert_eq!(out.len(), frame::frame_bytes(len));
        assert_eq!(&out[4..8], &[ENVELOPE_KIND as u8, 0, 0x02, 0x01]);
    }

    /// Every prefix of a batch gives exactly the records wholly inside it, never an error.
    #[test]
    fn every_prefix() {
        let (envs, bytes, lens) = batch();
        let buf = placed(&bytes, 0);
        for n in 0..=buf.len() {
            let got = decode_all(&buf.slice(..n), MAX).unwrap();
            let whole = lens.iter().scan(0, |end, l| {
                *end += l;
                Some(*end)
            });
            assert_eq!(got.len(), whole.filter(|&end| end <= n).count(), "prefix {n}");
            for ((_, env, _), want) in got.iter().zip(&envs) {
                assert_eq!(show(env), show(want));
            }
        }
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Bit flips and overwritten bytes in a valid batch, and random payloads behind valid headers,
    /// give errors or envelopes, never a panic.
    #[test]
    fn garbage_never_panics() {
        let (_, bytes, _) = batch();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut invalid, mut whole) = (0, 0);
        for round in 0..6000 {
            let mut m = bytes.clone();
            match round % 3 {
                0 => {
                    for _ in 0..1 + rng.below(3) {
                        let i = rng.below(m.len());
                        m[i] ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    let i = rng.below(m.len());
                    let n = rng.below(64).min(m.len() - i);
                    for b in &mut m[i..i + n] {
                        *b = rng.next() as u8;
                    }
                }
                _ => {
                    let len = rng.below(300);
                    m = vec![0; frame::frame_bytes(len)];
                    Header { len: len as u32, kind: ENVELOPE_KIND, flags: 0 }.write(&mut m);
                    for b in &mut m[HEADER_BYTES..HEADER_BYTES + len] {
                        *b = rng.next() as u8;
                    }
                    if len > 0 {
                        // often a valid variant tag at the root's start, to get past the tag check
                        let root = HEADER_BYTES + len.saturating_sub(64);
                        m[root] %= 22;
                    }
                }
            }
            let misalign = if round % 5 == 0 { 3 } else { 0 };
            match decode_all(&placed(&m, misalign), MAX) {
                Ok(records) => whole += records.len(),
                Err(WireError::Invalid(_)) => invalid += 1,
                Err(_) => {}
            }
        }
        // the mutations reach the archive's validation, and some leave valid records
        assert!(invalid > 1000 && whole > 1000, "{invalid} invalid archives, {whole} records");
    }

    /// A record over the cap is refused from its header alone, before its payload is in.
    #[test]
    fn oversized_refused() {
        let mut out = Vec::new();
        encode(1, &Envelope::Deliver { session: s(1), frame: b(1, 200) }, &mut out).unwrap();
        let buf = placed(&out, 0);
        assert!(decode(&buf, out.len()).unwrap().is_some());
        let got = decode(&buf.slice(..HEADER_BYTES), out.len() - 8);
        assert!(matches!(got, Err(WireError::TooLarge { .. })));
        let mut h = [0u8; 8];
        Header { len: u32::MAX, kind: ENVELOPE_KIND, flags: 0 }.write(&mut h);
        assert!(matches!(decode(&placed(&h, 0), MAX), Err(WireError::TooLarge { .. })));
    }

    /// A Submit carrying a group change is refused and leaves the batch as it was.
    #[test]
    fn group_change_refused() {
        let mut out = Vec::new();
        encode(0, &Envelope::Detach { user: 1, session: s(2) }, &mut out).unwrap();
        let before = out.clone();
        let change = Arc::new(GroupChange { group: 1 << 62, writes: Vec::new() });
        let err = encode(0, &submit(Some(change), None), &mut out).unwrap_err();
        assert!(matches!(err, WireError::GroupChange), "{err}");
        assert_eq!(out, before);
    }

    /// Unknown kinds, non-zero padding and unknown error codes are refused.
    #[test]
    fn invalid_fields_refused() {
        let mut out = Vec::new();
        encode(0, &Envelope::Kick { session: s(1), reason: ErrorCode::Replaced }, &mut out).unwrap();
        let mut bad_kind = out.clone();
        bad_kind[4] = 9;
        assert!(matches!(decode(&placed(&bad_kind, 0), MAX), Err(WireError::UnknownKind(9))));
        let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
        if HEADER_BYTES + len < out.len() {
            let mut bad_pad = out.clone();
            *bad_pad.last_mut().unwrap() = 1;
            assert!(matches!(decode(&placed(&bad_pad, 0), MAX), Err(WireError::Malformed(_))));
        }
        // the reason's u16 is the only place 42 (Replaced) appears in the archive
        let at = HEADER_BYTES
            + out[HEADER_BYTES..].iter().position(|&b| b == ErrorCode::Replaced.code() as u8).unwrap();
        out[at] = 99;
        assert!(matches!(decode(&placed(&out, 0), MAX), Err(WireError::UnknownErrorCode(99))));
    }
}
