//! Guards against hostile clients whose requests cost the server work out of proportion:
//! registrations (a password hash and a store write each) and sends to accounts that do not
//! exist (a store lookup each). Each is limited per connection and per source address, per
//! minute; one shard counts the connections it owns (connections from one address spread over
//! the shards, so an address gets at most the shard count times its budget).
//!
//! Key types: [`AddressGuard`] (one shard's table of source addresses, bounded), [`Budget`].

use std::{collections::HashMap, net::IpAddr};

use ahash::RandomState;

use crate::config::Limits;

/// Length of a counting window.
pub const WINDOW_MS: u64 = 60_000;

/// Uses counted in the current one-minute window.
#[derive(Clone, Copy, Default, Debug)]
pub struct Budget {
    window_start_ms: u64,
    used: u32,
}

impl Budget {
    /// Count one use at `now`; false if that goes over `max` in this window.
    pub fn take(&mut self, now: u64, max: u32) -> bool {
        if now >= self.window_start_ms + WINDOW_MS {
            *self = Budget { window_start_ms: now, used: 0 };
        }
        self.used = self.used.saturating_add(1);
        self.used <= max
    }

    fn expired(&self, now: u64) -> bool {
        now >= self.window_start_ms + WINDOW_MS
    }
}

#[derive(Default)]
struct Address {
    registrations: Budget,
    unknown_recipients: Budget,
}

/// What a guarded action is.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    Register,
    UnknownRecipient,
}

/// One shard's per-address counters. At `addresses_tracked_max` entries, entries whose window
/// has passed are dropped; an address that finds no room is not tracked (the per-connection
/// limits still hold).
pub struct AddressGuard {
    table: HashMap<IpAddr, Address, RandomState>,
    tracked_max: usize,
    registrations_max: u32,
    unknown_recipients_max: u32,
    /// Loopback addresses are not limited (local tools, tests, the bundled load generator).
    exempt_loopback: bool,
}

impl AddressGuard {
    pub fn new(l: &Limits) -> AddressGuard {
        AddressGuard {
            table: HashMap::default(),
            tracked_max: l.addresses_tracked_max,
            registrations_max: l.registrations_per_address_per_minute_max,
            unknown_recipients_max: l.unknown_recipients_per_address_per_minute_max,
            exempt_loopback: l.rate_limit_exempt_loopback,
        }
    }

    /// Count `action` from `addr` at `now`; false if the address is over its budget.
    pub fn allow(&mut self, addr: Option<IpAddr>, action: Action, now: u64) -> bool {
        let Some(addr) = addr else { return true };
        if self.exempt_loopback && addr.is_loopback() {
            return true;
        }
        if !self.table.contains_key(&addr) && self.table.len() >= self.tracked_max {
            self.table.retain(|_, a| !(a.registrations.expired(now) && a.unknown_recipients.expired(now)));
            if self.table.len() >= self.tracked_max {
                return true;
            }
        }
        let a = self.table.entry(addr).or_default();
        match action {
            Action::Register => a.registrations.take(now, self.registrations_max),
            Action::UnknownRecipient => a.unknown_recipients.take(now, self.unknown_recipients_max),
        }
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Budgets refill each minute; loopback is exempt when configured; the table stays bounded.
    #[test]
    fn budgets_and_bounds() {
        let l = Limits {
            registrations_per_address_per_minute_max: 2,
            addresses_tracked_max: 3,
            rate_limit_exempt_loopback: true,
            ..Limits::default()
        };
        let mut g = AddressGuard::new(&l);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(g.allow(Some(a), Action::Register, 0));
        assert!(g.allow(Some(a), Action::Register, 10));
        assert!(!g.allow(Some(a), Action::Register, 20));
        assert!(g.allow(Some(a), Action::Register, WINDOW_MS + 20), "a new minute");
        assert!(g.allow(Some("127.0.0.1".parse().unwrap()), Action::Register, 0));
        assert!(g.allow(None, Action::Register, 0));
        for i in 2..10u8 {
            g.allow(Some(IpAddr::from([10, 0, 0, i])), Action::Register, WINDOW_MS + 30);
        }
        assert!(g.len() <= 3);
        // Past the window, old entries make room again.
        assert!(g.allow(Some(IpAddr::from([10, 0, 1, 1])), Action::Register, 3 * WINDOW_MS));
        assert!(g.len() <= 3);
    }
}
