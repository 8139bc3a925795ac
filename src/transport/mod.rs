//! Transports: bytes on a socket in, whole frames out to the session logic
//! ([`crate::session`]), and the session's queued frames back out. Only transports touch client
//! sockets.
//!
//! - [`tcp`]: the binary protocol over plain TCP.

pub mod tcp;
