//! The admin HTTP API over real sockets: the token, every operation, `/metrics`, the health
//! checks, and refused requests (each with its status and error code).

mod common;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use common::*;
use serde_json::{json, Value};
use tim::{
    client::Event,
    protocol::{presence_state, roster_action, ErrorCode},
};

const TOKEN: &str = "test-admin-token-0123456789";

/// One HTTP/1.1 request; returns the status and the body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

/// The status of a request announcing a 2 MiB body. Only 1 MiB + 1 byte of it is sent: the
/// server reads all of that before it answers 413 and closes, so no unread byte makes the close
/// a reset that could drop the answer (sending the whole body raced with that close).
fn oversized(addr: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /v1/broadcasts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        2 << 20
    )
    .unwrap();
    s.write_all(&vec![b'a'; (1 << 20) + 1]).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn call(s: &TestServer, method: &str, path: &str, body: Value) -> (u16, Value) {
    let text = body.to_string();
    let (status, out) =
        http(s.admin_addr.unwrap(), method, path, Some(TOKEN), (method != "GET").then_some(text.as_str()));
    (status, serde_json::from_str(&out).unwrap_or(Value::Null))
}

fn start(driver: &str) -> TestServer {
    TestServer::start(driver, &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"))
}

fn uid(v: &Value) -> u64 {
    v.as_str().expect("u64 ids are strings").parse().unwrap()
}

/// The health checks need no token; everything else does, and a wrong one is 401.
fn token_and_health(driver: &str) {
    let s = start(driver);
    let a = s.admin_addr.unwrap();
    assert_eq!(http(a, "GET", "/healthz", None, None).0, 200);
    let (status, body) = http(a, "GET", "/readyz", None, None);
    assert_eq!((status, body.contains("ready")), (200, true), "{body}");
    assert_eq!(http(a, "GET", "/metrics", None, None).0, 401);
    assert_eq!(http(a, "GET", "/v1/online", Some("wrong-token"), None).0, 401);
    assert_eq!(http(a, "GET", "/v1/online", Some(TOKEN), None).0, 200);
}

/// Accounts, tokens, messages as a user, broadcasts, kicks and the online views.
fn users_and_messages(driver: &str) {
    let s = start(driver);
    let (st, v) = call(&s, "POST", "/v1/accounts", json!({ "name": "ann", "password": PASSWORD }));
    assert_eq!(st, 201, "{v}");
    let ann = uid(&v["user_id"]);
    let (st, v) = call(&s, "POST", "/v1/accounts", json!({ "name": "ann", "password": PASSWORD }));
    assert_eq!((st, v["error"]["code"].as_u64()), (409, Some(ErrorCode::NameTaken.code() as u64)));
    let (bob, bob_id) = s.register("bob");
    let (mut b, bob_session) = s.login(&bob, 3);
    // A login token for ann, used by a client.
    let (st, v) = call(&s, "POST", "/v1/tokens", json!({ "user_id": ann, "ttl_secs": 60 }));
    assert_eq!(st, 201, "{v}");
    let mut a = s.client();
    a.login_token(v["token"].as_str().unwrap(), 4, "web").unwrap();
    // A message from ann to bob, sent by the operator.
    let (st, v) =
        call(&s, "POST", "/v1/messages", json!({ "from": ann, "to": bob_id, "body": "from the operator" }));
    assert_eq!(st, 201, "{v}");
    let d = b.next_delivery().unwrap();
    assert_eq!((d.stamp.from, d.body.as_slice()), (ann, &b"from the operator"[..]));
    assert_eq!(d.stamp.seq, uid(&v["seq"]));
    // ann's own session sees it too (the sender's other devices).
    assert_eq!(a.next_delivery().unwrap().body, b"from the operator");
    // Online views.
    let (st, v) = call(&s, "GET", "/v1/online", json!(null));
    assert_eq!((st, v["sessions"].as_u64(), v["users"].as_u64()), (200, Some(2), Some(2)), "{v}");
    let (_, v) = call(&s, "GET", "/v1/online/users?limit=1", json!(null));
    assert_eq!(v["users"].as_array().unwrap().len(), 1);
    assert_eq!(v["more"], json!(true));
    let first = uid(&v["users"][0]["user_id"]);
    let (_, v) = call(&s, "GET", &format!("/v1/online/users?after={first}&limit=10"), json!(null));
    assert_eq!((v["users"].as_array().unwrap().len(), &v["more"]), (1, &json!(false)));
    // A broadcast reaches every online session.
    let (st, v) = call(&s, "POST", "/v1/broadcasts", json!({ "body": "maintenance at noon" }));
    assert_eq!((st, v["sessions"].as_u64()), (200, Some(2)));
    for c in [&mut a, &mut b] {
        match c.recv().unwrap() {
            Event::Broadcast(m) => {
                assert_eq!((m.group_id, m.body.as_slice()), (0, &b"maintenance at noon"[..]))
            }
            other => panic!("expected a broadcast, got {other:?}"),
        }
    }
    // A kick of one session of bob.
    let (st, v) =
        call(&s, "POST", "/v1/kicks", json!({ "user_id": bob_id, "session_id": bob_session.to_string() }));
    assert_eq!((st, v["kicked"].as_u64()), (200, Some(1)));
    match b.recv().unwrap() {
        Event::Kick(k) => assert_eq!(k.reason, ErrorCode::KickedByOperator.code()),
        other => panic!("expected a kick, got {other:?}"),
    }
    // Metrics count what happened.
    let (st, text) = http(s.admin_addr.unwrap(), "GET", "/metrics", Some(TOKEN), None);
    assert_eq!(st, 200);
    let total = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert!(total("tim_messages_in_total{") >= 1, "{text}");
    assert!(total("tim_messages_acked_total{") >= 1);
    assert!(total("tim_logins_total{") >= 2);
    assert!(total("tim_ack_latency_seconds_count{") >= 1);
    assert!(text.contains("tim_kicks_total{") && text.contains("name=\"KickedByOperator\""), "{text}");
    assert!(text.contains("tim_errors_total{") && text.contains("name=\"NameTaken\""), "{text}");
    assert!(text.contains("transport=\"tcp\""));
    // An idle node: no backpressure, nothing held back or dropped.
    assert!(text.lines().any(|l| l == "tim_backpressure_sources 0"), "{text}");
    assert_eq!(total("tim_sends_held_back{"), 0, "{text}");
    assert_eq!(total("tim_dropped_envelopes_total"), 0, "{text}");
}

/// Group administration as the founder: create with members, add, remove, broadcast to the
/// group's online members, dissolve.
fn groups(driver: &str) {
    let s = start(driver);
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (_carol, carol_id) = s.register("carol");
    let (mut b, _) = s.login(&bob, 3);
    let (st, v) =
        call(&s, "POST", "/v1/groups", json!({ "founder": ann_id, "name": "ops", "members": [bob_id] }));
    assert_eq!(st, 201, "{v}");
    let group = uid(&v["group_id"]);
    let (st, v) = call(&s, "POST", &format!("/v1/groups/{group}/members"), json!({ "user_ids": [carol_id] }));
    assert_eq!(st, 200, "{v}");
    let (mut a, _) = s.login(&ann, 3);
    let info = a.group_get(group).unwrap();
    assert_eq!((info.members, info.founder), (3, ann_id));
    let (st, v) =
        call(&s, "POST", "/v1/broadcasts", json!({ "group_id": group.to_string(), "body": "hello group" }));
    assert_eq!((st, v["members"].as_u64()), (200, Some(3)), "{v}");
    let got = loop {
        match b.recv().unwrap() {
            Event::Broadcast(m) => break m,
            Event::Deliver(_) => {} // the group's notices
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((got.group_id, got.body.as_slice()), (group, &b"hello group"[..]));
    let (st, _) = call(&s, "DELETE", &format!("/v1/groups/{group}/members/{carol_id}"), json!(null));
    assert_eq!(st, 200);
    assert_eq!(a.group_get(group).unwrap().members, 2);
    let (st, v) = call(&s, "DELETE", &format!("/v1/groups/{group}/members/{ann_id}"), json!(null));
    assert_eq!((st, v["error"]["code"].as_u64()), (409, Some(ErrorCode::FounderMustTransfer.code() as u64)));
    let (st, _) = call(&s, "DELETE", &format!("/v1/groups/{group}"), json!(null));
    assert_eq!(st, 200);
    let (st, v) = call(&s, "DELETE", &format!("/v1/groups/{group}"), json!(null));
    assert_eq!((st, v["error"]["code"].as_u64()), (409, Some(ErrorCode::GroupDissolved.code() as u64)));
    let (st, v) = call(&s, "GET", "/v1/cluster", json!(null));
    assert_eq!((st, &v["clustered"]), (200, &json!(false)));
}

/// Refused requests: their status and error code; the server goes on serving.
fn refusals(driver: &str) {
    let s = start(driver);
    let a = s.admin_addr.unwrap();
    let (st, v) = call(&s, "POST", "/v1/accounts", json!("not an object"));
    assert_eq!((st, v["error"]["code"].as_u64()), (400, Some(1)));
    let (st, body) = http(a, "POST", "/v1/accounts", Some(TOKEN), Some("{broken"));
    assert_eq!(st, 400, "{body}");
    let (st, v) = call(&s, "POST", "/v1/messages", json!({ "from": 999999, "to": 1, "body": "x" }));
    assert_eq!((st, v["error"]["code"].as_u64()), (404, Some(ErrorCode::UnknownUser.code() as u64)));
    let (_, ann) = s.register("ann");
    let (st, v) = call(&s, "POST", "/v1/messages", json!({ "from": ann, "body": "x" }));
    assert_eq!(st, 400, "{v}");
    let (st, v) = call(&s, "POST", "/v1/messages", json!({ "from": ann, "to": 999999, "body": "x" }));
    assert_eq!((st, v["error"]["code"].as_u64()), (404, Some(ErrorCode::UnknownRecipient.code() as u64)));
    let (st, v) = call(&s, "POST", "/v1/accounts", json!({ "name": "", "password": PASSWORD }));
    assert_eq!((st, v["error"]["code"].as_u64()), (400, Some(ErrorCode::InvalidName.code() as u64)));
    assert_eq!(call(&s, "GET", "/v1/nothing", json!(null)).0, 404);
    assert_eq!(call(&s, "DELETE", "/v1/accounts", json!(null)).0, 405);
    let (st, v) = call(&s, "GET", "/v1/online/users?limit=x", json!(null));
    assert_eq!(st, 400, "{v}");
    assert_eq!(oversized(a), 413);
    assert_eq!(http(a, "GET", "/healthz", None, None).0, 200);
}

on_both_drivers!(
    token_and_health,
    users_and_messages,
    groups,
    refusals,
    bans,
    profiles_and_sessions,
    roster_and_presence
);

/// A non-loopback admin listener without a token is refused at start, with a clear error.
#[test]
fn non_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tim.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = \"127.0.0.1:0\"\n[gateway]\nws_listen = \"\"\n[store]\nbackend = \"memory\"\n\
         [admin]\nlisten = \"0.0.0.0:0\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tim"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("TIM_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token"), "{err}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A login's refusal code (the login must fail).
fn login_code(s: &TestServer, name: &str, password: &str) -> Option<ErrorCode> {
    match s.client().login(name, password, 3, "dev") {
        Ok(_) => panic!("{name} logged in"),
        Err(e) => e.code(),
    }
}

/// Bans on the embedded store: a ban kicks the account's sessions (`Banned`), refuses its
/// logins (by password, and by a token issued before) without telling anyone who lacks the
/// password, ends by itself at its `until_ms`, is lifted by DELETE, and survives a restart.
fn bans(driver: &str) {
    let extra = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n");
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir, driver, "backend = \"embedded\"", &extra);
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let token = a.issue_token(600).unwrap().token;
    let (st, v) = call(&s, "PUT", &format!("/v1/bans/{ann_id}"), json!({}));
    assert_eq!((st, v["banned"].as_bool()), (200, Some(true)), "{v}");
    loop {
        match a.recv().expect("a kick") {
            Event::Kick(k) => {
                assert_eq!(k.reason, ErrorCode::Banned.code());
                break;
            }
            Event::CatchUpEnd(_) => {}
            other => panic!("expected a kick, got {other:?}"),
        }
    }
    assert_eq!(login_code(&s, &ann, PASSWORD), Some(ErrorCode::Banned));
    assert_eq!(login_code(&s, &ann, "not the password"), Some(ErrorCode::WrongPassword));
    let by_token = s.client().login_token(&token, 3, "dev").expect_err("a banned token login");
    assert_eq!(by_token.code(), Some(ErrorCode::Banned));
    let (st, v) = call(&s, "GET", &format!("/v1/bans/{ann_id}"), json!(null));
    assert_eq!((st, v["banned"].as_bool()), (200, Some(true)), "{v}");
    // Refusals.
    let (st, v) = call(&s, "PUT", &format!("/v1/bans/{bob_id}"), json!({ "until_ms": now_ms() - 1 }));
    assert_eq!((st, v["error"]["code"].as_u64()), (400, Some(ErrorCode::Malformed.code() as u64)), "{v}");
    let (st, v) = call(&s, "PUT", "/v1/bans/999999999", json!({}));
    assert_eq!((st, v["error"]["code"].as_u64()), (404, Some(ErrorCode::UnknownUser.code() as u64)), "{v}");
    assert_eq!(call(&s, "PUT", "/v1/bans/nobody", json!({})).0, 400);
    assert_eq!(call(&s, "POST", &format!("/v1/bans/{bob_id}"), json!({})).0, 405);
    // A ban that ends by itself.
    let until = now_ms() + 1500;
    let (st, v) = call(&s, "PUT", &format!("/v1/bans/{bob_id}"), json!({ "until_ms": until.to_string() }));
    assert_eq!((st, v["banned_until_ms"].as_str()), (200, Some(until.to_string().as_str())), "{v}");
    assert_eq!(login_code(&s, &bob, PASSWORD), Some(ErrorCode::Banned));
    std::thread::sleep(Duration::from_millis(until.saturating_sub(now_ms()) + 100));
    s.login(&bob, 3);
    let (st, v) = call(&s, "GET", &format!("/v1/bans/{bob_id}"), json!(null));
    assert_eq!((st, v["banned"].as_bool(), v["banned_until_ms"].is_null()), (200, Some(false), true), "{v}");
    // Kept across a restart; lifted by DELETE.
    let dir = s.stop_keep();
    let s = TestServer::start_in(dir, driver, "backend = \"embedded\"", &extra);
    assert_eq!(login_code(&s, &ann, PASSWORD), Some(ErrorCode::Banned));
    let (st, v) = call(&s, "DELETE", &format!("/v1/bans/{ann_id}"), json!(null));
    assert_eq!((st, v["banned"].as_bool()), (200, Some(false)), "{v}");
    let (mut a, _) = s.login(&ann, 3);
    a.send_wait(bob_id, 1, b"back").unwrap();
}

/// A user's profile read and replaced by the operator (checked as the user's own update is),
/// and the account's sessions listed.
fn profiles_and_sessions(driver: &str) {
    let s = start(driver);
    let (ann, ann_id) = s.register("ann");
    let (st, v) = call(&s, "GET", &format!("/v1/users/{ann_id}/profile"), json!(null));
    assert_eq!((st, v["updated_ms"].as_str()), (200, Some("0")), "{v}");
    let body = json!({ "nickname": "Ann", "gender": 1, "birthday": 19900131, "extra_b64": "AP8=" });
    let (st, v) = call(&s, "PUT", &format!("/v1/users/{ann_id}/profile"), body);
    assert_eq!((st, v["profile"]["nickname"].as_str()), (200, Some("Ann")), "{v}");
    let (mut a, session) = s.login(&ann, 1);
    let got = a.profile_get(&[ann_id]).unwrap();
    assert_eq!((got[0].profile.gender, &got[0].profile.extra[..]), (1, &[0u8, 0xff][..]));
    let (st, v) = call(&s, "GET", &format!("/v1/users/{ann_id}/profile"), json!(null));
    assert_eq!((st, v["profile"]["extra_b64"].as_str()), (200, Some("AP8=")), "{v}");
    let (st, v) = call(&s, "GET", &format!("/v1/users/{ann_id}/sessions"), json!(null));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sessions"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        (v["sessions"][0]["session_id"].as_str(), v["sessions"][0]["device_type"].as_u64()),
        (Some(&*session.to_string()), Some(1))
    );
    // Refusals: a profile over the limits (the user's own rules), unknown users, a bad id.
    let (st, v) = call(&s, "PUT", &format!("/v1/users/{ann_id}/profile"), json!({ "gender": 9 }));
    assert_eq!(
        (st, v["error"]["code"].as_u64()),
        (422, Some(ErrorCode::InvalidProfile.code() as u64)),
        "{v}"
    );
    let (st, v) =
        call(&s, "PUT", &format!("/v1/users/{ann_id}/profile"), json!({ "extra": "x", "extra_b64": "eA==" }));
    assert_eq!(st, 400, "{v}");
    for (method, path) in [
        ("GET", "/v1/users/999999999/profile"),
        ("PUT", "/v1/users/999999999/profile"),
        ("GET", "/v1/users/999999999/sessions"),
    ] {
        let (st, v) = call(&s, method, path, json!({}));
        assert_eq!(
            (st, v["error"]["code"].as_u64()),
            (404, Some(ErrorCode::UnknownUser.code() as u64)),
            "{method} {path}: {v}"
        );
    }
    assert_eq!(call(&s, "GET", "/v1/users/ann/profile", json!(null)).0, 400);
    assert_eq!(call(&s, "POST", &format!("/v1/users/{ann_id}/sessions"), json!({})).0, 405);
}

/// A user's roster lists and presence read by the operator: what the user itself would read
/// (an invisible user is `invisible`), paged; bad lists and parameters refused; no session is
/// made (the user does not come online by it).
fn roster_and_presence(driver: &str) {
    let s = start(driver);
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (_, carol_id) = s.register("carol");
    let roster =
        |user: u64, query: &str| call(&s, "GET", &format!("/v1/users/{user}/roster?{query}"), json!(null));
    let users =
        |v: &Value| v["entries"].as_array().unwrap().iter().map(|e| uid(&e["user_id"])).collect::<Vec<_>>();
    let (st, v) = call(&s, "GET", &format!("/v1/users/{ann_id}/presence"), json!(null));
    assert_eq!((st, v["state"].as_str(), v["since_ms"].as_str()), (200, Some("offline"), Some("0")), "{v}");
    let (mut a, _) = s.login(&ann, 3);
    let (mut b, _) = s.login(&bob, 3);
    a.roster_action(roster_action::REQUEST, bob_id, "hi bob").unwrap();
    a.roster_action(roster_action::REQUEST, carol_id, "hi carol").unwrap();
    b.roster_action(roster_action::ACCEPT, ann_id, "").unwrap();
    a.roster_action(roster_action::WATCH, bob_id, "").unwrap();
    b.roster_action(roster_action::ALLOW, ann_id, "").unwrap();
    let (st, v) = roster(ann_id, "");
    assert_eq!((st, v["list"].as_str(), users(&v)), (200, Some("friends"), vec![bob_id]), "{v}");
    let (st, v) = roster(ann_id, "list=outgoing");
    assert_eq!((st, users(&v)), (200, vec![carol_id]), "{v}");
    assert_eq!(v["entries"][0]["note"].as_str(), Some("hi carol"), "{v}");
    assert_eq!(users(&roster(ann_id, "list=watching").1), [bob_id]);
    assert_eq!(users(&roster(bob_id, "list=watchers").1), [ann_id]);
    let (_, v) = roster(bob_id, &format!("list=friends&after={ann_id}&limit=5"));
    assert_eq!((users(&v), v["more"].as_bool()), (vec![], Some(false)), "{v}");
    a.presence_set(presence_state::INVISIBLE, "hiding", b"\xff").unwrap();
    let (st, v) = call(&s, "GET", &format!("/v1/users/{ann_id}/presence"), json!(null));
    assert_eq!(
        (st, v["state"].as_str(), v["text"].as_str()),
        (200, Some("invisible"), Some("hiding")),
        "{v}"
    );
    assert_eq!(v["extra_b64"].as_str(), Some("/w=="), "{v}");
    // Carol has no session: reading her roster and presence does not bring her online.
    let (st, v) = roster(carol_id, "list=incoming");
    assert_eq!((st, users(&v)), (200, vec![ann_id]), "{v}");
    assert_eq!(a.presence_get(&[carol_id]).unwrap()[0].state, presence_state::OFFLINE);
    // Refusals.
    for (query, want) in [("list=pals", 400), ("list=friends&after=x", 400), ("colour=red", 400)] {
        assert_eq!(roster(ann_id, query).0, want, "{query}");
    }
    for path in ["/v1/users/999999999/roster", "/v1/users/999999999/presence"] {
        let (st, v) = call(&s, "GET", path, json!(null));
        assert_eq!(
            (st, v["error"]["code"].as_u64()),
            (404, Some(ErrorCode::UnknownUser.code() as u64)),
            "{v}"
        );
    }
    assert_eq!(call(&s, "PUT", &format!("/v1/users/{ann_id}/roster"), json!({})).0, 405);
}
