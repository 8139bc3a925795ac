//! The JSON mapping of protocol v1 (docs/JSON.md), for WebSocket text messages: a JSON request
//! becomes the v1 frame a binary client would send, for the unchanged session logic, and every
//! frame the session queues becomes one JSON text. No I/O: the transport feeds request texts and
//! queued frames in, and sends what comes out.
//!
//! Requests are parsed by serde_json into one flat set of typed fields (each field name has one
//! type whatever the op), then checked against their op and archived: `send`, `stream` and
//! `room_publish` by hand (their layout is fixed by docs/PROTOCOL.md; a test compares it with
//! rkyv's), the rest with rkyv. A `send_part` becomes one `Part` frame of a large `Send`'s
//! archive, built by hand too: the chunk, and with the last chunk the `Send`'s root. Answers are
//! written by hand into one `String`.
//!
//! Key types: [`Correlator`] (one per connection: which answer echoes which request `id`),
//! [`Inbound`] and [`RequestFrame`] (what a request text becomes), [`request`], [`answer`].

use std::{borrow::Cow, collections::VecDeque, fmt, fmt::Write as _};

use base64::{
    alphabet,
    engine::{
        general_purpose::{GeneralPurpose, GeneralPurposeConfig},
        DecodePaddingMode,
    },
    Engine as _,
};
use rkyv::{api::high::HighSerializer, rancor, ser::allocator::ArenaHandle, util::AlignedVec, Serialize};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::{
    frame::{self, Header, HEADER_BYTES},
    protocol::{self, conv, is_group_id, kind, ErrorCode},
};

/// Longest request `id` kept, as JSON text (a string's quotes and escapes included): ids are
/// held until their answers come, so their size is bounded.
pub const ID_BYTES_MAX: usize = 128;

/// Requests one queue of a [`Correlator`] holds while their answers are due (per queue: requests
/// answered in order, sends, delivery acks, room requests). Past it the oldest is forgotten: its
/// answer comes without `id`, and the answers after it still find theirs.
pub const PENDING_MAX: usize = 4096;

/// `stream` and `room_publish` requests with an `id` held, per kind. They have no success
/// answer, so an id waits for a refusal that mostly never comes: only the latest are kept.
pub const UNANSWERED_MAX: usize = 256;

/// Largest body (or profile `extra`) a request may carry: the archive's relative pointers are
/// 32-bit. The session's own `body_bytes_max` is far lower; this only keeps the encoding exact.
const BODY_BYTES_MAX: usize = i32::MAX as usize - 1024;

/// Longest piece of a request's text quoted back in an error message.
const QUOTE_BYTES_MAX: usize = 64;

const _: () = assert!(UNANSWERED_MAX <= PENDING_MAX);
const _: () = assert!(ID_BYTES_MAX >= 40, "a UUID in quotes must fit");

/// Standard base64: written with padding, read with or without it.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A request id: the JSON text to echo (a string with its quotes, or a number).
type Id = Box<str>;

// ---- requests ----

/// What one request text becomes.
#[derive(Debug)]
pub enum Inbound {
    /// The v1 frame to hand to the session.
    Frame(RequestFrame),
    /// The request was refused by the JSON layer: send this `error` text back (the connection
    /// stays open, as after a v1 `Malformed`).
    Error(String),
}

/// A whole v1 frame built from a JSON request (header, payload, zero padding), byte for byte
/// what a binary client would send. Its payload is 8-aligned in memory, as [`frame::access`]
/// needs.
pub struct RequestFrame {
    bytes: AlignedVec<16>,
}

impl RequestFrame {
    pub fn kind(&self) -> u16 {
        Header::read(&self.bytes).kind
    }

    /// The archive, 8-aligned: what [`crate::session::requests::Requests::frame`] takes.
    pub fn payload(&self) -> &[u8] {
        let len = Header::read(&self.bytes).len as usize;
        &self.bytes[HEADER_BYTES..HEADER_BYTES + len]
    }

    /// The whole frame: header, payload and padding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for RequestFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestFrame({}, {} bytes)", kind::name(self.kind()), self.bytes.len())
    }
}

/// Why the JSON layer refuses a request text (docs/JSON.md, "Errors of the JSON layer").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RequestError {
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// Not an object, a field missing, unknown, repeated or of the wrong type or range.
    #[error("{0}")]
    Invalid(String),
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    /// A frame over the server's `frame_bytes_max` (which would close the connection).
    #[error("{0}")]
    TooLarge(String),
    /// A `send`, `stream` or `room_publish` frame over `frame_bytes_max`: its body is too long.
    #[error("{0}")]
    BodyTooLarge(String),
}

impl RequestError {
    /// The v1 code it is answered with.
    fn code(&self) -> ErrorCode {
        match self {
            RequestError::UnknownOp(_) => ErrorCode::UnknownKind,
            RequestError::TooLarge(_) => ErrorCode::FrameTooLarge,
            RequestError::BodyTooLarge(_) => ErrorCode::BodyTooLarge,
            RequestError::Syntax(_) | RequestError::Invalid(_) => ErrorCode::Malformed,
        }
    }
}

/// Convert one JSON request text: the frame for the session, or the `error` text to send back.
/// The request's `id` (if any) is noted in `corr`, so that its answers carry it.
pub fn request(text: &str, corr: &mut Correlator) -> Inbound {
    match parse(text).and_then(|req| corr.pending.fits(req)) {
        Ok(req) => {
            let p = &mut corr.pending;
            p.on_request(req.frame.kind(), req.key, req.ack_refused, req.last_part, req.id);
            Inbound::Frame(req.frame)
        }
        Err(e) => {
            let found = salvage(text);
            // An unknown op says more than whatever else is wrong with the request.
            let e = match found.op {
                Some(op) if op_spec(&op).is_none() => RequestError::UnknownOp(clip(&op).to_owned()),
                _ => e,
            };
            let request_kind = match e {
                RequestError::UnknownOp(_) => 0,
                _ => found.kind,
            };
            Inbound::Error(refusal(e.code(), request_kind, found.id.as_deref(), &e.to_string()))
        }
    }
}

/// A request that passed: its frame and what its answers are matched by.
struct Request {
    frame: RequestFrame,
    id: Option<Id>,
    /// `client_msg_id` (send, stream, room_publish) or `room_id` (room requests); else 0.
    key: u64,
    /// A `delivery_ack` the session will refuse (InvalidConversation): it gets an answer.
    ack_refused: bool,
    /// A `send_part` that ends the body: the whole `Send` is in, and is answered as a send.
    last_part: bool,
}

macro_rules! keys {
    ($($k:ident = $name:literal),* $(,)?) => {
        /// The fields of a request object, whatever its op.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        enum Key { $($k),* }

        impl Key {
            const ALL: &'static [Key] = &[$(Key::$k),*];

            fn name(self) -> &'static str {
                match self { $(Key::$k => $name),* }
            }

            fn from_name(s: &str) -> Option<Key> {
                match s { $($name => Some(Key::$k),)* _ => None }
            }
        }
    };
}

keys! {
    Op = "op", Id = "id",
    Name = "name", Password = "password", DeviceType = "device_type", DeviceId = "device_id",
    Token = "token", TtlSecs = "ttl_secs", Nonce = "nonce",
    Conv = "conv", To = "to", ClientMsgId = "client_msg_id", Body = "body", BodyB64 = "body_b64",
    Peer = "peer", Seq = "seq", AnchorSeq = "anchor_seq", Direction = "direction", Limit = "limit",
    Reserved = "reserved",
    Publish = "publish", SubscribersMax = "subscribers_max", Publishers = "publishers",
    RoomId = "room_id",
    GroupId = "group_id", Profile = "profile", Action = "action", UserId = "user_id",
    UntilMs = "until_ms", Note = "note", UserIds = "user_ids", AfterUser = "after_user",
    AfterGroup = "after_group", SessionId = "session_id", State = "state",
    Flags = "flags", BurnSecs = "burn_secs", User = "user", List = "list", After = "after",
    Text = "text", Extra = "extra", ExtraB64 = "extra_b64",
    BodyBytes = "body_bytes", Offset = "offset",
}

const _: () = assert!(Key::ALL.len() <= 64, "fields are a u64 bit set");

impl Key {
    const fn bit(self) -> u64 {
        1 << self as u8
    }
}

/// The bit set of `keys`.
const fn bits(keys: &[Key]) -> u64 {
    let mut b = 0;
    let mut i = 0;
    while i < keys.len() {
        b |= keys[i].bit();
        i += 1;
    }
    b
}

/// An op: its name, kind, the fields it takes and those it must have.
struct OpSpec {
    name: &'static str,
    kind: u16,
    fields: u64,
    required: u64,
}

const fn op(name: &'static str, kind: u16, fields: &[Key], required: &[Key]) -> OpSpec {
    OpSpec { name, kind, fields: bits(fields), required: bits(required) }
}

use Key as K;

/// Every op a client may send (docs/JSON.md, "Requests").
const OPS: &[OpSpec] = &[
    op("register", kind::REGISTER, &[K::Name, K::Password], &[K::Name, K::Password]),
    op("login", kind::LOGIN, &[K::Name, K::Password, K::DeviceType, K::DeviceId], &[K::Name, K::Password]),
    op("login_token", kind::LOGIN_TOKEN, &[K::Token, K::DeviceType, K::DeviceId], &[K::Token]),
    op("issue_token", kind::ISSUE_TOKEN, &[K::TtlSecs], &[]),
    op("ping", kind::PING, &[K::Nonce], &[]),
    op(
        "send",
        kind::SEND,
        &[K::Conv, K::To, K::ClientMsgId, K::Body, K::BodyB64, K::Flags, K::BurnSecs],
        &[K::Conv, K::To, K::ClientMsgId],
    ),
    // A `Send` with the RECALL flag, its body the seq to take back (docs/PROTOCOL.md 5.7).
    op(
        "recall",
        kind::SEND,
        &[K::Conv, K::To, K::ClientMsgId, K::Seq],
        &[K::Conv, K::To, K::ClientMsgId, K::Seq],
    ),
    op("delivery_ack", kind::DELIVERY_ACK, &[K::Conv, K::Peer, K::Seq], &[K::Conv, K::Peer, K::Seq]),
    op("logout", kind::LOGOUT, &[K::Reserved], &[]),
    op(
        "history",
        kind::HISTORY,
        &[K::Conv, K::Peer, K::AnchorSeq, K::Direction, K::Limit],
        &[K::Conv, K::Peer],
    ),
    op("stream", kind::STREAM, &[K::Conv, K::To, K::ClientMsgId, K::Body, K::BodyB64], &[K::Conv, K::To]),
    op("room_create", kind::ROOM_CREATE, &[K::Publish, K::SubscribersMax, K::Publishers], &[]),
    op("room_subscribe", kind::ROOM_SUBSCRIBE, &[K::RoomId], &[K::RoomId]),
    op("room_unsubscribe", kind::ROOM_UNSUBSCRIBE, &[K::RoomId], &[K::RoomId]),
    op("room_publish", kind::ROOM_PUBLISH, &[K::RoomId, K::ClientMsgId, K::Body, K::BodyB64], &[K::RoomId]),
    op("room_delete", kind::ROOM_DELETE, &[K::RoomId], &[K::RoomId]),
    op("group_create", kind::GROUP_CREATE, &[K::Profile], &[K::Profile]),
    op("group_update", kind::GROUP_UPDATE, &[K::GroupId, K::Profile], &[K::GroupId, K::Profile]),
    op(
        "group_action",
        kind::GROUP_ACTION,
        &[K::GroupId, K::Action, K::UserId, K::UntilMs, K::Note],
        &[K::GroupId, K::Action],
    ),
    op("group_get", kind::GROUP_GET, &[K::GroupId], &[K::GroupId]),
    op("group_members", kind::GROUP_MEMBERS, &[K::GroupId, K::AfterUser, K::Limit], &[K::GroupId]),
    op("my_groups", kind::MY_GROUPS, &[K::AfterGroup, K::Limit], &[]),
    op("group_requests", kind::GROUP_REQUESTS, &[K::GroupId], &[K::GroupId]),
    op("group_add_members", kind::GROUP_ADD_MEMBERS, &[K::GroupId, K::UserIds], &[K::GroupId, K::UserIds]),
    op("my_sessions", kind::MY_SESSIONS, &[K::Reserved], &[]),
    op("session_logout", kind::SESSION_LOGOUT, &[K::SessionId], &[K::SessionId]),
    op("typing", kind::TYPING, &[K::Conv, K::To, K::State], &[K::Conv, K::To]),
    op("read", kind::READ, &[K::Conv, K::Peer, K::Seq], &[K::Conv, K::Peer, K::Seq]),
    op("read_get", kind::READ_GET, &[K::Conv, K::Peer, K::Seq], &[K::Conv, K::Peer, K::Seq]),
    op("profile_update", kind::PROFILE_UPDATE, &[K::Profile], &[K::Profile]),
    op("profile_get", kind::PROFILE_GET, &[K::UserIds], &[K::UserIds]),
    op("roster_action", kind::ROSTER_ACTION, &[K::Action, K::User, K::Note], &[K::Action, K::User]),
    op("presence_set", kind::PRESENCE_SET, &[K::State, K::Text, K::Extra, K::ExtraB64], &[K::State]),
    op("presence_get", kind::PRESENCE_GET, &[K::UserIds], &[K::UserIds]),
    op("roster_get", kind::ROSTER_GET, &[K::List, K::After, K::Limit], &[K::List]),
    // A chunk of a large message's body, as a `Part` of its `Send` (docs/PROTOCOL.md 5.22).
    op(
        "send_part",
        kind::PART,
        &[
            K::Conv,
            K::To,
            K::ClientMsgId,
            K::BodyBytes,
            K::Offset,
            K::Body,
            K::BodyB64,
            K::Flags,
            K::BurnSecs,
        ],
        &[K::Conv, K::To, K::ClientMsgId, K::BodyBytes, K::Offset],
    ),
];

fn op_spec(name: &str) -> Option<&'static OpSpec> {
    OPS.iter().find(|o| o.name == name)
}

/// The fields of one request object, as parsed (absent ones zero).
#[derive(Default)]
struct Fields<'a> {
    seen: u64,
    op: Cow<'a, str>,
    id: Option<Id>,
    name: Cow<'a, str>,
    password: Cow<'a, str>,
    device_id: Cow<'a, str>,
    token: Cow<'a, str>,
    note: Cow<'a, str>,
    text: Cow<'a, str>,
    extra: Option<Cow<'a, str>>,
    extra_b64: Option<Cow<'a, str>>,
    body: Option<Cow<'a, str>>,
    body_b64: Option<Cow<'a, str>>,
    device_type: u8,
    conv: u8,
    direction: u8,
    publish: u8,
    action: u8,
    ttl_secs: u32,
    limit: u32,
    subscribers_max: u32,
    nonce: u64,
    to: u64,
    client_msg_id: u64,
    peer: u64,
    seq: u64,
    anchor_seq: u64,
    reserved: u64,
    room_id: u64,
    group_id: u64,
    user_id: u64,
    until_ms: u64,
    after_user: u64,
    after_group: u64,
    session_id: u64,
    state: u8,
    flags: u8,
    burn_secs: u32,
    body_bytes: u32,
    offset: u32,
    user: u64,
    list: u8,
    after: u64,
    publishers: Vec<u64>,
    user_ids: Vec<u64>,
    profile: Profile<'a>,
}

/// A group `profile` object, as parsed.
#[derive(Default)]
struct Profile<'a> {
    seen: u16,
    name: Cow<'a, str>,
    topic: Cow<'a, str>,
    avatar_url: Cow<'a, str>,
    extra: Option<Cow<'a, str>>,
    extra_b64: Option<Cow<'a, str>>,
    join_policy: u8,
    invite_policy: u8,
    nickname: Cow<'a, str>,
    gender: u8,
    birthday: u32,
    area: Cow<'a, str>,
}

/// The fields of a `profile` object: a group's (the first 7) or a user's (`avatar_url`,
/// `extra`, `extra_b64` and the last 4).
const PROFILE_KEYS: [&str; 11] = [
    "name",
    "topic",
    "avatar_url",
    "extra",
    "extra_b64",
    "join_policy",
    "invite_policy",
    "nickname",
    "gender",
    "birthday",
    "area",
];
/// Bits of the group-only and the user-only profile fields.
const GROUP_ONLY: u16 = 0b000_0110_0011;
const USER_ONLY: u16 = 0b111_1000_0000;

/// Parse and check a request text, and build its frame.
fn parse(text: &str) -> Result<Request, RequestError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let f = de::Deserializer::deserialize_map(&mut de, RequestVisitor).map_err(json_error)?;
    de.end().map_err(json_error)?;
    build(f)
}

fn json_error(e: serde_json::Error) -> RequestError {
    use serde_json::error::Category;
    let full = e.to_string();
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => RequestError::Syntax(full),
        Category::Data => {
            // Our own messages name the field; the position adds nothing.
            let at = format!(" at line {} column {}", e.line(), e.column());
            RequestError::Invalid(full.strip_suffix(&at).unwrap_or(&full).to_owned())
        }
    }
}

fn invalid(message: String) -> RequestError {
    RequestError::Invalid(message)
}

/// Check the fields against the op and build the frame.
fn build(f: Fields<'_>) -> Result<Request, RequestError> {
    if f.seen & K::Op.bit() == 0 {
        return Err(invalid("field `op` is required".into()));
    }
    let spec = op_spec(&f.op).ok_or_else(|| RequestError::UnknownOp(clip(&f.op).to_owned()))?;
    let (name, k) = (spec.name, spec.kind);
    let common = K::Op.bit() | K::Id.bit();
    if let Some(key) = first_key(f.seen & !(spec.fields | common)) {
        return Err(invalid(format!("field `{}` does not belong to op `{name}`", key.name())));
    }
    if let Some(key) = first_key(spec.required & !f.seen) {
        return Err(invalid(format!("field `{}` is required for op `{name}`", key.name())));
    }
    let mut key = 0;
    let mut ack_refused = false;
    let mut last_part = false;
    let frame = match k {
        kind::REGISTER => {
            archive(k, &protocol::Register { name: f.name.into_owned(), password: f.password.into_owned() })
        }
        kind::LOGIN => archive(
            k,
            &protocol::Login {
                name: f.name.into_owned(),
                password: f.password.into_owned(),
                device_type: f.device_type,
                device_id: f.device_id.into_owned(),
            },
        ),
        kind::LOGIN_TOKEN => archive(
            k,
            &protocol::LoginToken {
                token: f.token.into_owned(),
                device_type: f.device_type,
                device_id: f.device_id.into_owned(),
            },
        ),
        kind::ISSUE_TOKEN => archive(k, &protocol::IssueToken { ttl_secs: f.ttl_secs }),
        kind::PING => archive(k, &protocol::Ping { nonce: f.nonce }),
        kind::SEND if name == "recall" => {
            key = f.client_msg_id;
            let (flags, body) = (protocol::send_flags::RECALL, f.seq.to_le_bytes());
            Ok(encode_send(
                k,
                SendRoot { conv: f.conv, flags, burn_secs: 0, to: f.to, client_msg_id: key },
                &body,
            ))
        }
        kind::SEND | kind::STREAM => {
            key = f.client_msg_id;
            let body = bytes_field(f.body, f.body_b64, "body")?;
            let root = SendRoot {
                conv: f.conv,
                flags: f.flags,
                burn_secs: f.burn_secs,
                to: f.to,
                client_msg_id: key,
            };
            Ok(encode_send(k, root, &body))
        }
        kind::PART => {
            key = f.client_msg_id;
            let chunk = bytes_field(f.body, f.body_b64, "body")?;
            let root = SendRoot {
                conv: f.conv,
                flags: f.flags,
                burn_secs: f.burn_secs,
                to: f.to,
                client_msg_id: key,
            };
            let (frame, last) = encode_part(root, f.body_bytes as usize, f.offset as usize, &chunk)?;
            last_part = last;
            Ok(frame)
        }
        kind::DELIVERY_ACK => {
            ack_refused = match f.conv {
                conv::DIRECT => f.peer == 0 || is_group_id(f.peer),
                conv::GROUP => !is_group_id(f.peer),
                _ => true,
            };
            archive(k, &protocol::DeliveryAck { conv: f.conv, peer: f.peer, seq: f.seq })
        }
        kind::LOGOUT => archive(k, &protocol::Logout { reserved: f.reserved }),
        kind::HISTORY => archive(
            k,
            &protocol::History {
                conv: f.conv,
                peer: f.peer,
                anchor_seq: f.anchor_seq,
                direction: f.direction,
                limit: f.limit,
            },
        ),
        kind::ROOM_CREATE => archive(
            k,
            &protocol::RoomCreate {
                publish: f.publish,
                subscribers_max: f.subscribers_max,
                publishers: f.publishers,
            },
        ),
        kind::ROOM_SUBSCRIBE | kind::ROOM_UNSUBSCRIBE | kind::ROOM_DELETE => {
            key = f.room_id;
            archive(k, &protocol::RoomRef { room_id: f.room_id })
        }
        kind::ROOM_PUBLISH => {
            key = f.client_msg_id;
            let body = bytes_field(f.body, f.body_b64, "body")?;
            Ok(encode_room_publish(f.room_id, f.client_msg_id, &body))
        }
        kind::GROUP_CREATE => archive(k, &protocol::GroupCreate { profile: group_profile(f.profile)? }),
        kind::GROUP_UPDATE => {
            archive(k, &protocol::GroupUpdate { group_id: f.group_id, profile: group_profile(f.profile)? })
        }
        kind::GROUP_ACTION => archive(
            k,
            &protocol::GroupAction {
                group_id: f.group_id,
                action: f.action,
                user_id: f.user_id,
                until_ms: f.until_ms,
                note: f.note.into_owned(),
            },
        ),
        kind::GROUP_GET | kind::GROUP_REQUESTS => archive(k, &protocol::GroupRef { group_id: f.group_id }),
        kind::GROUP_MEMBERS => archive(
            k,
            &protocol::GroupMembers { group_id: f.group_id, after_user: f.after_user, limit: f.limit },
        ),
        kind::MY_GROUPS => archive(k, &protocol::MyGroups { after_group: f.after_group, limit: f.limit }),
        kind::MY_SESSIONS => archive(k, &protocol::MySessions { reserved: f.reserved }),
        kind::SESSION_LOGOUT => archive(k, &protocol::SessionLogout { session_id: f.session_id }),
        kind::TYPING => archive(k, &protocol::Typing { to: f.to, conv: f.conv, state: f.state }),
        kind::READ => archive(k, &protocol::Read { conv: f.conv, peer: f.peer, seq: f.seq }),
        kind::READ_GET => archive(k, &protocol::ReadGet { conv: f.conv, peer: f.peer, seq: f.seq }),
        kind::PROFILE_UPDATE => archive(k, &protocol::ProfileUpdate { profile: user_profile(f.profile)? }),
        kind::PROFILE_GET => archive(k, &protocol::ProfileGet { user_ids: f.user_ids }),
        kind::ROSTER_ACTION => {
            archive(k, &protocol::RosterAction { action: f.action, user: f.user, note: f.note.into_owned() })
        }
        kind::ROSTER_GET => archive(k, &protocol::RosterGet { list: f.list, after: f.after, limit: f.limit }),
        kind::PRESENCE_SET => {
            let extra = bytes_field(f.extra, f.extra_b64, "extra")?.into_owned();
            archive(k, &protocol::PresenceSet { state: f.state, text: f.text.into_owned(), extra })
        }
        kind::PRESENCE_GET => archive(k, &protocol::PresenceGet { user_ids: f.user_ids }),
        kind::GROUP_ADD_MEMBERS => {
            archive(k, &protocol::GroupAddMembers { group_id: f.group_id, user_ids: f.user_ids })
        }
        _ => return Err(invalid(format!("op `{name}` has no encoding"))),
    }?;
    Ok(Request { frame, id: f.id, key, ack_refused, last_part })
}

/// The first field of a bit set, in declaration order.
fn first_key(set: u64) -> Option<Key> {
    if set == 0 {
        return None;
    }
    Key::ALL.iter().copied().find(|k| set & k.bit() != 0)
}

/// A `Vec<u8>` field given as UTF-8 text (`name`) or as base64 (`name_b64`), not both.
fn bytes_field<'a>(
    text: Option<Cow<'a, str>>,
    b64: Option<Cow<'_, str>>,
    name: &str,
) -> Result<Cow<'a, [u8]>, RequestError> {
    let bytes = match (text, b64) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!("fields `{name}` and `{name}_b64` both given: give one")))
        }
        (Some(Cow::Borrowed(t)), None) => Cow::Borrowed(t.as_bytes()),
        (Some(Cow::Owned(t)), None) => Cow::Owned(t.into_bytes()),
        (None, Some(b)) => Cow::Owned(
            B64.decode(b.as_bytes())
                .map_err(|e| invalid(format!("field `{name}_b64`: not standard base64: {e}")))?,
        ),
        (None, None) => Cow::Borrowed(&[][..]),
    };
    if bytes.len() > BODY_BYTES_MAX {
        return Err(invalid(format!("field `{name}`: over {BODY_BYTES_MAX} bytes")));
    }
    Ok(bytes)
}

/// The first field of `p` among `bits`, if any.
fn stray_field(p: &Profile<'_>, bits: u16) -> Option<&'static str> {
    (0..PROFILE_KEYS.len()).find(|&i| p.seen & bits & (1 << i) != 0).map(|i| PROFILE_KEYS[i])
}

fn user_profile(p: Profile<'_>) -> Result<protocol::UserProfile, RequestError> {
    if let Some(name) = stray_field(&p, GROUP_ONLY) {
        return Err(invalid(format!("field `profile`: unknown field `{name}` (a group's)")));
    }
    let extra = bytes_field(p.extra, p.extra_b64, "extra")
        .map_err(|e| invalid(format!("field `profile`: {e}")))?
        .into_owned();
    Ok(protocol::UserProfile {
        nickname: p.nickname.into_owned(),
        avatar_url: p.avatar_url.into_owned(),
        gender: p.gender,
        birthday: p.birthday,
        area: p.area.into_owned(),
        extra,
    })
}

fn group_profile(p: Profile<'_>) -> Result<protocol::GroupProfile, RequestError> {
    if let Some(name) = stray_field(&p, USER_ONLY) {
        return Err(invalid(format!("field `profile`: unknown field `{name}` (a user's)")));
    }
    let extra = bytes_field(p.extra, p.extra_b64, "extra")
        .map_err(|e| invalid(format!("field `profile`: {e}")))?
        .into_owned();
    Ok(protocol::GroupProfile {
        name: p.name.into_owned(),
        topic: p.topic.into_owned(),
        avatar_url: p.avatar_url.into_owned(),
        extra,
        join_policy: p.join_policy,
        invite_policy: p.invite_policy,
    })
}

/// A frame of `k` around `value`'s archive, in an aligned buffer (as [`frame::encode`] builds
/// it: the payload starts 8 bytes in, so payload-relative alignment is the archive's).
fn archive<T>(k: u16, value: &T) -> Result<RequestFrame, RequestError>
where
    T: for<'a> Serialize<HighSerializer<AlignedVec<16>, ArenaHandle<'a>, rancor::Error>>,
{
    let mut bytes = AlignedVec::<16>::with_capacity(128);
    bytes.extend_from_slice(&[0; HEADER_BYTES]);
    // Only a value past the archive's 32-bit offsets fails (gigabytes of text).
    let bytes = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, bytes)
        .map_err(|e| invalid(format!("too large to encode: {e}")))?;
    Ok(finish(k, bytes))
}

/// Pad the payload after the header and write the header.
fn finish(k: u16, mut bytes: AlignedVec<16>) -> RequestFrame {
    let len = bytes.len() - HEADER_BYTES;
    bytes.resize(frame::frame_bytes(len), 0);
    Header { len: len as u32, kind: k, flags: 0 }.write(&mut bytes[..HEADER_BYTES]);
    RequestFrame { bytes }
}

/// Start a frame whose archive is `body` then a root of `root_bytes`: header, body, zeros up
/// to the root's 8-alignment.
fn start_with_body(body: &[u8], root_bytes: usize) -> AlignedVec<16> {
    let root = frame::padded(body.len());
    let mut bytes = AlignedVec::<16>::with_capacity(frame::frame_bytes(root + root_bytes));
    bytes.extend_from_slice(&[0; HEADER_BYTES]);
    bytes.extend_from_slice(body);
    bytes.resize(HEADER_BYTES + root, 0);
    bytes
}

/// An `ArchivedVec`: the offset from the field (at payload offset `at`) to the elements (at
/// payload offset 0), then the length.
fn push_vec_ptr(bytes: &mut AlignedVec<16>, at: usize, len: usize) {
    bytes.extend_from_slice(&(-(at as i64) as i32).to_le_bytes());
    bytes.extend_from_slice(&(len as u32).to_le_bytes());
}

/// The fields of a `Send` beside its body.
#[derive(Clone, Copy)]
struct SendRoot {
    conv: u8,
    flags: u8,
    burn_secs: u32,
    to: u64,
    client_msg_id: u64,
}

/// A `Send` archive (kinds SEND and STREAM), written directly as rkyv lays it out
/// (`protocol::Send`): the body, zeros to 8-align, then the 32-byte root — `conv`, `flags`, 2
/// padding bytes, `burn_secs`, `to`, `client_msg_id`, the body's relative pointer and length.
fn encode_send(k: u16, s: SendRoot, body: &[u8]) -> RequestFrame {
    let mut bytes = start_with_body(body, 32);
    let root = bytes.len() - HEADER_BYTES;
    push_send_root(&mut bytes, s, root, body.len());
    finish(k, bytes)
}

/// A `Send`'s 32-byte root, at payload offset `root` (its body of `body_len` bytes at 0).
fn push_send_root(bytes: &mut AlignedVec<16>, s: SendRoot, root: usize, body_len: usize) {
    bytes.extend_from_slice(&[s.conv, s.flags, 0, 0]);
    bytes.extend_from_slice(&s.burn_secs.to_le_bytes());
    bytes.extend_from_slice(&s.to.to_le_bytes());
    bytes.extend_from_slice(&s.client_msg_id.to_le_bytes());
    push_vec_ptr(bytes, root + 24, body_len);
}

/// The bytes a `send_part` chunk may add to its `Part` frame's payload beside itself: the
/// part's header, at most 7 zeros to align the root, the 32-byte root. A chunk of at most
/// `frame_bytes_max` − this always fits.
pub const PART_CHUNK_OVERHEAD: usize = 64;

const _: () = assert!(PART_CHUNK_OVERHEAD >= protocol::part::HEADER_BYTES + 7 + 32);

/// A `Part` frame (docs/PROTOCOL.md 5.22) of the `Send` archive that [`encode_send`] writes for
/// `s` and a body of `body_bytes` bytes. The body comes first in that archive, so `chunk`, the
/// body's bytes from `offset` on, is the payload's bytes from `offset` on; the chunk that ends
/// the body (`true`) also carries the zeros to the root's alignment and the root.
fn encode_part(
    s: SendRoot,
    body_bytes: usize,
    offset: usize,
    chunk: &[u8],
) -> Result<(RequestFrame, bool), RequestError> {
    use protocol::part::{PartHeader, HEADER_BYTES as PART_HEADER};
    if body_bytes > BODY_BYTES_MAX {
        return Err(invalid(format!("field `body_bytes`: over {BODY_BYTES_MAX}")));
    }
    let end = offset + chunk.len();
    if end > body_bytes {
        return Err(invalid(format!(
            "op `send_part`: the chunk ends at byte {end}, past `body_bytes` {body_bytes}"
        )));
    }
    if chunk.is_empty() && body_bytes != 0 {
        return Err(invalid("op `send_part`: the chunk is empty (only a body of 0 bytes is)".into()));
    }
    let last = end == body_bytes;
    let root = frame::padded(body_bytes);
    let total = root + 32;
    let h = PartHeader { id: s.client_msg_id, total: total as u32, offset: offset as u32, kind: kind::SEND };
    let tail = if last { total - body_bytes } else { 0 };
    let mut bytes = AlignedVec::<16>::with_capacity(frame::frame_bytes(PART_HEADER + chunk.len() + tail));
    bytes.extend_from_slice(&[0; HEADER_BYTES]);
    bytes.extend_from_slice(&h.bytes());
    bytes.extend_from_slice(chunk);
    if last {
        bytes.resize(bytes.len() + root - body_bytes, 0);
        push_send_root(&mut bytes, s, root, body_bytes);
    }
    Ok((finish(kind::PART, bytes), last))
}

/// A `RoomPublish` archive, written as [`encode_send`] writes a `Send` (docs/PROTOCOL.md 5.11):
/// the body, zeros, then the 24-byte root — `room_id`, `client_msg_id`, the body's pointer.
fn encode_room_publish(room_id: u64, client_msg_id: u64, body: &[u8]) -> RequestFrame {
    let mut bytes = start_with_body(body, 24);
    let root = bytes.len() - HEADER_BYTES;
    bytes.extend_from_slice(&room_id.to_le_bytes());
    bytes.extend_from_slice(&client_msg_id.to_le_bytes());
    push_vec_ptr(&mut bytes, root + 16, body.len());
    finish(kind::ROOM_PUBLISH, bytes)
}

/// `s`, cut to at most [`QUOTE_BYTES_MAX`] bytes (at a character boundary).
fn clip(s: &str) -> &str {
    if s.len() <= QUOTE_BYTES_MAX {
        return s;
    }
    let mut end = QUOTE_BYTES_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Prefix a value's error with its field's name.
fn in_field<E: de::Error>(name: &str, e: E) -> E {
    E::custom(format_args!("field `{name}`: {e}"))
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object (a request)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if f.seen & key.bit() != 0 {
                return Err(de::Error::custom(format_args!("field `{}` given twice", key.name())));
            }
            f.seen |= key.bit();
            macro_rules! value {
                ($seed:expr) => {
                    map.next_value_seed($seed).map_err(|e| in_field(key.name(), e))?
                };
            }
            match key {
                K::Op => f.op = value!(StrSeed),
                K::Id => f.id = value!(IdSeed),
                K::Name => f.name = value!(StrSeed),
                K::Password => f.password = value!(StrSeed),
                K::DeviceId => f.device_id = value!(StrSeed),
                K::Token => f.token = value!(StrSeed),
                K::Note => f.note = value!(StrSeed),
                K::Text => f.text = value!(StrSeed),
                K::Extra => f.extra = Some(value!(StrSeed)),
                K::ExtraB64 => f.extra_b64 = Some(value!(StrSeed)),
                K::Body => f.body = Some(value!(StrSeed)),
                K::BodyB64 => f.body_b64 = Some(value!(StrSeed)),
                K::DeviceType => f.device_type = value!(IntSeed::U8) as u8,
                K::Conv => f.conv = value!(IntSeed::U8) as u8,
                K::Direction => f.direction = value!(IntSeed::U8) as u8,
                K::Publish => f.publish = value!(IntSeed::U8) as u8,
                K::Action => f.action = value!(IntSeed::U8) as u8,
                K::TtlSecs => f.ttl_secs = value!(IntSeed::U32) as u32,
                K::Limit => f.limit = value!(IntSeed::U32) as u32,
                K::SubscribersMax => f.subscribers_max = value!(IntSeed::U32) as u32,
                K::Nonce => f.nonce = value!(U64Seed),
                K::To => f.to = value!(U64Seed),
                K::ClientMsgId => f.client_msg_id = value!(U64Seed),
                K::Peer => f.peer = value!(U64Seed),
                K::Seq => f.seq = value!(U64Seed),
                K::AnchorSeq => f.anchor_seq = value!(U64Seed),
                K::Reserved => f.reserved = value!(U64Seed),
                K::RoomId => f.room_id = value!(U64Seed),
                K::GroupId => f.group_id = value!(U64Seed),
                K::UserId => f.user_id = value!(U64Seed),
                K::UntilMs => f.until_ms = value!(U64Seed),
                K::AfterUser => f.after_user = value!(U64Seed),
                K::AfterGroup => f.after_group = value!(U64Seed),
                K::SessionId => f.session_id = value!(U64Seed),
                K::State => f.state = value!(IntSeed::U8) as u8,
                K::Flags => f.flags = value!(IntSeed::U8) as u8,
                K::BurnSecs => f.burn_secs = value!(IntSeed::U32) as u32,
                K::BodyBytes => f.body_bytes = value!(IntSeed::U32) as u32,
                K::Offset => f.offset = value!(IntSeed::U32) as u32,
                K::User => f.user = value!(U64Seed),
                K::List => f.list = value!(IntSeed::U8) as u8,
                K::After => f.after = value!(U64Seed),
                K::Publishers => f.publishers = value!(U64ListSeed),
                K::UserIds => f.user_ids = value!(U64ListSeed),
                K::Profile => f.profile = value!(ProfileSeed),
            }
        }
        Ok(f)
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Key::from_name(v).ok_or_else(|| E::custom(format_args!("unknown field `{}`", clip(v))))
    }
}

/// A JSON string, borrowed from the text when it has no escapes.
struct StrSeed;

impl<'de> DeserializeSeed<'de> for StrSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for StrSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// A request `id`: any string or number (null: none), kept as the JSON text to echo.
struct IdSeed;

impl<'de> DeserializeSeed<'de> for IdSeed {
    type Value = Option<Id>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<Id>, D::Error> {
        d.deserialize_any(self)
    }
}

impl IdSeed {
    fn keep<E: de::Error>(text: String) -> Result<Option<Id>, E> {
        if text.len() > ID_BYTES_MAX {
            return Err(E::custom(format_args!("longer than {ID_BYTES_MAX} bytes")));
        }
        Ok(Some(text.into_boxed_str()))
    }
}

impl<'de> Visitor<'de> for IdSeed {
    type Value = Option<Id>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Id>, E> {
        if v.len() > ID_BYTES_MAX {
            return Err(E::custom(format_args!("longer than {ID_BYTES_MAX} bytes")));
        }
        let mut text = String::with_capacity(v.len() + 2);
        push_json_str(&mut text, v);
        Self::keep(text)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<Id>, E> {
        Self::keep(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<Id>, E> {
        Self::keep(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<Id>, E> {
        // serde_json writes the shortest text that reads back as the same number.
        Self::keep(serde_json::to_string(&v).map_err(E::custom)?)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<Id>, E> {
        Ok(None)
    }
}

/// Why a JSON number that is not a `u64` (serde_json hands over fractions, exponents and
/// integers beyond 64 bits as `f64`) does not fit a field of type `ty`.
fn not_integer<E: de::Error>(v: f64, ty: &str) -> E {
    if v.fract() == 0.0 && v.abs() >= 1e15 {
        E::custom(format_args!("{v} is out of range for a {ty}"))
    } else {
        E::custom(format_args!("expected a {ty}, got {v} (not an integer)"))
    }
}

/// A `u64` field: a non-negative JSON integer, or a string of decimal digits.
struct U64Seed;

impl<'de> DeserializeSeed<'de> for U64Seed {
    type Value = u64;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for U64Seed {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a u64 (a non-negative integer, or a string of decimal digits)")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format_args!("{v} is out of range for a u64")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(not_integer(v, "u64"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(E::custom(format_args!(
                "expected a u64, got the string \"{}\" (not decimal digits)",
                clip(v)
            )));
        }
        v.parse().map_err(|_| E::custom(format_args!("{} is out of range for a u64", clip(v))))
    }
}

/// A `u8`, `u16` or `u32` field: a JSON number in range.
#[derive(Clone, Copy)]
struct IntSeed {
    ty: &'static str,
    max: u64,
}

impl IntSeed {
    const U8: IntSeed = IntSeed { ty: "u8", max: u8::MAX as u64 };
    const U32: IntSeed = IntSeed { ty: "u32", max: u32::MAX as u64 };
}

impl<'de> DeserializeSeed<'de> for IntSeed {
    type Value = u64;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IntSeed {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} (a number, 0 to {})", self.ty, self.max)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if v > self.max {
            return Err(E::custom(format_args!("{v} is out of range for a {} (0 to {})", self.ty, self.max)));
        }
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => {
                Err(E::custom(format_args!("{v} is out of range for a {} (0 to {})", self.ty, self.max)))
            }
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(not_integer(v, self.ty))
    }
}

/// A `Vec<u64>` field: an array of `u64`s (numbers or decimal strings).
struct U64ListSeed;

impl<'de> DeserializeSeed<'de> for U64ListSeed {
    type Value = Vec<u64>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<u64>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for U64ListSeed {
    type Value = Vec<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of u64s")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
        let mut out = Vec::new();
        loop {
            let i = out.len();
            match seq.next_element_seed(U64Seed) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => return Ok(out),
                Err(e) => return Err(de::Error::custom(format_args!("element {i}: {e}"))),
            }
        }
    }
}

/// A group `profile` object.
struct ProfileSeed;

impl<'de> DeserializeSeed<'de> for ProfileSeed {
    type Value = Profile<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Profile<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ProfileSeed {
    type Value = Profile<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a group profile object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Profile<'de>, A::Error> {
        let mut p = Profile::default();
        while let Some(name) = map.next_key_seed(StrSeed)? {
            let Some(i) = PROFILE_KEYS.iter().position(|k| *k == name) else {
                return Err(de::Error::custom(format_args!("unknown field `{}`", clip(&name))));
            };
            let bit = 1u16 << i;
            if p.seen & bit != 0 {
                return Err(de::Error::custom(format_args!("field `{name}` given twice")));
            }
            p.seen |= bit;
            macro_rules! value {
                ($seed:expr) => {
                    map.next_value_seed($seed).map_err(|e| in_field(PROFILE_KEYS[i], e))?
                };
            }
            match i {
                0 => p.name = value!(StrSeed),
                1 => p.topic = value!(StrSeed),
                2 => p.avatar_url = value!(StrSeed),
                3 => p.extra = Some(value!(StrSeed)),
                4 => p.extra_b64 = Some(value!(StrSeed)),
                5 => p.join_policy = value!(IntSeed::U8) as u8,
                6 => p.invite_policy = value!(IntSeed::U8) as u8,
                7 => p.nickname = value!(StrSeed),
                8 => p.gender = value!(IntSeed::U8) as u8,
                9 => p.birthday = value!(IntSeed::U32) as u32,
                _ => p.area = value!(StrSeed),
            }
        }
        Ok(p)
    }
}

/// What a refused request's text still tells: its `id` and op, read leniently (a field of the
/// wrong type elsewhere does not hide them), up to where the text stops being JSON.
#[derive(Default)]
struct Salvage {
    id: Option<Id>,
    op: Option<String>,
    /// The op's kind, 0 if unknown.
    kind: u16,
}

fn salvage(text: &str) -> Salvage {
    let mut found = Salvage::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let _ = de::Deserializer::deserialize_map(&mut de, SalvageVisitor(&mut found));
    found
}

struct SalvageVisitor<'s>(&'s mut Salvage);

impl<'de> Visitor<'de> for SalvageVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(StrSeed)? {
            match &*key {
                "id" => self.0.id = map.next_value_seed(IdSeed)?,
                "op" => {
                    let op = map.next_value_seed(StrSeed)?;
                    self.0.kind = op_spec(&op).map_or(0, |o| o.kind);
                    self.0.op = Some(op.into_owned());
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// An `error` object of the JSON layer.
fn refusal(code: ErrorCode, request_kind: u16, id: Option<&str>, message: &str) -> String {
    let mut s = String::with_capacity(160 + message.len());
    let mut o = Out::open(&mut s, "error", kind::ERROR);
    o.id(id);
    o.num("code", code.code() as u64);
    o.code_name("code_name", code.code());
    o.num("request_kind", request_kind as u64);
    o.u64s("client_msg_id", 0);
    o.text("message", message);
    o.close();
    s
}

// ---- request ids ----

/// One connection's record of the request ids whose answers are still to come; see docs/JSON.md
/// ("Request ids") for the rules. The session handles a connection's frames one at a time and
/// finishes some (login, history, group requests, …) before it reads the next, so those answers
/// come in request order; sends, room requests and refusals of streams and publishes carry a
/// key (`client_msg_id`, `room_id`) instead. Every queue is bounded.
#[derive(Default)]
pub struct Correlator {
    pending: Pending,
    /// A frame's payload copied to 8-alignment when the queued bytes are not aligned.
    scratch: AlignedVec<16>,
}

impl Correlator {
    pub fn new() -> Correlator {
        Correlator::default()
    }

    /// Requests whose answers are expected (or, for streams and publishes, whose ids are kept).
    pub fn held(&self) -> usize {
        let p = &self.pending;
        p.ordered.items.iter().map(|s| s.count as usize).sum::<usize>()
            + p.sends.items.len()
            + p.streams.items.len()
            + p.publishes.items.len()
            + p.parts.items.len()
            + p.creates.items.len()
            + p.rooms.items.len()
            + p.acks.items.len()
    }
}

/// A queue of pending requests, oldest first. Past its cap the oldest entry is dropped and
/// counted in `lost`: answers matched by order then skip that many, keeping their places.
struct Queue<T> {
    items: VecDeque<T>,
    lost: u64,
    cap: usize,
}

impl<T> Queue<T> {
    fn new(cap: usize) -> Queue<T> {
        Queue { items: VecDeque::new(), lost: 0, cap }
    }

    fn push(&mut self, item: T) {
        if self.items.len() >= self.cap {
            self.items.pop_front();
            self.lost += 1;
        }
        self.items.push_back(item);
    }

    /// The next in order (`None` for one dropped at the cap).
    fn pop_front(&mut self) -> Option<T> {
        if self.lost > 0 {
            self.lost -= 1;
            return None;
        }
        self.items.pop_front()
    }

    /// The oldest (or newest) entry `matches` accepts, taken out.
    fn take(&mut self, newest: bool, matches: impl Fn(&T) -> bool) -> Option<T> {
        let i =
            if newest { self.items.iter().rposition(matches) } else { self.items.iter().position(matches) };
        self.items.remove(i?)
    }
}

/// Requests answered in order: runs of id-less requests of one kind share a slot.
struct Slot {
    kind: u16,
    id: Option<Id>,
    count: u32,
}

struct Pending {
    /// A `login_ok` went out: from then on no request is refused NotLoggedIn.
    logged_in: bool,
    /// Requests the session answers before it reads the next frame (at once, or after waiting):
    /// register, login, login_token, issue_token, ping, logout, history, the group requests.
    ordered: Queue<Slot>,
    /// Every send, by `client_msg_id`: each gets exactly one answer.
    sends: Queue<(u64, Option<Id>)>,
    /// Streams and publishes with an id (all of them before login), by `client_msg_id`.
    streams: Queue<(u64, Option<Id>)>,
    publishes: Queue<(u64, Option<Id>)>,
    /// Parts (`send_part`) that may be refused, by `client_msg_id`: those with an id (all of
    /// them before login), and every part that ends its body, marked `true` — its id waits in
    /// `sends`, for the `Send`'s answer, unless the part itself is refused.
    parts: Queue<(u64, bool, Option<Id>)>,
    /// The server's `frame_bytes_max` from `login_ok` (0 before): no part is built larger.
    frame_bytes_max: usize,
    /// Room creates, answered in the order the rooms' owners answer.
    creates: Queue<Option<Id>>,
    /// Room subscribe, unsubscribe and delete, by kind and `room_id`.
    rooms: Queue<(u16, u64, Option<Id>)>,
    /// Delivery acks the session will refuse (all of them before login): `(refused, id)`.
    acks: Queue<(bool, Option<Id>)>,
}

impl Default for Pending {
    fn default() -> Pending {
        Pending {
            logged_in: false,
            ordered: Queue::new(PENDING_MAX),
            sends: Queue::new(PENDING_MAX),
            streams: Queue::new(UNANSWERED_MAX),
            publishes: Queue::new(UNANSWERED_MAX),
            parts: Queue::new(UNANSWERED_MAX),
            frame_bytes_max: 0,
            creates: Queue::new(PENDING_MAX),
            rooms: Queue::new(PENDING_MAX),
            acks: Queue::new(PENDING_MAX),
        }
    }
}

/// Whether the session answers requests of kind `k` in order (see [`Pending::ordered`]).
fn answered_in_order(k: u16) -> bool {
    matches!(
        k,
        kind::REGISTER
            | kind::LOGIN
            | kind::LOGIN_TOKEN
            | kind::ISSUE_TOKEN
            | kind::PING
            | kind::LOGOUT
            | kind::HISTORY
            | kind::GROUP_CREATE
            | kind::GROUP_UPDATE
            | kind::GROUP_ACTION
            | kind::GROUP_GET
            | kind::GROUP_MEMBERS
            | kind::MY_GROUPS
            | kind::GROUP_REQUESTS
            | kind::GROUP_ADD_MEMBERS
            | kind::MY_SESSIONS
            | kind::SESSION_LOGOUT
            | kind::PROFILE_UPDATE
            | kind::READ_GET
            | kind::PROFILE_GET
            | kind::ROSTER_ACTION
            | kind::PRESENCE_SET
            | kind::PRESENCE_GET
            | kind::ROSTER_GET
    )
}

impl Pending {
    /// `req`, unless its frame is over the server's `frame_bytes_max` (known from `login_ok`):
    /// the session would close the connection (FrameTooLarge); refused here, it stays open.
    fn fits(&self, req: Request) -> Result<Request, RequestError> {
        let (n, max) = (req.frame.payload().len(), self.frame_bytes_max);
        if max == 0 || n <= max {
            return Ok(req);
        }
        let over = format!("its frame would be {n} bytes, over the server's frame_bytes_max {max}");
        Err(match req.frame.kind() {
            kind::PART => RequestError::TooLarge(format!(
                "op `send_part`: {over}: send chunks of at most {} bytes",
                max.saturating_sub(PART_CHUNK_OVERHEAD)
            )),
            kind::SEND => RequestError::BodyTooLarge(format!(
                "{over}: send a body over body_bytes_max with `send_part` (a large message)"
            )),
            kind::STREAM | kind::ROOM_PUBLISH => {
                RequestError::BodyTooLarge(format!("body too large: {over}"))
            }
            _ => RequestError::TooLarge(format!("request too large: {over}")),
        })
    }

    fn on_request(&mut self, k: u16, key: u64, ack_refused: bool, last_part: bool, id: Option<Id>) {
        // Before login every request but register, login, login_token, ping and logout is
        // refused NotLoggedIn (client_msg_id 0), in order: hold them all, ids or not.
        let anyway = !self.logged_in;
        match k {
            kind::SEND => self.sends.push((key, id)),
            kind::STREAM if anyway || id.is_some() => self.streams.push((key, id)),
            kind::ROOM_PUBLISH if anyway || id.is_some() => self.publishes.push((key, id)),
            kind::STREAM | kind::ROOM_PUBLISH => {}
            kind::PART if last_part => {
                self.sends.push((key, id));
                self.parts.push((key, true, None));
            }
            kind::PART if anyway || id.is_some() => self.parts.push((key, false, id)),
            kind::PART => {}
            kind::ROOM_CREATE => self.creates.push(id),
            kind::ROOM_SUBSCRIBE | kind::ROOM_UNSUBSCRIBE | kind::ROOM_DELETE => {
                self.rooms.push((k, key, id))
            }
            kind::DELIVERY_ACK if anyway || ack_refused => self.acks.push((ack_refused, id)),
            kind::DELIVERY_ACK => {}
            // Refused only now and then, later (RateLimited, a group's refusal): its errors
            // carry no id.
            kind::TYPING | kind::READ => {}
            _ => {
                debug_assert!(answered_in_order(k));
                let q = &mut self.ordered;
                match q.items.back_mut() {
                    Some(s) if id.is_none() && s.id.is_none() && s.kind == k && s.count < u32::MAX => {
                        s.count += 1
                    }
                    _ => {
                        if q.items.len() >= q.cap {
                            let dropped = q.items.pop_front().map_or(0, |s| s.count);
                            q.lost += dropped as u64;
                        }
                        q.items.push_back(Slot { kind: k, id, count: 1 });
                    }
                }
            }
        }
    }

    /// The next answer in order, if the request at the front is one `fits` accepts.
    fn answer_in_order(&mut self, fits: impl Fn(u16) -> bool) -> Option<Id> {
        let q = &mut self.ordered;
        if q.lost > 0 {
            q.lost -= 1;
            return None;
        }
        let front = q.items.front_mut()?;
        if !fits(front.kind) {
            return None;
        }
        if front.count > 1 {
            front.count -= 1;
            return None;
        }
        q.items.pop_front().and_then(|s| s.id)
    }

    /// A `history_msg`: it belongs to the history request at the front, which stays there
    /// until its `history_end`.
    fn history_page(&self) -> Option<Id> {
        let q = &self.ordered;
        match q.items.front() {
            Some(s) if q.lost == 0 && s.kind == kind::HISTORY => s.id.clone(),
            _ => None,
        }
    }

    /// The `login_ok` went out: every request still held was read after the login, so only
    /// those with an answer to come stay.
    fn on_login(&mut self) {
        self.logged_in = true;
        for q in [&mut self.streams, &mut self.publishes] {
            q.items.retain(|e| e.1.is_some());
            q.lost = 0;
        }
        self.parts.items.retain(|e| e.1 || e.2.is_some());
        self.parts.lost = 0;
        self.acks.items.retain(|e| e.0);
        self.acks.lost = 0;
        self.sends.lost = 0;
    }

    fn on_send_answer(&mut self, client_msg_id: u64) -> Option<Id> {
        // A large send is answered: its parts were all taken, so their ids are done with.
        let parts = &mut self.parts.items;
        if let Some(last) = parts.iter().position(|e| e.0 == client_msg_id && e.1) {
            let mut i = 0;
            parts.retain(|e| {
                i += 1;
                i > last + 1 || e.0 != client_msg_id
            });
        }
        self.sends.take(false, |e| e.0 == client_msg_id).and_then(|e| e.1)
    }

    /// A part refused (`error` with request_kind 27): the newest part with its `client_msg_id`
    /// (parts have no success answer), or the oldest part of all for NotLoggedIn. A part that
    /// ended its body takes its id back from `sends`: its `Send` will not be answered.
    fn on_part_error(&mut self, not_logged_in: bool, client_msg_id: u64) -> Option<Id> {
        let e = if not_logged_in {
            self.parts.pop_front()
        } else {
            self.parts.take(true, |e| e.0 == client_msg_id)
        };
        match e? {
            (cmid, true, _) => self.sends.take(true, |s| s.0 == cmid).and_then(|s| s.1),
            (_, false, id) => id,
        }
    }

    fn on_error(&mut self, code: u16, request_kind: u16, client_msg_id: u64) -> Option<Id> {
        let not_logged_in = code == ErrorCode::NotLoggedIn.code();
        let k = request_kind;
        match k {
            // NotLoggedIn carries client_msg_id 0: it answers the oldest.
            kind::SEND if not_logged_in => self.sends.pop_front().and_then(|e| e.1),
            kind::SEND => self.on_send_answer(client_msg_id),
            kind::PART => self.on_part_error(not_logged_in, client_msg_id),
            kind::STREAM | kind::ROOM_PUBLISH => {
                let q = if k == kind::STREAM { &mut self.streams } else { &mut self.publishes };
                if not_logged_in {
                    q.pop_front().and_then(|e| e.1)
                } else {
                    // No success answer: the newest with this id is the likeliest.
                    q.take(true, |e| e.0 == client_msg_id).and_then(|e| e.1)
                }
            }
            kind::ROOM_CREATE => self.creates.pop_front().flatten(),
            kind::ROOM_SUBSCRIBE | kind::ROOM_UNSUBSCRIBE | kind::ROOM_DELETE => {
                // Room refusals carry the room id in client_msg_id; NotLoggedIn carries 0.
                let room = client_msg_id;
                self.rooms.take(false, |e| e.0 == k && (not_logged_in || e.1 == room)).and_then(|e| e.2)
            }
            kind::DELIVERY_ACK => self.acks.pop_front().and_then(|e| e.1),
            // After login the catch-up reports its failures as errors of the login's kind;
            // a login request itself can then only be refused AlreadyLoggedIn.
            kind::LOGIN | kind::LOGIN_TOKEN
                if self.logged_in && code != ErrorCode::AlreadyLoggedIn.code() =>
            {
                None
            }
            _ if answered_in_order(k) => self.answer_in_order(|front| front == k),
            _ => None,
        }
    }

    fn on_room_ok(&mut self, request_kind: u16, room_id: u64) -> Option<Id> {
        match request_kind {
            kind::ROOM_CREATE => self.creates.pop_front().flatten(),
            k => self.rooms.take(false, |e| e.0 == k && e.1 == room_id).and_then(|e| e.2),
        }
    }
}

// ---- answers ----

/// One whole frame as the session queued it (header, payload, padding) as one JSON text, with
/// the `id` of the request it answers, if any.
pub fn answer(frame: &[u8], corr: &mut Correlator) -> String {
    let mut out = String::with_capacity(96 + frame.len() * 3 / 2);
    answer_into(frame, corr, &mut out);
    out
}

/// [`answer`], appended to `out`. A frame that cannot be read (never expected) becomes an
/// `error` object with code 50 (Internal).
pub fn answer_into(frame: &[u8], corr: &mut Correlator, out: &mut String) {
    let start = out.len();
    if let Err(why) = write_answer(frame, corr, out) {
        out.truncate(start);
        let message = format!("the gateway could not read a frame: {why}");
        out.push_str(&refusal(ErrorCode::Internal, 0, None, &message));
    }
}

/// The `type` of a server kind.
fn type_name(k: u16) -> Option<&'static str> {
    Some(match k {
        kind::REGISTER_OK => "register_ok",
        kind::LOGIN_OK => "login_ok",
        kind::TOKEN_ISSUED => "token_issued",
        kind::PONG => "pong",
        kind::SEND_ACK => "send_ack",
        kind::DELIVER => "deliver",
        kind::BYE => "bye",
        kind::ERROR => "error",
        kind::KICK => "kick",
        kind::HISTORY_MSG => "history_msg",
        kind::HISTORY_END => "history_end",
        kind::CATCHUP_END => "catch_up_end",
        kind::STREAM_MSG => "stream_msg",
        kind::RESYNC => "resync",
        kind::BROADCAST => "broadcast",
        kind::ROOM_OK => "room_ok",
        kind::ROOM_MSG => "room_msg",
        kind::ROOM_CLOSED => "room_closed",
        kind::MISSED => "missed",
        kind::GROUP_OK => "group_ok",
        kind::GROUP_INFO => "group_info",
        kind::GROUP_MEMBER_PAGE => "group_member_page",
        kind::GROUP_LIST => "group_list",
        kind::GROUP_REQUEST_PAGE => "group_request_page",
        kind::GROUP_JOIN_REQUEST => "group_join_request",
        kind::GROUP_DECISION => "group_decision",
        kind::SESSION_LIST => "session_list",
        kind::TYPING_NOTICE => "typing_notice",
        kind::READ_NOTICE => "read_notice",
        kind::READ_STATE => "read_state",
        kind::PROFILE_LIST => "profile_list",
        kind::ROSTER_OK => "roster_ok",
        kind::ROSTER_LIST => "roster_list",
        kind::ROSTER_NOTICE => "roster_notice",
        kind::PRESENCE_LIST => "presence_list",
        kind::PRESENCE_NOTICE => "presence_notice",
        // Never sent to a JSON session (large frames go whole), but named all the same.
        kind::PART_OUT => "part_out",
        _ => return None,
    })
}

/// `raw` if it is 8-aligned in memory, else a copy of it in `scratch`.
fn aligned<'a>(raw: &'a [u8], scratch: &'a mut AlignedVec<16>) -> &'a [u8] {
    if (raw.as_ptr() as usize).is_multiple_of(frame::ALIGN) {
        return raw;
    }
    scratch.clear();
    scratch.extend_from_slice(raw);
    &scratch[..]
}

fn write_answer(frame: &[u8], corr: &mut Correlator, out: &mut String) -> Result<(), String> {
    use protocol::*;
    if frame.len() < HEADER_BYTES {
        return Err(format!("{} bytes, less than a header", frame.len()));
    }
    let h = Header::read(frame);
    let len = h.len as usize;
    if frame.len() < HEADER_BYTES + len || frame.len() > frame::frame_bytes(len) {
        return Err(format!("{} bytes for a payload of {len}", frame.len()));
    }
    let k = h.kind;
    let ty = type_name(k).ok_or_else(|| format!("unknown kind {k}"))?;
    let payload = aligned(&frame[HEADER_BYTES..HEADER_BYTES + len], &mut corr.scratch);
    let p = &mut corr.pending;
    macro_rules! access {
        ($t:ty) => {
            frame::access::<$t>(payload).map_err(|e| format!("{}: {e}", kind::name(k)))?
        };
    }
    let mut o = Out::open(out, ty, k);
    match k {
        kind::REGISTER_OK => {
            let a = access!(ArchivedRegisterOk);
            o.id(p.answer_in_order(|f| f == kind::REGISTER).as_deref());
            o.u64s("user_id", a.user_id.to_native());
        }
        kind::LOGIN_OK => {
            let a = access!(ArchivedLoginOk);
            o.id(p.answer_in_order(|f| f == kind::LOGIN || f == kind::LOGIN_TOKEN).as_deref());
            p.on_login();
            p.frame_bytes_max = a.frame_bytes_max.to_native() as usize;
            o.u64s("user_id", a.user_id.to_native());
            o.u64s("session_id", a.session_id.to_native());
            o.u64s("server_time_ms", a.server_time_ms.to_native());
            o.num("idle_timeout_ms", a.idle_timeout_ms.to_native() as u64);
            o.num("frame_bytes_max", a.frame_bytes_max.to_native() as u64);
            o.num("body_bytes_max", a.body_bytes_max.to_native() as u64);
            o.num("inflight_max", a.inflight_max.to_native() as u64);
            o.num("protocol_version", a.protocol_version.to_native() as u64);
            o.num("large_body_bytes_max", a.large_body_bytes_max.to_native() as u64);
        }
        kind::TOKEN_ISSUED => {
            let a = access!(ArchivedTokenIssued);
            o.id(p.answer_in_order(|f| f == kind::ISSUE_TOKEN).as_deref());
            o.text("token", a.token.as_str());
            o.u64s("expires_at_ms", a.expires_at_ms.to_native());
        }
        kind::PONG => {
            let a = access!(ArchivedPong);
            o.id(p.answer_in_order(|f| f == kind::PING).as_deref());
            o.u64s("nonce", a.nonce.to_native());
            o.u64s("server_time_ms", a.server_time_ms.to_native());
        }
        kind::SEND_ACK => {
            let a = access!(ArchivedSendAck);
            o.id(p.on_send_answer(a.client_msg_id.to_native()).as_deref());
            o.u64s("client_msg_id", a.client_msg_id.to_native());
            o.u64s("msg_id", a.msg_id.to_native());
            o.u64s("seq", a.seq.to_native());
            o.u64s("ts_ms", a.ts_ms.to_native());
            o.flag("duplicate", a.duplicate);
        }
        kind::DELIVER | kind::HISTORY_MSG | kind::STREAM_MSG => {
            let stamp = Stamp::read(payload).ok_or("payload shorter than its stamp")?;
            let send = frame::access::<ArchivedSend>(&payload[Stamp::BYTES..])
                .map_err(|e| format!("{}: the Send archive: {e}", kind::name(k)))?;
            if k == kind::HISTORY_MSG {
                o.id(p.history_page().as_deref());
            }
            o.u64s("msg_id", stamp.msg_id);
            o.u64s("seq", stamp.seq);
            o.u64s("ts_ms", stamp.ts_ms);
            o.u64s("from", stamp.from);
            o.u64s("to", stamp.to);
            o.num("conv", stamp.conv as u64);
            o.u64s("client_msg_id", send.client_msg_id.to_native());
            // What is not a plain message's is written only when set.
            let (flags, burn_secs) = (send.flags, send.burn_secs.to_native());
            let state = payload[Stamp::STATE_AT];
            let tombstone = state != msg_state::PLAIN;
            if flags != 0 {
                o.num("flags", flags as u64);
            }
            if burn_secs != 0 {
                o.num("burn_secs", burn_secs as u64);
            }
            if tombstone {
                o.num("state", state as u64);
            }
            let body = send.body.as_slice();
            if tombstone {
                // A recalled or burned message: its body is gone (empty).
                o.bytes("body", body);
            } else if stamp.conv == conv::GROUP && stamp.from == 0 {
                // A group notice: its body is a GroupNotice archive (docs/PROTOCOL.md 7.3).
                match notice(body, &mut o) {
                    Ok(()) => {}
                    Err(()) => o.b64("body", body),
                }
            } else if flags & send_flags::RECALL != 0 {
                // A recall notice: its body is the seq it takes back (u64 LE).
                match crate::store::recalled_seq(body) {
                    Some(seq) => o.u64s("recall_seq", seq),
                    None => o.b64("body", body),
                }
            } else if flags & send_flags::BURNED != 0 && body.len().is_multiple_of(8) {
                // A burn notice: its body lists the seqs burned (u64 LE each).
                let seqs = body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
                o.u64_list("burned_seqs", seqs);
            } else {
                o.bytes("body", body);
            }
        }
        kind::BYE => {
            let _ = access!(ArchivedBye);
            o.id(p.answer_in_order(|f| f == kind::LOGOUT).as_deref());
        }
        kind::ERROR => {
            let a = access!(ArchivedError);
            let (code, rk, cmid) =
                (a.code.to_native(), a.request_kind.to_native(), a.client_msg_id.to_native());
            o.id(p.on_error(code, rk, cmid).as_deref());
            o.num("code", code as u64);
            o.code_name("code_name", code);
            o.num("request_kind", rk as u64);
            o.u64s("client_msg_id", cmid);
            o.text("message", a.message.as_str());
        }
        kind::KICK => {
            let a = access!(ArchivedKick);
            let reason = a.reason.to_native();
            o.num("reason", reason as u64);
            o.code_name("reason_name", reason);
            o.text("message", a.message.as_str());
        }
        kind::HISTORY_END => {
            let a = access!(ArchivedHistoryEnd);
            o.id(p.answer_in_order(|f| f == kind::HISTORY).as_deref());
            o.num("conv", a.conv as u64);
            o.u64s("peer", a.peer.to_native());
            o.num("count", a.count.to_native() as u64);
            o.flag("more", a.more);
        }
        kind::CATCHUP_END => {
            let a = access!(ArchivedCatchUpEnd);
            o.num("count", a.count.to_native() as u64);
            o.flag("more", a.more);
            o.num("unavailable", a.unavailable.to_native() as u64);
        }
        kind::RESYNC => {}
        kind::BROADCAST => {
            let a = access!(ArchivedBroadcast);
            o.u64s("ts_ms", a.ts_ms.to_native());
            o.u64s("group_id", a.group_id.to_native());
            o.bytes("body", a.body.as_slice());
        }
        kind::ROOM_OK => {
            let a = access!(ArchivedRoomOk);
            let (room, rk) = (a.room_id.to_native(), a.request_kind.to_native());
            o.id(p.on_room_ok(rk, room).as_deref());
            o.u64s("room_id", room);
            o.num("request_kind", rk as u64);
            o.num("subscribers", a.subscribers.to_native() as u64);
        }
        kind::ROOM_MSG => {
            let stamp = RoomStamp::read(payload).ok_or("payload shorter than its room stamp")?;
            let m = frame::access::<ArchivedRoomPublish>(&payload[RoomStamp::BYTES..])
                .map_err(|e| format!("RoomMsg: the RoomPublish archive: {e}"))?;
            o.u64s("room_id", stamp.room_id);
            o.u64s("seq", stamp.seq);
            o.u64s("ts_ms", stamp.ts_ms);
            o.u64s("from", stamp.from);
            o.u64s("client_msg_id", m.client_msg_id.to_native());
            o.bytes("body", m.body.as_slice());
        }
        kind::ROOM_CLOSED => {
            let a = access!(ArchivedRoomClosed);
            o.u64s("room_id", a.room_id.to_native());
            o.num("reason", a.reason.to_native() as u64);
        }
        kind::MISSED => {
            let a = access!(ArchivedMissed);
            // `id` is the request id's name: the room, peer or group is `source_id`.
            o.u64s("source_id", a.id.to_native());
            o.u64s("count", a.count.to_native());
            o.num("source", a.source as u64);
        }
        kind::GROUP_OK => {
            let a = access!(ArchivedGroupOk);
            let rk = a.request_kind.to_native();
            o.id(p.answer_in_order(|f| f == rk).as_deref());
            o.u64s("group_id", a.group_id.to_native());
            o.u64s("seq", a.seq.to_native());
            o.num("request_kind", rk as u64);
            o.num("action", a.action as u64);
        }
        kind::GROUP_INFO => {
            let a = access!(ArchivedGroupInfo);
            o.id(p.answer_in_order(|f| f == kind::GROUP_GET).as_deref());
            o.u64s("group_id", a.group_id.to_native());
            o.open_obj("profile");
            let pr = &a.profile;
            o.text("name", pr.name.as_str());
            o.text("topic", pr.topic.as_str());
            o.text("avatar_url", pr.avatar_url.as_str());
            o.bytes("extra", pr.extra.as_slice());
            o.num("join_policy", pr.join_policy as u64);
            o.num("invite_policy", pr.invite_policy as u64);
            o.close();
            o.u64s("founder", a.founder.to_native());
            o.num("members", a.members.to_native() as u64);
            o.u64s("muted_all_until_ms", a.muted_all_until_ms.to_native());
            o.num("my_role", a.my_role as u64);
        }
        kind::GROUP_MEMBER_PAGE => {
            let a = access!(ArchivedGroupMemberPage);
            o.id(p.answer_in_order(|f| f == kind::GROUP_MEMBERS).as_deref());
            o.u64s("group_id", a.group_id.to_native());
            o.open_arr("members");
            for m in a.members.iter() {
                o.open_elem_obj();
                o.u64s("user_id", m.user_id.to_native());
                o.num("role", m.role as u64);
                o.u64s("muted_until_ms", m.muted_until_ms.to_native());
                o.close();
            }
            o.close_arr();
            o.flag("more", a.more);
        }
        kind::GROUP_LIST => {
            let a = access!(ArchivedGroupList);
            o.id(p.answer_in_order(|f| f == kind::MY_GROUPS).as_deref());
            o.u64_list("groups", a.groups.iter().map(|g| g.to_native()));
            o.flag("more", a.more);
        }
        kind::PROFILE_LIST => {
            let a = access!(ArchivedProfileList);
            o.id(p.answer_in_order(|f| f == kind::PROFILE_GET || f == kind::PROFILE_UPDATE).as_deref());
            o.open_arr("profiles");
            for e in a.profiles.iter() {
                o.open_elem_obj();
                o.u64s("user_id", e.user_id.to_native());
                o.u64s("updated_ms", e.updated_ms.to_native());
                o.open_obj("profile");
                let pr = &e.profile;
                o.text("nickname", pr.nickname.as_str());
                o.text("avatar_url", pr.avatar_url.as_str());
                o.num("gender", pr.gender as u64);
                o.num("birthday", pr.birthday.to_native() as u64);
                o.text("area", pr.area.as_str());
                o.bytes("extra", pr.extra.as_slice());
                o.close();
                o.close();
            }
            o.close_arr();
        }
        kind::READ_NOTICE => {
            let a = access!(ArchivedReadNotice);
            o.u64s("from", a.from.to_native());
            o.u64s("to", a.to.to_native());
            o.num("conv", a.conv as u64);
            o.u64s("seq", a.seq.to_native());
        }
        kind::READ_STATE => {
            let a = access!(ArchivedReadState);
            o.id(p.answer_in_order(|f| f == kind::READ_GET).as_deref());
            o.num("conv", a.conv as u64);
            o.u64s("peer", a.peer.to_native());
            o.u64s("seq", a.seq.to_native());
            o.num("read_count", a.read_count.to_native() as u64);
            o.num("member_count", a.member_count.to_native() as u64);
            o.open_arr("reads");
            for r in a.reads.iter() {
                o.open_elem_obj();
                o.u64s("user", r.user.to_native());
                o.u64s("seq", r.seq.to_native());
                o.close();
            }
            o.close_arr();
        }
        kind::ROSTER_OK => {
            let a = access!(ArchivedRosterOk);
            o.id(p.answer_in_order(|f| f == kind::ROSTER_ACTION).as_deref());
            o.num("action", a.action as u64);
            o.u64s("user", a.user.to_native());
            o.flag("friends", a.friends);
        }
        kind::ROSTER_LIST => {
            let a = access!(ArchivedRosterList);
            o.id(p.answer_in_order(|f| f == kind::ROSTER_GET).as_deref());
            o.num("list", a.list as u64);
            o.open_arr("entries");
            for e in a.entries.iter() {
                o.open_elem_obj();
                o.u64s("user", e.user.to_native());
                o.u64s("since_ms", e.since_ms.to_native());
                o.text("note", e.note.as_str());
                o.close();
            }
            o.close_arr();
            o.flag("more", a.more);
        }
        kind::PRESENCE_LIST => {
            let a = access!(ArchivedPresenceList);
            o.id(p.answer_in_order(|f| f == kind::PRESENCE_SET || f == kind::PRESENCE_GET).as_deref());
            o.open_arr("entries");
            for e in a.entries.iter() {
                o.open_elem_obj();
                presence_entry(&mut o, e);
                o.close();
            }
            o.close_arr();
        }
        kind::PRESENCE_NOTICE => presence_entry(&mut o, access!(ArchivedPresenceEntry)),
        kind::ROSTER_NOTICE => {
            let a = access!(ArchivedRosterNotice);
            o.num("event", a.event as u64);
            o.u64s("from", a.from.to_native());
            o.u64s("to", a.to.to_native());
            o.text("note", a.note.as_str());
        }
        kind::TYPING_NOTICE => {
            let a = access!(ArchivedTypingNotice);
            o.u64s("from", a.from.to_native());
            o.u64s("to", a.to.to_native());
            o.num("conv", a.conv as u64);
            o.num("state", a.state as u64);
        }
        kind::SESSION_LIST => {
            let a = access!(ArchivedSessionList);
            o.id(p.answer_in_order(|f| f == kind::MY_SESSIONS || f == kind::SESSION_LOGOUT).as_deref());
            o.open_arr("sessions");
            for s in a.sessions.iter() {
                o.open_elem_obj();
                o.u64s("session_id", s.session_id.to_native());
                o.u64s("login_ms", s.login_ms.to_native());
                o.num("device_type", s.device_type as u64);
                o.flag("current", s.current);
                o.text("device_id", s.device_id.as_str());
                o.close();
            }
            o.close_arr();
        }
        kind::GROUP_REQUEST_PAGE => {
            let a = access!(ArchivedGroupRequestPage);
            o.id(p.answer_in_order(|f| f == kind::GROUP_REQUESTS).as_deref());
            o.u64s("group_id", a.group_id.to_native());
            o.open_arr("requests");
            for r in a.requests.iter() {
                o.open_elem_obj();
                join_request(r, &mut o);
                o.close();
            }
            o.close_arr();
        }
        kind::GROUP_JOIN_REQUEST => {
            let a = access!(ArchivedGroupJoinRequest);
            o.u64s("group_id", a.group_id.to_native());
            o.open_obj("request");
            join_request(&a.request, &mut o);
            o.close();
        }
        kind::GROUP_DECISION => {
            let a = access!(ArchivedGroupDecision);
            o.u64s("group_id", a.group_id.to_native());
            o.flag("approved", a.approved);
            o.u64s("by", a.by.to_native());
        }
        kind::PART_OUT => {
            // Never queued for a JSON session (its large frames go whole); written all the same.
            let (h, data) = part::PartHeader::read(payload).ok_or("payload shorter than a part header")?;
            o.u64s("part_id", h.id);
            o.num("total", h.total as u64);
            o.num("offset", h.offset as u64);
            o.num("part_kind", h.kind as u64);
            o.b64("data", data);
        }
        _ => return Err(format!("no JSON for kind {k}")),
    }
    o.close();
    Ok(())
}

fn join_request(r: &protocol::ArchivedJoinRequest, o: &mut Out<'_>) {
    o.u64s("user_id", r.user_id.to_native());
    o.text("note", r.note.as_str());
    o.u64s("ts_ms", r.ts_ms.to_native());
}

/// A group notice's body as `"notice": {…}`; `Err` if it is not a `GroupNotice` archive.
fn notice(body: &[u8], o: &mut Out<'_>) -> Result<(), ()> {
    let copy;
    let body = if (body.as_ptr() as usize).is_multiple_of(frame::ALIGN) {
        body
    } else {
        copy = {
            let mut v = AlignedVec::<16>::with_capacity(body.len());
            v.extend_from_slice(body);
            v
        };
        &copy[..]
    };
    let n = frame::access::<protocol::ArchivedGroupNotice>(body).map_err(|_| ())?;
    o.open_obj("notice");
    o.num("event", n.event as u64);
    o.u64s("actor", n.actor.to_native());
    o.u64s("target", n.target.to_native());
    o.u64s("until_ms", n.until_ms.to_native());
    o.u64_list("users", n.users.iter().map(|u| u.to_native()));
    o.close();
    Ok(())
}

/// A JSON object written by hand into a `String`: keys are ours (no escaping needed), values
/// are escaped.
struct Out<'a> {
    s: &'a mut String,
    /// No member written yet in the innermost object or array.
    first: bool,
}

impl<'a> Out<'a> {
    /// `{"type":"<ty>","kind":<k>`
    fn open(s: &'a mut String, ty: &str, k: u16) -> Out<'a> {
        s.push_str("{\"type\":\"");
        s.push_str(ty);
        s.push_str("\",\"kind\":");
        push_u64(s, k as u64);
        Out { s, first: false }
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.s.push(',');
        }
        self.first = false;
        self.s.push('"');
        self.s.push_str(k);
        self.s.push_str("\":");
    }

    fn id(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.key("id");
            self.s.push_str(id);
        }
    }

    /// A u64 as a string of decimal digits.
    fn u64s(&mut self, k: &str, v: u64) {
        self.key(k);
        self.s.push('"');
        push_u64(self.s, v);
        self.s.push('"');
    }

    /// A u32, u16 or u8 as a number.
    fn num(&mut self, k: &str, v: u64) {
        self.key(k);
        push_u64(self.s, v);
    }

    fn flag(&mut self, k: &str, v: bool) {
        self.key(k);
        self.s.push_str(if v { "true" } else { "false" });
    }

    fn text(&mut self, k: &str, v: &str) {
        self.key(k);
        push_json_str(self.s, v);
    }

    /// An error code's `ErrorCode` name (`"Unknown"` for a code without one).
    fn code_name(&mut self, k: &str, code: u16) {
        self.key(k);
        self.s.push('"');
        match ErrorCode::from_u16(code) {
            Some(c) => {
                let _ = write!(self.s, "{c:?}");
            }
            None => self.s.push_str("Unknown"),
        }
        self.s.push('"');
    }

    /// Bytes as `"<k>"` (text) when they are UTF-8, else as `"<k>_b64"`.
    fn bytes(&mut self, k: &str, v: &[u8]) {
        match std::str::from_utf8(v) {
            Ok(t) => self.text(k, t),
            Err(_) => self.b64(k, v),
        }
    }

    /// Bytes as `"<k>_b64"`: standard base64, padded.
    fn b64(&mut self, k: &str, v: &[u8]) {
        if !self.first {
            self.s.push(',');
        }
        self.first = false;
        self.s.push('"');
        self.s.push_str(k);
        self.s.push_str("_b64\":\"");
        B64.encode_string(v, self.s);
        self.s.push('"');
    }

    fn u64_list(&mut self, k: &str, items: impl Iterator<Item = u64>) {
        self.open_arr(k);
        for v in items {
            if !self.first {
                self.s.push(',');
            }
            self.first = false;
            self.s.push('"');
            push_u64(self.s, v);
            self.s.push('"');
        }
        self.close_arr();
    }

    fn open_obj(&mut self, k: &str) {
        self.key(k);
        self.s.push('{');
        self.first = true;
    }

    fn open_arr(&mut self, k: &str) {
        self.key(k);
        self.s.push('[');
        self.first = true;
    }

    fn open_elem_obj(&mut self) {
        if !self.first {
            self.s.push(',');
        }
        self.s.push('{');
        self.first = true;
    }

    /// Close the innermost object.
    fn close(&mut self) {
        self.s.push('}');
        self.first = false;
    }

    fn close_arr(&mut self) {
        self.s.push(']');
        self.first = false;
    }
}

/// A `PresenceEntry`'s fields (a `presence_notice`, or an element of `presence_list`).
fn presence_entry(o: &mut Out<'_>, e: &protocol::ArchivedPresenceEntry) {
    o.u64s("user", e.user.to_native());
    o.num("state", e.state as u64);
    o.u64s("since_ms", e.since_ms.to_native());
    o.text("text", e.text.as_str());
    o.bytes("extra", e.extra.as_slice());
}

fn push_u64(s: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    s.push_str(std::str::from_utf8(&digits[i..]).expect("ASCII digits"));
}

/// `v` as a JSON string: quotes, and escapes for `"`, `\` and control characters.
fn push_json_str(s: &mut String, v: &str) {
    s.push('"');
    let mut done = 0;
    for (i, b) in v.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        // `i` holds an ASCII byte: a character boundary.
        s.push_str(&v[done..i]);
        if esc.is_empty() {
            let _ = write!(s, "\\u{b:04x}");
        } else {
            s.push_str(esc);
        }
        done = i + 1;
    }
    s.push_str(&v[done..]);
    s.push('"');
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use serde_json::{json, Value};

    use super::*;
    use crate::{
        envelope::{RoomRequest, Submit},
        protocol::{group_event, RoomStamp, Stamp},
        session::{error_frame, kick_frame},
    };

    const G: u64 = 0x4000_0000_0000_0007;

    fn frame_of(text: &str) -> RequestFrame {
        match request(text, &mut Correlator::new()) {
            Inbound::Frame(f) => f,
            Inbound::Error(e) => panic!("{text} refused: {e}"),
        }
    }

    fn refused(text: &str, corr: &mut Correlator) -> Value {
        match request(text, corr) {
            Inbound::Error(e) => serde_json::from_str(&e).expect("the error is JSON"),
            Inbound::Frame(f) => panic!("{text} accepted as {f:?}"),
        }
    }

    /// Feed a request (it must pass) to `corr`.
    fn send(corr: &mut Correlator, text: &str) {
        if let Inbound::Error(e) = request(text, corr) {
            panic!("{text} refused: {e}");
        }
    }

    fn out(corr: &mut Correlator, frame: &[u8]) -> Value {
        let text = answer(frame, corr);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    fn id_of(corr: &mut Correlator, frame: &[u8]) -> Option<Value> {
        out(corr, frame).get("id").cloned()
    }

    fn enc<T>(k: u16, v: &T) -> Bytes
    where
        T: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, rancor::Error>>,
    {
        Bytes::from(frame::encode(k, v))
    }

    /// A `DELIVER`-like frame of kind `k` as the server builds it: blank stamp, the sender's
    /// payload, then the stamp written in place.
    fn stamped(k: u16, send: &protocol::Send, stamp: Stamp) -> Bytes {
        let payload = frame::encode(kind::SEND, send);
        let mut f: BytesMut =
            Submit::blank_frame(k, &payload[HEADER_BYTES..HEADER_BYTES + payload_len(&payload)]);
        stamp.write(&mut f[HEADER_BYTES..]);
        f.freeze()
    }

    fn payload_len(f: &[u8]) -> usize {
        Header::read(f).len as usize
    }

    fn ack(cmid: u64) -> Bytes {
        enc(
            kind::SEND_ACK,
            &protocol::SendAck { client_msg_id: cmid, msg_id: 1, seq: 1, ts_ms: 1, duplicate: false },
        )
    }

    fn login_ok() -> Bytes {
        enc(
            kind::LOGIN_OK,
            &protocol::LoginOk {
                user_id: 1,
                session_id: 2,
                server_time_ms: 3,
                idle_timeout_ms: 4,
                frame_bytes_max: 65536,
                body_bytes_max: 6,
                inflight_max: 7,
                protocol_version: 1,
                large_body_bytes_max: 8,
            },
        )
    }

    /// A `login_ok` announcing `frame_bytes_max`, after a `login` request.
    fn logged_in_with(frame_bytes_max: u32) -> Correlator {
        let mut c = Correlator::new();
        send(&mut c, r#"{"op":"login","name":"a","password":"b"}"#);
        let ok = protocol::LoginOk {
            user_id: 1,
            session_id: 2,
            server_time_ms: 3,
            idle_timeout_ms: 4,
            frame_bytes_max,
            body_bytes_max: 32768,
            inflight_max: 256,
            protocol_version: 1,
            large_body_bytes_max: 8 << 20,
        };
        out(&mut c, &enc(kind::LOGIN_OK, &ok));
        c
    }

    fn pong() -> Bytes {
        enc(kind::PONG, &protocol::Pong { nonce: 0, server_time_ms: 0 })
    }

    fn logged_in() -> Correlator {
        let mut c = Correlator::new();
        send(&mut c, r#"{"op":"login","name":"a","password":"b"}"#);
        out(&mut c, &login_ok());
        c
    }

    /// Every op becomes, byte for byte, the frame a binary client builds with rkyv, and the
    /// ops are exactly the client kinds of protocol v1.
    #[test]
    fn every_op_encodes_as_a_binary_client_would() {
        use protocol::*;
        fn check<T>(text: &str, k: u16, v: &T)
        where
            T: rkyv::Archive
                + for<'a> rkyv::Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, rancor::Error>>,
        {
            let f = frame_of(text);
            assert_eq!(f.kind(), k, "{text}");
            assert_eq!(f.as_bytes(), &frame::encode(k, v)[..], "{text}");
            assert!((f.payload().as_ptr() as usize).is_multiple_of(8), "{text}: payload not aligned");
        }
        let profile = GroupProfile {
            name: "tim fans".into(),
            topic: "all about tim".into(),
            avatar_url: "".into(),
            extra: vec![1, 2, 3],
            join_policy: 1,
            invite_policy: 0,
        };
        check(
            r#"{"op":"register","name":"alice","password":"correct horse"}"#,
            kind::REGISTER,
            &Register { name: "alice".into(), password: "correct horse".into() },
        );
        check(
            r#"{"op":"login","name":"alice","password":"pw","device_type":4,"device_id":"tab-1"}"#,
            kind::LOGIN,
            &Login { name: "alice".into(), password: "pw".into(), device_type: 4, device_id: "tab-1".into() },
        );
        check(
            r#"{"op":"login_token","token":"00ab","device_type":1}"#,
            kind::LOGIN_TOKEN,
            &LoginToken { token: "00ab".into(), device_type: 1, device_id: "".into() },
        );
        check(r#"{"op":"issue_token","ttl_secs":60}"#, kind::ISSUE_TOKEN, &IssueToken { ttl_secs: 60 });
        check(
            r#"{"op":"ping","nonce":"72623859790382856"}"#,
            kind::PING,
            &Ping { nonce: 0x0102030405060708 },
        );
        check(
            r#"{"op":"send","conv":1,"to":2,"client_msg_id":1,"body":"hello"}"#,
            kind::SEND,
            &Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: 1, body: b"hello".to_vec() },
        );
        check(
            r#"{"op":"delivery_ack","conv":2,"peer":"4611686018427387911","seq":4}"#,
            kind::DELIVERY_ACK,
            &DeliveryAck { conv: 2, peer: G, seq: 4 },
        );
        check(r#"{"op":"logout"}"#, kind::LOGOUT, &Logout { reserved: 0 });
        check(
            r#"{"op":"history","conv":1,"peer":2,"anchor_seq":20,"direction":1,"limit":3}"#,
            kind::HISTORY,
            &History { conv: 1, peer: 2, anchor_seq: 20, direction: 1, limit: 3 },
        );
        check(
            r#"{"op":"stream","conv":2,"to":"4611686018427387911","client_msg_id":7,"body_b64":"AP8="}"#,
            kind::STREAM,
            &Send { conv: 2, flags: 0, burn_secs: 0, to: G, client_msg_id: 7, body: vec![0, 255] },
        );
        check(
            r#"{"op":"room_create","publish":1,"subscribers_max":100,"publishers":[7,"8"]}"#,
            kind::ROOM_CREATE,
            &RoomCreate { publish: 1, subscribers_max: 100, publishers: vec![7, 8] },
        );
        check(r#"{"op":"room_subscribe","room_id":5}"#, kind::ROOM_SUBSCRIBE, &RoomRef { room_id: 5 });
        check(r#"{"op":"room_unsubscribe","room_id":"5"}"#, kind::ROOM_UNSUBSCRIBE, &RoomRef { room_id: 5 });
        check(
            r#"{"op":"room_publish","room_id":5,"client_msg_id":9,"body":"hi"}"#,
            kind::ROOM_PUBLISH,
            &RoomPublish { room_id: 5, client_msg_id: 9, body: b"hi".to_vec() },
        );
        check(r#"{"op":"room_delete","room_id":5}"#, kind::ROOM_DELETE, &RoomRef { room_id: 5 });
        check(
            r#"{"op":"group_create","profile":{"name":"tim fans","topic":"all about tim","extra_b64":"AQID","join_policy":1}}"#,
            kind::GROUP_CREATE,
            &GroupCreate { profile: profile.clone() },
        );
        check(
            r#"{"op":"group_update","group_id":"4611686018427387911","profile":{"name":"tim fans","avatar_url":"https://tim.example/a.png","invite_policy":1,"extra":""}}"#,
            kind::GROUP_UPDATE,
            &GroupUpdate {
                group_id: G,
                profile: GroupProfile {
                    name: "tim fans".into(),
                    avatar_url: "https://tim.example/a.png".into(),
                    invite_policy: 1,
                    ..Default::default()
                },
            },
        );
        check(
            r#"{"op":"group_action","group_id":"4611686018427387911","action":10,"user_id":3,"until_ms":"1767225660000","note":"n"}"#,
            kind::GROUP_ACTION,
            &GroupAction { group_id: G, action: 10, user_id: 3, until_ms: 1767225660000, note: "n".into() },
        );
        check(
            r#"{"op":"group_get","group_id":"4611686018427387911"}"#,
            kind::GROUP_GET,
            &GroupRef { group_id: G },
        );
        check(
            r#"{"op":"group_members","group_id":"4611686018427387911","after_user":1,"limit":100}"#,
            kind::GROUP_MEMBERS,
            &GroupMembers { group_id: G, after_user: 1, limit: 100 },
        );
        check(
            r#"{"op":"my_groups","after_group":"9","limit":0}"#,
            kind::MY_GROUPS,
            &MyGroups { after_group: 9, limit: 0 },
        );
        check(
            r#"{"op":"group_requests","group_id":"4611686018427387911"}"#,
            kind::GROUP_REQUESTS,
            &GroupRef { group_id: G },
        );
        check(
            r#"{"op":"group_add_members","group_id":"4611686018427387911","user_ids":[4,"5"]}"#,
            kind::GROUP_ADD_MEMBERS,
            &GroupAddMembers { group_id: G, user_ids: vec![4, 5] },
        );
        check(
            r#"{"op":"send","conv":1,"to":2,"client_msg_id":3,"body":"x","flags":1,"burn_secs":30}"#,
            kind::SEND,
            &Send { conv: 1, flags: 1, burn_secs: 30, to: 2, client_msg_id: 3, body: b"x".to_vec() },
        );
        check(
            r#"{"op":"presence_set","state":2,"text":"lunch","extra_b64":"AP8="}"#,
            kind::PRESENCE_SET,
            &PresenceSet { state: 2, text: "lunch".into(), extra: vec![0, 255] },
        );
        check(
            r#"{"op":"presence_get","user_ids":[2,"3"]}"#,
            kind::PRESENCE_GET,
            &PresenceGet { user_ids: vec![2, 3] },
        );
        check(
            r#"{"op":"read","conv":1,"peer":"2","seq":"7"}"#,
            kind::READ,
            &Read { conv: 1, peer: 2, seq: 7 },
        );
        check(
            r#"{"op":"read_get","conv":2,"peer":"4611686018427387911","seq":7}"#,
            kind::READ_GET,
            &ReadGet { conv: 2, peer: G, seq: 7 },
        );
        check(
            r#"{"op":"recall","conv":2,"to":"4611686018427387911","client_msg_id":"8","seq":"258"}"#,
            kind::SEND,
            &Send {
                conv: 2,
                flags: send_flags::RECALL,
                burn_secs: 0,
                to: G,
                client_msg_id: 8,
                body: 258u64.to_le_bytes().to_vec(),
            },
        );
        check(
            r#"{"op":"roster_action","action":1,"user":"2","note":"hi, it's alice"}"#,
            kind::ROSTER_ACTION,
            &RosterAction { action: roster_action::REQUEST, user: 2, note: "hi, it's alice".into() },
        );
        check(
            r#"{"op":"roster_action","action":5,"user":3}"#,
            kind::ROSTER_ACTION,
            &RosterAction { action: roster_action::BLOCK, user: 3, note: "".into() },
        );
        check(
            r#"{"op":"roster_get","list":1,"after":"7","limit":50}"#,
            kind::ROSTER_GET,
            &RosterGet { list: roster_list::INCOMING, after: 7, limit: 50 },
        );
        check(
            r#"{"op":"roster_get","list":0}"#,
            kind::ROSTER_GET,
            &RosterGet { list: 0, after: 0, limit: 0 },
        );
        // One chunk with the whole body: the whole Send payload in one part.
        let whole = frame::encode(
            kind::SEND,
            &Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: 9, body: b"hello".to_vec() },
        );
        let h = part::PartHeader { id: 9, total: 40, offset: 0, kind: kind::SEND };
        let f = frame_of(
            r#"{"op":"send_part","conv":1,"to":2,"client_msg_id":"9","body_bytes":5,"offset":0,"body":"hello"}"#,
        );
        assert_eq!(
            f.as_bytes(),
            &frame::raw(kind::PART, &[&h.bytes(), &whole[HEADER_BYTES..HEADER_BYTES + 40]])[..]
        );
        // The ops are the client kinds, each once but for `recall` (a kind of `send`).
        let client_kinds: Vec<u16> = (1..100).filter(|&k| kind::name(k) != "unknown").collect();
        let mut op_kinds: Vec<u16> = OPS.iter().filter(|o| o.name != "recall").map(|o| o.kind).collect();
        op_kinds.sort();
        assert_eq!(op_kinds, client_kinds);
    }

    /// The hand-written `Send` and `RoomPublish` archives are rkyv's, for every body length
    /// around the alignment boundaries, and validate in place.
    #[test]
    fn hand_encoded_archives_match_rkyv() {
        for n in 0..=80usize {
            let body: Vec<u8> = (0..n).map(|i| (i * 7 + 1) as u8).collect();
            let s = protocol::Send {
                conv: 2,
                flags: n as u8,
                burn_secs: u32::MAX - n as u32,
                to: G,
                client_msg_id: u64::MAX - n as u64,
                body: body.clone(),
            };
            for k in [kind::SEND, kind::STREAM] {
                let root = SendRoot {
                    conv: s.conv,
                    flags: s.flags,
                    burn_secs: s.burn_secs,
                    to: s.to,
                    client_msg_id: s.client_msg_id,
                };
                let f = encode_send(k, root, &body);
                assert_eq!(f.as_bytes(), &frame::encode(k, &s)[..], "Send with a body of {n}");
                let a = frame::access::<protocol::ArchivedSend>(f.payload()).unwrap();
                assert_eq!(a.body.as_slice(), &body[..]);
            }
            let r = protocol::RoomPublish { room_id: 77, client_msg_id: n as u64, body: body.clone() };
            let f = encode_room_publish(r.room_id, r.client_msg_id, &body);
            assert_eq!(f.as_bytes(), &frame::encode(kind::ROOM_PUBLISH, &r)[..], "RoomPublish of {n}");
        }
    }

    /// Integers: u64 fields are read from numbers or decimal strings and written as strings;
    /// smaller ones are numbers both ways.
    #[test]
    fn u64_fields_are_numbers_or_strings_in_and_strings_out() {
        let a = frame_of(
            r#"{"op":"send","conv":1,"to":18446744073709551615,"client_msg_id":"18446744073709551615"}"#,
        );
        let b = frame_of(
            r#"{"op":"send","conv":1,"to":"18446744073709551615","client_msg_id":18446744073709551615}"#,
        );
        assert_eq!(a.as_bytes(), b.as_bytes());
        let m = frame::access::<protocol::ArchivedSend>(a.payload()).unwrap();
        assert_eq!((m.to.to_native(), m.client_msg_id.to_native()), (u64::MAX, u64::MAX));
        // Leading zeros are digits too.
        let c = frame_of(r#"{"op":"ping","nonce":"007"}"#);
        assert_eq!(frame::access::<protocol::ArchivedPing>(c.payload()).unwrap().nonce.to_native(), 7);
        let v = out(
            &mut Correlator::new(),
            &enc(
                kind::SEND_ACK,
                &protocol::SendAck {
                    client_msg_id: u64::MAX,
                    msg_id: 1 << 60,
                    seq: 0,
                    ts_ms: 5,
                    duplicate: true,
                },
            ),
        );
        assert_eq!(
            v,
            json!({"type":"send_ack","kind":106,"client_msg_id":"18446744073709551615",
                   "msg_id":"1152921504606846976","seq":"0","ts_ms":"5","duplicate":true})
        );
    }

    /// Bodies: text or base64 in (padding optional), text when UTF-8 else base64 out; the same
    /// for a profile's `extra`.
    #[test]
    fn bodies_are_text_or_base64() {
        let body = |text: &str| {
            let f = frame_of(text);
            frame::access::<protocol::ArchivedSend>(f.payload()).unwrap().body.as_slice().to_vec()
        };
        let head = r#"{"op":"send","conv":1,"to":2,"client_msg_id":1,"#;
        assert_eq!(body(&format!(r#"{head}"body":"h\u00e9\n\"x\""}}"#)), "hé\n\"x\"".as_bytes());
        assert_eq!(body(&format!(r#"{head}"body_b64":"/wA="}}"#)), [255, 0]);
        assert_eq!(body(&format!(r#"{head}"body_b64":"/wA"}}"#)), [255, 0]);
        assert_eq!(body(&format!(r#"{head}"body":""}}"#)), b"");
        assert_eq!(body(&format!(r#"{head}"body_b64":""}}"#)), b"");
        assert_eq!(body(r#"{"op":"send","conv":1,"to":2,"client_msg_id":1}"#), b"");

        let stamp = Stamp { msg_id: 1, seq: 2, ts_ms: 3, from: 4, to: 5, conv: 1 };
        let text = protocol::Send {
            conv: 1,
            flags: 0,
            burn_secs: 0,
            to: 5,
            client_msg_id: 6,
            body: "a\u{1}\"\\é".as_bytes().to_vec(),
        };
        let v = out(&mut Correlator::new(), &stamped(kind::DELIVER, &text, stamp));
        assert_eq!(v["body"], json!("a\u{1}\"\\é"));
        assert!(v.get("body_b64").is_none());
        let raw = protocol::Send {
            conv: 1,
            flags: 0,
            burn_secs: 0,
            to: 5,
            client_msg_id: 6,
            body: vec![0xff, 0xfe, 0],
        };
        let v = out(&mut Correlator::new(), &stamped(kind::DELIVER, &raw, stamp));
        assert_eq!(v["body_b64"], json!("//4A"));
        assert!(v.get("body").is_none());

        let mut info = protocol::GroupInfo {
            group_id: G,
            profile: protocol::GroupProfile { extra: vec![0xc3], ..Default::default() },
            founder: 1,
            members: 1,
            muted_all_until_ms: 0,
            my_role: 2,
        };
        let v = out(&mut Correlator::new(), &enc(kind::GROUP_INFO, &info));
        assert_eq!(v["profile"]["extra_b64"], json!("ww=="));
        info.profile.extra = b"{\"k\":1}".to_vec();
        let v = out(&mut Correlator::new(), &enc(kind::GROUP_INFO, &info));
        assert_eq!(v["profile"]["extra"], json!("{\"k\":1}"));
    }

    /// Every server kind, built the way the server builds it, becomes its JSON object.
    #[test]
    fn every_server_kind_as_json() {
        use protocol::*;
        let c = &mut Correlator::new();
        let check = |c: &mut Correlator, f: Bytes, want: Value| assert_eq!(out(c, &f), want);
        check(
            c,
            enc(kind::REGISTER_OK, &RegisterOk { user_id: 1 }),
            json!({"type":"register_ok","kind":101,"user_id":"1"}),
        );
        check(
            c,
            login_ok(),
            json!({"type":"login_ok","kind":102,"user_id":"1","session_id":"2","server_time_ms":"3",
                   "idle_timeout_ms":4,"frame_bytes_max":65536,"body_bytes_max":6,"inflight_max":7,"protocol_version":1,
                   "large_body_bytes_max":8}),
        );
        check(
            c,
            enc(kind::TOKEN_ISSUED, &TokenIssued { token: "0011".into(), expires_at_ms: 1767225900000 }),
            json!({"type":"token_issued","kind":104,"token":"0011","expires_at_ms":"1767225900000"}),
        );
        check(
            c,
            enc(kind::PONG, &Pong { nonce: 0x0102030405060708, server_time_ms: 9 }),
            json!({"type":"pong","kind":105,"nonce":"72623859790382856","server_time_ms":"9"}),
        );
        check(
            c,
            enc(kind::SEND_ACK, &SendAck { client_msg_id: 1, msg_id: 2, seq: 3, ts_ms: 4, duplicate: false }),
            json!({"type":"send_ack","kind":106,"client_msg_id":"1","msg_id":"2","seq":"3","ts_ms":"4","duplicate":false}),
        );
        let hello =
            Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: 1, body: b"hello".to_vec() };
        let stamp =
            Stamp { msg_id: 0x0123456789abcdef, seq: 1, ts_ms: 1767225600123, from: 1, to: 2, conv: 1 };
        let msg = |ty: &str, k: u16, msg_id: &str| {
            json!({"type":ty,"kind":k,"msg_id":msg_id,"seq":"1","ts_ms":"1767225600123","from":"1","to":"2",
                   "conv":1,"client_msg_id":"1","body":"hello"})
        };
        let deliver = stamped(kind::DELIVER, &hello, stamp);
        check(c, deliver.clone(), msg("deliver", 107, "81985529216486895"));
        // A history page's message is the stored Deliver payload, whole.
        let stored = &deliver[HEADER_BYTES..HEADER_BYTES + payload_len(&deliver)];
        check(c, frame::whole(kind::HISTORY_MSG, stored), msg("history_msg", 109, "81985529216486895"));
        check(
            c,
            stamped(kind::STREAM_MSG, &hello, Stamp { msg_id: 0, ..stamp }),
            msg("stream_msg", 112, "0"),
        );
        check(c, enc(kind::BYE, &Bye { reserved: 0 }), json!({"type":"bye","kind":108}));
        check(
            c,
            error_frame(ErrorCode::UnknownRecipient, kind::SEND, 7),
            json!({"type":"error","kind":120,"code":30,"code_name":"UnknownRecipient","request_kind":6,
                   "client_msg_id":"7","message":"unknown recipient"}),
        );
        check(
            c,
            enc(kind::ERROR, &Error { code: 999, request_kind: 0, client_msg_id: 0, message: "?".into() }),
            json!({"type":"error","kind":120,"code":999,"code_name":"Unknown","request_kind":0,"client_msg_id":"0","message":"?"}),
        );
        check(
            c,
            kick_frame(ErrorCode::Replaced),
            json!({"type":"kick","kind":121,"reason":42,"reason_name":"Replaced","message":"replaced by a newer login"}),
        );
        check(
            c,
            enc(kind::HISTORY_END, &HistoryEnd { conv: 2, peer: G, count: 10, more: true }),
            json!({"type":"history_end","kind":110,"conv":2,"peer":"4611686018427387911","count":10,"more":true}),
        );
        check(
            c,
            enc(kind::CATCHUP_END, &CatchUpEnd { count: 5000, more: true, unavailable: 1 }),
            json!({"type":"catch_up_end","kind":111,"count":5000,"more":true,"unavailable":1}),
        );
        check(c, Bytes::from(frame::encode_empty(kind::RESYNC)), json!({"type":"resync","kind":113}));
        let b = protocol::Broadcast { ts_ms: 5, group_id: 1 << 62, body: b"notice".to_vec() };
        check(
            c,
            Bytes::from(frame::encode(kind::BROADCAST, &b)),
            json!({"type":"broadcast","kind":114,"ts_ms":"5","group_id":"4611686018427387904","body":"notice"}),
        );
        check(
            c,
            enc(kind::ROOM_OK, &RoomOk { room_id: 5, request_kind: 21, subscribers: 3 }),
            json!({"type":"room_ok","kind":130,"room_id":"5","request_kind":21,"subscribers":3}),
        );
        let publish = frame::encode(
            kind::ROOM_PUBLISH,
            &RoomPublish { room_id: 5, client_msg_id: 9, body: b"hi".to_vec() },
        );
        let mut rm =
            RoomRequest::blank_room_msg(&publish[HEADER_BYTES..HEADER_BYTES + payload_len(&publish)]);
        RoomStamp { room_id: 5, seq: 3, ts_ms: 1767225600123, from: 1 }.write(&mut rm[HEADER_BYTES..]);
        check(
            c,
            rm.freeze(),
            json!({"type":"room_msg","kind":131,"room_id":"5","seq":"3","ts_ms":"1767225600123","from":"1",
                   "client_msg_id":"9","body":"hi"}),
        );
        check(
            c,
            enc(kind::ROOM_CLOSED, &RoomClosed { room_id: 5, reason: 1 }),
            json!({"type":"room_closed","kind":132,"room_id":"5","reason":1}),
        );
        check(
            c,
            enc(kind::MISSED, &Missed { id: 5, count: 2, source: 1 }),
            json!({"type":"missed","kind":133,"source_id":"5","count":"2","source":1}),
        );
        check(
            c,
            enc(kind::GROUP_OK, &GroupOk { group_id: G, seq: 3, request_kind: 32, action: 1 }),
            json!({"type":"group_ok","kind":140,"group_id":"4611686018427387911","seq":"3","request_kind":32,"action":1}),
        );
        check(
            c,
            enc(
                kind::GROUP_INFO,
                &GroupInfo {
                    group_id: G,
                    profile: GroupProfile {
                        name: "tim fans".into(),
                        topic: "all about tim".into(),
                        avatar_url: "".into(),
                        extra: vec![1, 2, 3],
                        join_policy: 1,
                        invite_policy: 0,
                    },
                    founder: 1,
                    members: 3,
                    muted_all_until_ms: 0,
                    my_role: 255,
                },
            ),
            json!({"type":"group_info","kind":141,"group_id":"4611686018427387911",
                   "profile":{"name":"tim fans","topic":"all about tim","avatar_url":"","extra":"\u{1}\u{2}\u{3}",
                              "join_policy":1,"invite_policy":0},
                   "founder":"1","members":3,"muted_all_until_ms":"0","my_role":255}),
        );
        check(
            c,
            enc(
                kind::GROUP_MEMBER_PAGE,
                &GroupMemberPage {
                    group_id: G,
                    members: vec![
                        GroupMember { user_id: 1, role: 2, muted_until_ms: 0 },
                        GroupMember { user_id: 3, role: 0, muted_until_ms: 1767225660000 },
                    ],
                    more: false,
                },
            ),
            json!({"type":"group_member_page","kind":142,"group_id":"4611686018427387911",
                   "members":[{"user_id":"1","role":2,"muted_until_ms":"0"},
                              {"user_id":"3","role":0,"muted_until_ms":"1767225660000"}],"more":false}),
        );
        check(
            c,
            enc(kind::GROUP_LIST, &GroupList { groups: vec![G, G + 1], more: true }),
            json!({"type":"group_list","kind":143,"groups":["4611686018427387911","4611686018427387912"],"more":true}),
        );
        check(
            c,
            enc(kind::GROUP_LIST, &GroupList { groups: vec![], more: false }),
            json!({"type":"group_list","kind":143,"groups":[],"more":false}),
        );
        let req = JoinRequest { user_id: 2, note: "please let me in".into(), ts_ms: 1767225600123 };
        let req_json = json!({"user_id":"2","note":"please let me in","ts_ms":"1767225600123"});
        check(
            c,
            enc(
                kind::GROUP_REQUEST_PAGE,
                &GroupRequestPage { group_id: G, requests: vec![req.clone(), req.clone()] },
            ),
            json!({"type":"group_request_page","kind":144,"group_id":"4611686018427387911","requests":[req_json, req_json]}),
        );
        check(
            c,
            enc(kind::GROUP_JOIN_REQUEST, &GroupJoinRequest { group_id: G, request: req }),
            json!({"type":"group_join_request","kind":145,"group_id":"4611686018427387911","request":req_json}),
        );
        check(
            c,
            enc(kind::GROUP_DECISION, &GroupDecision { group_id: G, approved: true, by: 1 }),
            json!({"type":"group_decision","kind":146,"group_id":"4611686018427387911","approved":true,"by":"1"}),
        );
        check(
            c,
            enc(kind::READ_NOTICE, &ReadNotice { from: 2, to: 1, conv: 1, seq: 5 }),
            json!({"type":"read_notice","kind":118,"from":"2","to":"1","conv":1,"seq":"5"}),
        );
        let reads = vec![ReadEntry { user: 1, seq: 0 }, ReadEntry { user: 2, seq: 5 }];
        check(
            c,
            enc(
                kind::READ_STATE,
                &ReadState { conv: 2, peer: G, seq: 5, read_count: 1, member_count: 1, reads },
            ),
            json!({"type":"read_state","kind":119,"conv":2,"peer":"4611686018427387911","seq":"5","read_count":1,
                   "member_count":1,"reads":[{"user":"1","seq":"0"},{"user":"2","seq":"5"}]}),
        );
        check(
            c,
            enc(kind::ROSTER_OK, &RosterOk { action: roster_action::ACCEPT, user: 2, friends: true }),
            json!({"type":"roster_ok","kind":122,"action":2,"user":"2","friends":true}),
        );
        let entries = vec![
            RosterEntry { user: 2, since_ms: 1767225600123, note: "hi".into() },
            RosterEntry { user: 9, since_ms: 1767225600456, note: "".into() },
        ];
        check(
            c,
            enc(kind::ROSTER_LIST, &RosterList { list: roster_list::INCOMING, entries, more: true }),
            json!({"type":"roster_list","kind":123,"list":1,"entries":[
                {"user":"2","since_ms":"1767225600123","note":"hi"},
                {"user":"9","since_ms":"1767225600456","note":""}],"more":true}),
        );
        check(
            c,
            enc(kind::ROSTER_LIST, &RosterList { list: roster_list::BLOCKED, entries: vec![], more: false }),
            json!({"type":"roster_list","kind":123,"list":3,"entries":[],"more":false}),
        );
        check(
            c,
            enc(
                kind::ROSTER_NOTICE,
                &RosterNotice { event: roster_action::REQUEST, from: 2, to: 1, note: "hi \"you\"".into() },
            ),
            json!({"type":"roster_notice","kind":124,"event":1,"from":"2","to":"1","note":"hi \"you\""}),
        );
        let entry = PresenceEntry { user: 2, state: 2, since_ms: 5, text: "lunch".into(), extra: vec![0xff] };
        check(
            c,
            enc(kind::PRESENCE_NOTICE, &entry),
            json!({"type":"presence_notice","kind":126,"user":"2","state":2,"since_ms":"5","text":"lunch","extra_b64":"/w=="}),
        );
        check(
            c,
            enc(kind::PRESENCE_LIST, &PresenceList { entries: vec![entry] }),
            json!({"type":"presence_list","kind":125,"entries":[{"user":"2","state":2,"since_ms":"5","text":"lunch","extra_b64":"/w=="}]}),
        );
        let h = part::PartHeader { id: 3, total: 100, offset: 96, kind: kind::DELIVER };
        check(
            c,
            frame::raw(kind::PART_OUT, &[&h.bytes(), &[1, 2, 3, 4]]),
            json!({"type":"part_out","kind":127,"part_id":"3","total":100,"offset":96,"part_kind":107,"data_b64":"AQIDBA=="}),
        );
        // Every server kind has a type name.
        for k in 100..200 {
            assert_eq!(type_name(k).is_some(), kind::name(k) != "unknown", "kind {k}");
        }
    }

    /// A group notice's body is decoded into `notice` (and the body left out), in a live
    /// delivery and in a history page alike; a group message from a member is not a notice.
    #[test]
    fn group_notices_are_decoded() {
        let notice = protocol::GroupNotice {
            event: group_event::MEMBERS_ADDED,
            actor: 1,
            target: 0,
            until_ms: 0,
            users: vec![4, 5],
        };
        let body = rkyv::to_bytes::<rancor::Error>(&notice).unwrap().to_vec();
        let send = protocol::Send {
            conv: conv::GROUP,
            flags: 0,
            burn_secs: 0,
            to: G,
            client_msg_id: 0,
            body: body.clone(),
        };
        let stamp = Stamp { msg_id: 9, seq: 5, ts_ms: 1767225600123, from: 0, to: G, conv: conv::GROUP };
        let f = stamped(kind::DELIVER, &send, stamp);
        assert_eq!(payload_len(&f), 136, "the size docs/PROTOCOL.md 7.3 gives");
        let want = json!({"type":"deliver","kind":107,"msg_id":"9","seq":"5","ts_ms":"1767225600123","from":"0",
            "to":"4611686018427387911","conv":2,"client_msg_id":"0",
            "notice":{"event":15,"actor":"1","target":"0","until_ms":"0","users":["4","5"]}});
        assert_eq!(out(&mut Correlator::new(), &f), want);
        let h = frame::whole(kind::HISTORY_MSG, &f[HEADER_BYTES..HEADER_BYTES + payload_len(&f)]);
        let v = out(&mut Correlator::new(), &h);
        assert_eq!(v["notice"], want["notice"]);

        let muted = protocol::GroupNotice {
            event: group_event::MUTED,
            actor: 1,
            target: 3,
            until_ms: 77,
            users: vec![],
        };
        let body = rkyv::to_bytes::<rancor::Error>(&muted).unwrap().to_vec();
        let f = stamped(kind::DELIVER, &protocol::Send { body, ..send.clone() }, stamp);
        assert_eq!(
            out(&mut Correlator::new(), &f)["notice"],
            json!({"event":9,"actor":"1","target":"3","until_ms":"77","users":[]})
        );
        // Not a notice: a member's message, or a notice body that does not decode.
        let from_member = stamped(kind::DELIVER, &send, Stamp { from: 3, ..stamp });
        let v = out(&mut Correlator::new(), &from_member);
        assert!(v.get("notice").is_none() && v.get("body_b64").is_some());
        let junk = stamped(kind::DELIVER, &protocol::Send { body: b"junk".to_vec(), ..send }, stamp);
        let v = out(&mut Correlator::new(), &junk);
        assert_eq!((v.get("notice"), &v["body_b64"]), (None, &json!("anVuaw==")));
    }

    /// A recall notice shows its flags and the seq it takes back as `recall_seq` (no body); a
    /// tombstone its `state` and an empty body; flags and burn_secs are left out when 0; a
    /// recall whose body is no seq keeps it as `body_b64`.
    #[test]
    fn recalls_and_tombstones_as_json() {
        use protocol::{msg_state, send_flags};
        let stamp = Stamp { msg_id: 9, seq: 6, ts_ms: 1767225600123, from: 1, to: 2, conv: 1 };
        let recall = protocol::Send {
            conv: 1,
            flags: send_flags::RECALL,
            burn_secs: 0,
            to: 2,
            client_msg_id: 2,
            body: 5u64.to_le_bytes().to_vec(),
        };
        let v = out(&mut Correlator::new(), &stamped(kind::DELIVER, &recall, stamp));
        assert_eq!(
            v,
            json!({"type":"deliver","kind":107,"msg_id":"9","seq":"6","ts_ms":"1767225600123","from":"1",
                   "to":"2","conv":1,"client_msg_id":"2","flags":2,"recall_seq":"5"})
        );
        let odd = protocol::Send { body: vec![5, 0, 0], ..recall.clone() };
        let v = out(&mut Correlator::new(), &stamped(kind::DELIVER, &odd, stamp));
        assert_eq!((&v["flags"], &v["body_b64"], v.get("recall_seq")), (&json!(2), &json!("BQAA"), None));

        // A tombstone, as the store keeps it: the stamp's state byte set, the body gone.
        let gone = protocol::Send { flags: 0, body: vec![], client_msg_id: 1, ..recall.clone() };
        let mut f = BytesMut::from(&stamped(kind::HISTORY_MSG, &gone, Stamp { seq: 5, ..stamp })[..]);
        f[HEADER_BYTES + Stamp::STATE_AT] = msg_state::RECALLED;
        let v = out(&mut Correlator::new(), &f);
        assert_eq!(
            v,
            json!({"type":"history_msg","kind":109,"msg_id":"9","seq":"5","ts_ms":"1767225600123","from":"1",
                   "to":"2","conv":1,"client_msg_id":"1","state":1,"body":""})
        );
        // A burn notice lists the seqs burned.
        let seqs: Vec<u8> = [3u64, 5].iter().flat_map(|s| s.to_le_bytes()).collect();
        let notice = protocol::Send { flags: send_flags::BURNED, body: seqs, ..recall.clone() };
        let v = out(&mut Correlator::new(), &stamped(kind::DELIVER, &notice, stamp));
        assert_eq!((&v["flags"], &v["burned_seqs"], v.get("body")), (&json!(4), &json!(["3", "5"]), None));
        let burned = protocol::Send { flags: send_flags::BURN_AFTER_READ, burn_secs: 30, ..gone };
        let mut f = BytesMut::from(&stamped(kind::DELIVER, &burned, stamp)[..]);
        f[HEADER_BYTES + Stamp::STATE_AT] = msg_state::BURNED;
        let v = out(&mut Correlator::new(), &f);
        assert_eq!(
            (&v["flags"], &v["burn_secs"], &v["state"], &v["body"]),
            (&json!(1), &json!(30), &json!(2), &json!(""))
        );
    }

    /// A recall is answered as a send: its id goes to the send_ack or the error with its
    /// client_msg_id; a recall the JSON layer refuses names op kind 6.
    #[test]
    fn recalls_are_matched_as_sends() {
        let c = &mut logged_in();
        send(c, r#"{"op":"send","id":"m","conv":1,"to":2,"client_msg_id":1,"body":"oops"}"#);
        send(c, r#"{"op":"recall","id":"r1","conv":1,"to":2,"client_msg_id":2,"seq":"1"}"#);
        send(c, r#"{"op":"recall","id":"r2","conv":1,"to":2,"client_msg_id":3,"seq":"1"}"#);
        assert_eq!(id_of(c, &error_frame(ErrorCode::NotRecallable, kind::SEND, 3)), Some(json!("r2")));
        assert_eq!(id_of(c, &ack(2)), Some(json!("r1")));
        assert_eq!(id_of(c, &ack(1)), Some(json!("m")));
        assert_eq!(c.held(), 0);
        let e = refused(r#"{"op":"recall","id":"q","conv":1,"to":2,"client_msg_id":4}"#, c);
        assert_eq!((&e["id"], &e["request_kind"], &e["code"]), (&json!("q"), &json!(6), &json!(1)));
        assert_eq!(e["message"], json!("field `seq` is required for op `recall`"));
        let e = refused(r#"{"op":"recall","conv":1,"to":2,"client_msg_id":4,"seq":1,"body":"x"}"#, c);
        assert_eq!(e["message"], json!("field `body` does not belong to op `recall`"));
        let e = refused(r#"{"op":"send","conv":1,"to":2,"client_msg_id":4,"flags":256}"#, c);
        assert_eq!(e["message"], json!("field `flags`: 256 is out of range for a u8 (0 to 255)"));
    }

    /// Sends: a send_ack or an error of request_kind 6 gets the id of the send with its
    /// client_msg_id, whatever the order; sends without id stay unmatched.
    #[test]
    fn sends_are_matched_by_client_msg_id() {
        let c = &mut logged_in();
        send(c, r#"{"op":"send","id":"a","conv":1,"to":2,"client_msg_id":1}"#);
        send(c, r#"{"op":"send","conv":1,"to":2,"client_msg_id":2}"#);
        send(c, r#"{"op":"send","id":7,"conv":1,"to":2,"client_msg_id":3}"#);
        assert_eq!(id_of(c, &ack(3)), Some(json!(7)));
        assert_eq!(id_of(c, &error_frame(ErrorCode::Busy, kind::SEND, 1)), Some(json!("a")));
        assert_eq!(id_of(c, &ack(2)), None);
        assert_eq!(c.held(), 0);
        // An answer nobody waits for (a stream's, another send's) takes nothing.
        send(c, r#"{"op":"send","id":"b","conv":1,"to":2,"client_msg_id":4}"#);
        assert_eq!(id_of(c, &error_frame(ErrorCode::Busy, kind::STREAM, 4)), None);
        assert_eq!(id_of(c, &ack(5)), None);
        assert_eq!(id_of(c, &ack(4)), Some(json!("b")));
        // A resend with the same client_msg_id while the first is in flight: in order.
        send(c, r#"{"op":"send","id":"first","conv":1,"to":2,"client_msg_id":6}"#);
        send(c, r#"{"op":"send","id":"second","conv":1,"to":2,"client_msg_id":6}"#);
        assert_eq!(id_of(c, &ack(6)), Some(json!("first")));
        assert_eq!(id_of(c, &ack(6)), Some(json!("second")));
    }

    /// The chunks of `send_part` requests, put together in order, are byte for byte the payload
    /// rkyv makes of the whole `Send`, whatever the body's length and the chunks' size: each
    /// part carries the client_msg_id, the whole payload's length and its offset, and the chunk
    /// that ends the body brings the zeros and the root. Chunks of `frame_bytes_max` − 64
    /// bytes always fit in a frame.
    #[test]
    fn send_parts_reassemble_to_the_send_archive() {
        let c = &mut logged_in_with(65536);
        for n in [0usize, 1, 5, 7, 8, 9, 15, 16, 17, 100, 1000, 65_472, 65_473, 65_480, 200_001] {
            let body: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
            let cmid = n as u64 + 1;
            let send = protocol::Send { conv: 2, flags: 1, burn_secs: 30, to: G, client_msg_id: cmid, body };
            let whole = frame::encode(kind::SEND, &send);
            let want = &whole[HEADER_BYTES..HEADER_BYTES + payload_len(&whole)];
            for chunk in [1usize, 3, 8, 1000, 65_472] {
                if n / chunk > 1000 {
                    continue;
                }
                let mut got = Vec::new();
                let mut offset = 0;
                loop {
                    let end = (offset + chunk).min(n);
                    let text = json!({"op":"send_part","conv":2,"to":G.to_string(),"client_msg_id":cmid,"flags":1,
                        "burn_secs":30,"body_bytes":n,"offset":offset,"body_b64":B64.encode(&send.body[offset..end])})
                    .to_string();
                    let f = match request(&text, c) {
                        Inbound::Frame(f) => f,
                        Inbound::Error(e) => panic!("body {n}, chunks of {chunk}: refused: {e}"),
                    };
                    assert_eq!(f.kind(), kind::PART);
                    assert!(f.payload().len() <= 65536, "body {n}, chunks of {chunk}: too large");
                    let (h, data) = protocol::part::PartHeader::read(f.payload()).expect("a part header");
                    let offset_now = got.len() as u32;
                    let want_h = protocol::part::PartHeader {
                        id: cmid,
                        total: want.len() as u32,
                        offset: offset_now,
                        kind: 6,
                    };
                    assert_eq!(h, want_h);
                    assert_eq!(&f.payload()[18..24], &[0; 6]);
                    got.extend_from_slice(data);
                    offset = end;
                    if offset == n {
                        break;
                    }
                }
                assert_eq!(got, want, "body {n}, chunks of {chunk}");
            }
        }
    }

    /// What the JSON layer refuses of a `send_part`: a chunk past the body, an empty chunk, a
    /// part larger than the server's frame_bytes_max (code 3, the connection stays open).
    #[test]
    fn send_part_refusals() {
        let c = &mut logged_in_with(1024);
        let part = |id: &str, body_bytes: usize, offset: usize, chunk: usize| {
            json!({"op":"send_part","id":id,"conv":1,"to":2,"client_msg_id":1,"body_bytes":body_bytes,
                   "offset":offset,"body":"x".repeat(chunk)})
            .to_string()
        };
        let e = refused(&part("a", 4, 2, 3), c);
        assert_eq!((&e["id"], &e["code"], &e["request_kind"]), (&json!("a"), &json!(1), &json!(27)));
        assert_eq!(e["message"], json!("op `send_part`: the chunk ends at byte 5, past `body_bytes` 4"));
        let e = refused(&part("b", 4, 0, 0), c);
        assert_eq!(e["message"], json!("op `send_part`: the chunk is empty (only a body of 0 bytes is)"));
        let e = refused(
            r#"{"op":"send_part","conv":1,"to":2,"client_msg_id":1,"body_bytes":4,"body":"abcd"}"#,
            c,
        );
        assert_eq!(e["message"], json!("field `offset` is required for op `send_part`"));
        let e = refused(&part("c", 5000, 0, 1001), c);
        assert_eq!(
            (&e["id"], &e["code"], &e["code_name"], &e["request_kind"]),
            (&json!("c"), &json!(3), &json!("FrameTooLarge"), &json!(27))
        );
        assert_eq!(
            e["message"],
            json!(
                "op `send_part`: its frame would be 1025 bytes, over the server's frame_bytes_max 1024: \
                   send chunks of at most 960 bytes"
            )
        );
        // The chunk that ends the body carries the root too.
        let e = refused(&part("d", 1000, 0, 1000), c);
        assert_eq!(e["code"], json!(3));
        // A send too large for a frame: BodyTooLarge at once (the session would close).
        let e = refused(
            &json!({"op":"send","id":"s","conv":1,"to":2,"client_msg_id":3,"body":"x".repeat(1000)})
                .to_string(),
            c,
        );
        assert_eq!(
            (&e["id"], &e["code"], &e["code_name"], &e["request_kind"]),
            (&json!("s"), &json!(34), &json!("BodyTooLarge"), &json!(6))
        );
        assert_eq!(
            e["message"],
            json!(
                "its frame would be 1032 bytes, over the server's frame_bytes_max 1024: \
                   send a body over body_bytes_max with `send_part` (a large message)"
            )
        );
        let e = refused(&json!({"op":"stream","conv":1,"to":2,"body":"x".repeat(1000)}).to_string(), c);
        assert_eq!((&e["code"], &e["request_kind"]), (&json!(34), &json!(10)));
        let e = refused(&json!({"op":"presence_set","state":1,"extra":"x".repeat(1100)}).to_string(), c);
        assert_eq!((&e["code"], &e["request_kind"]), (&json!(3), &json!(25)));
        send(c, &json!({"op":"send","conv":1,"to":2,"client_msg_id":3,"body":"x".repeat(990)}).to_string());
        assert_eq!(id_of(c, &ack(3)), None);
        assert_eq!(c.held(), 0, "refused requests wait for nothing");
        for (body_bytes, offset, chunk) in [(5000, 0, 1000), (961, 1, 960), (960, 0, 960), (0, 0, 0)] {
            send(c, &part("ok", body_bytes, offset, chunk));
        }
    }

    /// Parts have no success answer: a refusal (request_kind 27) goes to the newest part with
    /// its client_msg_id; the part that ends the body is answered as a send (send_ack or error
    /// 6), unless refused itself; before login, NotLoggedIn refusals go in order.
    #[test]
    fn parts_are_matched() {
        let c = &mut logged_in_with(65536);
        let part = |id: Option<&str>, cmid: u64, body_bytes: usize, offset: usize, chunk: usize| {
            let mut v = json!({"op":"send_part","conv":1,"to":2,"client_msg_id":cmid,"body_bytes":body_bytes,
                               "offset":offset,"body":"x".repeat(chunk)});
            if let Some(id) = id {
                v["id"] = json!(id);
            }
            v.to_string()
        };
        // A whole upload: the send_ack goes to the last part; the others' ids are let go.
        send(c, &part(Some("p0"), 1, 6, 0, 3));
        send(c, &part(None, 1, 6, 3, 1));
        send(c, &part(Some("p1"), 1, 6, 4, 2));
        assert_eq!(c.held(), 3);
        assert_eq!(id_of(c, &ack(1)), Some(json!("p1")));
        assert_eq!(c.held(), 0);
        // A part refused (a gap): the newest part of that client_msg_id.
        send(c, &part(Some("a0"), 2, 10, 0, 3));
        send(c, &part(Some("a1"), 2, 10, 5, 3));
        assert_eq!(id_of(c, &error_frame(ErrorCode::Malformed, kind::PART, 9)), None);
        assert_eq!(id_of(c, &error_frame(ErrorCode::Malformed, kind::PART, 2)), Some(json!("a1")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::Timeout, kind::PART, 2)), Some(json!("a0")));
        // The last part refused: its Send is never answered, and its id is not kept for one.
        send(c, &part(Some("b"), 3, 4, 0, 4));
        assert_eq!(id_of(c, &error_frame(ErrorCode::UploadInProgress, kind::PART, 3)), Some(json!("b")));
        assert_eq!(c.held(), 0);
        // The whole Send refused (request_kind 6), as a send's.
        send(c, &part(Some("c"), 4, 4, 0, 4));
        assert_eq!(id_of(c, &error_frame(ErrorCode::UnknownRecipient, kind::SEND, 4)), Some(json!("c")));
        assert_eq!(c.held(), 0);
        // Parts without id wait for nothing.
        send(c, &part(None, 5, 4, 0, 2));
        assert_eq!(c.held(), 0);
        assert_eq!(id_of(c, &error_frame(ErrorCode::Busy, kind::PART, 5)), None);
        // Before login: NotLoggedIn (client_msg_id 0) in request order, ids or not.
        let c = &mut Correlator::new();
        let nli = |k| error_frame(ErrorCode::NotLoggedIn, k, 0);
        send(c, &part(None, 6, 4, 0, 2));
        send(c, &part(Some("n1"), 7, 4, 0, 4));
        send(c, r#"{"op":"send","id":"s","conv":1,"to":2,"client_msg_id":8}"#);
        assert_eq!(id_of(c, &nli(kind::PART)), None);
        assert_eq!(id_of(c, &nli(kind::PART)), Some(json!("n1")));
        assert_eq!(id_of(c, &nli(kind::SEND)), Some(json!("s")));
        assert_eq!(c.held(), 0);
    }

    /// Requests answered in order: each answer of the matching kind (or an error of the
    /// front's kind) takes the front's id; id-less requests keep their places; history
    /// messages carry their request's id; an answer of another kind takes nothing.
    #[test]
    fn ordered_requests_are_matched_first_in_first_out() {
        let c = &mut Correlator::new();
        send(c, r#"{"op":"ping","id":1}"#);
        send(c, r#"{"op":"ping"}"#);
        send(c, r#"{"op":"ping"}"#);
        send(c, r#"{"op":"register","id":"r","name":"a","password":"b"}"#);
        send(c, r#"{"op":"login","id":"l","name":"a","password":"b"}"#);
        send(c, r#"{"op":"history","id":"h","conv":1,"peer":2}"#);
        send(c, r#"{"op":"group_get","id":"g","group_id":"4611686018427387911"}"#);
        send(c, r#"{"op":"group_action","id":"ga","group_id":"4611686018427387911","action":1}"#);
        send(c, r#"{"op":"my_groups","id":"m"}"#);
        send(c, r#"{"op":"logout","id":"bye"}"#);
        assert_eq!(id_of(c, &pong()), Some(json!(1)));
        // A group answer while pings are at the front: not theirs.
        let info = enc(
            kind::GROUP_INFO,
            &protocol::GroupInfo {
                group_id: G,
                profile: Default::default(),
                founder: 1,
                members: 1,
                muted_all_until_ms: 0,
                my_role: 0,
            },
        );
        assert_eq!(id_of(c, &info), None);
        assert_eq!(id_of(c, &pong()), None);
        assert_eq!(id_of(c, &pong()), None);
        assert_eq!(id_of(c, &error_frame(ErrorCode::NameTaken, kind::REGISTER, 0)), Some(json!("r")));
        assert_eq!(id_of(c, &login_ok()), Some(json!("l")));
        let msg = protocol::Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: 1, body: vec![] };
        let stamp = Stamp { msg_id: 1, seq: 1, ts_ms: 1, from: 2, to: 1, conv: 1 };
        let page = frame::whole(
            kind::HISTORY_MSG,
            &stamped(kind::DELIVER, &msg, stamp)[HEADER_BYTES..HEADER_BYTES + 80],
        );
        assert_eq!(id_of(c, &page), Some(json!("h")));
        // A push between a page's messages has no id.
        assert_eq!(id_of(c, &stamped(kind::DELIVER, &msg, stamp)), None);
        assert_eq!(id_of(c, &page), Some(json!("h")));
        let end = enc(kind::HISTORY_END, &protocol::HistoryEnd { conv: 1, peer: 2, count: 2, more: false });
        assert_eq!(id_of(c, &end), Some(json!("h")));
        assert_eq!(id_of(c, &page), None, "the page is over");
        assert_eq!(id_of(c, &info), Some(json!("g")));
        let ok =
            |rk| enc(kind::GROUP_OK, &protocol::GroupOk { group_id: G, seq: 0, request_kind: rk, action: 1 });
        assert_eq!(id_of(c, &ok(kind::GROUP_UPDATE)), None, "a GroupOk of another request kind");
        assert_eq!(id_of(c, &ok(kind::GROUP_ACTION)), Some(json!("ga")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::StoreUnavailable, kind::MY_GROUPS, 0)), Some(json!("m")));
        assert_eq!(id_of(c, &enc(kind::BYE, &protocol::Bye { reserved: 0 })), Some(json!("bye")));
        assert_eq!(c.held(), 0);
    }

    /// Roster requests are answered in order: `roster_ok` and `roster_list` go to their own
    /// kind's request at the front, refusals with `request_kind` 18 / 19 too, and a
    /// `roster_notice` in between is a push.
    #[test]
    fn roster_answers_are_matched_in_order() {
        let c = &mut logged_in();
        send(c, r#"{"op":"roster_action","id":"a1","action":1,"user":2,"note":"hi"}"#);
        send(c, r#"{"op":"roster_get","id":"g1","list":0}"#);
        send(c, r#"{"op":"roster_action","id":"a2","action":2,"user":3}"#);
        send(c, r#"{"op":"roster_get","id":"g2","list":9}"#);
        let ok =
            |action, user| enc(kind::ROSTER_OK, &protocol::RosterOk { action, user, friends: action == 2 });
        let list = enc(kind::ROSTER_LIST, &protocol::RosterList { list: 0, entries: vec![], more: false });
        let notice =
            enc(kind::ROSTER_NOTICE, &protocol::RosterNotice { event: 1, from: 4, to: 1, note: "".into() });
        assert_eq!(id_of(c, &list), None, "a roster_list while a roster_action is at the front");
        assert_eq!(id_of(c, &ok(1, 2)), Some(json!("a1")));
        assert_eq!(id_of(c, &notice), None);
        assert_eq!(id_of(c, &list), Some(json!("g1")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::Blocked, kind::ROSTER_ACTION, 0)), Some(json!("a2")));
        let v = out(c, &error_frame(ErrorCode::InvalidRoster, kind::ROSTER_GET, 0));
        assert_eq!(
            (&v["id"], &v["code"], &v["code_name"]),
            (&json!("g2"), &json!(95), &json!("InvalidRoster"))
        );
        assert_eq!(c.held(), 0);
    }

    /// After login the catch-up reports failures as errors of the login's kind: they take no
    /// id, and a later login request is still answered (AlreadyLoggedIn) with its own.
    #[test]
    fn catch_up_errors_are_not_login_answers() {
        let c = &mut Correlator::new();
        send(c, r#"{"op":"login_token","id":"t","token":"x"}"#);
        send(c, r#"{"op":"login","id":"again","name":"a","password":"b"}"#);
        assert_eq!(id_of(c, &login_ok()), Some(json!("t")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::StoreUnavailable, kind::LOGIN_TOKEN, 0)), None);
        assert_eq!(id_of(c, &error_frame(ErrorCode::StoreUnavailable, kind::LOGIN, 0)), None);
        assert_eq!(id_of(c, &error_frame(ErrorCode::AlreadyLoggedIn, kind::LOGIN, 0)), Some(json!("again")));
    }

    /// Before login every request but register, login, login_token, ping and logout is refused
    /// NotLoggedIn with client_msg_id 0, in order: each refusal finds its request's id.
    #[test]
    fn not_logged_in_refusals_find_their_requests() {
        let c = &mut Correlator::new();
        let nli = |k| error_frame(ErrorCode::NotLoggedIn, k, 0);
        send(c, r#"{"op":"send","id":"s1","conv":1,"to":2,"client_msg_id":5}"#);
        send(c, r#"{"op":"send","conv":1,"to":2,"client_msg_id":6}"#);
        send(c, r#"{"op":"send","id":"s3","conv":1,"to":2,"client_msg_id":7}"#);
        send(c, r#"{"op":"stream","conv":1,"to":2,"client_msg_id":1}"#);
        send(c, r#"{"op":"stream","id":"st","conv":1,"to":2,"client_msg_id":1}"#);
        send(c, r#"{"op":"room_publish","id":"p","room_id":3}"#);
        send(c, r#"{"op":"delivery_ack","conv":1,"peer":2,"seq":1}"#);
        send(c, r#"{"op":"delivery_ack","id":"d","conv":1,"peer":2,"seq":1}"#);
        send(c, r#"{"op":"room_subscribe","id":"rs","room_id":3}"#);
        send(c, r#"{"op":"room_create","id":"rc"}"#);
        send(c, r#"{"op":"issue_token","id":"it"}"#);
        send(c, r#"{"op":"group_get","id":"gg","group_id":1}"#);
        assert_eq!(id_of(c, &nli(kind::SEND)), Some(json!("s1")));
        assert_eq!(id_of(c, &nli(kind::SEND)), None);
        assert_eq!(id_of(c, &nli(kind::SEND)), Some(json!("s3")));
        assert_eq!(id_of(c, &nli(kind::STREAM)), None);
        assert_eq!(id_of(c, &nli(kind::STREAM)), Some(json!("st")));
        assert_eq!(id_of(c, &nli(kind::ROOM_PUBLISH)), Some(json!("p")));
        assert_eq!(id_of(c, &nli(kind::DELIVERY_ACK)), None);
        assert_eq!(id_of(c, &nli(kind::DELIVERY_ACK)), Some(json!("d")));
        assert_eq!(id_of(c, &nli(kind::ROOM_SUBSCRIBE)), Some(json!("rs")));
        assert_eq!(id_of(c, &nli(kind::ROOM_CREATE)), Some(json!("rc")));
        assert_eq!(id_of(c, &nli(kind::ISSUE_TOKEN)), Some(json!("it")));
        assert_eq!(id_of(c, &nli(kind::GROUP_GET)), Some(json!("gg")));
        assert_eq!(c.held(), 0);
    }

    /// Requests read before the login_ok but handled after it: those with no answer to come
    /// (an id-less stream, a valid delivery ack) are let go when the login_ok goes out.
    #[test]
    fn login_lets_go_of_requests_without_answers() {
        let c = &mut Correlator::new();
        send(c, r#"{"op":"login","name":"a","password":"b"}"#);
        send(c, r#"{"op":"stream","conv":1,"to":2,"client_msg_id":1}"#);
        send(c, r#"{"op":"stream","id":"keep","conv":1,"to":2,"client_msg_id":2}"#);
        send(c, r#"{"op":"delivery_ack","id":"valid","conv":1,"peer":2,"seq":1}"#);
        send(c, r#"{"op":"delivery_ack","id":"refused","conv":1,"peer":0,"seq":1}"#);
        assert_eq!(c.held(), 5);
        out(c, &login_ok());
        assert_eq!(c.held(), 2);
        let refusal = error_frame(ErrorCode::InvalidConversation, kind::DELIVERY_ACK, 0);
        assert_eq!(id_of(c, &refusal), Some(json!("refused")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::Busy, kind::STREAM, 2)), Some(json!("keep")));
        // Logged in: a valid ack holds nothing, one the session refuses is held until refused.
        send(c, r#"{"op":"delivery_ack","id":1,"conv":2,"peer":"4611686018427387911","seq":1}"#);
        send(c, r#"{"op":"stream","conv":1,"to":2,"client_msg_id":3}"#);
        assert_eq!(c.held(), 0);
        send(c, r#"{"op":"delivery_ack","id":2,"conv":2,"peer":5,"seq":1}"#);
        send(c, r#"{"op":"delivery_ack","id":3,"conv":9,"peer":5,"seq":1}"#);
        assert_eq!(id_of(c, &refusal), Some(json!(2)));
        assert_eq!(id_of(c, &refusal), Some(json!(3)));
    }

    /// Room requests: subscribe, unsubscribe and delete by kind and room id (room errors carry
    /// the room id as client_msg_id), creates in order, publishes by client_msg_id.
    #[test]
    fn room_requests_are_matched_by_room() {
        let c = &mut logged_in();
        let ok = |k, room| {
            enc(kind::ROOM_OK, &protocol::RoomOk { room_id: room, request_kind: k, subscribers: 1 })
        };
        send(c, r#"{"op":"room_subscribe","id":"a","room_id":5}"#);
        send(c, r#"{"op":"room_subscribe","id":"b","room_id":6}"#);
        send(c, r#"{"op":"room_unsubscribe","id":"u","room_id":5}"#);
        send(c, r#"{"op":"room_delete","id":"d","room_id":5}"#);
        send(c, r#"{"op":"room_create","id":"c1"}"#);
        send(c, r#"{"op":"room_create","id":"c2","publish":2}"#);
        send(c, r#"{"op":"room_publish","id":"p","room_id":5,"client_msg_id":4,"body":"x"}"#);
        send(c, r#"{"op":"room_publish","room_id":5,"client_msg_id":5,"body":"x"}"#);
        assert_eq!(c.held(), 7, "an id-less publish is not held");
        assert_eq!(id_of(c, &ok(kind::ROOM_SUBSCRIBE, 6)), Some(json!("b")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::RoomNotFound, kind::ROOM_DELETE, 5)), Some(json!("d")));
        assert_eq!(id_of(c, &error_frame(ErrorCode::RoomFull, kind::ROOM_SUBSCRIBE, 5)), Some(json!("a")));
        assert_eq!(id_of(c, &ok(kind::ROOM_UNSUBSCRIBE, 5)), Some(json!("u")));
        assert_eq!(id_of(c, &ok(kind::ROOM_CREATE, 987)), Some(json!("c1")));
        assert_eq!(
            id_of(c, &error_frame(ErrorCode::TooManyRooms, kind::ROOM_CREATE, 988)),
            Some(json!("c2"))
        );
        assert_eq!(id_of(c, &error_frame(ErrorCode::NotPublisher, kind::ROOM_PUBLISH, 5)), None);
        assert_eq!(id_of(c, &error_frame(ErrorCode::NotPublisher, kind::ROOM_PUBLISH, 4)), Some(json!("p")));
        assert_eq!(c.held(), 0);
    }

    /// Pushes never carry an id, even with requests of every kind waiting.
    #[test]
    fn pushes_carry_no_id() {
        let c = &mut logged_in();
        for text in [
            r#"{"op":"send","id":1,"conv":1,"to":2,"client_msg_id":0}"#,
            r#"{"op":"history","id":2,"conv":1,"peer":2}"#,
            r#"{"op":"room_subscribe","id":3,"room_id":5}"#,
            r#"{"op":"stream","id":4,"conv":1,"to":2,"client_msg_id":0}"#,
        ] {
            send(c, text);
        }
        let msg = protocol::Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: 0, body: vec![] };
        let stamp = Stamp { msg_id: 1, seq: 1, ts_ms: 1, from: 2, to: 1, conv: 1 };
        let mut rm = RoomRequest::blank_room_msg(encode_room_publish(5, 0, b"").payload());
        RoomStamp { room_id: 5, seq: 1, ts_ms: 1, from: 2 }.write(&mut rm[HEADER_BYTES..]);
        let pushes = [
            stamped(kind::DELIVER, &msg, stamp),
            stamped(kind::STREAM_MSG, &msg, stamp),
            rm.freeze(),
            kick_frame(ErrorCode::ShuttingDown),
            Bytes::from(frame::encode_empty(kind::RESYNC)),
            error_frame(ErrorCode::SlowConsumer, 0, 0),
            error_frame(ErrorCode::StoreUnavailable, kind::RESYNC, 0),
            enc(kind::CATCHUP_END, &protocol::CatchUpEnd { count: 0, more: false, unavailable: 0 }),
            enc(kind::ROOM_CLOSED, &protocol::RoomClosed { room_id: 5, reason: 2 }),
            enc(kind::MISSED, &protocol::Missed { id: 5, count: 1, source: 1 }),
            enc(
                kind::GROUP_JOIN_REQUEST,
                &protocol::GroupJoinRequest {
                    group_id: G,
                    request: protocol::JoinRequest { user_id: 2, note: "".into(), ts_ms: 0 },
                },
            ),
            enc(kind::GROUP_DECISION, &protocol::GroupDecision { group_id: G, approved: false, by: 1 }),
            enc(kind::ROSTER_NOTICE, &protocol::RosterNotice { event: 1, from: 2, to: 1, note: "hi".into() }),
        ];
        let held = c.held();
        for f in &pushes {
            assert_eq!(id_of(c, f), None, "{}", answer(f, &mut Correlator::new()));
        }
        assert_eq!(c.held(), held);
    }

    /// Every queue is bounded; past its cap the oldest ids are forgotten, and answers in order
    /// keep their places; runs of id-less requests take one slot.
    #[test]
    fn correlator_is_bounded() {
        let c = &mut logged_in();
        let n = PENDING_MAX + 904;
        for i in 0..n {
            send(c, &format!(r#"{{"op":"send","id":{i},"conv":1,"to":2,"client_msg_id":{i}}}"#));
        }
        assert_eq!(c.held(), PENDING_MAX);
        assert_eq!(id_of(c, &ack(0)), None, "the oldest was let go");
        assert_eq!(id_of(c, &ack(n as u64 - 1)), Some(json!(n - 1)));
        let c = &mut logged_in();
        for i in 0..n {
            send(c, &format!(r#"{{"op":"ping","id":{i}}}"#));
        }
        assert_eq!(c.pending.ordered.items.len(), PENDING_MAX);
        for i in 0..n {
            let want = (i >= n - PENDING_MAX).then(|| json!(i));
            assert_eq!(id_of(c, &pong()), want, "pong {i}");
        }
        assert_eq!(c.held(), 0);
        for _ in 0..100_000 {
            send(c, r#"{"op":"ping"}"#);
        }
        send(c, r#"{"op":"ping","id":"last"}"#);
        assert_eq!(c.pending.ordered.items.len(), 2);
        assert_eq!(c.held(), 100_001);
        for _ in 0..100_000 {
            assert_eq!(id_of(c, &pong()), None);
        }
        assert_eq!(id_of(c, &pong()), Some(json!("last")));
        // Streams and publishes with ids are held only up to UNANSWERED_MAX each.
        for i in 0..2 * UNANSWERED_MAX {
            send(c, &format!(r#"{{"op":"stream","id":{i},"conv":1,"to":2,"client_msg_id":{i}}}"#));
            send(c, &format!(r#"{{"op":"room_publish","id":{i},"room_id":1,"client_msg_id":{i}}}"#));
        }
        assert_eq!(c.held(), 2 * UNANSWERED_MAX);
        // A refused request holds nothing.
        let _ = refused(r#"{"op":"ping","id":"x","nonce":-1}"#, c);
        assert_eq!(c.held(), 2 * UNANSWERED_MAX);
    }

    /// Every error of the JSON layer: its code, request_kind, precise message and echoed id.
    #[test]
    fn json_layer_errors() {
        let c = &mut Correlator::new();
        let cases: &[(&str, u64, u64, &str, Option<Value>)] = &[
            ("", 1, 0, "not valid JSON: EOF while parsing a value at line 1 column 0", None),
            ("nope", 1, 0, "not valid JSON: expected ident at line 1 column 2", None),
            ("[1]", 1, 0, "invalid type: sequence, expected a JSON object (a request)", None),
            (r#""ping""#, 1, 0, "invalid type: string \"ping\", expected a JSON object (a request)", None),
            (r#"{"op":"ping"} {}"#, 1, 5, "not valid JSON: trailing characters at line 1 column 15", None),
            (r#"{"op":"ping","id":"t""#, 1, 5, "not valid JSON: EOF while parsing an object at line 1 column 21", Some(json!("t"))),
            (r#"{"op":"fly","id":3}"#, 2, 0, "unknown op `fly`", Some(json!(3))),
            (r#"{"id":3,"op":"fly","wings":2}"#, 2, 0, "unknown op `fly`", Some(json!(3))),
            (r#"{"id":"x"}"#, 1, 0, "field `op` is required", Some(json!("x"))),
            (r#"{"op":5}"#, 1, 0, "field `op`: invalid type: integer `5`, expected a string", None),
            (
                r#"{"op":"send","conv":1,"to":"abc","client_msg_id":1,"id":"q"}"#,
                1,
                6,
                "field `to`: expected a u64, got the string \"abc\" (not decimal digits)",
                Some(json!("q")),
            ),
            (r#"{"op":"send","conv":1,"to":true,"client_msg_id":1}"#, 1, 6,
             "field `to`: invalid type: boolean `true`, expected a u64 (a non-negative integer, or a string of decimal digits)", None),
            (r#"{"op":"send","conv":1,"to":-1,"client_msg_id":1}"#, 1, 6, "field `to`: -1 is out of range for a u64", None),
            (r#"{"op":"send","conv":1,"to":1.5,"client_msg_id":1}"#, 1, 6, "field `to`: expected a u64, got 1.5 (not an integer)", None),
            (r#"{"op":"send","conv":1,"to":1e20,"client_msg_id":1}"#, 1, 6, "field `to`: 100000000000000000000 is out of range for a u64", None),
            (r#"{"op":"send","conv":1,"to":18446744073709551616,"client_msg_id":1}"#, 1, 6,
             "field `to`: 18446744073709552000 is out of range for a u64", None),
            (r#"{"op":"send","conv":1,"to":"18446744073709551616","client_msg_id":1}"#, 1, 6,
             "field `to`: 18446744073709551616 is out of range for a u64", None),
            (r#"{"op":"send","conv":1,"to":"+1","client_msg_id":1}"#, 1, 6,
             "field `to`: expected a u64, got the string \"+1\" (not decimal digits)", None),
            (r#"{"op":"send","conv":1,"to":"","client_msg_id":1}"#, 1, 6,
             "field `to`: expected a u64, got the string \"\" (not decimal digits)", None),
            (r#"{"op":"send","conv":300,"to":1,"client_msg_id":1}"#, 1, 6, "field `conv`: 300 is out of range for a u8 (0 to 255)", None),
            (r#"{"op":"send","conv":-1,"to":1,"client_msg_id":1}"#, 1, 6, "field `conv`: -1 is out of range for a u8 (0 to 255)", None),
            (r#"{"op":"send","conv":"1","to":1,"client_msg_id":1}"#, 1, 6,
             "field `conv`: invalid type: string \"1\", expected a u8 (a number, 0 to 255)", None),
            (r#"{"op":"history","conv":1,"peer":1,"limit":4294967296}"#, 1, 9,
             "field `limit`: 4294967296 is out of range for a u32 (0 to 4294967295)", None),
            (r#"{"op":"send","conv":1,"to":1}"#, 1, 6, "field `client_msg_id` is required for op `send`", None),
            (r#"{"op":"send","conv":1,"to":1,"client_msg_id":1,"body":"a","body_b64":"YQ=="}"#, 1, 6,
             "fields `body` and `body_b64` both given: give one", None),
            (r#"{"op":"send","conv":1,"to":1,"client_msg_id":1,"body_b64":"a!"}"#, 1, 6,
             "field `body_b64`: not standard base64: Invalid symbol 33, offset 1.", None),
            (r#"{"op":"send","conv":1,"to":1,"client_msg_id":1,"body":5}"#, 1, 6,
             "field `body`: invalid type: integer `5`, expected a string", None),
            (r#"{"op":"ping","nonce":1,"wat":2}"#, 1, 5, "unknown field `wat`", None),
            (r#"{"op":"ping","to":1}"#, 1, 5, "field `to` does not belong to op `ping`", None),
            (r#"{"op":"ping","nonce":1,"nonce":2}"#, 1, 5, "field `nonce` given twice", None),
            (r#"{"op":"ping","id":{}}"#, 1, 5, "field `id`: invalid type: map, expected a string or a number", None),
            (r#"{"op":"ping","id":true}"#, 1, 5, "field `id`: invalid type: boolean `true`, expected a string or a number", None),
            (r#"{"op":"ping","nonce":true,"id":"late"}"#, 1, 5,
             "field `nonce`: invalid type: boolean `true`, expected a u64 (a non-negative integer, or a string of decimal digits)",
             Some(json!("late"))),
            (r#"{"op":"room_create","publishers":[1,"x"]}"#, 1, 20,
             "field `publishers`: element 1: expected a u64, got the string \"x\" (not decimal digits)", None),
            (r#"{"op":"room_create","publishers":7}"#, 1, 20,
             "field `publishers`: invalid type: integer `7`, expected an array of u64s", None),
            (r#"{"op":"group_create","profile":{"name":"x","colour":"red"}}"#, 1, 30, "field `profile`: unknown field `colour`", None),
            (r#"{"op":"group_create","profile":{"join_policy":256}}"#, 1, 30,
             "field `profile`: field `join_policy`: 256 is out of range for a u8 (0 to 255)", None),
            (r#"{"op":"group_create","profile":{"extra":"a","extra_b64":""}}"#, 1, 30,
             "field `profile`: fields `extra` and `extra_b64` both given: give one", None),
            (r#"{"op":"group_create","profile":[]}"#, 1, 30,
             "field `profile`: invalid type: sequence, expected a group profile object", None),
            (r#"{"op":"group_create"}"#, 1, 30, "field `profile` is required for op `group_create`", None),
        ];
        for (text, code, rk, message, id) in cases {
            let v = refused(text, c);
            let mut want = json!({"type":"error","kind":120,"code":code,
                "code_name": if *code == 1 { "Malformed" } else { "UnknownKind" },
                "request_kind":rk,"client_msg_id":"0","message":message});
            if let Some(id) = id {
                want["id"] = id.clone();
            }
            assert_eq!(v, want, "{text}");
        }
        // Ids: null is none; long ones are refused; numbers and strings are echoed as given.
        let v = refused(r#"{"op":"ping","id":null,"x":1}"#, c);
        assert!(v.get("id").is_none());
        let long = format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(ID_BYTES_MAX));
        assert_eq!(
            refused(&long, c)["message"],
            json!(format!("field `id`: longer than {ID_BYTES_MAX} bytes"))
        );
        for id in [r#""a\"b\u0001""#, "-5", "1.5", "18446744073709551615", r#""é""#] {
            send(c, &format!(r#"{{"op":"ping","id":{id}}}"#));
            let echoed = id_of(c, &pong()).unwrap();
            assert_eq!(echoed, serde_json::from_str::<Value>(id).unwrap());
        }
        send(c, r#"{"op":"ping","id":1e2}"#);
        assert!(answer(&pong(), c).contains(r#","id":100.0,"#), "as docs/JSON.md says");
        assert_eq!(c.held(), 0);
        // A quoted piece of the text is cut short.
        let v = refused(&format!(r#"{{"op":"{}"}}"#, "é".repeat(100)), c);
        assert_eq!(v["message"], json!(format!("unknown op `{}`", "é".repeat(32))));
    }

    /// A frame queued at an odd address reads the same (it is copied to alignment), and a
    /// frame that cannot be read becomes an Internal error, never a panic.
    #[test]
    fn unreadable_or_misaligned_frames() {
        let f = ack(9);
        let mut shifted = vec![0u8; f.len() + 1];
        shifted[1..].copy_from_slice(&f);
        let c = &mut Correlator::new();
        assert_eq!(out(c, &shifted[1..]), out(c, &f));
        for bad in [
            &b"\x01\x02"[..],
            &f[..f.len() - 1],
            &[0, 0, 0, 0, 99, 0, 0, 0][..],
            &[8, 0, 0, 0, 106, 0, 0, 0][..],
        ] {
            let v = out(c, bad);
            assert_eq!(
                (v["type"].clone(), v["code"].clone(), v["code_name"].clone()),
                (json!("error"), json!(50), json!("Internal"))
            );
        }
    }

    /// The example exchange of docs/JSON.md is, character for character, what this module
    /// reads and writes.
    #[test]
    fn docs_example_is_what_the_code_writes() {
        let doc = include_str!("../docs/JSON.md");
        let example = &doc[doc.find("## 7. Example exchange").unwrap()..doc.find("## 8. Limits").unwrap()];
        let lines: Vec<&str> =
            example.lines().filter(|l| l.starts_with("→ ") || l.starts_with("← ")).map(|l| &l[4..]).collect();
        assert_eq!(lines.len(), 10);
        let (alice, bob) = (&mut Correlator::new(), &mut Correlator::new());
        send(alice, lines[0]);
        assert_eq!(answer(&enc(kind::REGISTER_OK, &protocol::RegisterOk { user_id: 1 }), alice), lines[1]);
        send(alice, lines[2]);
        let ok = protocol::LoginOk {
            user_id: 1,
            session_id: 0x0001_0000_0000_0003,
            server_time_ms: 1767225600000,
            idle_timeout_ms: 90000,
            frame_bytes_max: 65536,
            body_bytes_max: 32768,
            inflight_max: 256,
            protocol_version: 1,
            large_body_bytes_max: 8 << 20,
        };
        assert_eq!(answer(&enc(kind::LOGIN_OK, &ok), alice), lines[3]);
        send(alice, lines[4]);
        let f = frame::encode(
            kind::SEND,
            &protocol::Send {
                conv: 1,
                flags: 0,
                burn_secs: 0,
                to: 2,
                client_msg_id: 1,
                body: b"hello".to_vec(),
            },
        );
        assert_eq!(frame_of(lines[4]).as_bytes(), &f[..]);
        let acked = protocol::SendAck {
            client_msg_id: 1,
            msg_id: 0x0123456789abcdef,
            seq: 1,
            ts_ms: 1767225600123,
            duplicate: false,
        };
        assert_eq!(answer(&enc(kind::SEND_ACK, &acked), alice), lines[5]);
        let stamp =
            Stamp { msg_id: 0x0123456789abcdef, seq: 1, ts_ms: 1767225600123, from: 1, to: 2, conv: 1 };
        let hello = protocol::Send {
            conv: 1,
            flags: 0,
            burn_secs: 0,
            to: 2,
            client_msg_id: 1,
            body: b"hello".to_vec(),
        };
        assert_eq!(answer(&stamped(kind::DELIVER, &hello, stamp), bob), lines[6]);
        let ack = frame::encode(kind::DELIVERY_ACK, &protocol::DeliveryAck { conv: 1, peer: 1, seq: 1 });
        assert_eq!(frame_of(lines[7]).as_bytes(), &ack[..]);
        match request(lines[8], alice) {
            Inbound::Error(e) => assert_eq!(e, lines[9]),
            Inbound::Frame(f) => panic!("accepted as {f:?}"),
        }
        // The single examples elsewhere in the document too.
        for (i, (text, want)) in [
            (
                r#"{"type":"send_ack","kind":106,"id":"m-17","client_msg_id":"17","msg_id":"81985529216486895","seq":"1","ts_ms":"1767225600123","duplicate":false}"#,
                {
                    let c = &mut Correlator::new();
                    send(c, r#"{"op": "send", "id": "m-17", "conv": 1, "to": "2", "client_msg_id": "17", "body": "hello"}"#);
                    answer(&enc(kind::SEND_ACK, &protocol::SendAck { client_msg_id: 17, ..acked }), c)
                },
            ),
            (
                r#"{"type":"error","kind":120,"id":"m-18","code":30,"code_name":"UnknownRecipient","request_kind":6,"client_msg_id":"18","message":"unknown recipient"}"#,
                {
                    let c = &mut logged_in();
                    send(c, r#"{"op":"send","id":"m-18","conv":1,"to":"99","client_msg_id":"18"}"#);
                    answer(&error_frame(ErrorCode::UnknownRecipient, kind::SEND, 18), c)
                },
            ),
            (
                r#"{"type":"deliver","kind":107,"msg_id":"81985529216486895","seq":"1","ts_ms":"1767225600123","from":"1","to":"2","conv":1,"client_msg_id":"1","body":"hello"}"#,
                answer(&stamped(kind::DELIVER, &hello, stamp), &mut Correlator::new()),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(doc.contains(text), "example {i} is not in the document");
            assert_eq!(want, text);
        }
        for text in [
            r#"{"type":"error","kind":120,"id":"q","code":1,"code_name":"Malformed","request_kind":6,"client_msg_id":"0","message":"field `to`: expected a u64, got the string \"abc\" (not decimal digits)"}"#,
            r#"{"type":"deliver","kind":107,"msg_id":"9","seq":"5","ts_ms":"1767225600123","from":"0","to":"4611686018427387911","conv":2,"client_msg_id":"0","notice":{"event":15,"actor":"1","target":"0","until_ms":"0","users":["4","5"]}}"#,
        ] {
            assert!(doc.contains(text), "{text} is not in the document");
        }
        match request(
            r#"{"op":"send","conv":1,"to":"abc","client_msg_id":1,"id":"q"}"#,
            &mut Correlator::new(),
        ) {
            Inbound::Error(e) => assert!(doc.contains(&e), "{e} is not in the document"),
            Inbound::Frame(f) => panic!("accepted as {f:?}"),
        }
        frame_of(
            r#"{"op":"group_create","id":4,"profile":{"name":"tim fans","topic":"all about tim","join_policy":1}}"#,
        );
        // The recall of section 3.1, its notice and the tombstone of section 4.3.
        let recall = r#"{"op":"recall","id":"r-1","conv":1,"to":"2","client_msg_id":"19","seq":"1"}"#;
        assert!(doc.contains(recall));
        let notice = protocol::Send {
            conv: 1,
            flags: protocol::send_flags::RECALL,
            burn_secs: 0,
            to: 2,
            client_msg_id: 19,
            body: 1u64.to_le_bytes().to_vec(),
        };
        assert_eq!(frame_of(recall).as_bytes(), &frame::encode(kind::SEND, &notice)[..]);
        let at = Stamp { msg_id: 0x0123456789abcdf0, seq: 2, ts_ms: 1767225660123, ..stamp };
        let text = answer(&stamped(kind::DELIVER, &notice, at), &mut Correlator::new());
        assert!(doc.contains(&format!("```json\n{text}\n```")), "{text} is not in the document");
        let c = &mut logged_in();
        send(c, r#"{"op":"history","id":"h","conv":1,"peer":1}"#);
        let gone = protocol::Send { body: vec![], ..hello };
        let mut f = BytesMut::from(&stamped(kind::HISTORY_MSG, &gone, stamp)[..]);
        f[HEADER_BYTES + Stamp::STATE_AT] = protocol::msg_state::RECALLED;
        let text = answer(&f, c);
        assert!(doc.contains(&format!("```json\n{text}\n```")), "{text} is not in the document");
    }

    /// A small seeded generator (xorshift64*), enough to mutate inputs reproducibly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Whether `f`'s payload validates as its kind's archive (as the session will check).
    fn validates(f: &RequestFrame) -> bool {
        use protocol::*;
        let p = f.payload();
        match f.kind() {
            kind::REGISTER => frame::access::<ArchivedRegister>(p).is_ok(),
            kind::LOGIN => frame::access::<ArchivedLogin>(p).is_ok(),
            kind::LOGIN_TOKEN => frame::access::<ArchivedLoginToken>(p).is_ok(),
            kind::ISSUE_TOKEN => frame::access::<ArchivedIssueToken>(p).is_ok(),
            kind::PING => frame::access::<ArchivedPing>(p).is_ok(),
            kind::SEND | kind::STREAM => frame::access::<ArchivedSend>(p).is_ok(),
            kind::DELIVERY_ACK => frame::access::<ArchivedDeliveryAck>(p).is_ok(),
            kind::LOGOUT => frame::access::<ArchivedLogout>(p).is_ok(),
            kind::HISTORY => frame::access::<ArchivedHistory>(p).is_ok(),
            kind::ROOM_CREATE => frame::access::<ArchivedRoomCreate>(p).is_ok(),
            kind::ROOM_SUBSCRIBE | kind::ROOM_UNSUBSCRIBE | kind::ROOM_DELETE => {
                frame::access::<ArchivedRoomRef>(p).is_ok()
            }
            kind::ROOM_PUBLISH => frame::access::<ArchivedRoomPublish>(p).is_ok(),
            kind::GROUP_CREATE => frame::access::<ArchivedGroupCreate>(p).is_ok(),
            kind::GROUP_UPDATE => frame::access::<ArchivedGroupUpdate>(p).is_ok(),
            kind::GROUP_ACTION => frame::access::<ArchivedGroupAction>(p).is_ok(),
            kind::GROUP_GET | kind::GROUP_REQUESTS => frame::access::<ArchivedGroupRef>(p).is_ok(),
            kind::GROUP_MEMBERS => frame::access::<ArchivedGroupMembers>(p).is_ok(),
            kind::MY_GROUPS => frame::access::<ArchivedMyGroups>(p).is_ok(),
            kind::MY_SESSIONS => frame::access::<ArchivedMySessions>(p).is_ok(),
            kind::SESSION_LOGOUT => frame::access::<ArchivedSessionLogout>(p).is_ok(),
            kind::TYPING => frame::access::<ArchivedTyping>(p).is_ok(),
            kind::READ => frame::access::<ArchivedRead>(p).is_ok(),
            kind::READ_GET => frame::access::<ArchivedReadGet>(p).is_ok(),
            kind::PROFILE_UPDATE => frame::access::<ArchivedProfileUpdate>(p).is_ok(),
            kind::PROFILE_GET => frame::access::<ArchivedProfileGet>(p).is_ok(),
            kind::GROUP_ADD_MEMBERS => frame::access::<ArchivedGroupAddMembers>(p).is_ok(),
            kind::ROSTER_ACTION => frame::access::<ArchivedRosterAction>(p).is_ok(),
            kind::PRESENCE_SET => frame::access::<ArchivedPresenceSet>(p).is_ok(),
            kind::PRESENCE_GET => frame::access::<ArchivedPresenceGet>(p).is_ok(),
            kind::ROSTER_GET => frame::access::<ArchivedRosterGet>(p).is_ok(),
            _ => false,
        }
    }

    /// Hostile texts and frames: thousands of byte-wise mutations and truncations of valid
    /// requests and answers never panic; a request becomes a frame that validates or an error
    /// object, and an answer is always one JSON object.
    #[test]
    fn mutated_input_never_panics() {
        let requests = [
            r#"{"op":"send","id":"abc","conv":1,"to":"2","client_msg_id":1,"body":"hé\n"}"#,
            r#"{"op":"room_publish","room_id":5,"client_msg_id":9,"body_b64":"AP8="}"#,
            r#"{"op":"group_create","id":1.5,"profile":{"name":"x","extra_b64":"AQID","join_policy":1}}"#,
            r#"{"op":"room_create","publish":1,"subscribers_max":100,"publishers":[7,"8"]}"#,
            r#"{"op":"login","name":"alice","password":"pw","device_type":4,"device_id":"\u00e9"}"#,
            r#"{"op":"group_action","group_id":"4611686018427387911","action":10,"user_id":3,"note":"n"}"#,
            r#"{"op":"history","conv":1,"peer":2,"anchor_seq":20,"direction":1,"limit":3,"id":[1]}"#,
            r#"{"op":"roster_action","id":"f","action":1,"user":"2","note":"hi \u00e9"}"#,
            r#"{"op":"roster_get","list":2,"after":"9","limit":10}"#,
        ];
        let alphabet = br#"{}[]":,\0123456789-+.eEtrufalsn "#;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut corr = Correlator::new();
        for round in 0..20_000 {
            let mut b = requests[round % requests.len()].as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len() + 1);
                match rng.below(5) {
                    0 if at < b.len() => b[at] = alphabet[rng.below(alphabet.len())],
                    1 => b.insert(at, alphabet[rng.below(alphabet.len())]),
                    2 if at < b.len() => {
                        b.remove(at);
                    }
                    3 => b.truncate(at),
                    _ if at < b.len() => b[at] = rng.next() as u8,
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&b);
            match request(&text, &mut corr) {
                Inbound::Frame(f) => assert!(validates(&f), "{text} gave an invalid {f:?}"),
                Inbound::Error(e) => {
                    let v: Value = serde_json::from_str(&e).unwrap_or_else(|_| panic!("{text} → {e}"));
                    assert_eq!(v["type"], json!("error"));
                }
            }
        }
        // Answers: valid frames mutated anywhere (header included), and the correlator's
        // queues in any state.
        let msg = protocol::Send {
            conv: 2,
            flags: 0,
            burn_secs: 0,
            to: G,
            client_msg_id: 0,
            body: rkyv::to_bytes::<rancor::Error>(&protocol::GroupNotice {
                event: 15,
                actor: 1,
                target: 0,
                until_ms: 0,
                users: vec![4, 5],
            })
            .unwrap()
            .to_vec(),
        };
        let frames: Vec<Bytes> = vec![
            stamped(kind::DELIVER, &msg, Stamp { msg_id: 1, seq: 1, ts_ms: 1, from: 0, to: G, conv: 2 }),
            error_frame(ErrorCode::Busy, kind::SEND, 3),
            enc(
                kind::GROUP_REQUEST_PAGE,
                &protocol::GroupRequestPage {
                    group_id: G,
                    requests: vec![protocol::JoinRequest { user_id: 2, note: "n".into(), ts_ms: 0 }],
                },
            ),
            login_ok(),
            ack(1),
        ];
        for round in 0..20_000 {
            let mut b = frames[round % frames.len()].to_vec();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                b.truncate(rng.below(b.len() + 1));
            }
            if round % 7 == 0 {
                send(&mut corr, r#"{"op":"ping","id":1}"#);
            }
            let text = answer(&b, &mut corr);
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(v["type"].is_string() && v["kind"].is_u64(), "{text}");
        }
    }
}
