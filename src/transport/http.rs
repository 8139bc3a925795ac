//! The HTTP/1.1 request at the start of a WebSocket listener's connection: an upgrade to a
//! WebSocket on [`WS_PATH`], a file of the web chat page ([`super::web`]), or a refusal with a
//! status code. Anything but an upgrade is answered and the connection closed (one request per
//! connection: the page is a few small files).
//!
//! Key items: [`route`], [`Head`].

use std::fmt::Write as _;

/// The path of the WebSocket upgrade.
pub const WS_PATH: &str = "/ws";
/// Bytes of a request head (request line and headers) at most; beyond: 431.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Header lines of a request at most; beyond: 431.
pub const HEADERS_MAX: usize = 32;
/// The WebSocket subprotocol for binary v1 frames (docs/JSON.md: optional).
pub const SUBPROTOCOL_BINARY: &str = "tim.v1";
/// The WebSocket subprotocol for JSON texts (docs/JSON.md: optional).
pub const SUBPROTOCOL_JSON: &str = "tim.json";

/// What the connection does after its request head.
#[derive(Debug, PartialEq)]
pub enum Head {
    /// The head is incomplete: read more.
    Partial,
    /// Upgrade to a WebSocket: send `response`; WebSocket frames start at byte `consumed` of
    /// what was read. `json`: the client chose a subprotocol (`Some(true)` for JSON); `None`:
    /// the first data message decides.
    Upgrade { response: Vec<u8>, consumed: usize, json: Option<bool> },
    /// Send `response` and close.
    Respond(Vec<u8>),
}

/// Route the request head at the start of `buf`.
pub fn route(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => return Head::Partial,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Head::Respond(plain(431, "Request Header Fields Too Large", "request head too large"))
        }
        Err(e) => return Head::Respond(plain(400, "Bad Request", &format!("bad request: {e}"))),
    };
    if consumed > HEAD_BYTES_MAX {
        return Head::Respond(plain(431, "Request Header Fields Too Large", "request head too large"));
    }
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("/");
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if path == WS_PATH {
        if method != "GET" {
            return Head::Respond(plain(405, "Method Not Allowed", "a WebSocket upgrade is a GET"));
        }
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Head::Respond(with_headers(
                426,
                "Upgrade Required",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
                "this path only takes a WebSocket upgrade",
            ));
        }
        if header("sec-websocket-version") != Some("13") {
            return Head::Respond(with_headers(
                426,
                "Upgrade Required",
                "Sec-WebSocket-Version: 13\r\n",
                "only WebSocket version 13 is supported",
            ));
        }
        let Some(key) = header("sec-websocket-key").filter(|k| k.len() == 24) else {
            return Head::Respond(plain(400, "Bad Request", "missing or invalid Sec-WebSocket-Key"));
        };
        let offered = |p: &str| has_token("sec-websocket-protocol", p);
        let (json, chosen) = if offered(SUBPROTOCOL_JSON) {
            (Some(true), Some(SUBPROTOCOL_JSON))
        } else if offered(SUBPROTOCOL_BINARY) {
            (Some(false), Some(SUBPROTOCOL_BINARY))
        } else {
            (None, None)
        };
        let mut response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n",
            tungstenite::handshake::derive_accept_key(key.as_bytes())
        );
        if let Some(p) = chosen {
            let _ = write!(response, "Sec-WebSocket-Protocol: {p}\r\n");
        }
        response.push_str("\r\n");
        return Head::Upgrade { response: response.into_bytes(), consumed, json };
    }
    if method != "GET" && method != "HEAD" {
        return Head::Respond(with_headers(
            405,
            "Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            "GET or HEAD only",
        ));
    }
    match super::web::asset(path) {
        Some((content_type, body)) => {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
                 Content-Security-Policy: default-src 'self'; connect-src 'self' ws: wss:\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if method == "GET" {
                r.extend_from_slice(body);
            }
            Head::Respond(r)
        }
        None => Head::Respond(plain(404, "Not Found", "not found")),
    }
}

fn plain(status: u16, reason: &str, text: &str) -> Vec<u8> {
    with_headers(status, reason, "", text)
}

fn with_headers(status: u16, reason: &str, extra: &str, text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{text}\n",
        text.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(h: &Head) -> &str {
        let Head::Respond(r) = h else { panic!("not a response: {h:?}") };
        std::str::from_utf8(&r[9..12]).unwrap()
    }

    const UPGRADE: &str =
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    /// The RFC 6455 example key gives the RFC's accept value; bytes after the head are left
    /// for the WebSocket; a subprotocol offered is chosen and sets the format.
    #[test]
    fn upgrade() {
        let req = format!("{UPGRADE}\r\nXYZ");
        let Head::Upgrade { response, consumed, json } = route(req.as_bytes()) else { panic!() };
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert_eq!(&req.as_bytes()[consumed..], b"XYZ");
        assert_eq!(json, None);
        let req = format!("{UPGRADE}Sec-WebSocket-Protocol: chat, tim.json\r\n\r\n");
        let Head::Upgrade { response, json, .. } = route(req.as_bytes()) else { panic!() };
        assert!(String::from_utf8(response).unwrap().contains("Sec-WebSocket-Protocol: tim.json\r\n"));
        assert_eq!(json, Some(true));
    }

    /// Incomplete heads wait; broken, oversized, wrong-method and unknown requests get their
    /// status codes.
    #[test]
    fn refusals() {
        assert_eq!(route(b"GET /ws HTTP/1.1\r\nHost: x\r\n"), Head::Partial);
        assert_eq!(status(&route(b"\x00\x01garbage\r\n\r\n")), "400");
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(HEAD_BYTES_MAX));
        assert_eq!(status(&route(big.as_bytes())), "431");
        let many: String = (0..HEADERS_MAX + 1).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(status(&route(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes())), "431");
        assert_eq!(status(&route(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")), "426");
        let v8 = UPGRADE.replace("Version: 13", "Version: 8") + "\r\n";
        assert_eq!(status(&route(v8.as_bytes())), "426");
        let nokey = UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short") + "\r\n";
        assert_eq!(status(&route(nokey.as_bytes())), "400");
        assert_eq!(status(&route(b"POST /ws HTTP/1.1\r\n\r\n")), "405");
        assert_eq!(status(&route(b"DELETE / HTTP/1.1\r\n\r\n")), "405");
        assert_eq!(status(&route(b"GET /nothing-here HTTP/1.1\r\n\r\n")), "404");
    }
}
