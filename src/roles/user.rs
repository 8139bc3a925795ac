//! The user owner: for each user of its partitions, the live sessions (on any shard) and the
//! live one-shot tokens.
//!
//! Inputs: `Attach` (a login asking for a place among the user's sessions; device limits are
//! decided here, kicking or refusing), `Detach`, `StoreToken`, `Ban` (kick every session, void
//! the tokens), and `Fanout` (a frame for every session of the user). Outputs: `AttachResult`, `Kick`, `TokenResult` and `Deliver` envelopes.

use std::collections::HashMap;

use ahash::RandomState;
use bytes::Bytes;

use super::{Effect, Effects, InvariantError};
use crate::{
    config::{DevicePolicy, SessionPolicy},
    envelope::{Attach, DeviceInfo, Envelope, PresenceMsg, PresenceOp, SessionRef},
    placement::{NodeId, Owner},
    protocol::{
        kind, presence_state, DeviceType, ErrorCode, PresenceEntry, PresenceList, SessionInfo, SessionList,
    },
    store::UserId,
};

struct LiveSession {
    session: SessionRef,
    device_type: DeviceType,
    info: DeviceInfo,
}

/// A user's live state.
#[derive(Default)]
struct UserLive {
    /// Oldest login first.
    sessions: Vec<LiveSession>,
    /// (token hash, expiry in ms since the epoch).
    tokens: Vec<([u8; 32], u64)>,
    /// Its presence, once it set one or a session said who its audience is.
    presence: Option<Box<Presence>>,
}

/// A user's presence as its owner keeps it (in memory only).
#[derive(Default)]
struct Presence {
    /// As set ([`presence_state`]); 0: never set (online while it has sessions).
    state: u8,
    text: String,
    extra: Vec<u8>,
    since_ms: u64,
    /// Its audience (`None`: not known yet): its friends and the users it allowed to watch its
    /// presence, who are told of its changes; and the users it blocks, who see it offline.
    audience: Option<Vec<UserId>>,
    blocks: Vec<UserId>,
    /// The state its audience was last told (OFFLINE before the first).
    shown: u8,
    /// Roster changes that came before its audience were known (at most
    /// [`PRESENCE_PENDING_MAX`]).
    pending: Vec<(UserId, bool, bool)>,
    /// A notice to its audience waits for the end of the coalescing window (`forced`: its text or
    /// extra data changed).
    dirty: bool,
    forced: bool,
}

/// A one-shot token handed to a user's new owner: user, token hash, expiry.
pub type HandedToken = (UserId, [u8; 32], u64);

/// Roster changes a user owner keeps for a user whose audience it is still waiting for.
const PRESENCE_PENDING_MAX: usize = 64;

impl Presence {
    /// The user's relation to `other` changed; whether `other` just joined its audience.
    fn change(&mut self, other: UserId, sees: bool, blocks: bool) -> bool {
        let mut became = false;
        if let Some(f) = self.audience.as_mut() {
            let was = f.contains(&other);
            f.retain(|&u| u != other);
            if sees {
                f.push(other);
            }
            became = sees && !was;
        }
        self.blocks.retain(|&u| u != other);
        if blocks {
            self.blocks.push(other);
        }
        became
    }
}

impl UserLive {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.tokens.is_empty() && self.presence.is_none()
    }

    /// The state others see: offline without sessions (unless the presence it set outlives
    /// them) or while invisible.
    fn visible(&self, auto_offline: bool) -> u8 {
        let set = self.presence.as_ref().map_or(0, |p| p.state);
        if (self.sessions.is_empty() && (auto_offline || set == 0)) || set == presence_state::INVISIBLE {
            presence_state::OFFLINE
        } else if set == 0 {
            presence_state::ONLINE
        } else {
            set
        }
    }

    /// Its presence as `asker` sees it.
    fn entry(&self, user: UserId, asker: UserId, auto_offline: bool) -> PresenceEntry {
        let p = self.presence.as_deref();
        let mut state = self.visible(auto_offline);
        if asker == user && p.is_some_and(|p| p.state == presence_state::INVISIBLE) {
            state = presence_state::INVISIBLE;
        }
        if asker != user && p.is_some_and(|p| p.blocks.contains(&asker)) {
            state = presence_state::OFFLINE;
        }
        let (text, extra) = match p {
            Some(p) if state != presence_state::OFFLINE => (p.text.clone(), p.extra.clone()),
            _ => (String::new(), Vec::new()),
        };
        PresenceEntry { user, state, since_ms: p.map_or(0, |p| p.since_ms), text, extra }
    }
}

/// The request kind a sessions request answers.
fn kind_of(logout: u64) -> u16 {
    if logout == 0 {
        kind::MY_SESSIONS
    } else {
        kind::SESSION_LOGOUT
    }
}

pub struct UserOwner {
    users: HashMap<UserId, UserLive, RandomState>,
    policy: SessionPolicy,
    tokens_per_user_max: usize,
    /// Users banned lately, until when logins are refused here: a login that read the account
    /// before the ban was stored asks for its place after the ban's kicks (the store refuses the
    /// logins that read it after).
    banned: HashMap<UserId, u64, RandomState>,
    /// `sessions.presence_auto_offline`.
    auto_offline: bool,
    /// `limits.presence_coalesce_ms` (0: no coalescing), and the users whose audience waits for
    /// a notice.
    coalesce_ms: u64,
    dirty: Vec<UserId>,
}

/// How long a user owner refuses a banned user's logins by itself (longer than a login takes
/// between its account read and its attach).
pub const BAN_MARK_MS: u64 = 60_000;

impl UserOwner {
    pub fn new(policy: SessionPolicy, tokens_per_user_max: usize, hasher: RandomState) -> UserOwner {
        assert!(policy.per_account_max > 0 && policy.per_device_type_max > 0);
        let policy_auto_offline = policy.presence_auto_offline;
        UserOwner {
            users: HashMap::with_hasher(hasher.clone()),
            policy,
            tokens_per_user_max,
            banned: HashMap::with_hasher(hasher),
            auto_offline: policy_auto_offline,
            coalesce_ms: 0,
            dirty: Vec::new(),
        }
    }

    /// Coalesce each user's presence notices to their audiences over `ms` (0: none).
    pub fn with_presence_coalescing(mut self, ms: u64) -> UserOwner {
        self.coalesce_ms = ms;
        self
    }

    /// The end of a coalescing window: the users whose presence changed meanwhile tell their
    /// audience where they stand now.
    pub fn flush_presence(&mut self, now: u64, out: &mut Effects) {
        for user in std::mem::take(&mut self.dirty) {
            let Some(p) = self.users.get_mut(&user).and_then(|l| l.presence.as_deref_mut()) else { continue };
            if !p.dirty {
                continue;
            }
            p.dirty = false;
            let force = std::mem::take(&mut p.forced);
            self.announce_now(user, force, now, out);
        }
    }

    /// A presence message for one of this owner's users.
    pub fn presence(&mut self, m: PresenceMsg, now: u64, out: &mut Effects) {
        let origin = SessionRef(m.origin);
        match m.op {
            PresenceOp::Set { state, text, extra } => {
                let live = self.users.entry(m.user).or_default();
                let p = live.presence.get_or_insert_with(Default::default);
                let changed = (p.state, &p.text, &p.extra) != (state, &text, &extra);
                if p.state != state {
                    p.since_ms = now;
                }
                (p.state, p.text, p.extra) = (state, text, extra);
                let entry = live.entry(m.user, m.user, self.auto_offline);
                let frame = |k| Bytes::from(crate::frame::encode(k, &entry));
                // The user's other sessions learn it as it is (invisible included).
                if changed {
                    self.fanout(m.user, origin, &frame(kind::PRESENCE_NOTICE), out);
                }
                let list = PresenceList { entries: vec![entry.clone()] };
                let result = Ok(Bytes::from(crate::frame::encode(kind::PRESENCE_LIST, &list)));
                let answer =
                    Envelope::GroupReply { session: origin, request_kind: kind::PRESENCE_SET, result };
                out.push(Effect::Post(origin.owner(), answer));
                self.announce(m.user, changed, now, out);
            }
            PresenceOp::Roster { audience, blocks } => {
                let live = self.users.entry(m.user).or_default();
                let p = live.presence.get_or_insert_with(Default::default);
                p.audience = Some(audience);
                p.blocks = blocks;
                // Changes that came while the roster was being read are newer than what it read
                // (or the same): made again on top.
                for (other, sees, blocks) in std::mem::take(&mut p.pending) {
                    p.change(other, sees, blocks);
                }
                self.announce(m.user, false, now, out);
            }
            PresenceOp::Change { other, sees, blocks } => {
                // Kept only for a user with live state: a login's roster read may be in flight.
                let Some(live) = self.users.get_mut(&m.user) else { return };
                let p = live.presence.get_or_insert_with(Default::default);
                if p.audience.is_none() {
                    if p.pending.len() >= PRESENCE_PENDING_MAX {
                        p.pending.remove(0);
                    }
                    p.pending.push((other, sees, blocks));
                    return;
                }
                let joined = p.change(other, sees, blocks);
                if joined {
                    // A new member of the audience learns where this user stands.
                    let entry = live.entry(m.user, other, self.auto_offline);
                    if entry.state != presence_state::OFFLINE {
                        let frame = Bytes::from(crate::frame::encode(kind::PRESENCE_NOTICE, &entry));
                        out.push(Effect::FanoutUsers { users: vec![other], frame });
                    }
                }
            }
            PresenceOp::Handover { state, text, extra, since_ms, audience, blocks, shown } => {
                // What this owner learned itself since the move (a set, a login's roster) is newer.
                let live = self.users.entry(m.user).or_default();
                let p = live.presence.get_or_insert_with(Default::default);
                if p.state == 0 && p.text.is_empty() && p.extra.is_empty() {
                    (p.state, p.text, p.extra, p.since_ms) = (state, text, extra, since_ms);
                }
                if p.audience.is_none() {
                    if let Some(audience) = audience {
                        p.audience = Some(audience);
                        p.blocks = blocks;
                        p.shown = shown;
                        for (other, sees, blocks) in std::mem::take(&mut p.pending) {
                            p.change(other, sees, blocks);
                        }
                    }
                }
            }
            PresenceOp::Ask { asker, users } => {
                let entries = users
                    .iter()
                    .map(|&u| match self.users.get(&u) {
                        Some(live) => live.entry(u, asker, self.auto_offline),
                        None => PresenceEntry {
                            user: u,
                            state: 0,
                            since_ms: 0,
                            text: String::new(),
                            extra: Vec::new(),
                        },
                    })
                    .collect();
                let result =
                    Ok(Bytes::from(crate::frame::encode(kind::PRESENCE_LIST, &PresenceList { entries })));
                let answer =
                    Envelope::GroupReply { session: origin, request_kind: kind::PRESENCE_GET, result };
                out.push(Effect::Post(origin.owner(), answer));
            }
        }
    }

    /// Tell `user`'s audience (those it does not block) its presence if what they see changed
    /// (or, with `force`, its text did), once its audience is known.
    fn announce(&mut self, user: UserId, force: bool, now: u64, out: &mut Effects) {
        if self.coalesce_ms == 0 {
            return self.announce_now(user, force, now, out);
        }
        let Some(p) = self.users.get_mut(&user).and_then(|l| l.presence.as_deref_mut()) else { return };
        p.forced |= force;
        if !p.dirty {
            p.dirty = true;
            self.dirty.push(user);
        }
    }

    /// [`UserOwner::announce`] at once.
    fn announce_now(&mut self, user: UserId, force: bool, now: u64, out: &mut Effects) {
        let auto_offline = self.auto_offline;
        let Some(live) = self.users.get_mut(&user) else { return };
        let visible = live.visible(auto_offline);
        let Some(p) = live.presence.as_deref_mut() else { return };
        let Some(audience) = p.audience.as_ref() else { return };
        if visible == p.shown && !(force && visible != presence_state::OFFLINE) {
            return;
        }
        if visible != p.shown && p.state == 0 {
            p.since_ms = now;
        }
        p.shown = visible;
        let users: Vec<UserId> = audience.iter().copied().filter(|f| !p.blocks.contains(f)).collect();
        if users.is_empty() {
            return;
        }
        let entry = live.entry(user, 0, auto_offline);
        let frame = Bytes::from(crate::frame::encode(kind::PRESENCE_NOTICE, &entry));
        out.push(Effect::FanoutUsers { users, frame });
    }

    /// `user` is banned until `until_ms` (stored already): its tokens are void, its sessions are
    /// kicked (`Banned`), and logins that reach here in the next [`BAN_MARK_MS`] (or until the
    /// ban ends) are refused. `until_ms` in the past lifts a ban.
    pub fn ban(&mut self, user: UserId, until_ms: u64, now: u64, out: &mut Effects) {
        self.banned.retain(|_, &mut exp| exp > now);
        if until_ms <= now {
            self.banned.remove(&user);
            return;
        }
        self.banned.insert(user, until_ms.min(now + BAN_MARK_MS));
        let Some(live) = self.users.get_mut(&user) else { return };
        for s in std::mem::take(&mut live.sessions) {
            let session = s.session;
            out.push(Effect::Post(session.owner(), Envelope::Kick { session, reason: ErrorCode::Banned }));
        }
        // Its audience sees it go OFFLINE now (its presence is forgotten with it, whatever
        // `presence_auto_offline` says): the kicked sessions' ends find nothing left to announce.
        let keep = std::mem::replace(&mut self.auto_offline, true);
        self.announce_now(user, false, now, out);
        self.auto_offline = keep;
        self.users.remove(&user);
    }

    /// Give a login its place among the user's sessions (consuming its token, if any), kicking
    /// older sessions or refusing as the device policy says, and answer the login's shard.
    pub fn attach(&mut self, a: &Attach, now: u64, out: &mut Effects) {
        let result = self.try_attach(a, now, out);
        if result.is_ok() {
            self.announce(a.user, false, now, out);
        }
        out.push(Effect::Post(
            a.session.owner(),
            Envelope::AttachResult { session: a.session, user: a.user, result },
        ));
    }

    fn try_attach(&mut self, a: &Attach, now: u64, out: &mut Effects) -> Result<(), ErrorCode> {
        if self.banned.get(&a.user).is_some_and(|&exp| exp > now) {
            return Err(ErrorCode::Banned);
        }
        let policy = &self.policy;
        let live = self.users.entry(a.user).or_default();
        live.tokens.retain(|&(_, exp)| exp > now);
        let token_at = match a.token {
            Some(h) => match live.tokens.iter().position(|&(t, _)| t == h) {
                Some(i) => Some(i),
                None => {
                    if live.is_empty() {
                        self.users.remove(&a.user);
                    }
                    return Err(ErrorCode::InvalidToken);
                }
            },
            None => None,
        };
        // Decide every kick first, so that a refusal changes nothing.
        let mut kicks: Vec<usize> = Vec::new();
        let same_type: Vec<usize> =
            (0..live.sessions.len()).filter(|&i| live.sessions[i].device_type == a.device_type).collect();
        if same_type.len() >= policy.per_device_type_max {
            if policy.policy == DevicePolicy::Refuse {
                return Err(self.refuse(a.user));
            }
            kicks.extend(&same_type[..same_type.len() + 1 - policy.per_device_type_max]);
        }
        let remaining = live.sessions.len() - kicks.len();
        if remaining >= policy.per_account_max {
            if policy.policy == DevicePolicy::Refuse {
                return Err(self.refuse(a.user));
            }
            let more = remaining + 1 - policy.per_account_max;
            let extra: Vec<usize> =
                (0..live.sessions.len()).filter(|i| !kicks.contains(i)).take(more).collect();
            kicks.extend(extra);
        }
        if let Some(i) = token_at {
            live.tokens.swap_remove(i);
        }
        kicks.sort_unstable();
        for &i in kicks.iter().rev() {
            let session = live.sessions.remove(i).session;
            out.push(Effect::Post(session.owner(), Envelope::Kick { session, reason: ErrorCode::Replaced }));
        }
        let info = DeviceInfo { device_id: a.device_id.clone(), login_ms: now };
        live.sessions.push(LiveSession { session: a.session, device_type: a.device_type, info });
        Ok(())
    }

    fn refuse(&mut self, user: UserId) -> ErrorCode {
        if self.users.get(&user).is_some_and(UserLive::is_empty) {
            self.users.remove(&user);
        }
        ErrorCode::DeviceLimit
    }

    /// A session that is live already (re-announced after its user's partition moved here):
    /// listed, nothing checked or answered.
    pub fn reattach(&mut self, user: UserId, session: SessionRef, device_type: DeviceType, info: DeviceInfo) {
        let live = self.users.entry(user).or_default();
        if !live.sessions.iter().any(|s| s.session == session) {
            live.sessions.push(LiveSession { session, device_type, info });
        }
    }

    /// `MySessions` and `SessionLogout` of session `origin` of `user`: log session `logout` out
    /// (0: none; it must be one of the user's: else `UnknownSession`), then answer with the
    /// user's sessions, oldest first.
    pub fn sessions_request(&mut self, user: UserId, origin: SessionRef, logout: u64, out: &mut Effects) {
        let answer = |result| Envelope::GroupReply { session: origin, request_kind: kind_of(logout), result };
        let live = self.users.get_mut(&user);
        let mut kick = None;
        if logout != 0 {
            let at = live.as_ref().and_then(|l| l.sessions.iter().position(|s| s.session.0 == logout));
            let (Some(live), Some(at)) = (live, at) else {
                out.push(Effect::Post(origin.owner(), answer(Err(ErrorCode::UnknownSession))));
                return;
            };
            kick = Some(live.sessions.remove(at).session);
        }
        let sessions = self
            .users
            .get(&user)
            .map(|l| {
                l.sessions
                    .iter()
                    .map(|s| SessionInfo {
                        session_id: s.session.0,
                        login_ms: s.info.login_ms,
                        device_type: s.device_type as u8,
                        current: s.session == origin,
                        device_id: s.info.device_id.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let frame = Bytes::from(crate::frame::encode(kind::SESSION_LIST, &SessionList { sessions }));
        if self.users.get(&user).is_some_and(UserLive::is_empty) {
            self.users.remove(&user);
        }
        out.push(Effect::Post(origin.owner(), answer(Ok(frame))));
        // A session that logs itself out closes itself once it has written its answer.
        if let Some(session) = kick.filter(|&s| s != origin) {
            let reason = ErrorCode::LoggedOutElsewhere;
            out.push(Effect::Post(session.owner(), Envelope::Kick { session, reason }));
        }
    }

    /// Forget the users this owner no longer owns, and sessions on nodes no longer live.
    /// Returns the unexpired one-shot tokens of the users that moved, (user, hash, expiry), for
    /// their new owner (their sessions are announced to it by the shards that hold them).
    pub fn drop_moved(
        &mut self,
        owns: impl Fn(UserId) -> bool,
        node_live: impl Fn(NodeId) -> bool,
        now: u64,
    ) -> (Vec<HandedToken>, Vec<PresenceMsg>) {
        let mut handed = Vec::new();
        let mut presences = Vec::new();
        self.users.retain(|&u, live| {
            if !owns(u) {
                handed.extend(live.tokens.iter().filter(|&&(_, exp)| exp > now).map(|&(h, exp)| (u, h, exp)));
                if let Some(p) = live.presence.take() {
                    let Presence { state, text, extra, since_ms, audience, blocks, shown, .. } = *p;
                    let op = PresenceOp::Handover { state, text, extra, since_ms, audience, blocks, shown };
                    presences.push(PresenceMsg { user: u, origin: 0, op });
                }
                return false;
            }
            live.sessions.retain(|s| node_live(s.session.node()));
            !live.is_empty()
        });
        (handed, presences)
    }

    /// A logged-in session ended (or a login's connection ended before it was answered).
    /// When its last session ends, the user goes offline (its audience is told) and, with
    /// `presence_auto_offline`, its presence is forgotten.
    pub fn detach(&mut self, user: UserId, session: SessionRef, now: u64, out: &mut Effects) {
        let Some(live) = self.users.get_mut(&user) else { return };
        live.sessions.retain(|s| s.session != session);
        if live.sessions.is_empty() {
            // At once: with `presence_auto_offline` its presence is forgotten right after.
            self.announce_now(user, false, now, out);
            let live = self.users.get_mut(&user).expect("held");
            if self.auto_offline {
                live.presence = None;
            }
        }
        if self.users.get(&user).is_some_and(UserLive::is_empty) {
            self.users.remove(&user);
        }
    }

    /// Remember a one-shot token of `user` and answer the issuing session.
    pub fn store_token(
        &mut self,
        user: UserId,
        session: SessionRef,
        hash: [u8; 32],
        expires_at_ms: u64,
        now: u64,
        out: &mut Effects,
    ) {
        let live = self.users.entry(user).or_default();
        live.tokens.retain(|&(_, exp)| exp > now);
        if session == SessionRef::NONE {
            // A token handed over by the user's previous owner (its partition moved): kept
            // (the cap was checked when it was issued), nobody to answer.
            if !live.tokens.iter().any(|&(h, _)| h == hash) {
                live.tokens.push((hash, expires_at_ms));
            }
            return;
        }
        let result = if live.tokens.len() >= self.tokens_per_user_max {
            Err(ErrorCode::TooManyTokens)
        } else {
            live.tokens.push((hash, expires_at_ms));
            Ok(())
        };
        out.push(Effect::Post(session.owner(), Envelope::TokenResult { session, result }));
    }

    /// Deliver `frame` to every session of `user` but `skip`.
    pub fn fanout(&self, user: UserId, skip: SessionRef, frame: &Bytes, out: &mut Effects) {
        self.fanout_with(user, skip, out, |session| Envelope::Deliver { session, frame: frame.clone() });
    }

    /// As [`UserOwner::fanout`], for a stream message (queued lossily by each session).
    pub fn fanout_stream(&self, user: UserId, skip: SessionRef, frame: &Bytes, out: &mut Effects) {
        self.fanout_with(user, skip, out, |session| Envelope::StreamDeliver {
            session,
            frame: frame.clone(),
        });
    }

    fn fanout_with(
        &self,
        user: UserId,
        skip: SessionRef,
        out: &mut Effects,
        env: impl Fn(SessionRef) -> Envelope,
    ) {
        let Some(live) = self.users.get(&user) else { return };
        for s in live.sessions.iter().filter(|s| s.session != skip) {
            out.push(Effect::Post(s.session.owner(), env(s.session)));
        }
    }

    /// Add `user`'s live sessions but `skip` to `out`, by the shard that holds each.
    pub fn sessions_by_shard(
        &self,
        user: UserId,
        skip: SessionRef,
        node: NodeId,
        out: &mut [Vec<SessionRef>],
        remote: &mut Vec<(Owner, Vec<SessionRef>)>,
    ) {
        let Some(live) = self.users.get(&user) else { return };
        for s in live.sessions.iter().filter(|s| s.session != skip) {
            if s.session.node() == node {
                out[s.session.shard()].push(s.session);
            } else {
                let o = s.session.owner();
                match remote.iter_mut().find(|(r, _)| *r == o) {
                    Some((_, list)) => list.push(s.session),
                    None => remote.push((o, vec![s.session])),
                }
            }
        }
    }

    /// The live sessions of `user`, oldest first.
    pub fn sessions(&self, user: UserId) -> impl Iterator<Item = (SessionRef, DeviceType)> + '_ {
        self.users.get(&user).into_iter().flat_map(|l| l.sessions.iter().map(|s| (s.session, s.device_type)))
    }

    /// Users with live state (sessions or tokens).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Device limits hold for every user, no session is listed twice, no empty entry is kept.
    pub fn check(&self) -> Result<(), InvariantError> {
        for (&user, live) in &self.users {
            let fail = |what: String| Err(InvariantError { key: user, what });
            if live.is_empty() {
                return fail("empty live state kept".into());
            }
            if live.sessions.len() > self.policy.per_account_max {
                return fail(format!("{} sessions > per_account_max", live.sessions.len()));
            }
            for t in 0..DeviceType::COUNT as u8 {
                let n = live.sessions.iter().filter(|s| s.device_type as u8 == t).count();
                if n > self.policy.per_device_type_max {
                    return fail(format!("{n} sessions of device type {t} > per_device_type_max"));
                }
            }
            for (i, s) in live.sessions.iter().enumerate() {
                if live.sessions[..i].iter().any(|o| o.session == s.session) {
                    return fail(format!("session {:?} listed twice", s.session));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SessionPolicy;

    fn ask(owner: &mut UserOwner, user: UserId, asker: UserId) -> PresenceEntry {
        let mut out = Effects::new();
        let op = PresenceOp::Ask { asker, users: vec![user] };
        owner.presence(PresenceMsg { user, origin: SessionRef(0).0, op }, 10, &mut out);
        for e in out {
            if let Effect::Post(_, Envelope::GroupReply { result: Ok(f), .. }) = e {
                let list = crate::frame::access::<crate::protocol::ArchivedPresenceList>(&f[8..]).unwrap();
                let list: PresenceList = rkyv::deserialize::<_, rkyv::rancor::Error>(list).unwrap();
                return list.entries[0].clone();
            }
        }
        panic!("no answer");
    }

    /// A user whose partition moves keeps its presence: the old owner hands over what it set and
    /// who its audience is, and the new owner answers with it (and tells its audience of changes).
    #[test]
    fn presence_moves_with_the_partition() {
        let policy = SessionPolicy { presence_auto_offline: false, ..SessionPolicy::default() };
        let mut old = UserOwner::new(policy.clone(), 4, RandomState::new());
        let mut new = UserOwner::new(policy, 4, RandomState::new());
        let (ann, bob) = (7, 9);
        let mut out = Effects::new();
        let roster = PresenceOp::Roster { audience: vec![bob], blocks: vec![] };
        old.presence(PresenceMsg { user: ann, origin: 0, op: roster }, 1, &mut out);
        let set = PresenceOp::Set { state: presence_state::BUSY, text: "meeting".into(), extra: vec![] };
        old.presence(PresenceMsg { user: ann, origin: 0, op: set }, 2, &mut out);
        let (_, presences) = old.drop_moved(|_| false, |_| true, 3);
        assert!(old.is_empty());
        assert_eq!(presences.len(), 1);
        for m in presences {
            new.presence(m, 4, &mut out);
        }
        let e = ask(&mut new, ann, bob);
        assert_eq!((e.state, e.text.as_str(), e.since_ms), (presence_state::BUSY, "meeting", 2));
        // Its audience is known at the new owner: a change reaches bob.
        let mut out = Effects::new();
        let set = PresenceOp::Set { state: presence_state::AWAY, text: String::new(), extra: vec![] };
        new.presence(PresenceMsg { user: ann, origin: 0, op: set }, 5, &mut out);
        let told = out.iter().any(|e| matches!(e, Effect::FanoutUsers { users, .. } if users == &vec![bob]));
        assert!(told, "bob is told of the change at the new owner");
    }
}
