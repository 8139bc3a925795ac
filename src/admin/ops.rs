//! What the admin API does on the shards. Each function here runs on a shard's thread (inside
//! an [`crate::envelope::AdminTask`]) and returns owned, `Send` results to the admin thread.
//!
//! Requests a user could make (register, send, tokens, group changes) run through the same
//! request handling as a client's, on a session with no connection ([`as_user`]): the same
//! checks, limits, owners and error codes. Node-wide views (online sessions, kicks, broadcasts
//! to everyone) visit every shard of this node.

use std::{rc::Rc, time::Duration};

use bytes::Bytes;

use crate::{
    client::{decode_event, Event},
    envelope::{Envelope, SessionRef},
    frame::{self, AlignedBuf, HEADER_BYTES},
    metrics::{self, Snapshot},
    protocol::{self, kind, ErrorCode},
    session::{requests::Requests, Session},
    shard::Shard,
    store::UserId,
};

/// Run one request (a whole frame, as `frame::encode` makes it) as `user` (0: not logged in)
/// on a session with no connection, and collect the frames it is answered with until `done`
/// says the answer is complete or `answer_timeout_ms` passes.
pub async fn as_user(
    shard: Rc<Shard>,
    user: UserId,
    request: Vec<u8>,
    done: impl Fn(&Event) -> bool,
) -> Result<Vec<Event>, ErrorCode> {
    let limits = &shard.cfg().limits;
    let timeout = Duration::from_millis(limits.answer_timeout_ms);
    let session = Rc::new(Session::new(shard.new_session_ref(), limits));
    session.user.set(user);
    shard.sessions.borrow_mut().insert(session.id.0, session.clone());
    let mut buf = AlignedBuf::new(request.len());
    buf.spare()[..request.len()].copy_from_slice(&request);
    buf.end = request.len();
    let h = frame::Header::read(&request);
    let payload = &buf.filled()[HEADER_BYTES..HEADER_BYTES + h.len as usize];
    Requests { shard: &shard, session: &session }.frame(h.kind, payload).await;
    let deadline = std::time::Instant::now() + timeout;
    let mut events = Vec::new();
    let result = loop {
        let frames: Vec<Bytes> = session.outq.borrow_mut().drain(..).collect();
        session.out_bytes.set(0);
        let mut complete = false;
        let mut broken = false;
        for f in frames {
            match decode(&f) {
                Ok(e) => {
                    complete |= done(&e);
                    events.push(e);
                }
                Err(_) => broken = true,
            }
        }
        if broken {
            break Err(ErrorCode::Internal);
        }
        if complete {
            break Ok(events);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || monoio::time::timeout(left, session.writer.wait()).await.is_err() {
            break Err(ErrorCode::Timeout);
        }
    };
    session.closing.set(true);
    shard.sessions.borrow_mut().remove(&session.id.0);
    result
}

/// Decode a whole queued frame.
fn decode(f: &[u8]) -> Result<Event, ErrorCode> {
    let h = frame::Header::read(f);
    let len = h.len as usize;
    let mut payload = AlignedBuf::new(len.max(8));
    payload.spare()[..len].copy_from_slice(&f[HEADER_BYTES..HEADER_BYTES + len]);
    payload.end = len;
    decode_event(h.kind, payload.filled()).map_err(|_| ErrorCode::Internal)
}

/// The logged-in sessions of this shard: (user, session id), for the online views.
pub fn online(shard: &Shard) -> Vec<(UserId, u64)> {
    shard.sessions.borrow().values().filter_map(|s| s.logged_in().map(|(u, _)| (u, s.id.0))).collect()
}

/// Kick the sessions of `user` on this shard (only `session` if given). Returns how many.
pub fn kick(shard: &Shard, user: UserId, session: Option<u64>) -> usize {
    let hits: Vec<Rc<Session>> = shard
        .sessions
        .borrow()
        .values()
        .filter(|s| s.user() == user && s.logged_in().is_some() && session.is_none_or(|id| s.id.0 == id))
        .cloned()
        .collect();
    for s in &hits {
        s.kick(ErrorCode::KickedByOperator);
    }
    hits.len()
}

/// A `BROADCAST` frame.
pub fn broadcast_frame(group_id: u64, body: Vec<u8>) -> Bytes {
    Bytes::from(frame::encode(
        kind::BROADCAST,
        &protocol::Broadcast { ts_ms: crate::shard::now_ms(), group_id, body },
    ))
}

/// Push `frame` to every logged-in session of this shard. Returns how many.
pub fn broadcast_local(shard: &Shard, frame: &Bytes) -> usize {
    let sessions: Vec<Rc<Session>> =
        shard.sessions.borrow().values().filter(|s| s.logged_in().is_some()).cloned().collect();
    for s in &sessions {
        s.push(frame.clone());
    }
    sessions.len()
}

/// Send `frame` to every live session of `users`, through their user owners (on any node).
pub fn fan_out(shard: &Shard, users: &[UserId], frame: &Bytes) {
    for &user in users {
        let owner = shard.place(|p| p.user(user));
        shard.post(owner, Envelope::Fanout { user, skip: SessionRef::NONE, frame: frame.clone() });
    }
}

/// This shard's figures for `/metrics`.
pub fn snapshot(shard: &Shard) -> Snapshot {
    let mut s = Snapshot { shard: shard.id, ..Default::default() };
    metrics::snapshot_counters(&mut s);
    for session in shard.sessions.borrow().values() {
        let t = usize::from(session.transport.get()) % metrics::TRANSPORTS.len();
        s.connections[t] += 1;
        if session.logged_in().is_some() {
            s.sessions[t] += 1;
        }
    }
    s.deliveries = shard.stats.deliveries.get();
    s.delivery_acks = shard.stats.delivery_acks.get();
    s.mesh_queued = shard.mesh_queued();
    s.overflow = shard.overflow_len();
    s.deferred = shard.deferred_len();
    s
}
