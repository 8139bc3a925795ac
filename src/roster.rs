//! The roster: friendships, friend requests, blocks and presence watches between two users,
//! and what each [`roster_action`] does to them. The rules live here once; each store reads a
//! pair's two rows, calls [`apply`] and writes both rows back in one transaction.

use crate::protocol::{roster_action as act, ErrorCode};

/// A user id (as the stores' `UserId`; this module sits below the stores).
type UserId = u64;

/// One user's side of a pair: its relation to the other, whether it blocks the other, and
/// since when; and the presence watches between the two ([`watch`]), and since when.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Side {
    /// [`state`].
    pub state: u8,
    pub blocks: bool,
    /// A request's note (on both sides of a pending request).
    pub note: String,
    pub since_ms: u64,
    /// [`watch`] bits, as this side sees them (the other side holds the mirror image).
    pub watch: u8,
    pub watch_since_ms: u64,
}

/// `Side::watch`: a presence watch is one user's consent to another seeing its presence without
/// a friendship (one way: each direction is its own watch).
pub mod watch {
    /// This side sees the other's presence (the other allowed it).
    pub const WATCHING: u8 = 1;
    /// This side asked to see the other's presence.
    pub const ASKED: u8 = 2;
    /// The other side sees this one's presence.
    pub const WATCHED: u8 = 4;
    /// The other side asked to see this one's presence.
    pub const ASKED_BY: u8 = 8;

    /// The other side's bits of a pair whose one side holds `bits`.
    pub fn mirror(bits: u8) -> u8 {
        ((bits & (WATCHING | ASKED)) << 2) | ((bits & (WATCHED | ASKED_BY)) >> 2)
    }
}

/// `Side::state`.
pub mod state {
    pub const NONE: u8 = 0;
    /// This side asked the other.
    pub const OUTGOING: u8 = 1;
    /// The other side asked this one.
    pub const INCOMING: u8 = 2;
    pub const FRIEND: u8 = 3;
}

impl Side {
    /// A side that holds nothing (no row needs to be kept).
    pub fn is_empty(&self) -> bool {
        self.state == state::NONE && !self.blocks && self.watch == 0
    }

    /// When this side last changed (its relation or its watches).
    pub fn changed_ms(&self) -> u64 {
        self.since_ms.max(self.watch_since_ms)
    }

    /// Whether `list` ([`crate::protocol::roster_list`]) holds this side's other user, and
    /// since when.
    pub fn listed(&self, list: u8) -> Option<u64> {
        use crate::protocol::roster_list as l;
        let held = match list {
            l::FRIENDS => self.state == state::FRIEND,
            l::INCOMING => self.state == state::INCOMING,
            l::OUTGOING => self.state == state::OUTGOING,
            l::BLOCKED => self.blocks,
            l::WATCHERS => self.watch & watch::WATCHED != 0,
            l::WATCHING => self.watch & watch::WATCHING != 0,
            l::WATCH_INCOMING => self.watch & watch::ASKED_BY != 0,
            l::WATCH_OUTGOING => self.watch & watch::ASKED != 0,
            _ => false,
        };
        let since = if list >= l::WATCHERS { self.watch_since_ms } else { self.since_ms };
        held.then_some(since)
    }

    /// Whether the other user is told this one's presence: a friend, or allowed to watch it.
    pub fn shows_presence(&self) -> bool {
        self.state == state::FRIEND || self.watch & watch::WATCHED != 0
    }

    /// Whether this side counts against `roster_entries_max` as one who asks or holds: a
    /// friend, an outgoing request, a watch or an outgoing watch request.
    pub fn counts(&self) -> bool {
        matches!(self.state, state::OUTGOING | state::FRIEND)
            || self.watch & (watch::WATCHING | watch::ASKED) != 0
    }
}

/// How many entries of a user's roster an action is checked against (with
/// `roster_entries_max`): its watchers for an ALLOW, else its friends, outgoing requests,
/// watches and outgoing watch requests ([`Side::counts`]). As an SQL condition on a roster row
/// (columns `state` and `watch`), for the stores that count in SQL.
pub fn count_filter(action: u8) -> &'static str {
    if action == act::ALLOW {
        "(watch & 4) <> 0"
    } else {
        "(state IN (1, 3) OR (watch & 3) <> 0)"
    }
}

/// Whether a side counts for [`count_filter`]`(action)`.
pub fn counted(side: &Side, action: u8) -> bool {
    if action == act::ALLOW {
        side.watch & watch::WATCHED != 0
    } else {
        side.counts()
    }
}

/// What an action did: both sides after it, and the notices to send the other user (events),
/// if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub me: Side,
    pub them: Side,
    pub notices: Vec<u8>,
}

impl Outcome {
    pub fn friends(&self) -> bool {
        self.me.state == state::FRIEND
    }
}

/// Apply `action` of the user whose side is `me` to the pair (`them`: the other user's side),
/// at `now`. `my_count` is how many entries of [`count_filter`]`(action)` the acting user has,
/// checked against `max` where the action adds one.
pub fn apply(
    me: &Side,
    them: &Side,
    action: u8,
    note: &str,
    now: u64,
    my_count: usize,
    max: usize,
) -> Result<Outcome, ErrorCode> {
    let (mut me, mut them) = (me.clone(), them.clone());
    let none = |s: &mut Side, now: u64| {
        s.state = state::NONE;
        s.note.clear();
        s.since_ms = now;
    };
    let notice = match action {
        act::REQUEST => {
            if them.blocks {
                return Err(ErrorCode::Blocked);
            }
            if me.blocks {
                return Err(ErrorCode::InvalidRoster);
            }
            match me.state {
                state::FRIEND => return Err(ErrorCode::AlreadyFriends),
                // They asked first: this makes the friendship.
                state::INCOMING => {
                    if my_count >= max {
                        return Err(ErrorCode::TooManyFriends);
                    }
                    befriend(&mut me, &mut them, now);
                    act::ACCEPT
                }
                _ => {
                    if me.state == state::NONE && my_count >= max {
                        return Err(ErrorCode::TooManyFriends);
                    }
                    me.state = state::OUTGOING;
                    them.state = state::INCOMING;
                    me.note = note.to_string();
                    them.note = note.to_string();
                    me.since_ms = now;
                    them.since_ms = now;
                    act::REQUEST
                }
            }
        }
        act::ACCEPT => {
            if me.state != state::INCOMING {
                return Err(ErrorCode::NoFriendRequest);
            }
            if my_count >= max {
                return Err(ErrorCode::TooManyFriends);
            }
            befriend(&mut me, &mut them, now);
            act::ACCEPT
        }
        act::REJECT | act::CANCEL => {
            let want = if action == act::REJECT { state::INCOMING } else { state::OUTGOING };
            if me.state != want {
                return Err(ErrorCode::NoFriendRequest);
            }
            none(&mut me, now);
            none(&mut them, now);
            action
        }
        act::REMOVE => {
            if me.state != state::FRIEND {
                return Err(ErrorCode::NotFriends);
            }
            none(&mut me, now);
            none(&mut them, now);
            act::REMOVE
        }
        act::BLOCK => {
            // Nothing is left between them; the blocked user learns only of what it loses (a
            // friend, a request, a watch either way), never of the block.
            let mut told: Vec<u8> = match me.state {
                state::FRIEND => vec![act::REMOVE],
                state::INCOMING => vec![act::REJECT],
                state::OUTGOING => vec![act::CANCEL],
                _ => vec![],
            };
            if me.watch & (watch::WATCHED | watch::ASKED_BY) != 0 {
                told.push(if me.watch & watch::WATCHED != 0 { act::REVOKE } else { act::DENY });
            }
            if me.watch & (watch::WATCHING | watch::ASKED) != 0 {
                told.push(act::UNWATCH);
            }
            none(&mut me, now);
            none(&mut them, now);
            if me.watch != 0 {
                set_watch(&mut me, &mut them, 0, now);
            }
            me.blocks = true;
            me.since_ms = now;
            return Ok(Outcome { me, them, notices: told });
        }
        act::UNBLOCK => {
            if me.blocks {
                me.blocks = false;
                me.since_ms = now;
            }
            return Ok(Outcome { me, them, notices: vec![] });
        }
        act::WATCH => {
            if them.blocks {
                return Err(ErrorCode::Blocked);
            }
            if me.blocks {
                return Err(ErrorCode::InvalidRoster);
            }
            if me.watch & watch::WATCHING != 0 {
                return Err(ErrorCode::AlreadyWatching);
            }
            if me.watch & watch::ASKED == 0 && my_count >= max {
                return Err(ErrorCode::TooManyFriends);
            }
            // Asked again while pending: the other user is reminded.
            let bits = me.watch | watch::ASKED;
            set_watch(&mut me, &mut them, bits, now);
            act::WATCH
        }
        act::ALLOW | act::DENY => {
            if me.watch & watch::ASKED_BY == 0 {
                return Err(ErrorCode::NoWatch);
            }
            let mut bits = me.watch & !watch::ASKED_BY;
            if action == act::ALLOW {
                if my_count >= max {
                    return Err(ErrorCode::TooManyFriends);
                }
                bits |= watch::WATCHED;
            }
            set_watch(&mut me, &mut them, bits, now);
            action
        }
        act::UNWATCH => {
            if me.watch & (watch::WATCHING | watch::ASKED) == 0 {
                return Err(ErrorCode::NoWatch);
            }
            let bits = me.watch & !(watch::WATCHING | watch::ASKED);
            set_watch(&mut me, &mut them, bits, now);
            act::UNWATCH
        }
        act::REVOKE => {
            if me.watch & watch::WATCHED == 0 {
                return Err(ErrorCode::NoWatch);
            }
            let bits = me.watch & !watch::WATCHED;
            set_watch(&mut me, &mut them, bits, now);
            act::REVOKE
        }
        _ => return Err(ErrorCode::InvalidRoster),
    };
    Ok(Outcome { me, them, notices: vec![notice] })
}

/// Set the pair's watches to `bits` as `me` sees them (`them` gets the mirror image).
fn set_watch(me: &mut Side, them: &mut Side, bits: u8, now: u64) {
    me.watch = bits;
    them.watch = watch::mirror(bits);
    me.watch_since_ms = now;
    them.watch_since_ms = now;
}

fn befriend(me: &mut Side, them: &mut Side, now: u64) {
    for s in [me, them] {
        s.state = state::FRIEND;
        s.note.clear();
        s.since_ms = now;
    }
}

/// The flags a conversation owner keeps for a 1:1 pair (smaller id first): who blocks whom,
/// and friendship.
pub mod pair {
    pub const LOW_BLOCKS: u8 = 1;
    pub const HIGH_BLOCKS: u8 = 2;
    pub const FRIENDS: u8 = 4;
}

/// The pair flags of the sides of `low` (the smaller id) and `high`.
pub fn pair_flags(low: &Side, high: &Side) -> u8 {
    let mut f = 0;
    if low.blocks {
        f |= pair::LOW_BLOCKS;
    }
    if high.blocks {
        f |= pair::HIGH_BLOCKS;
    }
    if low.state == state::FRIEND {
        f |= pair::FRIENDS;
    }
    f
}

/// Whether the pair's flags let `sender` message `to` (the two users of the pair).
pub fn may_message(flags: u8, sender: UserId, to: UserId, require_friendship: bool) -> Result<(), ErrorCode> {
    if sender == to {
        return Ok(());
    }
    let blocked_by_to = if to < sender { pair::LOW_BLOCKS } else { pair::HIGH_BLOCKS };
    if flags & blocked_by_to != 0 {
        return Err(ErrorCode::Blocked);
    }
    if require_friendship && flags & pair::FRIENDS == 0 {
        return Err(ErrorCode::NotFriends);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(me: &Side, them: &Side, action: u8) -> Result<Outcome, ErrorCode> {
        apply(me, them, action, "hi", 7, 0, 10)
    }

    /// Every action from every state, and both sides stay consistent.
    #[test]
    fn actions() {
        let none = Side::default();
        let asked = run(&none, &none, act::REQUEST).unwrap();
        assert_eq!(
            (asked.me.state, asked.them.state, asked.notices),
            (state::OUTGOING, state::INCOMING, vec![1])
        );
        assert_eq!(asked.them.note, "hi");
        // The other side accepts (or asks too): friends.
        let acc = run(&asked.them, &asked.me, act::ACCEPT).unwrap();
        assert!(acc.friends() && acc.them.state == state::FRIEND && acc.notices == [act::ACCEPT]);
        assert_eq!(run(&asked.them, &asked.me, act::REQUEST).unwrap().notices, [act::ACCEPT]);
        assert_eq!(run(&acc.me, &acc.them, act::REQUEST), Err(ErrorCode::AlreadyFriends));
        assert_eq!(run(&asked.me, &asked.them, act::ACCEPT), Err(ErrorCode::NoFriendRequest));
        assert_eq!(run(&asked.me, &asked.them, act::REJECT), Err(ErrorCode::NoFriendRequest));
        let cancelled = run(&asked.me, &asked.them, act::CANCEL).unwrap();
        assert!(cancelled.me.is_empty() && cancelled.them.is_empty());
        let rejected = run(&asked.them, &asked.me, act::REJECT).unwrap();
        assert!(rejected.me.is_empty() && rejected.notices == [act::REJECT]);
        assert_eq!(run(&none, &none, act::REMOVE), Err(ErrorCode::NotFriends));
        let removed = run(&acc.me, &acc.them, act::REMOVE).unwrap();
        assert!(removed.me.is_empty() && removed.them.is_empty());
        // A block ends everything, tells the other only what it lost, and stops requests both
        // ways until lifted.
        let blocked = run(&acc.me, &acc.them, act::BLOCK).unwrap();
        assert_eq!((blocked.me.blocks, blocked.me.state, blocked.them.state), (true, 0, 0));
        assert_eq!(blocked.notices, [act::REMOVE]);
        assert_eq!(run(&blocked.them, &blocked.me, act::REQUEST), Err(ErrorCode::Blocked));
        assert_eq!(run(&blocked.me, &blocked.them, act::REQUEST), Err(ErrorCode::InvalidRoster));
        let lifted = run(&blocked.me, &blocked.them, act::UNBLOCK).unwrap();
        assert!(lifted.me.is_empty() && lifted.notices.is_empty());
        assert_eq!(run(&none, &none, 99), Err(ErrorCode::InvalidRoster));
        // The limit counts friends and outgoing requests.
        assert_eq!(apply(&none, &none, act::REQUEST, "", 1, 10, 10), Err(ErrorCode::TooManyFriends));
        assert_eq!(apply(&asked.them, &asked.me, act::ACCEPT, "", 1, 10, 10), Err(ErrorCode::TooManyFriends));
    }

    /// Watches: asked, allowed or denied, withdrawn, revoked; one way each, beside a friendship,
    /// and gone with a block.
    #[test]
    fn watches() {
        let none = Side::default();
        let asked = run(&none, &none, act::WATCH).unwrap();
        assert_eq!(
            (asked.me.watch, asked.them.watch, asked.notices.as_slice()),
            (watch::ASKED, watch::ASKED_BY, &[act::WATCH][..])
        );
        assert!(asked.me.counts() && !asked.them.counts() && !asked.me.is_empty());
        assert_eq!(run(&asked.me, &asked.them, act::ALLOW), Err(ErrorCode::NoWatch), "one's own request");
        assert_eq!(run(&asked.me, &asked.them, act::WATCH).unwrap().notices, [act::WATCH], "a reminder");
        let denied = run(&asked.them, &asked.me, act::DENY).unwrap();
        assert!(denied.me.is_empty() && denied.them.is_empty() && denied.notices == [act::DENY]);
        let allowed = run(&asked.them, &asked.me, act::ALLOW).unwrap();
        assert_eq!((allowed.me.watch, allowed.them.watch), (watch::WATCHED, watch::WATCHING));
        assert!(allowed.me.shows_presence() && !allowed.them.shows_presence());
        assert_eq!(run(&allowed.them, &allowed.me, act::WATCH), Err(ErrorCode::AlreadyWatching));
        // The other way is a watch of its own.
        let both = run(&allowed.me, &allowed.them, act::WATCH).unwrap();
        assert_eq!(both.me.watch, watch::WATCHED | watch::ASKED);
        let unwatched = run(&allowed.them, &allowed.me, act::UNWATCH).unwrap();
        assert!(unwatched.me.is_empty() && unwatched.notices == [act::UNWATCH]);
        assert_eq!(run(&allowed.them, &allowed.me, act::REVOKE), Err(ErrorCode::NoWatch));
        let revoked = run(&allowed.me, &allowed.them, act::REVOKE).unwrap();
        assert!(revoked.me.is_empty() && revoked.them.is_empty() && revoked.notices == [act::REVOKE]);
        assert_eq!(run(&none, &none, act::UNWATCH), Err(ErrorCode::NoWatch));
        assert_eq!(run(&none, &none, act::DENY), Err(ErrorCode::NoWatch));
        // A friendship leaves watches alone; a block ends both, and tells what was lost.
        let friend = Side { state: state::FRIEND, ..allowed.me.clone() };
        let friend_them = Side { state: state::FRIEND, ..allowed.them.clone() };
        assert_eq!(run(&friend, &friend_them, act::REMOVE).unwrap().me.watch, watch::WATCHED);
        let blocked = run(&friend, &friend_them, act::BLOCK).unwrap();
        assert_eq!((blocked.me.watch, blocked.them.watch), (0, 0));
        assert_eq!(blocked.notices, [act::REMOVE, act::REVOKE]);
        assert_eq!(run(&asked.me, &asked.them, act::BLOCK).unwrap().notices, [act::UNWATCH]);
        assert_eq!(run(&blocked.them, &blocked.me, act::WATCH), Err(ErrorCode::Blocked));
        assert_eq!(run(&blocked.me, &blocked.them, act::WATCH), Err(ErrorCode::InvalidRoster));
        // The limits: watches count with friends; watchers on their own, for an ALLOW.
        assert_eq!(apply(&none, &none, act::WATCH, "", 1, 10, 10), Err(ErrorCode::TooManyFriends));
        assert_eq!(apply(&asked.them, &asked.me, act::ALLOW, "", 1, 10, 10), Err(ErrorCode::TooManyFriends));
        assert!(counted(&allowed.me, act::ALLOW) && !counted(&allowed.me, act::WATCH));
        for bits in 0..16 {
            assert_eq!(watch::mirror(watch::mirror(bits)), bits);
        }
    }

    #[test]
    fn messaging_rules() {
        let blocker = Side { blocks: true, ..Default::default() };
        let f = pair_flags(&blocker, &Side::default()); // user 1 (low) blocks user 2
        assert_eq!(may_message(f, 2, 1, false), Err(ErrorCode::Blocked));
        assert_eq!(may_message(f, 1, 2, false), Ok(()), "the blocker may still write");
        assert_eq!(may_message(0, 1, 2, true), Err(ErrorCode::NotFriends));
        let friend = Side { state: state::FRIEND, ..Default::default() };
        assert_eq!(may_message(pair_flags(&friend, &friend), 1, 2, true), Ok(()));
        assert_eq!(may_message(0, 3, 3, true), Ok(()), "notes to oneself");
    }
}
