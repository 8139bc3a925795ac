//! Owner roles: the state each shard owns for the keys of its partitions, as state machines
//! without I/O.
//!
//! A role takes an input and `now` (milliseconds since the Unix epoch), changes its state and
//! pushes [`Effect`]s: envelopes for other owners or sessions, store work. It never touches a
//! socket, the mesh, a timer or the store: the shard runtime ([`crate::shard`]) executes the
//! effects and feeds the answers back in, and the seeded simulator ([`crate::sim`]) does the same
//! in one thread with virtual time. Adding a feature means adding or extending a role.
//!
//! - [`user::UserOwner`]: a user's live sessions (device limits) and one-shot tokens; fans
//!   delivered frames out to the user's sessions.
//! - [`conv::ConvOwner`]: a conversation's sequence counter and resend dedup; sequences sends,
//!   hands them to the commit pipeline and publishes them once committed.
//! - [`room::RoomOwner`]: live rooms (N:N, never stored): options, subscribers, fan-out of a
//!   publish to the shards holding subscribers.

pub mod conv;
pub mod group;
pub mod room;
pub mod user;

use bytes::Bytes;

use crate::{
    envelope::{Envelope, SessionRef, Submit},
    placement::Owner,
    protocol::{ErrorCode, JoinRequest},
    store::UserId,
};

pub use conv::{CommitOutcome, ConvOwner, LoadRequest, Sequenced};
pub use group::GroupOwner;
pub use room::RoomOwner;
pub use user::UserOwner;

/// A group message (or notice, or stream message) the conversation owner has published: the
/// group owner fans it out to the members.
pub struct GroupPublish {
    pub group: u64,
    /// The notice's (or message's) seq; for a stream message, the seq it follows.
    pub seq: u64,
    /// The sending session (it does not get its own message back).
    pub skip: SessionRef,
    pub frame: Bytes,
    /// A notice: the group owner applies its change before the fan-out.
    pub notice: bool,
    /// A stream message (lossy delivery).
    pub stream: bool,
}

/// What a role asks its runtime to do.
pub enum Effect {
    /// Send an envelope to an owner (this shard included) or to a session's shard.
    Post(Owner, Envelope),
    /// Load a conversation from the store, then call [`ConvOwner::loaded`].
    LoadConv(LoadRequest),
    /// Commit a sequenced message (see [`crate::commit`]), then call [`ConvOwner::settled`].
    Commit(Sequenced),
    /// Hand a group send (checked by the group owner) or notice to this shard's conversation
    /// owner ([`ConvOwner::submit`]).
    Sequence(Box<Submit>),
    /// A group message is published: [`GroupOwner::published`] fans it out.
    GroupPublish(GroupPublish),
    /// A group notice was not stored: [`GroupOwner::notice_failed`].
    NoticeFailed { group: u64, code: ErrorCode },
    /// Load a group from the store, then call [`GroupOwner::loaded`].
    LoadGroup(u64),
    /// Send `frame` to every live session of `users` (their user owners fan it out).
    FanoutUsers { users: Vec<UserId>, frame: bytes::Bytes },
    /// Keep a read position (written to the store with the shard's next flush).
    NoteRead(crate::store::Cursor),
    /// Store (`Some`) or drop a join request, then call [`GroupOwner::request_saved`].
    SaveJoinRequest { group: u64, user: UserId, request: Option<JoinRequest> },
}

/// Effects pushed by one call of a role, executed in order.
pub type Effects = Vec<Effect>;

/// A violated invariant of a role's state. Checked in release builds too where a violation
/// would corrupt state; the simulator checks every one after every step.
#[derive(Debug, thiserror::Error)]
#[error("invariant violated for user/conversation {key}: {what}")]
pub struct InvariantError {
    pub key: UserId,
    pub what: String,
}
