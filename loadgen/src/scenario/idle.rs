//! idle: open the connections, log them in and hold them for the duration, pinging often
//! enough to stay under the server's idle timeout (a third of `LoginOk.idle_timeout_ms`, or
//! `--ping-ms`), so that the server's memory per idle connection can be measured. Ping → Pong
//! round trips are recorded as the "ack" latency; the number still connected is reported.

use std::{cell::Cell, rc::Rc, time::Duration};

use tim::{
    client::{decode_event, Event},
    protocol::{self, kind},
};

use super::{join_run, Joined};
use crate::{
    global::{mix, Phase},
    net::Io,
    stats::{C, H},
    worker::{Notify, Worker},
};

/// Ping interval when the server announces no idle timeout.
const PING_DEFAULT: Duration = Duration::from_secs(30);

pub async fn run(w: &Rc<Worker>, conn: u32) {
    let Some(Joined { io, mut rd, login }) = join_run(w, conn, true).await else {
        return;
    };
    let every = w.g.cfg.ping.unwrap_or_else(|| match login.map(|l| l.idle_timeout_ms) {
        Some(ms) if ms > 0 => Duration::from_millis(ms as u64 / 3).max(Duration::from_millis(1)),
        _ => PING_DEFAULT,
    });
    w.stats.add(C::Connected, 1);
    let io = Rc::new(io);
    let wake = Rc::new(Notify::default());
    let dead = Rc::new(Cell::new(false));
    w.watch_phase(&wake);
    let pinger = monoio::spawn(pinger(w.clone(), conn, io.clone(), wake.clone(), dead.clone(), every));
    loop {
        match rd.next(&io, w).await {
            Ok(Some((k, payload))) => match decode_event(k, payload) {
                Ok(Event::Pong(p)) if p.nonce != 0 => {
                    w.stats.record(H::Ack, w.now_us().saturating_sub(p.nonce));
                    w.stats.add(C::Acked, 1);
                }
                Ok(Event::Error(e)) => w.stats.server_error(e.code, e.request_kind),
                Ok(Event::Kick(k)) => w.stats.error(&format!("kicked ({})", k.reason)),
                Ok(_) => {}
                Err(_) => w.stats.error(&format!("unexpected frame: {}", kind::name(k))),
            },
            Ok(None) => break,
            Err(e) => {
                if !io.is_closed() {
                    w.stats.error(&format!("read: {:?}", e.kind()));
                }
                break;
            }
        }
    }
    if w.phase() < Phase::Stop {
        w.stats.error("disconnected during the run");
    }
    dead.set(true);
    wake.notify();
    pinger.await;
    rd.release(w);
    w.stats.sub(C::Connected, 1);
}

/// Ping every `every` (first at a random point of the first interval) until the run stops.
async fn pinger(
    w: Rc<Worker>,
    conn: u32,
    io: Rc<Io>,
    wake: Rc<Notify>,
    dead: Rc<Cell<bool>>,
    every: Duration,
) {
    let every_us = every.as_micros().max(1) as u64;
    let mut next = w.now_us() + mix(w.g.run_id as u64 ^ conn as u64) % every_us;
    loop {
        if w.phase() >= Phase::Stop || dead.get() {
            break;
        }
        let now = w.now_us();
        if now >= next {
            io.queue(kind::PING, &protocol::Ping { nonce: now });
            w.stats.add(C::Sent, 1);
            if let Err(e) = io.flush().await {
                if !io.is_closed() {
                    w.stats.error(&format!("write: {:?}", e.kind()));
                }
                break;
            }
            next += every_us;
            continue;
        }
        let _ = monoio::time::timeout(Duration::from_micros(next - now), wake.wait()).await;
    }
    io.shutdown();
}
