//! `tim chat`: a terminal client beside `tim serve` — talk interactively, send piped lines, watch
//! messages as they arrive (like mosquitto_pub and mosquitto_sub), read a page of history.
//!
//! Key types: [`ChatArgs`] and [`Mode`] (the command line, wired into `src/main.rs`), [`Seen`]
//! (repeats and delivery acks per conversation), [`Outbox`] (sends waiting for their answer, and
//! their resends), [`Input`] (one interactive line), [`render`] and [`render_json`] (a message as
//! printed). Those take the time as an argument and do no I/O. The driver, `Session`, owns one
//! blocking [`Client`] and waits for a frame at most [`TICK`] at a time, so that one thread serves
//! the socket, the lines a helper thread reads from stdin, pings and Ctrl-C.
//!
//! Protocol v1 has no lookup of accounts by name (docs/PROTOCOL.md 8.2): peers are named by their
//! numeric user id, which `tim chat` prints at login so that people can exchange them.
//!
//! A message longer than `body_bytes_max` goes up in `Part` frames (5.22), one large message at a
//! time (`Session` queues the others); [`Client`] reassembles the `PartOut` frames (6.26) of
//! large messages received. Binary and long messages print as their size ([`message_text`]).
//! Peers' typing notices print ([`TypingShown`]); `tim chat` sends none: it reads whole lines
//! (the terminal's line editing), so it never sees a user start typing.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fmt,
    io::{self, BufRead, IsTerminal, Write},
    net::ToSocketAddrs,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, TryRecvError},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    client::{self, Client, ClientError, Delivery, Event},
    clock,
    protocol::{
        self, conv, group_action, group_event, kind, msg_state, presence_state, roster_action, roster_list,
        send_flags, ErrorCode, SendAck, Stamp,
    },
};

/// Where `tim serve` listens by default (`server.listen`, port 7100), seen from the same machine.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7100";
/// How long one wait for a frame lasts before the driver looks at stdin, pings and Ctrl-C.
pub const TICK: Duration = Duration::from_millis(50);
/// Connecting, and waiting for the answer to a request (login, history, group requests).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A write the server does not take within this long fails.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Logout waits this long for the server's `Bye`.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// Delivery acks go out at most this often (one per conversation with news).
const ACK_EVERY: Duration = Duration::from_millis(100);
/// A gap in a conversation's sequence holds its acks back this long; then it is taken for a hole
/// that a failed commit left, which is never filled (docs/PROTOCOL.md 8.3).
pub const GAP_WAIT_MS: u64 = 10_000;
/// Sequence numbers remembered per conversation to drop repeats (newest kept).
const SEEN_PER_CONVERSATION_MAX: usize = 512;
/// Messages shown and not yet acknowledged per conversation; past it a gap is given up. Above the
/// server's default `catchup_messages_max` (5000), so one catch-up fits.
const SHOWN_PER_CONVERSATION_MAX: usize = 8192;
/// Conversations tracked at once; past it the least recently used one is forgotten.
const CONVERSATIONS_MAX: usize = 4096;
/// Resends of a send answered Busy, StoreUnavailable, Timeout or NodeUnavailable.
const RESENDS_MAX: u32 = 5;
/// The pause before the first resend; it doubles with each.
const RESEND_PAUSE: Duration = Duration::from_millis(200);
/// Sends waiting for their answer at most (the server's `inflight_max` may be lower).
const OUTBOX_MAX: usize = 256;
/// Lines read from stdin ahead of their sends.
const LINES_QUEUED_MAX: usize = 64;
/// Lines handled per turn of the interactive loop.
const LINES_PER_TURN: usize = 16;
/// Bytes kept of one stdin line; a longer line is refused whole.
const LINE_BYTES_MAX: usize = 1 << 20;
/// On quitting, how long answers to sends in flight are waited for.
const EXIT_ANSWERS_WAIT: Duration = Duration::from_secs(10);
// Quitting waits out a send's whole resend schedule.
const _: () = assert!(RESEND_PAUSE.as_millis() * ((1 << RESENDS_MAX) - 1) < EXIT_ANSWERS_WAIT.as_millis());
/// `watch --count` reached before the login's catch-up ended: its end is waited for this long at
/// most (its messages left unacknowledged come again at the next login)…
const CATCH_UP_DRAIN_MAX: Duration = Duration::from_secs(5);
/// …or until no message came for this long (the memory store sends no catch-up at all).
const CATCH_UP_QUIET: Duration = Duration::from_millis(300);
/// Messages in one `history` page unless `--limit` says otherwise.
pub const HISTORY_PAGE_DEFAULT: u32 = 20;
/// Interactive mode tells how far the current conversation was read at most this often.
const READ_EVERY: Duration = Duration::from_secs(1);
/// Groups `/groups` lists.
const GROUPS_LISTED_MAX: u32 = 50;
/// `/friends` and `/requests` list at most this many entries of a list.
const ROSTER_LISTED_MAX: usize = 1000;
/// A peer's "typing" prints at most this often (it repeats its notice every few seconds).
pub const TYPING_SHOWN_EVERY: Duration = Duration::from_secs(5);
/// Bytes of a message's text printed at most; a longer one is cut and its size said.
pub const MESSAGE_SHOWN_BYTES_MAX: usize = 2048;

// ---------------------------------------------------------------------------------------------
// The command line.

/// `tim chat`: who to log in as, then what to do.
#[derive(clap::Args, Debug)]
#[command(after_help = "Peers are named by user id (protocol v1 has no lookup by name): tim chat \
                        prints yours at login. Group ids (2^62 and up) are recognised as such. \
                        Exit status: 0 done, 1 refused or failed (the error code's name is on \
                        stderr), 2 bad usage.")]
pub struct ChatArgs {
    /// The server's client address.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_ADDR, global = true)]
    pub addr: String,
    /// Account name to log in with.
    #[arg(long, short, value_name = "NAME", global = true)]
    pub user: Option<String>,
    /// Password (else the TIM_PASSWORD environment variable, else a prompt on the terminal).
    #[arg(long, value_name = "PASS", global = true)]
    pub password: Option<String>,
    /// Log in with a one-shot token (from IssueToken) instead of a name and password.
    #[arg(long, value_name = "TOKEN", global = true, conflicts_with_all = ["user", "password", "register"])]
    pub token: Option<String>,
    /// Register the account first (one that exists already is fine if the login then works).
    #[arg(long, global = true)]
    pub register: bool,
    /// This device's id: delivery cursors and the catch-up after login are per device
    /// [default: tim-chat@HOSTNAME].
    #[arg(long, value_name = "ID", global = true)]
    pub device_id: Option<String>,
    /// Device type. Sessions are limited per account and device type (2 by default): a login
    /// past the limit replaces the account's oldest session of that type.
    #[arg(long, value_enum, default_value = "other", global = true)]
    pub device_type: DeviceType,
    /// What to do (default on a terminal: interactive).
    #[command(subcommand)]
    pub mode: Option<Mode>,
}

/// The modes of `tim chat`.
#[derive(clap::Subcommand, Debug)]
pub enum Mode {
    /// Print messages as they arrive and send the lines you type (/help lists the commands).
    Interactive {
        /// Start talking to this user id (or group id).
        #[arg(long, value_name = "ID", value_parser = parse_id)]
        to: Option<u64>,
    },
    /// Send TEXT as one message, or else each line of stdin as one message (empty lines are
    /// skipped); exit 0 once every one is acknowledged.
    Send {
        /// The recipient: a user id, or a group id.
        #[arg(long, value_name = "ID", value_parser = parse_id)]
        to: u64,
        /// The recipient is a group (a group id is recognised without it).
        #[arg(long)]
        group: bool,
        /// The message; several words are joined with spaces.
        #[arg(value_name = "TEXT")]
        text: Vec<String>,
    },
    /// Print the messages this device missed, then messages as they arrive, until interrupted;
    /// acknowledge them so that the next login starts after them.
    Watch {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after N messages (group notices are printed, not counted).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Print a page of a conversation's stored messages, oldest first, and exit.
    History {
        /// The other user's id, or a group id.
        #[arg(long, value_name = "ID", value_parser = parse_id)]
        with: u64,
        /// The conversation is a group (a group id is recognised without it).
        #[arg(long)]
        group: bool,
        /// Messages in the page at most (the server caps it: history_page_max).
        #[arg(long, value_name = "N", default_value_t = HISTORY_PAGE_DEFAULT)]
        limit: u32,
        /// Only messages before this sequence number (default: up to the newest).
        #[arg(long, value_name = "SEQ")]
        before: Option<u64>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// `device_type` of Login (docs/PROTOCOL.md section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceType {
    Other = 0,
    Mobile = 1,
    Tablet = 2,
    Desktop = 3,
    Web = 4,
}

/// A user or group id: decimal, or hex after `0x`.
pub fn parse_id(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| {
        format!(
            "{text:?} is not an id: protocol v1 has no lookup by name, so give the numeric user id \
             (tim chat prints it at login)"
        )
    })
}

/// Where a message goes: a user, or a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    User(u64),
    Group(u64),
}

impl Target {
    /// `id` as a recipient; `group` insists on a group id. Group ids are recognised by their
    /// range either way (no user id lies in it).
    pub fn of(id: u64, group: bool) -> Result<Target, String> {
        if protocol::is_group_id(id) {
            Ok(Target::Group(id))
        } else if group {
            Err(format!("{id} is not a group id (group ids lie in [2^62, 2^63))"))
        } else if id == 0 {
            Err("0 is no user id".into())
        } else {
            Ok(Target::User(id))
        }
    }

    pub fn conv(self) -> u8 {
        match self {
            Target::User(_) => conv::DIRECT,
            Target::Group(_) => conv::GROUP,
        }
    }

    pub fn id(self) -> u64 {
        match self {
            Target::User(id) | Target::Group(id) => id,
        }
    }

    fn key(self) -> ConvKey {
        ConvKey { conv: self.conv(), peer: self.id() }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::User(id) => write!(f, "user {id}"),
            Target::Group(id) => write!(f, "group {id}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and notes.

/// Why `tim chat` stops with a failure.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The server refused a request: its error code and text.
    #[error("{doing}: {}", code_text(*code, message))]
    Refused { doing: &'static str, code: u16, message: String },
    #[error("kicked by the server: {}", code_text(*reason, message))]
    Kicked { reason: u16, message: String },
    #[error("{doing}: {source}")]
    Client { doing: &'static str, source: ClientError },
    #[error("writing the output: {0}")]
    Output(io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl ChatError {
    fn client(doing: &'static str) -> impl Fn(ClientError) -> ChatError {
        move |e| match e {
            ClientError::Server { code, message, .. } => ChatError::Refused { doing, code, message },
            ClientError::Kicked(reason, _) => ChatError::Kicked { reason, message: String::new() },
            source => ChatError::Client { doing, source },
        }
    }

    fn refused(doing: &'static str, e: &protocol::Error) -> ChatError {
        ChatError::Refused { doing, code: e.code, message: e.message.clone() }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            ChatError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// `WrongPassword (13): wrong password`: the code's name first, as scripts grep for it.
pub fn code_text(code: u16, message: &str) -> String {
    let name = ErrorCode::from_u16(code).map_or_else(|| "UnknownError".to_string(), |c| format!("{c:?}"));
    if message.is_empty() {
        format!("{name} ({code})")
    } else {
        format!("{name} ({code}): {message}")
    }
}

/// A line on stderr, which carries everything but the messages themselves.
fn note(text: impl fmt::Display) {
    let _ = writeln!(io::stderr(), "tim chat: {text}");
}

// ---------------------------------------------------------------------------------------------
// Repeats and delivery acks, without I/O.

/// A conversation as this user sees it: its kind and the other side (a user, or the group).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvKey {
    pub conv: u8,
    pub peer: u64,
}

impl ConvKey {
    /// The conversation of a delivered message: a group's is the group; a 1:1 message's is the
    /// sender, or the recipient for this user's own messages (docs/PROTOCOL.md 5.8).
    pub fn of(stamp: &Stamp, me: u64) -> ConvKey {
        let peer = if stamp.conv == conv::GROUP || stamp.from == me { stamp.to } else { stamp.from };
        ConvKey { conv: stamp.conv, peer }
    }
}

/// What this session received and showed, per conversation: drops repeats (the server delivers
/// at least once, docs/PROTOCOL.md 8.3) and says which delivery acks are due.
///
/// An ack is cumulative and moves the device's cursor, and the next login's catch-up starts
/// above it (8.13), so an ack never goes past a message not shown yet: per conversation it covers
/// the run of shown messages from the lowest one received in this session. A gap in that run
/// holds the acks back for [`GAP_WAIT_MS`] (a late message, or the rest of a catch-up), then is
/// taken for a hole that is never filled — unless the catch-up said more was waiting than it
/// sent: the gap is then the rest, and is kept for the next login.
///
/// Acks wait for the login's catch-up to end (a live message can overtake the catch-up's older
/// ones of its conversation), stop while a `Resync`'s catch-up runs, and stop for good if a
/// catch-up failed. The memory store sends no catch-up and keeps no cursors: no acks are sent.
#[derive(Debug, Default)]
pub struct Seen {
    convs: HashMap<ConvKey, ConvState>,
    acking: bool,
    catch_up_failed: bool,
    keep_gaps: bool,
    uses: u64,
}

#[derive(Debug)]
struct ConvState {
    /// The newest sequence numbers received.
    seen: BTreeSet<u64>,
    /// The lowest sequence number received in this session.
    low: u64,
    /// The highest acknowledged (0: none yet).
    acked: u64,
    /// Shown, above `acked`.
    shown: BTreeSet<u64>,
    /// When the gap above the acknowledged run was first met.
    gap_since_ms: Option<u64>,
    used: u64,
}

impl Seen {
    /// Record a delivered message; false if it is a repeat.
    pub fn receive(&mut self, key: ConvKey, seq: u64) -> bool {
        self.uses += 1;
        let uses = self.uses;
        if !self.convs.contains_key(&key) && self.convs.len() >= CONVERSATIONS_MAX {
            self.forget_one();
        }
        let c = self.convs.entry(key).or_insert_with(|| ConvState {
            seen: BTreeSet::new(),
            low: seq,
            acked: 0,
            shown: BTreeSet::new(),
            gap_since_ms: None,
            used: uses,
        });
        c.used = uses;
        if !c.seen.insert(seq) {
            return false;
        }
        if c.seen.len() > SEEN_PER_CONVERSATION_MAX {
            c.seen.pop_first();
        }
        c.low = c.low.min(seq);
        true
    }

    /// A received message was shown: it may be acknowledged.
    pub fn shown(&mut self, key: ConvKey, seq: u64) {
        if let Some(c) = self.convs.get_mut(&key) {
            if seq > c.acked {
                c.shown.insert(seq);
                if c.shown.len() > SHOWN_PER_CONVERSATION_MAX {
                    c.shown.pop_first();
                }
            }
        }
    }

    /// `CatchUpEnd` arrived: acks may go out. `more`: the catch-up left messages out.
    pub fn catch_up_ended(&mut self, more: bool) {
        self.acking = !self.catch_up_failed;
        self.keep_gaps |= more;
    }

    /// A `Resync` arrived: a catch-up follows; acks wait for its end.
    pub fn catch_up_started(&mut self) {
        self.acking = false;
    }

    /// A catch-up could not be read: what it would have sent is unknown, so nothing is
    /// acknowledged in this session (the next login's catch-up sends it all again).
    pub fn catch_up_failed(&mut self) {
        self.catch_up_failed = true;
        self.acking = false;
    }

    /// Whether a catch-up may still be under way (acks wait for it).
    pub fn catch_up_pending(&self) -> bool {
        !self.acking && !self.catch_up_failed
    }

    /// The acks due at `now_ms`: per conversation, the highest sequence number of its run of
    /// shown messages.
    pub fn due(&mut self, now_ms: u64) -> Vec<(ConvKey, u64)> {
        let mut due = Vec::new();
        if !self.acking {
            return due;
        }
        for (key, c) in &mut self.convs {
            if c.shown.is_empty() {
                continue;
            }
            let mut next = if c.acked == 0 { c.low } else { c.acked.saturating_add(1) };
            while let Some(&first) = c.shown.first() {
                if first < next {
                    c.shown.pop_first();
                } else if first == next {
                    c.shown.pop_first();
                    next = next.saturating_add(1);
                    c.gap_since_ms = None;
                } else {
                    // A gap: [next, first) is missing.
                    let since = *c.gap_since_ms.get_or_insert(now_ms);
                    let waited = now_ms.saturating_sub(since) >= GAP_WAIT_MS && !self.keep_gaps;
                    let overfull = c.shown.len() >= SHOWN_PER_CONVERSATION_MAX;
                    let held = c.seen.range(next..first).next().is_some();
                    if (waited || overfull) && !held {
                        next = first;
                        c.gap_since_ms = None;
                    } else {
                        break;
                    }
                }
            }
            let top = next.saturating_sub(1);
            if top > c.acked {
                c.acked = top;
                due.push((*key, top));
            }
        }
        due
    }

    /// Forget the least recently used conversation, one with nothing left to acknowledge if
    /// there is one.
    fn forget_one(&mut self) {
        let victim =
            self.convs.iter().min_by_key(|(_, c)| (!c.shown.is_empty(), c.used)).map(|(key, _)| *key);
        if let Some(key) = victim {
            self.convs.remove(&key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sends waiting for their answer, without I/O.

/// A message sent and not yet answered.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub target: Target,
    /// `Send::flags`: 0, or [`send_flags::RECALL`] for a recall (its body the seq).
    pub flags: u8,
    pub body: Vec<u8>,
    /// Its line of stdin (send mode), for the error message.
    pub line: Option<u64>,
    resends: u32,
    resend_at: Option<Instant>,
}

/// What an `Error` answering a send means.
#[derive(Debug)]
pub enum Answer {
    /// Busy, StoreUnavailable, Timeout or NodeUnavailable: sent again later with the same
    /// `client_msg_id` (docs/PROTOCOL.md 8.4); `Outbox::due` says when.
    Retry,
    /// Refused for good (or retried enough).
    Refused(Outgoing),
    /// It answers no send of this outbox.
    Stray,
}

/// Sends waiting for their `SendAck` or `Error`, by `client_msg_id`.
#[derive(Debug)]
pub struct Outbox {
    next_id: u64,
    waiting: HashMap<u64, Outgoing>,
}

impl Outbox {
    /// `first_id`: a random start, so that ids stay unique for the account over its devices
    /// and runs (8.4); they count up from it.
    pub fn new(first_id: u64) -> Outbox {
        Outbox { next_id: first_id, waiting: HashMap::new() }
    }

    /// Keep a new message; its `client_msg_id`, for the `Send` to write now.
    pub fn add(&mut self, target: Target, body: Vec<u8>, line: Option<u64>) -> u64 {
        self.add_flagged(target, 0, body, line)
    }

    /// Keep a recall of message `seq` of `target`'s conversation; its `client_msg_id`.
    pub fn add_recall(&mut self, target: Target, seq: u64) -> u64 {
        self.add_flagged(target, send_flags::RECALL, seq.to_le_bytes().to_vec(), None)
    }

    fn add_flagged(&mut self, target: Target, flags: u8, body: Vec<u8>, line: Option<u64>) -> u64 {
        let mut id = self.next_id;
        while id == 0 || self.waiting.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        self.waiting.insert(id, Outgoing { target, flags, body, line, resends: 0, resend_at: None });
        id
    }

    /// Its `SendAck` came: the message, if it was waiting.
    pub fn acked(&mut self, ack: &SendAck) -> Option<Outgoing> {
        self.waiting.remove(&ack.client_msg_id)
    }

    /// An `Error` answered a send (`request_kind` Send).
    pub fn refused(&mut self, e: &protocol::Error, now: Instant) -> Answer {
        let Some(m) = self.waiting.get_mut(&e.client_msg_id) else {
            return Answer::Stray;
        };
        let retry = matches!(
            ErrorCode::from_u16(e.code),
            Some(
                ErrorCode::Busy
                    | ErrorCode::StoreUnavailable
                    | ErrorCode::Timeout
                    | ErrorCode::NodeUnavailable
            )
        );
        if retry && m.resends < RESENDS_MAX {
            m.resend_at = Some(now + RESEND_PAUSE * (1 << m.resends));
            m.resends += 1;
            return Answer::Retry;
        }
        match self.waiting.remove(&e.client_msg_id) {
            Some(m) => Answer::Refused(m),
            None => Answer::Stray,
        }
    }

    /// Messages whose resend is due at `now`: `(client_msg_id, target, flags, body)`.
    pub fn due(&mut self, now: Instant) -> Vec<(u64, Target, u8, Vec<u8>)> {
        let mut due = Vec::new();
        for (id, m) in &mut self.waiting {
            if m.resend_at.is_some_and(|at| at <= now) {
                m.resend_at = None;
                due.push((*id, m.target, m.flags, m.body.clone()));
            }
        }
        due
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Typing notices, without I/O.

/// Which peers' typing was printed, and when: "typing" prints at most once per
/// [`TYPING_SHOWN_EVERY`] per peer and conversation (peers repeat it every few seconds while
/// they type), "stopped" only after a "typing" that no message of theirs followed.
#[derive(Debug, Default)]
pub struct TypingShown {
    shown: HashMap<(ConvKey, u64), Instant>,
}

impl TypingShown {
    /// A `TypingNotice` came at `now`: the line to print, if any. This user's own (from another
    /// device, in a group) print nothing.
    pub fn notice(&mut self, n: &protocol::TypingNotice, me: u64, now: Instant) -> Option<String> {
        if n.from == me {
            return None;
        }
        let peer = if n.conv == conv::GROUP { n.to } else { n.from };
        let key = (ConvKey { conv: n.conv, peer }, n.from);
        if n.state == 0 {
            return self.shown.remove(&key).map(|_| typing_text(n, me));
        }
        if self.shown.get(&key).is_some_and(|&at| now.saturating_duration_since(at) < TYPING_SHOWN_EVERY) {
            return None;
        }
        if self.shown.len() >= CONVERSATIONS_MAX {
            self.shown.retain(|_, at| now.saturating_duration_since(*at) < TYPING_SHOWN_EVERY);
        }
        if self.shown.len() < CONVERSATIONS_MAX {
            self.shown.insert(key, now);
        }
        Some(typing_text(n, me))
    }

    /// A message was printed: its sender has stopped typing it (their next notice prints).
    pub fn message(&mut self, d: &Delivery, me: u64) {
        self.shown.remove(&(ConvKey::of(&d.stamp, me), d.stamp.from));
    }
}

/// A typing notice, as printed: `* 2 is typing…`, `* 2 stopped typing`, with ` in group G` for a
/// group's.
pub fn typing_text(n: &protocol::TypingNotice, me: u64) -> String {
    let place = if n.conv == conv::GROUP { format!(" in group {}", n.to) } else { String::new() };
    match n.state {
        0 => format!("* {} stopped typing{place}", who(n.from, me)),
        _ => format!("* {} is typing{place}…", who(n.from, me)),
    }
}

// ---------------------------------------------------------------------------------------------
// Interactive lines, without I/O.

/// One line typed in interactive mode.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Empty,
    /// Send to the current target.
    Say(Vec<u8>),
    /// `/to ID`, or `@ID [text]`: talk to ID (and send the text to it).
    To(String, Option<Vec<u8>>),
    /// `/group ID`.
    Group(String),
    /// `/history [N]`: the page of older messages.
    History(Option<u32>),
    /// `/groups`: the groups this user is in.
    Groups,
    /// `/create NAME`: a new open group.
    Create(String),
    /// `/join ID`.
    Join(String),
    /// `/leave`: the current group.
    Leave,
    /// `/invite ID`: a user into the current group.
    Invite(String),
    Whoami,
    /// `/sessions`: this account's live sessions.
    Sessions,
    /// `/logout ID`: log one of this account's sessions out.
    LogoutSession(String),
    /// `/nick NAME`: set this account's nickname (empty: clear it).
    Nick(String),
    /// `/profile ID`: a user's profile.
    Profile(String),
    /// `/recall SEQ`: take back message SEQ of the current conversation.
    Recall(String),
    /// `/seen [SEQ]`: how many read message SEQ (the newest shown) of the current conversation.
    Seen(Option<String>),
    /// `/friends`: friends (and the users blocked).
    Friends,
    /// `/requests`: friend requests to and from this user.
    Requests,
    /// `/watches`: presence watches both ways, and watch requests.
    Watches,
    /// A roster action ([`protocol::roster_action`]) on a user, with a note (`/add ID [NOTE]`,
    /// `/accept ID`, `/reject ID`, `/cancel ID`, `/unfriend ID`, `/block ID`, `/unblock ID`,
    /// `/watch ID`, `/allow ID`, `/deny ID`, `/unwatch ID`, `/revoke ID`).
    Roster(u8, String, String),
    /// `/status STATE [TEXT]`: set this user's presence (a [`presence_state`]) and status text.
    Status(u8, String),
    /// `/presence ID...`: users' presence.
    Presence(Vec<String>),
    /// `/file PATH`: send a file's bytes as one message to the current target.
    File(String),
    Help,
    Quit,
    /// A command not understood (the line as typed).
    Unknown(String),
}

pub const HELP: &str = "\
commands:
  TEXT             send TEXT to the current user or group
  @ID TEXT         send TEXT to user (or group) ID, and keep talking to it
  /to ID           talk to user ID (a numeric user id: there is no lookup by name)
  /group ID        talk to group ID
  /history [N]     the N (20) messages before those shown by the last /history
  /groups          the groups you are in
  /create NAME     create an open group and talk to it
  /join ID         join group ID (or ask to, if a manager approves members)
  /invite ID       add user ID to the current group
  /leave           leave the current group
  /whoami          your user id
  /sessions        your account's sessions (on every device)
  /logout ID       log session ID of your account out (from /sessions)
  /nick [NAME]     set your nickname (none: clear it)
  /profile ID      user ID's profile
  /recall SEQ      take back message SEQ (the #SEQ of its line) of the current conversation
  /seen [SEQ]      how many read message SEQ (the newest shown) of the current conversation
  /friends         your friends (and the users you block)
  /requests        friend requests to you and from you
  /add ID [NOTE]   ask user ID to be friends (with a note); accepts if ID asked you first
  /accept ID       accept user ID's friend request
  /reject ID       turn user ID's friend request down
  /cancel ID       withdraw your friend request to user ID
  /unfriend ID     end the friendship with user ID
  /block ID        block user ID: no messages or requests from it
  /unblock ID      unblock user ID
  /watch ID        ask to see user ID's presence without being friends (ID answers /allow or /deny)
  /allow ID        let user ID, who asked, see your presence    /deny ID: turn the ask down
  /unwatch ID      stop watching user ID's presence (or withdraw the ask)
  /revoke ID       stop user ID watching your presence
  /watches         who watches your presence, whose you watch, and the asks
  /status STATE [TEXT]  set your presence: online, away, busy or invisible, with a status text
  /presence ID...  the presence of users (friends' and watched users' changes are told as they come)
  /file PATH       send the file's bytes as one message (up to the server's large_body_bytes_max,
                   8 MiB by default; lines and files over body_bytes_max go up in parts)
  /quit            leave (Ctrl-D and Ctrl-C too)
  //TEXT           send TEXT starting with one /";

/// Read one interactive line.
pub fn parse_input(line: &[u8]) -> Input {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Input::Empty;
    }
    if let Some(rest) = line.strip_prefix(b"//") {
        return Input::Say([&b"/"[..], rest].concat());
    }
    if let Some(rest) = line.strip_prefix(b"@") {
        let end = rest.iter().position(u8::is_ascii_whitespace).unwrap_or(rest.len());
        let who = String::from_utf8_lossy(&rest[..end]).into_owned();
        let text = rest[end..].trim_ascii_start();
        return Input::To(who, (!text.is_empty()).then(|| text.to_vec()));
    }
    let Some(command) = line.strip_prefix(b"/") else {
        return Input::Say(line.to_vec());
    };
    let command = String::from_utf8_lossy(command);
    let (name, rest) = command.trim().split_once(char::is_whitespace).unwrap_or((command.trim(), ""));
    let rest = rest.trim();
    let mut words = rest.split_whitespace();
    let (arg, extra) = (words.next(), words.next());
    match (name, arg, extra) {
        ("to", Some(id), None) => Input::To(id.into(), None),
        ("group", Some(id), None) => Input::Group(id.into()),
        ("history", None, _) => Input::History(None),
        ("history", Some(n), None) => match n.parse() {
            Ok(n) => Input::History(Some(n)),
            Err(_) => Input::Unknown(String::from_utf8_lossy(line).into_owned()),
        },
        ("groups", None, _) => Input::Groups,
        ("create", Some(_), _) => Input::Create(rest.into()),
        ("join", Some(id), None) => Input::Join(id.into()),
        ("invite", Some(id), None) => Input::Invite(id.into()),
        ("leave", None, _) => Input::Leave,
        ("whoami", None, _) => Input::Whoami,
        ("sessions", None, _) => Input::Sessions,
        ("logout", Some(id), None) => Input::LogoutSession(id.into()),
        ("nick", _, _) => Input::Nick(rest.into()),
        ("profile", Some(id), None) => Input::Profile(id.into()),
        ("recall", Some(seq), None) => Input::Recall(seq.into()),
        ("seen", None, _) => Input::Seen(None),
        ("seen", Some(seq), None) => Input::Seen(Some(seq.into())),
        ("friends", None, _) => Input::Friends,
        ("requests", None, _) => Input::Requests,
        ("watches", None, _) => Input::Watches,
        ("add", Some(id), _) => {
            let note = rest[id.len()..].trim();
            Input::Roster(roster_action::REQUEST, id.into(), note.into())
        }
        (
            "accept" | "reject" | "cancel" | "unfriend" | "block" | "unblock" | "watch" | "allow" | "deny"
            | "unwatch" | "revoke",
            Some(id),
            None,
        ) => {
            let action = match name {
                "accept" => roster_action::ACCEPT,
                "reject" => roster_action::REJECT,
                "cancel" => roster_action::CANCEL,
                "unfriend" => roster_action::REMOVE,
                "block" => roster_action::BLOCK,
                "watch" => roster_action::WATCH,
                "allow" => roster_action::ALLOW,
                "deny" => roster_action::DENY,
                "unwatch" => roster_action::UNWATCH,
                "revoke" => roster_action::REVOKE,
                _ => roster_action::UNBLOCK,
            };
            Input::Roster(action, id.into(), String::new())
        }
        ("status", Some(state), _) => match presence_state_of(state) {
            Some(st) => Input::Status(st, rest[state.len()..].trim().into()),
            None => Input::Unknown(String::from_utf8_lossy(line).into_owned()),
        },
        ("file", Some(_), _) => Input::File(rest.into()),
        ("presence", Some(_), _) => Input::Presence(rest.split_whitespace().map(String::from).collect()),
        ("help" | "?", _, _) => Input::Help,
        ("quit" | "exit" | "q", None, _) => Input::Quit,
        _ => Input::Unknown(String::from_utf8_lossy(line).into_owned()),
    }
}

/// A presence state settable with `/status`, by name.
fn presence_state_of(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "online" => Some(presence_state::ONLINE),
        "away" => Some(presence_state::AWAY),
        "busy" => Some(presence_state::BUSY),
        "invisible" => Some(presence_state::INVISIBLE),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Messages as printed, without I/O.

/// A presence state's name.
pub fn presence_name(state: u8) -> String {
    match state {
        presence_state::OFFLINE => "offline".into(),
        presence_state::ONLINE => "online".into(),
        presence_state::AWAY => "away".into(),
        presence_state::BUSY => "busy".into(),
        presence_state::INVISIBLE => "invisible".into(),
        s => format!("in state {s}"),
    }
}

/// A presence: `away: lunch`, or `online` without a status text.
fn presence_state_text(e: &protocol::PresenceEntry) -> String {
    let name = presence_name(e.state);
    if e.text.is_empty() {
        name
    } else {
        format!("{name}: {}", body_text(e.text.as_bytes()))
    }
}

/// Presence entries as `/presence` prints them, a line each: `  2  away: lunch  since 12:01`.
pub fn presence_entries_text(entries: &[protocol::PresenceEntry], me: u64, now_ms: u64) -> String {
    entries
        .iter()
        .map(|e| {
            let since = if e.since_ms == 0 {
                String::new()
            } else {
                format!("  since {}", time_text(e.since_ms, now_ms))
            };
            let you = if e.user == me { " (you)" } else { "" };
            format!("  {}{you}  {}{since}", e.user, presence_state_text(e))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A presence notice, as printed: `[2 is away: lunch]`; this user's own (set from another
/// session): `[you are busy]`.
pub fn presence_notice_text(e: &protocol::PresenceEntry, me: u64) -> String {
    if e.user == me {
        format!("[you are {}]", presence_state_text(e))
    } else {
        format!("[{} is {}]", e.user, presence_state_text(e))
    }
}

/// Sessions as `/sessions` prints them, a line each.
pub fn sessions_text(sessions: &[protocol::SessionInfo]) -> String {
    let types = ["other", "phone", "tablet", "desktop", "web"];
    let now = crate::clock::now_ms();
    sessions
        .iter()
        .map(|s| {
            let kind = types.get(s.device_type as usize).copied().unwrap_or("?");
            let id = body_text(s.device_id.as_bytes());
            let this = if s.current { "  (this one)" } else { "" };
            format!("  {}  {kind} {id:?}  since {}{this}", s.session_id, time_text(s.login_ms, now))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A profile as `/profile` prints it.
pub fn profile_text(e: &protocol::ProfileEntry) -> String {
    let p = &e.profile;
    if e.updated_ms == 0 {
        return format!("user {} has no profile", e.user_id);
    }
    let gender = ["", "female", "male", "other"].get(p.gender as usize).copied().unwrap_or("");
    let mut parts = vec![format!("user {}", e.user_id)];
    for (k, v) in [("nickname", &p.nickname), ("avatar", &p.avatar_url), ("area", &p.area)] {
        if !v.is_empty() {
            parts.push(format!("{k} {}", body_text(v.as_bytes())));
        }
    }
    if !gender.is_empty() {
        parts.push(gender.into());
    }
    if p.birthday != 0 {
        parts.push(format!(
            "born {}-{:02}-{:02}",
            p.birthday / 10000,
            p.birthday / 100 % 100,
            p.birthday % 100
        ));
    }
    parts.join(", ")
}

/// `you` for this user, else the id.
fn who(id: u64, me: u64) -> String {
    if id == me {
        "you".into()
    } else {
        id.to_string()
    }
}

/// A read notice of the current conversation, as printed: `[seen up to #5 by 2]`.
pub fn seen_text(n: &protocol::ReadNotice, me: u64) -> String {
    format!("[seen up to #{} by {}]", n.seq, who(n.from, me))
}

/// A roster notice, as printed: `[friend request from 2: "hi"]`, `[2 accepted your friend
/// request]`; this account's own changes (from another device) start with "you".
pub fn roster_notice_text(n: &protocol::RosterNotice, me: u64) -> String {
    use roster_action as act;
    let note =
        if n.note.is_empty() { String::new() } else { format!(": \"{}\"", body_text(n.note.as_bytes())) };
    if n.from == me {
        let to = n.to;
        return match n.event {
            act::REQUEST => format!("[you asked {to} to be friends{note}]"),
            act::ACCEPT => format!("[you accepted {to}'s friend request]"),
            act::REJECT => format!("[you turned down {to}'s friend request]"),
            act::REMOVE => format!("[you are no longer friends with {to}]"),
            act::CANCEL => format!("[you withdrew your friend request to {to}]"),
            act::BLOCK => format!("[you blocked {to}]"),
            act::UNBLOCK => format!("[you unblocked {to}]"),
            act::WATCH => format!("[you asked to see {to}'s presence]"),
            act::ALLOW => format!("[you let {to} see your presence]"),
            act::DENY => format!("[you turned down {to}'s ask to see your presence]"),
            act::UNWATCH => format!("[you no longer watch {to}'s presence]"),
            act::REVOKE => format!("[{to} no longer sees your presence]"),
            e => format!("[friendship change {e} with {to}]"),
        };
    }
    let from = n.from;
    match n.event {
        act::REQUEST => format!("[friend request from {from}{note}]"),
        act::ACCEPT => format!("[{from} accepted your friend request]"),
        act::REJECT => format!("[{from} turned down your friend request]"),
        act::REMOVE => format!("[{from} is no longer your friend]"),
        act::CANCEL => format!("[{from} withdrew their friend request]"),
        act::WATCH => format!("[{from} asks to see your presence (/allow {from} or /deny {from})]"),
        act::ALLOW => format!("[{from} lets you see their presence]"),
        act::DENY => format!("[{from} turned down your ask to see their presence]"),
        act::UNWATCH => format!("[{from} no longer watches your presence]"),
        act::REVOKE => format!("[you no longer see {from}'s presence]"),
        e => format!("[friendship change {e} from {from}]"),
    }
}

/// What a roster action did, as printed after it.
pub fn roster_ok_text(ok: &protocol::RosterOk) -> String {
    use roster_action as act;
    let u = ok.user;
    match ok.action {
        act::REQUEST if ok.friends => format!("user {u} had asked you: you are friends now"),
        act::REQUEST => format!("asked user {u} to be friends"),
        act::ACCEPT => format!("you and user {u} are friends now"),
        act::REJECT => format!("turned down user {u}'s friend request"),
        act::CANCEL => format!("withdrew your friend request to user {u}"),
        act::REMOVE => format!("you are no longer friends with user {u}"),
        act::BLOCK => format!("blocked user {u}"),
        act::UNBLOCK => format!("unblocked user {u}"),
        act::WATCH => format!("asked to see user {u}'s presence"),
        act::ALLOW => format!("user {u} sees your presence now"),
        act::DENY => format!("turned down user {u}'s ask to see your presence"),
        act::UNWATCH => format!("you no longer watch user {u}'s presence"),
        act::REVOKE => format!("user {u} no longer sees your presence"),
        a => format!("roster action {a} on user {u} done"),
    }
}

/// Roster entries, a line each: `  2  since 12:01  "hi"`.
pub fn roster_entries_text(entries: &[protocol::RosterEntry], now_ms: u64) -> String {
    entries
        .iter()
        .map(|e| {
            let note = if e.note.is_empty() {
                String::new()
            } else {
                format!("  \"{}\"", body_text(e.note.as_bytes()))
            };
            format!("  {}  since {}{note}", e.user, time_text(e.since_ms, now_ms))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `ReadState`, as `/seen` prints it: `#5 read by 1 of 1`.
pub fn read_state_text(r: &protocol::ReadState) -> String {
    format!("#{} read by {} of {}", r.seq, r.read_count, r.member_count)
}

/// A body as text: UTF-8 with control characters escaped (a message must not drive the
/// terminal), else `<N bytes>`.
pub fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => {
            let mut out = String::with_capacity(text.len());
            for c in text.chars() {
                if c.is_control() && c != '\t' {
                    out.extend(c.escape_default());
                } else {
                    out.push(c);
                }
            }
            out
        }
        Err(_) => format!("<{} bytes>", body.len()),
    }
}

/// A size in bytes as people read it: `512 bytes`, `1.5 KiB`, `3.0 MiB`.
pub fn size_text(bytes: usize) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{:.1} MiB", b / (KIB * KIB))
    }
}

/// A message's body as printed: its text as [`body_text`] prints it, cut after
/// [`MESSAGE_SHOWN_BYTES_MAX`] bytes with its size said (`… [text, 1.0 MiB]`); a body that is
/// not UTF-8 as its size, `[binary message, 3.0 MiB]`.
pub fn message_text(body: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(body) else {
        return format!("[binary message, {}]", size_text(body.len()));
    };
    if text.len() <= MESSAGE_SHOWN_BYTES_MAX {
        return body_text(body);
    }
    let mut end = MESSAGE_SHOWN_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [text, {}]", body_text(&body[..end]), size_text(body.len()))
}

/// Local time of `ts_ms`: `HH:MM:SS` on the day of `now_ms`, else with the date before it.
pub fn time_text(ts_ms: u64, now_ms: u64) -> String {
    fn local(ms: u64) -> Option<libc::tm> {
        let t = libc::time_t::try_from(ms / 1000).ok()?;
        // SAFETY: `tm` is plain data (an all-zero one is valid) and `localtime_r` writes only it.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        ok.then_some(tm)
    }
    let Some(tm) = local(ts_ms) else {
        return format!("{ts_ms} ms");
    };
    let clock = format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec);
    match local(now_ms) {
        Some(today) if (today.tm_year, today.tm_yday) == (tm.tm_year, tm.tm_yday) => clock,
        _ => format!("{:04}-{:02}-{:02} {clock}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday),
    }
}

/// What a group notice says, in words.
pub fn notice_text(n: &protocol::GroupNotice, me: u64) -> String {
    use group_event::*;
    let (a, t) = (who(n.actor, me), who(n.target, me));
    let until = |ms: u64| time_text(ms, clock::now_ms());
    match n.event {
        CREATED => format!("{a} created the group"),
        JOINED => format!("{a} joined"),
        LEFT => format!("{a} left"),
        KICKED => format!("{a} removed {t}"),
        ADDED => format!("{a} added {t}"),
        MANAGER_ADDED => format!("{a} made {t} a manager"),
        MANAGER_REMOVED => format!("{a} made {t} a plain member"),
        TRANSFERRED => format!("{a} handed the group to {t}"),
        MUTED if n.until_ms == 0 => format!("{a} unmuted {t}"),
        MUTED => format!("{a} muted {t} until {}", until(n.until_ms)),
        MUTED_ALL if n.until_ms == 0 => format!("{a} unmuted the group"),
        MUTED_ALL => format!("{a} muted all but the managers until {}", until(n.until_ms)),
        PROFILE_CHANGED => format!("{a} changed the group's profile"),
        BLOCKED => format!("{a} blocked {t}"),
        DISSOLVED => format!("{a} dissolved the group"),
        UNBLOCKED => format!("{a} unblocked {t}"),
        MEMBERS_ADDED => {
            let users: Vec<String> = n.users.iter().map(|&u| who(u, me)).collect();
            format!("{a} added {}", users.join(", "))
        }
        other => format!("{a}: group event {other}"),
    }
}

fn event_name(event: u8) -> String {
    use group_event::*;
    let name = match event {
        CREATED => "created",
        JOINED => "joined",
        LEFT => "left",
        KICKED => "kicked",
        ADDED => "added",
        MANAGER_ADDED => "manager_added",
        MANAGER_REMOVED => "manager_removed",
        TRANSFERRED => "transferred",
        MUTED => "muted",
        MUTED_ALL => "muted_all",
        PROFILE_CHANGED => "profile_changed",
        BLOCKED => "blocked",
        DISSOLVED => "dissolved",
        UNBLOCKED => "unblocked",
        MEMBERS_ADDED => "members_added",
        other => return other.to_string(),
    };
    name.into()
}

/// A message as a line: `[12:00:01] 5 → you: hello`, `[12:00:01] you → group 461…: hi all`,
/// `[12:00:01] group 461…: 5 joined`; stream messages say `(stream)`, a recall notice
/// `[seq 3 recalled by 5]`, a recalled message `(recalled)`.
pub fn render(d: &Delivery, me: u64, stream: bool, now_ms: u64) -> String {
    render_line(d, me, stream, now_ms, false)
}

/// [`render`] with the message's seq after the time, `[12:00:01 #4] 5 → you: hello`, as
/// interactive mode prints messages (so that `/recall` can name them). A stream message has no
/// seq of its own: it gets none.
pub fn render_numbered(d: &Delivery, me: u64, stream: bool, now_ms: u64) -> String {
    render_line(d, me, stream, now_ms, !stream)
}

fn render_line(d: &Delivery, me: u64, stream: bool, now_ms: u64, numbered: bool) -> String {
    let s = &d.stamp;
    let mut when = time_text(s.ts_ms, now_ms);
    if numbered {
        when = format!("{when} #{}", s.seq);
    }
    if let Some(n) = client::group_notice(d) {
        return format!("[{when}] group {}: {}", s.to, notice_text(&n, me));
    }
    let to = if s.conv == conv::GROUP { format!("group {}", s.to) } else { who(s.to, me) };
    let stream = if stream { " (stream)" } else { "" };
    format!("[{when}] {} → {to}{stream}: {}", who(s.from, me), content_text(d, me))
}

/// What a message says: its body as text, or what became of it (a tombstone), or what a recall
/// notice took back.
fn content_text(d: &Delivery, me: u64) -> String {
    match d.state {
        msg_state::PLAIN => {}
        msg_state::RECALLED => return "(recalled)".into(),
        msg_state::BURNED => return "(burned)".into(),
        other => return format!("(gone, state {other})"),
    }
    match d.recalled_seq() {
        Some(seq) => format!("[seq {seq} recalled by {}]", who(d.stamp.from, me)),
        None => message_text(&d.body),
    }
}

fn state_name(state: u8) -> serde_json::Value {
    match state {
        msg_state::RECALLED => "recalled".into(),
        msg_state::BURNED => "burned".into(),
        other => other.into(),
    }
}

/// A message as one JSON object. `type`: message, recall, notice or stream; `conv`: direct or
/// group; `from`, `to` (a user, or the group), `seq`, `msg_id`, `ts_ms`; a message has
/// `client_msg_id` and `text` (UTF-8) or `body_hex`, and `flags` and `state` (`recalled`,
/// `burned`: a tombstone, its text empty) when they are not 0; a recall has `client_msg_id`,
/// `flags` and `recall_seq` (the seq it took back); a notice has `event`, `actor`, `target`,
/// `until_ms` and `users`. Ids are exact integers (group ids and `msg_id` pass 2^53).
pub fn render_json(d: &Delivery, me: u64, stream: bool) -> serde_json::Value {
    let s = &d.stamp;
    let notice = client::group_notice(d);
    let recalled = if d.state == msg_state::PLAIN { d.recalled_seq() } else { None };
    let kind = match (stream, &notice, recalled) {
        (true, _, _) => "stream",
        (false, Some(_), _) => "notice",
        (false, None, Some(_)) => "recall",
        (false, None, None) => "message",
    };
    let mut v = serde_json::json!({
        "type": kind,
        "conv": if s.conv == conv::GROUP { "group" } else { "direct" },
        "from": s.from,
        "to": s.to,
        "seq": s.seq,
        "msg_id": s.msg_id,
        "ts_ms": s.ts_ms,
        "mine": s.from == me,
    });
    let fields = v.as_object_mut().expect("a JSON object");
    match notice {
        Some(n) => {
            fields.insert("event".into(), event_name(n.event).into());
            fields.insert("actor".into(), n.actor.into());
            fields.insert("target".into(), n.target.into());
            fields.insert("until_ms".into(), n.until_ms.into());
            fields.insert("users".into(), n.users.into());
        }
        None => {
            fields.insert("client_msg_id".into(), d.client_msg_id.into());
            if d.flags != 0 {
                fields.insert("flags".into(), d.flags.into());
            }
            if d.state != msg_state::PLAIN {
                fields.insert("state".into(), state_name(d.state));
            }
            match (recalled, std::str::from_utf8(&d.body)) {
                (Some(seq), _) => fields.insert("recall_seq".into(), seq.into()),
                (None, Ok(text)) => fields.insert("text".into(), text.into()),
                (None, Err(_)) => fields.insert("body_hex".into(), hex::encode(&d.body).into()),
            };
        }
    }
    v
}

/// Prints messages on stdout, as lines or JSON.
struct Printer {
    json: bool,
    me: u64,
    /// Lines carry the message's seq ([`render_numbered`]).
    numbered: bool,
}

impl Printer {
    fn delivery(&self, d: &Delivery, stream: bool) -> Result<(), ChatError> {
        let line = if self.json {
            render_json(d, self.me, stream).to_string()
        } else if self.numbered {
            render_numbered(d, self.me, stream, clock::now_ms())
        } else {
            render(d, self.me, stream, clock::now_ms())
        };
        self.line(&line)
    }

    /// One line on stdout.
    fn line(&self, line: &str) -> Result<(), ChatError> {
        let mut out = io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).map_err(ChatError::Output)
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// Run `tim chat`; the process exit status.
pub fn run(args: ChatArgs) -> i32 {
    match dispatch(&args) {
        Ok(()) => 0,
        // A reader that went away (`tim chat watch | head -3`) is no failure.
        Err(ChatError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            note(&e);
            e.exit_code()
        }
    }
}

fn dispatch(args: &ChatArgs) -> Result<(), ChatError> {
    let target = |id, group| Target::of(id, group).map_err(ChatError::Usage);
    match &args.mode {
        None if !io::stdin().is_terminal() => Err(ChatError::Usage(
            "stdin is not a terminal: name a mode (send, watch, history; interactive reads commands \
             from stdin too), see tim chat --help"
                .into(),
        )),
        None => interactive(args, None),
        Some(Mode::Interactive { to }) => interactive(args, to.map(|id| target(id, false)).transpose()?),
        Some(Mode::Send { to, group, text }) => send(args, target(*to, *group)?, text),
        Some(Mode::Watch { json, count }) => watch(args, *json, *count),
        Some(Mode::History { with, group, limit, before, json }) => {
            history(args, target(*with, *group)?, *limit, before.unwrap_or(0), *json)
        }
    }
}

/// One poll of the session.
enum Step {
    Event(Event),
    /// Nothing arrived within a tick.
    Idle,
    /// Ctrl-C (SIGINT) or SIGTERM.
    Stop,
}

/// A logged-in connection: keeps it alive, acknowledges what was shown, turns Ctrl-C into a
/// clean logout.
struct Session {
    client: Client,
    me: u64,
    login: protocol::LoginOk,
    stop: Arc<AtomicBool>,
    start: Instant,
    last_write: Instant,
    ping_every: Duration,
    /// The ping not answered yet: its nonce and when it went.
    ping_out: Option<(u64, Instant)>,
    nonce: u64,
    seen: Seen,
    acks_flushed: Instant,
    /// The large message (sent in parts) uploading or waiting for its answer: its
    /// `client_msg_id`. The server takes one at a time (5.22).
    large: Option<u64>,
    /// Large messages waiting for their turn: `(client_msg_id, target, flags, body)`.
    large_queue: VecDeque<(u64, Target, u8, Vec<u8>)>,
    /// The last large message whose parts were refused: the refusals of its later parts
    /// (`Malformed`, the upload being dropped) are dropped.
    large_refused: Option<u64>,
}

/// How to log in.
enum Credentials<'a> {
    Token(&'a str),
    /// A name and its password.
    Password(&'a str, String),
}

/// The password: `--password`, else `TIM_PASSWORD`, else asked on the terminal.
fn password(args: &ChatArgs) -> Result<String, ChatError> {
    if let Some(p) = &args.password {
        return Ok(p.clone());
    }
    if let Ok(p) = std::env::var("TIM_PASSWORD") {
        return Ok(p);
    }
    prompt_password("password: ").map_err(|e| {
        ChatError::Usage(format!("no password: give --password, set TIM_PASSWORD or run on a terminal ({e})"))
    })
}

/// Read a line from the controlling terminal with echo off.
fn prompt_password(prompt: &str) -> io::Result<String> {
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty")?;
    let fd = tty.as_raw_fd();
    // SAFETY: `termios` is plain data; `fd` stays open for these calls.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    let mut line = String::new();
    let read =
        (&tty).write_all(prompt.as_bytes()).and_then(|()| io::BufReader::new(&tty).read_line(&mut line));
    // SAFETY: as above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// `tim-chat@HOSTNAME`, at most 64 bytes (the server's cap on device ids).
fn default_device_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its length.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let host = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let mut id = if host.is_empty() { "tim-chat".to_string() } else { format!("tim-chat@{host}") };
    while id.len() > 64 {
        id.pop();
    }
    id
}

/// A random u64 (the first `client_msg_id` of a run).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Without randomness, time still keeps runs apart.
        return clock::now_ms() << 20;
    }
    u64::from_le_bytes(b)
}

/// Ctrl-C and SIGTERM set the flag; a second one ends the process at once (exit status 130), so a
/// server that does not answer cannot trap the user.
fn stop_flag() -> Result<Arc<AtomicBool>, ChatError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)))
            .map_err(|e| ChatError::Failed(format!("installing signal handlers: {e}")))?;
    }
    Ok(stop)
}

fn connect(addr: &str) -> Result<Client, ChatError> {
    let failed = |e: &dyn fmt::Display| ChatError::Failed(format!("cannot connect to {addr}: {e}"));
    let addrs = addr.to_socket_addrs().map_err(|e| failed(&e))?;
    let mut last = ChatError::Failed(format!("{addr} names no address"));
    for a in addrs {
        match Client::connect_timeout(a, REQUEST_TIMEOUT) {
            Ok(c) => return Ok(c),
            Err(e) => last = failed(&e),
        }
    }
    Err(last)
}

impl Session {
    /// Connect and log in (registering first with `--register`); `announce` prints who this is.
    fn log_in(args: &ChatArgs, announce: bool) -> Result<Session, ChatError> {
        let device_id = args.device_id.clone().unwrap_or_else(default_device_id);
        let device_type = args.device_type as u8;
        // Asked before Ctrl-C is caught, so that Ctrl-C leaves the prompt.
        let credentials = match (&args.token, &args.user) {
            (Some(token), _) => Credentials::Token(token),
            (None, Some(user)) => Credentials::Password(user, password(args)?),
            (None, None) => {
                return Err(ChatError::Usage(
                    "give --user NAME (with --password, TIM_PASSWORD or a prompt) or --token TOKEN".into(),
                ))
            }
        };
        let stop = stop_flag()?;
        let mut client = connect(&args.addr)?;
        client
            .stream()
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| ChatError::Failed(format!("setting up the connection: {e}")))?;
        client.set_timeout(Some(REQUEST_TIMEOUT)).map_err(ChatError::client("connection"))?;
        let ok = match credentials {
            Credentials::Token(token) => {
                client.login_token(token, device_type, &device_id).map_err(ChatError::client("login"))?
            }
            Credentials::Password(user, password) => {
                let mut existed = false;
                if args.register {
                    match client.register(user, &password) {
                        Ok(id) => note(format!("registered {user} (user {id})")),
                        Err(e) if e.code() == Some(ErrorCode::NameTaken) => existed = true,
                        Err(e) => return Err(ChatError::client("register")(e)),
                    }
                }
                let ok = client
                    .login(user, &password, device_type, &device_id)
                    .map_err(ChatError::client("login"))?;
                if existed {
                    note(format!("{user} was registered already; logged in"));
                }
                ok
            }
        };
        client.set_timeout(Some(TICK)).map_err(ChatError::client("connection"))?;
        if announce {
            let name = args.user.as_ref().map_or(String::new(), |u| format!("{u} "));
            note(format!(
                "logged in as {name}(user {}) at {}, device {device_id:?}; others reach you with --to {}",
                ok.user_id, args.addr, ok.user_id
            ));
        }
        let now = Instant::now();
        Ok(Session {
            client,
            me: ok.user_id,
            // Ping at a third of the idle timeout: two pings can be late before the server closes.
            ping_every: Duration::from_millis((u64::from(ok.idle_timeout_ms) / 3).max(100)),
            login: ok,
            stop,
            start: now,
            last_write: now,
            ping_out: None,
            nonce: 0,
            seen: Seen::default(),
            acks_flushed: now,
            large: None,
            large_queue: VecDeque::new(),
            large_refused: None,
        })
    }

    fn write(&mut self, f: impl FnOnce(&mut Client) -> client::Result<()>) -> Result<(), ChatError> {
        f(&mut self.client).map_err(ChatError::client("connection"))?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Send a message: whole, or in parts (5.22) when it is longer than `body_bytes_max`, after
    /// the large message before it was answered.
    fn send(&mut self, id: u64, target: Target, flags: u8, body: &[u8]) -> Result<(), ChatError> {
        if body.len() <= self.login.body_bytes_max as usize {
            return self.write(|c| c.send_flagged(target.conv(), target.id(), id, flags, body));
        }
        if self.large.is_some_and(|large| large != id) {
            self.large_queue.push_back((id, target, flags, body.to_vec()));
            return Ok(());
        }
        self.large = Some(id);
        let part_bytes = protocol::part::data_max(self.login.frame_bytes_max as usize);
        self.write(|c| c.send_parts(target.conv(), target.id(), id, flags, body, part_bytes))
    }

    /// An event answered the large message: the next one's turn. False for the refusal of a
    /// part of a large message whose upload an earlier refusal dropped already (not news).
    fn large_answered(&mut self, ev: &Event) -> Result<bool, ChatError> {
        let (id, part_refused) = match ev {
            Event::SendAck(ack) => (ack.client_msg_id, false),
            Event::Error(e) if e.request_kind == kind::SEND => (e.client_msg_id, false),
            Event::Error(e) if e.request_kind == kind::PART => {
                if self.large_refused == Some(e.client_msg_id)
                    && self.large != Some(e.client_msg_id)
                    && e.code == ErrorCode::Malformed.code()
                {
                    return Ok(false);
                }
                (e.client_msg_id, true)
            }
            _ => return Ok(true),
        };
        if self.large != Some(id) {
            return Ok(true);
        }
        if part_refused {
            self.large_refused = Some(id);
        }
        self.large = None;
        if let Some((id, target, flags, body)) = self.large_queue.pop_front() {
            self.send(id, target, flags, &body)?;
        }
        Ok(true)
    }

    /// A request and its answer (frames that come meanwhile are kept for `poll`).
    fn request<T>(
        &mut self,
        doing: &'static str,
        f: impl FnOnce(&mut Client) -> client::Result<T>,
    ) -> Result<T, ChatError> {
        self.client.set_timeout(Some(REQUEST_TIMEOUT)).map_err(ChatError::client(doing))?;
        let answer = f(&mut self.client);
        self.last_write = Instant::now();
        self.client.set_timeout(Some(TICK)).map_err(ChatError::client(doing))?;
        answer.map_err(ChatError::client(doing))
    }

    /// The next frame, or `Idle` after a tick without one. Pings, pongs, delivery acks, kicks
    /// and errors that close the connection are dealt with here.
    fn poll(&mut self) -> Result<Step, ChatError> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(Step::Stop);
        }
        self.keep_alive()?;
        self.flush_acks(false)?;
        match self.client.recv() {
            Ok(Event::Pong(p)) => {
                if self.ping_out.is_some_and(|(nonce, _)| nonce == p.nonce) {
                    self.ping_out = None;
                }
                Ok(Step::Idle)
            }
            Ok(Event::Kick(k)) => Err(ChatError::Kicked { reason: k.reason, message: k.message }),
            // Errors about no request (idle timeout, slow consumer, …) close the connection.
            Ok(Event::Error(e)) if e.request_kind == 0 => Err(ChatError::refused("closed by the server", &e)),
            Ok(ev) => Ok(if self.large_answered(&ev)? { Step::Event(ev) } else { Step::Idle }),
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Step::Idle)
            }
            Err(e) => Err(ChatError::client("connection")(e)),
        }
    }

    /// Ping when nothing was written for a third of the idle timeout; give up on a server that
    /// leaves a ping unanswered for the whole idle timeout (and at least `REQUEST_TIMEOUT`).
    fn keep_alive(&mut self) -> Result<(), ChatError> {
        match self.ping_out {
            Some((_, sent)) => {
                let idle = Duration::from_millis(u64::from(self.login.idle_timeout_ms));
                if sent.elapsed() >= idle.max(REQUEST_TIMEOUT) {
                    return Err(ChatError::Failed(format!(
                        "the server has not answered a ping for {} s",
                        sent.elapsed().as_secs()
                    )));
                }
            }
            None if self.last_write.elapsed() >= self.ping_every => {
                self.nonce += 1;
                let nonce = self.nonce;
                self.write(|c| c.send_frame(kind::PING, &protocol::Ping { nonce }))?;
                self.ping_out = Some((nonce, Instant::now()));
            }
            None => {}
        }
        Ok(())
    }

    fn flush_acks(&mut self, now: bool) -> Result<(), ChatError> {
        if !now && self.acks_flushed.elapsed() < ACK_EVERY {
            return Ok(());
        }
        self.acks_flushed = Instant::now();
        let now_ms = self.start.elapsed().as_millis() as u64;
        for (key, seq) in self.seen.due(now_ms) {
            let ack = protocol::DeliveryAck { conv: key.conv, peer: key.peer, seq };
            self.write(|c| c.send_frame(kind::DELIVERY_ACK, &ack))?;
        }
        Ok(())
    }

    /// Print a delivered message unless it is a repeat; whether it was printed.
    fn show(&mut self, out: &Printer, d: &Delivery) -> Result<bool, ChatError> {
        let key = ConvKey::of(&d.stamp, self.me);
        if !self.seen.receive(key, d.stamp.seq) {
            return Ok(false);
        }
        out.delivery(d, false)?;
        self.seen.shown(key, d.stamp.seq);
        Ok(true)
    }

    /// Frames that carry no message: bookkeeping and a note on stderr.
    fn side_event(&mut self, ev: &Event) {
        match ev {
            Event::CatchUpEnd(end) => {
                self.seen.catch_up_ended(end.more);
                if end.more {
                    note("more missed messages were waiting than one catch-up sends; the rest come at the next login (or page them with history)");
                }
                if end.unavailable > 0 {
                    note(format!(
                        "the catch-up is partial: {} store ranges did not answer; log in again later",
                        end.unavailable
                    ));
                }
            }
            Event::Resync => {
                self.seen.catch_up_started();
                note("a cluster node failed: catching up on what it may have lost");
            }
            Event::Error(e) if [kind::LOGIN, kind::LOGIN_TOKEN, kind::RESYNC].contains(&e.request_kind) => {
                self.seen.catch_up_failed();
                note(format!(
                    "the catch-up failed ({}); missed messages come at the next login",
                    code_text(e.code, &e.message)
                ));
            }
            Event::Error(e) => note(format!("error: {}", code_text(e.code, &e.message))),
            Event::Missed(m) => note(format!("missed {} messages from {}", m.count, m.id)),
            Event::GroupJoinRequest(r) => note(format!(
                "user {} asks to join group {}: {}",
                r.request.user_id,
                r.group_id,
                body_text(r.request.note.as_bytes())
            )),
            Event::RosterNotice(n) => note(roster_notice_text(n, self.me)),
            Event::GroupDecision(d) => note(format!(
                "your request to join group {} was {} by user {}",
                d.group_id,
                if d.approved { "approved" } else { "rejected" },
                d.by
            )),
            _ => {}
        }
    }

    /// After `watch --count` was reached: let the login's catch-up end (briefly), so that what
    /// was shown can be acknowledged. Messages that come meanwhile are not shown, so not acked.
    fn drain_catch_up(&mut self) -> Result<(), ChatError> {
        let start = Instant::now();
        let mut last = Instant::now();
        while self.seen.catch_up_pending()
            && start.elapsed() < CATCH_UP_DRAIN_MAX
            && last.elapsed() < CATCH_UP_QUIET
        {
            match self.poll()? {
                Step::Stop => break,
                Step::Idle => {}
                Step::Event(Event::Deliver(d)) => {
                    self.seen.receive(ConvKey::of(&d.stamp, self.me), d.stamp.seq);
                    last = Instant::now();
                }
                Step::Event(ev) => self.side_event(&ev),
            }
        }
        Ok(())
    }

    /// Acknowledge what was shown, then log out. The server handles the acks before the
    /// `Logout`, so the cursors have moved when the session ends.
    fn finish(mut self) -> Result<(), ChatError> {
        self.flush_acks(true)?;
        self.client.set_timeout(Some(LOGOUT_TIMEOUT)).map_err(ChatError::client("logout"))?;
        // The session ends either way: a server that does not say Bye has closed it.
        let _ = self.client.logout();
        Ok(())
    }
}

/// Lines of stdin, read by a helper thread, without their line end; a line longer than
/// [`LINE_BYTES_MAX`] comes cut to one byte more (too long for any server). The channel closes at
/// the end of the input.
fn stdin_lines() -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::sync_channel(LINES_QUEUED_MAX);
    // If the thread cannot start, `tx` is dropped with it and stdin reads as ended.
    let _ = std::thread::Builder::new().name("tim-chat-stdin".into()).spawn(move || {
        let mut input = io::stdin().lock();
        while let Ok(Some(line)) = read_line(&mut input, LINE_BYTES_MAX) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// One line of `input` without `\n` or `\r\n`, keeping at most `max` + 1 bytes of it; None at
/// the end of the input.
pub fn read_line(input: &mut impl BufRead, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut any = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if !any {
                return Ok(None);
            }
            break;
        }
        any = true;
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        let room = (max + 1).saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = newline.map_or(buf.len(), |i| i + 1);
        input.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// The longest body this server takes: `large_body_bytes_max` (sent in parts), or
/// `body_bytes_max` from a server that takes no large messages.
fn body_limit(login: &protocol::LoginOk) -> usize {
    login.body_bytes_max.max(login.large_body_bytes_max) as usize
}

/// What is wrong with `body` as a message to this server, if anything.
fn body_refusal(body: &[u8], login: &protocol::LoginOk) -> Option<String> {
    let max = body_limit(login);
    (body.len() > max).then(|| {
        format!(
            "BodyTooLarge: {} bytes ({}); the server takes at most {max}",
            body.len(),
            size_text(body.len())
        )
    })
}

/// What is wrong with a line of stdin as a message, if anything: a line is cut one byte past
/// [`LINE_BYTES_MAX`] ([`read_line`]), so a longer one is refused whole.
fn line_refusal(line: &[u8], login: &protocol::LoginOk) -> Option<String> {
    if line.len() > LINE_BYTES_MAX {
        let max = body_limit(login).max(LINE_BYTES_MAX);
        return Some(format!(
            "BodyTooLarge: over {LINE_BYTES_MAX} bytes, too long for a line (interactive /file PATH \
             sends up to {max} bytes)"
        ));
    }
    body_refusal(line, login)
}

/// The seq a recall in the outbox takes back (None: a plain message).
fn recalled_seq(m: &Outgoing) -> Option<u64> {
    if m.flags & send_flags::RECALL == 0 {
        return None;
    }
    m.body.as_slice().try_into().ok().map(u64::from_le_bytes)
}

fn label(line: Option<u64>) -> String {
    line.map_or_else(|| "message".into(), |n| format!("line {n}"))
}

/// `send`: every message sent, and every one answered.
fn send(args: &ChatArgs, target: Target, text: &[String]) -> Result<(), ChatError> {
    let mut lines = text.is_empty().then(stdin_lines);
    let mut s = Session::log_in(args, false)?;
    let room = (s.login.inflight_max as usize).clamp(1, OUTBOX_MAX);
    let mut outbox = Outbox::new(random_u64());
    let (mut line_no, mut refused, mut interrupted) = (0u64, 0u64, false);
    if !text.is_empty() {
        let body = text.join(" ").into_bytes();
        if let Some(why) = body_refusal(&body, &s.login) {
            s.finish()?;
            return Err(ChatError::Failed(format!("message not sent: {why}")));
        }
        let id = outbox.add(target, body.clone(), None);
        s.send(id, target, 0, &body)?;
    }
    loop {
        // Take lines while there is room; after a refusal take no more.
        while refused == 0 && outbox.len() < room {
            let Some(rx) = &lines else { break };
            let line = match rx.try_recv() {
                Ok(line) => line,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    lines = None;
                    break;
                }
            };
            line_no += 1;
            if line.is_empty() {
                continue;
            }
            if let Some(why) = line_refusal(&line, &s.login) {
                note(format!("line {line_no} not sent: {why}"));
                refused += 1;
                break;
            }
            let id = outbox.add(target, line.clone(), Some(line_no));
            s.send(id, target, 0, &line)?;
        }
        for (id, t, flags, body) in outbox.due(Instant::now()) {
            s.send(id, t, flags, &body)?;
        }
        if (lines.is_none() || refused > 0) && outbox.is_empty() {
            break;
        }
        match s.poll()? {
            Step::Stop => {
                interrupted = true;
                break;
            }
            Step::Idle => {}
            Step::Event(Event::SendAck(ack)) => {
                outbox.acked(&ack);
            }
            Step::Event(Event::Error(e)) if [kind::SEND, kind::PART].contains(&e.request_kind) => {
                match outbox.refused(&e, Instant::now()) {
                    Answer::Retry => {}
                    Answer::Refused(m) => {
                        note(format!("{} not sent: {}", label(m.line), code_text(e.code, &e.message)));
                        refused += 1;
                    }
                    Answer::Stray => note(format!("error: {}", code_text(e.code, &e.message))),
                }
            }
            // Deliveries (the catch-up of this device among them) are for watch and interactive.
            Step::Event(_) => {}
        }
    }
    let unanswered = outbox.len();
    s.finish()?;
    if refused > 0 {
        Err(ChatError::Failed(format!("{refused} message(s) not sent")))
    } else if interrupted && unanswered > 0 {
        Err(ChatError::Failed(format!("interrupted: {unanswered} message(s) not acknowledged")))
    } else {
        Ok(())
    }
}

/// `watch`: print messages until interrupted (or `count` of them).
fn watch(args: &ChatArgs, json: bool, count: Option<u64>) -> Result<(), ChatError> {
    let mut s = Session::log_in(args, true)?;
    let out = Printer { json, me: s.me, numbered: false };
    match watch_until(&mut s, &out, count) {
        Ok(Ended::Counted) => {
            s.drain_catch_up()?;
            s.finish()
        }
        Ok(Ended::Stopped) => s.finish(),
        // A reader that went away (`| head -3`) did read what came before: acknowledge that.
        Err(e @ ChatError::Output(_)) => {
            let _ = s.finish();
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Why a watch ended.
enum Ended {
    /// `--count` messages were printed.
    Counted,
    /// Ctrl-C or SIGTERM.
    Stopped,
}

fn watch_until(s: &mut Session, out: &Printer, count: Option<u64>) -> Result<Ended, ChatError> {
    let mut printed = 0u64;
    loop {
        let message = match s.poll()? {
            Step::Stop => return Ok(Ended::Stopped),
            Step::Idle => false,
            Step::Event(Event::Deliver(d)) => s.show(out, &d)? && d.stamp.from != 0,
            Step::Event(Event::StreamMsg(d)) => {
                out.delivery(&d, true)?;
                true
            }
            Step::Event(ev) => {
                s.side_event(&ev);
                false
            }
        };
        printed += u64::from(message);
        if count.is_some_and(|n| printed >= n) {
            return Ok(Ended::Counted);
        }
    }
}

/// `history`: one page, oldest first.
fn history(args: &ChatArgs, with: Target, limit: u32, before: u64, json: bool) -> Result<(), ChatError> {
    let mut s = Session::log_in(args, false)?;
    let (page, end) = s.request("history", |c| c.history_of(with.conv(), with.id(), before, true, limit))?;
    let out = Printer { json, me: s.me, numbered: false };
    for d in page.iter().rev() {
        out.delivery(d, false)?;
    }
    if end.more && !json {
        let oldest = page.last().map_or(0, |d| d.stamp.seq);
        note(format!("older messages: add --before {oldest}"));
    }
    s.finish()
}

/// Interactive mode's state beside the session.
struct Chat {
    s: Session,
    out: Printer,
    outbox: Outbox,
    target: Option<Target>,
    /// Per conversation, where the next `/history` page starts (absent: at the newest).
    older: HashMap<Target, u64>,
    quitting: Option<Instant>,
    /// Read receipts (docs/PROTOCOL.md 5.18): per conversation the newest seq printed (for
    /// `/seen`), the newest of others' messages printed, and how far `Read` told.
    newest: HashMap<Target, u64>,
    incoming: HashMap<Target, u64>,
    read_told: HashMap<Target, u64>,
    read_at: Option<Instant>,
    /// Per reader, the newest position printed for the current conversation.
    seen_by: HashMap<u64, u64>,
    /// Peers' typing notices printed.
    typing: TypingShown,
}

/// Raise `map[key]` to `seq`, keeping the map within [`CONVERSATIONS_MAX`] conversations.
fn raise(map: &mut HashMap<Target, u64>, key: Target, seq: u64) {
    if !map.contains_key(&key) && map.len() >= CONVERSATIONS_MAX {
        if let Some(&any) = map.keys().next() {
            map.remove(&any);
        }
    }
    let v = map.entry(key).or_insert(0);
    *v = (*v).max(seq);
}

fn interactive(args: &ChatArgs, target: Option<Target>) -> Result<(), ChatError> {
    let lines = stdin_lines();
    let s = Session::log_in(args, true)?;
    note(match target {
        Some(t) => format!("talking to {t}; /help lists the commands"),
        None => "/to USERID or @USERID TEXT picks who to talk to; /help lists the commands".into(),
    });
    let out = Printer { json: false, me: s.me, numbered: true };
    let mut chat = Chat {
        s,
        out,
        outbox: Outbox::new(random_u64()),
        target,
        older: HashMap::new(),
        quitting: None,
        newest: HashMap::new(),
        incoming: HashMap::new(),
        read_told: HashMap::new(),
        read_at: None,
        seen_by: HashMap::new(),
        typing: TypingShown::default(),
    };
    let mut lines = Some(lines);
    loop {
        for _ in 0..LINES_PER_TURN {
            if chat.quitting.is_some() {
                break;
            }
            let Some(rx) = &lines else { break };
            match rx.try_recv() {
                Ok(line) => chat.line(&line)?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    lines = None;
                    chat.quitting = Some(Instant::now());
                }
            }
        }
        for (id, t, flags, body) in chat.outbox.due(Instant::now()) {
            chat.s.send(id, t, flags, &body)?;
        }
        if let Some(since) = chat.quitting {
            if chat.outbox.is_empty() || since.elapsed() >= EXIT_ANSWERS_WAIT {
                if !chat.outbox.is_empty() {
                    note(format!("{} message(s) left unacknowledged", chat.outbox.len()));
                }
                return chat.s.finish();
            }
        }
        chat.tell_read()?;
        match chat.s.poll()? {
            Step::Stop => return chat.s.finish(),
            Step::Idle => {}
            Step::Event(Event::Deliver(d)) => {
                if chat.s.show(&chat.out, &d)? {
                    chat.printed(&d);
                    chat.typing.message(&d, chat.s.me);
                }
            }
            Step::Event(Event::TypingNotice(n)) => {
                if let Some(line) = chat.typing.notice(&n, chat.s.me, Instant::now()) {
                    chat.out.line(&line)?;
                }
            }
            Step::Event(Event::ReadNotice(n)) => chat.read_notice(&n)?,
            Step::Event(Event::RosterNotice(n)) => chat.out.line(&roster_notice_text(&n, chat.s.me))?,
            Step::Event(Event::PresenceNotice(e)) => chat.out.line(&presence_notice_text(&e, chat.s.me))?,
            Step::Event(Event::StreamMsg(d)) => chat.out.delivery(&d, true)?,
            Step::Event(Event::SendAck(ack)) => chat.acked(&ack)?,
            Step::Event(Event::Error(e)) if [kind::SEND, kind::PART].contains(&e.request_kind) => {
                match chat.outbox.refused(&e, Instant::now()) {
                    Answer::Retry => {}
                    Answer::Refused(m) => match recalled_seq(&m) {
                        Some(seq) => note(format!(
                            "seq {seq} of {} not recalled: {}",
                            m.target,
                            code_text(e.code, &e.message)
                        )),
                        None => note(format!("not sent to {}: {}", m.target, code_text(e.code, &e.message))),
                    },
                    Answer::Stray => note(format!("error: {}", code_text(e.code, &e.message))),
                }
            }
            Step::Event(ev) => chat.s.side_event(&ev),
        }
    }
}

impl Chat {
    /// A sent message was stored: show it as the others see it. Its seq counts as shown, so
    /// the conversation's acks do not wait at it (this session is never sent its own message).
    fn acked(&mut self, ack: &SendAck) -> Result<(), ChatError> {
        let Some(m) = self.outbox.acked(ack) else { return Ok(()) };
        let me = self.s.me;
        let stamp = Stamp {
            msg_id: ack.msg_id,
            seq: ack.seq,
            ts_ms: ack.ts_ms,
            from: me,
            to: m.target.id(),
            conv: m.target.conv(),
        };
        let key = m.target.key();
        if self.s.seen.receive(key, ack.seq) {
            self.s.seen.shown(key, ack.seq);
        }
        raise(&mut self.newest, m.target, ack.seq);
        let mut d = Delivery::plain(stamp, ack.client_msg_id, m.body);
        d.flags = m.flags;
        self.out.delivery(&d, false)
    }

    /// A delivered message was printed: its conversation is read up to it once current.
    fn printed(&mut self, d: &Delivery) {
        let key = ConvKey::of(&d.stamp, self.s.me);
        let t = if key.conv == conv::GROUP { Target::Group(key.peer) } else { Target::User(key.peer) };
        raise(&mut self.newest, t, d.stamp.seq);
        if d.stamp.from != self.s.me {
            raise(&mut self.incoming, t, d.stamp.seq);
        }
    }

    /// Tell the server the current conversation is read up to the newest of the others'
    /// messages printed, when that moved on (at most every [`READ_EVERY`]).
    fn tell_read(&mut self) -> Result<(), ChatError> {
        let Some(t) = self.target else { return Ok(()) };
        let Some(&seq) = self.incoming.get(&t) else { return Ok(()) };
        if self.read_told.get(&t).is_some_and(|&told| told >= seq)
            || self.read_at.is_some_and(|at| at.elapsed() < READ_EVERY)
        {
            return Ok(());
        }
        self.read_at = Some(Instant::now());
        raise(&mut self.read_told, t, seq);
        self.s.write(|c| c.read(t.conv(), t.id(), seq))
    }

    /// Print how far the peer (or a group member) read the current conversation, once per
    /// position reached. This user's own other devices are not shown.
    fn read_notice(&mut self, n: &protocol::ReadNotice) -> Result<(), ChatError> {
        let me = self.s.me;
        let t = match n.conv {
            conv::GROUP => Target::Group(n.to),
            _ if n.to == me => Target::User(n.from),
            _ => return Ok(()),
        };
        if n.from == me || self.target != Some(t) {
            return Ok(());
        }
        let last = self.seen_by.entry(n.from).or_insert(0);
        if n.seq <= *last {
            return Ok(());
        }
        *last = n.seq;
        self.out.line(&seen_text(n, me))
    }

    /// `/seen [SEQ]`: how many read message SEQ (else the newest printed) of the current
    /// conversation.
    fn seen(&mut self, spec: Option<&str>) -> Result<(), ChatError> {
        let Some(t) = self.target else {
            note("no conversation yet: /to USERID or /group GROUPID, then /seen");
            return Ok(());
        };
        let seq = match spec {
            Some(spec) => match spec.trim_start_matches('#').parse::<u64>() {
                Ok(seq) if seq > 0 => seq,
                _ => {
                    note(format!("{spec} is no message seq (the #SEQ printed after a message's time)"));
                    return Ok(());
                }
            },
            None => match self.newest.get(&t) {
                Some(&seq) => seq,
                None => {
                    note(format!("no message with {t} shown yet: /seen SEQ asks about message SEQ"));
                    return Ok(());
                }
            },
        };
        let state = self.s.request("seen", |c| c.read_get(t.conv(), t.id(), seq))?;
        note(read_state_text(&state));
        Ok(())
    }

    fn say(&mut self, body: Vec<u8>) -> Result<(), ChatError> {
        let Some(target) = self.target else {
            note("no one to send to yet: /to USERID, /group GROUPID, or @USERID TEXT");
            return Ok(());
        };
        if let Some(why) = line_refusal(&body, &self.s.login) {
            note(format!("not sent: {why}"));
            return Ok(());
        }
        let id = self.outbox.add(target, body.clone(), None);
        self.s.send(id, target, 0, &body)
    }

    /// `/file PATH`: the file's bytes as one message to the current target (in parts when
    /// large). A file larger than the server takes, or one that cannot be read, is noted.
    fn file(&mut self, path: &str) -> Result<(), ChatError> {
        use std::io::Read;
        let Some(target) = self.target else {
            note("no one to send to yet: /to USERID or /group GROUPID, then /file PATH");
            return Ok(());
        };
        let max = body_limit(&self.s.login);
        let read = std::fs::File::open(path).and_then(|f| {
            let len = f.metadata()?.len();
            if len > max as u64 {
                return Ok(Err(len));
            }
            let mut body = Vec::with_capacity(len as usize);
            f.take(max as u64 + 1).read_to_end(&mut body)?;
            Ok(if body.len() > max { Err(body.len() as u64) } else { Ok(body) })
        });
        let body = match read {
            Ok(Ok(body)) => body,
            Ok(Err(len)) => {
                note(format!(
                    "{path} not sent: BodyTooLarge: {len} bytes ({}); the server takes messages of at most \
                     {max} bytes ({}, large_body_bytes_max)",
                    size_text(len as usize),
                    size_text(max)
                ));
                return Ok(());
            }
            Err(e) => {
                note(format!("{path} not sent: {e}"));
                return Ok(());
            }
        };
        if body.is_empty() {
            note(format!("{path} is empty: nothing sent"));
            return Ok(());
        }
        if body.len() > self.s.login.body_bytes_max as usize {
            note(format!("sending {path} ({}) to {target} in parts", size_text(body.len())));
        }
        let id = self.outbox.add(target, body.clone(), None);
        self.s.send(id, target, 0, &body)
    }

    /// `/recall SEQ`: a recall of message `seq` of the current conversation. Its ack prints
    /// the recall as the others see it; a refusal is noted.
    fn recall(&mut self, spec: &str) -> Result<(), ChatError> {
        let Some(target) = self.target else {
            note("no conversation yet: /to USERID or /group GROUPID, then /recall SEQ");
            return Ok(());
        };
        let seq = match spec.trim_start_matches('#').parse::<u64>() {
            Ok(seq) if seq > 0 => seq,
            _ => {
                note(format!("{spec} is no message seq (the #SEQ printed after a message's time)"));
                return Ok(());
            }
        };
        let id = self.outbox.add_recall(target, seq);
        self.s.send(id, target, send_flags::RECALL, &seq.to_le_bytes())
    }

    fn talk_to(&mut self, t: Target) {
        if self.target != Some(t) {
            note(format!("talking to {t}"));
            self.seen_by.clear();
        }
        self.target = Some(t);
    }

    /// The current group, for /leave and /invite.
    fn group(&self) -> Option<u64> {
        match self.target {
            Some(Target::Group(g)) => Some(g),
            _ => {
                note("talk to a group first: /group GROUPID");
                None
            }
        }
    }

    /// Handle one typed line. Refusals of requests are noted, not fatal.
    fn line(&mut self, line: &[u8]) -> Result<(), ChatError> {
        match self.command(parse_input(line)) {
            // A refused request leaves the session as it was.
            Err(e @ ChatError::Refused { .. }) => {
                note(e);
                Ok(())
            }
            other => other,
        }
    }

    fn command(&mut self, input: Input) -> Result<(), ChatError> {
        let resolve = |spec: &str, group: bool| parse_id(spec).and_then(|id| Target::of(id, group));
        match input {
            Input::Empty => {}
            Input::Say(text) => self.say(text)?,
            Input::To(spec, text) => match resolve(&spec, false) {
                Ok(t) => {
                    self.talk_to(t);
                    if let Some(text) = text {
                        self.say(text)?;
                    }
                }
                Err(why) => note(why),
            },
            Input::Group(spec) => match resolve(&spec, true) {
                Ok(t) => self.talk_to(t),
                Err(why) => note(why),
            },
            Input::History(n) => self.history(n.unwrap_or(HISTORY_PAGE_DEFAULT))?,
            Input::Groups => self.groups()?,
            Input::Create(name) => {
                let profile = protocol::GroupProfile {
                    name,
                    topic: String::new(),
                    avatar_url: String::new(),
                    extra: Vec::new(),
                    join_policy: protocol::join_policy::OPEN,
                    invite_policy: protocol::invite_policy::MEMBERS,
                };
                let g = self.s.request("create", |c| c.group_create(profile))?;
                note(format!("created group {g}; others join with /join {g}"));
                self.talk_to(Target::Group(g));
            }
            Input::Join(spec) => match resolve(&spec, true) {
                Ok(t) => {
                    let ok =
                        self.s.request("join", |c| c.group_action(t.id(), group_action::JOIN, 0, 0, ""))?;
                    if ok.seq == 0 {
                        note(format!("asked to join group {}: a manager decides", t.id()));
                    } else {
                        self.talk_to(t);
                    }
                }
                Err(why) => note(why),
            },
            Input::Leave => {
                if let Some(g) = self.group() {
                    self.s.request("leave", |c| c.group_action(g, group_action::LEAVE, 0, 0, ""))?;
                    note(format!("left group {g}"));
                    self.target = None;
                }
            }
            Input::Invite(spec) => match (self.group(), resolve(&spec, false)) {
                (Some(g), Ok(Target::User(u))) => {
                    self.s.request("invite", |c| c.group_action(g, group_action::INVITE, u, 0, ""))?;
                    note(format!("added user {u} to group {g}"));
                }
                (Some(_), Ok(t)) => note(format!("{t} is no user")),
                (Some(_), Err(why)) => note(why),
                (None, _) => {}
            },
            Input::Whoami => note(format!("you are user {}", self.s.me)),
            Input::Sessions => {
                let list = self.s.request("sessions", |c| c.my_sessions())?;
                note(sessions_text(&list.sessions));
            }
            Input::LogoutSession(spec) => match spec.parse::<u64>() {
                Ok(id) => {
                    let list = self.s.request("logout", |c| c.session_logout(id))?;
                    note(format!("logged session {id} out\n{}", sessions_text(&list.sessions)));
                }
                Err(_) => note(format!("{spec} is no session id (see /sessions)")),
            },
            Input::Nick(name) => {
                let me = self.s.me;
                let mut profile = self
                    .s
                    .request("profile", |c| c.profile_get(&[me]))?
                    .into_iter()
                    .next()
                    .map(|e| e.profile)
                    .unwrap_or_default();
                profile.nickname = name;
                let saved = self.s.request("nick", |c| c.profile_update(profile))?;
                match saved.profile.nickname.as_str() {
                    "" => note("nickname cleared"),
                    nick => note(format!("your nickname is now {}", body_text(nick.as_bytes()))),
                }
            }
            Input::Profile(spec) => match resolve(&spec, false) {
                Ok(Target::User(u)) => match self.s.request("profile", |c| c.profile_get(&[u]))?.first() {
                    Some(e) => note(profile_text(e)),
                    None => note(format!("no user {u}")),
                },
                Ok(t) => note(format!("{t} is no user")),
                Err(why) => note(why),
            },
            Input::Recall(spec) => self.recall(&spec)?,
            Input::Seen(spec) => self.seen(spec.as_deref())?,
            Input::Friends => self.roster_lists(&[
                (roster_list::FRIENDS, "friends", "no friends yet (/add ID asks someone)"),
                (roster_list::BLOCKED, "blocked", ""),
            ])?,
            Input::Requests => self.roster_lists(&[
                (
                    roster_list::INCOMING,
                    "requests to you (/accept ID, /reject ID)",
                    "no friend requests to you",
                ),
                (roster_list::OUTGOING, "your requests (/cancel ID)", "no friend requests from you"),
            ])?,
            Input::Watches => self.roster_lists(&[
                (roster_list::WATCHING, "you watch (/unwatch ID)", "you watch nobody's presence (/watch ID)"),
                (roster_list::WATCHERS, "watching you (/revoke ID)", "nobody watches your presence"),
                (roster_list::WATCH_INCOMING, "asking to watch you (/allow ID, /deny ID)", ""),
                (roster_list::WATCH_OUTGOING, "your asks to watch (/unwatch ID)", ""),
            ])?,
            Input::Roster(action, spec, text) => match resolve(&spec, false) {
                Ok(Target::User(u)) => {
                    let ok = self.s.request("friends", |c| c.roster_action(action, u, &text))?;
                    note(roster_ok_text(&ok));
                }
                Ok(t) => note(format!("{t} is no user")),
                Err(why) => note(why),
            },
            Input::Status(state, text) => {
                let e = self.s.request("status", |c| c.presence_set(state, &text, &[]))?;
                note(format!("you are {}", presence_state_text(&e)));
            }
            Input::Presence(specs) => {
                let mut ids = Vec::with_capacity(specs.len());
                for spec in &specs {
                    match resolve(spec, false) {
                        Ok(Target::User(u)) => ids.push(u),
                        Ok(t) => note(format!("{t} is no user")),
                        Err(why) => note(why),
                    }
                }
                if !ids.is_empty() {
                    let entries = self.s.request("presence", |c| c.presence_get(&ids))?;
                    note(presence_entries_text(&entries, self.s.me, crate::clock::now_ms()));
                }
            }
            Input::File(path) => self.file(&path)?,
            Input::Help => note(HELP),
            Input::Quit => self.quitting = Some(Instant::now()),
            Input::Unknown(text) => note(format!("not understood: {text} (/help lists the commands)")),
        }
        Ok(())
    }

    /// The page of the current conversation before the last one shown.
    fn history(&mut self, limit: u32) -> Result<(), ChatError> {
        let Some(t) = self.target else {
            note("no conversation yet: /to USERID or /group GROUPID");
            return Ok(());
        };
        let anchor = self.older.get(&t).copied().unwrap_or(0);
        let (page, end) =
            self.s.request("history", |c| c.history_of(t.conv(), t.id(), anchor, true, limit))?;
        if page.is_empty() {
            note(format!("no older stored messages with {t}"));
            return Ok(());
        }
        note(format!("{} stored messages with {t}:", page.len()));
        for d in page.iter().rev() {
            self.out.delivery(d, false)?;
            raise(&mut self.newest, t, d.stamp.seq);
        }
        // Seq 1 is the first of every conversation: a page with `more` false ends there.
        let oldest = page.last().map_or(1, |d| d.stamp.seq);
        self.older.insert(t, if end.more { oldest } else { 1 });
        if end.more {
            note("older ones: /history");
        }
        Ok(())
    }

    /// Print roster lists: `(list, title, what to say when it is empty ("": say nothing))`.
    fn roster_lists(&mut self, lists: &[(u8, &str, &str)]) -> Result<(), ChatError> {
        let now = crate::clock::now_ms();
        for &(list, title, empty) in lists {
            let mut entries = Vec::new();
            let mut more = true;
            while more && entries.len() < ROSTER_LISTED_MAX {
                let after = entries.last().map_or(0, |e: &protocol::RosterEntry| e.user);
                let page = self.s.request("friends", |c| c.roster_get(list, after, 0))?;
                more = page.more && !page.entries.is_empty();
                entries.extend(page.entries);
            }
            if entries.is_empty() {
                if !empty.is_empty() {
                    note(empty);
                }
                continue;
            }
            note(format!(
                "{title} ({}{}):\n{}",
                entries.len(),
                if more { "+" } else { "" },
                roster_entries_text(&entries, now)
            ));
        }
        Ok(())
    }

    fn groups(&mut self) -> Result<(), ChatError> {
        let list = self.s.request("groups", |c| c.my_groups(0, GROUPS_LISTED_MAX))?;
        if list.groups.is_empty() {
            note("you are in no group (/create NAME, /join GROUPID)");
        }
        for g in &list.groups {
            match self.s.request("groups", |c| c.group_get(*g)) {
                Ok(info) => note(format!(
                    "group {g}: {} ({} members)",
                    body_text(info.profile.name.as_bytes()),
                    info.members
                )),
                Err(e) => note(format!("group {g}: {e}")),
            }
        }
        if list.more {
            note(format!("(only the first {GROUPS_LISTED_MAX} are listed)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: u64 = 1;
    const BOB: u64 = 2;
    const GROUP: u64 = 0x4000_0000_0000_0007;

    fn direct(peer: u64) -> ConvKey {
        ConvKey { conv: conv::DIRECT, peer }
    }

    fn delivery(from: u64, to: u64, conv: u8, seq: u64, body: &[u8]) -> Delivery {
        let stamp = Stamp { msg_id: 99, seq, ts_ms: 1_767_225_600_123, from, to, conv };
        Delivery::plain(stamp, 7, body.to_vec())
    }

    /// Show messages `seqs` of a conversation, as the driver does.
    fn show(seen: &mut Seen, key: ConvKey, seqs: &[u64]) {
        for &seq in seqs {
            if seen.receive(key, seq) {
                seen.shown(key, seq);
            }
        }
    }

    /// Acks wait for the login's catch-up, then cover the run of shown messages from the lowest
    /// one received, and each conversation is acknowledged once per flush.
    #[test]
    fn acks_cover_the_shown_run_once_the_catch_up_ended() {
        let mut seen = Seen::default();
        show(&mut seen, direct(BOB), &[8]); // live, overtaking the catch-up
        show(&mut seen, direct(BOB), &[6, 7]); // the catch-up
        assert_eq!(seen.due(0), vec![], "no ack before CatchUpEnd");
        seen.catch_up_ended(false);
        assert_eq!(seen.due(0), vec![(direct(BOB), 8)]);
        assert_eq!(seen.due(0), vec![], "nothing new");
        show(&mut seen, direct(BOB), &[9]);
        assert_eq!(seen.due(1), vec![(direct(BOB), 9)]);
    }

    /// Repeats (the same conversation and seq) are dropped; the same seq elsewhere is new.
    #[test]
    fn repeats_are_dropped_by_conversation_and_seq() {
        let mut seen = Seen::default();
        assert!(seen.receive(direct(BOB), 1));
        assert!(!seen.receive(direct(BOB), 1));
        assert!(seen.receive(direct(ALICE), 1));
        let g = ConvKey { conv: conv::GROUP, peer: GROUP };
        assert!(seen.receive(g, 1));
    }

    /// A gap holds acks back for GAP_WAIT_MS, then is taken for a hole — unless the catch-up
    /// said it left messages out; and a message received but not shown is never skipped.
    #[test]
    fn a_gap_holds_acks_back_until_it_is_taken_for_a_hole() {
        let mut seen = Seen::default();
        seen.catch_up_ended(false);
        show(&mut seen, direct(BOB), &[1, 2, 4, 5]);
        assert_eq!(seen.due(1_000), vec![(direct(BOB), 2)]);
        assert_eq!(seen.due(1_000 + GAP_WAIT_MS - 1), vec![]);
        assert_eq!(seen.due(1_000 + GAP_WAIT_MS), vec![(direct(BOB), 5)]);

        let mut kept = Seen::default();
        kept.catch_up_ended(true);
        show(&mut kept, direct(BOB), &[1, 3]);
        assert_eq!(kept.due(0), vec![(direct(BOB), 1)]);
        assert_eq!(kept.due(10 * GAP_WAIT_MS), vec![], "the catch-up's rest comes at the next login");

        let mut held = Seen::default();
        held.catch_up_ended(false);
        show(&mut held, direct(BOB), &[1]);
        assert!(held.receive(direct(BOB), 2)); // received while draining, not shown
        show(&mut held, direct(BOB), &[3]);
        assert_eq!(held.due(0), vec![(direct(BOB), 1)]);
        assert_eq!(held.due(10 * GAP_WAIT_MS), vec![], "2 was not shown");
    }

    /// A failed catch-up stops acks for the session; a Resync pauses them until its end.
    #[test]
    fn catch_up_failures_and_resyncs_stop_acks() {
        let mut seen = Seen::default();
        seen.catch_up_failed();
        show(&mut seen, direct(BOB), &[1]);
        seen.catch_up_ended(false);
        assert_eq!(seen.due(0), vec![]);
        assert!(!seen.catch_up_pending());

        let mut resync = Seen::default();
        resync.catch_up_ended(false);
        resync.catch_up_started();
        show(&mut resync, direct(BOB), &[1]);
        assert!(resync.catch_up_pending());
        assert_eq!(resync.due(0), vec![]);
        resync.catch_up_ended(false);
        assert_eq!(resync.due(0), vec![(direct(BOB), 1)]);
    }

    /// The conversation of a message: the group, the sender, or for own messages the recipient.
    #[test]
    fn conversation_keys_follow_the_protocol() {
        let s = |from, to, conv| delivery(from, to, conv, 1, b"").stamp;
        assert_eq!(ConvKey::of(&s(BOB, ALICE, conv::DIRECT), ALICE), direct(BOB));
        assert_eq!(ConvKey::of(&s(ALICE, BOB, conv::DIRECT), ALICE), direct(BOB));
        assert_eq!(ConvKey::of(&s(ALICE, ALICE, conv::DIRECT), ALICE), direct(ALICE));
        assert_eq!(
            ConvKey::of(&s(BOB, GROUP, conv::GROUP), ALICE),
            ConvKey { conv: conv::GROUP, peer: GROUP }
        );
    }

    /// Interactive lines: commands, @-addressing, `//` to send a leading slash, plain text.
    #[test]
    fn lines_parse_into_inputs() {
        assert_eq!(parse_input(b"  "), Input::Empty);
        assert_eq!(parse_input(b"hello /to 3"), Input::Say(b"hello /to 3".to_vec()));
        assert_eq!(parse_input(b"//shrug"), Input::Say(b"/shrug".to_vec()));
        assert_eq!(parse_input(b"/to 42"), Input::To("42".into(), None));
        assert_eq!(parse_input(b"@42 hi there"), Input::To("42".into(), Some(b"hi there".to_vec())));
        assert_eq!(parse_input(b"@42"), Input::To("42".into(), None));
        assert_eq!(parse_input(b"/group 0x4000000000000007"), Input::Group("0x4000000000000007".into()));
        assert_eq!(parse_input(b"/history"), Input::History(None));
        assert_eq!(parse_input(b"/history 5"), Input::History(Some(5)));
        assert_eq!(parse_input(b"/create tim fans"), Input::Create("tim fans".into()));
        assert_eq!(parse_input(b"/quit"), Input::Quit);
        assert_eq!(parse_input(b"/to"), Input::Unknown("/to".into()));
        assert_eq!(parse_input(b"/history many"), Input::Unknown("/history many".into()));
        assert_eq!(parse_input(b"/recall 5"), Input::Recall("5".into()));
        assert_eq!(parse_input(b"/recall"), Input::Unknown("/recall".into()));
        assert_eq!(parse_input(b"/seen"), Input::Seen(None));
        assert_eq!(parse_input(b"/seen 7"), Input::Seen(Some("7".into())));
        assert_eq!(parse_input(b"/seen 7 8"), Input::Unknown("/seen 7 8".into()));
        assert_eq!(parse_input(b"/friends"), Input::Friends);
        assert_eq!(parse_input(b"/requests"), Input::Requests);
        assert_eq!(
            parse_input(b"/add 2  hi there, it's me "),
            Input::Roster(roster_action::REQUEST, "2".into(), "hi there, it's me".into())
        );
        assert_eq!(parse_input(b"/add 2"), Input::Roster(roster_action::REQUEST, "2".into(), "".into()));
        assert_eq!(parse_input(b"/accept 3"), Input::Roster(roster_action::ACCEPT, "3".into(), "".into()));
        assert_eq!(parse_input(b"/unfriend 3"), Input::Roster(roster_action::REMOVE, "3".into(), "".into()));
        assert_eq!(parse_input(b"/unblock 3"), Input::Roster(roster_action::UNBLOCK, "3".into(), "".into()));
        assert_eq!(parse_input(b"/watch 3"), Input::Roster(roster_action::WATCH, "3".into(), "".into()));
        assert_eq!(parse_input(b"/allow 3"), Input::Roster(roster_action::ALLOW, "3".into(), "".into()));
        assert_eq!(parse_input(b"/revoke 3"), Input::Roster(roster_action::REVOKE, "3".into(), "".into()));
        assert_eq!(parse_input(b"/watches"), Input::Watches);
        assert_eq!(parse_input(b"/block 3 4"), Input::Unknown("/block 3 4".into()));
        assert_eq!(parse_input(b"/add"), Input::Unknown("/add".into()));
        assert_eq!(parse_input(b"/status away  out for lunch "), Input::Status(2, "out for lunch".into()));
        assert_eq!(parse_input(b"/status Busy"), Input::Status(3, "".into()));
        assert_eq!(parse_input(b"/status invisible"), Input::Status(4, "".into()));
        assert_eq!(parse_input(b"/status offline"), Input::Unknown("/status offline".into()));
        assert_eq!(parse_input(b"/status"), Input::Unknown("/status".into()));
        assert_eq!(parse_input(b"/presence 2  3"), Input::Presence(vec!["2".into(), "3".into()]));
        assert_eq!(parse_input(b"/presence"), Input::Unknown("/presence".into()));
        assert_eq!(parse_input(b"/file  /tmp/a b.bin "), Input::File("/tmp/a b.bin".into()));
        assert_eq!(parse_input(b"/file"), Input::Unknown("/file".into()));
    }

    /// Ids are decimal or 0x hex; names are refused with the reason (no lookup by name).
    #[test]
    fn ids_parse_and_targets_tell_groups() {
        assert_eq!(parse_id("42"), Ok(42));
        assert_eq!(parse_id("0x4000000000000007"), Ok(GROUP));
        assert!(parse_id("alice").unwrap_err().contains("no lookup by name"));
        assert_eq!(Target::of(42, false), Ok(Target::User(42)));
        assert_eq!(Target::of(GROUP, false), Ok(Target::Group(GROUP)));
        assert!(Target::of(42, true).is_err());
        assert!(Target::of(0, false).is_err());
    }

    /// Bodies print as text with control characters escaped, or as a byte count.
    #[test]
    fn bodies_print_safely() {
        assert_eq!(body_text("héllo\tthere".as_bytes()), "héllo\tthere");
        assert_eq!(body_text(b"\x1b[2Jboo\n"), "\\u{1b}[2Jboo\\n");
        assert_eq!(body_text(&[0xff, 0xfe, 0]), "<3 bytes>");
    }

    /// Messages print binary bodies as their size, long texts cut with their size.
    #[test]
    fn large_and_binary_messages_print_as_sizes() {
        assert_eq!(size_text(1023), "1023 bytes");
        assert_eq!(size_text(1536), "1.5 KiB");
        assert_eq!(size_text(3 << 20), "3.0 MiB");
        assert_eq!(message_text(b"hi\n"), "hi\\n");
        assert_eq!(message_text(&[0xff, 0xfe, 0]), "[binary message, 3 bytes]");
        let mut big = vec![0xffu8; 3 << 20];
        big[0] = b'a';
        assert_eq!(message_text(&big), "[binary message, 3.0 MiB]");
        // 'é' is two bytes: the cut falls between characters.
        let text = "é".repeat(MESSAGE_SHOWN_BYTES_MAX);
        let shown = message_text(text.as_bytes());
        let cut = "é".repeat(MESSAGE_SHOWN_BYTES_MAX / 2);
        assert_eq!(shown, format!("{cut}… [text, 4.0 KiB]"));
        let line = render(&delivery(BOB, ALICE, conv::DIRECT, 3, &big), ALICE, false, 0);
        assert!(line.ends_with("2 → you: [binary message, 3.0 MiB]"), "{line}");
    }

    /// A peer's typing prints once per few seconds, its stop only after a "typing" shown, and
    /// a message of theirs lets the next "typing" print at once; this user's own print nothing.
    #[test]
    fn typing_notices_print_sparingly() {
        let n = |from, to, conv, state| protocol::TypingNotice { from, to, conv, state };
        let mut t = TypingShown::default();
        let start = Instant::now();
        let later = |ms| start + Duration::from_millis(ms);
        assert_eq!(t.notice(&n(BOB, ALICE, conv::DIRECT, 0), ALICE, start), None, "no typing shown");
        assert_eq!(
            t.notice(&n(BOB, ALICE, conv::DIRECT, 1), ALICE, start).as_deref(),
            Some("* 2 is typing…")
        );
        assert_eq!(t.notice(&n(BOB, ALICE, conv::DIRECT, 1), ALICE, later(3_000)), None);
        let again = t.notice(&n(BOB, ALICE, conv::DIRECT, 1), ALICE, start + TYPING_SHOWN_EVERY);
        assert_eq!(again.as_deref(), Some("* 2 is typing…"));
        assert_eq!(
            t.notice(&n(BOB, ALICE, conv::DIRECT, 0), ALICE, later(6_000)).as_deref(),
            Some("* 2 stopped typing")
        );
        assert_eq!(t.notice(&n(BOB, ALICE, conv::DIRECT, 0), ALICE, later(6_001)), None);
        assert_eq!(
            t.notice(&n(BOB, GROUP, conv::GROUP, 1), ALICE, start).as_deref(),
            Some(format!("* 2 is typing in group {GROUP}…").as_str())
        );
        t.message(&delivery(BOB, GROUP, conv::GROUP, 4, b"hi"), ALICE);
        assert!(t.notice(&n(BOB, GROUP, conv::GROUP, 1), ALICE, later(1)).is_some(), "after a message");
        assert_eq!(t.notice(&n(ALICE, GROUP, conv::GROUP, 1), ALICE, start), None, "mine");
    }

    /// Lines and JSON name the sender, the recipient (you, a user, a group) and the text.
    #[test]
    fn messages_render_as_lines_and_json() {
        let strip = |line: String| line.split_once("] ").map(|(_, rest)| rest.to_string()).unwrap();
        let now = 1_767_225_600_123;
        assert_eq!(
            strip(render(&delivery(BOB, ALICE, conv::DIRECT, 3, b"hi"), ALICE, false, now)),
            "2 → you: hi"
        );
        assert_eq!(
            strip(render(&delivery(ALICE, BOB, conv::DIRECT, 3, b"yo"), ALICE, false, now)),
            "you → 2: yo"
        );
        assert_eq!(
            strip(render(&delivery(BOB, GROUP, conv::GROUP, 3, b"all"), ALICE, true, now)),
            format!("2 → group {GROUP} (stream): all")
        );
        let v = render_json(&delivery(BOB, ALICE, conv::DIRECT, 3, &[0xff]), ALICE, false);
        assert_eq!(v["type"], "message");
        assert_eq!(v["conv"], "direct");
        assert_eq!(
            (v["from"].as_u64(), v["to"].as_u64(), v["seq"].as_u64()),
            (Some(BOB), Some(ALICE), Some(3))
        );
        assert_eq!(v["body_hex"], "ff");
        assert_eq!(v["mine"], false);
    }

    /// A recall notice names the seq it took back and who did; a tombstone says what became of
    /// it; interactive lines carry the seq (a stream message's none).
    #[test]
    fn recalls_and_tombstones_render() {
        let strip = |line: String| line.split_once("] ").map(|(_, rest)| rest.to_string()).unwrap();
        let now = 1_767_225_600_123;
        let mut recall = delivery(BOB, ALICE, conv::DIRECT, 6, &5u64.to_le_bytes());
        recall.flags = send_flags::RECALL;
        assert_eq!(strip(render(&recall, ALICE, false, now)), "2 → you: [seq 5 recalled by 2]");
        assert_eq!(strip(render(&recall, BOB, false, now)), "you → 1: [seq 5 recalled by you]");
        let v = render_json(&recall, ALICE, false);
        assert_eq!(
            (v["type"].as_str(), v["recall_seq"].as_u64(), v["flags"].as_u64()),
            (Some("recall"), Some(5), Some(2))
        );
        assert!(v.get("text").is_none());

        let mut gone = delivery(BOB, ALICE, conv::DIRECT, 5, b"");
        gone.state = msg_state::RECALLED;
        assert_eq!(strip(render(&gone, ALICE, false, now)), "2 → you: (recalled)");
        let v = render_json(&gone, ALICE, false);
        assert_eq!(
            (v["type"].as_str(), v["state"].as_str(), v["text"].as_str()),
            (Some("message"), Some("recalled"), Some(""))
        );
        assert!(v.get("flags").is_none());

        let line = render_numbered(&delivery(BOB, ALICE, conv::DIRECT, 4, b"hi"), ALICE, false, now);
        assert!(line.starts_with('[') && line.ends_with(" #4] 2 → you: hi"), "{line}");
        let line = render_numbered(&delivery(BOB, ALICE, conv::DIRECT, 4, b"hi"), ALICE, true, now);
        assert!(!line.contains('#'), "{line}");
    }

    /// A group notice renders in words and as JSON with its event's name.
    #[test]
    fn read_receipts_render() {
        let n = protocol::ReadNotice { from: BOB, to: ALICE, conv: conv::DIRECT, seq: 5 };
        assert_eq!(seen_text(&n, ALICE), "[seen up to #5 by 2]");
        let r = protocol::ReadState {
            conv: conv::GROUP,
            peer: GROUP,
            seq: 9,
            read_count: 2,
            member_count: 3,
            reads: Vec::new(),
        };
        assert_eq!(read_state_text(&r), "#9 read by 2 of 3");
    }

    #[test]
    fn roster_notices_render() {
        use protocol::RosterNotice;
        let n = |event, from, to, note: &str| RosterNotice { event, from, to, note: note.into() };
        assert_eq!(roster_notice_text(&n(1, BOB, ALICE, "hi"), ALICE), "[friend request from 2: \"hi\"]");
        assert_eq!(roster_notice_text(&n(1, BOB, ALICE, ""), ALICE), "[friend request from 2]");
        assert_eq!(roster_notice_text(&n(2, BOB, ALICE, ""), ALICE), "[2 accepted your friend request]");
        assert_eq!(roster_notice_text(&n(4, BOB, ALICE, ""), ALICE), "[2 is no longer your friend]");
        assert_eq!(roster_notice_text(&n(7, BOB, ALICE, ""), ALICE), "[2 withdrew their friend request]");
        assert_eq!(
            roster_notice_text(&n(1, ALICE, BOB, "a\nb"), ALICE),
            "[you asked 2 to be friends: \"a\\nb\"]"
        );
        assert_eq!(
            roster_notice_text(&n(8, BOB, ALICE, ""), ALICE),
            "[2 asks to see your presence (/allow 2 or /deny 2)]"
        );
        assert_eq!(roster_notice_text(&n(12, BOB, ALICE, ""), ALICE), "[you no longer see 2's presence]");
        assert_eq!(roster_notice_text(&n(9, ALICE, BOB, ""), ALICE), "[you let 2 see your presence]");
        let ok = protocol::RosterOk { action: 1, user: BOB, friends: true };
        assert_eq!(roster_ok_text(&ok), "user 2 had asked you: you are friends now");
    }

    #[test]
    fn presence_renders() {
        let e = |user, state, text: &str| protocol::PresenceEntry {
            user,
            state,
            since_ms: 0,
            text: text.into(),
            extra: Vec::new(),
        };
        assert_eq!(presence_notice_text(&e(BOB, 2, "lunch"), ALICE), "[2 is away: lunch]");
        assert_eq!(presence_notice_text(&e(BOB, 0, ""), ALICE), "[2 is offline]");
        assert_eq!(presence_notice_text(&e(ALICE, 3, "a\nb"), ALICE), "[you are busy: a\\nb]");
        assert_eq!(
            presence_entries_text(&[e(BOB, 1, ""), e(ALICE, 4, "")], ALICE, 0),
            "  2  online\n  1 (you)  invisible"
        );
    }

    #[test]
    fn notices_render_in_words() {
        let notice = protocol::GroupNotice {
            event: group_event::JOINED,
            actor: BOB,
            target: BOB,
            until_ms: 0,
            users: vec![],
        };
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(&notice).unwrap().to_vec();
        let d = delivery(0, GROUP, conv::GROUP, 2, &body);
        assert!(client::group_notice(&d).is_some(), "a notice");
        assert!(render(&d, ALICE, false, 0).ends_with(&format!("group {GROUP}: 2 joined")));
        let v = render_json(&d, ALICE, false);
        assert_eq!((v["type"].as_str(), v["event"].as_str()), (Some("notice"), Some("joined")));
    }

    /// Lines lose their `\n` or `\r\n`; an overlong one is cut one byte past the limit; the
    /// last line may lack its newline.
    #[test]
    fn stdin_lines_are_split_and_bounded() {
        let mut input = io::Cursor::new(b"one\r\ntwo\n\n0123456789\nlast".to_vec());
        let mut lines = Vec::new();
        while let Some(line) = read_line(&mut input, 5).unwrap() {
            lines.push(String::from_utf8(line).unwrap());
        }
        assert_eq!(lines, ["one", "two", "", "012345", "last"]);
    }

    /// Resends keep the client message id; a refusal for good hands the message back.
    #[test]
    fn the_outbox_resends_busy_sends_and_gives_up_on_refusals() {
        let now = Instant::now();
        let mut outbox = Outbox::new(u64::MAX);
        let a = outbox.add(Target::User(BOB), b"a".to_vec(), Some(1));
        let b = outbox.add(Target::User(BOB), b"b".to_vec(), Some(2));
        assert_ne!(a, 0, "0 is never a client message id");
        assert_ne!(a, b);
        let error = |id, code: ErrorCode| protocol::Error {
            code: code.code(),
            request_kind: kind::SEND,
            client_msg_id: id,
            message: String::new(),
        };
        assert!(matches!(outbox.refused(&error(a, ErrorCode::Busy), now), Answer::Retry));
        assert!(outbox.due(now).is_empty(), "after a pause");
        let later = now + RESEND_PAUSE;
        assert_eq!(outbox.due(later), vec![(a, Target::User(BOB), 0, b"a".to_vec())]);
        assert!(outbox.due(later).is_empty(), "once");
        match outbox.refused(&error(b, ErrorCode::NotMember), now) {
            Answer::Refused(m) => assert_eq!(m.line, Some(2)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(outbox.refused(&error(12345, ErrorCode::Busy), now), Answer::Stray));
        let ack = SendAck { client_msg_id: a, msg_id: 1, seq: 1, ts_ms: 0, duplicate: false };
        assert!(outbox.acked(&ack).is_some());
        assert!(outbox.is_empty());
        // A recall is resent as it was: the RECALL flag, the seq as its body.
        let r = outbox.add_recall(Target::User(BOB), 9);
        assert!(matches!(outbox.refused(&error(r, ErrorCode::Busy), now), Answer::Retry));
        assert_eq!(
            outbox.due(later),
            vec![(r, Target::User(BOB), send_flags::RECALL, 9u64.to_le_bytes().to_vec())]
        );
        match outbox.refused(&error(r, ErrorCode::NotRecallable), now) {
            Answer::Refused(m) => assert_eq!(recalled_seq(&m), Some(9)),
            other => panic!("{other:?}"),
        }
    }
}
