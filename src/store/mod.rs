//! The store boundary. Shards never call a store directly: store calls run on the worker threads
//! ([`crate::workers`]) so that storage I/O never blocks an event loop. A backend implements
//! [`Store`]; this build has the in-memory backend (no-data mode). The embedded and PostgreSQL
//! backends slot in behind the same trait.
//!
//! Account names are never stored: only their keyed hash ([`NameKey`]).

use std::{collections::HashMap, sync::Mutex};

pub type UserId = u64;

/// HMAC-SHA256 of a normalized account name under the server's name key.
pub type NameKey = [u8; 32];

#[derive(Clone, Debug)]
pub struct Account {
    pub id: UserId,
    /// argon2id PHC string.
    pub password_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("name taken")]
    NameTaken,
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A storage backend. Methods are blocking and are called from worker threads only.
pub trait Store: Send + Sync + 'static {
    /// Create an account; fails with `NameTaken` if the name key exists.
    fn create_account(&self, name: &NameKey, password_hash: String) -> Result<UserId, StoreError>;
    fn account_by_name(&self, name: &NameKey) -> Result<Option<Account>, StoreError>;
    fn account_exists(&self, user: UserId) -> Result<bool, StoreError>;
    /// Whether acknowledged messages survive a restart (false in no-data mode).
    fn durable(&self) -> bool;
}

/// No-data mode: accounts live in memory, messages are relayed and not kept.
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

    fn durable(&self) -> bool {
        false
    }
}
