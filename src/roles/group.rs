//! The group owner: for each group of its partitions, the profile, the members (with roles and
//! mutes), the block list and the pending join requests.
//!
//! A group's messages are an ordinary conversation, `(0, group id)`, sequenced, deduplicated and
//! committed by the conversation owner of the same shard (placement puts both on the group's
//! partition): the group owner checks each send (member, not muted, group not dissolved) and
//! hands it on ([`Effect::Sequence`]); once published it fans the one frame out, one envelope
//! per shard holding members' user owners ([`Envelope::GroupFanout`]).
//!
//! Every change of membership or settings is a **notice**: a message of sender 0 in the group's
//! sequence whose body is a [`GroupNotice`], carrying the stored changes ([`GroupWrite`]) that
//! the store writes in the notice's own transaction. A change is thus stored exactly when its
//! notice is, members learn it in order with the messages (offline ones at catch-up), and the
//! owner applies it to its state only once it is stored ([`GroupOwner::published`]). One change
//! per group is in flight at a time; the others wait in order behind it (at most
//! `group_changes_waiting_max`). Sends are checked against the stored state meanwhile.
//!
//! Join requests of approval groups are not notices (members do not see them): they are stored
//! on their own ([`Effect::SaveJoinRequest`]) and pushed to the managers' live sessions.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use bytes::Bytes;

use super::{Effect, Effects, GroupPublish, InvariantError};
use crate::{
    config::Limits,
    envelope::{Envelope, GroupFanout, GroupOp, GroupRequest, SessionRef, Submit},
    frame,
    placement::{Owner, Placement},
    protocol::{
        self, conv, group_action as act, group_event as ev, group_role as role, invite_policy, join_policy,
        kind, ErrorCode, GroupNotice, GroupProfile, JoinRequest,
    },
    store::{GroupChange, GroupLoad, GroupRow, GroupWrite, UserId},
};

/// Requests and sends waiting for one group to load.
pub const GROUP_WAITERS_MAX: usize = 1024;

/// `GroupInfo.my_role` of a non-member.
pub const NOT_A_MEMBER: u8 = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    role: u8,
    muted_until_ms: u64,
    from_seq: u64,
    /// How far the member has read the group (its read receipts).
    read_seq: u64,
}

/// The change in flight of a group: who asked, and what to do once it is stored.
struct Busy {
    origin: SessionRef,
    /// The user who asked.
    actor: UserId,
    request_kind: u16,
    action: u8,
    /// What is stored (applied to the state once stored); `None` for a join request.
    change: Option<Arc<GroupChange>>,
    /// A join request being kept (`Some`) or dropped.
    request: Option<(UserId, Option<JoinRequest>)>,
    /// Tell this requester of the managers' decision (approved?).
    decision: Option<(UserId, bool)>,
}

struct Group {
    row: GroupRow,
    members: BTreeMap<UserId, Member>,
    blocked: BTreeSet<UserId>,
    requests: BTreeMap<UserId, JoinRequest>,
    /// Members by the shard of their user owner (where a fan-out goes); rebuilt when needed
    /// after a membership change.
    by_shard: Option<(u64, FanoutLists)>,
    busy: Option<Busy>,
    waiting: VecDeque<Box<GroupRequest>>,
    /// Created by a request in flight: nothing is stored yet.
    creating: bool,
    last_used_ms: u64,
}

enum Waiter {
    Request(Box<GroupRequest>),
    Submit(Box<Submit>),
    /// A published message of a group dropped from memory meanwhile: fanned out once loaded.
    Publish(GroupPublish),
}

enum Slot {
    Loading(Vec<Waiter>),
    Ready(Box<Group>),
}

pub struct GroupOwner {
    me: Owner,
    placement: Placement,
    groups: HashMap<u64, Slot>,
    members_max: usize,
    requests_max: usize,
    text_max: usize,
    extra_max: usize,
    page_max: u32,
    /// `receipts_live_members_max`.
    receipts_live_max: usize,
    groups_max: usize,
    waiting_max: usize,
    idle_ms: u64,
    /// Groups in the order they were loaded or last seen used, roughly (a clock queue, as the
    /// conversation owner's): (group, when queued).
    lru: VecDeque<(u64, u64)>,
    /// Group messages and notices fanned out so far.
    pub published: u64,
    /// Groups whose partition moved to another owner, dropped once nothing is in flight.
    moved: Vec<u64>,
}

impl GroupOwner {
    pub fn new(me: Owner, placement: Placement, l: &Limits) -> GroupOwner {
        GroupOwner {
            me,
            placement,
            groups: HashMap::new(),
            members_max: l.group_members_max,
            requests_max: l.group_join_requests_max,
            text_max: l.group_text_bytes_max,
            extra_max: l.group_extra_bytes_max,
            page_max: l.group_page_max,
            receipts_live_max: l.receipts_live_members_max,
            groups_max: l.groups_per_shard_max,
            waiting_max: l.group_changes_waiting_max,
            idle_ms: l.conversation_idle_secs * 1000,
            lru: VecDeque::new(),
            published: 0,
            moved: Vec::new(),
        }
    }

    /// Groups held (ready or loading).
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// A session's group request.
    pub fn request(&mut self, req: Box<GroupRequest>, now: u64, out: &mut Effects) {
        debug_assert_eq!(self.placement.group(req.group), self.me, "group request on the wrong owner");
        match self.groups.get_mut(&req.group) {
            Some(Slot::Ready(g)) => {
                g.last_used_ms = now;
                self.handle(req, now, out)
            }
            Some(Slot::Loading(waiters)) => {
                if waiters.len() < GROUP_WAITERS_MAX {
                    waiters.push(Waiter::Request(req));
                } else {
                    reply_err(out, &req, ErrorCode::Busy);
                }
            }
            None => self.load(req.group, Waiter::Request(req), out),
        }
    }

    /// A send (or stream message) to a group: checked, then handed to the conversation owner.
    /// A refused send goes on too, marked: a resend of a message stored before the sender was
    /// muted or removed gets its original ack from the resend dedup, a new one the refusal.
    pub fn submit(&mut self, mut sub: Box<Submit>, now: u64, out: &mut Effects) {
        match self.groups.get_mut(&sub.to) {
            Some(Slot::Ready(g)) => {
                g.last_used_ms = now;
                match check_send(g, sub.sender, now) {
                    Ok(()) => {
                        // A manager (or the founder) may recall anyone's message.
                        sub.by_manager = g.members.get(&sub.sender).is_some_and(|m| m.role != role::MEMBER);
                        out.push(Effect::Sequence(sub))
                    }
                    Err(code) if sub.stream || g.creating || g.row.dissolved => {
                        super::conv::refuse(out, &sub, code)
                    }
                    Err(code) => {
                        sub.refuse_new = Some(code);
                        out.push(Effect::Sequence(sub));
                    }
                }
            }
            Some(Slot::Loading(waiters)) => {
                if waiters.len() < GROUP_WAITERS_MAX {
                    waiters.push(Waiter::Submit(sub));
                } else {
                    super::conv::refuse(out, &sub, ErrorCode::Busy);
                }
            }
            None => {
                let group = sub.to;
                self.load(group, Waiter::Submit(sub), out)
            }
        }
    }

    fn load(&mut self, group: u64, first: Waiter, out: &mut Effects) {
        if self.groups.len() >= self.groups_max && !self.make_room() {
            match first {
                Waiter::Request(req) => reply_err(out, &req, ErrorCode::Busy),
                Waiter::Submit(sub) => super::conv::refuse(out, &sub, ErrorCode::Busy),
                Waiter::Publish(_) => unreachable!("published messages load their group directly"),
            }
            return;
        }
        self.groups.insert(group, Slot::Loading(vec![first]));
        self.lru.push_back((group, 0));
        out.push(Effect::LoadGroup(group));
    }

    /// At `groups_per_shard_max`: drop the least recently used group with nothing in flight
    /// (it is reloaded from the store when next used).
    fn make_room(&mut self) -> bool {
        for _ in 0..64 {
            let Some((id, queued_ms)) = self.lru.pop_front() else { return false };
            match self.groups.get(&id) {
                Some(Slot::Ready(g)) if g.last_used_ms <= queued_ms && g.idle() => {
                    self.groups.remove(&id);
                    return true;
                }
                Some(Slot::Ready(g)) => self.lru.push_back((id, g.last_used_ms)),
                Some(Slot::Loading(_)) => self.lru.push_back((id, queued_ms)),
                None => {}
            }
        }
        false
    }

    /// Drop groups unused for `conversation_idle_secs` with nothing in flight (reloaded from
    /// the store when next used), looking at most at `budget` queue entries.
    pub fn evict_idle(&mut self, now: u64, budget: usize) -> usize {
        let mut evicted = self.drop_moved();
        for _ in 0..budget {
            let Some(&(id, queued_ms)) = self.lru.front() else { break };
            let busy = match self.groups.get(&id) {
                None => {
                    self.lru.pop_front();
                    continue;
                }
                Some(Slot::Loading(_)) => Some(now),
                Some(Slot::Ready(g)) if g.last_used_ms > queued_ms => Some(g.last_used_ms),
                Some(Slot::Ready(g)) if !g.idle() => Some(now),
                Some(Slot::Ready(_)) => None,
            };
            if let Some(at) = busy {
                self.lru.pop_front();
                self.lru.push_back((id, at));
                continue;
            }
            if now < queued_ms + self.idle_ms {
                break;
            }
            self.lru.pop_front();
            self.groups.remove(&id);
            evicted += 1;
        }
        // Entries of groups dropped otherwise (failed loads, refused creations) go once they
        // are as many as the groups held.
        if self.lru.len() > 2 * self.groups.len() + 1024 {
            let groups = &self.groups;
            self.lru.retain(|(id, _)| groups.contains_key(id));
        }
        evicted
    }

    /// The cluster's members changed: place by `placement` from now on. Groups whose
    /// partition moved to another owner are dropped (the new owner loads them from the store);
    /// those loading or with a change in flight go once it has ended.
    pub fn set_placement(&mut self, placement: Placement) {
        self.placement = placement;
        self.moved = self.groups.keys().filter(|&&g| self.placement.group(g) != self.me).copied().collect();
        self.drop_moved();
    }

    /// Drop the moved groups that have nothing in flight; how many went.
    fn drop_moved(&mut self) -> usize {
        if self.moved.is_empty() {
            return 0;
        }
        let mut gone = 0;
        for id in std::mem::take(&mut self.moved) {
            match self.groups.get(&id) {
                Some(slot) if self.placement.group(id) != self.me => {
                    if matches!(slot, Slot::Ready(g) if g.idle()) {
                        self.groups.remove(&id);
                        gone += 1;
                    } else {
                        self.moved.push(id);
                    }
                }
                _ => {}
            }
        }
        gone
    }

    /// A group's load ended: take it over (or learn it does not exist) and handle, in order,
    /// everything that waited for it.
    pub fn loaded(
        &mut self,
        group: u64,
        result: Result<Option<GroupLoad>, ErrorCode>,
        now: u64,
        out: &mut Effects,
    ) {
        let Some(Slot::Loading(waiters)) = self.groups.remove(&group) else { return };
        let load = match result {
            Err(code) => {
                for w in waiters {
                    match w {
                        Waiter::Request(req) => reply_err(out, &req, code),
                        Waiter::Submit(sub) => super::conv::refuse(out, &sub, code),
                        // Stored, but its group cannot be read now: its members get it at
                        // catch-up or with History.
                        Waiter::Publish(p) => {
                            log::warn!("group {}: message {} not fanned out: {code:?}", p.group, p.seq)
                        }
                    }
                }
                return;
            }
            Ok(load) => load,
        };
        // Messages published while the group was loading were sequenced before any send that
        // waited with them: they go out first.
        let (publishes, waiters): (Vec<Waiter>, Vec<Waiter>) =
            waiters.into_iter().partition(|w| matches!(w, Waiter::Publish(_)));
        let waiters: Vec<Waiter> = publishes.into_iter().chain(waiters).collect();
        let exists = load.is_some();
        let mut g = Box::new(match load {
            Some(l) => Group::from_load(l, now),
            None => Group::from_load(
                GroupLoad { row: GroupRow { id: group, ..Default::default() }, ..Default::default() },
                now,
            ),
        });
        g.creating = false;
        let mut waiters = waiters.into_iter();
        if !exists {
            // The only thing a group that does not exist takes is its creation (the first).
            let mut created = false;
            for w in waiters.by_ref() {
                match w {
                    Waiter::Request(req) if !created && matches!(req.op, GroupOp::Create(_)) => {
                        created = true;
                        g.creating = true;
                        self.groups.insert(group, Slot::Ready(g));
                        self.handle(req, now, out);
                        // Later waiters go behind the creation.
                        break;
                    }
                    Waiter::Request(req) => reply_err(out, &req, ErrorCode::GroupNotFound),
                    Waiter::Submit(sub) => super::conv::refuse(out, &sub, ErrorCode::GroupNotFound),
                    Waiter::Publish(_) => {}
                }
            }
            if !created {
                return;
            }
        } else {
            self.groups.insert(group, Slot::Ready(g));
        }
        for w in waiters {
            match w {
                Waiter::Request(req) => self.request(req, now, out),
                Waiter::Submit(sub) => self.submit(sub, now, out),
                Waiter::Publish(p) => self.published(p, now, out),
            }
        }
    }

    fn ready(&mut self, group: u64) -> Option<&mut Group> {
        match self.groups.get_mut(&group) {
            Some(Slot::Ready(g)) => Some(g),
            _ => None,
        }
    }

    /// Handle a request for a loaded group: queries at once, changes one at a time.
    fn handle(&mut self, req: Box<GroupRequest>, now: u64, out: &mut Effects) {
        let (text_max, extra_max, page_max) = (self.text_max, self.extra_max, self.page_max);
        let waiting_max = self.waiting_max;
        let receipts_live_max = self.receipts_live_max;
        let placement = self.placement.clone();
        let g = self.ready(req.group).expect("handled on a ready group");
        match &req.op {
            GroupOp::Get => return reply(out, &req, info_frame(g, req.user)),
            GroupOp::Members { after, limit } => {
                let r = members_frame(g, req.user, *after, page(*limit, page_max));
                return reply(out, &req, r);
            }
            GroupOp::Requests => {
                let r = requests_frame(g, req.user);
                return reply(out, &req, r);
            }
            GroupOp::Typing(frame) => {
                // To the members' live sessions (but the sender's), lossily; answered only when
                // refused (as a send would be).
                if let Err(code) = check_send(g, req.user, now) {
                    return reply_err(out, &req, code);
                }
                return fan_out_lossy(g, &placement, req.origin, frame, out);
            }
            GroupOp::Read { seq, device, frame } => {
                let Some(m) = g.members.get_mut(&req.user) else {
                    return reply_err(out, &req, ErrorCode::NotMember);
                };
                m.read_seq = m.read_seq.max(*seq);
                let conv = crate::store::group_conv(req.group);
                let c = crate::store::Cursor { user: req.user, device: *device, conv, seq: *seq };
                out.push(Effect::NoteRead(c));
                // Live only in small groups: a large group's receipts would be a storm.
                if g.members.len() <= receipts_live_max {
                    fan_out_lossy(g, &placement, req.origin, frame, out);
                }
                return;
            }
            GroupOp::ReadGet { seq } => {
                if !g.members.contains_key(&req.user) {
                    return reply_err(out, &req, ErrorCode::NotMember);
                }
                let r = read_state_frame(g, req.group, req.user, *seq, receipts_live_max);
                return reply(out, &req, Ok(r));
            }
            GroupOp::Create(p) | GroupOp::Update(p) => {
                if let Err(code) = check_profile(p, text_max, extra_max) {
                    if g.creating && g.busy.is_none() {
                        // The creation itself is refused: the group does not exist after all.
                        let waiting = std::mem::take(&mut g.waiting);
                        self.groups.remove(&req.group);
                        for w in waiting {
                            reply_err(out, &w, ErrorCode::GroupNotFound);
                        }
                    }
                    return reply_err(out, &req, code);
                }
            }
            GroupOp::Action { note, .. } => {
                if note.len() > text_max {
                    return reply_err(out, &req, ErrorCode::InvalidGroup);
                }
            }
            GroupOp::AddMembers(_) => {}
        }
        if g.busy.is_some() {
            if g.waiting.len() >= waiting_max {
                return reply_err(out, &req, ErrorCode::Busy);
            }
            g.waiting.push_back(req);
            return;
        }
        self.start(req, now, out);
    }

    /// Start the next change of `group`, if one waits and none is in flight.
    fn next(&mut self, group: u64, now: u64, out: &mut Effects) {
        while let Some(g) = self.ready(group) {
            if g.busy.is_some() {
                return;
            }
            let Some(req) = g.waiting.pop_front() else { return };
            self.start(req, now, out);
        }
    }

    /// Check a change against the group's state and send its notice (or store its join
    /// request); it is applied once stored.
    fn start(&mut self, req: Box<GroupRequest>, now: u64, out: &mut Effects) {
        let (members_max, requests_max) = (self.members_max, self.requests_max);
        let g = self.ready(req.group).expect("started on a ready group");
        let plan = match plan(g, &req, now, members_max, requests_max) {
            Ok(plan) => plan,
            Err(code) => {
                if g.creating {
                    // A creation refused: the group does not exist after all.
                    let waiting = std::mem::take(&mut g.waiting);
                    self.groups.remove(&req.group);
                    reply_err(out, &req, code);
                    for w in waiting {
                        reply_err(out, &w, ErrorCode::GroupNotFound);
                    }
                    return;
                }
                return reply_err(out, &req, code);
            }
        };
        let request_kind = req.op.request_kind();
        let action = match req.op {
            GroupOp::Action { action, .. } => action,
            _ => 0,
        };
        match plan {
            Plan::Notice { notice, writes, decision } => {
                let change = Arc::new(GroupChange { group: req.group, writes });
                g.busy = Some(Busy {
                    origin: req.origin,
                    actor: req.user,
                    request_kind,
                    action,
                    change: Some(change.clone()),
                    request: None,
                    decision,
                });
                out.push(Effect::Sequence(notice_submit(req.group, &notice, change)));
            }
            Plan::Request { user, request, decision } => {
                g.busy = Some(Busy {
                    origin: req.origin,
                    actor: req.user,
                    request_kind,
                    action,
                    change: None,
                    request: Some((user, request.clone())),
                    decision,
                });
                out.push(Effect::SaveJoinRequest { group: req.group, user, request });
            }
        }
    }

    /// The conversation owner published a group message (stored, or sequenced in no-data
    /// mode): apply a notice's change and answer its requester, then fan the frame out to the
    /// members (and to those the change removed, who learn it too).
    pub fn published(&mut self, p: GroupPublish, now: u64, out: &mut Effects) {
        let placement = self.placement.clone();
        let g = match self.groups.get_mut(&p.group) {
            Some(Slot::Ready(g)) => g,
            Some(Slot::Loading(waiters)) => return waiters.push(Waiter::Publish(p)),
            None => {
                // Dropped from memory while the message was being stored (at the groups cap):
                // loaded again for its members.
                let group = p.group;
                self.groups.insert(group, Slot::Loading(vec![Waiter::Publish(p)]));
                self.lru.push_back((group, 0));
                out.push(Effect::LoadGroup(group));
                return;
            }
        };
        let mut removed = Vec::new();
        if p.notice {
            let Some(busy) = g.busy.take() else { return };
            let change = busy.change.clone().expect("a notice carries its change");
            removed = g.apply(&change.writes, p.seq);
            g.creating = false;
            busy.answer_ok(p.group, p.seq, out);
            if let Some((user, approved)) = busy.decision {
                push_decision(out, &placement, p.group, user, approved, busy.actor);
            }
        }
        // Those a change removed learn it too, through the same fan-out as the messages before
        // it (so never ahead of them). A message (no removal) shares the lists as they are.
        let mut extra: Vec<(Owner, Vec<UserId>)> = Vec::new();
        for u in removed {
            let o = placement.user(u);
            match extra.iter_mut().find(|(e, _)| *e == o) {
                Some((_, list)) => list.push(u),
                None => extra.push((o, vec![u])),
            }
        }
        for (shard, list) in g.lists(&placement).iter() {
            let users: Arc<[UserId]> = match extra.iter().position(|(e, _)| e == shard) {
                Some(i) => {
                    let (_, e) = extra.swap_remove(i);
                    list.iter().copied().chain(e).collect::<Vec<UserId>>().into()
                }
                None => list.clone(),
            };
            let f = GroupFanout { users, skip: p.skip, frame: p.frame.clone(), lossy: p.stream };
            out.push(Effect::Post(*shard, Envelope::GroupFanout(Box::new(f))));
        }
        // Removed members on shards that hold no member any more.
        for (shard, users) in extra {
            let f =
                GroupFanout { users: users.into(), skip: p.skip, frame: p.frame.clone(), lossy: p.stream };
            out.push(Effect::Post(shard, Envelope::GroupFanout(Box::new(f))));
        }
        self.published += 1;
        if p.notice {
            self.next(p.group, now, out);
        }
    }

    /// A notice was not stored (the store failed or was busy): nothing changed; its requester
    /// is told, and the next change goes.
    ///
    /// A commit reported failed may have been stored all the same (an ambiguous commit): the
    /// group is read again from the store, which knows, and the changes waiting go on once it
    /// is loaded.
    pub fn notice_failed(&mut self, group: u64, code: ErrorCode, now: u64, out: &mut Effects) {
        let _ = now;
        let Some(g) = self.ready(group) else { return };
        let Some(busy) = g.busy.take() else { return };
        reply_to(out, busy.origin, busy.request_kind, Err(code));
        self.reload(group, out);
    }

    /// Forget what is held of `group` and load it again; the changes waiting behind the one in
    /// flight wait for the load.
    fn reload(&mut self, group: u64, out: &mut Effects) {
        let Some(Slot::Ready(g)) = self.groups.remove(&group) else { return };
        let waiters = g.waiting.into_iter().map(Waiter::Request).collect();
        self.groups.insert(group, Slot::Loading(waiters));
        self.lru.push_back((group, 0));
        out.push(Effect::LoadGroup(group));
    }

    /// A join request was stored (or dropped).
    pub fn request_saved(&mut self, group: u64, result: Result<(), ErrorCode>, now: u64, out: &mut Effects) {
        let placement = self.placement.clone();
        let Some(g) = self.ready(group) else { return };
        let Some(busy) = g.busy.take() else { return };
        match result {
            Ok(()) => {
                let (user, request) = busy.request.clone().expect("a join request in flight");
                let managers: Vec<UserId> =
                    g.members.iter().filter(|(_, m)| m.role >= role::MANAGER).map(|(&u, _)| u).collect();
                match request {
                    Some(r) => {
                        let push = protocol::GroupJoinRequest { group_id: group, request: r.clone() };
                        let f = Bytes::from(frame::encode(kind::GROUP_JOIN_REQUEST, &push));
                        for m in managers {
                            let env = Envelope::Fanout { user: m, skip: SessionRef::NONE, frame: f.clone() };
                            out.push(Effect::Post(placement.user(m), env));
                        }
                        g.requests.insert(user, r);
                    }
                    None => {
                        g.requests.remove(&user);
                    }
                }
                if let Some((user, approved)) = busy.decision {
                    push_decision(out, &placement, group, user, approved, busy.actor);
                }
                busy.answer_ok(group, 0, out);
            }
            Err(code) => {
                // The request may have been saved all the same: read the group again.
                reply_to(out, busy.origin, busy.request_kind, Err(code));
                return self.reload(group, out);
            }
        }
        self.next(group, now, out);
    }

    /// Members' state is consistent: roles, one founder (unless dissolved), fan-out lists.
    pub fn check(&self) -> Result<(), InvariantError> {
        for (&id, slot) in &self.groups {
            let Slot::Ready(g) = slot else { continue };
            let fail = |what: String| Err(InvariantError { key: id, what });
            if g.creating {
                continue;
            }
            let founders = g.members.values().filter(|m| m.role == role::FOUNDER).count();
            if !g.row.dissolved && founders != 1 {
                return fail(format!("{founders} founders"));
            }
            if !g.row.dissolved && g.members.get(&g.row.founder).map(|m| m.role) != Some(role::FOUNDER) {
                return fail(format!("founder {} is not the member with that role", g.row.founder));
            }
            if g.row.dissolved && !g.members.is_empty() {
                return fail("dissolved with members".into());
            }
            if let Some((_, lists)) = &g.by_shard {
                let n: usize = lists.iter().map(|(_, l)| l.len()).sum();
                if n != g.members.len() {
                    return fail(format!("fan-out lists hold {n} of {} members", g.members.len()));
                }
            }
        }
        Ok(())
    }
}

impl Busy {
    /// Tell the requester its change is stored (`seq`: its notice's, or 0).
    fn answer_ok(&self, group: u64, seq: u64, out: &mut Effects) {
        let ok =
            protocol::GroupOk { group_id: group, seq, request_kind: self.request_kind, action: self.action };
        let frame = Bytes::from(frame::encode(kind::GROUP_OK, &ok));
        reply_to(out, self.origin, self.request_kind, Ok(frame));
    }
}

impl Group {
    /// Nothing in flight or waiting: the group may be dropped from memory.
    fn idle(&self) -> bool {
        self.busy.is_none() && self.waiting.is_empty() && !self.creating
    }

    fn from_load(l: GroupLoad, now: u64) -> Group {
        let reads: HashMap<UserId, u64> = l.reads.iter().copied().collect();
        Group {
            members: l
                .members
                .iter()
                .map(|m| {
                    let read_seq = reads.get(&m.user).copied().unwrap_or(0);
                    let (role, muted_until_ms, from_seq) = (m.role, m.muted_until_ms, m.from_seq);
                    (m.user, Member { role, muted_until_ms, from_seq, read_seq })
                })
                .collect(),
            row: l.row,
            blocked: l.blocked.into_iter().collect(),
            requests: l.requests.into_iter().map(|r| (r.user_id, r)).collect(),
            by_shard: None,
            busy: None,
            waiting: VecDeque::new(),
            creating: false,
            last_used_ms: now,
        }
    }

    /// Apply stored changes (the same a store applies with the notice of `seq`); returns the
    /// users who stopped being members.
    fn apply(&mut self, writes: &[GroupWrite], seq: u64) -> Vec<UserId> {
        let mut removed = Vec::new();
        for w in writes {
            match w {
                GroupWrite::Group(row) => self.row = row.clone(),
                GroupWrite::Join { user, role } => {
                    let m = Member { role: *role, muted_until_ms: 0, from_seq: seq, read_seq: 0 };
                    self.members.insert(*user, m);
                    self.requests.remove(user);
                    self.by_shard = None;
                }
                GroupWrite::Member { user, role, muted_until_ms } => {
                    if let Some(m) = self.members.get_mut(user) {
                        m.role = *role;
                        m.muted_until_ms = *muted_until_ms;
                    }
                }
                GroupWrite::Leave { user } => {
                    if self.members.remove(user).is_some() {
                        removed.push(*user);
                        self.by_shard = None;
                    }
                }
                GroupWrite::LeaveAll => {
                    removed.extend(std::mem::take(&mut self.members).into_keys());
                    self.by_shard = None;
                }
                GroupWrite::Block { user } => {
                    self.blocked.insert(*user);
                }
                GroupWrite::Unblock { user } => {
                    self.blocked.remove(user);
                }
                GroupWrite::Unrequest { user } => {
                    self.requests.remove(user);
                }
            }
        }
        removed
    }

    /// Members by the owner (a node's shard) of their user, for the placement's epoch; only
    /// owners with members are listed.
    fn lists(&mut self, placement: &Placement) -> &FanoutLists {
        if self.by_shard.as_ref().is_some_and(|(epoch, _)| *epoch != placement.epoch()) {
            self.by_shard = None;
        }
        &self
            .by_shard
            .get_or_insert_with(|| {
                let mut lists: Vec<(Owner, Vec<UserId>)> = Vec::new();
                for &u in self.members.keys() {
                    let o = placement.user(u);
                    match lists.iter_mut().find(|(e, _)| *e == o) {
                        Some((_, list)) => list.push(u),
                        None => lists.push((o, vec![u])),
                    }
                }
                // In owner order, not the members map's: a simulation seed replays exactly.
                lists.sort_unstable_by_key(|(o, _)| *o);
                (placement.epoch(), lists.into_iter().map(|(o, l)| (o, Arc::from(l))).collect())
            })
            .1
    }

    fn role_of(&self, user: UserId) -> Option<u8> {
        self.members.get(&user).map(|m| m.role)
    }
}

/// Members by the owner of their user (only owners with members), for one placement epoch.
type FanoutLists = Vec<(Owner, Arc<[UserId]>)>;

/// What a change does: a notice with its stored changes, or a join request kept or dropped.
enum Plan {
    Notice { notice: GroupNotice, writes: Vec<GroupWrite>, decision: Option<(UserId, bool)> },
    Request { user: UserId, request: Option<JoinRequest>, decision: Option<(UserId, bool)> },
}

fn notice(event: u8, actor: UserId, target: UserId, until_ms: u64) -> GroupNotice {
    GroupNotice { event, actor, target, until_ms, users: Vec::new() }
}

/// Check a change against the group's state; the refusal code, or what to do.
fn plan(
    g: &Group,
    req: &GroupRequest,
    now: u64,
    members_max: usize,
    requests_max: usize,
) -> Result<Plan, ErrorCode> {
    let me = req.user;
    if let GroupOp::Create(profile) = &req.op {
        if !g.creating {
            // The id is taken (drawn at random: a collision); the client tries again.
            return Err(ErrorCode::Busy);
        }
        let row = GroupRow {
            id: req.group,
            profile: profile.clone(),
            founder: me,
            muted_all_until_ms: 0,
            dissolved: false,
            created_ms: now,
        };
        let writes = vec![GroupWrite::Group(row), GroupWrite::Join { user: me, role: role::FOUNDER }];
        return Ok(Plan::Notice { notice: notice(ev::CREATED, me, 0, 0), writes, decision: None });
    }
    if g.row.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    let my_role = g.role_of(me);
    let manager = || match my_role {
        None => Err(ErrorCode::NotMember),
        Some(r) if r < role::MANAGER => Err(ErrorCode::NotManager),
        Some(r) => Ok(r),
    };
    let founder = || match my_role {
        None => Err(ErrorCode::NotMember),
        Some(role::FOUNDER) => Ok(()),
        Some(_) => Err(ErrorCode::NotFounder),
    };
    let n = |event, target, until| notice(event, me, target, until);
    match &req.op {
        GroupOp::Update(profile) => {
            manager()?;
            let row = GroupRow { profile: profile.clone(), ..g.row.clone() };
            Ok(Plan::Notice {
                notice: n(ev::PROFILE_CHANGED, 0, 0),
                writes: vec![GroupWrite::Group(row)],
                decision: None,
            })
        }
        GroupOp::AddMembers(users) => {
            let r = my_role.ok_or(ErrorCode::NotMember)?;
            if r < role::MANAGER && g.row.profile.invite_policy != invite_policy::MEMBERS {
                return Err(ErrorCode::NotManager);
            }
            let mut new: Vec<UserId> = users.iter().copied().filter(|u| !g.members.contains_key(u)).collect();
            new.sort_unstable();
            new.dedup();
            if new.iter().any(|&u| u == 0 || protocol::is_group_id(u)) {
                return Err(ErrorCode::InvalidGroup);
            }
            if new.iter().any(|u| g.blocked.contains(u)) {
                return Err(ErrorCode::BlockedFromGroup);
            }
            if new.is_empty() {
                return Err(ErrorCode::AlreadyMember);
            }
            if g.members.len() + new.len() > members_max {
                return Err(ErrorCode::GroupFull);
            }
            let mut writes: Vec<GroupWrite> =
                new.iter().map(|&user| GroupWrite::Join { user, role: role::MEMBER }).collect();
            writes.extend(
                new.iter().filter(|u| g.requests.contains_key(u)).map(|&user| GroupWrite::Unrequest { user }),
            );
            let notice = GroupNotice { users: new, ..n(ev::MEMBERS_ADDED, 0, 0) };
            Ok(Plan::Notice { notice, writes, decision: None })
        }
        GroupOp::Action { action, target, until_ms, note } => {
            let (t, until) = (*target, *until_ms);
            let target_role = g.role_of(t);
            // The target of a member action must be a member ranked below the actor.
            let below_me = |r: u8| -> Result<(), ErrorCode> {
                match target_role {
                    None => Err(ErrorCode::NotMember),
                    Some(tr) if tr >= r => Err(ErrorCode::NotManager),
                    Some(_) => Ok(()),
                }
            };
            let room_for_one = || {
                if g.members.len() >= members_max {
                    Err(ErrorCode::GroupFull)
                } else {
                    Ok(())
                }
            };
            let mut writes = Vec::new();
            let plan = match *action {
                act::JOIN => {
                    if my_role.is_some() {
                        return Err(ErrorCode::AlreadyMember);
                    }
                    if g.blocked.contains(&me) {
                        return Err(ErrorCode::BlockedFromGroup);
                    }
                    room_for_one()?;
                    if g.row.profile.join_policy == join_policy::APPROVAL {
                        if !g.requests.contains_key(&me) && g.requests.len() >= requests_max {
                            return Err(ErrorCode::TooManyJoinRequests);
                        }
                        let r = JoinRequest { user_id: me, note: note.clone(), ts_ms: now };
                        return Ok(Plan::Request { user: me, request: Some(r), decision: None });
                    }
                    writes.push(GroupWrite::Join { user: me, role: role::MEMBER });
                    n(ev::JOINED, me, 0)
                }
                act::LEAVE => {
                    match my_role {
                        None => return Err(ErrorCode::NotMember),
                        Some(role::FOUNDER) => return Err(ErrorCode::FounderMustTransfer),
                        Some(_) => {}
                    }
                    writes.push(GroupWrite::Leave { user: me });
                    n(ev::LEFT, me, 0)
                }
                act::INVITE => {
                    let r = my_role.ok_or(ErrorCode::NotMember)?;
                    if r < role::MANAGER && g.row.profile.invite_policy != invite_policy::MEMBERS {
                        return Err(ErrorCode::NotManager);
                    }
                    if t == 0 || protocol::is_group_id(t) {
                        return Err(ErrorCode::InvalidGroup);
                    }
                    if target_role.is_some() {
                        return Err(ErrorCode::AlreadyMember);
                    }
                    if g.blocked.contains(&t) {
                        return Err(ErrorCode::BlockedFromGroup);
                    }
                    room_for_one()?;
                    writes.push(GroupWrite::Join { user: t, role: role::MEMBER });
                    n(ev::ADDED, t, 0)
                }
                act::KICK => {
                    let r = manager()?;
                    below_me(r)?;
                    writes.push(GroupWrite::Leave { user: t });
                    n(ev::KICKED, t, 0)
                }
                act::APPROVE | act::REJECT => {
                    manager()?;
                    if !g.requests.contains_key(&t) {
                        return Err(ErrorCode::NoJoinRequest);
                    }
                    if *action == act::REJECT {
                        return Ok(Plan::Request { user: t, request: None, decision: Some((t, false)) });
                    }
                    if g.blocked.contains(&t) {
                        return Err(ErrorCode::BlockedFromGroup);
                    }
                    room_for_one()?;
                    writes.push(GroupWrite::Join { user: t, role: role::MEMBER });
                    writes.push(GroupWrite::Unrequest { user: t });
                    let notice = n(ev::ADDED, t, 0);
                    return Ok(Plan::Notice { notice, writes, decision: Some((t, true)) });
                }
                act::ADD_MANAGER | act::REMOVE_MANAGER => {
                    founder()?;
                    let m = g.members.get(&t).ok_or(ErrorCode::NotMember)?;
                    let (want, event) = if *action == act::ADD_MANAGER {
                        (role::MANAGER, ev::MANAGER_ADDED)
                    } else {
                        (role::MEMBER, ev::MANAGER_REMOVED)
                    };
                    if m.role == role::FOUNDER || m.role == want {
                        return Err(ErrorCode::InvalidGroup);
                    }
                    writes.push(GroupWrite::Member { user: t, role: want, muted_until_ms: m.muted_until_ms });
                    n(event, t, 0)
                }
                act::TRANSFER => {
                    founder()?;
                    let m = g.members.get(&t).ok_or(ErrorCode::NotMember)?;
                    if t == me {
                        return Err(ErrorCode::InvalidGroup);
                    }
                    let _ = m; // the target must be a member
                    writes.push(GroupWrite::Member { user: t, role: role::FOUNDER, muted_until_ms: 0 });
                    writes.push(GroupWrite::Member { user: me, role: role::MANAGER, muted_until_ms: 0 });
                    writes.push(GroupWrite::Group(GroupRow { founder: t, ..g.row.clone() }));
                    n(ev::TRANSFERRED, t, 0)
                }
                act::MUTE => {
                    let r = manager()?;
                    below_me(r)?;
                    let role_t = target_role.expect("checked");
                    writes.push(GroupWrite::Member { user: t, role: role_t, muted_until_ms: until });
                    n(ev::MUTED, t, until)
                }
                act::MUTE_ALL => {
                    manager()?;
                    writes.push(GroupWrite::Group(GroupRow { muted_all_until_ms: until, ..g.row.clone() }));
                    n(ev::MUTED_ALL, 0, until)
                }
                act::BLOCK => {
                    let r = manager()?;
                    if t == 0 || t == me || protocol::is_group_id(t) {
                        return Err(ErrorCode::InvalidGroup);
                    }
                    if target_role.is_some() {
                        below_me(r)?;
                        writes.push(GroupWrite::Leave { user: t });
                    }
                    writes.push(GroupWrite::Block { user: t });
                    if g.requests.contains_key(&t) {
                        writes.push(GroupWrite::Unrequest { user: t });
                    }
                    n(ev::BLOCKED, t, 0)
                }
                act::UNBLOCK => {
                    manager()?;
                    if !g.blocked.contains(&t) {
                        return Err(ErrorCode::InvalidGroup);
                    }
                    writes.push(GroupWrite::Unblock { user: t });
                    n(ev::UNBLOCKED, t, 0)
                }
                act::DISSOLVE => {
                    founder()?;
                    writes.push(GroupWrite::Group(GroupRow { dissolved: true, ..g.row.clone() }));
                    writes.push(GroupWrite::LeaveAll);
                    n(ev::DISSOLVED, 0, 0)
                }
                _ => return Err(ErrorCode::InvalidGroup),
            };
            Ok(Plan::Notice { notice: plan, writes, decision: None })
        }
        GroupOp::Create(_)
        | GroupOp::Get
        | GroupOp::Members { .. }
        | GroupOp::Requests
        | GroupOp::Typing(_)
        | GroupOp::Read { .. }
        | GroupOp::ReadGet { .. } => {
            unreachable!("not a change")
        }
    }
}

/// Push `frame` (a typing notice or read receipt) to the members' live sessions but `skip`,
/// lossily: a session that does not keep up misses it.
fn fan_out_lossy(g: &mut Group, placement: &Placement, skip: SessionRef, frame: &Bytes, out: &mut Effects) {
    for (shard, users) in g.lists(placement).iter() {
        let f = GroupFanout { users: users.clone(), skip, frame: frame.clone(), lossy: true };
        out.push(Effect::Post(*shard, Envelope::GroupFanout(Box::new(f))));
    }
}

/// A `READ_STATE` answer: how many members (the asker aside) read `seq`, and every member's
/// position in a group of at most `list_max` members.
fn read_state_frame(g: &Group, group: u64, asker: UserId, seq: u64, list_max: usize) -> Bytes {
    let others = g.members.iter().filter(|(&u, _)| u != asker);
    let read_count = others.clone().filter(|(_, m)| m.read_seq >= seq).count() as u32;
    let reads = if g.members.len() <= list_max {
        g.members.iter().map(|(&user, m)| protocol::ReadEntry { user, seq: m.read_seq }).collect()
    } else {
        Vec::new()
    };
    let state = protocol::ReadState {
        conv: protocol::conv::GROUP,
        peer: group,
        seq,
        read_count,
        member_count: others.count() as u32,
        reads,
    };
    Bytes::from(frame::encode(kind::READ_STATE, &state))
}

/// Whether `sender` may send to the group now.
fn check_send(g: &Group, sender: UserId, now: u64) -> Result<(), ErrorCode> {
    if g.row.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    if g.creating {
        return Err(ErrorCode::GroupNotFound);
    }
    let m = g.members.get(&sender).ok_or(ErrorCode::NotMember)?;
    if m.muted_until_ms > now || (m.role == role::MEMBER && g.row.muted_all_until_ms > now) {
        return Err(ErrorCode::Muted);
    }
    Ok(())
}

fn check_profile(p: &GroupProfile, text_max: usize, extra_max: usize) -> Result<(), ErrorCode> {
    let texts_ok = [&p.name, &p.topic, &p.avatar_url].iter().all(|t| t.len() <= text_max);
    if !texts_ok
        || p.name.is_empty()
        || p.extra.len() > extra_max
        || p.join_policy > join_policy::APPROVAL
        || p.invite_policy > invite_policy::MEMBERS
    {
        return Err(ErrorCode::InvalidGroup);
    }
    Ok(())
}

fn page(limit: u32, max: u32) -> usize {
    if limit == 0 {
        max as usize
    } else {
        limit.min(max) as usize
    }
}

fn info_frame(g: &Group, user: UserId) -> Result<Bytes, ErrorCode> {
    if g.row.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    if g.creating {
        return Err(ErrorCode::GroupNotFound);
    }
    let info = protocol::GroupInfo {
        group_id: g.row.id,
        profile: g.row.profile.clone(),
        founder: g.row.founder,
        members: g.members.len() as u32,
        muted_all_until_ms: g.row.muted_all_until_ms,
        my_role: g.role_of(user).unwrap_or(NOT_A_MEMBER),
    };
    Ok(Bytes::from(frame::encode(kind::GROUP_INFO, &info)))
}

fn members_frame(g: &Group, user: UserId, after: UserId, limit: usize) -> Result<Bytes, ErrorCode> {
    if g.row.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    if g.creating {
        return Err(ErrorCode::GroupNotFound);
    }
    if !g.members.contains_key(&user) {
        return Err(ErrorCode::NotMember);
    }
    let mut it = g.members.range(after.saturating_add(1)..);
    let members: Vec<protocol::GroupMember> = it
        .by_ref()
        .take(limit)
        .map(|(&u, m)| protocol::GroupMember { user_id: u, role: m.role, muted_until_ms: m.muted_until_ms })
        .collect();
    let more = it.next().is_some();
    let p = protocol::GroupMemberPage { group_id: g.row.id, members, more };
    Ok(Bytes::from(frame::encode(kind::GROUP_MEMBER_PAGE, &p)))
}

fn requests_frame(g: &Group, user: UserId) -> Result<Bytes, ErrorCode> {
    if g.row.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    if g.creating {
        return Err(ErrorCode::GroupNotFound);
    }
    match g.role_of(user) {
        None => return Err(ErrorCode::NotMember),
        Some(r) if r < role::MANAGER => return Err(ErrorCode::NotManager),
        Some(_) => {}
    }
    let requests = g.requests.values().cloned().collect();
    let p = protocol::GroupRequestPage { group_id: g.row.id, requests };
    Ok(Bytes::from(frame::encode(kind::GROUP_REQUEST_PAGE, &p)))
}

/// The notice's `Submit`: a `DELIVER` frame around a `Send` (to the group, sender 0) whose body
/// is the notice's archive.
fn notice_submit(group: u64, notice: &GroupNotice, change: Arc<GroupChange>) -> Box<Submit> {
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(notice).expect("encodes").to_vec();
    let send =
        protocol::Send { conv: conv::GROUP, flags: 0, burn_secs: 0, to: group, client_msg_id: 0, body };
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&send).expect("encodes");
    Box::new(Submit {
        origin: SessionRef::NONE,
        sender: 0,
        to: group,
        conv: conv::GROUP,
        client_msg_id: 0,
        sender_device: 0,
        stream: false,
        frame: Submit::blank_deliver(&payload),
        change: Some(change),
        refuse_new: None,
        by_manager: false,
    })
}

fn push_decision(
    out: &mut Effects,
    placement: &Placement,
    group: u64,
    user: UserId,
    approved: bool,
    by: UserId,
) {
    let d = protocol::GroupDecision { group_id: group, approved, by };
    let f = Bytes::from(frame::encode(kind::GROUP_DECISION, &d));
    out.push(Effect::Post(placement.user(user), Envelope::Fanout { user, skip: SessionRef::NONE, frame: f }));
}

fn reply(out: &mut Effects, req: &GroupRequest, result: Result<Bytes, ErrorCode>) {
    reply_to(out, req.origin, req.op.request_kind(), result);
}

fn reply_err(out: &mut Effects, req: &GroupRequest, code: ErrorCode) {
    reply(out, req, Err(code));
}

fn reply_to(out: &mut Effects, session: SessionRef, request_kind: u16, result: Result<Bytes, ErrorCode>) {
    if session != SessionRef::NONE {
        out.push(Effect::Post(session.owner(), Envelope::GroupReply { session, request_kind, result }));
    }
}
