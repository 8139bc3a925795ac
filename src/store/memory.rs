//! No-data mode: accounts live in memory, messages are relayed and not kept (no history, no
//! catch-up); commits succeed at once. Groups (their rows, members, block lists and join
//! requests) are kept in memory too: they last as long as the process.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
};

use super::{
    Account, CatchUp, CommitDone, ConvKey, ConvLoad, Cursor, GroupLoad, GroupRow, GroupWrite, MemberRow,
    NameKey, Page, PageLimit, Store, StoreError, StoredMessage, UserId,
};
use crate::protocol::JoinRequest;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    by_name: HashMap<NameKey, UserId>,
    accounts: HashMap<UserId, Account>,
    last_id: UserId,
    groups: HashMap<u64, MemGroup>,
    /// Per user: its groups, and the span of each membership, current or past.
    spans: HashMap<UserId, BTreeMap<u64, (u64, u64)>>,
}

#[derive(Default)]
struct MemGroup {
    row: GroupRow,
    members: BTreeMap<UserId, MemberRow>,
    blocked: BTreeSet<UserId>,
    requests: BTreeMap<UserId, JoinRequest>,
}

impl MemoryInner {
    /// Apply a group notice's changes, as a durable store does in the notice's transaction.
    fn apply(&mut self, group: u64, seq: u64, writes: &[GroupWrite]) {
        let g = self.groups.entry(group).or_default();
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

impl Store for MemoryStore {
    fn durable(&self) -> bool {
        false
    }

    fn create_account(&self, name: &NameKey, password_hash: String) -> Result<UserId, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.by_name.contains_key(name) {
            return Err(StoreError::NameTaken);
        }
        g.last_id += 1;
        let id = g.last_id;
        g.by_name.insert(*name, id);
        g.accounts.insert(id, Account { id, password_hash });
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

    fn append(&self, _partition: usize, batch: Vec<StoredMessage>, done: CommitDone) {
        if batch.iter().any(|m| m.group.is_some()) {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            for m in &batch {
                if let Some(c) = &m.group {
                    g.apply(c.group, m.seq, &c.writes);
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
        }))
    }

    fn save_join_request(
        &self,
        group: u64,
        user: UserId,
        request: Option<&JoinRequest>,
    ) -> Result<(), StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = g.groups.get_mut(&group) else { return Ok(()) };
        match request {
            Some(r) => m.requests.insert(user, r.clone()),
            None => m.requests.remove(&user),
        };
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

    fn load_conv(&self, _conv: ConvKey, _since_ms: u64, _recent_max: usize) -> Result<ConvLoad, StoreError> {
        Ok(ConvLoad::default())
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
}
