//! The room owner: live rooms (N:N) of this shard's partitions, never stored.
//!
//! A room has a creator, a publish policy ([`room_publish`]), a subscriber cap and its
//! subscribers (sessions on any shard). A publish is stamped here (room, per-room counter, time,
//! publisher) in the frame it arrived in, then sent once to every shard that holds subscribers
//! ([`Envelope::RoomFanout`]); that shard writes the one shared frame to its local subscribers.
//! Nothing is stored or retried. A room without a publish for `room_idle_secs` closes, as does a
//! room its creator deletes; the shards holding subscribers are told ([`Envelope::RoomClosed`]).
//!
//! The owner keeps, per room, its subscribers (session → user, for the "any subscriber may
//! publish" policy) and how many sit on each shard (where to send a publish).

use std::collections::HashMap;

use bytes::BytesMut;

use super::{Effect, Effects, InvariantError};
use crate::{
    config::Limits,
    envelope::{Envelope, RoomOp, RoomRequest, SessionRef},
    placement::{NodeId, Owner, Placement},
    protocol::{kind, room_closed, room_publish, ErrorCode, RoomStamp},
    store::UserId,
};

struct Room {
    creator: UserId,
    publish: u8,
    publishers: Vec<UserId>,
    subscribers_max: u32,
    subscribers: HashMap<SessionRef, UserId>,
    /// Subscribers per shard holding them (a node's shard), in no order.
    per_shard: Vec<(Owner, u32)>,
    /// Messages published so far (the stamp's `seq` of the last one).
    seq: u64,
    /// Creation or last publish (ms): the idle clock.
    active_ms: u64,
}

/// Add `delta` to `owner`'s count of subscribers; a shard left with none is dropped.
fn count(per_shard: &mut Vec<(Owner, u32)>, owner: Owner, delta: i32) {
    match per_shard.iter().position(|&(o, _)| o == owner) {
        Some(i) => {
            let n = per_shard[i].1 as i64 + delta as i64;
            if n <= 0 {
                per_shard.swap_remove(i);
            } else {
                per_shard[i].1 = n as u32;
            }
        }
        None if delta > 0 => per_shard.push((owner, delta as u32)),
        None => {}
    }
}

impl Room {
    fn may_publish(&self, user: UserId, session: SessionRef) -> bool {
        user == self.creator
            || match self.publish {
                room_publish::LISTED => self.publishers.contains(&user),
                room_publish::SUBSCRIBERS => self.subscribers.contains_key(&session),
                _ => false,
            }
    }
}

pub struct RoomOwner {
    me: Owner,
    placement: Placement,
    rooms: HashMap<u64, Room>,
    rooms_max: usize,
    subscribers_max: u32,
    publishers_max: usize,
    idle_ms: u64,
}

impl RoomOwner {
    pub fn new(me: Owner, placement: Placement, l: &Limits) -> RoomOwner {
        RoomOwner {
            me,
            placement,
            rooms: HashMap::new(),
            rooms_max: l.rooms_per_shard_max,
            subscribers_max: l.room_subscribers_max,
            publishers_max: l.room_publishers_max,
            idle_ms: l.room_idle_secs.saturating_mul(1000),
        }
    }

    /// Live rooms held.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Handle a session's request.
    pub fn request(&mut self, req: RoomRequest, now: u64, out: &mut Effects) {
        debug_assert_eq!(self.placement.room(req.room), self.me, "room request on the wrong owner");
        let RoomRequest { origin, user, room, op } = req;
        let to = self.placement.session(origin);
        let reply = |out: &mut Effects, request_kind: u16, result: Result<u32, ErrorCode>| {
            let env = Envelope::RoomReply { session: origin, room, request_kind, result };
            out.push(Effect::Post(to, env));
        };
        match op {
            RoomOp::Create { publish, subscribers_max, publishers } => {
                let result = self.create(room, user, publish, subscribers_max, publishers, now);
                reply(out, kind::ROOM_CREATE, result.map(|()| 0));
            }
            RoomOp::Subscribe => {
                let result = match self.rooms.get_mut(&room) {
                    None => Err(ErrorCode::RoomNotFound),
                    Some(r) if r.subscribers.contains_key(&origin) => Ok(r.subscribers.len() as u32),
                    Some(r) if r.subscribers.len() >= r.subscribers_max as usize => Err(ErrorCode::RoomFull),
                    Some(r) => {
                        r.subscribers.insert(origin, user);
                        count(&mut r.per_shard, origin.owner(), 1);
                        Ok(r.subscribers.len() as u32)
                    }
                };
                reply(out, kind::ROOM_SUBSCRIBE, result);
            }
            RoomOp::Unsubscribe { reply: wanted } => {
                let result = match self.rooms.get_mut(&room) {
                    None => Err(ErrorCode::RoomNotFound),
                    Some(r) => {
                        if r.subscribers.remove(&origin).is_some() {
                            count(&mut r.per_shard, origin.owner(), -1);
                        }
                        Ok(r.subscribers.len() as u32)
                    }
                };
                if wanted {
                    reply(out, kind::ROOM_UNSUBSCRIBE, result);
                }
            }
            RoomOp::Publish { client_msg_id, frame } => {
                if let Err(code) = self.publish(room, user, origin, frame, now, out) {
                    // A refused publish answers with its client message id in place of a count.
                    let env = Envelope::RoomReply {
                        session: origin,
                        room: client_msg_id,
                        request_kind: kind::ROOM_PUBLISH,
                        result: Err(code),
                    };
                    out.push(Effect::Post(to, env));
                }
            }
            RoomOp::Delete => {
                let result = match self.rooms.get(&room) {
                    None => Err(ErrorCode::RoomNotFound),
                    Some(r) if r.creator != user => Err(ErrorCode::NotRoomOwner),
                    Some(_) => {
                        self.close(room, room_closed::DELETED, out);
                        Ok(0)
                    }
                };
                reply(out, kind::ROOM_DELETE, result);
            }
        }
    }

    fn create(
        &mut self,
        room: u64,
        creator: UserId,
        publish: u8,
        subscribers_max: u32,
        publishers: Vec<UserId>,
        now: u64,
    ) -> Result<(), ErrorCode> {
        if publish > room_publish::SUBSCRIBERS || publishers.len() > self.publishers_max {
            return Err(ErrorCode::InvalidRoom);
        }
        if self.rooms.len() >= self.rooms_max {
            return Err(ErrorCode::TooManyRooms);
        }
        if room == 0 || self.rooms.contains_key(&room) {
            // Room ids are drawn at random by the session's shard: a clash is a retry.
            return Err(ErrorCode::Busy);
        }
        let cap = if subscribers_max == 0 {
            self.subscribers_max
        } else {
            subscribers_max.min(self.subscribers_max)
        };
        self.rooms.insert(
            room,
            Room {
                creator,
                publish,
                publishers,
                subscribers_max: cap,
                subscribers: HashMap::new(),
                per_shard: Vec::new(),
                seq: 0,
                active_ms: now,
            },
        );
        Ok(())
    }

    fn publish(
        &mut self,
        room: u64,
        user: UserId,
        origin: SessionRef,
        mut frame: BytesMut,
        now: u64,
        out: &mut Effects,
    ) -> Result<(), ErrorCode> {
        let r = self.rooms.get_mut(&room).ok_or(ErrorCode::RoomNotFound)?;
        if !r.may_publish(user, origin) {
            return Err(ErrorCode::NotPublisher);
        }
        r.seq += 1;
        r.active_ms = now;
        let stamp = RoomStamp { room_id: room, seq: r.seq, ts_ms: now, from: user };
        stamp.write(&mut frame[crate::frame::HEADER_BYTES..]);
        let frame = frame.freeze();
        for &(shard, _) in &r.per_shard {
            let env = Envelope::RoomFanout { room, skip: origin, frame: frame.clone() };
            out.push(Effect::Post(shard, env));
        }
        Ok(())
    }

    fn close(&mut self, room: u64, reason: u16, out: &mut Effects) {
        if let Some(r) = self.rooms.remove(&room) {
            for &(shard, _) in &r.per_shard {
                out.push(Effect::Post(shard, Envelope::RoomClosed { room, reason }));
            }
        }
    }

    /// The cluster's members changed: place by `placement` from now on. Rooms are never
    /// stored: a room whose partition moved to another owner is dropped here without a word
    /// (every shard holding its subscribers closes it for them, see `Shard::apply_table`), and
    /// subscribers on nodes no longer live are forgotten.
    pub fn set_placement(&mut self, placement: Placement, node_live: impl Fn(NodeId) -> bool) {
        self.placement = placement;
        let (p, me) = (&self.placement, self.me);
        self.rooms.retain(|&id, _| p.room(id) == me);
        for r in self.rooms.values_mut() {
            r.subscribers.retain(|s, _| node_live(s.node()));
            r.per_shard.retain(|(o, _)| node_live(o.node));
        }
    }

    /// Close the rooms nothing was published to for `room_idle_secs`.
    pub fn expire(&mut self, now: u64, out: &mut Effects) {
        let mut idle: Vec<u64> = self
            .rooms
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.active_ms) >= self.idle_ms)
            .map(|(&id, _)| id)
            .collect();
        // In id order, not the map's (random) order: a seed of the simulation replays exactly.
        idle.sort_unstable();
        for room in idle {
            self.close(room, room_closed::EXPIRED, out);
        }
    }

    /// Every (room, subscribed session) held.
    pub fn subscriptions(&self) -> impl Iterator<Item = (u64, SessionRef)> + '_ {
        self.rooms.iter().flat_map(|(&id, r)| r.subscribers.keys().map(move |&s| (id, s)))
    }

    /// Every room's per-shard counts add up to its subscribers.
    pub fn check(&self) -> Result<(), InvariantError> {
        for (&id, r) in &self.rooms {
            let counted: u32 = r.per_shard.iter().map(|&(_, n)| n).sum();
            if counted as usize != r.subscribers.len() || r.subscribers.len() > r.subscribers_max as usize {
                return Err(InvariantError {
                    key: id,
                    what: format!("room holds {} subscribers, counts {counted}", r.subscribers.len()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(shards: usize) -> (RoomOwner, u64) {
        let p = Placement::new(shards);
        let room = (1..).find(|&r| p.room(r).shard == 0).unwrap();
        (RoomOwner::new(Owner::new(0, 0), p, &Limits::default()), room)
    }

    fn req(origin: SessionRef, user: UserId, room: u64, op: RoomOp) -> RoomRequest {
        RoomRequest { origin, user, room, op }
    }

    fn replies(out: &Effects) -> Vec<(u16, Result<u32, ErrorCode>)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Post(_, Envelope::RoomReply { request_kind, result, .. }) => {
                    Some((*request_kind, *result))
                }
                _ => None,
            })
            .collect()
    }

    fn blank(body: &[u8]) -> BytesMut {
        RoomRequest::blank_room_msg(body)
    }

    /// A publish goes once to each shard holding subscribers; policies are enforced; a delete
    /// tells those shards and only the creator may delete.
    #[test]
    fn fanout_per_shard_and_policies() {
        let (mut o, room) = owner(3);
        let mut out = Effects::new();
        let creator = SessionRef::new(0, 1);
        o.request(
            req(
                creator,
                7,
                room,
                RoomOp::Create { publish: room_publish::OWNER, subscribers_max: 3, publishers: vec![] },
            ),
            1000,
            &mut out,
        );
        assert_eq!(replies(&out), [(kind::ROOM_CREATE, Ok(0))]);
        out.clear();
        for (shard, local) in [(1, 1), (1, 2), (2, 1)] {
            o.request(req(SessionRef::new(shard, local), 8, room, RoomOp::Subscribe), 1000, &mut out);
        }
        o.request(req(SessionRef::new(0, 9), 9, room, RoomOp::Subscribe), 1000, &mut out);
        let got: Vec<_> = replies(&out).into_iter().map(|(_, r)| r).collect();
        assert_eq!(got, [Ok(1), Ok(2), Ok(3), Err(ErrorCode::RoomFull)]);
        out.clear();
        // A subscriber may not publish in an owner-only room; the creator may.
        o.request(
            req(SessionRef::new(1, 1), 8, room, RoomOp::Publish { client_msg_id: 5, frame: blank(b"x") }),
            1000,
            &mut out,
        );
        assert_eq!(replies(&out), [(kind::ROOM_PUBLISH, Err(ErrorCode::NotPublisher))]);
        out.clear();
        o.request(
            req(creator, 7, room, RoomOp::Publish { client_msg_id: 6, frame: blank(b"x") }),
            1000,
            &mut out,
        );
        let mut shards: Vec<usize> = out
            .iter()
            .map(|e| match e {
                Effect::Post(s, Envelope::RoomFanout { .. }) => s.shard(),
                _ => panic!("only fan-outs"),
            })
            .collect();
        shards.sort_unstable();
        assert_eq!(shards, [1, 2], "one envelope per shard with subscribers");
        out.clear();
        o.request(req(SessionRef::new(1, 1), 8, room, RoomOp::Delete), 1000, &mut out);
        assert_eq!(replies(&out), [(kind::ROOM_DELETE, Err(ErrorCode::NotRoomOwner))]);
        out.clear();
        o.check().unwrap();
        o.request(req(creator, 7, room, RoomOp::Delete), 1000, &mut out);
        let closed = out.iter().filter(|e| matches!(e, Effect::Post(_, Envelope::RoomClosed { .. }))).count();
        assert_eq!(closed, 2);
        assert!(o.is_empty());
    }

    /// A room nobody publishes to expires; publishing keeps it alive.
    #[test]
    fn idle_rooms_expire() {
        let (mut o, room) = owner(1);
        let mut out = Effects::new();
        let s = SessionRef::new(0, 1);
        o.request(
            req(
                s,
                7,
                room,
                RoomOp::Create { publish: room_publish::SUBSCRIBERS, subscribers_max: 0, publishers: vec![] },
            ),
            0,
            &mut out,
        );
        o.request(req(s, 7, room, RoomOp::Subscribe), 0, &mut out);
        let idle = Limits::default().room_idle_secs * 1000;
        o.request(
            req(s, 7, room, RoomOp::Publish { client_msg_id: 1, frame: blank(b"x") }),
            idle - 1,
            &mut out,
        );
        out.clear();
        o.expire(idle + 10, &mut out);
        assert_eq!(o.len(), 1, "published within the window");
        o.expire(2 * idle, &mut out);
        assert!(o.is_empty());
        assert!(matches!(
            out[..],
            [Effect::Post(
                Owner { node: 0, shard: 0 },
                Envelope::RoomClosed { reason: room_closed::EXPIRED, .. }
            )]
        ));
    }
}
