//! The JSON mapping of protocol v1 (docs/JSON.md) from the client's side, for `--transport
//! ws-json`: a v1 request frame that a scenario queued becomes the JSON text a browser would
//! send ([`request_text`]), and a JSON text from the server becomes the v1 frame the server
//! would have sent over TCP ([`server_frame`]). The scenarios, their checks and the ledger then
//! run unchanged on v1 frames.
//!
//! Requests covered: register, login, ping, send, delivery_ack, logout (what one-to-one, idle and
//! login-storm send); server messages: register_ok, login_ok, pong, send_ack, deliver (and
//! history_msg, stream_msg), bye, error, kick, catch_up_end, resync, broadcast. Others are
//! skipped. u64 fields are written as strings of digits, as a JavaScript client must.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use rkyv::util::AlignedVec;
use tim::{
    frame::{self, Header, HEADER_BYTES},
    protocol::{self, kind, Stamp},
};

/// `raw` if it is 8-aligned in memory (as an archive must be to be read in place), else a copy
/// of it in `scratch`.
fn aligned<'a>(raw: &'a [u8], scratch: &'a mut AlignedVec<16>) -> &'a [u8] {
    if (raw.as_ptr() as usize).is_multiple_of(frame::ALIGN) {
        return raw;
    }
    scratch.clear();
    scratch.extend_from_slice(raw);
    &scratch[..]
}

/// Append the JSON text of the request frame `kind` with `payload` to `out`. Bodies go as
/// `"body"` text when they are UTF-8 and `b64_bodies` is off, else as `"body_b64"`. Kinds
/// without a JSON form here are an error.
pub fn request_text(
    k: u16,
    payload: &[u8],
    b64_bodies: bool,
    scratch: &mut AlignedVec<16>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let p = aligned(payload, scratch);
    macro_rules! access {
        ($t:ty) => {
            frame::access::<$t>(p).map_err(|e| format!("{}: {e}", kind::name(k)))?
        };
    }
    match k {
        kind::SEND => {
            let m = access!(protocol::ArchivedSend);
            out.extend_from_slice(br#"{"op":"send","conv":"#);
            push_u64(out, m.conv as u64);
            out.extend_from_slice(br#","to":"#);
            push_u64_str(out, m.to.to_native());
            out.extend_from_slice(br#","client_msg_id":"#);
            push_u64_str(out, m.client_msg_id.to_native());
            push_body(out, m.body.as_slice(), b64_bodies);
            out.push(b'}');
        }
        kind::DELIVERY_ACK => {
            let m = access!(protocol::ArchivedDeliveryAck);
            out.extend_from_slice(br#"{"op":"delivery_ack","conv":"#);
            push_u64(out, m.conv as u64);
            out.extend_from_slice(br#","peer":"#);
            push_u64_str(out, m.peer.to_native());
            out.extend_from_slice(br#","seq":"#);
            push_u64_str(out, m.seq.to_native());
            out.push(b'}');
        }
        kind::PING => {
            let m = access!(protocol::ArchivedPing);
            out.extend_from_slice(br#"{"op":"ping","nonce":"#);
            push_u64_str(out, m.nonce.to_native());
            out.push(b'}');
        }
        kind::REGISTER => {
            let m = access!(protocol::ArchivedRegister);
            out.extend_from_slice(br#"{"op":"register","name":"#);
            push_str(out, m.name.as_str());
            out.extend_from_slice(br#","password":"#);
            push_str(out, m.password.as_str());
            out.push(b'}');
        }
        kind::LOGIN => {
            let m = access!(protocol::ArchivedLogin);
            out.extend_from_slice(br#"{"op":"login","name":"#);
            push_str(out, m.name.as_str());
            out.extend_from_slice(br#","password":"#);
            push_str(out, m.password.as_str());
            out.extend_from_slice(br#","device_type":"#);
            push_u64(out, m.device_type as u64);
            out.extend_from_slice(br#","device_id":"#);
            push_str(out, m.device_id.as_str());
            out.push(b'}');
        }
        kind::LOGOUT => out.extend_from_slice(br#"{"op":"logout"}"#),
        _ => return Err(format!("tim-loadgen has no JSON form for {} requests", kind::name(k))),
    }
    Ok(())
}

fn push_body(out: &mut Vec<u8>, body: &[u8], b64: bool) {
    match std::str::from_utf8(body) {
        Ok(text) if !b64 => {
            out.extend_from_slice(br#","body":"#);
            push_str(out, text);
        }
        _ => {
            out.extend_from_slice(br#","body_b64":""#);
            let at = out.len();
            out.resize(at + body.len().div_ceil(3) * 4, 0);
            let n = STANDARD.encode_slice(body, &mut out[at..]).expect("room for the base64");
            out.truncate(at + n);
            out.push(b'"');
        }
    }
}

/// `v` in decimal.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `v` as a JSON string of decimal digits.
fn push_u64_str(out: &mut Vec<u8>, v: u64) {
    out.push(b'"');
    push_u64(out, v);
    out.push(b'"');
}

/// `s` as a JSON string: quotes, and escapes for `"`, `\` and control characters.
fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 15) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// A member's value in a server message, in place: strings as their raw bytes between the
/// quotes (`escaped`: with backslash escapes to undo), numbers as their text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Val<'a> {
    #[default]
    Absent,
    Str {
        raw: &'a [u8],
        escaped: bool,
    },
    Num(&'a [u8]),
    Bool(bool),
    /// null, an object or an array (skipped).
    Other,
}

/// A reader over one JSON text: just what a server message needs (docs/JSON.md section 4 — one
/// object of members whose values are strings, numbers, booleans, or objects and arrays that
/// are skipped), in one pass and without copying. serde_json's generic deserializer took a
/// third of the loadgen's CPU on this path; on two cores shared with the server that is taken
/// from the server.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

/// Nesting of skipped objects and arrays at most.
const DEPTH_MAX: usize = 32;

impl<'a> Scan<'a> {
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.peek() != Some(c) {
            return self.err(&format!("expected `{}`", c as char));
        }
        self.i += 1;
        Ok(())
    }

    /// A string, the opening quote next: its raw bytes and whether they hold escapes.
    fn string(&mut self) -> Result<(&'a [u8], bool), String> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        while let Some(&c) = self.b.get(self.i) {
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok((&self.b[start..self.i - 1], escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.i += 2;
                }
                0..=0x1f => return self.err("a control character in a string"),
                _ => self.i += 1,
            }
        }
        self.err("an unterminated string")
    }

    fn literal(&mut self, word: &[u8], v: Val<'a>) -> Result<Val<'a>, String> {
        if !self.b[self.i..].starts_with(word) {
            return self.err("not a JSON value");
        }
        self.i += word.len();
        Ok(v)
    }

    fn value(&mut self, depth: usize) -> Result<Val<'a>, String> {
        match self.peek() {
            Some(b'"') => self.string().map(|(raw, escaped)| Val::Str { raw, escaped }),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while self.i < self.b.len()
                    && matches!(self.b[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    self.i += 1;
                }
                Ok(Val::Num(&self.b[start..self.i]))
            }
            Some(b't') => self.literal(b"true", Val::Bool(true)),
            Some(b'f') => self.literal(b"false", Val::Bool(false)),
            Some(b'n') => self.literal(b"null", Val::Other),
            Some(open @ (b'{' | b'[')) if depth < DEPTH_MAX => {
                self.i += 1;
                let close = if open == b'{' { b'}' } else { b']' };
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(Val::Other);
                }
                loop {
                    if open == b'{' {
                        self.string()?;
                        self.eat(b':')?;
                    }
                    self.value(depth + 1)?;
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(c) if c == close => {
                            self.i += 1;
                            return Ok(Val::Other);
                        }
                        _ => return self.err("expected `,` or the end of an object or array"),
                    }
                }
            }
            _ => self.err("not a JSON value"),
        }
    }

    /// Every member of the top-level object, in order.
    fn members(
        mut self,
        mut each: impl FnMut(&'a [u8], Val<'a>) -> Result<(), String>,
    ) -> Result<(), String> {
        self.eat(b'{')?;
        if self.peek() == Some(b'}') {
            self.i += 1;
        } else {
            loop {
                let (key, escaped) = self.string()?;
                if escaped {
                    return self.err("an escaped member name");
                }
                self.eat(b':')?;
                let v = self.value(0)?;
                each(key, v)?;
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        break;
                    }
                    _ => return self.err("expected `,` or `}`"),
                }
            }
        }
        match self.peek() {
            None => Ok(()),
            Some(_) => self.err("trailing characters"),
        }
    }
}

/// Append the bytes a JSON string's raw content stands for to `out`.
fn unescape(raw: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut i = 0;
    while i < raw.len() {
        let Some(at) = raw[i..].iter().position(|&c| c == b'\\') else {
            out.extend_from_slice(&raw[i..]);
            break;
        };
        out.extend_from_slice(&raw[i..i + at]);
        i += at + 1;
        let c = *raw.get(i).ok_or("a string ending in a backslash")?;
        i += 1;
        let simple = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = |at: usize| -> Result<u32, String> {
                    let h = raw.get(at..at + 4).and_then(|h| std::str::from_utf8(h).ok());
                    h.and_then(|h| u32::from_str_radix(h, 16).ok())
                        .ok_or_else(|| "a bad \\u escape".to_owned())
                };
                let mut cp = hex(i)?;
                i += 4;
                if (0xd800..0xdc00).contains(&cp) && raw[i..].starts_with(b"\\u") {
                    let low = hex(i + 2)?;
                    if (0xdc00..0xe000).contains(&low) {
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                        i += 6;
                    }
                }
                let ch = char::from_u32(cp).ok_or("a \\u escape that is not a character")?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                continue;
            }
            _ => return Err("a bad escape".into()),
        };
        out.push(simple);
    }
    Ok(())
}

/// The members of every server message this module reads (docs/JSON.md section 4); the
/// others (`type`, `code_name`, `notice`, …) are skipped.
#[derive(Default)]
struct ServerMsg<'a> {
    kind: Val<'a>,
    user_id: Val<'a>,
    session_id: Val<'a>,
    server_time_ms: Val<'a>,
    idle_timeout_ms: Val<'a>,
    frame_bytes_max: Val<'a>,
    body_bytes_max: Val<'a>,
    inflight_max: Val<'a>,
    protocol_version: Val<'a>,
    large_body_bytes_max: Val<'a>,
    nonce: Val<'a>,
    client_msg_id: Val<'a>,
    msg_id: Val<'a>,
    seq: Val<'a>,
    ts_ms: Val<'a>,
    duplicate: Val<'a>,
    from: Val<'a>,
    to: Val<'a>,
    conv: Val<'a>,
    group_id: Val<'a>,
    body: Val<'a>,
    body_b64: Val<'a>,
    code: Val<'a>,
    request_kind: Val<'a>,
    message: Val<'a>,
    reason: Val<'a>,
    count: Val<'a>,
    more: Val<'a>,
    unavailable: Val<'a>,
}

impl<'a> ServerMsg<'a> {
    fn parse(text: &'a [u8]) -> Result<ServerMsg<'a>, String> {
        let mut m = ServerMsg::default();
        Scan { b: text, i: 0 }.members(|key, v| {
            let slot = match key {
                b"kind" => &mut m.kind,
                b"user_id" => &mut m.user_id,
                b"session_id" => &mut m.session_id,
                b"server_time_ms" => &mut m.server_time_ms,
                b"idle_timeout_ms" => &mut m.idle_timeout_ms,
                b"frame_bytes_max" => &mut m.frame_bytes_max,
                b"body_bytes_max" => &mut m.body_bytes_max,
                b"inflight_max" => &mut m.inflight_max,
                b"protocol_version" => &mut m.protocol_version,
                b"large_body_bytes_max" => &mut m.large_body_bytes_max,
                b"nonce" => &mut m.nonce,
                b"client_msg_id" => &mut m.client_msg_id,
                b"msg_id" => &mut m.msg_id,
                b"seq" => &mut m.seq,
                b"ts_ms" => &mut m.ts_ms,
                b"duplicate" => &mut m.duplicate,
                b"from" => &mut m.from,
                b"to" => &mut m.to,
                b"conv" => &mut m.conv,
                b"group_id" => &mut m.group_id,
                b"body" => &mut m.body,
                b"body_b64" => &mut m.body_b64,
                b"code" => &mut m.code,
                b"request_kind" => &mut m.request_kind,
                b"message" => &mut m.message,
                b"reason" => &mut m.reason,
                b"count" => &mut m.count,
                b"more" => &mut m.more,
                b"unavailable" => &mut m.unavailable,
                _ => return Ok(()),
            };
            *slot = v;
            Ok(())
        })?;
        Ok(m)
    }
}

/// An integer member (absent: 0): a JSON number or a string of decimal digits, within `T`.
fn int<T: TryFrom<u64>>(name: &str, v: Val<'_>) -> Result<T, String> {
    let digits = match v {
        Val::Absent => b"0".as_slice(),
        Val::Num(d) | Val::Str { raw: d, escaped: false } => d,
        _ => return Err(format!("`{name}` is not an integer")),
    };
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!("`{name}` is not a non-negative integer"));
    }
    let v = digits.iter().try_fold(0u64, |v, &d| v.checked_mul(10)?.checked_add((d - b'0') as u64));
    v.and_then(|v| T::try_from(v).ok()).ok_or_else(|| format!("`{name}` is out of range"))
}

fn u64_of(name: &str, v: Val<'_>) -> Result<u64, String> {
    int(name, v)
}

/// A boolean member (absent: false).
fn flag(name: &str, v: Val<'_>) -> Result<bool, String> {
    match v {
        Val::Absent => Ok(false),
        Val::Bool(b) => Ok(b),
        _ => Err(format!("`{name}` is not a boolean")),
    }
}

/// A string member as text (absent: empty).
fn string(name: &str, v: Val<'_>) -> Result<String, String> {
    let mut out = Vec::new();
    match v {
        Val::Absent => {}
        Val::Str { raw, escaped: false } => out.extend_from_slice(raw),
        Val::Str { raw, escaped: true } => unescape(raw, &mut out)?,
        _ => return Err(format!("`{name}` is not a string")),
    }
    String::from_utf8(out).map_err(|_| format!("`{name}` is not UTF-8"))
}

impl ServerMsg<'_> {
    /// The body's bytes appended to `out` (`body` text or `body_b64`).
    fn body_into(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match (self.body, self.body_b64) {
            (Val::Str { raw, escaped }, Val::Absent) if !escaped => out.extend_from_slice(raw),
            (Val::Str { raw, .. }, Val::Absent) => unescape(raw, out)?,
            (Val::Absent, Val::Str { raw, escaped: false }) => {
                STANDARD.decode_vec(raw, out).map_err(|e| format!("`body_b64`: {e}"))?
            }
            (Val::Absent, Val::Absent) => {}
            _ => return Err("`body` / `body_b64`: not one string".into()),
        }
        Ok(())
    }

    fn body(&self) -> Result<Vec<u8>, String> {
        let mut v = Vec::new();
        self.body_into(&mut v)?;
        Ok(v)
    }
}

/// Append to `out` (whose length is a multiple of 8) the v1 frame that the server's JSON
/// `text` stands for. `Ok(None)`: a kind this module skips; `Ok(Some(kind))`: a frame of that
/// kind was appended.
pub fn server_frame(text: &[u8], out: &mut Vec<u8>) -> Result<Option<u16>, String> {
    debug_assert!(out.len().is_multiple_of(frame::ALIGN));
    let m = ServerMsg::parse(text).map_err(|e| format!("not a server message: {e}"))?;
    if m.kind == Val::Absent {
        return Err("not a server message: no `kind`".into());
    }
    let k: u16 = int("kind", m.kind)?;
    match k {
        kind::DELIVER | kind::HISTORY_MSG | kind::STREAM_MSG => deliver_frame(k, &m, out)?,
        kind::SEND_ACK => {
            let a = protocol::SendAck {
                client_msg_id: u64_of("client_msg_id", m.client_msg_id)?,
                msg_id: u64_of("msg_id", m.msg_id)?,
                seq: u64_of("seq", m.seq)?,
                ts_ms: u64_of("ts_ms", m.ts_ms)?,
                duplicate: flag("duplicate", m.duplicate)?,
            };
            frame::encode_into(k, &a, out);
        }
        kind::ERROR => {
            let e = protocol::Error {
                code: int("code", m.code)?,
                request_kind: int("request_kind", m.request_kind)?,
                client_msg_id: u64_of("client_msg_id", m.client_msg_id)?,
                message: string("message", m.message)?,
            };
            frame::encode_into(k, &e, out);
        }
        kind::REGISTER_OK => {
            frame::encode_into(k, &protocol::RegisterOk { user_id: u64_of("user_id", m.user_id)? }, out)
        }
        kind::LOGIN_OK => {
            let ok = protocol::LoginOk {
                user_id: u64_of("user_id", m.user_id)?,
                session_id: u64_of("session_id", m.session_id)?,
                server_time_ms: u64_of("server_time_ms", m.server_time_ms)?,
                idle_timeout_ms: int("idle_timeout_ms", m.idle_timeout_ms)?,
                frame_bytes_max: int("frame_bytes_max", m.frame_bytes_max)?,
                body_bytes_max: int("body_bytes_max", m.body_bytes_max)?,
                inflight_max: int("inflight_max", m.inflight_max)?,
                protocol_version: int("protocol_version", m.protocol_version)?,
                // Absent (0) from servers that do not take large messages.
                large_body_bytes_max: int("large_body_bytes_max", m.large_body_bytes_max)?,
            };
            frame::encode_into(k, &ok, out);
        }
        kind::PONG => {
            let pong = protocol::Pong {
                nonce: u64_of("nonce", m.nonce)?,
                server_time_ms: u64_of("server_time_ms", m.server_time_ms)?,
            };
            frame::encode_into(k, &pong, out)
        }
        kind::BYE => frame::encode_into(k, &protocol::Bye { reserved: 0 }, out),
        kind::KICK => {
            let kick =
                protocol::Kick { reason: int("reason", m.reason)?, message: string("message", m.message)? };
            frame::encode_into(k, &kick, out);
        }
        kind::CATCHUP_END => {
            let end = protocol::CatchUpEnd {
                count: int("count", m.count)?,
                more: flag("more", m.more)?,
                unavailable: int("unavailable", m.unavailable)?,
            };
            frame::encode_into(k, &end, out);
        }
        kind::RESYNC => {
            out.extend_from_slice(&[0; HEADER_BYTES]);
            let at = out.len() - HEADER_BYTES;
            Header { len: 0, kind: k, flags: 0 }.write(&mut out[at..]);
        }
        kind::BROADCAST => {
            let b = protocol::Broadcast {
                ts_ms: u64_of("ts_ms", m.ts_ms)?,
                group_id: u64_of("group_id", m.group_id)?,
                body: m.body()?,
            };
            frame::encode_into(k, &b, out);
        }
        _ => return Ok(None),
    }
    Ok(Some(k))
}

/// A `deliver` (or `history_msg`, `stream_msg`) as its v1 frame: the 48-byte stamp, then the
/// sender's `Send` archive written as rkyv lays it out (docs/PROTOCOL.md 5.7): the body, zeros
/// to 8-alignment, the 32-byte root (`conv` and 7 padding bytes, `to`, `client_msg_id`, the
/// body's relative pointer and length).
fn deliver_frame(k: u16, m: &ServerMsg<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    let stamp = Stamp {
        msg_id: u64_of("msg_id", m.msg_id)?,
        seq: u64_of("seq", m.seq)?,
        ts_ms: u64_of("ts_ms", m.ts_ms)?,
        from: u64_of("from", m.from)?,
        to: u64_of("to", m.to)?,
        conv: int("conv", m.conv)?,
    };
    let client_msg_id = u64_of("client_msg_id", m.client_msg_id)?;
    let start = out.len();
    out.resize(start + HEADER_BYTES + Stamp::BYTES, 0);
    stamp.write(&mut out[start + HEADER_BYTES..]);
    let send_at = out.len();
    if let Err(e) = m.body_into(out) {
        out.truncate(start);
        return Err(e);
    }
    let body_len = out.len() - send_at;
    let root = frame::padded(body_len);
    out.resize(send_at + root, 0);
    out.extend_from_slice(&[stamp.conv, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&stamp.to.to_le_bytes());
    out.extend_from_slice(&client_msg_id.to_le_bytes());
    out.extend_from_slice(&(-((root + 24) as i64) as i32).to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    let len = out.len() - start - HEADER_BYTES;
    Header { len: len as u32, kind: k, flags: 0 }.write(&mut out[start..start + HEADER_BYTES]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use tim::client::{decode_event, Event};

    use super::*;

    /// One frame read back from `out`: kind and payload.
    fn only_frame(out: &[u8]) -> (u16, &[u8]) {
        match frame::parse(out, 1 << 20) {
            frame::Parsed::Frame(h, total) => {
                assert_eq!(total, out.len(), "one whole frame");
                (h.kind, &out[HEADER_BYTES..HEADER_BYTES + h.len as usize])
            }
            other => panic!("not a frame: {other:?}"),
        }
    }

    /// A deliver in JSON becomes the frame a TCP client gets: the same stamp, and a `Send`
    /// archive that rkyv reads (and that rkyv itself would have written byte for byte).
    #[test]
    fn deliver_becomes_the_v1_frame() {
        for body in
            ["", "hello", "tlg1AAAAAAAAAAAAAAAAAAAAAAAAAAA.......................", "quote \" back\\slash"]
        {
            let text = serde_json::to_vec(&serde_json::json!({"type":"deliver","kind":107,"msg_id":"81985529216486895","seq":"7",
                    "ts_ms":"1767225600123","from":"1","to":"2","conv":1,"client_msg_id":"18446744073709551615",
                    "body": body}))
            .unwrap();
            let mut out = Vec::new();
            assert_eq!(server_frame(&text, &mut out), Ok(Some(kind::DELIVER)));
            let (k, payload) = only_frame(&out);
            assert_eq!(k, kind::DELIVER);
            let stamp = Stamp::read(payload).unwrap();
            assert_eq!(
                (stamp.msg_id, stamp.seq, stamp.from, stamp.to, stamp.conv),
                (81985529216486895, 7, 1, 2, 1)
            );
            let send = protocol::Send {
                conv: 1,
                flags: 0,
                burn_secs: 0,
                to: 2,
                client_msg_id: u64::MAX,
                body: body.as_bytes().to_vec(),
            };
            let mut want = Vec::new();
            frame::encode_into(kind::SEND, &send, &mut want);
            let (_, want_payload) = only_frame(&want);
            assert_eq!(&payload[Stamp::BYTES..], want_payload, "as rkyv writes it");
            let mut aligned_payload = AlignedVec::<16>::new();
            aligned_payload.extend_from_slice(payload);
            let Ok(Event::Deliver(d)) = decode_event(k, &aligned_payload) else { panic!("decodes") };
            assert_eq!(d.body, body.as_bytes());
        }
        let b64 = br#"{"type":"deliver","kind":107,"msg_id":"1","seq":"1","ts_ms":"1","from":"1","to":"2","conv":1,"client_msg_id":"1","body_b64":"3q2+7w=="}"#;
        let mut out = Vec::new();
        server_frame(b64, &mut out).unwrap();
        let (_, payload) = only_frame(&out);
        assert_eq!(&payload[Stamp::BYTES..Stamp::BYTES + 4], &[0xde, 0xad, 0xbe, 0xef]);
    }

    /// Answers and pushes read as the events a TCP client would decode.
    #[test]
    fn answers_become_events() {
        type Check = fn(Event) -> bool;
        let cases: [(&[u8], Check); 8] = [
            (
                br#"{"type":"send_ack","kind":106,"id":"m1","client_msg_id":"17","msg_id":"9","seq":"3","ts_ms":"5","duplicate":true}"#,
                |e| matches!(e, Event::SendAck(a) if a.client_msg_id == 17 && a.msg_id == 9 && a.seq == 3 && a.duplicate),
            ),
            (
                br#"{"type":"login_ok","kind":102,"id":2,"user_id":"1","session_id":"281474976710659","server_time_ms":"1767225600000","idle_timeout_ms":90000,"frame_bytes_max":65536,"body_bytes_max":32768,"inflight_max":256,"protocol_version":1,"large_body_bytes_max":8388608}"#,
                |e| matches!(e, Event::LoginOk(ok) if ok.user_id == 1 && ok.inflight_max == 256 && ok.idle_timeout_ms == 90000 && ok.large_body_bytes_max == 8388608),
            ),
            (
                // An older server's login_ok, without large_body_bytes_max: 0.
                br#"{"type":"login_ok","kind":102,"user_id":"1","session_id":"3","server_time_ms":"5","idle_timeout_ms":90000,"frame_bytes_max":65536,"body_bytes_max":32768,"inflight_max":256,"protocol_version":1}"#,
                |e| matches!(e, Event::LoginOk(ok) if ok.user_id == 1 && ok.large_body_bytes_max == 0),
            ),
            (
                br#"{"type":"error","kind":120,"id":"m2","code":30,"code_name":"UnknownRecipient","request_kind":6,"client_msg_id":"18","message":"unknown recipient"}"#,
                |e| matches!(e, Event::Error(x) if x.code == 30 && x.request_kind == 6 && x.client_msg_id == 18 && x.message == "unknown recipient"),
            ),
            (br#"{"type":"register_ok","kind":101,"user_id":"42"}"#, |e| matches!(e, Event::RegisterOk(r) if r.user_id == 42)),
            (br#"{"type":"bye","kind":108}"#, |e| matches!(e, Event::Bye)),
            (br#"{"type":"resync","kind":113}"#, |e| matches!(e, Event::Resync)),
            (
                br#"{"type":"catch_up_end","kind":111,"count":3,"more":false,"unavailable":0}"#,
                |e| matches!(e, Event::CatchUpEnd(c) if c.count == 3 && !c.more),
            ),
        ];
        for (text, ok) in cases {
            let mut out = vec![0u8; 8]; // frames are appended at 8-aligned offsets
            server_frame(text, &mut out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(text)));
            let (k, payload) = only_frame(&out[8..]);
            let mut p = AlignedVec::<16>::new();
            p.extend_from_slice(payload);
            let ev = decode_event(k, &p).unwrap();
            assert!(ok(ev), "{}", String::from_utf8_lossy(text));
        }
        let mut out = Vec::new();
        assert_eq!(server_frame(br#"{"type":"room_ok","kind":130,"room_id":"1"}"#, &mut out), Ok(None));
        assert!(out.is_empty());
        assert!(server_frame(br#"{"kind":106,"seq":"x1"}"#, &mut out).is_err());
        assert!(server_frame(b"[1,2]", &mut out).is_err());
    }

    /// The scanner takes any JSON the server may write: escapes (surrogate pairs too), nested
    /// members it skips, spacing; and refuses what is not JSON.
    #[test]
    fn scanner() {
        let text = br#" { "type" : "error", "kind":120, "code":1, "request_kind":6, "client_msg_id":"0",
            "notice": {"users": ["1", {"x": [true, null, -1.5e3]}], "s": "}]"}, "message":"a \"q\" \\ \n \u00e9\ud83d\ude00 /" } "#;
        let mut out = Vec::new();
        assert_eq!(server_frame(text, &mut out), Ok(Some(kind::ERROR)));
        let (_, payload) = only_frame(&out);
        let mut p = AlignedVec::<16>::new();
        p.extend_from_slice(payload);
        let Ok(Event::Error(e)) = decode_event(kind::ERROR, &p) else { panic!() };
        assert_eq!(e.message, "a \"q\" \\ \n \u{e9}\u{1f600} /");
        for bad in [
            &b"{"[..],
            b"{\"kind\":106",
            b"{\"kind\":106}x",
            b"{\"kind\":\"1a\"}",
            b"{\"kind\":-1}",
            b"{kind:1}",
            b"{\"kind\":1.5}",
            b"{\"seq\":1}",
            b"{\"kind\":106,\"seq\":\"99999999999999999999\"}",
        ] {
            assert!(server_frame(bad, &mut Vec::new()).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut deep = b"{\"kind\":105,\"x\":".to_vec();
        deep.extend(std::iter::repeat_n(b'[', 100));
        assert!(server_frame(&deep, &mut Vec::new()).is_err(), "nesting is bounded");
    }

    /// Requests come out as docs/JSON.md writes them, and the server's own parser takes them.
    #[test]
    fn requests_in_json() {
        let mut scratch = AlignedVec::new();
        let text = |k: u16, f: &[u8], b64: bool, scratch: &mut AlignedVec<16>| {
            let (_, payload) = only_frame(f);
            let mut out = Vec::new();
            request_text(k, payload, b64, scratch, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let send = protocol::Send {
            conv: 1,
            flags: 0,
            burn_secs: 0,
            to: 2,
            client_msg_id: 1 << 60,
            body: b"hi \"you\"\n".to_vec(),
        };
        let f = frame::encode(kind::SEND, &send);
        assert_eq!(
            text(kind::SEND, &f, false, &mut scratch),
            r#"{"op":"send","conv":1,"to":"2","client_msg_id":"1152921504606846976","body":"hi \"you\"\u000a"}"#
        );
        assert_eq!(
            text(kind::SEND, &f, true, &mut scratch),
            r#"{"op":"send","conv":1,"to":"2","client_msg_id":"1152921504606846976","body_b64":"aGkgInlvdSIK"}"#
        );
        let login = protocol::Login {
            name: "lg-1".into(),
            password: "pass\\word".into(),
            device_type: 3,
            device_id: "lg1".into(),
        };
        let f = frame::encode(kind::LOGIN, &login);
        let t = text(kind::LOGIN, &f, false, &mut scratch);
        assert_eq!(
            t,
            r#"{"op":"login","name":"lg-1","password":"pass\\word","device_type":3,"device_id":"lg1"}"#
        );
        let mut corr = tim::json::Correlator::new();
        match tim::json::request(&t, &mut corr) {
            tim::json::Inbound::Frame(rf) => assert_eq!(rf.as_bytes(), &f[..]),
            tim::json::Inbound::Error(e) => panic!("{e}"),
        }
        let ack = protocol::DeliveryAck { conv: 1, peer: 5, seq: 9 };
        let f = frame::encode(kind::DELIVERY_ACK, &ack);
        assert_eq!(
            text(kind::DELIVERY_ACK, &f, false, &mut scratch),
            r#"{"op":"delivery_ack","conv":1,"peer":"5","seq":"9"}"#
        );
        let room = frame::encode(kind::ROOM_SUBSCRIBE, &protocol::RoomRef { room_id: 1 });
        let (_, payload) = only_frame(&room);
        assert!(request_text(kind::ROOM_SUBSCRIBE, payload, false, &mut scratch, &mut Vec::new()).is_err());
    }
}
