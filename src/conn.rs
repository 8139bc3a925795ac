//! Connections: a [`Session`] per accepted socket, a reader task (readiness, then `recv` into a
//! pooled aligned buffer; frames validated once and handled in place) and a writer task (queued
//! frames written with one `sendmsg` of many iovecs, no copying).
//!
//! An idle connection holds no read buffer: one is taken from the shard's pool only when the
//! socket is readable, and kept only while a frame is incomplete.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    io,
    os::fd::AsRawFd,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_channel::oneshot;
use monoio::net::TcpStream;

use crate::{
    auth,
    envelope::{AckInfo, Attach, Envelope, SessionRef, Submit},
    frame::{self, AlignedBuf, Parsed, HEADER_BYTES},
    protocol::{self, conv, kind, DeviceType, ErrorCode, Stamp},
    shard::direct_key,
    shard::{now_ms, user_shard, LocalNotify, Shard},
    sockio,
    store::{device_hash, Cursor, Page, StoreError, UserId},
};

/// Time a closing session gets to flush its last frames.
const CLOSE_FLUSH_MS: u64 = 1000;
/// Time a writer waits for a socket that accepts nothing before giving the session up.
const WRITE_STALL_MS: u64 = 60_000;
/// Bytes a `Send` archive may carry besides its body (its root struct and alignment padding).
pub const SEND_OVERHEAD_BYTES_MAX: usize = 64;

/// Answers that a reader waits for after posting a request to another shard.
enum Reply {
    Attach(Result<UserId, ErrorCode>),
    Token(Result<(), ErrorCode>),
}

pub struct Session {
    pub id: SessionRef,
    /// 0 until logged in.
    user: Cell<UserId>,
    outq: RefCell<VecDeque<Bytes>>,
    out_bytes: Cell<usize>,
    out_bytes_max: usize,
    writer: LocalNotify,
    reader: LocalNotify,
    inflight: Cell<u32>,
    inflight_max: u32,
    closing: Cell<bool>,
    reply: RefCell<Option<oneshot::Sender<Reply>>>,
    /// When the connection was accepted (for the login timeout).
    pub created: Instant,
    /// When bytes last arrived (for the idle timeout).
    last_rx: Cell<Instant>,
    /// A login is being checked: the login timeout waits for its answer.
    login_pending: Cell<bool>,
    /// Hash of the logged-in device id (see `store::device_hash`).
    device: Cell<u64>,
    /// Notified by the writer each time it has written: paced pushes wait on it.
    drained: LocalNotify,
}

impl Session {
    pub fn new(id: SessionRef, shard: &Shard) -> Session {
        let l = &shard.cfg().limits;
        Session {
            id,
            user: Cell::new(0),
            outq: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            out_bytes_max: l.session_outbound_bytes_max,
            writer: LocalNotify::default(),
            reader: LocalNotify::default(),
            inflight: Cell::new(0),
            inflight_max: l.inflight_per_session_max,
            closing: Cell::new(false),
            reply: RefCell::new(None),
            created: Instant::now(),
            last_rx: Cell::new(Instant::now()),
            login_pending: Cell::new(false),
            device: Cell::new(0),
            drained: LocalNotify::default(),
        }
    }

    /// The timeout this session has run into at `now`, if any. Checked by the shard's sweep
    /// ([`Shard::run_timeouts`]) rather than by a timer per read, which would be re-armed on
    /// every readiness wait. A session paused at its in-flight limit is not idle.
    pub fn timed_out(&self, now: Instant, login: Duration, idle: Duration) -> Option<ErrorCode> {
        if self.closing.get() {
            None
        } else if self.user() == 0 {
            let late = now.duration_since(self.created) >= login && !self.login_pending.get();
            late.then_some(ErrorCode::LoginTimeout)
        } else if self.inflight.get() < self.inflight_max && now.duration_since(self.last_rx.get()) >= idle {
            Some(ErrorCode::IdleTimeout)
        } else {
            None
        }
    }

    /// Close with an `Error` frame carrying `code`.
    pub fn fail(&self, code: ErrorCode) {
        self.push(Shard::error_frame(code, 0, 0));
        self.close();
    }

    pub fn user(&self) -> UserId {
        self.user.get()
    }

    /// Queue a frame for writing. A session over its outbound limit is closed as a slow consumer.
    pub fn push(&self, frame: Bytes) {
        if self.closing.get() {
            return;
        }
        if self.out_bytes.get() + frame.len() > self.out_bytes_max {
            self.push_unchecked(Shard::error_frame(ErrorCode::SlowConsumer, 0, 0));
            self.close();
            return;
        }
        self.push_unchecked(frame);
    }

    /// Queue a frame once the outbound queue is under half its limit: for long streams of
    /// stored messages, which must not trip the slow-consumer limit by themselves.
    pub async fn push_paced(&self, frame: Bytes) {
        while !self.closing.get() && self.out_bytes.get() + frame.len() > self.out_bytes_max / 2 {
            self.drained.wait().await;
        }
        self.push(frame);
    }

    fn push_unchecked(&self, frame: Bytes) {
        self.out_bytes.set(self.out_bytes.get() + frame.len());
        self.outq.borrow_mut().push_back(frame);
        self.writer.notify();
    }

    /// Flush what is queued, then close.
    pub fn close(&self) {
        if !self.closing.replace(true) {
            self.writer.notify();
            self.reader.notify();
        }
    }

    pub fn kick(&self, reason: ErrorCode) {
        if self.closing.get() {
            return;
        }
        let f = frame::encode(
            kind::KICK,
            &protocol::Kick { reason: reason.code(), message: reason.text().into() },
        );
        self.push_unchecked(Bytes::from(f));
        self.close();
    }

    pub fn on_acked(&self, ack: &AckInfo) {
        let f = frame::encode(
            kind::SEND_ACK,
            &protocol::SendAck {
                client_msg_id: ack.client_msg_id,
                msg_id: ack.msg_id,
                seq: ack.seq,
                ts_ms: ack.ts_ms,
                duplicate: ack.duplicate,
            },
        );
        self.push(Bytes::from(f));
        self.release_inflight();
    }

    pub fn on_rejected(&self, client_msg_id: u64, code: ErrorCode) {
        self.push(Shard::error_frame(code, kind::SEND, client_msg_id));
        self.release_inflight();
    }

    fn release_inflight(&self) {
        let n = self.inflight.get();
        debug_assert!(n > 0, "ack without a send in flight");
        self.inflight.set(n.saturating_sub(1));
        if n == self.inflight_max {
            // The reader resumes: the idle clock starts again from here.
            self.last_rx.set(Instant::now());
            self.reader.notify();
        }
    }

    pub fn on_attach_result(&self, user: UserId, result: Result<(), ErrorCode>) {
        self.answer(Reply::Attach(result.map(|()| user)));
    }

    pub fn on_token_result(&self, result: Result<(), ErrorCode>) {
        self.answer(Reply::Token(result));
    }

    fn answer(&self, r: Reply) {
        if let Some(tx) = self.reply.borrow_mut().take() {
            let _ = tx.send(r);
        }
    }

    fn expect_reply(&self) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        *self.reply.borrow_mut() = Some(tx);
        rx
    }
}

/// Serve one accepted connection until it closes, then clean up after it.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let id = shard.new_session_ref();
    let session = Rc::new(Session::new(id, &shard));
    shard.sessions.borrow_mut().insert(id.0, session.clone());
    if shard.shutting_down.get() {
        session.kick(ErrorCode::ShuttingDown);
    }
    let stream = Rc::new(stream);
    let writer = monoio::spawn(write_loop(stream.clone(), session.clone()));
    let mut reader = Reader { shard: &shard, session: &session, stream: &stream };
    reader.run().await;
    session.close();
    writer.await;
    shard.sessions.borrow_mut().remove(&id.0);
    let user = session.user();
    if user != 0 {
        shard.post(user_shard(user, shard.shards), Envelope::Detach { user, session: id });
    }
    shard.stats.accepted.set(shard.stats.accepted.get() + 1);
}

/// Refuse a connection over the shard's limit: one error frame, best effort, then close.
pub fn refuse(stream: TcpStream) {
    let f = Shard::error_frame(ErrorCode::TooManyConnections, 0, 0);
    // SAFETY: valid fd and buffer; MSG_DONTWAIT never blocks.
    unsafe {
        libc::send(stream.as_raw_fd(), f.as_ptr().cast(), f.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

enum Flow {
    Continue,
    Close,
}

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

struct Reader<'a> {
    shard: &'a Rc<Shard>,
    session: &'a Rc<Session>,
    stream: &'a Rc<TcpStream>,
}

impl Reader<'_> {
    async fn run(&mut self) {
        let fd = self.stream.as_raw_fd();
        let mut held: Option<AlignedBuf> = None;
        let mut try_first = false;
        loop {
            if self.session.closing.get() {
                break;
            }
            if try_first {
                // Reading again at once: give the shard's other tasks their turn first.
                tim_shards::yield_now().await;
            } else {
                // Timeouts close the session from the shard's sweep; the writer's shutdown(2)
                // then wakes this wait.
                if self.stream.readable(false).await.is_err() {
                    break;
                }
                if self.session.closing.get() {
                    break;
                }
            }
            let mut buf = held.take().unwrap_or_else(|| self.shard.take_buf());
            let spare = buf.spare();
            let want = spare.len();
            // SAFETY: `spare` is valid writable memory of `want` bytes; MSG_DONTWAIT never blocks.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
            if n < 0 {
                let err = io::Error::last_os_error();
                let again =
                    err.kind() == io::ErrorKind::WouldBlock || err.kind() == io::ErrorKind::Interrupted;
                self.keep_or_return(&mut held, buf);
                try_first = false;
                if again {
                    continue;
                }
                break;
            }
            if n == 0 {
                self.shard.put_buf(buf);
                break;
            }
            buf.end += n as usize;
            self.session.last_rx.set(Instant::now());
            // A full read suggests more is waiting: read again before arming readiness.
            try_first = n as usize == want;
            match self.frames(&mut buf).await {
                Flow::Continue => {}
                Flow::Close => {
                    self.shard.put_buf(buf);
                    break;
                }
            }
            self.keep_or_return(&mut held, buf);
        }
        if let Some(b) = held {
            self.shard.put_buf(b);
        }
    }

    fn keep_or_return(&self, held: &mut Option<AlignedBuf>, mut buf: AlignedBuf) {
        if buf.is_empty() {
            self.shard.put_buf(buf);
        } else {
            buf.compact();
            *held = Some(buf);
        }
    }

    /// Handle every whole frame at the front of `buf`. Grows `buf` when an incomplete frame
    /// is larger than it.
    async fn frames(&mut self, buf: &mut AlignedBuf) -> Flow {
        let frame_max = self.shard.cfg().limits.frame_bytes_max;
        loop {
            match frame::parse(buf.filled(), frame_max) {
                Parsed::Frame(h, total) => {
                    if h.kind == kind::SEND {
                        // Stop taking sends at the in-flight limit until acks come back.
                        while self.session.inflight.get() >= self.session.inflight_max {
                            self.session.reader.wait().await;
                            if self.session.closing.get() {
                                return Flow::Close;
                            }
                        }
                    }
                    let payload_end = HEADER_BYTES + h.len as usize;
                    let flow = {
                        let payload = &buf.filled()[HEADER_BYTES..payload_end];
                        self.frame(h.kind, payload).await
                    };
                    buf.start += total;
                    if let Flow::Close = flow {
                        return Flow::Close;
                    }
                    if self.session.closing.get() {
                        return Flow::Close;
                    }
                }
                Parsed::Partial { need } => {
                    if need > buf.capacity() {
                        let mut big = AlignedBuf::new(need);
                        let have = buf.filled().len();
                        big.spare()[..have].copy_from_slice(buf.filled());
                        big.end = have;
                        buf.clear();
                        *buf = big;
                    }
                    return Flow::Continue;
                }
                Parsed::TooLarge(h) => {
                    self.session.push(Shard::error_frame(ErrorCode::FrameTooLarge, h.kind, 0));
                    return Flow::Close;
                }
                Parsed::BadFlags(h) => {
                    self.session.push(Shard::error_frame(ErrorCode::BadHeader, h.kind, 0));
                    return Flow::Close;
                }
            }
        }
    }

    fn error(&self, code: ErrorCode, request_kind: u16) -> Flow {
        self.session.push(Shard::error_frame(code, request_kind, 0));
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

    /// Handle one validated-size frame. `payload` is the archive, read in place. Operations that
    /// wait (on a worker or another shard) are boxed: they are rare, and inline they would make
    /// every idle connection's task as large as the largest of them.
    async fn frame(&mut self, k: u16, payload: &[u8]) -> Flow {
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
                self.send(payload, m)
            }
            kind::DELIVERY_ACK => {
                let a = access!(protocol::ArchivedDeliveryAck);
                // Stores keep sequence numbers as signed 64-bit integers.
                let (peer, seq) = (a.peer.to_native(), a.seq.to_native().min(i64::MAX as u64));
                if a.conv != conv::DIRECT || peer == 0 {
                    return self.error(ErrorCode::InvalidConversation, k);
                }
                self.shard.stats.delivery_acks.set(self.shard.stats.delivery_acks.get() + 1);
                let user = self.session.user();
                let device = self.session.device.get();
                self.shard.note_cursor(Cursor { user, device, conv: direct_key(user, peer), seq });
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
                if h.conv != conv::DIRECT || peer == 0 || dir > 1 {
                    return self.error(ErrorCode::InvalidConversation, k);
                }
                Box::pin(self.history(peer, anchor, dir == 0, limit)).await
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
            kind::LOGOUT => {
                let _ = access!(protocol::ArchivedLogout);
                self.session.push(Bytes::from(frame::encode(kind::BYE, &protocol::Bye { reserved: 0 })));
                Flow::Close
            }
            _ => self.error(ErrorCode::UnknownKind, k),
        }
    }

    fn send(&self, payload: &[u8], m: &protocol::ArchivedSend) -> Flow {
        let client_msg_id = m.client_msg_id.to_native();
        let reject = |code: ErrorCode| {
            self.session.push(Shard::error_frame(code, kind::SEND, client_msg_id));
            Flow::Continue
        };
        if m.conv != conv::DIRECT {
            return reject(ErrorCode::InvalidConversation);
        }
        let to = m.to.to_native();
        if to == 0 {
            return reject(ErrorCode::UnknownRecipient);
        }
        // The payload is forwarded verbatim, so it may hold nothing but the body and the archive's
        // own few bytes: bytes the archive does not reference would travel to every recipient.
        if m.body.len() > self.shard.cfg().limits.body_bytes_max
            || payload.len() > m.body.len() + SEND_OVERHEAD_BYTES_MAX
        {
            return reject(ErrorCode::BodyTooLarge);
        }
        // The Deliver frame: header, blank stamp (filled by the conversation owner), and the
        // sender's archive, copied once; after this no byte of the body is touched again.
        let len = Stamp::BYTES + payload.len();
        let mut f = BytesMut::with_capacity(frame::frame_bytes(len));
        f.put_u32_le(len as u32);
        f.put_u16_le(kind::DELIVER);
        f.put_u16_le(0);
        f.put_bytes(0, Stamp::BYTES);
        f.put_slice(payload);
        f.put_bytes(0, frame::padded(len) - len);
        let sender = self.session.user();
        let sub = Submit {
            origin: self.session.id,
            sender,
            to,
            conv: conv::DIRECT,
            client_msg_id,
            sender_device: self.session.device.get(),
            frame: f,
        };
        self.session.inflight.set(self.session.inflight.get() + 1);
        let dst = crate::shard::conv_shard(crate::shard::direct_key(sender, to), self.shard.shards);
        self.shard.post(dst, Envelope::Submit(Box::new(sub)));
        Flow::Continue
    }

    async fn register(&self, name: String, password: String) -> Flow {
        if self.session.user() != 0 {
            return self.error(ErrorCode::AlreadyLoggedIn, kind::REGISTER);
        }
        if let Err(code) = auth::check_name(&name).and(auth::check_password(&password)) {
            return self.error(code, kind::REGISTER);
        }
        let shared = self.shard.shared.clone();
        let job = move || {
            let key = shared.auth.name_key(&name);
            let hash = shared.auth.hash_password(&password)?;
            shared.store.create_account(&key, hash).map_err(|e| match e {
                StoreError::NameTaken => ErrorCode::NameTaken,
                StoreError::Unavailable(m) => {
                    log::warn!("store: {m}");
                    ErrorCode::Internal
                }
            })
        };
        match self.shard.shared.workers.run(job).await {
            Ok(Ok(user_id)) => self.reply(kind::REGISTER_OK, &protocol::RegisterOk { user_id }),
            Ok(Err(code)) => self.error(code, kind::REGISTER),
            Err(_) => self.error(ErrorCode::Busy, kind::REGISTER),
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
        let shared = self.shard.shared.clone();
        let job = move || {
            let key = shared.auth.name_key(&name);
            match shared.store.account_by_name(&key) {
                Ok(Some(acc)) if shared.auth.verify_password(&acc.password_hash, &password) => Ok(acc.id),
                Ok(Some(_)) => Err(ErrorCode::WrongPassword),
                Ok(None) => Err(ErrorCode::UnknownUser),
                Err(e) => {
                    log::warn!("store: {e}");
                    Err(ErrorCode::Internal)
                }
            }
        };
        let user = match self.shard.shared.workers.run(job).await {
            Ok(Ok(user)) => user,
            Ok(Err(code)) => return self.error(code, kind::LOGIN),
            Err(_) => return self.error(ErrorCode::Busy, kind::LOGIN),
        };
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
        let attach = Attach { user, session: self.session.id, device_type, token };
        self.shard.post(user_shard(user, self.shard.shards), Envelope::Attach(Box::new(attach)));
        match rx.await {
            Ok(Reply::Attach(Ok(user))) => {
                let limits = &self.shard.cfg().limits;
                self.session.user.set(user);
                self.session.device.set(device_hash(user, device_id));
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
                };
                let flow = self.reply(kind::LOGIN_OK, &ok);
                if self.shard.shared.store.durable() {
                    // Taken after the user owner attached this session: every message stamped
                    // later is fanned out to it live, so catch-up stops here (a message stamped
                    // in the same millisecond may come both ways; clients drop repeats by seq).
                    let attached_ms = now_ms();
                    monoio::spawn(catch_up(self.shard.clone(), self.session.clone(), k, attached_ms));
                }
                flow
            }
            Ok(Reply::Attach(Err(code))) => self.error(code, k),
            Ok(Reply::Token(_)) | Err(_) => self.error(ErrorCode::Internal, k),
        }
    }

    /// Answer a `History` request: `HISTORY_MSG` frames, then `HISTORY_END`.
    async fn history(&self, peer: UserId, anchor: u64, older: bool, limit: u32) -> Flow {
        let max = self.shard.cfg().limits.history_page_max;
        let limit = if limit == 0 { max } else { limit.min(max) };
        let user = self.session.user();
        let conv_key = direct_key(user, peer);
        let store = self.shard.shared.store.clone();
        let page = match self
            .shard
            .shared
            .workers
            .run(move || store.history(conv_key, anchor, older, limit))
            .await
        {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                log::warn!("store: {e}");
                return self.error(ErrorCode::StoreUnavailable, kind::HISTORY);
            }
            Err(_) => return self.error(ErrorCode::Busy, kind::HISTORY),
        };
        let count = page.payloads.len() as u32;
        for p in page.payloads {
            self.session.push_paced(stored_frame(kind::HISTORY_MSG, &p)).await;
        }
        let end = protocol::HistoryEnd { conv: conv::DIRECT, peer, count, more: page.more };
        self.reply(kind::HISTORY_END, &end)
    }

    async fn issue_token(&self, ttl_secs: u32) -> Flow {
        let max = self.shard.cfg().limits.token_ttl_secs;
        let ttl = if ttl_secs == 0 { max } else { ttl_secs.min(max) };
        let user = self.session.user();
        let (text, hash) = auth::new_token(user);
        let expires_at_ms = now_ms() + ttl as u64 * 1000;
        let rx = self.session.expect_reply();
        let env = Envelope::StoreToken { user, session: self.session.id, hash, expires_at_ms };
        self.shard.post(user_shard(user, self.shard.shards), env);
        match rx.await {
            Ok(Reply::Token(Ok(()))) => {
                self.reply(kind::TOKEN_ISSUED, &protocol::TokenIssued { token: text, expires_at_ms })
            }
            Ok(Reply::Token(Err(code))) => self.error(code, kind::ISSUE_TOKEN),
            Ok(Reply::Attach(_)) | Err(_) => self.error(ErrorCode::Internal, kind::ISSUE_TOKEN),
        }
    }
}

/// Write queued frames until the session closes, then shut the socket down so the reader wakes.
async fn write_loop(stream: Rc<TcpStream>, session: Rc<Session>) {
    let fd = stream.as_raw_fd();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(sockio::IOV_MAX);
    'outer: loop {
        while session.outq.borrow().is_empty() {
            if session.closing.get() {
                break 'outer;
            }
            session.writer.wait().await;
        }
        let written = loop {
            let sent = sockio::send_frames(fd, &session.outq.borrow(), &mut iov);
            match sent {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !Box::pin(wait_writable(&stream, &session)).await {
                        break 'outer;
                    }
                }
                Err(_) => break 'outer,
            }
        };
        sockio::consume(&mut session.outq.borrow_mut(), written);
        session.out_bytes.set(session.out_bytes.get() - written);
        session.drained.notify();
    }
    session.closing.set(true);
    session.drained.notify();
    session.outq.borrow_mut().clear();
    session.out_bytes.set(0);
    // SAFETY: fd is open (the stream is alive); shutdown wakes the reader with EOF.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    session.reader.notify();
}

/// Wait until the socket takes more bytes. Gives up after `WRITE_STALL_MS`, or `CLOSE_FLUSH_MS`
/// once the session is closing (also when it starts closing during the wait).
async fn wait_writable(stream: &TcpStream, session: &Session) -> bool {
    let start = Instant::now();
    loop {
        let limit = if session.closing.get() { CLOSE_FLUSH_MS } else { WRITE_STALL_MS };
        let Some(left) = Duration::from_millis(limit).checked_sub(start.elapsed()) else {
            return false;
        };
        monoio::select! {
            r = monoio::time::timeout(left, stream.writable(false)) => return matches!(r, Ok(Ok(()))),
            _ = session.writer.wait() => {
                // Woken by new frames or by close(): re-check the limit and wait again.
            }
        }
    }
}

/// A frame of `k` around a stored `DELIVER` payload (stamp + Send archive), as delivered live.
fn stored_frame(k: u16, payload: &[u8]) -> Bytes {
    let mut f = BytesMut::with_capacity(frame::frame_bytes(payload.len()));
    f.put_u32_le(payload.len() as u32);
    f.put_u16_le(k);
    f.put_u16_le(0);
    f.put_slice(payload);
    f.put_bytes(0, frame::padded(payload.len()) - payload.len());
    f.freeze()
}

/// After a login on a durable store: send the device what it has not acknowledged and that was
/// stamped up to its attach (as `DELIVER` frames, paced by the writer), then `CATCHUP_END`. Live
/// deliveries (stamped after the attach) may interleave.
async fn catch_up(shard: Rc<Shard>, session: Rc<Session>, login_kind: u16, until: u64) {
    let l = &shard.cfg().limits;
    let (user, device) = (session.user(), session.device.get());
    let since = now_ms().saturating_sub(l.catchup_window_secs * 1000);
    let limit = l.catchup_messages_max;
    let store = shard.shared.store.clone();
    let page: Page =
        match shard.shared.workers.run(move || store.catch_up(user, device, since, until, limit)).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                log::warn!("store: catch-up of user {user}: {e}");
                session.push(Shard::error_frame(ErrorCode::StoreUnavailable, login_kind, 0));
                return;
            }
            Err(_) => {
                session.push(Shard::error_frame(ErrorCode::Busy, login_kind, 0));
                return;
            }
        };
    let count = page.payloads.len() as u32;
    for p in page.payloads {
        if session.closing.get() {
            return;
        }
        session.push_paced(stored_frame(kind::DELIVER, &p)).await;
    }
    session.push(Bytes::from(frame::encode(
        kind::CATCHUP_END,
        &protocol::CatchUpEnd { count, more: page.more },
    )));
}
