//! The whole contract between shards: every message that crosses the mesh is an [`Envelope`].
//!
//! Roles of a shard for a given key (see docs/ARCHITECTURE.md):
//! - **session shard** (S/T): owns a connection and its session;
//! - **conversation owner** (C): owns a conversation's sequence counter and resend dedup;
//! - **user owner** (U): owns a user's live state: sessions on any shard, tokens.
//!
//! A 1:1 send goes S → C (`Submit`), C → S (`Acked`/`Rejected`), C → U of both users (`Fanout`),
//! U → T of each session (`Deliver`). Message bodies travel as one shared [`Bytes`] frame.
//!
//! - **group owner** (G): owns a group: profile, members, block list, join requests; checks
//!   membership and mutes of every group send, then hands it to the conversation owner of the
//!   group's messages (same shard).
//!
//! A group send goes S → G (`Submit`), G → C on the same shard (sequence, commit), C → G
//! (publish), G → every shard holding members' user owners (`GroupFanout`, one per shard, one
//! shared frame), which hands it to each member's sessions.
//!
//! - **room owner** (R): owns a live room: its options and subscribers.
//!
//! A room publish goes S → R (`Room`), R → each shard holding subscribers (`RoomFanout`, one
//! per shard), which writes it to its local subscribers.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::{
    frame,
    placement::{direct_key, Owner, Table},
    protocol::{self, kind, DeviceType, ErrorCode, GroupProfile, RoomStamp, Stamp},
    store::{group_conv, ConvKey, GroupChange, UserId},
};

pub use crate::placement::SessionRef;

/// What the conversation owner tells the sender's session about an accepted message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckInfo {
    pub client_msg_id: u64,
    pub msg_id: u64,
    pub seq: u64,
    pub ts_ms: u64,
    pub duplicate: bool,
}

/// A message on its way to its conversation owner. `frame` is the future `Deliver` frame: header,
/// a blank stamp, and the sender's `Send` archive copied once from the read buffer.
pub struct Submit {
    pub origin: SessionRef,
    pub sender: UserId,
    pub to: UserId,
    pub conv: u8,
    pub client_msg_id: u64,
    /// Hash of the sending session's device id (see `store::device_hash`).
    pub sender_device: u64,
    /// A stream message (kind `Stream`): delivered to live sessions only, never stored or
    /// acknowledged, after the stored messages sequenced before it.
    pub stream: bool,
    pub frame: BytesMut,
    /// A group notice (sender 0): the changes it stores.
    pub change: Option<Arc<GroupChange>>,
    /// A group send its group owner refused (not a member, muted, ...): refused with this code
    /// unless it is a resend of a stored message, which gets its original ack.
    pub refuse_new: Option<ErrorCode>,
    /// Set by a group's owner when the sender is one of its managers: a recall
    /// ([`crate::protocol::send_flags::RECALL`]) may take back anyone's message. Never crosses
    /// nodes (a group's messages are sequenced on its owner's shard).
    pub by_manager: bool,
}

impl Submit {
    /// The conversation this message belongs to.
    pub fn key(&self) -> ConvKey {
        conv_key(self.conv, self.sender, self.to)
    }

    /// The future `DELIVER` frame of a `Send` payload: header, a blank stamp (written in place
    /// by the conversation owner), the sender's archive verbatim, and padding.
    pub fn blank_deliver(send_payload: &[u8]) -> BytesMut {
        Self::blank_frame(kind::DELIVER, send_payload)
    }

    /// As [`Submit::blank_deliver`], for a frame of kind `k` (`DELIVER` or `STREAM_MSG`).
    pub fn blank_frame(k: u16, send_payload: &[u8]) -> BytesMut {
        let mut f = Self::frame_head(k, send_payload.len());
        f.put_slice(send_payload);
        let len = Stamp::BYTES + send_payload.len();
        f.put_bytes(0, frame::padded(len) - len);
        f
    }

    /// The start of a frame of kind `k` for a `Send` payload of `payload_len` bytes: header and
    /// blank stamp, with room for the payload and padding (a large message's parts are appended
    /// to it as they come).
    pub fn frame_head(k: u16, payload_len: usize) -> BytesMut {
        let len = Stamp::BYTES + payload_len;
        let mut f = BytesMut::with_capacity(frame::frame_bytes(len));
        f.put_u32_le(len as u32);
        f.put_u16_le(k);
        f.put_u16_le(0);
        f.put_bytes(0, Stamp::BYTES);
        f
    }
}

/// The conversation of a message of kind `conv` from `sender` to `to` (a user or a group).
#[inline]
pub fn conv_key(conv: u8, sender: UserId, to: UserId) -> ConvKey {
    if conv == protocol::conv::GROUP {
        group_conv(to)
    } else {
        direct_key(sender, to)
    }
}

impl PresenceMsg {
    /// The envelope that carries it to `user`'s owner.
    pub fn envelope(&self) -> Envelope {
        let msg = postcard::to_allocvec(self).expect("a presence message encodes");
        Envelope::Presence { user: self.user, msg: Bytes::from(msg) }
    }
}

/// A presence message for `user`'s owner (it crosses nodes as postcard).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PresenceMsg {
    pub user: UserId,
    /// The asking session (`SessionRef` id; 0: none).
    pub origin: u64,
    pub op: PresenceOp,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PresenceOp {
    /// The user sets its presence; answered with a `PRESENCE_LIST` of it (a `GroupReply`).
    Set { state: u8, text: String, extra: Vec<u8> },
    /// A session of the user logged in: the user's audience (its friends and the users it
    /// allowed to watch its presence) and blocked users, from the store.
    Roster { audience: Vec<UserId>, blocks: Vec<UserId> },
    /// The user's relation to `other` changed (stored already): whether `other` is in its
    /// audience now, and whether the user blocks it.
    Change { other: UserId, sees: bool, blocks: bool },
    /// `asker` wants the presence of `users` (all owned by the owner of `user`, the first of
    /// them); answered with a `PRESENCE_LIST`.
    Ask { asker: UserId, users: Vec<UserId> },
    /// The user's previous owner hands its presence over (the user's partition moved); not
    /// answered, nobody told (its audience knows it already).
    Handover {
        state: u8,
        text: String,
        extra: Vec<u8>,
        since_ms: u64,
        audience: Option<Vec<UserId>>,
        blocks: Vec<UserId>,
        shown: u8,
    },
}

/// What a session asks of a group's owner.
pub enum GroupOp {
    Create(GroupProfile),
    Update(GroupProfile),
    Action {
        action: u8,
        target: UserId,
        until_ms: u64,
        note: String,
    },
    AddMembers(Vec<UserId>),
    Get,
    Members {
        after: UserId,
        limit: u32,
    },
    Requests,
    /// A typing notice for the members' sessions (never answered but with a refusal).
    Typing(Bytes),
    /// A read receipt of the member's device (never answered but with a refusal): kept, and
    /// in a small group pushed (`frame`, a `READ_NOTICE`) to the members' sessions.
    Read {
        seq: u64,
        device: u64,
        frame: Bytes,
    },
    /// How far the group was read (answered with a `READ_STATE`).
    ReadGet {
        seq: u64,
    },
}

impl GroupOp {
    /// The frame kind of the request.
    pub fn request_kind(&self) -> u16 {
        match self {
            GroupOp::Create(_) => kind::GROUP_CREATE,
            GroupOp::Update(_) => kind::GROUP_UPDATE,
            GroupOp::Action { .. } => kind::GROUP_ACTION,
            GroupOp::AddMembers(_) => kind::GROUP_ADD_MEMBERS,
            GroupOp::Get => kind::GROUP_GET,
            GroupOp::Members { .. } => kind::GROUP_MEMBERS,
            GroupOp::Requests => kind::GROUP_REQUESTS,
            GroupOp::Typing(_) => kind::TYPING,
            GroupOp::Read { .. } => kind::READ,
            GroupOp::ReadGet { .. } => kind::READ_GET,
        }
    }
}

/// A session's request to a group owner (G).
pub struct GroupRequest {
    pub origin: SessionRef,
    pub user: UserId,
    pub group: u64,
    pub op: GroupOp,
}

/// G → a shard holding user owners of members: hand `frame` to each of `users`' sessions
/// (but `skip`). `lossy`: a stream message (dropped for a slow reader).
pub struct GroupFanout {
    pub users: Arc<[UserId]>,
    pub skip: SessionRef,
    pub frame: Bytes,
    pub lossy: bool,
}

/// A login asking the user owner for a place among the user's sessions.
pub struct Attach {
    pub user: UserId,
    pub session: SessionRef,
    pub device_type: DeviceType,
    /// The login's device id (listed by `MySessions`).
    pub device_id: String,
    /// `Some(hash)`: a token login; the token must be live and is consumed.
    pub token: Option<[u8; 32]>,
}

/// What a session asks of a live room's owner.
pub enum RoomOp {
    Create {
        publish: u8,
        subscribers_max: u32,
        publishers: Vec<UserId>,
    },
    Subscribe,
    /// `reply`: the session asked (a RoomOk answers); else its connection ended.
    Unsubscribe {
        reply: bool,
    },
    /// The future `ROOM_MSG` frame: header, a blank room stamp, the `RoomPublish` archive.
    Publish {
        client_msg_id: u64,
        frame: BytesMut,
    },
    Delete,
}

impl RoomOp {
    /// The frame kind of the request.
    pub fn request_kind(&self) -> u16 {
        match self {
            RoomOp::Create { .. } => kind::ROOM_CREATE,
            RoomOp::Subscribe => kind::ROOM_SUBSCRIBE,
            RoomOp::Unsubscribe { .. } => kind::ROOM_UNSUBSCRIBE,
            RoomOp::Publish { .. } => kind::ROOM_PUBLISH,
            RoomOp::Delete => kind::ROOM_DELETE,
        }
    }
}

/// A session's request to a room owner (R).
pub struct RoomRequest {
    pub origin: SessionRef,
    pub user: UserId,
    pub room: u64,
    pub op: RoomOp,
}

impl RoomRequest {
    /// The future `ROOM_MSG` frame of a `RoomPublish` payload (see [`Submit::blank_deliver`]).
    pub fn blank_room_msg(publish_payload: &[u8]) -> BytesMut {
        let len = RoomStamp::BYTES + publish_payload.len();
        let mut f = BytesMut::with_capacity(frame::frame_bytes(len));
        f.put_u32_le(len as u32);
        f.put_u16_le(kind::ROOM_MSG);
        f.put_u16_le(0);
        f.put_bytes(0, RoomStamp::BYTES);
        f.put_slice(publish_payload);
        f.put_bytes(0, frame::padded(len) - len);
        f
    }
}

pub enum Envelope {
    /// S → C.
    Submit(Box<Submit>),
    /// C → S: the message is sequenced (and, in data mode, stored).
    Acked { session: SessionRef, ack: AckInfo },
    /// C → S: the message was refused.
    Rejected { session: SessionRef, client_msg_id: u64, code: ErrorCode },
    /// C → U: deliver to every session of `user` except `skip`.
    Fanout { user: UserId, skip: SessionRef, frame: Bytes },
    /// U → T: write a frame to one session.
    Deliver { session: SessionRef, frame: Bytes },
    /// S → U.
    Attach(Box<Attach>),
    /// U → S: the answer to `Attach`.
    AttachResult { session: SessionRef, user: UserId, result: Result<(), ErrorCode> },
    /// T → U: a logged-in session ended.
    Detach { user: UserId, session: SessionRef },
    /// U → T: close a session with this reason.
    Kick { session: SessionRef, reason: ErrorCode },
    /// S → U: remember a one-shot token.
    StoreToken { user: UserId, session: SessionRef, hash: [u8; 32], expires_at_ms: u64 },
    /// U → S: the answer to `StoreToken`.
    TokenResult { session: SessionRef, result: Result<(), ErrorCode> },
    /// C → U: deliver a stream message to every session of `user` except `skip` (lossy).
    StreamFanout { user: UserId, skip: SessionRef, frame: Bytes },
    /// U → T: queue a stream message for one session (dropped if it reads too slowly).
    StreamDeliver { session: SessionRef, frame: Bytes },
    /// C → S: a stream message was refused.
    StreamRefused { session: SessionRef, client_msg_id: u64, code: ErrorCode },
    /// S → R: a room request.
    Room(Box<RoomRequest>),
    /// R → S: the answer to a room request (`request_kind` is its frame kind); `Ok` carries the
    /// room's subscriber count.
    RoomReply { session: SessionRef, room: u64, request_kind: u16, result: Result<u32, ErrorCode> },
    /// R → every shard with subscribers: write a room message to the room's local subscribers
    /// (one envelope per destination shard, one shared frame).
    RoomFanout { room: u64, skip: SessionRef, frame: Bytes },
    /// R → every shard with subscribers: the room is gone.
    RoomClosed { room: u64, reason: u16 },
    /// S → G: a group request.
    Group(Box<GroupRequest>),
    /// G (or U, for `Sessions`) → S: the answer to a group request (or a sessions request):
    /// the whole answer frame, or a refusal.
    GroupReply { session: SessionRef, request_kind: u16, result: Result<Bytes, ErrorCode> },
    /// G → every shard holding members' user owners (one envelope per shard).
    GroupFanout(Box<GroupFanout>),
    /// U → T: write one frame to many sessions of shard T (a group fan-out's slice: one
    /// envelope per destination shard, not one per session).
    DeliverMany(Box<DeliverMany>),
    /// Shard → its node's cluster gateway: an envelope for an owner on another node.
    Remote(Box<Remote>),
    /// Gateway → every shard of its node: the cluster's members changed; place by this table,
    /// after routing again (first) what this shard had sent to a node that is gone.
    Placement(Box<PlacementUpdate>),
    /// Shard `shard` → its node's cluster gateway, and back: the gateway has carried, or given
    /// back, everything the shard sent it before this (see `Shard::recall_from_gateway`).
    Fence { shard: u16, n: u64 },
    /// A session's shard → its user's new owner after the partition moved: the session is
    /// live (no limits are checked, nothing is answered).
    Reattach { user: UserId, session: SessionRef, device_type: DeviceType, info: Box<DeviceInfo> },
    /// The admin API → one shard of this node: run this there (never crosses nodes).
    Admin(AdminTask),
    /// → U: `user` was banned until `until_ms` (stored already; in the past: lifted).
    Ban { user: UserId, until_ms: u64 },
    /// S → U: presence: a [`PresenceMsg`] for `user`'s owner, as postcard (it crosses nodes as
    /// it is).
    Presence { user: UserId, msg: Bytes },
    /// S → C: a 1:1 pair's roster changed (stored already): its new flags
    /// ([`crate::roster::pair`]), for the sends of the conversation.
    /// C answers `origin` (a `GroupReply` of an empty frame) once it checks by them, so the
    /// roster action is answered only after.
    Pair { conv: ConvKey, flags: u8, origin: SessionRef },
    /// S → U: list `user`'s sessions to `origin` (as a `SESSION_LIST` frame in a `GroupReply`),
    /// after logging session `logout` out (0: none).
    Sessions { user: UserId, origin: SessionRef, logout: u64 },
}

/// What a user owner lists of a session besides its ref and device type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub login_ms: u64,
}

/// Work the admin API gives a shard: called on the shard's thread with the shard (an
/// `Rc<Shard>`, passed as `Any` so that envelopes need not know the shard's type).
pub struct AdminTask(pub Box<AdminFn>);

/// What an [`AdminTask`] runs.
pub type AdminFn = dyn FnOnce(&dyn std::any::Any) + Send;

impl Envelope {
    /// Whether this envelope is held past a full queue (a shard's `mesh_overflow_max`, a cluster
    /// link's `link_queue_bytes_max`) rather than dropped or refused:
    /// - state two owners must agree on (dropped, it would leave a phantom session against a device
    ///   limit, a kicked session alive, or a phantom room subscriber);
    /// - the answer to a request (dropped, it would leave the request in flight for good: a send
    ///   never acknowledged holds a place in its session's in-flight window).
    ///
    /// Each kind is bounded by connections and their requests in flight (the in-flight limits,
    /// [`crate::session::ROOM_REQUESTS_INFLIGHT_MAX`]), not by traffic.
    pub fn never_dropped(&self) -> bool {
        match self {
            Envelope::AttachResult { .. } | Envelope::Detach { .. } | Envelope::Kick { .. } => true,
            Envelope::RoomClosed { .. } | Envelope::Reattach { .. } | Envelope::Placement(_) => true,
            Envelope::Fence { .. } | Envelope::Ban { .. } | Envelope::Pair { .. } => true,
            // Answered requests (bounded by the sessions' one request each) and a user's roster
            // for its presence (one per login or roster change).
            Envelope::Presence { .. } => true,
            Envelope::Acked { .. } | Envelope::Rejected { .. } | Envelope::StreamRefused { .. } => true,
            Envelope::TokenResult { .. } | Envelope::GroupReply { .. } => true,
            // A publish is answered only when refused, and publishes are not counted in flight.
            Envelope::RoomReply { request_kind, .. } => *request_kind != kind::ROOM_PUBLISH,
            Envelope::Remote(r) => r.env.never_dropped(),
            Envelope::Room(req) => matches!(req.op, RoomOp::Unsubscribe { reply: false }),
            _ => false,
        }
    }

    /// The owner an owner-addressed envelope is for, by `p` (`None` for envelopes addressed to
    /// a session's shard, or to a shard as such: fan-outs to subscribers or members' owners).
    pub fn owner(&self, p: &crate::placement::Placement) -> Option<Owner> {
        Some(match self {
            Envelope::Submit(sub) if sub.conv == protocol::conv::GROUP => p.group(sub.to),
            Envelope::Submit(sub) => p.conv(sub.key()),
            Envelope::Fanout { user, .. }
            | Envelope::StreamFanout { user, .. }
            | Envelope::Detach { user, .. }
            | Envelope::StoreToken { user, .. }
            | Envelope::Ban { user, .. }
            | Envelope::Sessions { user, .. }
            | Envelope::Reattach { user, .. } => p.user(*user),
            Envelope::Attach(a) => p.user(a.user),
            Envelope::Pair { conv, .. } => p.conv(*conv),
            Envelope::Presence { user, .. } => p.user(*user),
            Envelope::Room(req) => p.room(req.room),
            Envelope::Group(req) => p.group(req.group),
            _ => return None,
        })
    }
}

/// A new table for a shard, with the envelopes it sent that waited at the gateway for a node
/// now gone, in the order it sent them.
pub struct PlacementUpdate {
    pub table: Arc<Table>,
    pub returned: Vec<Envelope>,
}

/// An envelope on its way to an owner on another node.
pub struct Remote {
    pub to: Owner,
    /// The shard of this node that sent it (an envelope parked at the gateway goes back to it
    /// to be routed again, after what it sent earlier and before what it sends later).
    pub from: u16,
    pub env: Envelope,
}

/// One frame for several sessions of one shard.
pub struct DeliverMany {
    pub sessions: Vec<SessionRef>,
    pub frame: Bytes,
    /// A stream message (queued lossily).
    pub lossy: bool,
}

const _: () = assert!(std::mem::size_of::<Envelope>() <= 64);
