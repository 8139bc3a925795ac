//! The requests of a session: every frame kind a client may send, decoded in place and
//! answered. Requests that wait (password checks and store reads on a worker, answers from
//! another shard) are boxed futures: they are rare, and inline they would make every idle
//! connection's task as large as the largest of them.
//!
//! Key types: [`Requests`] (one session's request handler, fed whole frames by a transport).

use std::{rc::Rc, time::Instant};

use bytes::Bytes;

use super::{error_frame, Flow, Large, Reply, Reservation, Session, Upload};
use crate::{
    auth,
    envelope::{
        Attach, Envelope, GroupOp, GroupRequest, PresenceMsg, PresenceOp, RoomOp, RoomRequest, Submit,
    },
    frame,
    guard::Action,
    placement::direct_key,
    protocol::{
        self, conv, domain_of, group_action, in_domain, is_group_id, kind, send_flags, DeviceType, ErrorCode,
        GroupProfile, Stamp,
    },
    shard::{now_ms, Shard},
    store::{device_hash, group_conv, recalled_seq, Cursor, PageLimit, StoreError, UserId},
};

/// What a `Send`'s handling needs of it once checked (the archive's borrow ends there).
struct SendHead {
    conv: u8,
    to: u64,
    client_msg_id: u64,
}

impl SendHead {
    fn of(m: &protocol::ArchivedSend) -> SendHead {
        SendHead { conv: m.conv, to: m.to.to_native(), client_msg_id: m.client_msg_id.to_native() }
    }
}

/// Bytes a `Send` archive may carry besides its body (its root struct and alignment padding).
pub const SEND_OVERHEAD_BYTES_MAX: usize = 64;

/// Marks a login in progress for as long as it lives: a login the server has read is answered,
/// even if the login window closes while its password is being checked.
struct LoginPending<'a>(&'a Session);

impl<'a> LoginPending<'a> {
    fn new(s: &'a Session) -> Self {
        s.login_pending.set(true);
        LoginPending(s)
    }
}

impl Drop for LoginPending<'_> {
    fn drop(&mut self) {
        self.0.login_pending.set(false);
    }
}

/// One session's request handler.
pub struct Requests<'a> {
    pub shard: &'a Rc<Shard>,
    pub session: &'a Rc<Session>,
}

impl Requests<'_> {
    fn error(&self, code: ErrorCode, request_kind: u16) -> Flow {
        self.session.push(error_frame(code, request_kind, 0));
        Flow::Continue
    }

    fn reply<T>(&self, k: u16, value: &T) -> Flow
    where
        T: rkyv::Archive
            + for<'b> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    Vec<u8>,
                    rkyv::ser::allocator::ArenaHandle<'b>,
                    rkyv::rancor::Error,
                >,
            >,
    {
        self.session.push(Bytes::from(frame::encode(k, value)));
        Flow::Continue
    }

    /// Handle one whole frame of kind `k` whose size the transport has checked. `payload` is
    /// the archive, read in place. Operations that wait (on a worker or another shard) are
    /// boxed: they are rare, and inline they would make every idle connection's task as large as
    /// the largest of them.
    pub async fn frame(&mut self, k: u16, payload: &[u8]) -> Flow {
        if k == kind::SEND && !self.inflight_room().await {
            return Flow::Close;
        }
        let logged_in = self.session.user() != 0;
        if !logged_in
            && !matches!(k, kind::REGISTER | kind::LOGIN | kind::LOGIN_TOKEN | kind::PING | kind::LOGOUT)
        {
            return if kind::name(k) == "unknown" || k >= 100 {
                self.error(ErrorCode::UnknownKind, k)
            } else {
                self.error(ErrorCode::NotLoggedIn, k)
            };
        }
        macro_rules! access {
            ($t:ty) => {
                match frame::access::<$t>(payload) {
                    Ok(a) => a,
                    Err(e) => {
                        log::debug!("session {:?}: malformed {}: {e}", self.session.id, kind::name(k));
                        return self.error(ErrorCode::Malformed, k);
                    }
                }
            };
        }
        match k {
            kind::SEND => {
                let m = access!(protocol::ArchivedSend);
                self.send(payload, m, false)
            }
            kind::STREAM => {
                let m = access!(protocol::ArchivedSend);
                self.send(payload, m, true)
            }
            kind::PART => self.part(payload).await,
            kind::DELIVERY_ACK => {
                let a = access!(protocol::ArchivedDeliveryAck);
                // Stores keep sequence numbers as signed 64-bit integers.
                let (peer, seq) = (a.peer.to_native(), a.seq.to_native().min(i64::MAX as u64));
                let user = self.session.user();
                let conv = match a.conv {
                    conv::DIRECT if peer != 0 && !is_group_id(peer) => direct_key(user, peer),
                    conv::GROUP if is_group_id(peer) => group_conv(peer),
                    _ => return self.error(ErrorCode::InvalidConversation, k),
                };
                self.shard.stats.delivery_acks.set(self.shard.stats.delivery_acks.get() + 1);
                let device = self.session.device.get();
                self.shard.note_cursor(Cursor { user, device, conv, seq });
                Flow::Continue
            }
            kind::HISTORY => {
                let h = access!(protocol::ArchivedHistory);
                let (peer, anchor, dir, limit) = (
                    h.peer.to_native(),
                    h.anchor_seq.to_native().min(i64::MAX as u64),
                    h.direction,
                    h.limit.to_native(),
                );
                let ok = match h.conv {
                    conv::DIRECT => peer != 0 && !is_group_id(peer),
                    conv::GROUP => is_group_id(peer),
                    _ => false,
                };
                if !ok || dir > 1 {
                    return self.error(ErrorCode::InvalidConversation, k);
                }
                Box::pin(self.history(h.conv, peer, anchor, dir == 0, limit)).await
            }
            kind::PING => {
                let p = access!(protocol::ArchivedPing);
                self.reply(
                    kind::PONG,
                    &protocol::Pong { nonce: p.nonce.to_native(), server_time_ms: now_ms() },
                )
            }
            kind::REGISTER => {
                let r = access!(protocol::ArchivedRegister);
                let (name, password) = (r.name.as_str().to_owned(), r.password.as_str().to_owned());
                Box::pin(self.register(name, password)).await
            }
            kind::LOGIN => {
                let l = access!(protocol::ArchivedLogin);
                let (name, password) = (l.name.as_str().to_owned(), l.password.as_str().to_owned());
                let device = (l.device_type, l.device_id.as_str().to_owned());
                Box::pin(self.login(name, password, device)).await
            }
            kind::LOGIN_TOKEN => {
                let l = access!(protocol::ArchivedLoginToken);
                let token = auth::parse_token(l.token.as_str());
                let device = (l.device_type, l.device_id.as_str().to_owned());
                Box::pin(self.login_token(token, device)).await
            }
            kind::ISSUE_TOKEN => {
                let t = access!(protocol::ArchivedIssueToken);
                let ttl = t.ttl_secs.to_native();
                Box::pin(self.issue_token(ttl)).await
            }
            kind::ROOM_CREATE => {
                let c = access!(protocol::ArchivedRoomCreate);
                let publishers: Vec<UserId> = c.publishers.iter().map(|p| p.to_native()).collect();
                if publishers.len() > self.shard.cfg().limits.room_publishers_max {
                    return self.error(ErrorCode::InvalidRoom, k);
                }
                let room = in_domain(self.shard.new_room_id(), domain_of(self.session.user()));
                let op = RoomOp::Create {
                    publish: c.publish,
                    subscribers_max: c.subscribers_max.to_native(),
                    publishers,
                };
                self.to_room(room, op)
            }
            kind::ROOM_SUBSCRIBE => {
                let r = access!(protocol::ArchivedRoomRef);
                if self.session.room_count() >= self.shard.cfg().limits.room_subscriptions_per_session_max {
                    self.session.push(error_frame(ErrorCode::TooManyRooms, k, r.room_id.to_native()));
                    return Flow::Continue;
                }
                self.to_room(r.room_id.to_native(), RoomOp::Subscribe)
            }
            kind::ROOM_UNSUBSCRIBE => {
                let room = access!(protocol::ArchivedRoomRef).room_id.to_native();
                // Local delivery stops at once; the owner's answer confirms.
                if self.session.left_room(room) {
                    self.shard.forget_room_subscriber(self.session.id, room);
                }
                self.to_room(room, RoomOp::Unsubscribe { reply: true })
            }
            kind::ROOM_DELETE => {
                let room = access!(protocol::ArchivedRoomRef).room_id.to_native();
                self.to_room(room, RoomOp::Delete)
            }
            kind::ROOM_PUBLISH => {
                let m = access!(protocol::ArchivedRoomPublish);
                let client_msg_id = m.client_msg_id.to_native();
                // Forwarded verbatim, as a Send is: nothing but the body and the archive's own bytes.
                if m.body.len() > self.shard.cfg().limits.body_bytes_max
                    || payload.len() > m.body.len() + SEND_OVERHEAD_BYTES_MAX
                {
                    self.session.push(error_frame(ErrorCode::BodyTooLarge, k, client_msg_id));
                    return Flow::Continue;
                }
                let frame = RoomRequest::blank_room_msg(payload);
                self.to_room(m.room_id.to_native(), RoomOp::Publish { client_msg_id, frame })
            }
            kind::GROUP_CREATE => {
                let c = access!(protocol::ArchivedGroupCreate);
                let Ok(profile) = rkyv::deserialize::<GroupProfile, rkyv::rancor::Error>(&c.profile) else {
                    return self.error(ErrorCode::Malformed, k);
                };
                // A new id, drawn at random in the group range.
                let group = in_domain(
                    protocol::GROUP_ID_MIN | (self.shard.new_room_id() & (protocol::GROUP_ID_MIN - 1)),
                    domain_of(self.session.user()),
                );
                Box::pin(self.group_change(group, GroupOp::Create(profile), self.session.user())).await
            }
            kind::GROUP_UPDATE => {
                let u = access!(protocol::ArchivedGroupUpdate);
                let Ok(profile) = rkyv::deserialize::<GroupProfile, rkyv::rancor::Error>(&u.profile) else {
                    return self.error(ErrorCode::Malformed, k);
                };
                Box::pin(self.group_call(u.group_id.to_native(), GroupOp::Update(profile))).await
            }
            kind::GROUP_ACTION => {
                let a = access!(protocol::ArchivedGroupAction);
                let (group, action, target) = (a.group_id.to_native(), a.action, a.user_id.to_native());
                let op = GroupOp::Action {
                    action,
                    target,
                    until_ms: a.until_ms.to_native(),
                    note: a.note.as_str().to_owned(),
                };
                // Who would be in one more group: the caller (join) or the target (invite,
                // approve); the others cannot add anyone.
                let joiner = match action {
                    group_action::JOIN => self.session.user(),
                    group_action::INVITE | group_action::APPROVE => target,
                    _ => 0,
                };
                if joiner != 0 {
                    Box::pin(self.group_change(group, op, joiner)).await
                } else {
                    Box::pin(self.group_call(group, op)).await
                }
            }
            kind::GROUP_ADD_MEMBERS => {
                let a = access!(protocol::ArchivedGroupAddMembers);
                let users: Vec<UserId> = a.user_ids.iter().map(|u| u.to_native()).collect();
                if users.is_empty() || users.len() > self.shard.cfg().limits.group_add_batch_max {
                    return self.error(ErrorCode::InvalidGroup, k);
                }
                Box::pin(self.group_add(a.group_id.to_native(), users)).await
            }
            kind::GROUP_GET => {
                let r = access!(protocol::ArchivedGroupRef);
                Box::pin(self.group_call(r.group_id.to_native(), GroupOp::Get)).await
            }
            kind::GROUP_REQUESTS => {
                let r = access!(protocol::ArchivedGroupRef);
                Box::pin(self.group_call(r.group_id.to_native(), GroupOp::Requests)).await
            }
            kind::GROUP_MEMBERS => {
                let m = access!(protocol::ArchivedGroupMembers);
                let op = GroupOp::Members { after: m.after_user.to_native(), limit: m.limit.to_native() };
                Box::pin(self.group_call(m.group_id.to_native(), op)).await
            }
            kind::MY_GROUPS => {
                let m = access!(protocol::ArchivedMyGroups);
                let (after, limit) = (m.after_group.to_native(), m.limit.to_native());
                Box::pin(self.my_groups(after, limit)).await
            }
            kind::PROFILE_UPDATE => {
                let u = access!(protocol::ArchivedProfileUpdate);
                let Ok(profile) = rkyv::deserialize::<protocol::UserProfile, rkyv::rancor::Error>(&u.profile)
                else {
                    return self.error(ErrorCode::Malformed, k);
                };
                Box::pin(self.profile_update(profile)).await
            }
            kind::PROFILE_GET => {
                let g = access!(protocol::ArchivedProfileGet);
                let ids: Vec<u64> = g.user_ids.iter().map(|u| u.to_native()).collect();
                Box::pin(self.profile_get(ids)).await
            }
            kind::TYPING => {
                let t = access!(protocol::ArchivedTyping);
                let (to, conv_kind, state) = (t.to.to_native(), t.conv, t.state);
                self.typing(to, conv_kind, state)
            }
            kind::READ => {
                let r = access!(protocol::ArchivedRead);
                let (conv_kind, peer, seq) = (r.conv, r.peer.to_native(), r.seq.to_native());
                self.read(conv_kind, peer, seq)
            }
            kind::READ_GET => {
                let r = access!(protocol::ArchivedReadGet);
                let (conv_kind, peer, seq) = (r.conv, r.peer.to_native(), r.seq.to_native());
                Box::pin(self.read_get(conv_kind, peer, seq)).await
            }
            kind::PRESENCE_SET => {
                let p = access!(protocol::ArchivedPresenceSet);
                let (state, text, extra) =
                    (p.state, p.text.as_str().to_string(), p.extra.as_slice().to_vec());
                Box::pin(self.presence_set(state, text, extra)).await
            }
            kind::PRESENCE_GET => {
                let g = access!(protocol::ArchivedPresenceGet);
                let ids: Vec<u64> = g.user_ids.iter().map(|u| u.to_native()).collect();
                Box::pin(self.presence_get(ids)).await
            }
            kind::ROSTER_ACTION => {
                let r = access!(protocol::ArchivedRosterAction);
                let (action, user, note) = (r.action, r.user.to_native(), r.note.as_str().to_string());
                Box::pin(self.roster_action(action, user, note)).await
            }
            kind::ROSTER_GET => {
                let r = access!(protocol::ArchivedRosterGet);
                let (list, after, limit) = (r.list, r.after.to_native(), r.limit.to_native());
                Box::pin(self.roster_get(list, after, limit)).await
            }
            kind::MY_SESSIONS => {
                let _ = access!(protocol::ArchivedMySessions);
                self.sessions_call(0).await
            }
            kind::SESSION_LOGOUT => {
                let l = access!(protocol::ArchivedSessionLogout);
                match l.session_id.to_native() {
                    0 => self.error(ErrorCode::UnknownSession, k),
                    id => self.sessions_call(id).await,
                }
            }
            kind::LOGOUT => {
                let _ = access!(protocol::ArchivedLogout);
                self.session.push(Bytes::from(frame::encode(kind::BYE, &protocol::Bye { reserved: 0 })));
                Flow::Close
            }
            _ => self.error(ErrorCode::UnknownKind, k),
        }
    }

    /// Hand a room request to the room's owner; its answer comes back as `RoomReply`.
    fn to_room(&self, room: u64, op: RoomOp) -> Flow {
        if self.foreign(room) {
            // A refused publish carries its client message id in place of the room.
            let id = match &op {
                RoomOp::Publish { client_msg_id, .. } => *client_msg_id,
                _ => room,
            };
            self.session.push(error_frame(ErrorCode::RoomNotFound, op.request_kind(), id));
            return Flow::Continue;
        }
        if !matches!(op, RoomOp::Publish { .. }) {
            let n = self.session.room_requests.get();
            if n >= super::ROOM_REQUESTS_INFLIGHT_MAX {
                self.session.push(error_frame(ErrorCode::Busy, op.request_kind(), room));
                return Flow::Continue;
            }
            self.session.room_requests.set(n + 1);
        }
        let req = RoomRequest { origin: self.session.id, user: self.session.user(), room, op };
        self.shard.post(self.shard.place(|p| p.room(room)), Envelope::Room(Box::new(req)));
        Flow::Continue
    }

    /// Whether `id` (a user, group or room) is in another tenant domain than this session's
    /// user (8.17): to this session it does not exist.
    fn foreign(&self, id: u64) -> bool {
        domain_of(id) != domain_of(self.session.user())
    }

    /// Wait while the session is at its in-flight limit (the transport reads nothing more
    /// meanwhile); false if the session closed.
    async fn inflight_room(&self) -> bool {
        while self.session.inflight.get() >= self.session.inflight_max {
            self.session.reader.wait().await;
            if self.session.closing.get() {
                return false;
            }
        }
        true
    }

    /// A `Send` (`stream` false: sequenced, stored, acknowledged) or a `Stream` (`stream`
    /// true: to live sessions only, after the stored messages before it; no ack, no in-flight).
    fn send(&self, payload: &[u8], m: &protocol::ArchivedSend, stream: bool) -> Flow {
        crate::metrics::count_send();
        let head = SendHead::of(m);
        let request_kind = if stream { kind::STREAM } else { kind::SEND };
        if let Err(code) =
            self.check_send(&head, m, payload.len(), stream, self.shard.cfg().limits.body_bytes_max)
        {
            self.session.push(error_frame(code, request_kind, head.client_msg_id));
            return Flow::Continue;
        }
        // Copied once into the Deliver frame; after this no byte of the body is touched again.
        let f = Submit::blank_frame(if stream { kind::STREAM_MSG } else { kind::DELIVER }, payload);
        self.submit(&head, f, stream);
        Flow::Continue
    }

    /// The checks every `Send` (and `Stream`) passes before it goes to its owner.
    fn check_send(
        &self,
        h: &SendHead,
        m: &protocol::ArchivedSend,
        payload_len: usize,
        stream: bool,
        body_max: usize,
    ) -> Result<(), ErrorCode> {
        match h.conv {
            conv::DIRECT if h.to == 0 || is_group_id(h.to) || self.foreign(h.to) => {
                return Err(ErrorCode::UnknownRecipient)
            }
            conv::DIRECT => {}
            conv::GROUP if !is_group_id(h.to) || self.foreign(h.to) => return Err(ErrorCode::GroupNotFound),
            conv::GROUP => {}
            _ => return Err(ErrorCode::InvalidConversation),
        }
        // The payload is forwarded verbatim, so it may hold nothing but the body and the archive's
        // own few bytes: bytes the archive does not reference would travel to every recipient.
        if m.body.len() > body_max || payload_len > m.body.len() + SEND_OVERHEAD_BYTES_MAX {
            return Err(ErrorCode::BodyTooLarge);
        }
        match (m.flags, stream) {
            (0, _) if m.burn_secs == 0 => Ok(()),
            // The body names the message to take back: its seq, 8 bytes little-endian (the
            // conversation's owner reads it again from the frame).
            (send_flags::RECALL, false) if m.burn_secs == 0 && recalled_seq(&m.body).is_some() => Ok(()),
            (send_flags::BURN_AFTER_READ, false) if m.conv == conv::DIRECT => Ok(()),
            (send_flags::BURN_AFTER_READ, false) => Err(ErrorCode::BurnNotAllowed),
            _ => Err(ErrorCode::Malformed),
        }
    }

    /// Hand a checked send, already in its Deliver frame `f`, to its conversation's owner.
    fn submit(&self, h: &SendHead, f: bytes::BytesMut, stream: bool) {
        let sender = self.session.user();
        let sub = Submit {
            origin: self.session.id,
            sender,
            to: h.to,
            conv: h.conv,
            client_msg_id: h.client_msg_id,
            sender_device: self.session.device.get(),
            stream,
            frame: f,
            change: None,
            refuse_new: None,
            by_manager: false,
        };
        let dst = if h.conv == conv::GROUP {
            self.shard.place(|p| p.group(h.to))
        } else {
            self.shard.place(|p| p.conv(direct_key(sender, h.to)))
        };
        if !stream {
            self.session.send_started(h.client_msg_id, dst.node);
        }
        self.shard.post(dst, Envelope::Submit(Box::new(sub)));
    }

    /// A part of a large `Send` (5.22): assembled in place as the Deliver frame it becomes, then
    /// checked and sent like any `Send` once its last part is in.
    async fn part(&self, payload: &[u8]) -> Flow {
        let Some((h, data)) = protocol::part::PartHeader::read(payload) else {
            return self.error(ErrorCode::Malformed, kind::PART);
        };
        let mut u = match self.add_part(&h, data) {
            Ok(Some(u)) => u,
            Ok(None) => return Flow::Continue,
            Err(code) => return self.error_for(code, kind::PART, h.id),
        };
        let l = &self.shard.cfg().limits;
        let total = u.total;
        u.frame.resize(frame::frame_bytes(Stamp::BYTES + total), 0);
        let start = frame::HEADER_BYTES + Stamp::BYTES;
        let checked = {
            let payload = &u.frame[start..start + total];
            // The frame's buffer comes from the allocator, 16-aligned in practice; a payload that
            // is not 8-aligned is validated from an aligned copy.
            let copy;
            let aligned = if (payload.as_ptr() as usize).is_multiple_of(8) {
                payload
            } else {
                copy = frame::AlignedBuf::copy_of(payload);
                copy.filled()
            };
            match frame::access::<protocol::ArchivedSend>(aligned) {
                Err(_) => Err(ErrorCode::Malformed),
                Ok(m) if m.client_msg_id != h.id => Err(ErrorCode::Malformed),
                Ok(m) => {
                    let head = SendHead::of(m);
                    self.check_send(&head, m, total, false, l.large_body_bytes_max).map(|()| head)
                }
            }
        };
        let head = match checked {
            Ok(head) => head,
            Err(code) => {
                crate::metrics::count_send();
                return self.error_for(code, kind::SEND, h.id);
            }
        };
        if !self.inflight_room().await {
            return Flow::Close;
        }
        crate::metrics::count_send();
        *self.session.large.borrow_mut() = Some(Large::InFlight { id: h.id, _reserved: u._reserved });
        self.submit(&head, u.frame, false);
        Flow::Continue
    }

    /// Add a part to this session's upload (starting one at offset 0); the whole upload once its
    /// last part is in.
    fn add_part(&self, h: &protocol::part::PartHeader, data: &[u8]) -> Result<Option<Upload>, ErrorCode> {
        let l = &self.shard.cfg().limits;
        let total = h.total as usize;
        let mut large = self.session.large.borrow_mut();
        if h.offset == 0 {
            if large.is_some() {
                return Err(ErrorCode::UploadInProgress);
            }
            if h.kind != kind::SEND || data.len() > total || data.is_empty() {
                return Err(ErrorCode::Malformed);
            }
            if total > l.large_body_bytes_max + SEND_OVERHEAD_BYTES_MAX {
                return Err(ErrorCode::BodyTooLarge);
            }
            let reserved = Reservation::take(&self.shard.large_bytes, total, l.large_shard_bytes_max)
                .ok_or(ErrorCode::Busy)?;
            let frame = Submit::frame_head(kind::DELIVER, total);
            let upload = Upload {
                id: h.id,
                total,
                received: 0,
                frame,
                last_part: Instant::now(),
                _reserved: reserved,
            };
            *large = Some(Large::Uploading(upload));
        }
        let Some(Large::Uploading(u)) = large.as_mut() else {
            return Err(ErrorCode::Malformed);
        };
        if u.id != h.id {
            // A stray part: the upload in progress stays.
            return Err(ErrorCode::Malformed);
        }
        if h.kind != kind::SEND
            || total != u.total
            || h.offset as usize != u.received
            || data.is_empty()
            || u.received + data.len() > total
        {
            *large = None;
            return Err(ErrorCode::Malformed);
        }
        u.frame.extend_from_slice(data);
        u.received += data.len();
        u.last_part = Instant::now();
        if u.received < total {
            return Ok(None);
        }
        match large.take() {
            Some(Large::Uploading(u)) => Ok(Some(u)),
            _ => unreachable!("uploading"),
        }
    }

    fn error_for(&self, code: ErrorCode, request_kind: u16, client_msg_id: u64) -> Flow {
        self.session.push(error_frame(code, request_kind, client_msg_id));
        Flow::Continue
    }

    async fn register(&self, name: String, password: String) -> Flow {
        if self.session.user() != 0 {
            return self.error(ErrorCode::AlreadyLoggedIn, kind::REGISTER);
        }
        if let Err(code) = auth::check_name(&name).and(auth::check_password(&password)) {
            return self.error(code, kind::REGISTER);
        }
        // NAME@DOMAIN of a configured domain: an account of that tenant (8.17).
        let domain = self.shard.cfg().domain_of_name(&name);
        if domain != 0 && auth::check_name(name.rsplit_once('@').map_or("", |(local, _)| local)).is_err() {
            return self.error(ErrorCode::InvalidName, kind::REGISTER);
        }
        // Each registration costs a password hash and a store write: bounded per connection
        // and per source address.
        let n = self.session.registrations.get() + 1;
        self.session.registrations.set(n);
        if n > self.shard.cfg().limits.registrations_per_connection_max
            || !self.shard.guard(self.session.peer.get(), Action::Register)
        {
            return self.error(ErrorCode::RateLimited, kind::REGISTER);
        }
        // Hash on the hashing pool, then write on the store pool: neither waits behind the
        // other kind of job.
        let workers = &self.shard.shared.workers;
        let shared = self.shard.shared.clone();
        let hashed = workers.hash.run(move || {
            let hash = shared.auth.hash_password(&password)?;
            Ok::<_, ErrorCode>((shared.auth.name_key(&name), hash))
        });
        let (key, hash) = match hashed.await {
            Ok(Ok(hashed)) => hashed,
            Ok(Err(code)) => return self.error(code, kind::REGISTER),
            Err(e) => return self.error(e.code_or(ErrorCode::Internal), kind::REGISTER),
        };
        let store = self.shard.shared.store.clone();
        let created = workers.store.run(move || {
            store.create_account_in(&key, hash, domain).map_err(|e| match e {
                StoreError::NameTaken => ErrorCode::NameTaken,
                StoreError::Unavailable(m) => {
                    log::warn!("store: {m}");
                    ErrorCode::StoreUnavailable
                }
            })
        });
        match created.await {
            Ok(Ok(user_id)) => self.reply(kind::REGISTER_OK, &protocol::RegisterOk { user_id }),
            Ok(Err(code)) => self.error(code, kind::REGISTER),
            Err(e) => self.error(e.code_or(ErrorCode::Internal), kind::REGISTER),
        }
    }

    fn check_device(&self, device: &(u8, String), k: u16) -> Result<DeviceType, Flow> {
        if self.session.user() != 0 {
            return Err(self.error(ErrorCode::AlreadyLoggedIn, k));
        }
        match DeviceType::from_u8(device.0) {
            Some(t) if device.1.len() <= auth::DEVICE_ID_BYTES_MAX => Ok(t),
            _ => Err(self.error(ErrorCode::InvalidDevice, k)),
        }
    }

    async fn login(&mut self, name: String, password: String, device: (u8, String)) -> Flow {
        let _pending = LoginPending::new(self.session);
        let device_type = match self.check_device(&device, kind::LOGIN) {
            Ok(t) => t,
            Err(flow) => return flow,
        };
        if let Err(code) = auth::check_name(&name) {
            return self.error(code, kind::LOGIN);
        }
        // Read the account on the store pool, then check the password on the hashing pool.
        let workers = &self.shard.shared.workers;
        let shared = self.shard.shared.clone();
        let found =
            workers.store.run(move || match shared.store.account_by_name(&shared.auth.name_key(&name)) {
                Ok(Some(acc)) => Ok(acc),
                Ok(None) => Err(ErrorCode::UnknownUser),
                Err(e) => {
                    log::warn!("store: {e}");
                    Err(ErrorCode::StoreUnavailable)
                }
            });
        let account = match found.await {
            Ok(Ok(account)) => account,
            Ok(Err(code)) => return self.error(code, kind::LOGIN),
            Err(e) => return self.error(e.code_or(ErrorCode::Internal), kind::LOGIN),
        };
        let shared = self.shard.shared.clone();
        let (user, banned_until_ms) = (account.id, account.banned_until_ms);
        let verified =
            workers.hash.run(move || shared.auth.verify_password(&account.password_hash, &password));
        match verified.await {
            Ok(true) => {}
            Ok(false) => return self.error(ErrorCode::WrongPassword, kind::LOGIN),
            Err(e) => return self.error(e.code_or(ErrorCode::Internal), kind::LOGIN),
        }
        // Told only to whoever knows the password.
        if banned_until_ms > crate::clock::now_ms() {
            return self.error(ErrorCode::Banned, kind::LOGIN);
        }
        self.attach(user, (device_type, &device.1), None, kind::LOGIN).await
    }

    async fn login_token(&mut self, token: Option<(u64, [u8; 32])>, device: (u8, String)) -> Flow {
        let _pending = LoginPending::new(self.session);
        let device_type = match self.check_device(&device, kind::LOGIN_TOKEN) {
            Ok(t) => t,
            Err(flow) => return flow,
        };
        let Some((user, hash)) = token.filter(|&(u, _)| u != 0) else {
            return self.error(ErrorCode::InvalidToken, kind::LOGIN_TOKEN);
        };
        // A ban voids the tokens its user owner holds; a token issued since (by the admin API)
        // or held by a new owner is refused here.
        let shared = self.shard.shared.clone();
        let ban = self.shard.shared.workers.store.run(move || shared.store.ban_of(user));
        match ban.await {
            Ok(Ok(Some(until))) if until > crate::clock::now_ms() => {
                return self.error(ErrorCode::Banned, kind::LOGIN_TOKEN)
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return self.error(ErrorCode::InvalidToken, kind::LOGIN_TOKEN),
            Ok(Err(e)) => {
                log::warn!("store: ban of {user}: {e}");
                return self.error(ErrorCode::StoreUnavailable, kind::LOGIN_TOKEN);
            }
            Err(e) => return self.error(e.code_or(ErrorCode::Internal), kind::LOGIN_TOKEN),
        }
        self.attach(user, (device_type, &device.1), Some(hash), kind::LOGIN_TOKEN).await
    }

    /// Ask the user's owner shard for a place among the user's sessions, then answer the login.
    async fn attach(
        &mut self,
        user: UserId,
        (device_type, device_id): (DeviceType, &str),
        token: Option<[u8; 32]>,
        k: u16,
    ) -> Flow {
        let rx = self.session.expect_reply();
        let attach =
            Attach { user, session: self.session.id, device_type, device_id: device_id.into(), token };
        self.shard.post(self.shard.place(|p| p.user(user)), Envelope::Attach(Box::new(attach)));
        match self.wait_reply(rx).await {
            Ok(Reply::Attach(Ok(user))) => {
                crate::metrics::count_login();
                let limits = &self.shard.cfg().limits;
                self.session.user.set(user);
                self.session.device.set(device_hash(user, device_id));
                self.session.device_type.set(device_type);
                *self.session.device_info.borrow_mut() =
                    crate::envelope::DeviceInfo { device_id: device_id.into(), login_ms: now_ms() };
                self.session.last_rx.set(Instant::now());
                let ok = protocol::LoginOk {
                    user_id: user,
                    session_id: self.session.id.0,
                    server_time_ms: now_ms(),
                    idle_timeout_ms: limits.idle_timeout_ms.min(u32::MAX as u64) as u32,
                    frame_bytes_max: limits.frame_bytes_max as u32,
                    body_bytes_max: limits.body_bytes_max as u32,
                    inflight_max: limits.inflight_per_session_max,
                    protocol_version: protocol::PROTOCOL_VERSION,
                    large_body_bytes_max: limits.large_body_bytes_max as u32,
                };
                let flow = self.reply(kind::LOGIN_OK, &ok);
                // The user owner learns the user's friends and blocks, for its presence.
                monoio::spawn(crate::shard::presence_hello(self.shard.clone(), user));
                if self.shard.shared.store.durable() {
                    // Taken after the user owner attached this session: every message stamped
                    // later is fanned out to it live, so catch-up stops here (a message stamped
                    // in the same millisecond may come both ways; clients drop repeats by seq).
                    let attached_ms = now_ms();
                    monoio::spawn(crate::shard::catch_up(
                        self.shard.clone(),
                        self.session.clone(),
                        k,
                        attached_ms,
                    ));
                }
                flow
            }
            Ok(Reply::Attach(Err(code))) | Err(code) => self.error(code, k),
            Ok(Reply::Token(_) | Reply::Group(_)) => self.error(ErrorCode::Internal, k),
        }
    }

    /// Wait for another shard's answer, at most `answer_timeout_ms`. A late answer then finds
    /// no one waiting (an attach that succeeded late is undone by the runtime).
    async fn wait_reply(&self, rx: futures_channel::oneshot::Receiver<Reply>) -> Result<Reply, ErrorCode> {
        let timeout = std::time::Duration::from_millis(self.shard.cfg().limits.answer_timeout_ms);
        match monoio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ErrorCode::Internal),
            Err(_) => {
                self.session.forget_reply();
                Err(ErrorCode::Timeout)
            }
        }
    }

    /// Answer a `History` request: `HISTORY_MSG` frames, then `HISTORY_END`.
    async fn history(&self, conv_kind: u8, peer: UserId, anchor: u64, older: bool, limit: u32) -> Flow {
        let l = &self.shard.cfg().limits;
        let max = l.history_page_max;
        let count = if limit == 0 { max } else { limit.min(max) };
        let limit = PageLimit { count, bytes: l.history_page_bytes_max };
        let user = self.session.user();
        let group = conv_kind == conv::GROUP;
        let store = self.shard.shared.store.clone();
        let found = self.store_call(move || {
            if !group {
                return store.history(direct_key(user, peer), anchor, older, limit).map(Ok);
            }
            // A member (or a former one) reads the part of the group's sequence it was a
            // member for: from the notice that added it to the one that removed it.
            let Some((from, until)) = store.member_span(user, peer)? else {
                return Ok(Err(ErrorCode::NotMember));
            };
            let (lo, hi) = (from.saturating_sub(1), until.saturating_add(1));
            let anchor = if older {
                if anchor == 0 {
                    hi
                } else {
                    anchor.min(hi)
                }
            } else {
                anchor.max(lo)
            };
            let mut page = store.history(group_conv(peer), anchor, older, limit)?;
            let before = page.payloads.len();
            page.payloads.retain(|p| protocol::Stamp::read(p).is_some_and(|st| st.seq > lo && st.seq < hi));
            if page.payloads.len() < before {
                page.more = false;
            }
            Ok(Ok(page))
        });
        let page = match found.await {
            Ok(Ok(page)) => page,
            Ok(Err(code)) | Err(code) => return self.error(code, kind::HISTORY),
        };
        let count = page.payloads.len() as u32;
        for p in page.payloads {
            self.session.push_paced(frame::whole(kind::HISTORY_MSG, &p)).await;
        }
        let end = protocol::HistoryEnd { conv: conv_kind, peer, count, more: page.more };
        // After the page's last large message, not between its parts.
        self.session.large_sent().await;
        self.reply(kind::HISTORY_END, &end)
    }

    /// Run a store call on the store pool; a store failure is StoreUnavailable.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ErrorCode> {
        match self.shard.shared.workers.store.run(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                log::warn!("store: {e}");
                Err(ErrorCode::StoreUnavailable)
            }
            Err(e) => Err(e.code_or(ErrorCode::StoreUnavailable)),
        }
    }

    /// A group change that puts `joiner` in one more group: it must exist, and be in fewer
    /// than `groups_per_user_max` (checked now; concurrent joins may pass it by a few).
    async fn group_change(&self, group: u64, op: GroupOp, joiner: UserId) -> Flow {
        let k = op.request_kind();
        let max = self.shard.cfg().limits.groups_per_user_max;
        let store = self.shard.shared.store.clone();
        let me = self.session.user();
        if self.foreign(joiner) {
            return self.error(ErrorCode::UnknownUser, k);
        }
        let counted = self
            .store_call(move || {
                if joiner != me && !store.account_exists(joiner)? {
                    return Ok(None);
                }
                store.group_count(joiner).map(Some)
            })
            .await;
        match counted {
            Ok(None) => self.error(ErrorCode::UnknownUser, k),
            Ok(Some(n)) if n >= max => self.error(ErrorCode::TooManyGroups, k),
            Ok(Some(_)) => self.group_call(group, op).await,
            Err(code) => self.error(code, k),
        }
    }

    /// Add many users: each must exist and be in fewer than `groups_per_user_max` groups.
    async fn group_add(&self, group: u64, users: Vec<UserId>) -> Flow {
        let k = kind::GROUP_ADD_MEMBERS;
        let max = self.shard.cfg().limits.groups_per_user_max;
        let store = self.shard.shared.store.clone();
        if users.iter().any(|&u| self.foreign(u)) {
            return self.error(ErrorCode::UnknownUser, k);
        }
        let checked = users.clone();
        let counted = self.store_call(move || store.group_counts(&checked)).await;
        match counted {
            Ok(counts) if counts.iter().any(Option::is_none) => self.error(ErrorCode::UnknownUser, k),
            Ok(counts) if counts.iter().any(|n| n.is_some_and(|n| n >= max)) => {
                self.error(ErrorCode::TooManyGroups, k)
            }
            Ok(_) => self.group_call(group, GroupOp::AddMembers(users)).await,
            Err(code) => self.error(code, k),
        }
    }

    /// Ask a group's owner, wait for its answer (at most `answer_timeout_ms`), write it.
    async fn group_call(&self, group: u64, op: GroupOp) -> Flow {
        let k = op.request_kind();
        if !is_group_id(group) || self.foreign(group) {
            return self.error(ErrorCode::GroupNotFound, k);
        }
        let req = GroupRequest { origin: self.session.id, user: self.session.user(), group, op };
        let owner = self.shard.place(|p| p.group(group));
        match self.ask_owner(owner, Envelope::Group(Box::new(req))).await {
            Ok(frame) => {
                self.session.push(frame);
                Flow::Continue
            }
            Err(code) => self.error(code, k),
        }
    }

    /// Post `env` to `owner` and wait for its answer frame (a `GroupReply`, from a group owner
    /// or a user owner), or the refusal.
    async fn ask_owner(&self, owner: crate::placement::Owner, env: Envelope) -> Result<Bytes, ErrorCode> {
        let rx = self.session.expect_reply();
        self.shard.post(owner, env);
        match self.wait_reply(rx).await {
            Ok(Reply::Group(answer)) => answer,
            Err(code) => Err(code),
            Ok(Reply::Attach(_) | Reply::Token(_)) => Err(ErrorCode::Internal),
        }
    }

    /// A typing notice: to the peer's live sessions (through its user owner; an account that
    /// does not exist has none), or to a group's members' (through the group's owner, which
    /// checks the sender may send there). Never stored; answered only when refused.
    fn typing(&self, to: u64, conv_kind: u8, state: u8) -> Flow {
        let k = kind::TYPING;
        let me = self.session.user();
        let valid = match conv_kind {
            conv::DIRECT => to != 0 && to != me && !is_group_id(to),
            conv::GROUP => is_group_id(to),
            _ => false,
        };
        if !valid {
            return self.error(ErrorCode::InvalidConversation, k);
        }
        if state > 1 {
            return self.error(ErrorCode::Malformed, k);
        }
        if self.foreign(to) {
            // As to a user or group that does not exist: nobody to tell.
            return Flow::Continue;
        }
        let max = self.shard.cfg().limits.typing_per_session_per_minute_max;
        let mut budget = self.session.typing.get();
        let allowed = budget.take(now_ms(), max);
        self.session.typing.set(budget);
        if !allowed {
            return self.error(ErrorCode::RateLimited, k);
        }
        let notice = protocol::TypingNotice { from: me, to, conv: conv_kind, state };
        let frame = Bytes::from(frame::encode(kind::TYPING_NOTICE, &notice));
        if conv_kind == conv::DIRECT {
            let env = Envelope::Fanout { user: to, skip: crate::envelope::SessionRef::NONE, frame };
            self.shard.post(self.shard.place(|p| p.user(to)), env);
        } else {
            let req =
                GroupRequest { origin: self.session.id, user: me, group: to, op: GroupOp::Typing(frame) };
            self.shard.post(self.shard.place(|p| p.group(to)), Envelope::Group(Box::new(req)));
        }
        Flow::Continue
    }

    /// A read receipt: kept (per device), and pushed to the 1:1 peer's sessions (through its
    /// user owner) or, in a small group, to the members' (through the group's owner, which
    /// checks membership), and to this user's other sessions. Answered only when refused.
    fn read(&self, conv_kind: u8, peer: u64, seq: u64) -> Flow {
        let k = kind::READ;
        let me = self.session.user();
        let conv = match conv_kind {
            conv::DIRECT if peer != 0 && !is_group_id(peer) => direct_key(me, peer),
            conv::GROUP if is_group_id(peer) => group_conv(peer),
            _ => return self.error(ErrorCode::InvalidConversation, k),
        };
        if seq == 0 {
            return self.error(ErrorCode::Malformed, k);
        }
        if self.foreign(peer) {
            // No conversation crosses domains: there is nothing to have read.
            return Flow::Continue;
        }
        let max = self.shard.cfg().limits.reads_per_session_per_minute_max;
        let mut budget = self.session.reads.get();
        let allowed = budget.take(now_ms(), max);
        self.session.reads.set(budget);
        if !allowed {
            return self.error(ErrorCode::RateLimited, k);
        }
        // Stores keep sequence numbers as signed 64-bit integers.
        let seq = seq.min(i64::MAX as u64);
        let notice = protocol::ReadNotice { from: me, to: peer, conv: conv_kind, seq };
        let frame = Bytes::from(frame::encode(kind::READ_NOTICE, &notice));
        let device = self.session.device.get();
        if conv_kind == conv::GROUP {
            let op = GroupOp::Read { seq, device, frame };
            let req = GroupRequest { origin: self.session.id, user: me, group: peer, op };
            self.shard.post(self.shard.place(|p| p.group(peer)), Envelope::Group(Box::new(req)));
            return Flow::Continue;
        }
        self.shard.note_read(Cursor { user: me, device, conv, seq });
        let skip = crate::envelope::SessionRef::NONE;
        if peer != me {
            let env = Envelope::Fanout { user: peer, skip, frame: frame.clone() };
            self.shard.post(self.shard.place(|p| p.user(peer)), env);
        }
        let env = Envelope::Fanout { user: me, skip: self.session.id, frame };
        self.shard.post(self.shard.place(|p| p.user(me)), env);
        Flow::Continue
    }

    /// A roster action, made in the store (both sides of the pair in one transaction). Then the
    /// pair's conversation owner learns the new flags (for the sends it checks), and both users'
    /// sessions (this one aside) get a `ROSTER_NOTICE` of what the other may see.
    async fn roster_action(&self, action: u8, other: u64, note: String) -> Flow {
        use protocol::roster_action as act;
        let k = kind::ROSTER_ACTION;
        let me = self.session.user();
        let l = &self.shard.cfg().limits;
        if !(act::REQUEST..=act::REVOKE).contains(&action)
            || other == 0
            || other == me
            || is_group_id(other)
            || note.len() > l.roster_note_bytes_max
        {
            return self.error(ErrorCode::InvalidRoster, k);
        }
        if self.foreign(other) {
            return self.error(ErrorCode::UnknownUser, k);
        }
        let note = if action == act::REQUEST { note } else { String::new() };
        let (store, max, now) = (self.shard.shared.store.clone(), l.roster_entries_max, now_ms());
        let n = note.clone();
        let out = match self.store_call(move || store.roster_action(me, other, action, &n, now, max)).await {
            Ok(Ok(out)) => out,
            Ok(Err(code)) | Err(code) => return self.error(code, k),
        };
        let conv = direct_key(me, other);
        let flags = if me < other {
            crate::roster::pair_flags(&out.me, &out.them)
        } else {
            crate::roster::pair_flags(&out.them, &out.me)
        };
        // Answered once the pair's conversation owner checks sends by the new flags: a send
        // after the answer is judged by them.
        let owner = self.shard.place(|p| p.conv(conv));
        if let Err(code) =
            self.ask_owner(owner, Envelope::Pair { conv, flags, origin: self.session.id }).await
        {
            return self.error(code, k);
        }
        // Both users' presence owners keep who is told of changes (a friend or an allowed
        // watcher) and who is blocked.
        for (user, other, side) in [(me, other, &out.me), (other, me, &out.them)] {
            let op = PresenceOp::Change { other, sees: side.shows_presence(), blocks: side.blocks };
            let msg = PresenceMsg { user, origin: 0, op };
            self.shard.post(self.shard.place(|p| p.user(user)), msg.envelope());
        }
        // The other user hears what it may see (never of a block); this user's other sessions
        // hear the action itself, blocks included.
        let own =
            if matches!(action, act::BLOCK | act::UNBLOCK) { vec![action] } else { out.notices.clone() };
        let notice = |event| {
            let note = if event == act::REQUEST { note.clone() } else { String::new() };
            Bytes::from(frame::encode(
                kind::ROSTER_NOTICE,
                &protocol::RosterNotice { event, from: me, to: other, note },
            ))
        };
        for &event in &out.notices {
            let env = Envelope::Fanout {
                user: other,
                skip: crate::envelope::SessionRef::NONE,
                frame: notice(event),
            };
            self.shard.post(self.shard.place(|p| p.user(other)), env);
        }
        for event in own {
            let env = Envelope::Fanout { user: me, skip: self.session.id, frame: notice(event) };
            self.shard.post(self.shard.place(|p| p.user(me)), env);
        }
        self.reply(kind::ROSTER_OK, &protocol::RosterOk { action, user: other, friends: out.friends() })
    }

    /// Set this account's presence at its user owner, which answers with it and tells the
    /// friends.
    async fn presence_set(&self, state: u8, text: String, extra: Vec<u8>) -> Flow {
        use protocol::presence_state as ps;
        let k = kind::PRESENCE_SET;
        let l = &self.shard.cfg().limits;
        if !(ps::ONLINE..=ps::INVISIBLE).contains(&state)
            || text.len() > l.presence_text_bytes_max
            || extra.len() > l.presence_extra_bytes_max
        {
            return self.error(ErrorCode::InvalidPresence, k);
        }
        let me = self.session.user();
        let msg =
            PresenceMsg { user: me, origin: self.session.id.0, op: PresenceOp::Set { state, text, extra } };
        let owner = self.shard.place(|p| p.user(me));
        match self.ask_owner(owner, msg.envelope()).await {
            Ok(frame) => {
                self.session.push(frame);
                Flow::Continue
            }
            Err(code) => self.error(code, k),
        }
    }

    /// The presence of some users: asked of each user owner in turn, answered in the order
    /// asked.
    async fn presence_get(&self, mut ids: Vec<u64>) -> Flow {
        let k = kind::PRESENCE_GET;
        if ids.is_empty() || ids.len() > self.shard.cfg().limits.presence_query_max {
            return self.error(ErrorCode::InvalidPresence, k);
        }
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        ids.retain(|u| seen.insert(*u));
        let me = self.session.user();
        let mut by_owner: Vec<(crate::placement::Owner, Vec<u64>)> = Vec::new();
        // Users of other domains are not asked about: they are OFFLINE, as unknown ids are.
        let mut found: Vec<protocol::PresenceEntry> = ids
            .iter()
            .filter(|&&u| self.foreign(u))
            .map(|&user| protocol::PresenceEntry {
                user,
                state: 0,
                since_ms: 0,
                text: String::new(),
                extra: Vec::new(),
            })
            .collect();
        for &u in ids.iter().filter(|&&u| !self.foreign(u)) {
            let o = self.shard.place(|p| p.user(u));
            match by_owner.iter_mut().find(|(x, _)| *x == o) {
                Some((_, list)) if !list.contains(&u) => list.push(u),
                Some(_) => {}
                None => by_owner.push((o, vec![u])),
            }
        }
        for (owner, users) in by_owner {
            let msg = PresenceMsg {
                user: users[0],
                origin: self.session.id.0,
                op: PresenceOp::Ask { asker: me, users },
            };
            let frame = match self.ask_owner(owner, msg.envelope()).await {
                Ok(frame) => frame,
                Err(code) => return self.error(code, k),
            };
            let Ok(list) = frame::access::<protocol::ArchivedPresenceList>(&frame[frame::HEADER_BYTES..])
            else {
                return self.error(ErrorCode::Internal, k);
            };
            match rkyv::deserialize::<protocol::PresenceList, rkyv::rancor::Error>(list) {
                Ok(l) => found.extend(l.entries),
                Err(_) => return self.error(ErrorCode::Internal, k),
            }
        }
        let entries = ids.iter().filter_map(|u| found.iter().find(|e| e.user == *u).cloned()).collect();
        self.reply(kind::PRESENCE_LIST, &protocol::PresenceList { entries })
    }

    /// One of this account's roster lists, from the store.
    async fn roster_get(&self, list: u8, after: u64, limit: u32) -> Flow {
        if list > protocol::roster_list::WATCH_OUTGOING {
            return self.error(ErrorCode::InvalidRoster, kind::ROSTER_GET);
        }
        let max = self.shard.cfg().limits.group_page_max;
        let limit = if limit == 0 { max } else { limit.min(max) } as usize;
        let (store, me) = (self.shard.shared.store.clone(), self.session.user());
        match self.store_call(move || store.roster_list(me, list, after, limit)).await {
            Ok((entries, more)) => {
                self.reply(kind::ROSTER_LIST, &protocol::RosterList { list, entries, more })
            }
            Err(code) => self.error(code, kind::ROSTER_GET),
        }
    }

    /// How far a conversation was read: a 1:1 chat's two positions from the store, a group's
    /// counts (and small groups' positions) from its owner.
    async fn read_get(&self, conv_kind: u8, peer: u64, seq: u64) -> Flow {
        let k = kind::READ_GET;
        let me = self.session.user();
        match conv_kind {
            conv::DIRECT if peer != 0 && !is_group_id(peer) => {}
            conv::GROUP if is_group_id(peer) => return self.group_call(peer, GroupOp::ReadGet { seq }).await,
            _ => return self.error(ErrorCode::InvalidConversation, k),
        }
        let conv = direct_key(me, peer);
        let store = self.shard.shared.store.clone();
        let reads = match self.store_call(move || store.reads_of(conv)).await {
            Ok(reads) => reads,
            Err(code) => return self.error(code, k),
        };
        let peer_seq = reads.iter().find(|r| r.0 == peer).map_or(0, |r| r.1);
        let state = protocol::ReadState {
            conv: conv::DIRECT,
            peer,
            seq,
            read_count: u32::from(peer_seq >= seq),
            member_count: 1,
            reads: reads.into_iter().map(|(user, seq)| protocol::ReadEntry { user, seq }).collect(),
        };
        self.reply(kind::READ_STATE, &state)
    }

    /// Replace this account's profile (checked against the limits), and answer with it.
    async fn profile_update(&self, profile: protocol::UserProfile) -> Flow {
        let k = kind::PROFILE_UPDATE;
        let l = &self.shard.cfg().limits;
        let texts = [&profile.nickname, &profile.avatar_url, &profile.area];
        let birthday_ok = profile.birthday == 0 || {
            let (y, m, d) = (profile.birthday / 10000, profile.birthday / 100 % 100, profile.birthday % 100);
            (1..=9999).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d)
        };
        if texts.iter().any(|t| t.len() > l.profile_text_bytes_max)
            || profile.extra.len() > l.profile_extra_bytes_max
            || profile.gender > 3
            || !birthday_ok
        {
            return self.error(ErrorCode::InvalidProfile, k);
        }
        let store = self.shard.shared.store.clone();
        let me = self.session.user();
        let now = now_ms();
        let saved = profile.clone();
        match self.store_call(move || store.save_profile(me, &saved, now)).await {
            Ok(()) => {
                let entry = protocol::ProfileEntry { user_id: me, updated_ms: now, profile };
                self.reply(kind::PROFILE_LIST, &protocol::ProfileList { profiles: vec![entry] })
            }
            Err(code) => self.error(code, k),
        }
    }

    /// The profiles of up to `profiles_per_request_max` users, from the store.
    async fn profile_get(&self, mut ids: Vec<u64>) -> Flow {
        let k = kind::PROFILE_GET;
        if ids.is_empty() || ids.len() > self.shard.cfg().limits.profiles_per_request_max {
            return self.error(ErrorCode::InvalidProfile, k);
        }
        // Users of other domains are left out, as unknown ids are.
        ids.retain(|&u| !self.foreign(u));
        let store = self.shard.shared.store.clone();
        match self.store_call(move || store.profiles(&ids)).await {
            Ok(found) => {
                let profiles = found
                    .into_iter()
                    .map(|(user_id, updated_ms, profile)| protocol::ProfileEntry {
                        user_id,
                        updated_ms,
                        profile,
                    })
                    .collect();
                self.reply(kind::PROFILE_LIST, &protocol::ProfileList { profiles })
            }
            Err(code) => self.error(code, k),
        }
    }

    /// `MySessions` (`logout` 0) or `SessionLogout`: asked of the user's owner, which answers
    /// with the whole `SESSION_LIST` frame.
    async fn sessions_call(&self, logout: u64) -> Flow {
        let k = if logout == 0 { kind::MY_SESSIONS } else { kind::SESSION_LOGOUT };
        let user = self.session.user();
        let owner = self.shard.place(|p| p.user(user));
        match self.ask_owner(owner, Envelope::Sessions { user, origin: self.session.id, logout }).await {
            Ok(frame) => {
                self.session.push(frame);
                if logout == self.session.id.0 {
                    // Its own: the user owner has let it go; the answer, then the kick.
                    self.session.kick(ErrorCode::LoggedOutElsewhere);
                }
                Flow::Continue
            }
            Err(code) => self.error(code, k),
        }
    }

    /// Answer `MyGroups` from the store.
    async fn my_groups(&self, after: u64, limit: u32) -> Flow {
        let max = self.shard.cfg().limits.group_page_max;
        let limit = if limit == 0 { max } else { limit.min(max) } as usize;
        let store = self.shard.shared.store.clone();
        let user = self.session.user();
        match self.store_call(move || store.user_groups(user, after, limit)).await {
            Ok((groups, more)) => self.reply(kind::GROUP_LIST, &protocol::GroupList { groups, more }),
            Err(code) => self.error(code, kind::MY_GROUPS),
        }
    }

    async fn issue_token(&self, ttl_secs: u32) -> Flow {
        let max = self.shard.cfg().limits.token_ttl_secs;
        let ttl = if ttl_secs == 0 { max } else { ttl_secs.min(max) };
        let user = self.session.user();
        let (text, hash) = auth::new_token(user);
        let expires_at_ms = now_ms() + ttl as u64 * 1000;
        let rx = self.session.expect_reply();
        let env = Envelope::StoreToken { user, session: self.session.id, hash, expires_at_ms };
        self.shard.post(self.shard.place(|p| p.user(user)), env);
        match self.wait_reply(rx).await {
            Ok(Reply::Token(Ok(()))) => {
                self.reply(kind::TOKEN_ISSUED, &protocol::TokenIssued { token: text, expires_at_ms })
            }
            Ok(Reply::Token(Err(code))) | Err(code) => self.error(code, kind::ISSUE_TOKEN),
            Ok(Reply::Attach(_) | Reply::Group(_)) => self.error(ErrorCode::Internal, kind::ISSUE_TOKEN),
        }
    }
}
