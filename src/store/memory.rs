//! No-data mode: accounts live in memory, messages are relayed and not kept (no history, no
//! catch-up); commits succeed at once. Groups (their rows, members, block lists and join
//! requests) are kept in memory too: they last as long as the process.
//!
//! **In a cluster** every node keeps a full replica ([`MemoryStore::replicated`]): each write
//! (an account, a group notice's changes, a join request) is applied here and handed, as a
//! [`ReplOp`], to the node's cluster thread, which sends it to every member; a member that links
//! up gets a [`MemoryStore::snapshot`]. Applying is idempotent and does not depend on order:
//! - an account is added once; ids are drawn at random below 2^48, the tenant domain in bits 48-55 (never a group id), so
//!   nodes do not collide; two nodes that register one name at the same moment keep both
//!   accounts, and on every replica the name leads to the smaller id;
//! - a group's changes apply only over an older state (by the notice's seq, which rises across
//!   owners: see `roles::conv`), and a whole group from a snapshot replaces an older one;
//! - a join request (kept or settled) is last writer wins.
//!
//! The replicas converge within a link's latency: an owner that takes a group over in that
//! window may miss its latest change. The state lasts as long as one node is up.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::{
    Account, CatchUp, CommitDone, ConvKey, ConvLoad, Cursor, GroupLoad, GroupRow, GroupWrite, MemberRow,
    NameKey, Page, PageLimit, Store, StoreError, StoredMessage, UserId,
};
use crate::protocol::{in_domain, JoinRequest, UserProfile};

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    /// In a cluster: where this replica's writes go (to the node's cluster thread).
    replicate: Option<tokio::sync::mpsc::Sender<ReplOp>>,
}

/// Replication ops queued for the cluster thread at most (a writer waits beyond).
pub const REPL_QUEUE_MAX: usize = 65_536;
/// How long a writer waits for room in that queue.
pub const REPL_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// One write of a replica, as the others apply it (postcard on the node links).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReplOp {
    Account {
        name: NameKey,
        id: UserId,
        password_hash: String,
    },
    /// A group notice's changes, at the notice's seq.
    Group {
        group: u64,
        seq: u64,
        writes: Vec<GroupWrite>,
    },
    JoinRequest {
        group: u64,
        user: UserId,
        request: Option<JoinRequest>,
    },
    /// An account's ban (0: lifted).
    Ban {
        user: UserId,
        until_ms: u64,
    },
    /// An account's profile, changed at `updated_ms` (a later change wins).
    Profile {
        user: UserId,
        updated_ms: u64,
        profile: UserProfile,
    },
    /// Read positions (the greatest wins).
    Reads(Vec<(UserId, ConvKey, u64)>),
    /// Both sides of a roster pair after a change (the later change wins).
    Roster {
        user: UserId,
        other: UserId,
        me: crate::roster::Side,
        them: crate::roster::Side,
    },
    /// A whole group as a replica holds it, up to notice `seq` (a snapshot's).
    GroupState {
        group: u64,
        seq: u64,
        row: GroupRow,
        members: Vec<MemberRow>,
        blocked: Vec<UserId>,
        requests: Vec<JoinRequest>,
        /// Every user's span in the group (current and past members): (user, from, to).
        spans: Vec<(UserId, u64, u64)>,
    },
    /// More of a large group's `GroupState` (right after it, on the same link): applied only to
    /// the state of that seq.
    GroupMore {
        group: u64,
        seq: u64,
        members: Vec<MemberRow>,
        blocked: Vec<UserId>,
        spans: Vec<(UserId, u64, u64)>,
    },
}

/// Members, blocked users or spans of a group in one snapshot op at most (an op stays well
/// under a link record's cap).
const SNAPSHOT_LIST_MAX: usize = 2048;

#[derive(Default)]
struct MemoryInner {
    by_name: HashMap<NameKey, UserId>,
    accounts: HashMap<UserId, Account>,
    /// (changed at, profile) of the accounts that set one.
    profiles: HashMap<UserId, (u64, UserProfile)>,
    last_id: UserId,
    groups: HashMap<u64, MemGroup>,
    /// Per user: its groups, and the span of each membership, current or past.
    spans: HashMap<UserId, BTreeMap<u64, (u64, u64)>>,
    /// Read positions per conversation and user (at most [`READS_MAX`] in all).
    reads: HashMap<ConvKey, BTreeMap<UserId, u64>>,
    read_count: usize,
    /// Roster sides, per user and other user (empty sides are not kept).
    roster: HashMap<UserId, BTreeMap<UserId, crate::roster::Side>>,
}

/// Read positions the memory store keeps at most; beyond, new ones are dropped (logged).
pub const READS_MAX: usize = 1 << 22;

impl MemoryInner {
    fn side(&self, user: UserId, other: UserId) -> crate::roster::Side {
        self.roster.get(&user).and_then(|m| m.get(&other)).cloned().unwrap_or_default()
    }

    fn put_side(&mut self, user: UserId, other: UserId, s: crate::roster::Side) {
        let sides = self.roster.entry(user).or_default();
        if s.is_empty() {
            sides.remove(&other);
        } else {
            sides.insert(other, s);
        }
    }

    /// Apply another replica's roster change unless this one holds a later one.
    fn put_pair(&mut self, user: UserId, other: UserId, me: crate::roster::Side, them: crate::roster::Side) {
        let held = self.side(user, other).changed_ms().max(self.side(other, user).changed_ms());
        if held <= me.changed_ms().max(them.changed_ms()) {
            self.put_side(user, other, me);
            self.put_side(other, user, them);
        }
    }

    fn read(&mut self, user: UserId, conv: ConvKey, seq: u64) {
        let full = self.read_count >= READS_MAX;
        let users = self.reads.entry(conv).or_default();
        match users.get_mut(&user) {
            Some(s) => *s = (*s).max(seq),
            None if full => log::warn!("memory store: {READS_MAX} read positions kept; one dropped"),
            None => {
                users.insert(user, seq);
                self.read_count += 1;
            }
        }
    }
}

#[derive(Default)]
struct MemGroup {
    /// The seq of the last notice applied.
    seq: u64,
    row: GroupRow,
    members: BTreeMap<UserId, MemberRow>,
    blocked: BTreeSet<UserId>,
    requests: BTreeMap<UserId, JoinRequest>,
}

impl MemoryInner {
    /// Apply a group notice's changes, as a durable store does in the notice's transaction.
    fn apply(&mut self, group: u64, seq: u64, writes: &[GroupWrite]) {
        let g = self.groups.entry(group).or_default();
        if seq <= g.seq {
            return; // applied already (a replica's copy, or a snapshot that had it)
        }
        g.seq = seq;
        let mut spans: Vec<(UserId, (u64, u64))> = Vec::new();
        for w in writes {
            match w {
                GroupWrite::Group(row) => g.row = row.clone(),
                GroupWrite::Join { user, role } => {
                    let m = MemberRow { user: *user, role: *role, muted_until_ms: 0, from_seq: seq };
                    g.members.insert(*user, m);
                    g.requests.remove(user);
                    spans.push((*user, (seq, u64::MAX)));
                }
                GroupWrite::Member { user, role, muted_until_ms } => {
                    if let Some(m) = g.members.get_mut(user) {
                        m.role = *role;
                        m.muted_until_ms = *muted_until_ms;
                    }
                }
                GroupWrite::Leave { user } => {
                    if let Some(m) = g.members.remove(user) {
                        spans.push((*user, (m.from_seq, seq)));
                    }
                }
                GroupWrite::LeaveAll => {
                    for (user, m) in std::mem::take(&mut g.members) {
                        spans.push((user, (m.from_seq, seq)));
                    }
                }
                GroupWrite::Block { user } => {
                    g.blocked.insert(*user);
                }
                GroupWrite::Unblock { user } => {
                    g.blocked.remove(user);
                }
                GroupWrite::Unrequest { user } => {
                    g.requests.remove(user);
                }
            }
        }
        for (user, span) in spans {
            self.spans.entry(user).or_default().insert(group, span);
        }
    }
}

impl MemoryInner {
    fn set_profile(&mut self, user: UserId, updated_ms: u64, profile: UserProfile) {
        if !self.accounts.contains_key(&user) {
            return;
        }
        match self.profiles.get(&user) {
            Some((t, _)) if *t > updated_ms => {}
            _ => {
                self.profiles.insert(user, (updated_ms, profile));
            }
        }
    }

    fn join_request(&mut self, group: u64, user: UserId, request: Option<&JoinRequest>) {
        let Some(m) = self.groups.get_mut(&group) else { return };
        match request {
            Some(r) => m.requests.insert(user, r.clone()),
            None => m.requests.remove(&user),
        };
    }
}

impl MemoryStore {
    /// A replica in a cluster: its writes go to `tx` (see the module's documentation).
    pub fn replicated(tx: tokio::sync::mpsc::Sender<ReplOp>) -> MemoryStore {
        MemoryStore { inner: Mutex::default(), replicate: Some(tx) }
    }

    /// Hand a write to the cluster thread, waiting up to [`REPL_WAIT_MAX`] while its queue is
    /// full (writes come from the store workers' threads); past it the op is dropped and
    /// logged (the other replicas miss it until they link up again and take a snapshot).
    fn publish(&self, op: ReplOp) {
        use tokio::sync::mpsc::error::TrySendError;
        let Some(tx) = &self.replicate else { return };
        let deadline = std::time::Instant::now() + REPL_WAIT_MAX;
        let mut op = op;
        loop {
            match tx.try_send(op) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    op = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => {
                    log::error!("memory store: the cluster thread took no replication op for {REPL_WAIT_MAX:?}; one dropped");
                    return;
                }
            }
        }
    }

    /// Apply another replica's write (see the module's documentation for the rules).
    pub fn apply_remote(&self, op: ReplOp) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match op {
            ReplOp::Account { name, id, password_hash } => {
                g.accounts.entry(id).or_insert(Account { id, password_hash, banned_until_ms: 0 });
                match g.by_name.get(&name) {
                    Some(&other) if other <= id => {}
                    _ => {
                        g.by_name.insert(name, id);
                    }
                }
            }
            ReplOp::Group { group, seq, writes } => g.apply(group, seq, &writes),
            ReplOp::JoinRequest { group, user, request } => g.join_request(group, user, request.as_ref()),
            ReplOp::Ban { user, until_ms } => {
                if let Some(a) = g.accounts.get_mut(&user) {
                    a.banned_until_ms = until_ms;
                }
            }
            ReplOp::Profile { user, updated_ms, profile } => g.set_profile(user, updated_ms, profile),
            ReplOp::Roster { user, other, me, them } => g.put_pair(user, other, me, them),
            ReplOp::Reads(reads) => {
                for (user, conv, seq) in reads {
                    g.read(user, conv, seq);
                }
            }
            ReplOp::GroupState { group, seq, row, members, blocked, requests, spans } => {
                if g.groups.get(&group).is_some_and(|m| m.seq >= seq) {
                    return;
                }
                let m = MemGroup {
                    seq,
                    row,
                    members: members.into_iter().map(|m| (m.user, m)).collect(),
                    blocked: blocked.into_iter().collect(),
                    requests: requests.into_iter().map(|r| (r.user_id, r)).collect(),
                };
                g.groups.insert(group, m);
                for (user, from, to) in spans {
                    g.spans.entry(user).or_default().insert(group, (from, to));
                }
            }
            ReplOp::GroupMore { group, seq, members, blocked, spans } => {
                let Some(m) = g.groups.get_mut(&group).filter(|m| m.seq == seq) else { return };
                m.members.extend(members.into_iter().map(|m| (m.user, m)));
                m.blocked.extend(blocked);
                for (user, from, to) in spans {
                    g.spans.entry(user).or_default().insert(group, (from, to));
                }
            }
        }
    }

    /// Everything this replica holds, as ops (for a member that links up).
    pub fn snapshot(&self) -> Vec<ReplOp> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut ops = Vec::with_capacity(g.accounts.len() + g.groups.len());
        for (name, id) in &g.by_name {
            if let Some(a) = g.accounts.get(id) {
                ops.push(ReplOp::Account { name: *name, id: *id, password_hash: a.password_hash.clone() });
                if a.banned_until_ms != 0 {
                    ops.push(ReplOp::Ban { user: *id, until_ms: a.banned_until_ms });
                }
                if let Some((updated_ms, profile)) = g.profiles.get(id) {
                    ops.push(ReplOp::Profile {
                        user: *id,
                        updated_ms: *updated_ms,
                        profile: profile.clone(),
                    });
                }
            }
        }
        for (&user, sides) in &g.roster {
            for (&other, me) in sides
                .iter()
                .filter(|(&o, _)| user < o || !g.roster.get(&o).is_some_and(|m| m.contains_key(&user)))
            {
                ops.push(ReplOp::Roster { user, other, me: me.clone(), them: g.side(other, user) });
            }
        }
        let reads: Vec<_> = g
            .reads
            .iter()
            .flat_map(|(&conv, users)| users.iter().map(move |(&u, &seq)| (u, conv, seq)))
            .collect();
        ops.extend(reads.chunks(SNAPSHOT_LIST_MAX).map(|c| ReplOp::Reads(c.to_vec())));
        let mut spans: HashMap<u64, Vec<(UserId, u64, u64)>> = HashMap::new();
        for (user, groups) in &g.spans {
            for (group, (from, to)) in groups {
                spans.entry(*group).or_default().push((*user, *from, *to));
            }
        }
        for (&group, m) in &g.groups {
            let seq = m.seq;
            let mut members = m.members.values().copied().collect::<Vec<_>>().into_iter();
            let mut blocked = m.blocked.iter().copied().collect::<Vec<_>>().into_iter();
            let mut spans = spans.remove(&group).unwrap_or_default().into_iter();
            let mut take = |n: usize| {
                (
                    members.by_ref().take(n).collect::<Vec<_>>(),
                    blocked.by_ref().take(n).collect::<Vec<_>>(),
                    spans.by_ref().take(n).collect::<Vec<_>>(),
                )
            };
            let (members, blocked, spans) = take(SNAPSHOT_LIST_MAX);
            let requests = m.requests.values().cloned().collect();
            ops.push(ReplOp::GroupState {
                group,
                seq,
                row: m.row.clone(),
                members,
                blocked,
                requests,
                spans,
            });
            loop {
                let (members, blocked, spans) = take(SNAPSHOT_LIST_MAX);
                if members.is_empty() && blocked.is_empty() && spans.is_empty() {
                    break;
                }
                ops.push(ReplOp::GroupMore { group, seq, members, blocked, spans });
            }
        }
        ops
    }
}

impl Store for MemoryStore {
    fn durable(&self) -> bool {
        false
    }

    fn create_account_in(
        &self,
        name: &NameKey,
        password_hash: String,
        domain: u8,
    ) -> Result<UserId, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.by_name.contains_key(name) {
            return Err(StoreError::NameTaken);
        }
        // Below 2^48, then the domain in bits 48-55 (protocol::DOMAIN_SHIFT).
        let id = if self.replicate.is_some() {
            loop {
                let id = in_domain(u64::from_le_bytes(crate::auth::random_bytes::<8>()) >> 16, domain);
                if id & ((1 << 48) - 1) != 0 && !g.accounts.contains_key(&id) {
                    break id;
                }
            }
        } else {
            g.last_id += 1;
            in_domain(g.last_id, domain)
        };
        g.by_name.insert(*name, id);
        g.accounts.insert(id, Account { id, password_hash: password_hash.clone(), banned_until_ms: 0 });
        drop(g);
        self.publish(ReplOp::Account { name: *name, id, password_hash });
        Ok(id)
    }

    fn account_by_name(&self, name: &NameKey) -> Result<Option<Account>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.by_name.get(name).and_then(|id| g.accounts.get(id)).cloned())
    }

    fn account_exists(&self, user: UserId) -> Result<bool, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.accounts.contains_key(&user))
    }

    fn set_ban(&self, user: UserId, until_ms: u64) -> Result<bool, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = g.accounts.get_mut(&user) else { return Ok(false) };
        a.banned_until_ms = until_ms;
        drop(g);
        self.publish(ReplOp::Ban { user, until_ms });
        Ok(true)
    }

    fn save_profile(&self, user: UserId, profile: &UserProfile, now_ms: u64) -> Result<(), StoreError> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).set_profile(user, now_ms, profile.clone());
        self.publish(ReplOp::Profile { user, updated_ms: now_ms, profile: profile.clone() });
        Ok(())
    }

    fn profiles(&self, users: &[UserId]) -> Result<Vec<(UserId, u64, UserProfile)>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(users
            .iter()
            .filter(|u| g.accounts.contains_key(u))
            .map(|&u| {
                let (t, p) = g.profiles.get(&u).cloned().unwrap_or_default();
                (u, t, p)
            })
            .collect())
    }

    fn ban_of(&self, user: UserId) -> Result<Option<u64>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.accounts.get(&user).map(|a| a.banned_until_ms))
    }

    fn append(&self, _partition: usize, batch: Vec<StoredMessage>, done: CommitDone) {
        if batch.iter().any(|m| m.group.is_some()) {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            for m in &batch {
                if let Some(c) = &m.group {
                    g.apply(c.group, m.seq, &c.writes);
                }
            }
            drop(g);
            for m in &batch {
                if let Some(c) = &m.group {
                    self.publish(ReplOp::Group { group: c.group, seq: m.seq, writes: c.writes.clone() });
                }
            }
        }
        done(Ok(Vec::new()))
    }

    fn load_group(&self, group: u64) -> Result<Option<GroupLoad>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.groups.get(&group).map(|m| GroupLoad {
            row: m.row.clone(),
            members: m.members.values().copied().collect(),
            blocked: m.blocked.iter().copied().collect(),
            requests: m.requests.values().cloned().collect(),
            reads: Vec::new(),
        }))
    }

    fn save_join_request(
        &self,
        group: u64,
        user: UserId,
        request: Option<&JoinRequest>,
    ) -> Result<(), StoreError> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).join_request(group, user, request);
        self.publish(ReplOp::JoinRequest { group, user, request: request.cloned() });
        Ok(())
    }

    fn user_groups(&self, user: UserId, after: u64, limit: usize) -> Result<(Vec<u64>, bool), StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids = g.spans.get(&user).into_iter().flat_map(|s| {
            s.range(after.saturating_add(1)..).filter(|(_, span)| span.1 == u64::MAX).map(|(&id, _)| id)
        });
        let page: Vec<u64> = ids.by_ref().take(limit).collect();
        Ok((page, ids.next().is_some()))
    }

    fn group_count(&self, user: UserId) -> Result<usize, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.spans.get(&user).map_or(0, |s| s.values().filter(|span| span.1 == u64::MAX).count()))
    }

    fn member_span(&self, user: UserId, group: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.spans.get(&user).and_then(|s| s.get(&group)).copied())
    }

    fn load_conv(&self, conv: ConvKey, _since_ms: u64, _recent_max: usize) -> Result<ConvLoad, StoreError> {
        if conv.0 == 0 {
            return Ok(ConvLoad::default());
        }
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let pair = crate::roster::pair_flags(&g.side(conv.0, conv.1), &g.side(conv.1, conv.0));
        Ok(ConvLoad { pair, ..Default::default() })
    }

    fn roster_action(
        &self,
        user: UserId,
        other: UserId,
        action: u8,
        note: &str,
        now_ms: u64,
        max: usize,
    ) -> Result<Result<crate::roster::Outcome, crate::protocol::ErrorCode>, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !g.accounts.contains_key(&other) {
            return Ok(Err(crate::protocol::ErrorCode::UnknownUser));
        }
        let (me, them) = (g.side(user, other), g.side(other, user));
        let count = g
            .roster
            .get(&user)
            .map_or(0, |m| m.values().filter(|s| crate::roster::counted(s, action)).count());
        let out = match crate::roster::apply(&me, &them, action, note, now_ms, count, max) {
            Ok(out) => out,
            Err(code) => return Ok(Err(code)),
        };
        g.put_side(user, other, out.me.clone());
        g.put_side(other, user, out.them.clone());
        drop(g);
        self.publish(ReplOp::Roster { user, other, me: out.me.clone(), them: out.them.clone() });
        Ok(Ok(out))
    }

    fn roster_list(
        &self,
        user: UserId,
        list: u8,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<crate::protocol::RosterEntry>, bool), StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sides) = g.roster.get(&user) else { return Ok((Vec::new(), false)) };
        use crate::protocol::roster_list as l;
        let with_note = list == l::INCOMING || list == l::OUTGOING;
        let mut it = sides.range(after.saturating_add(1)..).filter_map(|(&u, s)| {
            let since_ms = s.listed(list)?;
            let note = if with_note { s.note.clone() } else { String::new() };
            Some(crate::protocol::RosterEntry { user: u, since_ms, note })
        });
        let entries: Vec<_> = it.by_ref().take(limit).collect();
        let more = it.next().is_some();
        Ok((entries, more))
    }

    fn history(
        &self,
        _conv: ConvKey,
        _anchor: u64,
        _older: bool,
        _limit: PageLimit,
    ) -> Result<Page, StoreError> {
        Ok(Page::default())
    }

    fn catch_up(
        &self,
        _user: UserId,
        _device: u64,
        _since: u64,
        _until: u64,
        _limit: PageLimit,
    ) -> Result<CatchUp, StoreError> {
        Ok(CatchUp::default())
    }

    fn save_cursors(&self, _cursors: &[Cursor]) -> Result<(), StoreError> {
        Ok(())
    }

    fn save_reads(&self, reads: &[Cursor]) -> Result<(), StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for r in reads {
            g.read(r.user, r.conv, r.seq);
        }
        drop(g);
        self.publish(ReplOp::Reads(reads.iter().map(|r| (r.user, r.conv, r.seq)).collect()));
        Ok(())
    }

    fn reads_of(&self, conv: ConvKey) -> Result<Vec<(UserId, u64)>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.reads.get(&conv).map(|u| u.iter().map(|(&u, &s)| (u, s)).collect()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> (MemoryStore, tokio::sync::mpsc::Receiver<ReplOp>) {
        let (tx, rx) = tokio::sync::mpsc::channel(REPL_QUEUE_MAX);
        (MemoryStore::replicated(tx), rx)
    }

    fn drain(rx: &mut tokio::sync::mpsc::Receiver<ReplOp>) -> Vec<ReplOp> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn notice(group: u64, seq: u64, writes: Vec<GroupWrite>) -> StoredMessage {
        StoredMessage {
            conv: super::super::group_conv(group),
            seq,
            msg_id: seq,
            ts_ms: 0,
            sender: 0,
            sender_device: 0,
            client_msg_id: 0,
            payload: bytes::Bytes::new(),
            group: Some(std::sync::Arc::new(super::super::GroupChange { group, writes })),
            edit: None,
        }
    }

    /// The roster and read positions reach the other replicas, by ops and by snapshot.
    #[test]
    fn social_state_replicates() {
        use crate::protocol::{roster_action as act, roster_list};
        let (a, mut arx) = replica();
        let (b, _) = replica();
        let ann = a.create_account(&[3; 32], "h".into()).unwrap();
        let bob = a.create_account(&[4; 32], "h".into()).unwrap();
        a.roster_action(ann, bob, act::REQUEST, "hi", 10, 100).unwrap().unwrap();
        a.roster_action(bob, ann, act::ACCEPT, "", 20, 100).unwrap().unwrap();
        a.roster_action(ann, bob, act::BLOCK, "", 30, 100).unwrap().unwrap();
        a.save_reads(&[Cursor { user: ann, device: 1, conv: (ann, bob), seq: 5 }]).unwrap();
        for op in drain(&mut arx) {
            b.apply_remote(op);
        }
        let blocked = |s: &MemoryStore| s.roster_list(ann, roster_list::BLOCKED, 0, 10).unwrap().0;
        assert_eq!(blocked(&b).iter().map(|e| e.user).collect::<Vec<_>>(), [bob]);
        assert!(b.roster_list(bob, roster_list::FRIENDS, 0, 10).unwrap().0.is_empty(), "the block ended it");
        assert_eq!(b.reads_of((ann, bob)).unwrap(), [(ann, 5)]);
        assert_eq!(b.load_conv((ann, bob), 0, 0).unwrap().pair, crate::roster::pair::LOW_BLOCKS);
        // An older change arriving late does not undo a newer one.
        let stale = ReplOp::Roster {
            user: ann,
            other: bob,
            me: crate::roster::Side {
                state: crate::roster::state::FRIEND,
                since_ms: 20,
                ..Default::default()
            },
            them: crate::roster::Side {
                state: crate::roster::state::FRIEND,
                since_ms: 20,
                ..Default::default()
            },
        };
        b.apply_remote(stale);
        assert_eq!(blocked(&b).len(), 1);
        let (c, _) = replica();
        for op in a.snapshot() {
            c.apply_remote(op);
        }
        assert_eq!(blocked(&c).len(), 1);
        assert_eq!(c.reads_of((ann, bob)).unwrap(), [(ann, 5)]);
    }

    /// Writes go out as ops; another replica applies them in any order, twice, and ends up the
    /// same; a name registered on two replicas at once leads to the smaller id on both.
    #[test]
    fn replicas_converge() {
        let (a, mut arx) = replica();
        let (b, mut brx) = replica();
        let alice = a.create_account(&[1; 32], "h1".into()).unwrap();
        assert!(alice > 0 && alice < 1 << 56);
        let row = GroupRow { id: 7, founder: alice, ..Default::default() };
        a.append(
            0,
            vec![notice(7, 10, vec![GroupWrite::Group(row), GroupWrite::Join { user: alice, role: 1 }])],
            Box::new(|r| assert!(r.is_ok())),
        );
        a.append(0, vec![notice(7, 11, vec![GroupWrite::Block { user: 99 }])], Box::new(|_| {}));
        let mut ops = drain(&mut arx);
        assert_eq!(ops.len(), 3);
        ops.reverse(); // out of order, and twice
        for op in ops.iter().chain(ops.iter()) {
            b.apply_remote(op.clone());
        }
        assert_eq!(b.account_by_name(&[1; 32]).unwrap().unwrap().id, alice);
        let g = b.load_group(7).unwrap().unwrap();
        // Seq 11 came first: seq 10 (older) was not applied over it.
        assert_eq!((g.blocked.clone(), g.members.len()), (vec![99], 0));
        // A snapshot of `a` brings nothing older than what `b` has; a fresh replica gets all.
        let (c, _) = replica();
        for op in a.snapshot() {
            c.apply_remote(op);
        }
        let g = c.load_group(7).unwrap().unwrap();
        assert_eq!((g.blocked, g.members.len()), (vec![99], 1));
        assert_eq!(c.member_span(alice, 7).unwrap(), Some((10, u64::MAX)));
        // The same name on both at once.
        let on_b = b.create_account(&[2; 32], "hb".into()).unwrap();
        let on_a = a.create_account(&[2; 32], "ha".into()).unwrap();
        for op in drain(&mut brx) {
            a.apply_remote(op);
        }
        for op in drain(&mut arx) {
            b.apply_remote(op);
        }
        let winner = on_a.min(on_b);
        assert_eq!(a.account_by_name(&[2; 32]).unwrap().unwrap().id, winner);
        assert_eq!(b.account_by_name(&[2; 32]).unwrap().unwrap().id, winner);
        assert!(a.account_exists(on_b).unwrap() && b.account_exists(on_a).unwrap());
    }

    /// A large group goes in a snapshot as a state and continuations, and arrives whole.
    #[test]
    fn large_group_snapshot() {
        let (a, _) = replica();
        let writes = (1..=5000).map(|u| GroupWrite::Join { user: u, role: 0 }).collect();
        a.append(0, vec![notice(9, 3, writes)], Box::new(|_| {}));
        let ops = a.snapshot();
        assert!(ops.len() >= 3, "split: {}", ops.len());
        let (b, _) = replica();
        for op in ops {
            b.apply_remote(op);
        }
        assert_eq!(b.load_group(9).unwrap().unwrap().members.len(), 5000);
        assert_eq!(b.group_count(4321).unwrap(), 1);
    }
}
