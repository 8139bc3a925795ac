//! No-data mode: accounts live in memory, messages are relayed and not kept (no history, no
//! catch-up); commits succeed at once.

use std::{collections::HashMap, sync::Mutex};

use super::{
    Account, CatchUp, CommitDone, ConvKey, ConvLoad, Cursor, NameKey, Page, PageLimit, Store, StoreError,
    StoredMessage, UserId,
};

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    by_name: HashMap<NameKey, UserId>,
    accounts: HashMap<UserId, Account>,
    last_id: UserId,
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

    fn append(&self, _partition: usize, _batch: Vec<StoredMessage>, done: CommitDone) {
        done(Ok(Vec::new()))
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
