//! A blocking Rust client for protocol v1, used by the tests and tools.
//!
//! Key types: [`Client`] (one connection), [`Event`] (any server frame, decoded), [`Delivery`],
//! [`ClientError`]. [`decode_event`] turns a validated frame into an [`Event`] and can be reused by
//! other transports (for example an async load generator).
//!
//! Request helpers (`register`, `login`, …) wait for their answer; frames that arrive meanwhile
//! (deliveries, acks) are kept and returned by later calls to [`Client::recv`].

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use rkyv::rancor;

use crate::{
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
    protocol::{self, conv, kind, ErrorCode, RoomStamp, Stamp},
};

/// The largest frame the client accepts from a server.
pub const CLIENT_FRAME_BYTES_MAX: usize = 64 << 20;

/// A message delivered to this client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub stamp: Stamp,
    pub client_msg_id: u64,
    pub body: Vec<u8>,
    /// The Send's flags ([`protocol::send_flags`]): a recall, a burn notice, burn after read.
    pub flags: u8,
    pub burn_secs: u32,
    /// The stamp's state byte ([`protocol::msg_state`]): a tombstone's is not `PLAIN`.
    pub state: u8,
}

impl Delivery {
    /// A plain message as sent (no flags, no tombstone).
    pub fn plain(stamp: Stamp, client_msg_id: u64, body: Vec<u8>) -> Delivery {
        Delivery { stamp, client_msg_id, body, flags: 0, burn_secs: 0, state: protocol::msg_state::PLAIN }
    }

    /// The seq a recall notice takes back.
    pub fn recalled_seq(&self) -> Option<u64> {
        if self.flags & protocol::send_flags::RECALL == 0 {
            return None;
        }
        crate::store::recalled_seq(&self.body)
    }
}

/// A live-room message delivered to this client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomMessage {
    pub stamp: RoomStamp,
    pub client_msg_id: u64,
    pub body: Vec<u8>,
}

/// Any frame a server sends, decoded into owned values.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    RegisterOk(protocol::RegisterOk),
    LoginOk(protocol::LoginOk),
    TokenIssued(protocol::TokenIssued),
    Pong(protocol::Pong),
    SendAck(protocol::SendAck),
    Deliver(Delivery),
    Bye,
    Error(protocol::Error),
    Kick(protocol::Kick),
    /// One message of a history page.
    HistoryMsg(Delivery),
    HistoryEnd(protocol::HistoryEnd),
    CatchUpEnd(protocol::CatchUpEnd),
    /// A catch-up follows (a cluster change may have lost live deliveries).
    Resync,
    /// An operator's message (admin API), never stored.
    Broadcast(protocol::Broadcast),
    RoomOk(protocol::RoomOk),
    RoomMsg(RoomMessage),
    RoomClosed(protocol::RoomClosed),
    Missed(protocol::Missed),
    /// A stream message (never stored): stamp `msg_id` 0, `seq` of the stored message it follows.
    StreamMsg(Delivery),
    GroupOk(protocol::GroupOk),
    GroupInfo(protocol::GroupInfo),
    GroupMemberPage(protocol::GroupMemberPage),
    GroupList(protocol::GroupList),
    SessionList(protocol::SessionList),
    TypingNotice(protocol::TypingNotice),
    ReadNotice(protocol::ReadNotice),
    ReadState(protocol::ReadState),
    RosterOk(protocol::RosterOk),
    RosterList(protocol::RosterList),
    RosterNotice(protocol::RosterNotice),
    PresenceList(protocol::PresenceList),
    PresenceNotice(protocol::PresenceEntry),
    ProfileList(protocol::ProfileList),
    GroupRequestPage(protocol::GroupRequestPage),
    GroupJoinRequest(protocol::GroupJoinRequest),
    GroupDecision(protocol::GroupDecision),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("server error {code} ({name:?}): {message}")]
    Server { code: u16, name: Option<ErrorCode>, message: String },
    #[error("kicked: {0} ({1:?})")]
    Kicked(u16, Option<ErrorCode>),
    #[error("malformed frame from server: {0}")]
    Malformed(String),
}

impl ClientError {
    /// The protocol error code, if this is a server error or a kick.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { name, .. } => *name,
            ClientError::Kicked(_, c) => *c,
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Decode a server frame (kind and payload) into an [`Event`], validating the archive.
pub fn decode_event(k: u16, payload: &[u8]) -> Result<Event> {
    fn de<A, T>(payload: &[u8]) -> Result<T>
    where
        A: rkyv::Portable
            + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
            + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
    {
        let a = frame::access::<A>(payload).map_err(|e| ClientError::Malformed(e.to_string()))?;
        rkyv::deserialize::<T, rancor::Error>(a).map_err(|e| ClientError::Malformed(e.to_string()))
    }
    Ok(match k {
        kind::REGISTER_OK => Event::RegisterOk(de::<protocol::ArchivedRegisterOk, _>(payload)?),
        kind::LOGIN_OK => Event::LoginOk(de::<protocol::ArchivedLoginOk, _>(payload)?),
        kind::TOKEN_ISSUED => Event::TokenIssued(de::<protocol::ArchivedTokenIssued, _>(payload)?),
        kind::PONG => Event::Pong(de::<protocol::ArchivedPong, _>(payload)?),
        kind::SEND_ACK => Event::SendAck(de::<protocol::ArchivedSendAck, _>(payload)?),
        kind::BYE => Event::Bye,
        kind::RESYNC => Event::Resync,
        kind::BROADCAST => Event::Broadcast(de::<protocol::ArchivedBroadcast, _>(payload)?),
        kind::ERROR => Event::Error(de::<protocol::ArchivedError, _>(payload)?),
        kind::KICK => Event::Kick(de::<protocol::ArchivedKick, _>(payload)?),
        kind::DELIVER => Event::Deliver(delivery(payload)?),
        kind::HISTORY_MSG => Event::HistoryMsg(delivery(payload)?),
        kind::HISTORY_END => Event::HistoryEnd(de::<protocol::ArchivedHistoryEnd, _>(payload)?),
        kind::CATCHUP_END => Event::CatchUpEnd(de::<protocol::ArchivedCatchUpEnd, _>(payload)?),
        kind::ROOM_OK => Event::RoomOk(de::<protocol::ArchivedRoomOk, _>(payload)?),
        kind::ROOM_MSG => Event::RoomMsg(room_message(payload)?),
        kind::ROOM_CLOSED => Event::RoomClosed(de::<protocol::ArchivedRoomClosed, _>(payload)?),
        kind::MISSED => Event::Missed(de::<protocol::ArchivedMissed, _>(payload)?),
        kind::STREAM_MSG => Event::StreamMsg(delivery(payload)?),
        kind::GROUP_OK => Event::GroupOk(de::<protocol::ArchivedGroupOk, _>(payload)?),
        kind::GROUP_INFO => Event::GroupInfo(de::<protocol::ArchivedGroupInfo, _>(payload)?),
        kind::GROUP_MEMBER_PAGE => {
            Event::GroupMemberPage(de::<protocol::ArchivedGroupMemberPage, _>(payload)?)
        }
        kind::GROUP_LIST => Event::GroupList(de::<protocol::ArchivedGroupList, _>(payload)?),
        kind::SESSION_LIST => Event::SessionList(de::<protocol::ArchivedSessionList, _>(payload)?),
        kind::TYPING_NOTICE => Event::TypingNotice(de::<protocol::ArchivedTypingNotice, _>(payload)?),
        kind::READ_NOTICE => Event::ReadNotice(de::<protocol::ArchivedReadNotice, _>(payload)?),
        kind::READ_STATE => Event::ReadState(de::<protocol::ArchivedReadState, _>(payload)?),
        kind::ROSTER_OK => Event::RosterOk(de::<protocol::ArchivedRosterOk, _>(payload)?),
        kind::ROSTER_LIST => Event::RosterList(de::<protocol::ArchivedRosterList, _>(payload)?),
        kind::ROSTER_NOTICE => Event::RosterNotice(de::<protocol::ArchivedRosterNotice, _>(payload)?),
        kind::PRESENCE_LIST => Event::PresenceList(de::<protocol::ArchivedPresenceList, _>(payload)?),
        kind::PRESENCE_NOTICE => Event::PresenceNotice(de::<protocol::ArchivedPresenceEntry, _>(payload)?),
        kind::PROFILE_LIST => Event::ProfileList(de::<protocol::ArchivedProfileList, _>(payload)?),
        kind::GROUP_REQUEST_PAGE => {
            Event::GroupRequestPage(de::<protocol::ArchivedGroupRequestPage, _>(payload)?)
        }
        kind::GROUP_JOIN_REQUEST => {
            Event::GroupJoinRequest(de::<protocol::ArchivedGroupJoinRequest, _>(payload)?)
        }
        kind::GROUP_DECISION => Event::GroupDecision(de::<protocol::ArchivedGroupDecision, _>(payload)?),
        other => return Err(ClientError::Malformed(format!("unexpected frame kind {other}"))),
    })
}

/// The notice a group delivery carries (stamp `from` 0, conversation GROUP), if it is one.
pub fn group_notice(d: &Delivery) -> Option<protocol::GroupNotice> {
    if d.stamp.from != 0 || d.stamp.conv != conv::GROUP {
        return None;
    }
    let a = frame::access::<protocol::ArchivedGroupNotice>(&d.body).ok()?;
    rkyv::deserialize::<protocol::GroupNotice, rancor::Error>(a).ok()
}

/// Decode a `DELIVER` (or `HISTORY_MSG`) payload: the stamp, then the sender's `Send` archive.
pub fn delivery(payload: &[u8]) -> Result<Delivery> {
    let stamp = Stamp::read(payload).ok_or_else(|| ClientError::Malformed("short stamp".into()))?;
    let send = frame::access::<protocol::ArchivedSend>(&payload[Stamp::BYTES..])
        .map_err(|e| ClientError::Malformed(e.to_string()))?;
    Ok(Delivery {
        stamp,
        client_msg_id: send.client_msg_id.to_native(),
        body: send.body.as_slice().to_vec(),
        flags: send.flags,
        burn_secs: send.burn_secs.to_native(),
        state: payload[Stamp::STATE_AT],
    })
}

/// Decode a `ROOM_MSG` payload: the room stamp, then the publisher's `RoomPublish` archive.
pub fn room_message(payload: &[u8]) -> Result<RoomMessage> {
    let stamp = RoomStamp::read(payload).ok_or_else(|| ClientError::Malformed("short room stamp".into()))?;
    let p = frame::access::<protocol::ArchivedRoomPublish>(&payload[RoomStamp::BYTES..])
        .map_err(|e| ClientError::Malformed(e.to_string()))?;
    Ok(RoomMessage { stamp, client_msg_id: p.client_msg_id.to_native(), body: p.body.as_slice().to_vec() })
}

/// What a client's frames travel over: plain TCP, or a wrapper around a TCP socket (TLS, a
/// WebSocket carrying binary messages) whose `write` of a whole frame sends it.
pub trait Transport: Read + Write + Send {
    /// The TCP socket underneath (for timeouts and shutdowns).
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

pub struct Client {
    stream: Box<dyn Transport>,
    buf: AlignedBuf,
    pending: VecDeque<Event>,
    /// A frame arriving in `PART_OUT` frames: its part id, kind and payload so far.
    parts: Option<(u64, u16, AlignedBuf)>,
    /// `PART_OUT` frames received so far.
    pub parts_received: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        Self::over_tcp(TcpStream::connect(addr)?)
    }

    /// As [`Client::connect`], giving up after `timeout` if nothing answers at `addr`.
    pub fn connect_timeout(addr: SocketAddr, timeout: Duration) -> Result<Client> {
        Self::over_tcp(TcpStream::connect_timeout(&addr, timeout)?)
    }

    fn over_tcp(stream: TcpStream) -> Result<Client> {
        stream.set_nodelay(true)?;
        Client::over(Box::new(stream))
    }

    /// A client over an open transport (see [`Transport`]).
    pub fn over(stream: Box<dyn Transport>) -> Result<Client> {
        stream.tcp().set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            stream,
            buf: AlignedBuf::new(64 * 1024),
            pending: VecDeque::new(),
            parts: None,
            parts_received: 0,
        })
    }

    /// How long `recv` and the request helpers wait for a frame (None: forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<()> {
        Ok(self.stream.tcp().set_read_timeout(t)?)
    }

    pub fn stream(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// Write a frame of `k` carrying `value`'s archive.
    pub fn send_frame<T>(&mut self, k: u16, value: &T) -> Result<()>
    where
        T: rkyv::Archive
            + for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    Vec<u8>,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rancor::Error,
                >,
            >,
    {
        self.write_raw(&frame::encode(k, value))
    }

    /// Write bytes as they are (for tests of bad input).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(self.stream.flush()?)
    }

    /// The next frame from the server: a kept one first, else one read from the socket.
    pub fn recv(&mut self) -> Result<Event> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        self.read_event()
    }

    /// Whether a frame is kept, not yet returned by `recv`.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn read_event(&mut self) -> Result<Event> {
        loop {
            match frame::parse(self.buf.filled(), CLIENT_FRAME_BYTES_MAX) {
                Parsed::Frame(h, total) => {
                    let payload = &self.buf.filled()[HEADER_BYTES..HEADER_BYTES + h.len as usize];
                    let ev = if h.kind == kind::PART_OUT {
                        self.parts_received += 1;
                        let whole = Self::take_part(&mut self.parts, payload);
                        match whole {
                            Ok(Some(buf)) => {
                                let (k, whole) = buf;
                                Some(decode_event(k, whole.filled()))
                            }
                            Ok(None) => None,
                            Err(e) => Some(Err(e)),
                        }
                    } else {
                        Some(decode_event(h.kind, payload))
                    };
                    self.buf.start += total;
                    if self.buf.is_empty() {
                        self.buf.clear();
                    }
                    match ev {
                        Some(ev) => return ev,
                        None => continue,
                    }
                }
                Parsed::Partial { need } => {
                    self.buf.compact();
                    if need > self.buf.capacity() {
                        let mut big = AlignedBuf::new(frame::padded(need));
                        let have = self.buf.filled().len();
                        big.spare()[..have].copy_from_slice(self.buf.filled());
                        big.end = have;
                        self.buf = big;
                    }
                    let n = self.stream.read(self.buf.spare())?;
                    if n == 0 {
                        return Err(ClientError::Closed);
                    }
                    self.buf.end += n;
                }
                Parsed::TooLarge(h) | Parsed::BadFlags(h) => {
                    return Err(ClientError::Malformed(format!("bad header {h:?}")));
                }
            }
        }
    }

    /// Add a `PART_OUT` frame's bytes to the frame being assembled; the whole frame's kind and
    /// payload once its last part is in.
    fn take_part(
        parts: &mut Option<(u64, u16, AlignedBuf)>,
        payload: &[u8],
    ) -> Result<Option<(u16, AlignedBuf)>> {
        let bad = |why: &str| ClientError::Malformed(format!("part: {why}"));
        let (h, data) = protocol::part::PartHeader::read(payload).ok_or_else(|| bad("short"))?;
        if h.offset == 0 {
            if parts.is_some() {
                return Err(bad("a new frame before the last one ended"));
            }
            *parts = Some((h.id, h.kind, AlignedBuf::new(frame::padded(h.total as usize).max(8))));
        }
        let (id, k, buf) = parts.as_mut().ok_or_else(|| bad("no first part"))?;
        if *id != h.id
            || *k != h.kind
            || h.offset as usize != buf.end
            || buf.end + data.len() > h.total as usize
        {
            return Err(bad("out of order"));
        }
        buf.spare()[..data.len()].copy_from_slice(data);
        buf.end += data.len();
        if buf.end < h.total as usize {
            return Ok(None);
        }
        let (_, k, buf) = parts.take().expect("assembling");
        Ok(Some((k, buf)))
    }

    /// Send a `Send` in `PART` frames of at most `part_bytes` bytes of payload each (5.22),
    /// without waiting.
    pub fn send_parts(
        &mut self,
        conv: u8,
        to: u64,
        client_msg_id: u64,
        flags: u8,
        body: &[u8],
        part_bytes: usize,
    ) -> Result<()> {
        let f = frame::encode(
            kind::SEND,
            &protocol::Send { conv, flags, burn_secs: 0, to, client_msg_id, body: body.to_vec() },
        );
        let payload = &f[HEADER_BYTES..HEADER_BYTES + frame::payload_len(&f)];
        for (i, chunk) in payload.chunks(part_bytes.max(1)).enumerate() {
            let h = protocol::part::PartHeader {
                id: client_msg_id,
                total: payload.len() as u32,
                offset: (i * part_bytes.max(1)) as u32,
                kind: kind::SEND,
            };
            self.write_raw(&frame::raw(kind::PART, &[&h.bytes(), chunk]))?;
        }
        Ok(())
    }

    /// Read until `pick` accepts an event; an `Error` answering `request_kind` becomes
    /// `ClientError::Server`, a `Kick` becomes `ClientError::Kicked`; others are kept.
    fn wait_for<T>(&mut self, request_kind: u16, mut pick: impl FnMut(&Event) -> Option<T>) -> Result<T> {
        // Events kept while waiting for something else come first.
        for i in 0..self.pending.len() {
            if let Some(t) = pick(&self.pending[i]) {
                self.pending.remove(i);
                return Ok(t);
            }
        }
        loop {
            let ev = self.read_event()?;
            if let Some(t) = pick(&ev) {
                return Ok(t);
            }
            match ev {
                Event::Error(e) if e.request_kind == request_kind => {
                    return Err(ClientError::Server {
                        code: e.code,
                        name: ErrorCode::from_u16(e.code),
                        message: e.message,
                    })
                }
                Event::Kick(k) => return Err(ClientError::Kicked(k.reason, ErrorCode::from_u16(k.reason))),
                other => self.pending.push_back(other),
            }
        }
    }

    pub fn register(&mut self, name: &str, password: &str) -> Result<u64> {
        self.send_frame(
            kind::REGISTER,
            &protocol::Register { name: name.into(), password: password.into() },
        )?;
        self.wait_for(kind::REGISTER, |e| match e {
            Event::RegisterOk(r) => Some(r.user_id),
            _ => None,
        })
    }

    pub fn login(
        &mut self,
        name: &str,
        password: &str,
        device_type: u8,
        device_id: &str,
    ) -> Result<protocol::LoginOk> {
        let l = protocol::Login {
            name: name.into(),
            password: password.into(),
            device_type,
            device_id: device_id.into(),
        };
        self.send_frame(kind::LOGIN, &l)?;
        self.wait_login(kind::LOGIN)
    }

    pub fn login_token(
        &mut self,
        token: &str,
        device_type: u8,
        device_id: &str,
    ) -> Result<protocol::LoginOk> {
        let l = protocol::LoginToken { token: token.into(), device_type, device_id: device_id.into() };
        self.send_frame(kind::LOGIN_TOKEN, &l)?;
        self.wait_login(kind::LOGIN_TOKEN)
    }

    fn wait_login(&mut self, k: u16) -> Result<protocol::LoginOk> {
        self.wait_for(k, |e| match e {
            Event::LoginOk(ok) => Some(ok.clone()),
            _ => None,
        })
    }

    pub fn issue_token(&mut self, ttl_secs: u32) -> Result<protocol::TokenIssued> {
        self.send_frame(kind::ISSUE_TOKEN, &protocol::IssueToken { ttl_secs })?;
        self.wait_for(kind::ISSUE_TOKEN, |e| match e {
            Event::TokenIssued(t) => Some(t.clone()),
            _ => None,
        })
    }

    pub fn ping(&mut self, nonce: u64) -> Result<protocol::Pong> {
        self.send_frame(kind::PING, &protocol::Ping { nonce })?;
        self.wait_for(kind::PING, |e| match e {
            Event::Pong(p) if p.nonce == nonce => Some(p.clone()),
            _ => None,
        })
    }

    /// Send a 1:1 message without waiting for its ack.
    pub fn send(&mut self, to: u64, client_msg_id: u64, body: &[u8]) -> Result<()> {
        self.send_to(conv::DIRECT, to, client_msg_id, body)
    }

    /// Send a message of conversation kind `conv` (`to`: a user, or a group) without waiting.
    pub fn send_to(&mut self, conv: u8, to: u64, client_msg_id: u64, body: &[u8]) -> Result<()> {
        self.send_flagged(conv, to, client_msg_id, 0, body)
    }

    /// [`Client::send_to`] with `Send::flags` ([`protocol::send_flags`]; `burn_secs` 0).
    pub fn send_flagged(
        &mut self,
        conv: u8,
        to: u64,
        client_msg_id: u64,
        flags: u8,
        body: &[u8],
    ) -> Result<()> {
        self.send_frame(
            kind::SEND,
            &protocol::Send { conv, flags, burn_secs: 0, to, client_msg_id, body: body.to_vec() },
        )
    }

    /// Recall message `seq` of a conversation (a Send with the RECALL flag) without waiting.
    pub fn recall_to(&mut self, conv: u8, to: u64, client_msg_id: u64, seq: u64) -> Result<()> {
        self.send_flagged(conv, to, client_msg_id, protocol::send_flags::RECALL, &seq.to_le_bytes())
    }

    /// Recall message `seq` of a conversation (a Send with the RECALL flag) and wait for the
    /// recall's ack (or its error).
    pub fn recall_wait(
        &mut self,
        conv: u8,
        to: u64,
        client_msg_id: u64,
        seq: u64,
    ) -> Result<protocol::SendAck> {
        self.recall_to(conv, to, client_msg_id, seq)?;
        self.wait_send(client_msg_id)
    }

    /// Send a 1:1 message and wait for its ack (or its error).
    pub fn send_wait(&mut self, to: u64, client_msg_id: u64, body: &[u8]) -> Result<protocol::SendAck> {
        self.send_wait_to(conv::DIRECT, to, client_msg_id, body)
    }

    /// Send a message to a group and wait for its ack (or its error).
    pub fn group_send_wait(
        &mut self,
        group: u64,
        client_msg_id: u64,
        body: &[u8],
    ) -> Result<protocol::SendAck> {
        self.send_wait_to(conv::GROUP, group, client_msg_id, body)
    }

    fn send_wait_to(
        &mut self,
        conv: u8,
        to: u64,
        client_msg_id: u64,
        body: &[u8],
    ) -> Result<protocol::SendAck> {
        self.send_to(conv, to, client_msg_id, body)?;
        self.wait_send(client_msg_id)
    }

    /// Send a message in parts (5.22) of the largest size a server with the default
    /// `frame_bytes_max` takes, and wait for its ack (or its error).
    pub fn send_large_wait(
        &mut self,
        conv: u8,
        to: u64,
        client_msg_id: u64,
        body: &[u8],
    ) -> Result<protocol::SendAck> {
        self.send_parts(conv, to, client_msg_id, 0, body, protocol::part::data_max(64 * 1024))?;
        self.wait_send(client_msg_id)
    }

    /// Wait for the ack (or the error) of the send `client_msg_id`.
    fn wait_send(&mut self, client_msg_id: u64) -> Result<protocol::SendAck> {
        self.wait_for(u16::MAX, |e| match e {
            Event::SendAck(a) if a.client_msg_id == client_msg_id => Some(Ok(a.clone())),
            Event::Error(err)
                if matches!(err.request_kind, kind::SEND | kind::PART)
                    && err.client_msg_id == client_msg_id =>
            {
                Some(Err(ClientError::Server {
                    code: err.code,
                    name: ErrorCode::from_u16(err.code),
                    message: err.message.clone(),
                }))
            }
            _ => None,
        })?
    }

    /// Acknowledge receipt of everything up to `seq` in a conversation.
    pub fn delivery_ack(&mut self, peer: u64, seq: u64) -> Result<()> {
        self.send_frame(kind::DELIVERY_ACK, &protocol::DeliveryAck { conv: conv::DIRECT, peer, seq })
    }

    /// Acknowledge receipt of everything up to `seq` of a group.
    pub fn group_delivery_ack(&mut self, group: u64, seq: u64) -> Result<()> {
        self.send_frame(kind::DELIVERY_ACK, &protocol::DeliveryAck { conv: conv::GROUP, peer: group, seq })
    }

    /// The next delivered message (other frames are kept for `recv`).
    pub fn next_delivery(&mut self) -> Result<Delivery> {
        if let Some(i) = self.pending.iter().position(|e| matches!(e, Event::Deliver(_))) {
            if let Some(Event::Deliver(d)) = self.pending.remove(i) {
                return Ok(d);
            }
        }
        self.wait_for(u16::MAX, |e| match e {
            Event::Deliver(d) => Some(d.clone()),
            _ => None,
        })
    }

    /// One page of a 1:1 conversation's history: with `older`, messages before `anchor_seq`
    /// (0: from the newest), newest first; else messages after it, oldest first.
    pub fn history(
        &mut self,
        peer: u64,
        anchor_seq: u64,
        older: bool,
        limit: u32,
    ) -> Result<(Vec<Delivery>, protocol::HistoryEnd)> {
        self.history_of(conv::DIRECT, peer, anchor_seq, older, limit)
    }

    /// As [`Client::history`], of a conversation of kind `conv` (a group: `peer` is its id).
    pub fn history_of(
        &mut self,
        conv: u8,
        peer: u64,
        anchor_seq: u64,
        older: bool,
        limit: u32,
    ) -> Result<(Vec<Delivery>, protocol::HistoryEnd)> {
        let h = protocol::History { conv, peer, anchor_seq, direction: u8::from(!older), limit };
        self.send_frame(kind::HISTORY, &h)?;
        let mut page = Vec::new();
        let end = self.wait_for(kind::HISTORY, |e| match e {
            Event::HistoryMsg(d) => {
                page.push(d.clone());
                None
            }
            Event::HistoryEnd(end) => Some(end.clone()),
            _ => None,
        });
        // `wait_for` kept the page's messages aside; they belong to this call, not to `recv`.
        self.pending.retain(|e| !matches!(e, Event::HistoryMsg(_)));
        Ok((page, end?))
    }

    /// Read until `CatchUpEnd`: the deliveries it closes, and the end itself (its count, and
    /// `unavailable` > 0 when store ranges did not answer). Other frames are kept.
    pub fn catch_up(&mut self) -> Result<(Vec<Delivery>, protocol::CatchUpEnd)> {
        let mut got = Vec::new();
        let end = self.wait_for(u16::MAX, |e| match e {
            Event::Deliver(d) => {
                got.push(d.clone());
                None
            }
            Event::CatchUpEnd(end) => Some(end.clone()),
            _ => None,
        });
        self.pending.retain(|e| !matches!(e, Event::Deliver(_)));
        Ok((got, end?))
    }

    /// A roster action ([`protocol::roster_action`]) on `user`; answered with whether the two
    /// are friends now.
    pub fn roster_action(&mut self, action: u8, user: u64, note: &str) -> Result<protocol::RosterOk> {
        self.send_frame(kind::ROSTER_ACTION, &protocol::RosterAction { action, user, note: note.into() })?;
        self.wait_for(kind::ROSTER_ACTION, |e| match e {
            Event::RosterOk(r) => Some(r.clone()),
            _ => None,
        })
    }

    /// Set this account's presence ([`protocol::presence_state`]); answered with it.
    pub fn presence_set(&mut self, state: u8, text: &str, extra: &[u8]) -> Result<protocol::PresenceEntry> {
        let p = protocol::PresenceSet { state, text: text.into(), extra: extra.to_vec() };
        self.send_frame(kind::PRESENCE_SET, &p)?;
        self.wait_for(kind::PRESENCE_SET, |e| match e {
            Event::PresenceList(l) => l.entries.first().cloned(),
            _ => None,
        })
    }

    /// The presence of some users, in the order asked.
    pub fn presence_get(&mut self, user_ids: &[u64]) -> Result<Vec<protocol::PresenceEntry>> {
        self.send_frame(kind::PRESENCE_GET, &protocol::PresenceGet { user_ids: user_ids.to_vec() })?;
        self.wait_for(kind::PRESENCE_GET, |e| match e {
            Event::PresenceList(l) => Some(l.entries.clone()),
            _ => None,
        })
    }

    /// One of this account's roster lists ([`protocol::roster_list`]).
    pub fn roster_get(&mut self, list: u8, after: u64, limit: u32) -> Result<protocol::RosterList> {
        self.send_frame(kind::ROSTER_GET, &protocol::RosterGet { list, after, limit })?;
        self.wait_for(kind::ROSTER_GET, |e| match e {
            Event::RosterList(r) => Some(r.clone()),
            _ => None,
        })
    }

    /// Tell the server this device has read a conversation up to `seq` (no answer unless
    /// refused).
    pub fn read(&mut self, conv: u8, peer: u64, seq: u64) -> Result<()> {
        self.send_frame(kind::READ, &protocol::Read { conv, peer, seq })
    }

    /// How far a conversation was read (`read_count`: users who read `seq`).
    pub fn read_get(&mut self, conv: u8, peer: u64, seq: u64) -> Result<protocol::ReadState> {
        self.send_frame(kind::READ_GET, &protocol::ReadGet { conv, peer, seq })?;
        self.wait_for(kind::READ_GET, |e| match e {
            Event::ReadState(r) => Some(r.clone()),
            _ => None,
        })
    }

    /// Log out and wait for the server's `Bye`.
    /// Send a stream message to `to`'s live sessions (never stored, never acknowledged).
    pub fn send_stream(&mut self, to: u64, client_msg_id: u64, body: &[u8]) -> Result<()> {
        self.send_frame(
            kind::STREAM,
            &protocol::Send {
                conv: conv::DIRECT,
                flags: 0,
                burn_secs: 0,
                to,
                client_msg_id,
                body: body.to_vec(),
            },
        )
    }

    /// Create a live room; its id.
    pub fn room_create(&mut self, publish: u8, subscribers_max: u32, publishers: &[u64]) -> Result<u64> {
        let c = protocol::RoomCreate { publish, subscribers_max, publishers: publishers.to_vec() };
        self.send_frame(kind::ROOM_CREATE, &c)?;
        self.wait_room_ok(kind::ROOM_CREATE).map(|ok| ok.room_id)
    }

    /// Subscribe to a live room; its subscriber count.
    pub fn room_subscribe(&mut self, room_id: u64) -> Result<u32> {
        self.send_frame(kind::ROOM_SUBSCRIBE, &protocol::RoomRef { room_id })?;
        self.wait_room_ok(kind::ROOM_SUBSCRIBE).map(|ok| ok.subscribers)
    }

    /// Unsubscribe from a live room; its subscriber count after.
    pub fn room_unsubscribe(&mut self, room_id: u64) -> Result<u32> {
        self.send_frame(kind::ROOM_UNSUBSCRIBE, &protocol::RoomRef { room_id })?;
        self.wait_room_ok(kind::ROOM_UNSUBSCRIBE).map(|ok| ok.subscribers)
    }

    /// Delete a live room (its creator only).
    pub fn room_delete(&mut self, room_id: u64) -> Result<()> {
        self.send_frame(kind::ROOM_DELETE, &protocol::RoomRef { room_id })?;
        self.wait_room_ok(kind::ROOM_DELETE).map(drop)
    }

    /// Publish to a live room. Nothing answers a publish that goes through.
    pub fn room_publish(&mut self, room_id: u64, client_msg_id: u64, body: &[u8]) -> Result<()> {
        self.send_frame(
            kind::ROOM_PUBLISH,
            &protocol::RoomPublish { room_id, client_msg_id, body: body.to_vec() },
        )
    }

    /// Create a group (the caller is its founder); its id.
    pub fn group_create(&mut self, profile: protocol::GroupProfile) -> Result<u64> {
        self.send_frame(kind::GROUP_CREATE, &protocol::GroupCreate { profile })?;
        self.wait_group_ok(kind::GROUP_CREATE).map(|ok| ok.group_id)
    }

    /// Replace a group's profile (managers).
    pub fn group_update(
        &mut self,
        group_id: u64,
        profile: protocol::GroupProfile,
    ) -> Result<protocol::GroupOk> {
        self.send_frame(kind::GROUP_UPDATE, &protocol::GroupUpdate { group_id, profile })?;
        self.wait_group_ok(kind::GROUP_UPDATE)
    }

    /// One group action (see [`protocol::group_action`]); `GroupOk.seq` is its notice's seq.
    pub fn group_action(
        &mut self,
        group_id: u64,
        action: u8,
        user_id: u64,
        until_ms: u64,
        note: &str,
    ) -> Result<protocol::GroupOk> {
        let a = protocol::GroupAction { group_id, action, user_id, until_ms, note: note.into() };
        self.send_frame(kind::GROUP_ACTION, &a)?;
        self.wait_group_ok(kind::GROUP_ACTION)
    }

    pub fn group_get(&mut self, group_id: u64) -> Result<protocol::GroupInfo> {
        self.send_frame(kind::GROUP_GET, &protocol::GroupRef { group_id })?;
        self.wait_for(kind::GROUP_GET, |e| match e {
            Event::GroupInfo(i) if i.group_id == group_id => Some(i.clone()),
            _ => None,
        })
    }

    pub fn group_members(
        &mut self,
        group_id: u64,
        after_user: u64,
        limit: u32,
    ) -> Result<protocol::GroupMemberPage> {
        self.send_frame(kind::GROUP_MEMBERS, &protocol::GroupMembers { group_id, after_user, limit })?;
        self.wait_for(kind::GROUP_MEMBERS, |e| match e {
            Event::GroupMemberPage(p) if p.group_id == group_id => Some(p.clone()),
            _ => None,
        })
    }

    pub fn group_requests(&mut self, group_id: u64) -> Result<protocol::GroupRequestPage> {
        self.send_frame(kind::GROUP_REQUESTS, &protocol::GroupRef { group_id })?;
        self.wait_for(kind::GROUP_REQUESTS, |e| match e {
            Event::GroupRequestPage(p) if p.group_id == group_id => Some(p.clone()),
            _ => None,
        })
    }

    pub fn my_groups(&mut self, after_group: u64, limit: u32) -> Result<protocol::GroupList> {
        self.send_frame(kind::MY_GROUPS, &protocol::MyGroups { after_group, limit })?;
        self.wait_for(kind::MY_GROUPS, |e| match e {
            Event::GroupList(l) => Some(l.clone()),
            _ => None,
        })
    }

    /// Tell `to` (a peer, `conv` 1, or a group, `conv` 2) this user is typing (`state` 1) or
    /// stopped (0). Nothing answers but a refusal.
    pub fn typing(&mut self, conv: u8, to: u64, state: u8) -> Result<()> {
        self.send_frame(kind::TYPING, &protocol::Typing { to, conv, state })
    }

    /// Replace this account's profile; the stored entry.
    pub fn profile_update(&mut self, profile: protocol::UserProfile) -> Result<protocol::ProfileEntry> {
        self.send_frame(kind::PROFILE_UPDATE, &protocol::ProfileUpdate { profile })?;
        self.wait_for(kind::PROFILE_UPDATE, |e| match e {
            Event::ProfileList(l) => l.profiles.first().cloned(),
            _ => None,
        })
    }

    /// The profiles of `user_ids` (those with an account), in that order.
    pub fn profile_get(&mut self, user_ids: &[u64]) -> Result<Vec<protocol::ProfileEntry>> {
        self.send_frame(kind::PROFILE_GET, &protocol::ProfileGet { user_ids: user_ids.to_vec() })?;
        self.wait_for(kind::PROFILE_GET, |e| match e {
            Event::ProfileList(l) => Some(l.profiles.clone()),
            _ => None,
        })
    }

    /// This account's live sessions, oldest login first.
    pub fn my_sessions(&mut self) -> Result<protocol::SessionList> {
        self.send_frame(kind::MY_SESSIONS, &protocol::MySessions { reserved: 0 })?;
        self.wait_for(kind::MY_SESSIONS, |e| match e {
            Event::SessionList(l) => Some(l.clone()),
            _ => None,
        })
    }

    /// Log session `session_id` of this account out; the sessions left.
    pub fn session_logout(&mut self, session_id: u64) -> Result<protocol::SessionList> {
        self.send_frame(kind::SESSION_LOGOUT, &protocol::SessionLogout { session_id })?;
        self.wait_for(kind::SESSION_LOGOUT, |e| match e {
            Event::SessionList(l) => Some(l.clone()),
            _ => None,
        })
    }

    fn wait_group_ok(&mut self, request_kind: u16) -> Result<protocol::GroupOk> {
        self.wait_for(request_kind, |e| match e {
            Event::GroupOk(ok) if ok.request_kind == request_kind => Some(ok.clone()),
            _ => None,
        })
    }

    fn wait_room_ok(&mut self, request_kind: u16) -> Result<protocol::RoomOk> {
        self.wait_for(request_kind, |e| match e {
            Event::RoomOk(ok) if ok.request_kind == request_kind => Some(ok.clone()),
            _ => None,
        })
    }

    pub fn logout(&mut self) -> Result<()> {
        self.send_frame(kind::LOGOUT, &protocol::Logout { reserved: 0 })?;
        self.wait_for(kind::LOGOUT, |e| matches!(e, Event::Bye).then_some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CatchUpEnd` encodes as docs/PROTOCOL.md 6.11 shows, byte for byte, and decodes back.
    #[test]
    fn catch_up_end_bytes_match_the_protocol_document() {
        let end = protocol::CatchUpEnd { count: 3, more: false, unavailable: 0 };
        let f = frame::encode(kind::CATCHUP_END, &end);
        #[rustfmt::skip]
        let want = [
            0x0c, 0, 0, 0, 0x6f, 0, 0, 0,
            3, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(f, want);
        let end = protocol::CatchUpEnd { count: 5000, more: true, unavailable: 1 };
        let f = frame::encode(kind::CATCHUP_END, &end);
        assert_eq!(&f[8..20], [0x88, 0x13, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
        match decode_event(kind::CATCHUP_END, &f[8..20]).unwrap() {
            Event::CatchUpEnd(got) => assert_eq!(got, end),
            other => panic!("decoded {other:?}"),
        }
    }
}

#[cfg(test)]
mod room_wire_tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
    }

    /// The room frames encode as docs/PROTOCOL.md 5.11, 6.12 and 7.2 show, byte for byte.
    #[test]
    fn room_frames_match_the_protocol_document() {
        let c = frame::encode(
            kind::ROOM_CREATE,
            &protocol::RoomCreate { publish: 1, subscribers_max: 100, publishers: vec![7] },
        );
        assert_eq!(
            hex(&c),
            "18 00 00 00 14 00 00 00 07 00 00 00 00 00 00 00 01 00 00 00 64 00 00 00 f0 ff ff ff 01 00 00 00"
        );
        let ok =
            frame::encode(kind::ROOM_OK, &protocol::RoomOk { room_id: 5, request_kind: 21, subscribers: 3 });
        assert_eq!(hex(&ok), "10 00 00 00 82 00 00 00 05 00 00 00 00 00 00 00 15 00 00 00 03 00 00 00");
        let missed = frame::encode(kind::MISSED, &protocol::Missed { id: 5, count: 2, source: 1 });
        assert_eq!(
            hex(&missed),
            "18 00 00 00 85 00 00 00 05 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00"
        );
        // A RoomMsg: the stamp written in place before the publish archive.
        let publish = frame::encode(
            kind::ROOM_PUBLISH,
            &protocol::RoomPublish { room_id: 5, client_msg_id: 9, body: b"hi".to_vec() },
        );
        let mut msg = crate::envelope::RoomRequest::blank_room_msg(&publish[HEADER_BYTES..]);
        RoomStamp { room_id: 5, seq: 3, ts_ms: 1767225600123, from: 1 }.write(&mut msg[HEADER_BYTES..]);
        assert_eq!(
            hex(&msg),
            "40 00 00 00 83 00 00 00 \
             05 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00 7b a8 da 76 9b 01 00 00 01 00 00 00 00 00 00 00 \
             68 69 00 00 00 00 00 00 05 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 e8 ff ff ff 02 00 00 00"
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
        match decode_event(kind::ROOM_MSG, &msg[HEADER_BYTES..]).unwrap() {
            Event::RoomMsg(m) => {
                assert_eq!((m.stamp.room_id, m.stamp.seq, m.stamp.from, m.client_msg_id), (5, 3, 1, 9));
                assert_eq!(m.body, b"hi");
            }
            other => panic!("{other:?}"),
        }
    }
}
