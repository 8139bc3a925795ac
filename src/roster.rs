//! The roster: friendships, friend requests and blocks between two users, and what each
//! [`roster_action`] does to them. The rules live here once; each store reads a pair's two
//! rows, calls [`apply`] and writes both rows back in one transaction.

use crate::protocol::{roster_action as act, ErrorCode};

/// A user id (as the stores' `UserId`; this module sits below the stores).
type UserId = u64;

/// One user's side of a pair: its relation to the other, whether it blocks the other, and
/// since when.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Side {
    /// [`state`].
    pub state: u8,
    pub blocks: bool,
    /// A request's note (on both sides of a pending request).
    pub note: String,
    pub since_ms: u64,
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
        self.state == state::NONE && !self.blocks
    }
}

/// What an action did: both sides after it, and the notice to send (event), if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub me: Side,
    pub them: Side,
    pub notice: Option<u8>,
}

impl Outcome {
    pub fn friends(&self) -> bool {
        self.me.state == state::FRIEND
    }
}

/// Apply `action` of the user whose side is `me` to the pair (`them`: the other user's side),
/// at `now`. `my_count` is how many friends and outgoing requests the acting user has, checked
/// against `max` where the action adds one.
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
            // friend, a request), never of the block.
            let told = match me.state {
                state::FRIEND => Some(act::REMOVE),
                state::INCOMING => Some(act::REJECT),
                state::OUTGOING => Some(act::CANCEL),
                _ => None,
            };
            none(&mut me, now);
            none(&mut them, now);
            me.blocks = true;
            me.since_ms = now;
            return Ok(Outcome { me, them, notice: told });
        }
        act::UNBLOCK => {
            if me.blocks {
                me.blocks = false;
                me.since_ms = now;
            }
            return Ok(Outcome { me, them, notice: None });
        }
        _ => return Err(ErrorCode::InvalidRoster),
    };
    Ok(Outcome { me, them, notice: Some(notice) })
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
            (asked.me.state, asked.them.state, asked.notice),
            (state::OUTGOING, state::INCOMING, Some(1))
        );
        assert_eq!(asked.them.note, "hi");
        // The other side accepts (or asks too): friends.
        let acc = run(&asked.them, &asked.me, act::ACCEPT).unwrap();
        assert!(acc.friends() && acc.them.state == state::FRIEND && acc.notice == Some(act::ACCEPT));
        assert_eq!(run(&asked.them, &asked.me, act::REQUEST).unwrap().notice, Some(act::ACCEPT));
        assert_eq!(run(&acc.me, &acc.them, act::REQUEST), Err(ErrorCode::AlreadyFriends));
        assert_eq!(run(&asked.me, &asked.them, act::ACCEPT), Err(ErrorCode::NoFriendRequest));
        assert_eq!(run(&asked.me, &asked.them, act::REJECT), Err(ErrorCode::NoFriendRequest));
        let cancelled = run(&asked.me, &asked.them, act::CANCEL).unwrap();
        assert!(cancelled.me.is_empty() && cancelled.them.is_empty());
        let rejected = run(&asked.them, &asked.me, act::REJECT).unwrap();
        assert!(rejected.me.is_empty() && rejected.notice == Some(act::REJECT));
        assert_eq!(run(&none, &none, act::REMOVE), Err(ErrorCode::NotFriends));
        let removed = run(&acc.me, &acc.them, act::REMOVE).unwrap();
        assert!(removed.me.is_empty() && removed.them.is_empty());
        // A block ends everything, tells the other only what it lost, and stops requests both
        // ways until lifted.
        let blocked = run(&acc.me, &acc.them, act::BLOCK).unwrap();
        assert_eq!((blocked.me.blocks, blocked.me.state, blocked.them.state), (true, 0, 0));
        assert_eq!(blocked.notice, Some(act::REMOVE));
        assert_eq!(run(&blocked.them, &blocked.me, act::REQUEST), Err(ErrorCode::Blocked));
        assert_eq!(run(&blocked.me, &blocked.them, act::REQUEST), Err(ErrorCode::InvalidRoster));
        let lifted = run(&blocked.me, &blocked.them, act::UNBLOCK).unwrap();
        assert!(lifted.me.is_empty() && lifted.notice.is_none());
        assert_eq!(run(&none, &none, 99), Err(ErrorCode::InvalidRoster));
        // The limit counts friends and outgoing requests.
        assert_eq!(apply(&none, &none, act::REQUEST, "", 1, 10, 10), Err(ErrorCode::TooManyFriends));
        assert_eq!(apply(&asked.them, &asked.me, act::ACCEPT, "", 1, 10, 10), Err(ErrorCode::TooManyFriends));
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
