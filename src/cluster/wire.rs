//! Envelopes on a node link (placeholder until the codec lands).

use bytes::Bytes;

use crate::envelope::Envelope;

#[derive(Debug)]
pub struct WireError;

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wire")
    }
}

pub fn encode(_shard: u16, _env: &Envelope, _out: &mut Vec<u8>) -> Result<(), WireError> {
    Err(WireError)
}

pub fn decode(_buf: &Bytes, _max: usize) -> Result<Option<(u16, Envelope, usize)>, WireError> {
    Err(WireError)
}
