//! Protocol v1: frame kinds, the rkyv message types of each kind, the delivery stamp, device types
//! and error codes. `docs/PROTOCOL.md` is the normative description; this file must agree with it.
//!
//! Every frame's payload is the rkyv archive of the type named by its kind, except `DELIVER`,
//! whose payload is a fixed 48-byte [`Stamp`] followed by the sender's `Send` archive, verbatim.

use rkyv::{Archive, Deserialize, Serialize};

/// Protocol version spoken by this server (reported in `LoginOk`).
pub const PROTOCOL_VERSION: u16 = 1;

/// Frame kinds. Client → server kinds are below 100, server → client kinds are 100 and above.
pub mod kind {
    pub const REGISTER: u16 = 1;
    pub const LOGIN: u16 = 2;
    pub const LOGIN_TOKEN: u16 = 3;
    pub const ISSUE_TOKEN: u16 = 4;
    pub const PING: u16 = 5;
    pub const SEND: u16 = 6;
    pub const DELIVERY_ACK: u16 = 7;
    pub const LOGOUT: u16 = 8;
    pub const HISTORY: u16 = 9;
    /// A message to a user's live sessions, never stored (payload: a `Send` archive).
    pub const STREAM: u16 = 10;
    /// List this account's live sessions (payload: a [`super::MySessions`]); answered with
    /// `SESSION_LIST`.
    pub const MY_SESSIONS: u16 = 11;
    /// Log one of this account's sessions out (payload: a [`super::SessionLogout`]); answered
    /// with `SESSION_LIST`, the session gets `Kick{LoggedOutElsewhere}`.
    pub const SESSION_LOGOUT: u16 = 12;
    /// "Typing" (or stopped) to a 1:1 peer or a group (payload: a [`super::Typing`]); never
    /// stored, never answered but with a refusal; pushed as `TYPING_NOTICE`.
    pub const TYPING: u16 = 13;
    /// Replace this account's profile (payload: a [`super::ProfileUpdate`]); answered with
    /// `PROFILE_LIST` holding it.
    pub const PROFILE_UPDATE: u16 = 14;
    /// Read the profiles of some users (payload: a [`super::ProfileGet`]); answered with
    /// `PROFILE_LIST`.
    pub const PROFILE_GET: u16 = 15;
    /// "Read up to seq" in a conversation (payload: a [`super::Read`]); never answered but with
    /// a refusal; pushed to the peer (or the group's members, in small groups) and the reader's
    /// other sessions as `READ_NOTICE`.
    pub const READ: u16 = 16;
    /// Who read a conversation how far (payload: a [`super::ReadGet`]); answered with
    /// `READ_STATE`.
    pub const READ_GET: u16 = 17;
    /// Ask, accept, reject or cancel a friendship, remove a friend, block or unblock a user
    /// (payload: a [`super::RosterAction`]); answered with `ROSTER_OK`.
    pub const ROSTER_ACTION: u16 = 18;
    /// One of this account's roster lists (payload: a [`super::RosterGet`]); answered with
    /// `ROSTER_LIST`.
    pub const ROSTER_GET: u16 = 19;
    /// Set this account's presence (payload: a [`super::PresenceSet`]); answered with
    /// `PRESENCE_LIST` holding it; friends get `PRESENCE_NOTICE`.
    pub const PRESENCE_SET: u16 = 25;
    /// The presence of some users (payload: a [`super::PresenceGet`]); answered with
    /// `PRESENCE_LIST`.
    pub const PRESENCE_GET: u16 = 26;
    /// A part of a frame too large for one (a large `Send`): raw payload, see [`super::part`].
    pub const PART: u16 = 27;
    pub const ROOM_CREATE: u16 = 20;
    pub const ROOM_SUBSCRIBE: u16 = 21;
    pub const ROOM_UNSUBSCRIBE: u16 = 22;
    pub const ROOM_PUBLISH: u16 = 23;
    pub const ROOM_DELETE: u16 = 24;
    pub const GROUP_CREATE: u16 = 30;
    pub const GROUP_UPDATE: u16 = 31;
    /// Join, leave, invite, kick, approve, reject, managers, transfer, mute, block, dissolve.
    pub const GROUP_ACTION: u16 = 32;
    pub const GROUP_GET: u16 = 33;
    pub const GROUP_MEMBERS: u16 = 34;
    pub const MY_GROUPS: u16 = 35;
    pub const GROUP_REQUESTS: u16 = 36;
    /// Add many users at once (a new group's first members, an import).
    pub const GROUP_ADD_MEMBERS: u16 = 37;

    pub const REGISTER_OK: u16 = 101;
    pub const LOGIN_OK: u16 = 102;
    pub const TOKEN_ISSUED: u16 = 104;
    pub const PONG: u16 = 105;
    pub const SEND_ACK: u16 = 106;
    pub const DELIVER: u16 = 107;
    pub const BYE: u16 = 108;
    pub const ERROR: u16 = 120;
    pub const KICK: u16 = 121;
    /// One message of a history page: same payload layout as `DELIVER`.
    pub const HISTORY_MSG: u16 = 109;
    pub const HISTORY_END: u16 = 110;
    pub const CATCHUP_END: u16 = 111;
    /// A stream message: the 48-byte stamp (msg_id 0, seq of the stored message it follows),
    /// then the sender's `Stream` archive (a `Send`) verbatim.
    pub const STREAM_MSG: u16 = 112;
    /// Pushed after a cluster change that may have lost live deliveries (a node failed): a
    /// catch-up follows (`DELIVER` frames, then `CATCHUP_END`), as after a login. Empty payload.
    pub const RESYNC: u16 = 113;
    /// A message from the server's operator (the admin API): to every online session, or to
    /// the online members of a group. Never stored. Payload: a [`super::Broadcast`].
    pub const BROADCAST: u16 = 114;
    /// The answer to `MY_SESSIONS` and `SESSION_LOGOUT` (payload: a [`super::SessionList`]).
    pub const SESSION_LIST: u16 = 115;
    /// Someone is typing (or stopped) in a conversation (payload: a [`super::TypingNotice`]).
    pub const TYPING_NOTICE: u16 = 116;
    /// The answer to `PROFILE_GET` and `PROFILE_UPDATE` (payload: a [`super::ProfileList`]).
    pub const PROFILE_LIST: u16 = 117;
    /// Someone read a conversation up to a seq (payload: a [`super::ReadNotice`]).
    pub const READ_NOTICE: u16 = 118;
    /// The answer to `READ_GET` (payload: a [`super::ReadState`]).
    pub const READ_STATE: u16 = 119;
    /// The answer to `ROSTER_ACTION` (payload: a [`super::RosterOk`]).
    pub const ROSTER_OK: u16 = 122;
    /// The answer to `ROSTER_GET` (payload: a [`super::RosterList`]).
    pub const ROSTER_LIST: u16 = 123;
    /// A roster change between two users, to both users' sessions (payload: a
    /// [`super::RosterNotice`]).
    pub const ROSTER_NOTICE: u16 = 124;
    /// The answer to `PRESENCE_SET` and `PRESENCE_GET` (payload: a [`super::PresenceList`]).
    pub const PRESENCE_LIST: u16 = 125;
    /// A friend's presence changed (payload: a [`super::PresenceEntry`]).
    pub const PRESENCE_NOTICE: u16 = 126;
    /// A part of a frame whose payload is over the client's `frame_bytes_max` (a large
    /// `Deliver` or `HistoryMsg`): raw payload, see [`super::part`].
    pub const PART_OUT: u16 = 127;
    /// The answer to a room request that succeeded (create, subscribe, unsubscribe, delete).
    pub const ROOM_OK: u16 = 130;
    /// A message published to a live room: a [`super::RoomStamp`], then the publisher's
    /// `RoomPublish` archive verbatim.
    pub const ROOM_MSG: u16 = 131;
    /// A room this session was subscribed to is gone (deleted or expired).
    pub const ROOM_CLOSED: u16 = 132;
    /// Room or stream messages this session did not get: it read too slowly.
    pub const MISSED: u16 = 133;
    /// The answer to a group request that changed something (create, update, action).
    pub const GROUP_OK: u16 = 140;
    /// A group's profile and counts (the answer to `GroupGet`).
    pub const GROUP_INFO: u16 = 141;
    /// A page of a group's members (the answer to `GroupMembers`).
    pub const GROUP_MEMBER_PAGE: u16 = 142;
    /// A page of the caller's groups (the answer to `MyGroups`).
    pub const GROUP_LIST: u16 = 143;
    /// A group's pending join requests (the answer to `GroupRequests`).
    pub const GROUP_REQUEST_PAGE: u16 = 144;
    /// Pushed to a group's managers' live sessions: someone asks to join.
    pub const GROUP_JOIN_REQUEST: u16 = 145;
    /// Pushed to a requester's live sessions: a manager approved or rejected the join request.
    pub const GROUP_DECISION: u16 = 146;

    /// Human name of a kind, for logs and errors.
    pub fn name(kind: u16) -> &'static str {
        match kind {
            REGISTER => "Register",
            LOGIN => "Login",
            LOGIN_TOKEN => "LoginToken",
            ISSUE_TOKEN => "IssueToken",
            PING => "Ping",
            SEND => "Send",
            DELIVERY_ACK => "DeliveryAck",
            LOGOUT => "Logout",
            HISTORY => "History",
            STREAM => "Stream",
            ROOM_CREATE => "RoomCreate",
            ROOM_SUBSCRIBE => "RoomSubscribe",
            ROOM_UNSUBSCRIBE => "RoomUnsubscribe",
            ROOM_PUBLISH => "RoomPublish",
            ROOM_DELETE => "RoomDelete",
            GROUP_CREATE => "GroupCreate",
            GROUP_UPDATE => "GroupUpdate",
            GROUP_ACTION => "GroupAction",
            GROUP_GET => "GroupGet",
            GROUP_MEMBERS => "GroupMembers",
            MY_GROUPS => "MyGroups",
            GROUP_REQUESTS => "GroupRequests",
            GROUP_ADD_MEMBERS => "GroupAddMembers",
            MY_SESSIONS => "MySessions",
            SESSION_LOGOUT => "SessionLogout",
            SESSION_LIST => "SessionList",
            TYPING => "Typing",
            TYPING_NOTICE => "TypingNotice",
            PROFILE_UPDATE => "ProfileUpdate",
            PROFILE_GET => "ProfileGet",
            PROFILE_LIST => "ProfileList",
            READ => "Read",
            READ_GET => "ReadGet",
            READ_NOTICE => "ReadNotice",
            READ_STATE => "ReadState",
            ROSTER_ACTION => "RosterAction",
            ROSTER_GET => "RosterGet",
            ROSTER_OK => "RosterOk",
            ROSTER_LIST => "RosterList",
            ROSTER_NOTICE => "RosterNotice",
            PRESENCE_SET => "PresenceSet",
            PRESENCE_GET => "PresenceGet",
            PRESENCE_LIST => "PresenceList",
            PRESENCE_NOTICE => "PresenceNotice",
            PART => "Part",
            PART_OUT => "PartOut",
            REGISTER_OK => "RegisterOk",
            LOGIN_OK => "LoginOk",
            TOKEN_ISSUED => "TokenIssued",
            PONG => "Pong",
            SEND_ACK => "SendAck",
            DELIVER => "Deliver",
            BYE => "Bye",
            ERROR => "Error",
            KICK => "Kick",
            HISTORY_MSG => "HistoryMsg",
            HISTORY_END => "HistoryEnd",
            CATCHUP_END => "CatchUpEnd",
            STREAM_MSG => "StreamMsg",
            RESYNC => "Resync",
            BROADCAST => "Broadcast",
            ROOM_OK => "RoomOk",
            ROOM_MSG => "RoomMsg",
            ROOM_CLOSED => "RoomClosed",
            MISSED => "Missed",
            GROUP_OK => "GroupOk",
            GROUP_INFO => "GroupInfo",
            GROUP_MEMBER_PAGE => "GroupMemberPage",
            GROUP_LIST => "GroupList",
            GROUP_REQUEST_PAGE => "GroupRequestPage",
            GROUP_JOIN_REQUEST => "GroupJoinRequest",
            GROUP_DECISION => "GroupDecision",
            _ => "unknown",
        }
    }
}

/// Conversation kinds carried in `Send.conv` and the delivery stamp.
pub mod conv {
    /// A 1:1 conversation; `to` is the peer's user id.
    pub const DIRECT: u8 = 1;
    /// A group; `to` is the group id. In a stamp, `from` 0 marks a group notice (the body is
    /// a [`super::GroupNotice`] archive).
    pub const GROUP: u8 = 2;
}

/// Parts: a frame whose payload is too large for one frame travels as a run of part frames, in
/// order, without gaps: a client's large `Send` as `PART` frames, a server's large `Deliver` or
/// `HistoryMsg` as `PART_OUT` frames. A part's payload is raw, not an archive: a
/// [`part::HEADER_BYTES`]-byte header, then the part's bytes of the whole payload.
pub mod part {
    /// Bytes of a part's header: `id` u64, `total` u32, `offset` u32, `kind` u16, 6 zero bytes.
    pub const HEADER_BYTES: usize = 24;

    /// A part's header.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PartHeader {
        /// Client: the `client_msg_id` of the `Send`. Server: a number per connection.
        pub id: u64,
        /// The whole payload's length.
        pub total: u32,
        /// Where this part's bytes go in the whole payload.
        pub offset: u32,
        /// The whole frame's kind.
        pub kind: u16,
    }

    impl PartHeader {
        /// The header and the part's bytes of a `PART` payload (`None`: shorter than a header).
        pub fn read(payload: &[u8]) -> Option<(PartHeader, &[u8])> {
            if payload.len() < HEADER_BYTES {
                return None;
            }
            let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
            let u32_at = |i: usize| u32::from_le_bytes(payload[i..i + 4].try_into().expect("4 bytes"));
            let h = PartHeader {
                id: u64_at(0),
                total: u32_at(8),
                offset: u32_at(12),
                kind: u16::from_le_bytes([payload[16], payload[17]]),
            };
            Some((h, &payload[HEADER_BYTES..]))
        }

        /// The header's bytes.
        pub fn bytes(&self) -> [u8; HEADER_BYTES] {
            let mut b = [0u8; HEADER_BYTES];
            b[0..8].copy_from_slice(&self.id.to_le_bytes());
            b[8..12].copy_from_slice(&self.total.to_le_bytes());
            b[12..16].copy_from_slice(&self.offset.to_le_bytes());
            b[16..18].copy_from_slice(&self.kind.to_le_bytes());
            b
        }
    }

    /// The most bytes of the whole payload one part carries when parts may be at most
    /// `frame_bytes_max` long: a multiple of 8.
    pub fn data_max(frame_bytes_max: usize) -> usize {
        (frame_bytes_max - HEADER_BYTES) & !7
    }
}

/// `Send::flags`: at most one of these. Unknown bits are refused (`Malformed`).
pub mod send_flags {
    /// A 1:1 message that is deleted from the store once its recipient has read it (`Read`),
    /// or `burn_secs` after it was accepted.
    pub const BURN_AFTER_READ: u8 = 1;
    /// A recall: the body is the seq (u64 LE, 8 bytes) of a message of the same conversation
    /// to take back. Stored and delivered as a message of its own (a recall notice).
    pub const RECALL: u8 = 2;
    /// Set by the server only: a burn notice (the body: the seqs burned, u64 LE each). A
    /// client's `Send` with it is refused.
    pub const BURNED: u8 = 4;
    /// The bits a client may set.
    pub const CLIENT: u8 = BURN_AFTER_READ | RECALL;
}

/// `Stamp::state` (byte 41 of a stamp): what became of a stored message. A tombstone keeps the
/// stamp and the Send archive's root (conv, flags, burn_secs, to, client_msg_id); its body is
/// gone (empty).
pub mod msg_state {
    pub const PLAIN: u8 = 0;
    /// Taken back by its sender (or a group manager).
    pub const RECALLED: u8 = 1;
    /// Burned after reading (or at the end of its lifetime).
    pub const BURNED: u8 = 2;
}

/// Group ids lie in `[GROUP_ID_MIN, 2^63)`: never a user id.
pub const GROUP_ID_MIN: u64 = 1 << 62;

/// Whether `id` is in the group id range.
pub fn is_group_id(id: u64) -> bool {
    (GROUP_ID_MIN..1 << 63).contains(&id)
}

/// Bits 48 to 55 of a user, group or room id hold the id of its tenant domain (8.17); 0 is the
/// default domain.
pub const DOMAIN_SHIFT: u32 = 48;

/// The tenant domain of a user, group or room id.
pub fn domain_of(id: u64) -> u8 {
    (id >> DOMAIN_SHIFT) as u8
}

/// `id` with its domain bits set to `domain`.
pub fn in_domain(id: u64, domain: u8) -> u64 {
    (id & !(0xff << DOMAIN_SHIFT)) | (domain as u64) << DOMAIN_SHIFT
}

/// Who may join a group (`GroupCreate.join_policy`).
pub mod join_policy {
    /// Anyone not blocked joins at once.
    pub const OPEN: u8 = 0;
    /// A join is a request that a manager approves or rejects.
    pub const APPROVAL: u8 = 1;
}

/// Who may invite (`GroupCreate.invite_policy`).
pub mod invite_policy {
    pub const MANAGERS: u8 = 0;
    pub const MEMBERS: u8 = 1;
}

/// A member's role in a group.
pub mod group_role {
    pub const MEMBER: u8 = 0;
    pub const MANAGER: u8 = 1;
    pub const FOUNDER: u8 = 2;
}

/// `GroupAction.action`.
pub mod group_action {
    /// Join (open group) or ask to join (approval group; `note` goes to the managers).
    pub const JOIN: u8 = 1;
    pub const LEAVE: u8 = 2;
    /// Add `user_id` (managers; members too where the invite policy allows).
    pub const INVITE: u8 = 3;
    pub const KICK: u8 = 4;
    /// Approve `user_id`'s join request (managers).
    pub const APPROVE: u8 = 5;
    pub const REJECT: u8 = 6;
    /// Make `user_id` a manager (founder).
    pub const ADD_MANAGER: u8 = 7;
    pub const REMOVE_MANAGER: u8 = 8;
    /// Make `user_id` the founder; the old founder becomes a manager (founder).
    pub const TRANSFER: u8 = 9;
    /// Mute `user_id` until `until_ms` (0: unmute) (managers; a manager only plain members).
    pub const MUTE: u8 = 10;
    /// Mute every member but the managers until `until_ms` (0: unmute) (managers).
    pub const MUTE_ALL: u8 = 11;
    /// Block `user_id`: removed if a member, and cannot join or be invited (managers).
    pub const BLOCK: u8 = 12;
    pub const UNBLOCK: u8 = 13;
    /// End the group (founder).
    pub const DISSOLVE: u8 = 14;
}

/// `GroupNotice.event`: what changed, told to the members in the group's sequence.
pub mod group_event {
    pub const CREATED: u8 = 1;
    pub const JOINED: u8 = 2;
    pub const LEFT: u8 = 3;
    pub const KICKED: u8 = 4;
    /// `target` was added by `actor` (an invite, or an approved request).
    pub const ADDED: u8 = 5;
    pub const MANAGER_ADDED: u8 = 6;
    pub const MANAGER_REMOVED: u8 = 7;
    pub const TRANSFERRED: u8 = 8;
    /// `target` muted until `until_ms` (0: unmuted).
    pub const MUTED: u8 = 9;
    /// Everyone but the managers muted until `until_ms` (0: unmuted).
    pub const MUTED_ALL: u8 = 10;
    pub const PROFILE_CHANGED: u8 = 11;
    /// `target` blocked (and removed, if a member).
    pub const BLOCKED: u8 = 12;
    pub const DISSOLVED: u8 = 13;
    pub const UNBLOCKED: u8 = 14;
    /// `users` were added by `actor` in one request (`GroupAddMembers`).
    pub const MEMBERS_ADDED: u8 = 15;
}

/// Who may publish to a live room (`RoomCreate.publish`).
pub mod room_publish {
    /// The room's creator only.
    pub const OWNER: u8 = 0;
    /// The creator and the users listed in `RoomCreate.publishers`.
    pub const LISTED: u8 = 1;
    /// The creator and any session subscribed to the room.
    pub const SUBSCRIBERS: u8 = 2;
}

/// What `Missed.source` counts.
pub mod missed {
    /// Room messages; `Missed.id` is the room id.
    pub const ROOM: u8 = 1;
    /// Stream messages; `Missed.id` is the other user of the conversation.
    pub const STREAM: u8 = 2;
}

/// Why a room closed (`RoomClosed.reason`).
pub mod room_closed {
    /// Its creator deleted it.
    pub const DELETED: u16 = 1;
    /// Nothing was published to it for `room_idle_secs`.
    pub const EXPIRED: u16 = 2;
    /// Its owner's node left the cluster or its partition moved to another node (rooms are
    /// never stored: create it again).
    pub const OWNER_LOST: u16 = 3;
}

/// Device types a session declares at login; limits apply per type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DeviceType {
    Other = 0,
    Mobile = 1,
    Tablet = 2,
    Desktop = 3,
    Web = 4,
}

impl DeviceType {
    pub const COUNT: usize = 5;

    pub fn from_u8(v: u8) -> Option<DeviceType> {
        Some(match v {
            0 => DeviceType::Other,
            1 => DeviceType::Mobile,
            2 => DeviceType::Tablet,
            3 => DeviceType::Desktop,
            4 => DeviceType::Web,
            _ => return None,
        })
    }
}

/// Error codes of `Error` frames (and `Kick.reason`). Stable: clients switch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The payload failed validation as an archive of its kind's type.
    Malformed = 1,
    /// The frame kind is not one a client may send.
    UnknownKind = 2,
    /// The header's payload length is over `frame_bytes_max`. The connection is closed.
    FrameTooLarge = 3,
    /// The header's flags are not zero. The connection is closed.
    BadHeader = 4,
    /// The operation needs a logged-in session.
    NotLoggedIn = 10,
    /// Login, token login or register on a session that is already logged in.
    AlreadyLoggedIn = 11,
    /// No account has that name.
    UnknownUser = 12,
    /// The password does not match.
    WrongPassword = 13,
    /// Register: the name is taken.
    NameTaken = 14,
    /// Register/login: the name breaks the name rules.
    InvalidName = 15,
    /// Register: the password breaks the password rules.
    InvalidPassword = 16,
    /// LoginToken: unknown, expired or already used.
    InvalidToken = 17,
    /// Login refused: the account is at its session limit and the policy is `refuse`.
    DeviceLimit = 18,
    /// Unknown device type or a device id over its limit.
    InvalidDevice = 19,
    /// IssueToken: the account already holds `tokens_per_user_max` live tokens.
    TooManyTokens = 20,
    /// Send: the recipient does not exist.
    UnknownRecipient = 30,
    /// Send: unsupported conversation kind.
    InvalidConversation = 31,
    /// The server is overloaded on this path; retry later with the same client message id.
    Busy = 33,
    /// Send: the body is over `body_bytes_max`, or the archive carries more than
    /// `SEND_OVERHEAD_BYTES_MAX` bytes besides its body.
    BodyTooLarge = 34,
    /// A recall names no message of the conversation that this user may take back (none with
    /// that seq, another user's, a notice, or already recalled or burned).
    NotRecallable = 35,
    /// A recall came later than `recall_window_secs` after the message.
    RecallExpired = 36,
    /// Burn after read in a group (it is for 1:1 messages only).
    BurnNotAllowed = 37,
    /// A session sends one large message at a time: another is being uploaded or waits for its
    /// answer.
    UploadInProgress = 38,
    /// The other user blocks this one: no message, no friend request.
    Blocked = 90,
    /// Not friends: a 1:1 message under `messages.require_friendship`, or removing a user who
    /// is no friend.
    NotFriends = 91,
    /// A friend request to a friend.
    AlreadyFriends = 92,
    /// Accept, reject or cancel without such a pending request.
    NoFriendRequest = 93,
    /// The user has `roster_entries_max` friends and outgoing requests.
    TooManyFriends = 94,
    /// A roster request is invalid (unknown action or list, oneself, a note over its limit, a
    /// request to a user one blocks).
    InvalidRoster = 95,
    /// A presence request is invalid (unknown state, a text or extra data over its limit, no
    /// ids or more than `presence_query_max`).
    InvalidPresence = 96,
    /// A watch request for a user one watches already.
    AlreadyWatching = 97,
    /// Allow or deny without a pending watch request; unwatch without a watch or request;
    /// revoke of a user who does not watch this one.
    NoWatch = 98,
    /// No login within `login_timeout_ms` of connecting. The connection is closed.
    LoginTimeout = 40,
    /// No bytes received within `idle_timeout_ms`. The connection is closed.
    IdleTimeout = 41,
    /// Kick: a newer login of the same account took this session's place.
    Replaced = 42,
    /// Kick: the server is shutting down.
    ShuttingDown = 43,
    /// The session's outbound queue is over `session_outbound_bytes_max`. Closed.
    SlowConsumer = 44,
    /// The shard is at `connections_per_shard_max`. Closed.
    TooManyConnections = 45,
    /// A frame was left incomplete for `partial_frame_timeout_ms`. Closed.
    PartialFrameTimeout = 46,
    /// Too many registrations, or sends to accounts that do not exist, from this connection or
    /// this source address within a minute. A Register is refused; for unknown recipients the
    /// connection is closed.
    RateLimited = 47,
    /// Kick: the server's operator closed this session (admin API).
    KickedByOperator = 48,
    /// Login, LoginToken: the account is banned (until a time, or for good). Kick: the account
    /// was just banned; every session of it is closed.
    Banned = 49,
    /// Kick: another session of the account logged this one out (`SessionLogout`).
    LoggedOutElsewhere = 54,
    /// SessionLogout: no live session of this account has that id.
    UnknownSession = 21,
    /// ProfileUpdate: a text or `extra` over its limit, a text not UTF-8, an unknown gender or
    /// a birthday that is no yyyymmdd date; ProfileGet: no ids, or more than
    /// `profiles_per_request_max`.
    InvalidProfile = 22,
    /// No such group (or not a group id).
    GroupNotFound = 70,
    /// Only a member of the group may do this.
    NotMember = 71,
    /// Only a manager (or the founder) may do this, or only to a member below them.
    NotManager = 72,
    /// Send: the sender, or the whole group, is muted.
    Muted = 73,
    /// The group is at its member cap.
    GroupFull = 74,
    /// The group was dissolved.
    GroupDissolved = 75,
    /// The user is on the group's block list.
    BlockedFromGroup = 76,
    /// The user is in `groups_per_user_max` groups.
    TooManyGroups = 77,
    /// A group field or action is invalid (over its size cap, unknown policy or action, ...).
    InvalidGroup = 78,
    /// Join or invite of a user who is a member already.
    AlreadyMember = 79,
    /// Leave: the founder must transfer the group or dissolve it first.
    FounderMustTransfer = 80,
    /// Join: the group holds `group_join_requests_max` pending requests.
    TooManyJoinRequests = 81,
    /// Approve or reject: the user has no pending request.
    NoJoinRequest = 82,
    /// Only the founder may do this.
    NotFounder = 83,
    /// An internal failure (store error). The request may be retried.
    Internal = 50,
    /// The message store did not commit in time or failed. Nothing was acknowledged; retry with
    /// the same client message id.
    StoreUnavailable = 51,
    /// The server did not answer within `answer_timeout_ms` (a hand-off between its threads was
    /// lost or held up). The outcome is unknown: retry (a Send with the same client message id).
    Timeout = 52,
    /// The owner of the request's user, conversation, group or room is on a node of the cluster
    /// this node cannot reach now (it just failed, or a link is down). Nothing was done; retry
    /// (a Send with the same client message id) — the owner moves within seconds.
    NodeUnavailable = 53,
    /// Room request: no live room has this id (never created, deleted or expired).
    RoomNotFound = 60,
    /// RoomPublish: this user (or session) may not publish to the room.
    NotPublisher = 61,
    /// RoomSubscribe: the room is at its subscriber cap.
    RoomFull = 62,
    /// RoomDelete: only the room's creator may delete it.
    NotRoomOwner = 63,
    /// RoomCreate: the server holds `rooms_per_shard_max` rooms on that shard; RoomSubscribe:
    /// the session is in `room_subscriptions_per_session_max` rooms already.
    TooManyRooms = 64,
    /// RoomCreate: unknown publish policy, or more than `room_publishers_max` publishers.
    InvalidRoom = 65,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => Malformed,
            2 => UnknownKind,
            3 => FrameTooLarge,
            4 => BadHeader,
            10 => NotLoggedIn,
            11 => AlreadyLoggedIn,
            12 => UnknownUser,
            13 => WrongPassword,
            14 => NameTaken,
            15 => InvalidName,
            16 => InvalidPassword,
            17 => InvalidToken,
            18 => DeviceLimit,
            19 => InvalidDevice,
            20 => TooManyTokens,
            30 => UnknownRecipient,
            31 => InvalidConversation,
            33 => Busy,
            34 => BodyTooLarge,
            35 => NotRecallable,
            36 => RecallExpired,
            37 => BurnNotAllowed,
            38 => UploadInProgress,
            90 => Blocked,
            91 => NotFriends,
            92 => AlreadyFriends,
            93 => NoFriendRequest,
            94 => TooManyFriends,
            95 => InvalidRoster,
            96 => InvalidPresence,
            97 => AlreadyWatching,
            98 => NoWatch,
            40 => LoginTimeout,
            41 => IdleTimeout,
            42 => Replaced,
            43 => ShuttingDown,
            44 => SlowConsumer,
            45 => TooManyConnections,
            46 => PartialFrameTimeout,
            47 => RateLimited,
            48 => KickedByOperator,
            49 => Banned,
            54 => LoggedOutElsewhere,
            21 => UnknownSession,
            22 => InvalidProfile,
            50 => Internal,
            51 => StoreUnavailable,
            52 => Timeout,
            53 => NodeUnavailable,
            60 => RoomNotFound,
            61 => NotPublisher,
            62 => RoomFull,
            63 => NotRoomOwner,
            64 => TooManyRooms,
            65 => InvalidRoom,
            70 => GroupNotFound,
            71 => NotMember,
            72 => NotManager,
            73 => Muted,
            74 => GroupFull,
            75 => GroupDissolved,
            76 => BlockedFromGroup,
            77 => TooManyGroups,
            78 => InvalidGroup,
            79 => AlreadyMember,
            80 => FounderMustTransfer,
            81 => TooManyJoinRequests,
            82 => NoJoinRequest,
            83 => NotFounder,
            _ => return None,
        })
    }

    /// Short text sent in `Error.message`.
    pub fn text(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Malformed => "payload is not a valid archive of its kind",
            UnknownKind => "unknown frame kind",
            FrameTooLarge => "frame over the size cap",
            BadHeader => "frame header flags must be zero",
            NotLoggedIn => "log in first",
            AlreadyLoggedIn => "already logged in",
            UnknownUser => "unknown user",
            WrongPassword => "wrong password",
            NameTaken => "name taken",
            InvalidName => "invalid name",
            InvalidPassword => "invalid password",
            InvalidToken => "invalid, expired or used token",
            DeviceLimit => "session limit reached",
            InvalidDevice => "invalid device",
            TooManyTokens => "too many live tokens",
            UnknownRecipient => "unknown recipient",
            InvalidConversation => "invalid conversation",
            Busy => "server busy, retry",
            BodyTooLarge => "body too large",
            NotRecallable => "not recallable",
            RecallExpired => "recall window passed",
            BurnNotAllowed => "burn after read is for 1:1 messages",
            UploadInProgress => "another large message is in progress on this session",
            Blocked => "blocked by that user",
            NotFriends => "not friends",
            AlreadyFriends => "already friends",
            NoFriendRequest => "no such friend request",
            TooManyFriends => "too many friends",
            InvalidRoster => "invalid roster request",
            InvalidPresence => "invalid presence request",
            AlreadyWatching => "already watching",
            NoWatch => "no such watch or watch request",
            LoginTimeout => "login timeout",
            IdleTimeout => "idle timeout",
            Replaced => "replaced by a newer login",
            ShuttingDown => "server shutting down",
            SlowConsumer => "too slow to read",
            TooManyConnections => "too many connections",
            PartialFrameTimeout => "incomplete frame timeout",
            RateLimited => "too many requests of this kind, slow down",
            KickedByOperator => "closed by the server's operator",
            Banned => "the account is banned",
            LoggedOutElsewhere => "logged out from another session of the account",
            UnknownSession => "no such session of this account",
            InvalidProfile => "invalid profile or profile request",
            Internal => "internal error",
            StoreUnavailable => "message store unavailable, retry",
            Timeout => "no answer in time, retry",
            NodeUnavailable => "the owner is on a node out of reach, retry",
            RoomNotFound => "no such room",
            NotPublisher => "not allowed to publish to this room",
            RoomFull => "room full",
            NotRoomOwner => "only the room's creator may do this",
            TooManyRooms => "too many rooms",
            InvalidRoom => "invalid room options",
            GroupNotFound => "no such group",
            NotMember => "not a member of this group",
            NotManager => "only a manager may do this",
            Muted => "muted in this group",
            GroupFull => "group full",
            GroupDissolved => "group dissolved",
            BlockedFromGroup => "blocked from this group",
            TooManyGroups => "in too many groups",
            InvalidGroup => "invalid group request",
            AlreadyMember => "already a member",
            FounderMustTransfer => "the founder must transfer or dissolve the group first",
            TooManyJoinRequests => "too many pending join requests",
            NoJoinRequest => "no such join request",
            NotFounder => "only the founder may do this",
        }
    }
}

// ---- client → server ----

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Register {
    pub name: String,
    pub password: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Login {
    pub name: String,
    pub password: String,
    pub device_type: u8,
    pub device_id: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LoginToken {
    pub token: String,
    pub device_type: u8,
    pub device_id: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct IssueToken {
    /// Requested lifetime in seconds; 0 means the server default. Capped by `token_ttl_secs`.
    pub ttl_secs: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Ping {
    pub nonce: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Send {
    /// Conversation kind, see [`conv`].
    pub conv: u8,
    /// What kind of message this is, see [`send_flags`] (0: a plain message).
    pub flags: u8,
    /// With [`send_flags::BURN_AFTER_READ`]: the message burns this many seconds after the
    /// server accepted it, read or not; 0: only once read. Otherwise 0.
    pub burn_secs: u32,
    /// The peer's user id for [`conv::DIRECT`].
    pub to: u64,
    /// Chosen by the client, unique per sender and conversation; a resend with the same id is
    /// acknowledged again and not delivered twice.
    pub client_msg_id: u64,
    pub body: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeliveryAck {
    pub conv: u8,
    /// The other side of the conversation, as in the stamp's `from` (or `to` for own messages).
    pub peer: u64,
    /// Everything up to and including this sequence number has been received.
    pub seq: u64,
}

/// Ask for a page of a conversation's stored messages.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct History {
    pub conv: u8,
    pub peer: u64,
    /// With `direction` 0 (older): messages with seq < anchor_seq, newest first; anchor 0 means
    /// "from the newest". With `direction` 1 (newer): messages with seq > anchor_seq, oldest first.
    pub anchor_seq: u64,
    pub direction: u8,
    /// At most this many (capped by `history_page_max`; 0 means the cap).
    pub limit: u32,
}

/// Create a live room (never stored). Answered with `RoomOk` carrying the new room's id.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoomCreate {
    /// Who may publish, see [`room_publish`].
    pub publish: u8,
    /// Subscriber cap; 0 means the server's `room_subscribers_max` (also the upper bound).
    pub subscribers_max: u32,
    /// With [`room_publish::LISTED`]: the users who may publish besides the creator.
    pub publishers: Vec<u64>,
}

/// Subscribe, unsubscribe or delete (by kind): answered with `RoomOk`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoomRef {
    pub room_id: u64,
}

/// Publish to a live room. No success answer (a room message is never stored and never
/// retried); a refusal is an `Error` carrying `client_msg_id`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoomPublish {
    pub room_id: u64,
    pub client_msg_id: u64,
    pub body: Vec<u8>,
}

/// A group's profile, as created and updated. (serde: the memory store's replicas in a
/// cluster.)
#[derive(
    Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize,
)]
pub struct GroupProfile {
    pub name: String,
    pub topic: String,
    pub avatar_url: String,
    /// Opaque to the server, at most `group_extra_bytes_max` bytes.
    pub extra: Vec<u8>,
    /// See [`join_policy`].
    pub join_policy: u8,
    /// See [`invite_policy`].
    pub invite_policy: u8,
}

/// Create a group; the creator is its founder. Answered with `GroupOk` carrying the new id.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupCreate {
    pub profile: GroupProfile,
}

/// Replace a group's profile (managers). Answered with `GroupOk`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupUpdate {
    pub group_id: u64,
    pub profile: GroupProfile,
}

/// One change of a group's membership or settings, see [`group_action`]. Answered with
/// `GroupOk`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupAction {
    pub group_id: u64,
    pub action: u8,
    /// The member or user acted on (0 where the action has none).
    pub user_id: u64,
    /// MUTE and MUTE_ALL: until when (milliseconds since the Unix epoch; 0 lifts the mute).
    pub until_ms: u64,
    /// JOIN on an approval group: a note for the managers.
    pub note: String,
}

/// Ask for a group's profile and counts, or (by kind) its pending join requests.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupRef {
    pub group_id: u64,
}

/// Add users to a group in one change, as INVITE does for one (managers; members too where the
/// invite policy allows). Users already members are skipped; answered with `GroupOk`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupAddMembers {
    pub group_id: u64,
    /// At most `group_add_batch_max` user ids.
    pub user_ids: Vec<u64>,
}

/// Ask for a page of a group's members, by rising user id (members only).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupMembers {
    pub group_id: u64,
    /// Members with a user id above this one (0: from the start).
    pub after_user: u64,
    /// At most this many (capped by `group_page_max`; 0 means the cap).
    pub limit: u32,
}

/// Ask for a page of the caller's groups, by rising group id.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MyGroups {
    pub after_group: u64,
    pub limit: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Logout {
    pub reserved: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MySessions {
    pub reserved: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionLogout {
    /// One of this account's sessions (as in `SessionList`; this session's own is allowed).
    pub session_id: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Typing {
    /// The peer (`conv` 1) or the group (`conv` 2).
    pub to: u64,
    pub conv: u8,
    /// 1: typing; 0: stopped.
    pub state: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TypingNotice {
    pub from: u64,
    /// The user it is for (`conv` 1) or the group (`conv` 2).
    pub to: u64,
    pub conv: u8,
    pub state: u8,
}

/// Read receipts: "this device has read `conv`/`peer` up to `seq`" (as `DeliveryAck` names a
/// conversation).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Read {
    pub conv: u8,
    pub peer: u64,
    pub seq: u64,
}

/// Ask how far a conversation was read: `read_count` counts the users who read `seq`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReadGet {
    pub conv: u8,
    pub peer: u64,
    pub seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReadNotice {
    /// The reader.
    pub from: u64,
    /// The conversation as the reader named it: the other user (`conv` 1) or the group.
    pub to: u64,
    pub conv: u8,
    pub seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReadEntry {
    pub user: u64,
    pub seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReadState {
    pub conv: u8,
    pub peer: u64,
    pub seq: u64,
    /// Users (other than the asker) who read `seq` or beyond.
    pub read_count: u32,
    /// Users (other than the asker) of the conversation: 1 in a 1:1 chat, the members but the
    /// asker in a group.
    pub member_count: u32,
    /// Each user's read position (the asker's included), by rising user id: both users of a
    /// 1:1 chat; a group's members only up to `receipts_live_members_max` members, else empty.
    pub reads: Vec<ReadEntry>,
}

/// `PresenceSet::state` and `PresenceEntry::state`.
pub mod presence_state {
    /// No live session (or invisible, to others).
    pub const OFFLINE: u8 = 0;
    pub const ONLINE: u8 = 1;
    pub const AWAY: u8 = 2;
    pub const BUSY: u8 = 3;
    /// Set only: appear offline to everybody else, and still receive everything.
    pub const INVISIBLE: u8 = 4;
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PresenceSet {
    /// ONLINE, AWAY, BUSY or INVISIBLE.
    pub state: u8,
    /// At most `presence_text_bytes_max` bytes.
    pub text: String,
    /// Opaque, at most `presence_extra_bytes_max` bytes.
    pub extra: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PresenceGet {
    /// 1 to `presence_query_max` users.
    pub user_ids: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PresenceEntry {
    pub user: u64,
    /// As others see it ([`presence_state`]; an invisible user is OFFLINE but to itself).
    pub state: u8,
    /// When it took this state (ms since the epoch; 0: unknown).
    pub since_ms: u64,
    /// Status text and extra data (empty while OFFLINE).
    pub text: String,
    pub extra: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PresenceList {
    /// In the order asked.
    pub entries: Vec<PresenceEntry>,
}

/// `RosterAction::action`, and `RosterNotice::event` (the action that changed the pair).
pub mod roster_action {
    /// Ask `user` for friendship (with a note); to a user who asked first: accept.
    pub const REQUEST: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const REJECT: u8 = 3;
    /// End a friendship.
    pub const REMOVE: u8 = 4;
    /// Block `user`: no messages or requests from it, and no friendship or request left.
    pub const BLOCK: u8 = 5;
    pub const UNBLOCK: u8 = 6;
    /// Withdraw one's own pending request.
    pub const CANCEL: u8 = 7;
    /// Ask to see `user`'s presence without a friendship (again while pending: a reminder).
    pub const WATCH: u8 = 8;
    /// Let `user`, who asked, see this user's presence.
    pub const ALLOW: u8 = 9;
    /// Turn `user`'s watch request down.
    pub const DENY: u8 = 10;
    /// Stop watching `user`, or withdraw one's own watch request.
    pub const UNWATCH: u8 = 11;
    /// Stop `user` watching this user's presence.
    pub const REVOKE: u8 = 12;
}

/// `RosterGet::list`.
pub mod roster_list {
    pub const FRIENDS: u8 = 0;
    /// Requests others sent this user.
    pub const INCOMING: u8 = 1;
    /// Requests this user sent.
    pub const OUTGOING: u8 = 2;
    /// Users this user blocks.
    pub const BLOCKED: u8 = 3;
    /// Users who see this user's presence by a watch.
    pub const WATCHERS: u8 = 4;
    /// Users whose presence this user sees by a watch.
    pub const WATCHING: u8 = 5;
    /// Watch requests others sent this user.
    pub const WATCH_INCOMING: u8 = 6;
    /// Watch requests this user sent.
    pub const WATCH_OUTGOING: u8 = 7;
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RosterAction {
    pub action: u8,
    pub user: u64,
    /// A request's note (at most `roster_note_bytes_max` bytes); empty otherwise.
    pub note: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RosterOk {
    pub action: u8,
    pub user: u64,
    /// Whether the two users are friends now (a request to a user who asked first makes them
    /// friends at once).
    pub friends: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RosterGet {
    pub list: u8,
    /// Entries with a user id above this one (0: from the start).
    pub after: u64,
    /// At most this many (0 or above `group_page_max`: `group_page_max`).
    pub limit: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RosterEntry {
    pub user: u64,
    /// Since when (friends: since the friendship; requests and blocks: since they were made).
    pub since_ms: u64,
    /// A request's note (incoming and outgoing lists); empty otherwise.
    pub note: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RosterList {
    pub list: u8,
    /// By rising user id.
    pub entries: Vec<RosterEntry>,
    pub more: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RosterNotice {
    /// What happened ([`roster_action`]): any action but BLOCK and UNBLOCK (those only to the
    /// acting user's own other sessions).
    pub event: u8,
    /// Who did it.
    pub from: u64,
    /// To whom.
    pub to: u64,
    /// A request's note.
    pub note: String,
}

/// A user's public profile. Texts are UTF-8 of at most `profile_text_bytes_max` bytes each,
/// `extra` at most `profile_extra_bytes_max` bytes (opaque to the server).
#[derive(
    Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize,
)]
pub struct UserProfile {
    pub nickname: String,
    pub avatar_url: String,
    /// 0 unknown, 1 female, 2 male, 3 other.
    pub gender: u8,
    /// yyyymmdd (0: unknown).
    pub birthday: u32,
    pub area: String,
    pub extra: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProfileUpdate {
    pub profile: UserProfile,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProfileGet {
    /// At most `profiles_per_request_max` ids.
    pub user_ids: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProfileEntry {
    pub user_id: u64,
    /// When it was last changed (ms since the epoch; 0: never set, an empty profile).
    pub updated_ms: u64,
    pub profile: UserProfile,
}

/// Profiles in the order asked, users that do not exist left out.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProfileList {
    pub profiles: Vec<ProfileEntry>,
}

/// One live session of an account.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub session_id: u64,
    /// When it logged in (ms since the epoch).
    pub login_ms: u64,
    pub device_type: u8,
    /// Whether it is the session that asked.
    pub current: bool,
    /// The login's `device_id`.
    pub device_id: String,
}

/// An account's live sessions, oldest login first.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

// ---- server → client ----

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RegisterOk {
    pub user_id: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LoginOk {
    pub user_id: u64,
    pub session_id: u64,
    pub server_time_ms: u64,
    /// Send something (a Ping will do) at least this often, or be closed.
    pub idle_timeout_ms: u32,
    /// The server's `frame_bytes_max`: the largest payload it accepts.
    pub frame_bytes_max: u32,
    /// The server's `body_bytes_max`: the largest message body it accepts.
    pub body_bytes_max: u32,
    /// The server's `inflight_per_session_max`: unacknowledged sends before it stops reading.
    pub inflight_max: u32,
    pub protocol_version: u16,
    /// The server's `large_body_bytes_max`: the largest body of a `Send` sent in parts (where
    /// older versions had padding).
    pub large_body_bytes_max: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TokenIssued {
    pub token: String,
    pub expires_at_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Pong {
    pub nonce: u64,
    pub server_time_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SendAck {
    pub client_msg_id: u64,
    pub msg_id: u64,
    pub seq: u64,
    pub ts_ms: u64,
    /// True when this acknowledges a resend of an already accepted message.
    pub duplicate: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Error {
    pub code: u16,
    /// The kind of the request this answers, 0 when none.
    pub request_kind: u16,
    /// For `Send` errors: the client message id; else 0.
    pub client_msg_id: u64,
    pub message: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Kick {
    pub reason: u16,
    pub message: String,
}

/// Closes a history page: `count` `HISTORY_MSG` frames came before it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct HistoryEnd {
    pub conv: u8,
    pub peer: u64,
    pub count: u32,
    /// More messages lie beyond this page in the asked direction.
    pub more: bool,
}

/// Sent once after login when the store is durable: `count` stored messages this device had not
/// acknowledged were sent (as `DELIVER` frames) before it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CatchUpEnd {
    pub count: u32,
    /// More were waiting than `catchup_messages_max`: fetch them with `History`.
    pub more: bool,
    /// Store ranges that did not answer in time: the catch-up left out their conversations'
    /// messages (log in again later, or page them with `History`). 0: the catch-up is complete.
    pub unavailable: u32,
}
const _: () = assert!(std::mem::size_of::<ArchivedCatchUpEnd>() == 12);

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoomOk {
    pub room_id: u64,
    /// The kind of the request this answers.
    pub request_kind: u16,
    /// Subscribers after the request (0 for RoomCreate and RoomDelete).
    pub subscribers: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoomClosed {
    pub room_id: u64,
    /// See [`room_closed`].
    pub reason: u16,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Missed {
    /// The room id ([`missed::ROOM`]) or the other user of the conversation ([`missed::STREAM`]).
    pub id: u64,
    /// Messages dropped for this session since its last `Missed` for the same source and id.
    pub count: u64,
    /// See [`missed`].
    pub source: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupOk {
    pub group_id: u64,
    /// The seq of the notice the change made in the group's sequence (0: none: a join request
    /// kept for approval, or a rejected one dropped).
    pub seq: u64,
    /// The kind of the request this answers.
    pub request_kind: u16,
    /// For `GroupAction`: the action; else 0.
    pub action: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupInfo {
    pub group_id: u64,
    pub profile: GroupProfile,
    pub founder: u64,
    pub members: u32,
    /// Everyone but the managers is muted until then (0: not).
    pub muted_all_until_ms: u64,
    /// The caller's role (see [`group_role`]), or 255 when not a member.
    pub my_role: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupMember {
    pub user_id: u64,
    /// See [`group_role`].
    pub role: u8,
    /// Muted until then (0: not muted).
    pub muted_until_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupMemberPage {
    pub group_id: u64,
    pub members: Vec<GroupMember>,
    /// More members lie past the last one.
    pub more: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupList {
    pub groups: Vec<u64>,
    pub more: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JoinRequest {
    pub user_id: u64,
    pub note: String,
    pub ts_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupRequestPage {
    pub group_id: u64,
    pub requests: Vec<JoinRequest>,
}

/// Pushed to managers: `request.user_id` asks to join `group_id`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupJoinRequest {
    pub group_id: u64,
    pub request: JoinRequest,
}

/// Pushed to a requester: its join request was approved (it is a member now) or rejected.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupDecision {
    pub group_id: u64,
    pub approved: bool,
    /// The manager who decided.
    pub by: u64,
}

/// The body of a group notice: a `DELIVER` whose stamp has `from` 0 and `conv` GROUP carries a
/// `Send` archive whose body is this archive.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupNotice {
    /// See [`group_event`].
    pub event: u8,
    /// Who made the change (the founder for CREATED; the member for JOINED and LEFT).
    pub actor: u64,
    /// Who it was done to: the member itself for JOINED and LEFT, 0 where none (CREATED,
    /// MUTED_ALL, PROFILE_CHANGED, DISSOLVED, MEMBERS_ADDED).
    pub target: u64,
    /// MUTED and MUTED_ALL: until when (0: lifted).
    pub until_ms: u64,
    /// MEMBERS_ADDED: the users added (empty for every other event).
    pub users: Vec<u64>,
}

/// An operator's message (kind `BROADCAST`), pushed to online sessions; never stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Broadcast {
    /// When the operator sent it (milliseconds since the Unix epoch).
    pub ts_ms: u64,
    /// The group whose online members get it; 0: every online session of the server.
    pub group_id: u64,
    pub body: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Bye {
    pub reserved: u64,
}

/// The server's stamp at the start of a `DELIVER` payload: fixed 48 bytes, little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub msg_id: u64,
    pub seq: u64,
    pub ts_ms: u64,
    pub from: u64,
    pub to: u64,
    pub conv: u8,
}

impl Stamp {
    /// The state byte of a stored payload's stamp ([`msg_state`]).
    pub const STATE_AT: usize = 41;

    pub const BYTES: usize = 48;

    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..Self::BYTES];
        out[0..8].copy_from_slice(&self.msg_id.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.ts_ms.to_le_bytes());
        out[24..32].copy_from_slice(&self.from.to_le_bytes());
        out[32..40].copy_from_slice(&self.to.to_le_bytes());
        out[40] = self.conv;
        out[41..48].fill(0);
    }

    pub fn read(b: &[u8]) -> Option<Stamp> {
        if b.len() < Self::BYTES {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Stamp { msg_id: u(0), seq: u(8), ts_ms: u(16), from: u(24), to: u(32), conv: b[40] })
    }
}
const _: () = assert!(Stamp::BYTES.is_multiple_of(8));

/// The server's stamp at the start of a `ROOM_MSG` payload: fixed 32 bytes, little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomStamp {
    pub room_id: u64,
    /// The room's publish counter: 1 for its first message, +1 for each (gaps show drops).
    pub seq: u64,
    pub ts_ms: u64,
    /// The publisher's user id.
    pub from: u64,
}

impl RoomStamp {
    pub const BYTES: usize = 32;

    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..Self::BYTES];
        out[0..8].copy_from_slice(&self.room_id.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.ts_ms.to_le_bytes());
        out[24..32].copy_from_slice(&self.from.to_le_bytes());
    }

    pub fn read(b: &[u8]) -> Option<RoomStamp> {
        if b.len() < Self::BYTES {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(RoomStamp { room_id: u(0), seq: u(8), ts_ms: u(16), from: u(24) })
    }
}

// The wire format is rkyv's archive layout: the archived size and alignment of every protocol
// type, as docs/PROTOCOL.md gives them. A change of rkyv (its version is pinned exactly in the
// workspace Cargo.toml) or of its format features (pointer width, alignment) anywhere in the
// build would change them silently; here it fails to compile. (`ArchivedCatchUpEnd` is left out
// while its fields change.)
const _: () = assert!(std::mem::size_of::<ArchivedRegister>() == 16);
const _: () = assert!(std::mem::align_of::<ArchivedRegister>() == 4);
const _: () = assert!(std::mem::size_of::<ArchivedLogin>() == 28);
const _: () = assert!(std::mem::align_of::<ArchivedLogin>() == 4);
const _: () = assert!(std::mem::size_of::<ArchivedLoginToken>() == 20);
const _: () = assert!(std::mem::align_of::<ArchivedLoginToken>() == 4);
const _: () = assert!(std::mem::size_of::<ArchivedIssueToken>() == 4);
const _: () = assert!(std::mem::align_of::<ArchivedIssueToken>() == 4);
const _: () = assert!(std::mem::size_of::<ArchivedPing>() == 8);
const _: () = assert!(std::mem::align_of::<ArchivedPing>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedSend>() == 32);
const _: () = assert!(std::mem::align_of::<ArchivedSend>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedDeliveryAck>() == 24);
const _: () = assert!(std::mem::align_of::<ArchivedDeliveryAck>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedLogout>() == 8);
const _: () = assert!(std::mem::align_of::<ArchivedLogout>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedHistory>() == 32);
const _: () = assert!(std::mem::align_of::<ArchivedHistory>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedRegisterOk>() == 8);
const _: () = assert!(std::mem::align_of::<ArchivedRegisterOk>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedLoginOk>() == 48);
const _: () = assert!(std::mem::align_of::<ArchivedLoginOk>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedTokenIssued>() == 16);
const _: () = assert!(std::mem::align_of::<ArchivedTokenIssued>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedPong>() == 16);
const _: () = assert!(std::mem::align_of::<ArchivedPong>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedSendAck>() == 40);
const _: () = assert!(std::mem::align_of::<ArchivedSendAck>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedBye>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedBroadcast>() == 24);
const _: () = assert!(std::mem::align_of::<ArchivedBroadcast>() == 8);
const _: () = assert!(std::mem::align_of::<ArchivedBye>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedError>() == 24);
const _: () = assert!(std::mem::align_of::<ArchivedError>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedKick>() == 12);
const _: () = assert!(std::mem::align_of::<ArchivedKick>() == 4);
const _: () = assert!(std::mem::size_of::<ArchivedHistoryEnd>() == 24);
const _: () = assert!(std::mem::align_of::<ArchivedHistoryEnd>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedRoomCreate>() == 16);
const _: () = assert!(std::mem::align_of::<ArchivedRoomCreate>() == 4);
const _: () = assert!(std::mem::size_of::<ArchivedRoomRef>() == 8);
const _: () = assert!(std::mem::align_of::<ArchivedRoomRef>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedRoomPublish>() == 24);
const _: () = assert!(std::mem::align_of::<ArchivedRoomPublish>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedRoomOk>() == 16);
const _: () = assert!(std::mem::align_of::<ArchivedRoomOk>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedRoomClosed>() == 16);
const _: () = assert!(std::mem::align_of::<ArchivedRoomClosed>() == 8);
const _: () = assert!(std::mem::size_of::<ArchivedMissed>() == 24);
const _: () = assert!(std::mem::align_of::<ArchivedMissed>() == 8);

#[cfg(test)]
mod session_layout_tests {
    use super::*;

    /// docs/PROTOCOL.md 5.22's example: a Send with a 100,000-byte body in two parts, and
    /// LoginOk's size with `large_body_bytes_max` where padding was.
    #[test]
    fn part_layout() {
        assert_eq!(std::mem::size_of::<ArchivedLoginOk>(), 48);
        assert_eq!(std::mem::offset_of!(ArchivedLoginOk, large_body_bytes_max), 44);
        let send = Send { conv: 1, flags: 0, burn_secs: 0, to: 2, client_msg_id: 9, body: vec![7; 100_000] };
        let f = crate::frame::encode(kind::SEND, &send);
        let payload = &f[8..8 + crate::frame::payload_len(&f)];
        assert_eq!(payload.len(), 100_032);
        assert_eq!(
            &payload[100_000..],
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0x48, 0x79, 0xfe,
                0xff, 0xa0, 0x86, 0x01, 0x00
            ]
        );
        let max = part::data_max(65536);
        assert_eq!(max, 65_512);
        let h = part::PartHeader { id: 9, total: 100_032, offset: max as u32, kind: kind::SEND };
        let second = crate::frame::raw(kind::PART, &[&h.bytes(), &payload[max..]]);
        assert_eq!(&second[..8], &[0xf0, 0x86, 0, 0, 0x1b, 0, 0, 0]);
        assert_eq!(
            &second[8..32],
            &[9, 0, 0, 0, 0, 0, 0, 0, 0xc0, 0x86, 1, 0, 0xe8, 0xff, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(part::PartHeader::read(&second[8..]).map(|(h2, d)| (h2, d.len())), Some((h, 34_520)));
    }

    /// The layouts docs/PROTOCOL.md gives for the sessions requests and their answer.
    #[test]
    fn session_layouts() {
        use std::mem::{align_of, size_of};
        assert_eq!((size_of::<ArchivedMySessions>(), align_of::<ArchivedMySessions>()), (8, 8));
        assert_eq!((size_of::<ArchivedSessionLogout>(), align_of::<ArchivedSessionLogout>()), (8, 8));
        assert_eq!((size_of::<ArchivedSessionInfo>(), align_of::<ArchivedSessionInfo>()), (32, 8));
        assert_eq!((size_of::<ArchivedSessionList>(), align_of::<ArchivedSessionList>()), (8, 4));
        assert_eq!((size_of::<ArchivedTyping>(), align_of::<ArchivedTyping>()), (16, 8));
        assert_eq!((size_of::<ArchivedTypingNotice>(), align_of::<ArchivedTypingNotice>()), (24, 8));
        assert_eq!((size_of::<ArchivedUserProfile>(), align_of::<ArchivedUserProfile>()), (40, 4));
        assert_eq!(std::mem::offset_of!(ArchivedUserProfile, birthday), 20);
        assert_eq!((size_of::<ArchivedProfileUpdate>(), align_of::<ArchivedProfileUpdate>()), (40, 4));
        assert_eq!((size_of::<ArchivedProfileGet>(), align_of::<ArchivedProfileGet>()), (8, 4));
        assert_eq!((size_of::<ArchivedProfileEntry>(), align_of::<ArchivedProfileEntry>()), (56, 8));
        assert_eq!((size_of::<ArchivedProfileList>(), align_of::<ArchivedProfileList>()), (8, 4));
        let list = SessionList {
            sessions: vec![SessionInfo {
                session_id: 0x0001_0000_0000_0003,
                login_ms: 1_767_225_600_000,
                device_type: 1,
                current: true,
                device_id: "phone".into(),
            }],
        };
        let f = crate::frame::encode(kind::SESSION_LIST, &list);
        let expect: [u64; 6] = [
            0x0000_0073_0000_0028,
            0x0001_0000_0000_0003,
            1_767_225_600_000,
            0x6e6f_6870_0000_0101,
            0x0000_0000_ffff_ff65,
            0x0000_0001_ffff_ffe0,
        ];
        let got: Vec<u64> = f.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, expect, "the example of docs/PROTOCOL.md 6.16");
    }

    /// The read receipt layouts of docs/PROTOCOL.md 5.18, 6.19 and 6.20.
    #[test]
    fn read_layouts() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!((size_of::<ArchivedRead>(), align_of::<ArchivedRead>()), (24, 8));
        assert_eq!((size_of::<ArchivedReadGet>(), align_of::<ArchivedReadGet>()), (24, 8));
        assert_eq!((size_of::<ArchivedReadNotice>(), align_of::<ArchivedReadNotice>()), (32, 8));
        assert_eq!(offset_of!(ArchivedReadNotice, seq), 24);
        assert_eq!((size_of::<ArchivedReadState>(), align_of::<ArchivedReadState>()), (40, 8));
        assert_eq!(
            (offset_of!(ArchivedReadState, read_count), offset_of!(ArchivedReadState, reads)),
            (24, 32)
        );
        assert_eq!((size_of::<ArchivedReadEntry>(), align_of::<ArchivedReadEntry>()), (16, 8));
    }

    /// The roster layouts of docs/PROTOCOL.md 5.20 and 6.21 to 6.23.
    #[test]
    fn roster_layouts() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!((size_of::<ArchivedRosterAction>(), align_of::<ArchivedRosterAction>()), (24, 8));
        assert_eq!((offset_of!(ArchivedRosterAction, user), offset_of!(ArchivedRosterAction, note)), (8, 16));
        assert_eq!((size_of::<ArchivedRosterOk>(), offset_of!(ArchivedRosterOk, friends)), (24, 16));
        assert_eq!((size_of::<ArchivedRosterGet>(), offset_of!(ArchivedRosterGet, limit)), (24, 16));
        assert_eq!((size_of::<ArchivedRosterEntry>(), align_of::<ArchivedRosterEntry>()), (24, 8));
        assert_eq!((size_of::<ArchivedRosterList>(), align_of::<ArchivedRosterList>()), (16, 4));
        assert_eq!((offset_of!(ArchivedRosterList, entries), offset_of!(ArchivedRosterList, more)), (4, 12));
        assert_eq!((size_of::<ArchivedRosterNotice>(), offset_of!(ArchivedRosterNotice, note)), (32, 24));
    }

    /// The presence layouts of docs/PROTOCOL.md 5.21 and 6.24.
    #[test]
    fn presence_layouts() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!((size_of::<ArchivedPresenceSet>(), align_of::<ArchivedPresenceSet>()), (20, 4));
        assert_eq!((offset_of!(ArchivedPresenceSet, text), offset_of!(ArchivedPresenceSet, extra)), (4, 12));
        assert_eq!((size_of::<ArchivedPresenceGet>(), align_of::<ArchivedPresenceGet>()), (8, 4));
        assert_eq!((size_of::<ArchivedPresenceEntry>(), align_of::<ArchivedPresenceEntry>()), (40, 8));
        assert_eq!(
            (offset_of!(ArchivedPresenceEntry, since_ms), offset_of!(ArchivedPresenceEntry, text)),
            (16, 24)
        );
        assert_eq!((size_of::<ArchivedPresenceList>(), align_of::<ArchivedPresenceList>()), (8, 4));
    }

    /// The recall example of docs/PROTOCOL.md 5.17, and the Send layout of 5.7.
    #[test]
    fn recall_layout() {
        assert_eq!(std::mem::offset_of!(ArchivedSend, flags), 1);
        assert_eq!(std::mem::offset_of!(ArchivedSend, burn_secs), 4);
        assert_eq!(std::mem::offset_of!(ArchivedSend, to), 8);
        let recall = Send {
            conv: conv::DIRECT,
            flags: send_flags::RECALL,
            burn_secs: 0,
            to: 2,
            client_msg_id: 2,
            body: 1u64.to_le_bytes().to_vec(),
        };
        let f = crate::frame::encode(kind::SEND, &recall);
        let got: Vec<u64> = f.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [0x0000_0006_0000_0028, 1, 0x0201, 2, 2, 0x0000_0008_ffff_ffe0]);
    }
}
