//! JSON over WebSocket (docs/JSON.md) against real servers: a JSON client and a binary client
//! talk to each other, request ids come back on their answers, and bad JSON gets its documented
//! error without closing the connection or disturbing anyone else.

mod common;
use std::time::Duration;

use base64::Engine as _;
use common::{gateway::*, *};
use serde_json::{json, Value};
use tim::{client::Event, protocol::ErrorCode};
use tungstenite::{protocol::WebSocket, Message};

type Ws = WebSocket<Box<dyn tim::client::Transport>>;

fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string())).unwrap();
}

/// The next server message, parsed.
fn next(ws: &mut Ws) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Binary(b) => panic!("a binary message on a JSON connection: {b:?}"),
            _ => {}
        }
    }
}

/// The next server message of `ty`, skipping others (which are returned too).
fn next_of(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = next(ws);
        if v["type"] == ty {
            return v;
        }
    }
}

/// Register and log in over JSON; returns the user id.
fn json_login(ws: &mut Ws, name: &str) -> u64 {
    send(ws, json!({"op": "register", "id": "r", "name": name, "password": PASSWORD}));
    let ok = next(ws);
    assert_eq!((ok["type"].as_str(), ok["id"].as_str()), (Some("register_ok"), Some("r")), "{ok}");
    send(
        ws,
        json!({"op": "login", "id": 2, "name": name, "password": PASSWORD, "device_type": 4, "device_id": "b"}),
    );
    let ok = next(ws);
    assert_eq!((ok["type"].as_str(), &ok["id"]), (Some("login_ok"), &json!(2)), "{ok}");
    ok["user_id"].as_str().unwrap().parse().unwrap()
}

/// A JSON client and a binary TCP client exchange messages both ways; answers carry their
/// request ids; history, pings and groups work over JSON.
fn json_talks_with_binary(driver: &str) {
    let s = TestServer::start(driver, "");
    let mut j = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let jid = json_login(&mut j, "jay");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    for i in 1..=20u64 {
        send(
            &mut j,
            json!({"op": "send", "id": format!("m{i}"), "conv": 1, "to": bob_id.to_string(), "client_msg_id": i, "body": format!("héllo {i} \"quoted\"")}),
        );
    }
    for i in 1..=20u64 {
        let ack = next_of(&mut j, "send_ack");
        assert_eq!(ack["id"], json!(format!("m{i}")), "{ack}");
        assert_eq!(ack["seq"], json!(i.to_string()));
        let d = b.next_delivery().unwrap();
        assert_eq!((d.stamp.from, d.body), (jid, format!("héllo {i} \"quoted\"").into_bytes()));
    }
    // Binary bytes to the JSON client come as body_b64; text as body.
    b.send_wait(jid, 1, &[0xff, 0x00, 0x01]).unwrap();
    b.send_wait(jid, 2, "text back".as_bytes()).unwrap();
    let d1 = next_of(&mut j, "deliver");
    assert_eq!(
        (d1["body_b64"].as_str(), d1["from"].as_str()),
        (Some("/wAB"), Some(bob_id.to_string().as_str())),
        "{d1}"
    );
    let d2 = next_of(&mut j, "deliver");
    assert_eq!(d2["body"], json!("text back"));
    send(&mut j, json!({"op": "delivery_ack", "conv": 1, "peer": bob_id, "seq": d2["seq"]}));
    send(&mut j, json!({"op": "ping", "id": "p", "nonce": "12345678901234567890"}));
    let pong = next_of(&mut j, "pong");
    assert_eq!((pong["id"].as_str(), pong["nonce"].as_str()), (Some("p"), Some("12345678901234567890")));
    // A group over JSON, with bob in it; bob's message reaches the JSON client.
    send(&mut j, json!({"op": "group_create", "id": "g", "profile": {"name": "team"}}));
    let ok = next_of(&mut j, "group_ok");
    assert_eq!(ok["id"], json!("g"));
    let group: u64 = ok["group_id"].as_str().unwrap().parse().unwrap();
    assert!(group >= 1 << 62, "group ids are strings, precise above 2^53");
    send(
        &mut j,
        json!({"op": "group_add_members", "id": "add", "group_id": group.to_string(), "user_ids": [bob_id]}),
    );
    assert_eq!(next_of(&mut j, "group_ok")["id"], json!("add"));
    b.group_send_wait(group, 9, b"to the team").unwrap();
    loop {
        let d = next_of(&mut j, "deliver");
        if d["body"] == json!("to the team") {
            assert_eq!((d["conv"].as_u64(), d["to"].as_str()), (Some(2), Some(group.to_string().as_str())));
            break;
        }
        assert!(d.get("notice").is_some(), "only group notices before it: {d}");
    }
    // The account's sessions: a second one (binary) logged out from the JSON one.
    let mut desk = s.client();
    let jay_tcp = desk.login("jay", PASSWORD, 3, "jay's desk").unwrap().session_id;
    send(&mut j, json!({"op": "my_sessions", "id": "s"}));
    let list = next_of(&mut j, "session_list");
    assert_eq!(list["id"], json!("s"));
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{list}");
    assert_eq!((&sessions[0]["device_id"], &sessions[0]["current"]), (&json!("b"), &json!(true)));
    assert_eq!(sessions[1]["session_id"], json!(jay_tcp.to_string()));
    send(&mut j, json!({"op": "session_logout", "id": "out", "session_id": jay_tcp.to_string()}));
    let left = next_of(&mut j, "session_list");
    assert_eq!((left["id"].clone(), left["sessions"].as_array().unwrap().len()), (json!("out"), 1), "{left}");
    send(&mut j, json!({"op": "session_logout", "id": "again", "session_id": jay_tcp.to_string()}));
    let e = next_of(&mut j, "error");
    assert_eq!((e["id"].clone(), e["code"].clone()), (json!("again"), json!(21)), "{e}");
    assert!(matches!(desk.recv(), Ok(Event::Kick(k)) if k.reason == ErrorCode::LoggedOutElsewhere.code()));
    // Typing over JSON: bob's binary session gets the notice; a bad one is refused (no id).
    send(&mut j, json!({"op": "typing", "id": "t", "conv": 1, "to": bob_id.to_string(), "state": 1}));
    loop {
        match b.recv().unwrap() {
            Event::TypingNotice(t) => {
                assert_eq!((t.from, t.to, t.state), (jid, bob_id, 1));
                break;
            }
            _ => continue,
        }
    }
    send(&mut j, json!({"op": "typing", "id": "t2", "conv": 1, "to": jid.to_string()}));
    let e = next_of(&mut j, "error");
    assert_eq!(
        (e["code"].clone(), e["request_kind"].clone(), e.get("id")),
        (json!(31), json!(13), None),
        "{e}"
    );
    // Read receipts over JSON: bob's message read by jay reaches bob; bob's read reaches jay;
    // read_get answers with the request's id; a bad read is refused without one.
    let m = b.send_wait(jid, 31, b"read me").unwrap();
    loop {
        if next_of(&mut j, "deliver")["body"] == json!("read me") {
            break;
        }
    }
    send(
        &mut j,
        json!({"op": "read", "id": "r", "conv": 1, "peer": bob_id.to_string(), "seq": m.seq.to_string()}),
    );
    loop {
        if let Event::ReadNotice(r) = b.recv().unwrap() {
            assert_eq!((r.from, r.to, r.seq), (jid, bob_id, m.seq));
            break;
        }
    }
    b.read(1, jid, m.seq).unwrap();
    let n = next_of(&mut j, "read_notice");
    assert_eq!(
        (n["from"].clone(), n["seq"].clone(), n.get("id")),
        (json!(bob_id.to_string()), json!(m.seq.to_string()), None)
    );
    let mut st = json!(null);
    for _ in 0..50 {
        send(
            &mut j,
            json!({"op": "read_get", "id": "rg", "conv": 1, "peer": bob_id.to_string(), "seq": m.seq}),
        );
        st = next_of(&mut j, "read_state");
        if st["read_count"] == json!(1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        (st["id"].clone(), st["read_count"].clone(), st["member_count"].clone()),
        (json!("rg"), json!(1), json!(1)),
        "{st}"
    );
    assert_eq!(st["reads"].as_array().unwrap().len(), 2, "{st}");
    send(&mut j, json!({"op": "read", "id": "r2", "conv": 1, "peer": bob_id.to_string(), "seq": 0}));
    let e = next_of(&mut j, "error");
    assert_eq!(
        (e["code"].clone(), e["request_kind"].clone(), e.get("id")),
        (json!(1), json!(16), None),
        "{e}"
    );
    // Profiles over JSON; a group's field in a user's profile is refused.
    send(
        &mut j,
        json!({"op": "profile_update", "id": "pu", "profile": {"nickname": "Jay", "gender": 3, "birthday": 20000229, "extra_b64": "AP8="}}),
    );
    let saved = next_of(&mut j, "profile_list");
    assert_eq!(saved["id"], json!("pu"));
    assert_eq!(saved["profiles"][0]["profile"]["nickname"], json!("Jay"));
    send(&mut j, json!({"op": "profile_get", "id": "pg", "user_ids": [bob_id.to_string(), jid]}));
    let got = next_of(&mut j, "profile_list");
    let ps = got["profiles"].as_array().unwrap();
    assert_eq!(
        (ps.len(), &ps[0]["updated_ms"], &ps[1]["profile"]["birthday"]),
        (2, &json!("0"), &json!(20000229))
    );
    assert_eq!(ps[1]["profile"]["extra_b64"], json!("AP8="), "{got}");
    send(&mut j, json!({"op": "profile_update", "id": "bad", "profile": {"nickname": "x", "topic": "t"}}));
    let e = next_of(&mut j, "error");
    assert_eq!((e["id"].clone(), e["code"].clone()), (json!("bad"), json!(1)), "{e}");
    send(&mut j, json!({"op": "logout", "id": "bye"}));
    assert_eq!(next_of(&mut j, "bye")["id"], json!("bye"));
}

/// Bad JSON is answered with an error carrying the request's id (when it has one) and the
/// connection goes on; an oversized message closes it with 1009; others are not disturbed.
fn json_bad_input(driver: &str) {
    let s = TestServer::start(driver, "[limits]\nframe_bytes_max = 65536\nbody_bytes_max = 32768\n");
    let mut j = ws_connect(s.ws_addr.unwrap(), None);
    let jid = json_login(&mut j, "jay");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    send_text(&mut j, "{not json");
    let e = next(&mut j);
    assert_eq!((e["type"].as_str(), e["code"].as_u64()), (Some("error"), Some(1)), "{e}");
    send(&mut j, json!({"op": "fly", "id": 7}));
    let e = next(&mut j);
    assert_eq!((e["code"].as_u64(), &e["id"]), (Some(2), &json!(7)), "{e}");
    send(&mut j, json!({"op": "send", "id": "x", "conv": 1, "to": "bob", "client_msg_id": 1, "body": "hi"}));
    let e = next(&mut j);
    assert_eq!(
        (e["code"].as_u64(), e["request_kind"].as_u64(), &e["id"]),
        (Some(1), Some(6), &json!("x")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("`to`"), "{e}");
    send(
        &mut j,
        json!({"op": "send", "id": "big", "conv": 1, "to": bob_id, "client_msg_id": 2, "body": "a".repeat(40_000)}),
    );
    let e = next(&mut j);
    assert_eq!((e["code"].as_u64(), &e["id"]), (Some(34), &json!("big")), "BodyTooLarge: {e}");
    // The connection still works.
    send(
        &mut j,
        json!({"op": "send", "id": "ok", "conv": 1, "to": bob_id, "client_msg_id": 3, "body": "still fine"}),
    );
    assert_eq!(next_of(&mut j, "send_ack")["id"], json!("ok"));
    assert_eq!(b.next_delivery().unwrap().body, b"still fine");
    // A message over the WebSocket cap: close 1009.
    let huge =
        json!({"op": "send", "conv": 1, "to": bob_id, "client_msg_id": 4, "body": "a".repeat(200_000)});
    send(&mut j, huge);
    j.get_ref().tcp().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let code = loop {
        match j.read() {
            Ok(Message::Close(c)) => break c.map(|c| u16::from(c.code)),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, Some(1009));
    b.send_wait(jid, 1, b"others unaffected").unwrap();
    let (_, _) = s.register("carol");
}

/// Recall over JSON (embedded store): a `recall` is acked like a send and carries its id; the
/// peer (over JSON) gets the recall push with `recall_seq`, the sender's binary session the
/// RECALL flag; history shows the tombstone (`state` 1, empty body) and the notice; a `send`
/// with `flags` 2 is a recall too; refusals (NotRecallable, RecallExpired, Malformed) carry the
/// request's id and client_msg_id.
fn json_recall(driver: &str) {
    let s = TestServer::start_with_store(
        driver,
        "backend = \"embedded\"\nsynchronous = \"normal\"",
        "[messages]\nrecall_window_secs = 2\n",
    );
    let mut j = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let jid = json_login(&mut j, "jay");
    let mut k = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let kid = json_login(&mut k, "kay");
    next_of(&mut j, "catch_up_end");
    next_of(&mut k, "catch_up_end");
    let mut jay_desk = s.client();
    jay_desk.login("jay", PASSWORD, 3, "desk").unwrap();
    // Its catch-up done first: a message stamped in the millisecond of the login could come
    // both live and at catch-up (clients drop the repeat by seq, PROTOCOL 8.3).
    jay_desk.catch_up().unwrap();
    let (jay, kay) = (jid.to_string(), kid.to_string());

    send(
        &mut j,
        json!({"op": "send", "id": "m", "conv": 1, "to": kay, "client_msg_id": "1", "body": "oops"}),
    );
    let sent = next_of(&mut j, "send_ack");
    assert_eq!(sent["id"], json!("m"), "{sent}");
    let seq = sent["seq"].as_str().unwrap().to_string();
    let d = next_of(&mut k, "deliver");
    assert_eq!(
        (&d["body"], &d["seq"], d.get("flags"), d.get("state")),
        (&json!("oops"), &json!(seq), None, None)
    );
    assert_eq!(jay_desk.next_delivery().unwrap().body, b"oops");

    // The recall: acked with a seq of its own, and its id.
    send(&mut j, json!({"op": "recall", "id": "r", "conv": 1, "to": kay, "client_msg_id": "2", "seq": seq}));
    let ack = next_of(&mut j, "send_ack");
    assert_eq!(
        (&ack["id"], &ack["client_msg_id"], &ack["duplicate"]),
        (&json!("r"), &json!("2"), &json!(false))
    );
    let recall_seq: u64 = ack["seq"].as_str().unwrap().parse().unwrap();
    assert_eq!(recall_seq, seq.parse::<u64>().unwrap() + 1);
    // Kay (JSON) gets the notice: flags 2 and recall_seq, no body.
    let n = next_of(&mut k, "deliver");
    assert_eq!(
        (&n["from"], &n["seq"], &n["flags"], &n["recall_seq"], &n["client_msg_id"]),
        (&json!(jay), &json!(recall_seq.to_string()), &json!(2), &json!(seq), &json!("2")),
        "{n}"
    );
    assert!(n.get("body").is_none() && n.get("body_b64").is_none(), "{n}");
    // Jay's other (binary) session gets the real thing: a Send with the RECALL flag.
    let b = jay_desk.next_delivery().unwrap();
    assert_eq!((b.flags, b.recalled_seq()), (tim::protocol::send_flags::RECALL, Some(seq.parse().unwrap())));

    // Refusals carry the request id and the recall's client_msg_id: recalled already, another
    // user's message, seq 0 (refused by the session as Malformed).
    send(
        &mut j,
        json!({"op": "recall", "id": "again", "conv": 1, "to": kay, "client_msg_id": "3", "seq": seq}),
    );
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["code_name"], &e["request_kind"], &e["client_msg_id"]),
        (&json!("again"), &json!(35), &json!("NotRecallable"), &json!(6), &json!("3")),
        "{e}"
    );
    send(&mut k, json!({"op": "recall", "id": 40, "conv": 1, "to": jay, "client_msg_id": "4", "seq": seq}));
    let e = next_of(&mut k, "error");
    assert_eq!((&e["id"], &e["code_name"]), (&json!(40), &json!("NotRecallable")), "{e}");
    send(&mut j, json!({"op": "recall", "id": "zero", "conv": 1, "to": kay, "client_msg_id": "5", "seq": 0}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"], &e["client_msg_id"]), (&json!("zero"), &json!(1), &json!("5")), "{e}");

    // `send` with flags 2 and the seq as body is a recall as well: kay takes back her own.
    send(
        &mut k,
        json!({"op": "send", "id": "k1", "conv": 1, "to": jay, "client_msg_id": "6", "body": "mine"}),
    );
    let mine = next_of(&mut k, "send_ack")["seq"].as_str().unwrap().parse::<u64>().unwrap();
    let body_b64 = base64::engine::general_purpose::STANDARD.encode(mine.to_le_bytes());
    send(
        &mut k,
        json!({"op": "send", "id": "k2", "conv": 1, "to": jay, "client_msg_id": "7", "flags": 2, "body_b64": body_b64}),
    );
    assert_eq!(next_of(&mut k, "send_ack")["id"], json!("k2"));
    loop {
        let d = next_of(&mut j, "deliver");
        if d["flags"] == json!(2) {
            assert_eq!((&d["from"], &d["recall_seq"]), (&json!(kay), &json!(mine.to_string())), "{d}");
            break;
        }
    }

    // History (kay's): both tombstones, with state 1 and an empty body, and both notices.
    send(&mut k, json!({"op": "history", "id": "h", "conv": 1, "peer": jay, "limit": 10}));
    let mut page = Vec::new();
    loop {
        let v = next(&mut k);
        match v["type"].as_str() {
            Some("history_msg") => page.push(v),
            Some("history_end") => break,
            _ => {}
        }
    }
    assert!(page.iter().all(|m| m["id"] == json!("h")));
    let at =
        |s: u64| page.iter().find(|m| m["seq"] == json!(s.to_string())).unwrap_or_else(|| panic!("seq {s}"));
    let first = at(seq.parse().unwrap());
    assert_eq!(
        (&first["state"], &first["body"], &first["client_msg_id"]),
        (&json!(1), &json!(""), &json!("1")),
        "{first}"
    );
    assert_eq!(at(recall_seq)["recall_seq"], json!(seq));
    assert_eq!((&at(mine)["state"], &at(mine)["body"]), (&json!(1), &json!("")));
    assert_eq!(at(mine + 1)["recall_seq"], json!(mine.to_string()));

    // Past the window: RecallExpired.
    send(
        &mut j,
        json!({"op": "send", "id": "late", "conv": 1, "to": kay, "client_msg_id": "8", "body": "too late"}),
    );
    let late = next_of(&mut j, "send_ack")["seq"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(3_000));
    send(
        &mut j,
        json!({"op": "recall", "id": "exp", "conv": 1, "to": kay, "client_msg_id": "9", "seq": late}),
    );
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["code_name"], &e["client_msg_id"]),
        (&json!("exp"), &json!(36), &json!("RecallExpired"), &json!("9")),
        "{e}"
    );
}

/// Friends over JSON: a request (with its id, and the note in the other side's push), its
/// listing, an accept (pushed back to the requester), both friend lists; refusals carry their
/// ids; a block ends the friendship (the blocked side learns only of the removal) and refuses
/// the blocked user's messages. A binary session of the requester's gets the notice of its
/// own account's request.
fn json_roster(driver: &str) {
    let s = TestServer::start(driver, "");
    let mut j = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let jid = json_login(&mut j, "jay");
    let mut k = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let kid = json_login(&mut k, "kay");
    let mut jay_desk = s.client();
    jay_desk.login("jay", PASSWORD, 3, "desk").unwrap();
    let (jay, kay) = (jid.to_string(), kid.to_string());

    send(
        &mut j,
        json!({"op": "roster_action", "id": "f1", "action": 1, "user": kay, "note": "hi, it's \"jay\""}),
    );
    let ok = next_of(&mut j, "roster_ok");
    assert_eq!(
        (&ok["id"], &ok["action"], &ok["user"], &ok["friends"]),
        (&json!("f1"), &json!(1), &json!(kay), &json!(false)),
        "{ok}"
    );
    let n = next_of(&mut k, "roster_notice");
    assert_eq!(
        (&n["event"], &n["from"], &n["to"], &n["note"], n.get("id")),
        (&json!(1), &json!(jay), &json!(kay), &json!("hi, it's \"jay\""), None),
        "{n}"
    );
    loop {
        if let Event::RosterNotice(r) = jay_desk.recv().unwrap() {
            assert_eq!((r.event, r.from, r.to), (1, jid, kid));
            break;
        }
    }
    // Kay's incoming requests, jay's outgoing ones.
    send(&mut k, json!({"op": "roster_get", "id": "in", "list": 1}));
    let l = next_of(&mut k, "roster_list");
    assert_eq!((&l["id"], &l["list"], &l["more"]), (&json!("in"), &json!(1), &json!(false)), "{l}");
    let e = &l["entries"][0];
    assert_eq!((&e["user"], &e["note"]), (&json!(jay), &json!("hi, it's \"jay\"")), "{l}");
    assert!(e["since_ms"].as_str().unwrap().parse::<u64>().unwrap() > 1_700_000_000_000, "{l}");
    send(&mut j, json!({"op": "roster_get", "id": "out", "list": 2, "after": 0, "limit": 10}));
    let l = next_of(&mut j, "roster_list");
    assert_eq!((&l["id"], &l["entries"][0]["user"]), (&json!("out"), &json!(kay)), "{l}");

    // Kay accepts; jay's sessions hear of it.
    send(&mut k, json!({"op": "roster_action", "id": 9, "action": 2, "user": jid}));
    let ok = next_of(&mut k, "roster_ok");
    assert_eq!((&ok["id"], &ok["action"], &ok["friends"]), (&json!(9), &json!(2), &json!(true)), "{ok}");
    let n = next_of(&mut j, "roster_notice");
    assert_eq!((&n["event"], &n["from"], &n["to"]), (&json!(2), &json!(kay), &json!(jay)), "{n}");
    for (ws, other) in [(&mut j, &kay), (&mut k, &jay)] {
        send(ws, json!({"op": "roster_get", "id": "friends", "list": 0}));
        let l = next_of(ws, "roster_list");
        let users: Vec<&Value> = l["entries"].as_array().unwrap().iter().map(|e| &e["user"]).collect();
        assert_eq!((&l["id"], users), (&json!("friends"), vec![&json!(other)]), "{l}");
    }
    send(&mut j, json!({"op": "roster_get", "id": "out2", "list": 2}));
    assert_eq!(next_of(&mut j, "roster_list")["entries"], json!([]), "the request is answered");

    // Presence between the friends: jay's status reaches kay; kay asks for it; a bad state is
    // refused with the request's id.
    send(&mut j, json!({"op": "presence_set", "id": "p", "state": 2, "text": "lunch", "extra_b64": "AP8="}));
    let l = next_of(&mut j, "presence_list");
    assert_eq!(
        (&l["id"], &l["entries"][0]["state"], &l["entries"][0]["text"]),
        (&json!("p"), &json!(2), &json!("lunch")),
        "{l}"
    );
    loop {
        let n = next_of(&mut k, "presence_notice");
        if n["user"] == json!(jay) && n["state"] == json!(2) {
            assert_eq!((n.get("id"), &n["extra_b64"]), (None, &json!("AP8=")), "{n}");
            break;
        }
    }
    send(&mut k, json!({"op": "presence_get", "id": "pg", "user_ids": [jay, "999999"]}));
    let l = next_of(&mut k, "presence_list");
    assert_eq!(
        (&l["id"], &l["entries"][0]["text"], &l["entries"][1]["state"]),
        (&json!("pg"), &json!("lunch"), &json!(0)),
        "{l}"
    );
    send(&mut j, json!({"op": "presence_set", "id": "p2", "state": 9}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"], &e["request_kind"]), (&json!("p2"), &json!(96), &json!(25)), "{e}");

    // Refusals, each with its id.
    send(&mut j, json!({"op": "roster_action", "id": "again", "action": 1, "user": kay}));
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["code_name"], &e["request_kind"]),
        (&json!("again"), &json!(92), &json!("AlreadyFriends"), &json!(18)),
        "{e}"
    );
    send(&mut j, json!({"op": "roster_action", "id": "self", "action": 1, "user": jay}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"]), (&json!("self"), &json!(95)), "{e}");
    send(&mut j, json!({"op": "roster_get", "id": "bad", "list": 9}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"], &e["request_kind"]), (&json!("bad"), &json!(95), &json!(19)), "{e}");
    send(&mut j, json!({"op": "roster_action", "id": "nobody", "action": 1, "user": "999999"}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code_name"]), (&json!("nobody"), &json!("UnknownUser")), "{e}");
    send(&mut j, json!({"op": "roster_get", "id": "nolist"}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"], &e["request_kind"]), (&json!("nolist"), &json!(1), &json!(19)), "{e}");

    // Kay blocks jay: jay learns only that the friendship ended; his messages and requests are
    // refused; kay's blocked list has him.
    send(&mut k, json!({"op": "roster_action", "id": "b", "action": 5, "user": jay}));
    let ok = next_of(&mut k, "roster_ok");
    assert_eq!((&ok["id"], &ok["friends"]), (&json!("b"), &json!(false)), "{ok}");
    let n = next_of(&mut j, "roster_notice");
    assert_eq!((&n["event"], &n["from"]), (&json!(4), &json!(kay)), "{n}");
    send(&mut j, json!({"op": "send", "id": "m", "conv": 1, "to": kay, "client_msg_id": 1, "body": "hey?"}));
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["code_name"], &e["request_kind"]),
        (&json!("m"), &json!(90), &json!("Blocked"), &json!(6)),
        "{e}"
    );
    send(&mut j, json!({"op": "roster_action", "id": "r", "action": 1, "user": kay}));
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"]), (&json!("r"), &json!(90)), "{e}");
    send(&mut k, json!({"op": "roster_get", "id": "bl", "list": 3}));
    let l = next_of(&mut k, "roster_list");
    assert_eq!(
        (&l["id"], &l["list"], &l["entries"][0]["user"]),
        (&json!("bl"), &json!(3), &json!(jay)),
        "{l}"
    );
    send(&mut k, json!({"op": "roster_action", "id": "ub", "action": 6, "user": jay}));
    assert_eq!(next_of(&mut k, "roster_ok")["id"], json!("ub"));
    send(&mut j, json!({"op": "send", "id": "m2", "conv": 1, "to": kay, "client_msg_id": 2, "body": "hey"}));
    assert_eq!(next_of(&mut j, "send_ack")["id"], json!("m2"));
    assert_eq!(next_of(&mut k, "deliver")["body"], json!("hey"));
}

/// Log in over JSON to an account that exists; returns the `login_ok`.
fn json_login_again(ws: &mut Ws, name: &str, device_id: &str) -> Value {
    send(
        ws,
        json!({"op": "login", "id": "again", "name": name, "password": PASSWORD, "device_type": 4, "device_id": device_id}),
    );
    let ok = next(ws);
    assert_eq!((ok["type"].as_str(), &ok["id"]), (Some("login_ok"), &json!("again")), "{ok}");
    ok
}

/// A body of `n` bytes that no shifted or truncated copy matches (and not UTF-8).
fn large_body(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed).collect()
}

/// A `send_part` of `chunk` (base64) at `offset` of a body of `body_bytes` bytes.
fn part_b64(cmid: u64, to: u64, body_bytes: usize, offset: usize, chunk: &[u8]) -> Value {
    json!({"op": "send_part", "conv": 1, "to": to.to_string(), "client_msg_id": cmid.to_string(),
           "body_bytes": body_bytes, "offset": offset,
           "body_b64": base64::engine::general_purpose::STANDARD.encode(chunk)})
}

/// Send `body` from byte `from` on in `send_part` chunks of at most `chunk` bytes (base64), the
/// last with `id`.
fn send_parts_b64(ws: &mut Ws, cmid: u64, to: u64, body: &[u8], from: usize, chunk: usize, id: &str) {
    let mut at = from;
    while at < body.len() {
        let end = (at + chunk).min(body.len());
        let mut v = part_b64(cmid, to, body.len(), at, &body[at..end]);
        if end == body.len() {
            v["id"] = json!(id);
        }
        send(ws, v);
        at = end;
    }
}

/// The next `deliver` with this `client_msg_id`, skipping others.
fn deliver_of(ws: &mut Ws, cmid: u64) -> Value {
    loop {
        let d = next_of(ws, "deliver");
        if d["client_msg_id"] == json!(cmid.to_string()) {
            return d;
        }
    }
}

fn b64_body(d: &Value) -> Vec<u8> {
    let b64 = d["body_b64"].as_str().unwrap_or_else(|| panic!("no body_b64: {}", d["type"]));
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// Large messages over JSON (docs/JSON.md 3.1 `send_part`, PROTOCOL 5.22): a JSON client sends
/// a 1 MiB message in chunks (base64), with a small message between them, and a long text in
/// text chunks; a binary client gets them intact (through PartOut frames), the sender's other
/// JSON session gets them whole; a binary client's large message reaches both JSON sessions
/// whole. Refusals of chunks come as errors 27 with their ids, the connection going on.
fn json_large(driver: &str) {
    let s = TestServer::start(driver, "");
    let mut j = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let jid = json_login(&mut j, "jay");
    let mut j2 = ws_connect(s.ws_addr.unwrap(), Some("tim.json"));
    let ok = json_login_again(&mut j2, "jay", "tab-2");
    assert_eq!(
        (&ok["frame_bytes_max"], &ok["large_body_bytes_max"]),
        (&json!(65536), &json!(8 << 20)),
        "{ok}"
    );
    let chunk = 65536 - 64;
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);

    // 1 MiB and a few bytes, not UTF-8, in base64 chunks; a small send between two chunks.
    let big = large_body((1 << 20) + 3, 7);
    send(&mut j, part_b64(1, bob_id, big.len(), 0, &big[..chunk]));
    send(
        &mut j,
        json!({"op": "send", "id": "small", "conv": 1, "to": bob_id.to_string(), "client_msg_id": 2, "body": "between"}),
    );
    send_parts_b64(&mut j, 1, bob_id, &big, chunk, chunk, "big");
    let mut acks = [next_of(&mut j, "send_ack"), next_of(&mut j, "send_ack")];
    acks.sort_by_key(|a| a["client_msg_id"].as_str().unwrap().to_string());
    assert_eq!((&acks[0]["id"], &acks[0]["client_msg_id"]), (&json!("big"), &json!("1")), "{}", acks[0]);
    assert_eq!((&acks[1]["id"], &acks[1]["client_msg_id"]), (&json!("small"), &json!("2")), "{}", acks[1]);
    let mut got = std::collections::HashMap::new();
    while got.len() < 2 {
        let d = b.next_delivery().unwrap();
        assert_eq!(d.stamp.from, jid);
        got.insert(d.client_msg_id, d.body);
    }
    assert!(got[&1] == big, "bob's large message is intact");
    assert_eq!(got[&2], b"between");
    // The small message may come first: the large one takes effect when it is whole.
    let mut got = std::collections::HashMap::new();
    while got.len() < 2 {
        let d = next_of(&mut j2, "deliver");
        got.insert(d["client_msg_id"].as_str().unwrap().to_string(), d);
    }
    let d = &got["1"];
    assert_eq!(
        (&d["from"], &d["to"], &d["conv"]),
        (&json!(jid.to_string()), &json!(bob_id.to_string()), &json!(1))
    );
    assert!(b64_body(d) == big, "jay's other session gets the large message whole");
    assert_eq!(got["2"]["body"], json!("between"));

    // A long text in text chunks, cut between characters (offsets in UTF-8 bytes).
    let text = "héllo \"wörld\" ✓\n".repeat(15_000);
    let mut at = 0;
    while at < text.len() {
        let mut end = (at + chunk).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut v = json!({"op": "send_part", "conv": 1, "to": bob_id.to_string(), "client_msg_id": 3,
                           "body_bytes": text.len(), "offset": at, "body": &text[at..end]});
        if end == text.len() {
            v["id"] = json!("text");
        }
        send(&mut j, v);
        at = end;
    }
    let ack = next_of(&mut j, "send_ack");
    assert_eq!((&ack["id"], &ack["client_msg_id"]), (&json!("text"), &json!("3")), "{ack}");
    let d = b.next_delivery().unwrap();
    assert!(d.client_msg_id == 3 && d.body == text.as_bytes(), "bob's text is intact");
    let d = deliver_of(&mut j2, 3);
    assert!(d["body"].as_str() == Some(text.as_str()), "jay's other session gets the text whole");

    // A binary client's large message reaches both JSON sessions whole.
    let back = large_body((1 << 20) + 5, 9);
    let ack = b.send_large_wait(tim::protocol::conv::DIRECT, jid, 1, &back).unwrap();
    for ws in [&mut j, &mut j2] {
        let d = deliver_of(ws, 1);
        assert_eq!((&d["from"], &d["seq"]), (&json!(bob_id.to_string()), &json!(ack.seq.to_string())));
        assert!(b64_body(&d) == back, "bob's large message reaches jay whole");
    }

    // Refusals, each with its chunk's id; the connection goes on.
    // A chunk out of order: Malformed, request_kind 27.
    let body = large_body(100_000, 3);
    let mut v = part_b64(10, bob_id, body.len(), 0, &body[..1000]);
    v["id"] = json!("o0");
    send(&mut j, v);
    let mut v = part_b64(10, bob_id, body.len(), 5000, &body[5000..6000]);
    v["id"] = json!("o1");
    send(&mut j, v);
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["request_kind"], &e["client_msg_id"]),
        (&json!("o1"), &json!(1), &json!(27), &json!("10")),
        "{e}"
    );
    // Over large_body_bytes_max: BodyTooLarge, request_kind 27.
    let mut v = part_b64(11, bob_id, 9_000_000, 0, &body[..1000]);
    v["id"] = json!("huge");
    send(&mut j, v);
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["code_name"], &e["request_kind"], &e["client_msg_id"]),
        (&json!("huge"), &json!(34), &json!("BodyTooLarge"), &json!(27), &json!("11")),
        "{e}"
    );
    // One upload at a time: a second one is refused (UploadInProgress), the first goes on.
    let mut v = part_b64(12, bob_id, body.len(), 0, &body[..1000]);
    v["id"] = json!("u0");
    send(&mut j, v);
    let mut v = part_b64(13, bob_id, body.len(), 0, &body[..1000]);
    v["id"] = json!("u1");
    send(&mut j, v);
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"], &e["request_kind"]), (&json!("u1"), &json!(38), &json!(27)), "{e}");
    // A chunk too large for a part frame (24 + 65513 bytes): refused by the gateway (code 3),
    // the upload untouched.
    let mut v = part_b64(12, bob_id, body.len(), 1000, &body[1000..1000 + 65536 - 24 + 1]);
    v["id"] = json!("fat");
    send(&mut j, v);
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["code_name"], &e["request_kind"]),
        (&json!("fat"), &json!(3), &json!("FrameTooLarge"), &json!(27)),
        "{e}"
    );
    send_parts_b64(&mut j, 12, bob_id, &body, 1000, chunk, "u-end");
    let ack = next_of(&mut j, "send_ack");
    assert_eq!((&ack["id"], &ack["client_msg_id"]), (&json!("u-end"), &json!("12")), "{ack}");
    let d = b.next_delivery().unwrap();
    assert!(d.client_msg_id == 12 && d.body == body, "the upload that went on is intact");
    // The whole Send refused (an unknown recipient): request_kind 6, to the last chunk's id.
    send_parts_b64(&mut j, 14, 999_999, &body, 0, chunk, "nobody");
    let e = next_of(&mut j, "error");
    assert_eq!(
        (&e["id"], &e["code"], &e["request_kind"], &e["client_msg_id"]),
        (&json!("nobody"), &json!(30), &json!(6), &json!("14")),
        "{e}"
    );
    // A send too long for a frame is refused (BodyTooLarge) instead of closing the connection.
    send(
        &mut j,
        json!({"op": "send", "id": "long", "conv": 1, "to": bob_id, "client_msg_id": 15, "body": "a".repeat(100_000)}),
    );
    let e = next_of(&mut j, "error");
    assert_eq!((&e["id"], &e["code"], &e["request_kind"]), (&json!("long"), &json!(34), &json!(6)), "{e}");
    send(&mut j, json!({"op": "ping", "id": "still", "nonce": 1}));
    assert_eq!(next_of(&mut j, "pong")["id"], json!("still"));
    b.send_wait(jid, 20, b"others unaffected").unwrap();
    assert_eq!(deliver_of(&mut j, 20)["body"], json!("others unaffected"));
}

on_both_drivers!(json_talks_with_binary, json_bad_input, json_recall, json_roster, json_large);
