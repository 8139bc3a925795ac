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
pub mod room;
pub mod user;

use crate::{envelope::Envelope, placement::Owner, store::UserId};

pub use conv::{CommitOutcome, ConvOwner, LoadRequest, Sequenced};
pub use room::RoomOwner;
pub use user::UserOwner;

/// What a role asks its runtime to do.
pub enum Effect {
    /// Send an envelope to an owner (this shard included) or to a session's shard.
    Post(Owner, Envelope),
    /// Load a conversation from the store, then call [`ConvOwner::loaded`].
    LoadConv(LoadRequest),
    /// Commit a sequenced message (see [`crate::commit`]), then call [`ConvOwner::settled`].
    Commit(Sequenced),
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
