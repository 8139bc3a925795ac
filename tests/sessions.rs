//! Session lifecycle over real sockets: device limits and their policies, ping, idle and login
//! timeouts, logout, and graceful shutdown on SIGTERM.

mod common;
use std::time::{Duration, Instant};

use common::*;
use tim::{client::Event, protocol::ErrorCode};

/// kick_oldest: a login over the per-device-type limit kicks the oldest session of that type, and
/// one over the per-account limit kicks the oldest session of any type.
fn device_limit_kick_oldest(driver: &str) {
    let s = TestServer::start(
        driver,
        "[sessions]\nper_account_max = 3\nper_device_type_max = 2\npolicy = \"kick_oldest\"\n",
    );
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut p1, _) = s.login(&alice, 1);
    let (mut p2, _) = s.login(&alice, 1);
    let (mut p3, _) = s.login(&alice, 1); // third phone: p1 goes
    let err = p1.recv().unwrap();
    assert_eq!(
        err,
        Event::Kick(tim::protocol::Kick { reason: 42, message: "replaced by a newer login".into() })
    );
    let (mut d1, _) = s.login(&alice, 3); // fourth session over per_account_max 3 (p2, p3, d1): none kicked
    let (mut w1, _) = s.login(&alice, 4); // p2, p3, d1, w1 > 3: oldest (p2) goes
    match p2.recv().unwrap() {
        Event::Kick(k) => assert_eq!(k.reason, ErrorCode::Replaced as u16),
        other => panic!("unexpected {other:?}"),
    }
    // the survivors all get a message; the kicked ones are closed
    let (mut b, _) = s.login(&bob, 3);
    b.send_wait(s_id(&mut p3), 1, b"hi").unwrap_or_else(|e| panic!("{e}"));
    for c in [&mut p3, &mut d1, &mut w1] {
        assert_eq!(c.next_delivery().unwrap().body, b"hi");
    }
    assert!(matches!(
        p1.recv(),
        Err(tim::client::ClientError::Closed) | Err(tim::client::ClientError::Io(_))
    ));
    let _ = bob_id;
}

/// A session closed while frames are queued for it gets all of them and then the reason, even if
/// it keeps writing after the close: the server discards its input instead of resetting the
/// connection (a reset would destroy what the client had not read yet).
fn kicked_session_gets_its_queue_and_the_kick(driver: &str) {
    let s = TestServer::start(
        driver,
        "[sessions]\nper_account_max = 8\nper_device_type_max = 1\npolicy = \"kick_oldest\"\n",
    );
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    let (mut b, _) = s.login(&bob, 1);
    // b reads nothing while 60 messages of 30 KB queue for it
    const N: u64 = 60;
    let body = vec![7u8; 30_000];
    for i in 1..=N {
        a.send_wait(bob_id, i, &body).unwrap();
    }
    let (_b2, _) = s.login(&bob, 1); // the same device type again: b is kicked
    std::thread::sleep(Duration::from_millis(100));
    b.send_frame(tim::protocol::kind::PING, &tim::protocol::Ping { nonce: 1 }).unwrap();
    b.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut delivered, mut kicked) = (0u64, false);
    loop {
        match b.recv() {
            Ok(Event::Deliver(d)) => {
                assert!(!kicked, "a delivery after the kick");
                assert_eq!((d.client_msg_id, d.body.len()), (delivered + 1, body.len()));
                delivered += 1;
            }
            Ok(Event::Kick(k)) => {
                assert_eq!(k.reason, ErrorCode::Replaced as u16);
                kicked = true;
            }
            // the ping may have been read before the kick
            Ok(Event::Pong(_)) => assert!(!kicked, "a pong after the kick"),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tim::client::ClientError::Closed) => break,
            Err(e) => panic!("connection ended by {e} after {delivered} deliveries (kicked: {kicked})"),
        }
    }
    assert_eq!(delivered, N, "every queued message arrived");
    assert!(kicked, "the kick arrived");
}

/// The user id of a logged-in client, by pinging the server for nothing but a round trip.
fn s_id(c: &mut tim::client::Client) -> u64 {
    // The token's first 16 hex digits are the user id.
    let t = c.issue_token(1).unwrap();
    u64::from_str_radix(&t.token[..16], 16).unwrap()
}

/// refuse: a login over a limit gets DeviceLimit and the existing sessions stay.
fn device_limit_refuse(driver: &str) {
    let s = TestServer::start(
        driver,
        "[sessions]\nper_account_max = 2\nper_device_type_max = 1\npolicy = \"refuse\"\n",
    );
    let (alice, _) = s.register("alice");
    let (mut p1, _) = s.login(&alice, 1);
    let mut c = s.client();
    assert_eq!(c.login(&alice, PASSWORD, 1, "").unwrap_err().code(), Some(ErrorCode::DeviceLimit));
    let (_d1, _) = s.login(&alice, 3);
    assert_eq!(c.login(&alice, PASSWORD, 4, "").unwrap_err().code(), Some(ErrorCode::DeviceLimit));
    assert_eq!(p1.ping(9).unwrap().nonce, 9, "the first session is untouched");
    // when one leaves, a place frees up
    p1.logout().unwrap();
    let mut tries = 0;
    loop {
        match c.login(&alice, PASSWORD, 1, "") {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::DeviceLimit) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Pings keep a session alive past the idle timeout; silence closes it with IdleTimeout.
fn ping_and_idle_timeout(driver: &str) {
    let s = TestServer::start(driver, "[limits]\nidle_timeout_ms = 400\n");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    let (mut quiet, _) = s.login(&alice, 1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        let p = a.ping(start.elapsed().as_millis() as u64).unwrap();
        assert!(p.server_time_ms > 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    match quiet.recv().unwrap() {
        Event::Error(e) => assert_eq!(e.code, ErrorCode::IdleTimeout as u16),
        other => panic!("unexpected {other:?}"),
    }
    assert!(quiet.recv().is_err(), "closed after the idle timeout");
    assert!(a.ping(1).is_ok(), "the pinging session lives");
}

/// A connection that does not log in within login_timeout_ms gets LoginTimeout and is closed,
/// even if it pings.
fn login_timeout(driver: &str) {
    let s = TestServer::start(driver, "[limits]\nlogin_timeout_ms = 300\n");
    let mut c = s.client();
    let start = Instant::now();
    assert!(c.ping(1).is_ok());
    match c.recv().unwrap() {
        Event::Error(e) => assert_eq!(e.code, ErrorCode::LoginTimeout as u16),
        other => panic!("unexpected {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(c.recv().is_err());
}

/// Logout answers Bye and closes; the account's other sessions are unaffected.
fn logout(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, _) = s.register("alice");
    let (mut a1, _) = s.login(&alice, 1);
    let (mut a2, _) = s.login(&alice, 3);
    a1.logout().unwrap();
    assert!(a1.recv().is_err());
    assert!(a2.ping(3).is_ok());
}

/// SIGTERM: connected clients get Kick(ShuttingDown), new connections are refused, exit code 0.
fn graceful_shutdown(driver: &str) {
    let mut s = TestServer::start(driver, "");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    let mut anon = s.client();
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}");
    for c in [&mut a, &mut anon] {
        match c.recv().unwrap() {
            Event::Kick(k) => assert_eq!(k.reason, ErrorCode::ShuttingDown as u16),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(std::net::TcpStream::connect(s.addr).is_err(), "no longer listening");
}

/// `MySessions` lists the account's live sessions, oldest first, with their device type and id
/// and which one asked; `SessionLogout` closes one of them (`Kick{LoggedOutElsewhere}`) and
/// answers with the rest; a session that is not the account's, or id 0, is `UnknownSession`;
/// neither works before login.
fn my_sessions_and_remote_logout(driver: &str) {
    let s = TestServer::start(driver, "");
    let (ann, _) = s.register("ann");
    let (bob, _) = s.register("bob");
    let mut phone = s.client();
    let phone_id = phone.login(&ann, PASSWORD, 1, "ann's phone").unwrap().session_id;
    let mut desk = s.client();
    let desk_id = desk.login(&ann, PASSWORD, 3, "ann's desk").unwrap().session_id;
    let mut web = s.client();
    let web_id = web.login(&ann, PASSWORD, 4, "").unwrap().session_id;
    let (mut b, bob_session) = s.login(&bob, 3);
    let list = desk.my_sessions().unwrap().sessions;
    let seen: Vec<(u64, u8, &str, bool)> =
        list.iter().map(|x| (x.session_id, x.device_type, x.device_id.as_str(), x.current)).collect();
    assert_eq!(
        seen,
        [(phone_id, 1, "ann's phone", false), (desk_id, 3, "ann's desk", true), (web_id, 4, "", false)]
    );
    assert!(list.windows(2).all(|w| w[0].login_ms <= w[1].login_ms) && list[0].login_ms > 0);
    // The desk logs the phone out.
    let left = desk.session_logout(phone_id).unwrap().sessions;
    assert_eq!(left.iter().map(|x| x.session_id).collect::<Vec<_>>(), [desk_id, web_id]);
    loop {
        match phone.recv().expect("a kick") {
            Event::Kick(k) => {
                assert_eq!(k.reason, ErrorCode::LoggedOutElsewhere.code());
                break;
            }
            Event::CatchUpEnd(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Refusals: gone already, another account's session, 0.
    for id in [phone_id, bob_session, 0] {
        let e = desk.session_logout(id).expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::UnknownSession), "{id}");
    }
    assert_eq!(b.my_sessions().unwrap().sessions.len(), 1, "bob has his own");
    // Its own session too: the web logs itself out.
    web.session_logout(web_id).unwrap();
    assert!(matches!(web.recv(), Ok(Event::Kick(k)) if k.reason == ErrorCode::LoggedOutElsewhere.code()));
    assert_eq!(desk.my_sessions().unwrap().sessions.len(), 1);
    let e = s.client().my_sessions().expect_err("not logged in");
    assert_eq!(e.code(), Some(ErrorCode::NotLoggedIn));
}

on_both_drivers!(
    device_limit_kick_oldest,
    kicked_session_gets_its_queue_and_the_kick,
    device_limit_refuse,
    ping_and_idle_timeout,
    login_timeout,
    logout,
    graceful_shutdown,
    my_sessions_and_remote_logout
);
