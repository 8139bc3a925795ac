//! one-to-one: connection c (user u = c % users) sends 1:1 messages to a peer user — fixed: the
//! next user, (u + 1) % users; random: a random other user per message. The server delivers
//! each accepted message to every session of the recipient and to every other session of the
//! sender, so that is what each message is owed.
//!
//! Beside the messages (`--presence-share`, `--typing-share`) a share of each connection's
//! operations are presence changes (PresenceSet, answered by PresenceList; every session of
//! the user's friends and the user's other sessions get a PresenceNotice) or typing notices to
//! the peer (Typing, pushed as TypingNotice; unanswered). The notices are counted, never taken
//! for deliveries.
//!
//! With `--friends` N the users become friends before the run ([`run`]): for each user, its
//! first connection's slot logs in as the user on a setup connection of its own, publishes its
//! user id, sends RosterAction REQUEST to the N/2 users after it (u + 1 ..= u + N/2, mod
//! users), then ACCEPTs the request of each of the N/2 users before it once that user has sent
//! its requests, and logs out; so every user has N friends. The run's connections log in once
//! every user is done.

use std::{
    rc::Rc,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst},
        Arc,
    },
    time::{Duration, Instant},
};

use tim::{
    client::Event,
    protocol::{self, kind, roster_action, ErrorCode},
};

use crate::{
    cli::{Config, PeerChoice},
    global::{mix, LiveSet, Phase},
    net::{FrameReader, Io},
    scenario::{messaging, Plan},
    session::{self, retryable, Fail},
    worker::Worker,
};

pub struct OneToOne {
    peer: PeerChoice,
    users: u32,
    seed: u64,
    /// Friends per user, and the shares of presence changes and typing notices.
    pub friends: u32,
    presence_share: f64,
    typing_share: f64,
    /// Setup with friends: each user's id once its first connection logged in (0 before),
    /// its roster step ([`STEP_REQUESTED`], [`STEP_DONE`], [`STEP_FAILED`]), and how long the
    /// slowest user's roster setup took (µs).
    ids: Vec<AtomicU64>,
    step: Vec<AtomicU8>,
    /// Users whose roster setup is over (done or failed).
    settled: AtomicU32,
    pub roster_setup_us: AtomicU64,
    /// Friend requests and accepts answered.
    pub roster_actions: AtomicU32,
}

/// A user's roster setup: not started, its requests sent, all done, failed.
const STEP_REQUESTED: u8 = 1;
const STEP_DONE: u8 = 2;
const STEP_FAILED: u8 = 3;
/// How often a user looks whether the users it waits for got on (doubling up to the most).
const POLL: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl OneToOne {
    pub fn new(cfg: &Config) -> OneToOne {
        let n = if cfg.friends > 0 { cfg.users as usize } else { 0 };
        OneToOne {
            peer: cfg.peer,
            users: cfg.users,
            seed: 0x1_2e57_0001,
            friends: cfg.friends,
            presence_share: cfg.presence_share,
            typing_share: cfg.typing_share,
            ids: (0..n).map(|_| AtomicU64::new(0)).collect(),
            step: (0..n).map(|_| AtomicU8::new(0)).collect(),
            settled: AtomicU32::new(0),
            roster_setup_us: AtomicU64::new(0),
            roster_actions: AtomicU32::new(0),
        }
    }

    /// The friends of `user`: the N/2 users before it and the N/2 after it.
    pub fn friends_of(&self, user: u32) -> impl Iterator<Item = u32> + '_ {
        let (half, users) = (self.friends / 2, self.users);
        (1..=half).flat_map(move |d| [(user + d) % users, (user + users - d) % users])
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

    fn side_shares(&self) -> (f64, f64) {
        (self.presence_share, self.typing_share)
    }

    fn presence_fanout(&self, live: &LiveSet, conn: u32) -> u64 {
        let me = conn % self.users;
        let friends: u64 = self.friends_of(me).map(|f| live.per_user[f as usize] as u64).sum();
        friends + live.per_user[me as usize].saturating_sub(1) as u64
    }

    fn as_one_to_one(&self) -> Option<&OneToOne> {
        Some(self)
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

/// A one-to-one connection with `--friends`. A user's first connection first makes its
/// friends over a connection of its own (logged in as the user, logged out after), and every
/// connection waits until every user has; only then do the run's connections log in, so that
/// the friends the server reads at their login (for their presence) are complete. (A
/// friendship made while a session of the user is logging in may be missed by that session's
/// read; see docs/BENCHMARKS.md.) Then join the run and run the message engine.
pub async fn run(w: &Rc<Worker>, idx: u32, plan: Arc<dyn Plan>) {
    let o = plan.as_one_to_one().expect("a one-to-one plan");
    let user = w.g.cfg.user_of(idx);
    if w.g.cfg.rank_of(idx) == 0 {
        let t = Instant::now();
        match befriend(w, idx, o, user).await {
            Ok(()) => o.step[user as usize].store(STEP_DONE, SeqCst),
            Err(e) => {
                w.stats.error(&e.name("friends"));
                o.step[user as usize].store(STEP_FAILED, SeqCst);
                o.settled.fetch_add(1, SeqCst);
                w.g.setup_failed();
                return;
            }
        }
        o.settled.fetch_add(1, SeqCst);
        o.roster_setup_us.fetch_max(t.elapsed().as_micros() as u64, SeqCst);
    }
    // Every user's friends made (or given up).
    let deadline = w.g.setup_deadline();
    let mut poll = POLL;
    while o.settled.load(SeqCst) < o.users {
        if Instant::now() >= deadline || w.phase() != Phase::Setup {
            w.stats.error("friends: timeout waiting for the other users");
            w.g.setup_failed();
            return;
        }
        monoio::time::sleep(poll).await;
        poll = (poll * 2).min(POLL_MAX);
    }
    let Some(joined) = super::join_run(w, idx, true).await else {
        return;
    };
    messaging::run_joined(w, idx, plan.clone(), joined, Default::default(), false).await
}

/// `user`'s roster setup on a connection of its own: connect, register and log in, make the
/// friends, log out.
async fn befriend(w: &Worker, idx: u32, o: &OneToOne, user: u32) -> Result<(), Fail> {
    let deadline = w.g.setup_deadline();
    let Some(io) = session::connect(w, idx, 1, deadline).await else {
        return Err(Fail::Closed);
    };
    let mut rd = FrameReader::default();
    let r = async {
        let ok = session::log_in(w, &io, &mut rd, idx, deadline).await?;
        o.ids[user as usize].store(ok.user_id, SeqCst);
        make_friends(w, &io, &mut rd, o, user).await?;
        session::log_out(w, &io, &mut rd, deadline).await
    }
    .await;
    rd.release(w);
    io.shutdown();
    r
}

/// Wait until `pick` holds for the user `u` (its id known, its requests sent); its user id.
async fn wait_for(w: &Worker, o: &OneToOne, u: u32, step: u8) -> Result<u64, Fail> {
    let deadline = w.g.setup_deadline();
    let mut poll = POLL;
    loop {
        let (id, s) = (o.ids[u as usize].load(SeqCst), o.step[u as usize].load(SeqCst));
        if s == STEP_FAILED {
            return Err(Fail::Closed);
        }
        if id != 0 && s >= step {
            return Ok(id);
        }
        if Instant::now() >= deadline || w.phase() != Phase::Setup {
            return Err(Fail::Timeout);
        }
        monoio::time::sleep(poll).await;
        poll = (poll * 2).min(POLL_MAX);
    }
}

/// `user`'s roster setup: REQUEST the N/2 users after it, then ACCEPT the N/2 before it.
/// Friends already (a durable store from an earlier run) is fine.
async fn make_friends(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    o: &OneToOne,
    user: u32,
) -> Result<(), Fail> {
    let (half, users) = (o.friends / 2, o.users);
    for d in 1..=half {
        let id = wait_for(w, o, (user + d) % users, 0).await?;
        let fine = [ErrorCode::AlreadyFriends.code()];
        roster(w, io, rd, o, roster_action::REQUEST, id, &fine).await?;
    }
    o.step[user as usize].store(STEP_REQUESTED, SeqCst);
    for d in 1..=half {
        let id = wait_for(w, o, (user + users - d) % users, STEP_REQUESTED).await?;
        let fine = [ErrorCode::NoFriendRequest.code()];
        roster(w, io, rd, o, roster_action::ACCEPT, id, &fine).await?;
    }
    o.step[user as usize].store(STEP_DONE, SeqCst);
    Ok(())
}

/// One RosterAction, retried while refused with a retryable code; refusals in `fine` pass.
async fn roster(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    o: &OneToOne,
    action: u8,
    user: u64,
    fine: &[u16],
) -> Result<(), Fail> {
    let deadline = w.g.setup_deadline();
    loop {
        let a = protocol::RosterAction { action, user, note: String::new() };
        io.queue(kind::ROSTER_ACTION, &a);
        io.flush().await?;
        let got = session::answer(w, io, rd, kind::ROSTER_ACTION, deadline, |e| match e {
            Event::RosterOk(_) => Some(()),
            _ => None,
        })
        .await;
        match got {
            Ok(()) => {
                o.roster_actions.fetch_add(1, SeqCst);
                return Ok(());
            }
            Err(Fail::Refused(c)) if fine.contains(&c) => return Ok(()),
            Err(Fail::Refused(c)) if retryable(c) && Instant::now() < deadline => {
                w.stats.error(&Fail::Refused(c).name("friends"));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => return Err(e),
        }
    }
}
