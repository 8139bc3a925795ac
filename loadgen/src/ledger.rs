//! The delivery ledger: what each connection sent, got acknowledged and received, kept in
//! per-connection tables on the connection's own thread (no lock or shared write per message),
//! and merged once at the end.
//!
//! Every message body starts with a [`BodyHeader`] (sender connection, per-connection counter,
//! send time), so a receiver knows exactly which message it got. A sender keeps a bitmap of its
//! acknowledged counters ([`SendLog`]); a receiver keeps, per sender connection, a bitmap of the
//! counters it received ([`RecvLog`]), and counts duplicates and order violations as they
//! arrive. [`merge`] then asks the scenario which connections each acknowledged message was
//! meant for and checks every one of them got it: missing → lost; received by a connection it
//! was not meant for → misrouted.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use tim::protocol::{conv, Stamp};

/// Bytes of [`BodyHeader`] at the start of every body.
pub const BODY_HEADER_BYTES: usize = 32;
const MAGIC: u32 = u32::from_le_bytes(*b"TLG1");
/// The text form of the header starts with this: see [`BodyHeader::write_text`].
const TEXT_MAGIC: &[u8; 4] = b"tlg1";
/// Digits of the text form, 6 bits each (base64url's alphabet: nothing a JSON string escapes).
const TEXT_DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";
/// Digits of each field in the text form: run id (36 bits), connection (24), flags (6),
/// counter (30), send time (66); with the magic, 31 bytes, then one filler byte.
const TEXT_WIDTHS: [usize; 5] = [6, 4, 1, 5, 11];
const _: () = assert!(4 + 6 + 4 + 1 + 5 + 11 < BODY_HEADER_BYTES);
const _: () = assert!(COUNTER_BITS <= 30);
/// Connection indices the text form holds (24 bits); `cli::CONNECTIONS_MAX` stays within it.
pub const TEXT_CONNECTIONS_MAX: u32 = 1 << 24;
/// Body flag: this copy was resent after a refusal (exempt from the send-order check).
pub const FLAG_RESENT: u32 = 1;

/// What a body carries for the ledger, little-endian at its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyHeader {
    pub run_id: u32,
    pub conn: u32,
    pub flags: u32,
    pub counter: u64,
    /// Microseconds since the run's base instant when the message was (meant to be) sent.
    pub sent_us: u64,
}

impl BodyHeader {
    /// Write the header at the start of `body` (which is at least [`BODY_HEADER_BYTES`] long).
    pub fn write(&self, body: &mut [u8]) {
        body[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        body[4..8].copy_from_slice(&self.run_id.to_le_bytes());
        body[8..12].copy_from_slice(&self.conn.to_le_bytes());
        body[12..16].copy_from_slice(&self.flags.to_le_bytes());
        body[16..24].copy_from_slice(&self.counter.to_le_bytes());
        body[24..32].copy_from_slice(&self.sent_us.to_le_bytes());
    }

    /// Write the header at the start of `body` in printable ASCII (for bodies sent as JSON
    /// text): `tlg1`, then run id, connection, flags, counter and send time as fixed-width
    /// big-endian numbers in base64url digits, then a `.`. [`BodyHeader::read`] reads both forms.
    pub fn write_text(&self, body: &mut [u8]) {
        assert!(self.flags < 64 && self.conn < 1 << 24 && self.counter < 1 << 30, "fields fit their digits");
        body[..4].copy_from_slice(TEXT_MAGIC);
        let mut at = 4;
        let values = [self.run_id as u64, self.conn as u64, self.flags as u64, self.counter, self.sent_us];
        for (v, width) in values.into_iter().zip(TEXT_WIDTHS) {
            for i in 0..width {
                let shift = 6 * (width - 1 - i);
                body[at + i] = TEXT_DIGITS[if shift >= 64 { 0 } else { ((v >> shift) & 63) as usize }];
            }
            at += width;
        }
        body[at..BODY_HEADER_BYTES].fill(b'.');
    }

    /// Write the header in the text form or the binary one.
    #[inline]
    pub fn write_as(&self, body: &mut [u8], text: bool) {
        if text {
            self.write_text(body)
        } else {
            self.write(body)
        }
    }

    fn read_text(body: &[u8]) -> Option<BodyHeader> {
        let mut values = [0u64; 5];
        let mut at = 4;
        for (v, width) in values.iter_mut().zip(TEXT_WIDTHS) {
            for &d in &body[at..at + width] {
                let digit = match d {
                    b'0'..=b'9' => d - b'0',
                    b'A'..=b'Z' => d - b'A' + 10,
                    b'a'..=b'z' => d - b'a' + 36,
                    b'-' => 62,
                    b'_' => 63,
                    _ => return None,
                };
                *v = (*v << 6) | digit as u64;
            }
            at += width;
        }
        let [run_id, conn, flags, counter, sent_us] = values;
        Some(BodyHeader {
            run_id: u32::try_from(run_id).ok()?,
            conn: conn as u32,
            flags: flags as u32,
            counter,
            sent_us,
        })
    }

    /// The header of `body`, if it has one (either form).
    pub fn read(body: &[u8]) -> Option<BodyHeader> {
        if body.len() < BODY_HEADER_BYTES {
            return None;
        }
        if body[..4] == TEXT_MAGIC[..] {
            return BodyHeader::read_text(body);
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != MAGIC {
            return None;
        }
        Some(BodyHeader {
            run_id: u32_at(4),
            conn: u32_at(8),
            flags: u32_at(12),
            counter: u64_at(16),
            sent_us: u64_at(24),
        })
    }
}

/// Client message ids: 16 bits of run id, 20 bits of connection, 28 bits of counter. Unique per
/// sending account across its devices (connections differ) and, with high probability, across
/// runs against the same server within its dedup window.
pub const COUNTER_BITS: u32 = 28;
pub const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;

pub fn client_msg_id(run_id: u32, conn: u32, counter: u64) -> u64 {
    ((run_id as u64 & 0xffff) << 48) | ((conn as u64) << COUNTER_BITS) | (counter & COUNTER_MAX)
}

/// The connection and counter a client message id of this run names, if it is one of ours.
pub fn split_client_msg_id(run_id: u32, id: u64) -> Option<(u32, u64)> {
    if id >> 48 != run_id as u64 & 0xffff {
        return None;
    }
    Some((((id >> COUNTER_BITS) & 0xfffff) as u32, id & COUNTER_MAX))
}

/// A growable bitmap over message counters.
#[derive(Clone, Debug, Default)]
pub struct Bits {
    words: Vec<u64>,
    ones: u64,
}

impl Bits {
    /// Set bit `n`; true if it was already set.
    #[inline]
    pub fn set(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.words.len() {
            self.words.resize((w + 1).max(self.words.len() * 2), 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        self.ones += u64::from(!was);
        was
    }

    #[inline]
    pub fn get(&self, n: u64) -> bool {
        self.words.get((n / 64) as usize).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.ones
    }

    /// The set bits, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }

    /// (bits set in both, bits set here but not in `other`).
    pub fn overlap(&self, other: &Bits) -> (u64, u64) {
        let (mut both, mut only) = (0, 0);
        for (i, &w) in self.words.iter().enumerate() {
            let o = other.words.get(i).copied().unwrap_or(0);
            both += (w & o).count_ones() as u64;
            only += (w & !o).count_ones() as u64;
        }
        (both, only)
    }
}

/// A message sent and not yet answered.
#[derive(Clone, Copy, Debug)]
pub struct Inflight {
    pub sent_us: u64,
    pub to: u64,
    pub resends: u32,
    /// Resent after a reconnect: the server may have stored it before the failure, and then
    /// acknowledges the resend as a duplicate (PROTOCOL.md 8.4).
    pub after_reconnect: bool,
}

/// A sending connection's side of the ledger.
#[derive(Default)]
pub struct SendLog {
    /// Counter of the next new message.
    pub next: u64,
    pub inflight: FxHashMap<u64, Inflight>,
    /// Refused messages waiting to be resent: (due, µs since base; counter).
    pub resend: VecDeque<(u64, u64)>,
    pub acked: Bits,
    /// Messages given up after too many refusals, or refused for good.
    pub abandoned: u64,
}

impl SendLog {
    /// After a reconnect: every message in flight is resent (same counter, so the same client
    /// message id), due at `now`, in counter order; the queue of refusal resends is replaced.
    /// Returns how many.
    pub fn resend_all(&mut self, now: u64) -> u64 {
        let mut counters: Vec<u64> = self.inflight.keys().copied().collect();
        counters.sort_unstable();
        self.resend.clear();
        for &n in &counters {
            if let Some(m) = self.inflight.get_mut(&n) {
                m.after_reconnect = true;
            }
            self.resend.push_back((now, n));
        }
        counters.len() as u64
    }
}

/// How a received message fits the ledger: new, a duplicate, or redelivered after a reconnect
/// (see [`RecvLog`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Received {
    pub duplicate: bool,
    pub redelivered: bool,
    pub out_of_order: bool,
}

/// A receiving connection's side of the ledger.
///
/// A connection that reconnects has several lives (one per login). The server is
/// at-least-once across them: a message received before the failure can come again in the
/// next login's catch-up (the device's cursor is the last acknowledged seq the server had
/// stored), and a message committed around that login can come both live and in the catch-up
/// (PROTOCOL.md 8.13). So in a life after a reconnect, a repeat is *redelivered* when its
/// earlier copy came in an earlier life or either copy came in the life's catch-up window
/// (from the login to its `CatchUpEnd`); only a repeat of a message received in the same life
/// outside that window is a *duplicate*, as is any repeat in the first life. The catch-up also
/// mixes with live deliveries, so in the window the order checks are suspended
/// ([`RecvLog::new_life`]).
#[derive(Default)]
pub struct RecvLog {
    /// Per sender connection: the counters received (in any life).
    pub from: FxHashMap<u32, Bits>,
    /// After a reconnect: per sender connection, the counters received in the current life
    /// outside its catch-up window (none in the first life, where `from` is that).
    life: Option<FxHashMap<u32, Bits>>,
    /// In a new life's catch-up window: order checks suspended (maxima still raised), repeats
    /// count as redelivered.
    order_relaxed: bool,
    /// Per (sender connection, recipient user): the highest counter received un-resent.
    order: FxHashMap<(u32, u64), u64>,
    /// Per conversation (its two user ids, smaller first; a group: (0, group id)): the highest
    /// seq received.
    seq: FxHashMap<(u64, u64), u64>,
}

/// The conversation a stamp belongs to, as [`RecvLog`] keys its seq: a direct conversation by
/// its two users (smaller first), a group by its id alone (one sequence for every sender and
/// its notices).
fn conv_key(s: &Stamp) -> (u64, u64) {
    if s.conv == conv::GROUP {
        (0, s.to)
    } else if s.from <= s.to {
        (s.from, s.to)
    } else {
        (s.to, s.from)
    }
}

impl RecvLog {
    /// Record message `counter` of connection `sender`. `stamp` is the server's (absent for
    /// echoes): within a conversation its seq must rise. Un-resent messages of one sender to one
    /// recipient must arrive in counter order.
    pub fn record(&mut self, sender: u32, counter: u64, flags: u32, stamp: Option<&Stamp>) -> Received {
        let seen = self.from.entry(sender).or_default().set(counter);
        let seen_in_life = match &mut self.life {
            None => seen,
            Some(_) if self.order_relaxed => false,
            Some(life) => life.entry(sender).or_default().set(counter),
        };
        if seen {
            return Received { duplicate: seen_in_life, redelivered: !seen_in_life, out_of_order: false };
        }
        let mut out_of_order = false;
        let to = stamp.map_or(0, |s| s.to);
        if flags & FLAG_RESENT == 0 {
            let max = self.order.entry((sender, to)).or_insert(counter);
            if counter < *max {
                out_of_order = true;
            }
            *max = (*max).max(counter);
        }
        if let Some(s) = stamp {
            out_of_order |= !self.note_seq(s);
        }
        Received { duplicate: false, redelivered: false, out_of_order: out_of_order && !self.order_relaxed }
    }

    /// Note the seq of a delivery that is not a message of the run (a group notice): it takes
    /// its place in its conversation's sequence. False if it is at or below one seen before
    /// (never while the order checks are suspended).
    pub fn note_seq(&mut self, s: &Stamp) -> bool {
        let last = self.seq.entry(conv_key(s)).or_insert(0);
        let rising = s.seq > *last;
        *last = (*last).max(s.seq);
        rising || self.order_relaxed
    }

    /// The connection logged in again: a new life begins. `catch_up` says a catch-up follows
    /// (a durable server): the order checks wait for its end ([`RecvLog::caught_up`]).
    pub fn new_life(&mut self, catch_up: bool) {
        match &mut self.life {
            Some(life) => life.clear(),
            None => self.life = Some(FxHashMap::default()),
        }
        self.order_relaxed = catch_up;
    }

    /// The life's catch-up ended (`CatchUpEnd`): order checks resume, against the highest
    /// counters and seqs received so far.
    pub fn caught_up(&mut self) {
        self.order_relaxed = false;
    }
}

/// What one connection leaves for the merge.
pub struct ConnLedger {
    pub conn: u32,
    pub acked: Bits,
    pub received: FxHashMap<u32, Bits>,
    /// Sent and never answered by the end.
    pub unanswered: u64,
    pub abandoned: u64,
    /// Room: messages the server reported this subscriber missed.
    pub missed: u64,
    /// Deliveries this connection received twice, and out of order (message scenarios).
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Reconnects: deliveries received again in a later life, how many times the connection
    /// logged in again, the time it spent down (in all, and its longest outage, µs), and
    /// whether it gave up (every address down for longer than --reconnect-give-up).
    pub redelivered: u64,
    pub reconnects: u64,
    pub down_us: u64,
    pub down_max_us: u64,
    pub gave_up: bool,
    /// The connection was down when it ended (it gave up, failed without --reconnect, or was
    /// still reconnecting when the run stopped).
    pub down_at_end: bool,
}

impl ConnLedger {
    pub fn new(conn: u32, send: SendLog, recv: RecvLog) -> ConnLedger {
        ConnLedger {
            conn,
            acked: send.acked,
            received: recv.from,
            unanswered: send.inflight.len() as u64,
            abandoned: send.abandoned,
            missed: 0,
            duplicated: 0,
            out_of_order: 0,
            redelivered: 0,
            reconnects: 0,
            down_us: 0,
            down_max_us: 0,
            gave_up: false,
            down_at_end: false,
        }
    }
}

/// The verdict of the merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged messages.
    pub acked: u64,
    /// Deliveries the acknowledged messages owed (message × session it was meant for).
    pub expected: u64,
    /// Of those, received.
    pub delivered: u64,
    /// Of those, never received.
    pub lost: u64,
    /// Received by a connection the message was not meant for.
    pub misrouted: u64,
    /// A connection's own acknowledged messages it received itself, in a later life (it
    /// reconnected as the same device): the server's fan-out skips the session that sent, so
    /// a fan-out still on its way when the device logged in again reaches the new session.
    /// Allowed (PROTOCOL 8.3: clients drop repeats by seq); counted apart from `misrouted`.
    pub echoed_after_reconnect: u64,
    /// Received although the sender never saw the ack (answer still on the way at the end).
    pub delivered_unacked: u64,
    pub unanswered: u64,
    pub abandoned: u64,
}

/// Check every acknowledged message against its receivers. `receivers(sender, counter, out)`
/// pushes the connections that message was meant for.
pub fn merge(
    ledgers: &[ConnLedger],
    connections: u32,
    mut receivers: impl FnMut(u32, u64, &mut Vec<u32>),
) -> Verdict {
    let mut by_conn: Vec<Option<&ConnLedger>> = vec![None; connections as usize];
    for l in ledgers {
        by_conn[l.conn as usize] = Some(l);
    }
    let mut v = Verdict::default();
    let mut rv = Vec::new();
    for l in ledgers {
        v.acked += l.acked.count();
        v.unanswered += l.unanswered;
        v.abandoned += l.abandoned;
        for n in l.acked.iter() {
            rv.clear();
            receivers(l.conn, n, &mut rv);
            for &r in &rv {
                v.expected += 1;
                let got = by_conn
                    .get(r as usize)
                    .copied()
                    .flatten()
                    .and_then(|rl| rl.received.get(&l.conn))
                    .is_some_and(|b| b.get(n));
                if got {
                    v.delivered += 1;
                } else {
                    v.lost += 1;
                }
            }
        }
    }
    let empty = Bits::default();
    let mut received_acked = 0;
    for l in ledgers {
        for (&s, bits) in &l.received {
            let acked = by_conn.get(s as usize).copied().flatten().map_or(&empty, |sl| &sl.acked);
            let (both, only) = bits.overlap(acked);
            if s == l.conn && l.reconnects > 0 {
                v.echoed_after_reconnect += both;
            } else {
                received_acked += both;
            }
            v.delivered_unacked += only;
        }
    }
    v.misrouted = received_acked.saturating_sub(v.delivered);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_header_round_trip() {
        let h = BodyHeader { run_id: 7, conn: 3, flags: FLAG_RESENT, counter: 1 << 40, sent_us: 99 };
        let mut body = vec![0u8; 64];
        h.write(&mut body);
        assert_eq!(BodyHeader::read(&body), Some(h));
        assert_eq!(BodyHeader::read(&body[..31]), None);
        body[0] ^= 1;
        assert_eq!(BodyHeader::read(&body), None);
    }

    /// The text form is printable ASCII, reads back to the same header, and is told apart from
    /// the binary form by its magic.
    #[test]
    fn body_header_text_round_trip() {
        let run_id = u32::MAX;
        let h = BodyHeader {
            run_id,
            conn: (1 << 20) - 1,
            flags: FLAG_RESENT,
            counter: COUNTER_MAX,
            sent_us: u64::MAX,
        };
        let mut body = vec![b'.'; 64];
        h.write_text(&mut body);
        assert!(body.iter().all(|b| b.is_ascii_graphic()), "{:?}", String::from_utf8_lossy(&body));
        assert_eq!(BodyHeader::read(&body), Some(h));
        let small = BodyHeader { run_id: 0, conn: 0, flags: 0, counter: 0, sent_us: 12_345 };
        small.write_as(&mut body, true);
        assert_eq!(&body[..4], b"tlg1");
        assert_eq!(BodyHeader::read(&body), Some(small));
        body[9] = b'"';
        assert_eq!(BodyHeader::read(&body), None, "not a digit");
    }

    #[test]
    fn msg_ids() {
        let id = client_msg_id(0x1_2345, 0xfffff, COUNTER_MAX);
        assert_eq!(split_client_msg_id(0x1_2345, id), Some((0xfffff, COUNTER_MAX)));
        assert_eq!(split_client_msg_id(0x1_2346, id), None);
    }

    #[test]
    fn bits() {
        let mut b = Bits::default();
        assert!(!b.set(3));
        assert!(b.set(3));
        assert!(!b.set(200));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![3, 200]);
        assert_eq!(b.count(), 2);
        let mut o = Bits::default();
        o.set(3);
        assert_eq!(b.overlap(&o), (1, 1));
    }

    /// Duplicates, counter regressions and seq regressions are noticed; resent copies are exempt
    /// from the counter-order check only.
    #[test]
    fn recv_checks() {
        let mut r = RecvLog::default();
        let st = |seq| Stamp { msg_id: seq, seq, ts_ms: 0, from: 1, to: 2, conv: 1 };
        assert_eq!(r.record(0, 1, 0, Some(&st(1))), Received::default());
        assert!(r.record(0, 1, 0, Some(&st(1))).duplicate);
        assert!(!r.record(0, 0, FLAG_RESENT, Some(&st(2))).out_of_order);
        assert!(r.record(0, 3, 0, Some(&st(2))).out_of_order);
        assert!(r.record(0, 2, 0, Some(&st(4))).out_of_order);
    }

    /// After a reconnect a message of an earlier life is redelivered, not duplicated; twice in
    /// the new life it is a duplicate; until the life's catch-up ends, order is not checked.
    #[test]
    fn recv_across_lives() {
        let mut r = RecvLog::default();
        let st = |seq| Stamp { msg_id: seq, seq, ts_ms: 0, from: 1, to: 2, conv: 1 };
        for n in 0..3 {
            assert_eq!(r.record(0, n, 0, Some(&st(n + 1))), Received::default());
        }
        r.new_life(true);
        // A live delivery comes before the catch-up of what was missed.
        assert_eq!(r.record(0, 5, 0, Some(&st(6))), Received::default());
        let again = r.record(0, 2, 0, Some(&st(3)));
        assert!(again.redelivered && !again.duplicate && !again.out_of_order);
        assert_eq!(r.record(0, 3, 0, Some(&st(4))), Received::default(), "catch-up, not out of order");
        assert!(r.record(0, 3, 0, Some(&st(4))).redelivered, "live and in the catch-up");
        r.caught_up();
        assert!(r.record(0, 5, 0, Some(&st(6))).redelivered, "its first copy came in the window");
        assert!(r.record(0, 5, 0, Some(&st(6))).duplicate, "twice in one life after the window");
        assert!(r.record(0, 4, 0, Some(&st(5))).out_of_order, "order checked again after the catch-up");
        assert_eq!(r.record(0, 6, 0, Some(&st(7))), Received::default());
        r.new_life(false);
        assert!(r.record(0, 6, 0, Some(&st(7))).redelivered);
        assert!(r.record(0, 6, 0, Some(&st(7))).duplicate, "no catch-up: twice in one life");
        assert_eq!(r.from[&0].count(), 7);
    }

    /// In-flight messages are resent in counter order after a reconnect, the refusal queue
    /// replaced.
    #[test]
    fn resend_all_after_reconnect() {
        let mut s = SendLog::default();
        for n in [7, 3, 5] {
            s.inflight.insert(n, Inflight { sent_us: n, to: 1, resends: 0, after_reconnect: false });
        }
        s.resend.push_back((10, 5));
        assert_eq!(s.resend_all(99), 3);
        assert_eq!(s.resend.iter().copied().collect::<Vec<_>>(), [(99, 3), (99, 5), (99, 7)]);
        assert!(s.inflight.values().all(|m| m.after_reconnect));
    }

    /// A group has one sequence for all its senders and its notices (stamp `from` 0).
    #[test]
    fn group_seq_is_one_per_group() {
        let mut r = RecvLog::default();
        let g = 1 << 62;
        let st = |seq, from| Stamp { msg_id: seq, seq, ts_ms: 0, from, to: g, conv: conv::GROUP };
        assert!(r.note_seq(&st(3, 0)), "a notice");
        assert!(!r.record(0, 0, 0, Some(&st(4, 7))).out_of_order);
        assert!(!r.record(1, 0, 0, Some(&st(5, 8))).out_of_order, "another sender, same group");
        assert!(r.record(0, 1, 0, Some(&st(5, 7))).out_of_order, "seq 5 again, from another sender");
        assert!(!r.note_seq(&st(2, 0)), "a notice behind");
        let other = Stamp { to: g + 1, ..st(1, 7) };
        assert!(!r.record(0, 2, 0, Some(&other)).out_of_order, "another group has its own");
    }

    /// Two connections of user 0 (conns 0, 2) and one of user 1 (conn 1); conn 0 writes to
    /// user 1, so each message is owed to conns 1 and 2.
    #[test]
    fn merge_counts() {
        let mut send0 = SendLog::default();
        for n in 0..4 {
            send0.acked.set(n);
        }
        let mut r1 = RecvLog::default();
        let mut r2 = RecvLog::default();
        for n in 0..4 {
            r1.record(0, n, 0, None);
        }
        for n in [0, 1, 2, 4] {
            r2.record(0, n, 0, None);
        }
        let ledgers = vec![
            ConnLedger::new(0, send0, RecvLog::default()),
            ConnLedger::new(1, SendLog::default(), r1),
            ConnLedger::new(2, SendLog::default(), r2),
        ];
        let v = merge(&ledgers, 3, |_, _, out| out.extend([1, 2]));
        assert_eq!((v.acked, v.expected, v.delivered, v.lost), (4, 8, 7, 1));
        assert_eq!((v.misrouted, v.delivered_unacked), (0, 1));
        let v = merge(&ledgers, 3, |_, _, out| out.push(1));
        assert_eq!((v.expected, v.delivered, v.lost, v.misrouted), (4, 4, 0, 3));
    }

    /// A connection that gets its own acknowledged message: misrouted, unless it reconnected
    /// (then counted apart: the fan-out to the sender's other sessions reached its new one).
    #[test]
    fn own_message_after_reconnect() {
        let mut send0 = SendLog::default();
        send0.acked.set(0);
        let mut r0 = RecvLog::default();
        r0.record(0, 0, 0, None);
        let mut r1 = RecvLog::default();
        r1.record(0, 0, 0, None);
        let mut ledgers = vec![ConnLedger::new(0, send0, r0), ConnLedger::new(1, SendLog::default(), r1)];
        let v = merge(&ledgers, 2, |_, _, out| out.push(1));
        assert_eq!((v.delivered, v.misrouted, v.echoed_after_reconnect), (1, 1, 0));
        ledgers[0].reconnects = 1;
        let v = merge(&ledgers, 2, |_, _, out| out.push(1));
        assert_eq!((v.delivered, v.misrouted, v.echoed_after_reconnect), (1, 0, 1));
    }
}
