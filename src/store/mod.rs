//! The store boundary. Shards never call a store directly: reads and account writes run on the
//! store pool's threads ([`crate::workers::Workers::store`]), and message commits are handed to
//! the store with [`Store::append`], which queues them on the store's own thread(s) and calls
//! back when they are committed. Storage I/O never blocks an event loop.
//!
//! Backends: [`memory::MemoryStore`] (no-data mode) and [`embedded::EmbeddedStore`] (SQLite in
//! WAL mode, the default). Account names are never stored: only their keyed hash ([`NameKey`]).

pub mod embedded;
pub mod memory;
pub mod postgres;

use bytes::Bytes;

pub use crate::protocol::UserProfile;
pub use memory::MemoryStore;

pub type UserId = u64;

/// HMAC-SHA256 of a normalized account name under the server's name key.
pub type NameKey = [u8; 32];

/// A 1:1 conversation: its two users, smaller first.
pub type ConvKey = (UserId, UserId);

#[derive(Clone, Debug)]
pub struct Account {
    pub id: UserId,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Banned while the time is before this (ms since the epoch); 0: not banned;
    /// [`BANNED_FOREVER`]: for good.
    pub banned_until_ms: u64,
}

/// A profile as the durable stores keep it (postcard).
pub fn profile_blob(p: &UserProfile) -> Vec<u8> {
    postcard::to_allocvec(p).expect("a profile encodes")
}

/// A stored profile; a blob that does not decode reads as an empty one (logged).
pub fn profile_of_blob(user: UserId, blob: &[u8]) -> UserProfile {
    postcard::from_bytes(blob).unwrap_or_else(|e| {
        log::warn!("store: the profile of user {user} does not decode: {e}");
        UserProfile::default()
    })
}

/// `banned_until_ms` of a ban without an end (fits a signed 64-bit column).
pub const BANNED_FOREVER: u64 = i64::MAX as u64;

/// A group's row as stored (its members are rows of their own).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupRow {
    pub id: u64,
    pub profile: crate::protocol::GroupProfile,
    pub founder: UserId,
    pub muted_all_until_ms: u64,
    pub dissolved: bool,
    pub created_ms: u64,
}

/// A current member of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberRow {
    pub user: UserId,
    /// See [`crate::protocol::group_role`].
    pub role: u8,
    pub muted_until_ms: u64,
    /// The seq of the notice that made it a member: it sees the group's messages from there on.
    pub from_seq: u64,
}

/// What a group owner needs to take a group over.
#[derive(Clone, Debug, Default)]
pub struct GroupLoad {
    pub row: GroupRow,
    /// Current members (not those who left).
    pub members: Vec<MemberRow>,
    pub blocked: Vec<UserId>,
    pub requests: Vec<crate::protocol::JoinRequest>,
    /// Each user's read position in the group ([`Store::reads_of`]).
    pub reads: Vec<(UserId, u64)>,
}

/// One change of a group's stored state. Changes ride with the group notice that tells the
/// members of them and are stored in the same transaction: a change is stored exactly when its
/// notice is. Where a change needs a seq, it is the notice's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum GroupWrite {
    /// Insert or replace the group's row.
    Group(GroupRow),
    /// `user` becomes a member with `role`, seeing messages from the notice's seq on.
    Join {
        user: UserId,
        role: u8,
    },
    /// A member's role or mute changes.
    Member {
        user: UserId,
        role: u8,
        muted_until_ms: u64,
    },
    /// `user` stops being a member; it still gets (at catch-up) the messages up to the notice.
    Leave {
        user: UserId,
    },
    /// Every member leaves (the group is dissolved).
    LeaveAll,
    Block {
        user: UserId,
    },
    Unblock {
        user: UserId,
    },
    /// `user`'s pending join request is settled (approved).
    Unrequest {
        user: UserId,
    },
}

/// The changes a group notice carries (see [`GroupWrite`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupChange {
    pub group: u64,
    pub writes: Vec<GroupWrite>,
}

/// The conversation key of a group's messages: (0, group id). No user has id 0, so it never
/// meets a 1:1 conversation.
#[inline]
pub fn group_conv(group: u64) -> ConvKey {
    (0, group)
}

/// A sequenced message as stored.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub conv: ConvKey,
    pub seq: u64,
    pub msg_id: u64,
    pub ts_ms: u64,
    pub sender: UserId,
    /// Hash of the sending session's device id: catch-up does not send a device its own sends.
    pub sender_device: u64,
    pub client_msg_id: u64,
    /// The `DELIVER` payload: stamp and the sender's `Send` archive, exactly as delivered.
    pub payload: Bytes,
    /// A group notice's changes, stored with it in the same transaction.
    pub group: Option<std::sync::Arc<GroupChange>>,
    /// A recall's change to the message it takes back, made in the same transaction: when the
    /// store cannot make it, the recall is not stored either ([`Unstored::Refused`]).
    pub edit: Option<Edit>,
}

/// A change a recall or a burn notice makes to earlier messages of its conversation (see
/// [`Edit::apply`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Edit {
    /// Take back message `seq`: it must be a plain message (no notice, not taken back or burned
    /// already) sent by `by` (by anyone when `any_sender`: a group manager's recall), stamped at
    /// or after `since_ms`.
    Recall { seq: u64, by: UserId, any_sender: bool, since_ms: u64 },
    /// Burn messages `seqs` (burn-after-read messages that were read or whose lifetime ended);
    /// refused only when none of them is left to burn.
    Burn { seqs: Vec<u64> },
}

impl Edit {
    /// The messages this edit changes.
    pub fn seqs(&self) -> &[u64] {
        match self {
            Edit::Recall { seq, .. } => std::slice::from_ref(seq),
            Edit::Burn { seqs } => seqs,
        }
    }

    /// The tombstone that replaces the stored `payload` (a `DELIVER` payload: stamp and Send
    /// archive), or why the edit is refused. The tombstone keeps the stamp, with its state byte
    /// set, and the Send archive's root, with its body emptied: the body is gone from the store.
    pub fn apply(&self, payload: &[u8]) -> Result<Vec<u8>, crate::protocol::ErrorCode> {
        use crate::protocol::{msg_state, send_flags, ErrorCode, Stamp};
        let (by, any_sender, since_ms) = match *self {
            Edit::Recall { by, any_sender, since_ms, .. } => (by, any_sender, since_ms),
            Edit::Burn { .. } => {
                let burnable = payload.len() > Stamp::STATE_AT
                    && payload[Stamp::STATE_AT] == msg_state::PLAIN
                    && payload_flags(payload) & send_flags::BURN_AFTER_READ != 0;
                return if burnable {
                    Ok(tombstone(payload, msg_state::BURNED))
                } else {
                    Err(ErrorCode::NotRecallable)
                };
            }
        };
        let stamp = Stamp::read(payload).ok_or(ErrorCode::NotRecallable)?;
        let root = send_root(payload).ok_or(ErrorCode::NotRecallable)?;
        let flags = root[1];
        if stamp.from == 0
            || payload[Stamp::STATE_AT] != msg_state::PLAIN
            || flags & (send_flags::RECALL | send_flags::BURNED) != 0
            || (!any_sender && stamp.from != by)
        {
            return Err(ErrorCode::NotRecallable);
        }
        if stamp.ts_ms < since_ms {
            return Err(ErrorCode::RecallExpired);
        }
        Ok(tombstone(payload, msg_state::RECALLED))
    }
}

/// The seq a recall's body names (8 bytes, little-endian, not 0), within the stores' signed
/// 64-bit range.
pub fn recalled_seq(body: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(body.try_into().ok()?);
    (seq != 0).then_some(seq.min(i64::MAX as u64))
}

/// When a stored message burns (ms since the epoch): 0 for a message that never does,
/// [`BURN_WHEN_READ`] for a burn-after-read message without a lifetime, else its acceptance time
/// plus its `burn_secs`. Read from its payload (the Send root's flags and `burn_secs`).
pub fn burn_at_ms(payload: &[u8], ts_ms: u64) -> u64 {
    match send_root(payload) {
        Some(r) if r[1] & crate::protocol::send_flags::BURN_AFTER_READ != 0 => {
            match u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) {
                0 => BURN_WHEN_READ,
                secs => ts_ms.saturating_add(u64::from(secs) * 1000).min(BURN_WHEN_READ),
            }
        }
        _ => 0,
    }
}

/// `burn_at_ms` of a burn-after-read message without a lifetime: burns only once read.
pub const BURN_WHEN_READ: u64 = i64::MAX as u64;

/// A burn-after-read message that is due (read, or its lifetime over), claimed by a sweep
/// ([`Store::claim_due_burns`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DueBurn {
    pub conv: ConvKey,
    pub seq: u64,
    pub sender: UserId,
}

/// How long a claimed burn may wait for its notice's commit before a sweep claims it again.
pub const BURN_CLAIM_MS: u64 = 60_000;

/// A `DELIVER` payload's flags ([`crate::protocol::send_flags`]): byte 1 of its Send archive's
/// root (the archive's last 32 bytes).
pub fn payload_flags(payload: &[u8]) -> u8 {
    send_root(payload).map_or(0, |r| r[1])
}

/// The 32-byte root of a stored payload's Send archive (the archive's last 32 bytes), if the
/// payload holds one.
fn send_root(payload: &[u8]) -> Option<&[u8]> {
    use crate::protocol::Stamp;
    (payload.len() >= Stamp::BYTES + SEND_ROOT_BYTES).then(|| &payload[payload.len() - SEND_ROOT_BYTES..])
}

/// The size of a `Send` archive's root (docs/PROTOCOL.md 5.7).
const SEND_ROOT_BYTES: usize = 32;

/// `payload` (a stored `DELIVER` payload) as a tombstone in `state`: the stamp with its state
/// byte set, then the Send archive's root with an empty body (its relative pointer −24 points at
/// the root's own start, as rkyv encodes an empty vector there).
pub fn tombstone(payload: &[u8], state: u8) -> Vec<u8> {
    use crate::protocol::Stamp;
    let root = send_root(payload).expect("a stored payload holds a Send archive");
    let mut t = Vec::with_capacity(Stamp::BYTES + SEND_ROOT_BYTES);
    t.extend_from_slice(&payload[..Stamp::BYTES]);
    t[Stamp::STATE_AT] = state;
    t.extend_from_slice(&root[..24]);
    t.extend_from_slice(&(-24i32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    t
}

/// A recent send of a conversation, to rebuild resend dedup after a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecentSend {
    pub sender: UserId,
    pub client_msg_id: u64,
    pub msg_id: u64,
    pub seq: u64,
    pub ts_ms: u64,
}

/// A conversation a conversation owner needs loaded (its first message since it was last held),
/// answered with [`crate::roles::conv::ConvOwner::loaded`]. The runtime loads a partition's
/// waiting conversations together ([`Store::load_convs`]).
#[derive(Clone, Debug)]
pub struct LoadRequest {
    pub key: ConvKey,
    /// The recipient must exist (not asked for a note to oneself).
    pub check_recipient: Option<UserId>,
    /// Sends since this time are loaded for resend dedup.
    pub since_ms: u64,
    pub recent_max: usize,
}

/// What a conversation owner needs to take a conversation over.
#[derive(Clone, Debug, Default)]
pub struct ConvLoad {
    pub last_seq: u64,
    /// A 1:1 pair's roster flags ([`crate::roster::pair`]): blocks and friendship.
    pub pair: u8,
    /// Sends within the dedup window, newest first.
    pub recent: Vec<RecentSend>,
}

/// How much one page may hold: at most `count` messages and, past its first message, at most
/// `bytes` bytes of payload (so a page of large messages cannot hold a connection's or a
/// shard's memory hostage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimit {
    pub count: u32,
    pub bytes: usize,
}

impl From<u32> for PageLimit {
    /// A count limit alone.
    fn from(count: u32) -> PageLimit {
        PageLimit { count, bytes: usize::MAX }
    }
}

impl PageLimit {
    /// Whether a page already holding `count` messages of `bytes` payload bytes takes one more
    /// of `len` bytes.
    pub fn admits(&self, count: usize, bytes: usize, len: usize) -> bool {
        count < self.count as usize && (count == 0 || bytes.saturating_add(len) <= self.bytes)
    }
}

/// Collect a page from `rows` in page order, reading no row past the limit but one (which tells
/// whether more lie beyond; stores ask for `count + 1` rows).
pub fn collect_page<E>(
    rows: impl IntoIterator<Item = Result<Vec<u8>, E>>,
    limit: PageLimit,
) -> Result<Page, E> {
    let mut page = Page::default();
    let mut bytes = 0usize;
    for row in rows {
        let row = row?;
        if !limit.admits(page.payloads.len(), bytes, row.len()) {
            page.more = true;
            break;
        }
        bytes += row.len();
        page.payloads.push(Bytes::from(row));
    }
    Ok(page)
}

/// A page of stored `DELIVER` payloads.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub payloads: Vec<Bytes>,
    /// More lie beyond the page.
    pub more: bool,
}

/// What a login's catch-up found: the messages of the store ranges that answered, and how many
/// did not answer in time (their messages are not in `page`).
#[derive(Clone, Debug, Default)]
pub struct CatchUp {
    pub page: Page,
    /// Store ranges (PostgreSQL servers) that did not answer; 0: the catch-up is complete.
    pub unavailable: u32,
}

/// A device's delivery cursor: everything up to `seq` of `conv` was received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub user: UserId,
    pub device: u64,
    pub conv: ConvKey,
    pub seq: u64,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("name taken")]
    NameTaken,
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Messages of an appended batch that were not stored, as (index in the batch, why). Empty when
/// every message was stored (no allocation).
pub type Duplicates = Vec<(usize, Unstored)>;

/// Why a message of an appended batch was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unstored {
    /// The store already held the same (conversation, sender, client message id): a resend
    /// whose first attempt was committed after all (an ambiguous commit) gets the stored
    /// original's ids.
    Duplicate(RecentSend),
    /// Its [`Edit`] could not be made (the code says why); nothing of it was stored.
    Refused(crate::protocol::ErrorCode),
}

impl Unstored {
    /// The stored original of a duplicate.
    pub fn original(&self) -> Option<RecentSend> {
        match *self {
            Unstored::Duplicate(r) => Some(r),
            Unstored::Refused(_) => None,
        }
    }
}

/// Called once with the outcome of an [`Store::append`].
pub type CommitDone = Box<dyn FnOnce(Result<Duplicates, StoreError>) + Send>;

/// A storage backend. Except [`Store::append`], methods block and are called from the store
/// pool's threads only; every one of them returns within a bounded time, even when a database
/// server stops answering (the PostgreSQL store times out its connections and statements).
pub trait Store: Send + Sync + 'static {
    /// Whether acknowledged messages survive a restart (false in no-data mode).
    fn durable(&self) -> bool;

    /// Create an account in the default domain; fails with `NameTaken` if the name key exists.
    fn create_account(&self, name: &NameKey, password_hash: String) -> Result<UserId, StoreError> {
        self.create_account_in(name, password_hash, 0)
    }
    /// Create an account in tenant domain `domain`: its id carries the domain
    /// ([`crate::protocol::domain_of`]). Fails with `NameTaken` if the name key exists.
    fn create_account_in(
        &self,
        name: &NameKey,
        password_hash: String,
        domain: u8,
    ) -> Result<UserId, StoreError>;
    fn account_by_name(&self, name: &NameKey) -> Result<Option<Account>, StoreError>;
    fn account_exists(&self, user: UserId) -> Result<bool, StoreError>;
    /// Ban `user` until `until_ms` ([`BANNED_FOREVER`]: for good; 0 lifts a ban). `false`: no
    /// such account.
    fn set_ban(&self, user: UserId, until_ms: u64) -> Result<bool, StoreError>;
    /// `user`'s `banned_until_ms`, or `None` when there is no such account.
    fn ban_of(&self, user: UserId) -> Result<Option<u64>, StoreError>;
    /// Replace `user`'s profile (an existing account's), changed at `now_ms`.
    fn save_profile(&self, user: UserId, profile: &UserProfile, now_ms: u64) -> Result<(), StoreError>;
    /// The profiles of the accounts among `users`, in that order (users with no account left
    /// out, an account that never set one: `updated_ms` 0 and an empty profile).
    fn profiles(&self, users: &[UserId]) -> Result<Vec<(UserId, u64, UserProfile)>, StoreError>;

    /// Independent commit streams (e.g. database servers); a conversation commits on
    /// `partition_of(conv)`, and a slow stream does not hold up the others.
    fn partitions(&self) -> usize {
        1
    }
    fn partition_of(&self, _conv: ConvKey) -> usize {
        0
    }

    /// Queue `batch` (all of partition `partition`) for one commit, and return at once; `done`
    /// is called exactly once, from any thread, when the batch is committed or has failed. A
    /// message whose (conversation, sender, client message id) is already stored is not stored
    /// again but reported in [`Duplicates`]; the rest of the batch commits.
    fn append(&self, partition: usize, batch: Vec<StoredMessage>, done: CommitDone);

    /// The last sequence number of `conv` and its sends since `since_ms` (at most `recent_max`).
    fn load_conv(&self, conv: ConvKey, since_ms: u64, recent_max: usize) -> Result<ConvLoad, StoreError>;

    /// Load conversations that all commit on `partition` ([`Store::partition_of`]), one result per
    /// request in order: `Ok(None)` when the request's `check_recipient` has no account, else
    /// what [`Store::load_conv`] gives. A store behind a network loads them together (a round
    /// trip per batch, not per conversation); the default loads one after the other.
    fn load_convs(
        &self,
        partition: usize,
        reqs: &[LoadRequest],
    ) -> Vec<Result<Option<ConvLoad>, StoreError>> {
        let _ = partition;
        reqs.iter()
            .map(|r| {
                if let Some(to) = r.check_recipient {
                    if !self.account_exists(to)? {
                        return Ok(None);
                    }
                }
                self.load_conv(r.key, r.since_ms, r.recent_max).map(Some)
            })
            .collect()
    }

    /// With `older`: messages with seq < `anchor` (all if `anchor` is 0), newest first; else
    /// messages with seq > `anchor`, oldest first. Within `limit` (count and bytes).
    fn history(&self, conv: ConvKey, anchor: u64, older: bool, limit: PageLimit) -> Result<Page, StoreError>;

    /// Messages of `user`'s conversations stamped within `since_ms..=until_ms` that `device` has
    /// not acknowledged and did not send itself, oldest first, within `limit`. A store spread
    /// over several servers gives each a deadline and answers with what the others hold,
    /// counting those that did not answer ([`CatchUp::unavailable`]); a single store answers
    /// complete or fails.
    fn catch_up(
        &self,
        user: UserId,
        device: u64,
        since_ms: u64,
        until_ms: u64,
        limit: PageLimit,
    ) -> Result<CatchUp, StoreError>;

    /// Advance delivery cursors (a cursor never goes back). A cursor of a conversation that has
    /// no stored message is not kept: a client acking made-up conversations cannot grow the
    /// store.
    fn save_cursors(&self, cursors: &[Cursor]) -> Result<(), StoreError>;

    /// Advance read positions ("read up to seq", per device; a position never goes back). As
    /// with cursors, a position in a conversation that has no stored message is not kept (the
    /// memory store, which keeps no message, keeps every position, per user).
    fn save_reads(&self, reads: &[Cursor]) -> Result<(), StoreError>;

    /// Each user's read position in `conv` (the greatest of its devices'), by rising user id.
    fn reads_of(&self, conv: ConvKey) -> Result<Vec<(UserId, u64)>, StoreError>;

    /// Apply roster action `action` of `user` to its pair with `other` at `now_ms` (both sides
    /// read and written in one transaction, by [`crate::roster::apply`]); `max` is
    /// `roster_entries_max`. The inner `Err` is a refusal (`UnknownUser` when `other` has no
    /// account).
    fn roster_action(
        &self,
        user: UserId,
        other: UserId,
        action: u8,
        note: &str,
        now_ms: u64,
        max: usize,
    ) -> Result<Result<crate::roster::Outcome, crate::protocol::ErrorCode>, StoreError>;

    /// One of `user`'s roster lists ([`crate::protocol::roster_list`]), by rising user id after
    /// `after`: at most `limit` entries, and whether more lie beyond.
    fn roster_list(
        &self,
        user: UserId,
        list: u8,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<crate::protocol::RosterEntry>, bool), StoreError>;

    /// Claim up to `limit` burn-after-read messages that are due at `now_ms` (read by their
    /// recipient, whose read makes them due, or past their lifetime), and those claimed more
    /// than [`BURN_CLAIM_MS`] ago whose burn was not stored. A claimed message is not claimed
    /// again meanwhile, so sweeps on several nodes share the work. The memory store keeps no
    /// message: nothing is ever due.
    fn claim_due_burns(&self, now_ms: u64, limit: usize) -> Result<Vec<DueBurn>, StoreError> {
        let _ = (now_ms, limit);
        Ok(Vec::new())
    }

    /// A group's row, current members, block list and pending join requests; `None` if the
    /// group was never created. Read from the group's partition.
    fn load_group(&self, group: u64) -> Result<Option<GroupLoad>, StoreError>;

    /// Keep (`Some`) or drop (`None`) `user`'s pending request to join `group`.
    fn save_join_request(
        &self,
        group: u64,
        user: UserId,
        request: Option<&crate::protocol::JoinRequest>,
    ) -> Result<(), StoreError>;

    /// The groups `user` is a member of, by rising id, after `after`: at most `limit`, and
    /// whether more lie beyond.
    fn user_groups(&self, user: UserId, after: u64, limit: usize) -> Result<(Vec<u64>, bool), StoreError>;

    /// How many groups `user` is a member of.
    fn group_count(&self, user: UserId) -> Result<usize, StoreError>;

    /// For each of `users`: how many groups it is a member of, or `None` if it has no account.
    /// A store behind a network may answer for all together; the default asks one by one.
    fn group_counts(&self, users: &[UserId]) -> Result<Vec<Option<usize>>, StoreError> {
        users
            .iter()
            .map(|&u| if self.account_exists(u)? { self.group_count(u).map(Some) } else { Ok(None) })
            .collect()
    }

    /// The part of `group`'s sequence `user` may read: `(from_seq, until_seq)` of its latest
    /// membership (`until_seq` is `u64::MAX` while it is a member); `None` if it never was one.
    fn member_span(&self, user: UserId, group: u64) -> Result<Option<(u64, u64)>, StoreError>;

    /// Finish queued commits and release the store; called once at shutdown.
    fn close(&self) {}
}

/// A device id's 64-bit hash, as stored with cursors and messages.
pub fn device_hash(user: UserId, device_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // Stable across processes and versions: FNV-1a over the user id and the device id.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(&user.to_le_bytes());
    device_id.as_bytes().hash(&mut h);
    h.finish() & (i64::MAX as u64)
}
