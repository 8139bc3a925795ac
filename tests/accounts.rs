//! Accounts over real sockets: register, login, one-shot tokens, and the codes for each refusal.

mod common;
use common::*;
use tim::protocol::ErrorCode;

/// Register then log in; names are case-insensitive; the ids match.
fn register_and_login(driver: &str) {
    let s = TestServer::start(driver, "");
    let mut c = s.client();
    let id = c.register("Alice", PASSWORD).unwrap();
    assert!(id > 0);
    let ok = c.login("alice", PASSWORD, 1, "phone-1").unwrap();
    assert_eq!(ok.user_id, id);
    assert_eq!(ok.protocol_version, 1);
    assert!(ok.idle_timeout_ms > 0);
    assert_eq!(
        (ok.frame_bytes_max, ok.body_bytes_max, ok.inflight_max),
        (65536, 32768, 256),
        "limits announced"
    );
    // registering from a logged-in session is refused
    assert_eq!(c.register("carol", PASSWORD).unwrap_err().code(), Some(ErrorCode::AlreadyLoggedIn));
    // logging in twice on one session is refused
    let err = c.login("alice", PASSWORD, 1, "phone-1").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn));
    let mut d = s.client();
    assert_eq!(d.register("ALICE", PASSWORD).unwrap_err().code(), Some(ErrorCode::NameTaken));
}

/// A wrong password and an unknown user each get their own code; bad names, passwords and
/// devices get theirs.
fn login_refusals(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, _) = s.register("alice");
    let mut c = s.client();
    assert_eq!(
        c.login(&alice, "not the password", 1, "").unwrap_err().code(),
        Some(ErrorCode::WrongPassword)
    );
    assert_eq!(c.login("nobody-here", PASSWORD, 1, "").unwrap_err().code(), Some(ErrorCode::UnknownUser));
    assert_eq!(c.login("", PASSWORD, 1, "").unwrap_err().code(), Some(ErrorCode::InvalidName));
    assert_eq!(c.login(&alice, PASSWORD, 9, "").unwrap_err().code(), Some(ErrorCode::InvalidDevice));
    let long_device = "d".repeat(65);
    assert_eq!(
        c.login(&alice, PASSWORD, 1, &long_device).unwrap_err().code(),
        Some(ErrorCode::InvalidDevice)
    );
    assert_eq!(c.register("x", "short").unwrap_err().code(), Some(ErrorCode::InvalidPassword));
    assert_eq!(c.register(" padded", PASSWORD).unwrap_err().code(), Some(ErrorCode::InvalidName));
    assert_eq!(c.register(&"n".repeat(65), PASSWORD).unwrap_err().code(), Some(ErrorCode::InvalidName));
    // after all that, the same connection can still log in
    assert!(c.login(&alice, PASSWORD, 1, "").is_ok());
}

/// A one-shot token logs in once, on any connection, and never again; garbage tokens are refused.
fn one_shot_token(driver: &str) {
    let s = TestServer::start(driver, "");
    let (alice, alice_id) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    let t = a.issue_token(60).unwrap();
    assert_eq!(t.token.len(), 48);
    assert!(t.expires_at_ms > 0);
    // issuing needs a login
    let mut anon = s.client();
    anon.send_frame(tim::protocol::kind::ISSUE_TOKEN, &tim::protocol::IssueToken { ttl_secs: 0 }).unwrap();
    match anon.recv().unwrap() {
        tim::client::Event::Error(e) => assert_eq!(e.code, ErrorCode::NotLoggedIn as u16),
        other => panic!("unexpected {other:?}"),
    }
    let mut c = s.client();
    let ok = c.login_token(&t.token, 4, "browser").unwrap();
    assert_eq!(ok.user_id, alice_id);
    let mut d = s.client();
    assert_eq!(d.login_token(&t.token, 4, "browser").unwrap_err().code(), Some(ErrorCode::InvalidToken));
    assert_eq!(d.login_token("garbage", 4, "").unwrap_err().code(), Some(ErrorCode::InvalidToken));
    let forged = format!("{alice_id:016x}{}", "0".repeat(32));
    assert_eq!(d.login_token(&forged, 4, "").unwrap_err().code(), Some(ErrorCode::InvalidToken));
}

/// Tokens expire, and an account holds a bounded number of live ones.
fn token_expiry_and_cap(driver: &str) {
    let s = TestServer::start(driver, "[limits]\ntokens_per_user_max = 2\n");
    let (alice, _) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    let short = a.issue_token(1).unwrap();
    let _second = a.issue_token(60).unwrap();
    assert_eq!(a.issue_token(60).unwrap_err().code(), Some(ErrorCode::TooManyTokens));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut c = s.client();
    assert_eq!(c.login_token(&short.token, 1, "").unwrap_err().code(), Some(ErrorCode::InvalidToken));
    // the expired one no longer counts against the cap
    assert!(a.issue_token(60).is_ok());
}

on_both_drivers!(register_and_login, login_refusals, one_shot_token, token_expiry_and_cap);
