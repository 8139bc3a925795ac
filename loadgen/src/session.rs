//! Setting connections up: connect with bounded attempts, register the user where needed, log
//! in, log out. Request/answer helpers decode frames with `tim::client::decode_event` and are
//! bounded by a deadline; frames that are not the awaited answer are skipped.

use std::{
    io,
    time::{Duration, Instant},
};

use tim::{
    client::{decode_event, Event},
    protocol::{self, kind, ErrorCode, LoginOk},
};

use crate::{
    net::{self, FrameReader, Io},
    worker::Worker,
};

/// Longest wait for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before retrying a request refused with Busy/Internal, or a login of a user that is not
/// registered yet (its first connection registers it).
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Failed logins with UnknownUser after which a connection registers the user itself.
const REGISTER_AFTER_UNKNOWN: u32 = 25;

/// Why a request failed.
#[derive(Debug)]
pub enum Fail {
    Io(io::ErrorKind),
    Closed,
    Timeout,
    Refused(u16),
    Kicked(u16),
    Malformed,
}

impl Fail {
    /// A short name for the error tally, prefixed with what was attempted.
    pub fn name(&self, what: &str) -> String {
        match self {
            Fail::Io(k) => format!("{what}: {k:?}"),
            Fail::Closed => format!("{what}: closed by server"),
            Fail::Timeout => format!("{what}: timeout"),
            Fail::Refused(code) => {
                let c = ErrorCode::from_u16(*code).map_or_else(|| "Unknown".into(), |c| format!("{c:?}"));
                format!("{what}: {c}({code})")
            }
            Fail::Kicked(code) => format!("{what}: kicked ({code})"),
            Fail::Malformed => format!("{what}: malformed frame"),
        }
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail::Io(e.kind())
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).min(ANSWER_TIMEOUT)
}

/// Read until `pick` accepts an event. An `Error` answering `request_kind` is a refusal; a
/// `Kick` or end of stream ends the wait; anything else is skipped.
pub async fn answer<T>(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    request_kind: u16,
    deadline: Instant,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> Result<T, Fail> {
    let wait = async {
        loop {
            let Some((k, payload)) = rd.next(io, w).await? else {
                return Err(Fail::Closed);
            };
            // Frames of kinds this build does not know are skipped, not fatal.
            let Ok(ev) = decode_event(k, payload) else {
                if k == request_kind + 100 {
                    return Err(Fail::Malformed);
                }
                continue;
            };
            match ev {
                Event::Error(e) if e.request_kind == request_kind => return Err(Fail::Refused(e.code)),
                Event::Kick(k) => return Err(Fail::Kicked(k.reason)),
                ev => {
                    if let Some(t) = pick(ev) {
                        return Ok(t);
                    }
                }
            }
        }
    };
    match monoio::time::timeout(left(deadline), wait).await {
        Ok(r) => r,
        Err(_) => Err(Fail::Timeout),
    }
}

/// Connect connection `conn` (its `n`-th connection, for workers that reconnect), trying up to
/// `connect_attempts` times: the first attempt to the connection's own address (`conn` mod the
/// addresses), a failed one goes on to the next; `n` and the attempt pick the source address.
/// Failed attempts are counted as errors.
pub async fn connect(w: &Worker, conn: u32, n: u64, deadline: Instant) -> Option<Io> {
    let cfg = &w.g.cfg;
    for attempt in 0..cfg.connect_attempts as u64 {
        let k = n * cfg.connect_attempts as u64 + attempt;
        let timeout = cfg.connect_timeout.min(deadline.saturating_duration_since(Instant::now()));
        if timeout.is_zero() {
            w.stats.error("connect: timeout");
            return None;
        }
        let addr = cfg.addr_index(conn, attempt);
        match net::open(cfg, addr, cfg.source_for(conn, k), timeout, mask_seed(w, conn, k)).await {
            Ok(io) => return Some(io),
            Err(e) => {
                w.stats.error(&format!("connect: {}", net::error_name(&e)));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
    None
}

/// The seed of a connection's WebSocket masks: distinct per run, connection and attempt.
fn mask_seed(w: &Worker, conn: u32, n: u64) -> u64 {
    crate::global::mix(((w.g.run_id as u64) << 32) ^ ((conn as u64) << 8) ^ n)
}

/// One connect to address `addr_index` of the run (a reconnect; attempt `n` picks the source
/// address), within `timeout`.
pub async fn connect_to(
    w: &Worker,
    conn: u32,
    addr_index: usize,
    n: u64,
    timeout: Duration,
) -> io::Result<Io> {
    let cfg = &w.g.cfg;
    net::open(cfg, addr_index, cfg.source_for(conn, n), timeout, mask_seed(w, conn, n)).await
}

/// Register `name`; an existing name is fine. Retries Busy/Internal until `deadline`.
pub async fn register(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    name: &str,
    deadline: Instant,
) -> Result<(), Fail> {
    loop {
        let r = protocol::Register { name: name.into(), password: w.g.cfg.password.clone() };
        io.queue(kind::REGISTER, &r);
        io.flush().await?;
        let got = answer(w, io, rd, kind::REGISTER, deadline, |e| match e {
            Event::RegisterOk(_) => Some(()),
            _ => None,
        })
        .await;
        match got {
            Err(Fail::Refused(c)) if c == ErrorCode::NameTaken.code() => return Ok(()),
            Err(Fail::Refused(c)) if retryable(c) && Instant::now() < deadline => {
                w.stats.error(&Fail::Refused(c).name("register"));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// One login attempt.
pub async fn login(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    name: &str,
    device_type: u8,
    device_id: &str,
    deadline: Instant,
) -> Result<LoginOk, Fail> {
    let l = protocol::Login {
        name: name.into(),
        password: w.g.cfg.password.clone(),
        device_type,
        device_id: device_id.into(),
    };
    io.queue(kind::LOGIN, &l);
    io.flush().await?;
    answer(w, io, rd, kind::LOGIN, deadline, |e| match e {
        Event::LoginOk(ok) => Some(ok),
        _ => None,
    })
    .await
}

/// Log in connection `conn` as its user, registering the user first if `conn` is the user's
/// first connection (or if the user stays unknown for a while). Retries Busy/Internal and
/// UnknownUser until `deadline`.
pub async fn log_in(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    conn: u32,
    deadline: Instant,
) -> Result<LoginOk, Fail> {
    let cfg = &w.g.cfg;
    let name = cfg.user_name(cfg.user_of(conn));
    let device_id = device_id(conn);
    if cfg.rank_of(conn) == 0 {
        register(w, io, rd, &name, deadline).await?;
    }
    let mut unknown = 0u32;
    loop {
        match login(w, io, rd, &name, cfg.device_type_of(conn), &device_id, deadline).await {
            Ok(ok) => return Ok(ok),
            Err(Fail::Refused(c)) if Instant::now() < deadline && c == ErrorCode::UnknownUser.code() => {
                unknown += 1;
                if unknown.is_multiple_of(REGISTER_AFTER_UNKNOWN) {
                    register(w, io, rd, &name, deadline).await?;
                }
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            Err(Fail::Refused(c)) if Instant::now() < deadline && retryable(c) => {
                w.stats.error(&Fail::Refused(c).name("login"));
                monoio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Log connection `conn` in again as its user and device (a reconnect): one attempt, no
/// registration (the user exists since the setup).
pub async fn log_in_again(
    w: &Worker,
    io: &Io,
    rd: &mut FrameReader,
    conn: u32,
    deadline: Instant,
) -> Result<LoginOk, Fail> {
    let cfg = &w.g.cfg;
    let name = cfg.user_name(cfg.user_of(conn));
    login(w, io, rd, &name, cfg.device_type_of(conn), &device_id(conn), deadline).await
}

/// The device id of connection `conn`: stable over its reconnects, so that the server's
/// cursors and catch-up treat them as one device.
pub fn device_id(conn: u32) -> String {
    format!("lg{conn}")
}

/// Log out and wait for `Bye`.
pub async fn log_out(w: &Worker, io: &Io, rd: &mut FrameReader, deadline: Instant) -> Result<(), Fail> {
    io.queue(kind::LOGOUT, &protocol::Logout { reserved: 0 });
    io.flush().await?;
    answer(w, io, rd, kind::LOGOUT, deadline, |e| matches!(e, Event::Bye).then_some(())).await
}

/// Refusals worth another try of the same request: Busy (33), Internal (50), and 51 (the
/// message store did not commit in time).
pub fn retryable(code: u16) -> bool {
    code == ErrorCode::Busy.code()
        || code == ErrorCode::Internal.code()
        || code == ErrorCode::StoreUnavailable.code()
        || code == ErrorCode::NodeUnavailable.code()
        || code == ErrorCode::Timeout.code()
}
