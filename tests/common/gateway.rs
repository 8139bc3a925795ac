//! Test clients for the gateway's listeners: TLS (rustls) and WebSocket (tungstenite) wrappers
//! that carry the project's [`Client`], raw WebSockets for bad-input tests, and certificates.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustls::{pki_types::ServerName, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tim::client::{Client, Transport};
use tungstenite::{protocol::WebSocket, Message};

/// A self-signed certificate for "localhost": (certificate PEM, key PEM, certificate DER).
pub fn certificate() -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem(), c.cert.der().to_vec())
}

/// Write a new certificate and key to `dir`/cert.pem and key.pem; returns the DER to trust.
pub fn write_certificate(dir: &Path) -> Vec<u8> {
    let (cert, key, der) = certificate();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    der
}

/// A TLS connection to `addr` that trusts only `ca` (DER), as "localhost".
pub fn tls_connect(addr: SocketAddr, ca: &[u8]) -> io::Result<TlsStream> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.to_vec().into()).unwrap();
    let cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = TlsStream(StreamOwned::new(conn, tcp));
    // Complete the handshake now, so a refused certificate fails here.
    while s.0.conn.is_handshaking() {
        s.0.conn.complete_io(&mut s.0.sock)?;
    }
    Ok(s)
}

/// A client TLS stream.
pub struct TlsStream(pub StreamOwned<ClientConnection, TcpStream>);

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Transport for TlsStream {
    fn tcp(&self) -> &TcpStream {
        &self.0.sock
    }
}

/// A WebSocket handshake over `stream` to path `/ws`, offering `subprotocol` if any.
pub fn ws_over(
    stream: Box<dyn Transport>,
    host: &str,
    subprotocol: Option<&str>,
) -> WebSocket<Box<dyn Transport>> {
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{host}/ws")).unwrap();
    if let Some(p) = subprotocol {
        req.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, _resp) = tungstenite::client::client(req, stream).expect("websocket handshake");
    ws
}

/// A WebSocket to `addr`'s `/ws`.
pub fn ws_connect(addr: SocketAddr, subprotocol: Option<&str>) -> WebSocket<Box<dyn Transport>> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ws_over(Box::new(tcp), &addr.to_string(), subprotocol)
}

/// The project's client over a WebSocket: each frame it writes is one binary message.
pub fn ws_client(ws: WebSocket<Box<dyn Transport>>) -> Client {
    Client::over(Box::new(WsStream { ws, rx: Vec::new(), at: 0 })).unwrap()
}

/// Binary WebSocket messages as a byte stream.
pub struct WsStream {
    pub ws: WebSocket<Box<dyn Transport>>,
    rx: Vec<u8>,
    at: usize,
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.rx.len() {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    self.rx = b.to_vec();
                    self.at = 0;
                }
                Ok(Message::Close(_)) => return Ok(0),
                Ok(Message::Text(t)) => return Err(io::Error::other(format!("unexpected text: {t}"))),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(0)
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.rx.len() - self.at);
        buf[..n].copy_from_slice(&self.rx[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ws.send(Message::Binary(buf.to_vec().into())).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for WsStream {
    fn tcp(&self) -> &TcpStream {
        self.ws.get_ref().tcp()
    }
}

/// Send raw bytes on a new TCP connection to `addr` and read until the server closes.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}
