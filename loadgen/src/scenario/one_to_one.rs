//! one-to-one: connection c (user u = c % users) sends 1:1 messages to a peer user — fixed: the
//! next user, (u + 1) % users; random: a random other user per message. The server delivers
//! each accepted message to every session of the recipient and to every other session of the
//! sender, so that is what each message is owed.

use crate::{
    cli::{Config, PeerChoice},
    global::{mix, LiveSet},
    scenario::Plan,
};

pub struct OneToOne {
    peer: PeerChoice,
    users: u32,
    seed: u64,
}

impl OneToOne {
    pub fn new(cfg: &Config) -> OneToOne {
        OneToOne { peer: cfg.peer, users: cfg.users, seed: 0x1_2e57_0001 }
    }

    /// The user message `counter` of `conn` goes to. Only users whose id is known (that have a
    /// live connection) are chosen; with none but oneself, a user writes to itself.
    fn peer_user(&self, live: &LiveSet, conn: u32, counter: u64) -> u32 {
        let me = conn % self.users;
        match self.peer {
            PeerChoice::Fixed => live.next_known[me as usize],
            PeerChoice::Random => {
                let known = &live.known;
                if known.is_empty() {
                    return me;
                }
                let i = (mix(self.seed ^ ((conn as u64) << 32) ^ counter) % known.len() as u64) as usize;
                if known[i] == me && known.len() > 1 {
                    known[(i + 1) % known.len()]
                } else {
                    known[i]
                }
            }
        }
    }
}

impl Plan for OneToOne {
    fn to(&self, live: &LiveSet, conn: u32, counter: u64) -> Option<u64> {
        let id = live.user_ids[self.peer_user(live, conn, counter) as usize];
        (id != 0).then_some(id)
    }

    fn receivers(&self, live: &LiveSet, conn: u32, counter: u64, out: &mut Vec<u32>) {
        let me = conn % self.users;
        let peer = self.peer_user(live, conn, counter);
        if peer != me {
            out.extend(live.conns_of(peer));
        }
        out.extend(live.conns_of(me).filter(|&c| c != conn));
    }

    fn fanout(&self, live: &LiveSet, conn: u32, counter: u64) -> u64 {
        let me = conn % self.users;
        let peer = self.peer_user(live, conn, counter);
        let own_others = live.per_user[me as usize].saturating_sub(1) as u64;
        if peer == me {
            own_others
        } else {
            live.per_user[peer as usize] as u64 + own_others
        }
    }
}
