//! echo: drive an `echo-limit` server (it sends every frame back unchanged) with the same Send
//! frames as one-to-one and no login. Each echoed frame counts as the message's ack and as its
//! one delivery, owed to the sending connection itself.

use tim::{frame, protocol, protocol::kind};

use crate::{
    global::LiveSet,
    scenario::{messaging::Incoming, Plan},
};

pub struct Echo;

impl Plan for Echo {
    fn logs_in(&self) -> bool {
        false
    }

    fn to(&self, _live: &LiveSet, _conn: u32, _counter: u64) -> Option<u64> {
        Some(1)
    }

    fn receivers(&self, _live: &LiveSet, conn: u32, _counter: u64, out: &mut Vec<u32>) {
        out.push(conn);
    }

    fn fanout(&self, _live: &LiveSet, _conn: u32, _counter: u64) -> u64 {
        1
    }

    fn delivery_acks(&self) -> bool {
        false
    }

    fn classify<'a>(&self, k: u16, payload: &'a [u8]) -> Incoming<'a> {
        if k != kind::SEND {
            return Incoming::Unexpected(k);
        }
        match frame::access::<protocol::ArchivedSend>(payload) {
            Ok(s) => Incoming::Echo { client_msg_id: s.client_msg_id.to_native(), body: s.body.as_slice() },
            Err(_) => Incoming::Unexpected(k),
        }
    }
}
