//! Tenants over real sockets (PROTOCOL 8.17): accounts named NAME@DOMAIN of a configured domain
//! live in that domain, names are unique per domain, and no message, friend request, group,
//! room, presence or profile crosses domains; on all three stores.

mod common;
use common::{wait::*, *};
use tim::{
    client::{Client, Event},
    protocol::{
        self, domain_of, group_action, invite_policy, join_policy, kind, roster_action, ErrorCode,
        GroupProfile,
    },
};

const DOMAINS: &str = "[[domains]]\nname = \"acme.example\"\nid = 1\n\n\
                       [[domains]]\nname = \"globex.example\"\nid = 2\n";

/// The next error's code (other frames skipped).
fn next_error(c: &mut Client) -> (ErrorCode, u16) {
    loop {
        if let Event::Error(e) = c.recv().unwrap() {
            return (ErrorCode::from_u16(e.code).expect("known"), e.request_kind);
        }
    }
}

fn register(s: &TestServer, name: &str) -> u64 {
    s.client().register(name, PASSWORD).unwrap()
}

fn login(s: &TestServer, name: &str, durable: bool) -> Client {
    let (mut c, _) = s.login(name, 3);
    if durable {
        c.catch_up().unwrap();
    }
    c
}

fn tenants(store: &str) {
    let durable = store != "memory";
    let s = TestServer::start_with_store("io_uring", &pg::store_body(store), DOMAINS);
    // One name, three accounts: one per domain. The id carries the domain.
    let plain = register(&s, "alice");
    let acme = register(&s, "alice@acme.example");
    let globex = register(&s, "alice@globex.example");
    assert_eq!([domain_of(plain), domain_of(acme), domain_of(globex)], [0, 1, 2]);
    assert!(plain != acme && acme != globex);
    assert_eq!(code(s.client().register("alice@acme.example", PASSWORD)), ErrorCode::NameTaken);
    assert_eq!(code(s.client().register("ALICE@Acme.Example", PASSWORD)), ErrorCode::NameTaken);
    assert_eq!(domain_of(register(&s, "dave@ACME.example")), 1);
    assert_eq!(code(s.client().register("@acme.example", PASSWORD)), ErrorCode::InvalidName);
    assert_eq!(code(s.client().register("alice @acme.example", PASSWORD)), ErrorCode::InvalidName);
    // A suffix that is no configured domain is part of a default-domain name.
    assert_eq!(domain_of(register(&s, "carol@elsewhere.example")), 0);
    let bob = register(&s, "bob@acme.example");

    let mut a = login(&s, "alice@acme.example", durable);
    let mut g = login(&s, "alice@globex.example", durable);
    let mut p = login(&s, "alice", durable);
    let mut b = login(&s, "bob@acme.example", durable);
    assert_eq!(a.my_sessions().unwrap().sessions.len(), 1);

    // 1:1 within a domain, never across (as if the other account did not exist).
    let ack = a.send_wait(bob, 1, b"hi bob").unwrap();
    assert_eq!(b.next_delivery().unwrap().stamp.seq, ack.seq);
    assert_eq!(code(a.send_wait(globex, 2, b"hi other alice")), ErrorCode::UnknownRecipient);
    assert_eq!(code(a.send_wait(plain, 3, b"hi plain alice")), ErrorCode::UnknownRecipient);
    assert_eq!(code(p.send_wait(acme, 1, b"hi acme alice")), ErrorCode::UnknownRecipient);

    // Friend requests.
    assert_eq!(code(a.roster_action(roster_action::REQUEST, globex, "hi")), ErrorCode::UnknownUser);
    a.roster_action(roster_action::REQUEST, bob, "hi").unwrap();
    assert!(b.roster_action(roster_action::ACCEPT, acme, "").unwrap().friends);

    // Groups: the id carries the creator's domain; outsiders find no group, members come only
    // from the domain.
    let profile = GroupProfile {
        name: "acme staff".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MEMBERS,
    };
    let group = a.group_create(profile).unwrap();
    assert_eq!(domain_of(group), 1);
    b.group_action(group, group_action::JOIN, 0, 0, "").unwrap();
    assert_eq!(code(g.group_action(group, group_action::JOIN, 0, 0, "")), ErrorCode::GroupNotFound);
    assert_eq!(code(g.group_get(group)), ErrorCode::GroupNotFound);
    assert_eq!(code(a.group_action(group, group_action::INVITE, globex, 0, "")), ErrorCode::UnknownUser);
    a.send_frame(
        kind::GROUP_ADD_MEMBERS,
        &protocol::GroupAddMembers { group_id: group, user_ids: vec![plain] },
    )
    .unwrap();
    assert_eq!(next_error(&mut a), (ErrorCode::UnknownUser, kind::GROUP_ADD_MEMBERS));
    assert_eq!(code(g.group_send_wait(group, 1, b"let me in")), ErrorCode::GroupNotFound);
    a.group_send_wait(group, 4, b"staff only").unwrap();

    // Rooms.
    let room = a.room_create(protocol::room_publish::SUBSCRIBERS, 100, &[]).unwrap();
    assert_eq!(domain_of(room), 1);
    b.room_subscribe(room).unwrap();
    assert_eq!(code(g.room_subscribe(room)), ErrorCode::RoomNotFound);

    // Presence and profiles of other domains look like those of unknown users.
    let seen = g.presence_get(&[acme]).unwrap();
    assert_eq!((seen.len(), seen[0].user, seen[0].state, seen[0].since_ms), (1, acme, 0, 0));
    assert_eq!(b.presence_get(&[acme]).unwrap()[0].state, 1);
    let mine = protocol::UserProfile { nickname: "Alice of Acme".into(), ..Default::default() };
    a.profile_update(mine).unwrap();
    assert!(g.profile_get(&[acme]).unwrap().is_empty());
    assert_eq!(b.profile_get(&[acme]).unwrap().len(), 1);

    // Logins find the right account of each domain.
    let mut again = s.client();
    let ok = again.login("alice@globex.example", PASSWORD, 1, "phone").unwrap();
    assert_eq!(ok.user_id, globex);
    s.assert_serves_others();
}

#[test]
fn tenants_embedded() {
    tenants("embedded");
}

#[test]
fn tenants_memory() {
    tenants("memory");
}

#[test]
fn tenants_postgres() {
    tenants("postgres");
}

/// Domains are checked when the server starts: id 0, a repeated id or name, a name with '@'.
#[test]
fn bad_domains_are_refused() {
    for bad in [
        "[[domains]]\nname = \"a.example\"\nid = 0\n",
        "[[domains]]\nname = \"a.example\"\nid = 1\n[[domains]]\nname = \"b.example\"\nid = 1\n",
        "[[domains]]\nname = \"a.example\"\nid = 1\n[[domains]]\nname = \"a.example\"\nid = 2\n",
        "[[domains]]\nname = \"a@example\"\nid = 1\n",
    ] {
        let cfg: tim::config::Config = toml::from_str(bad).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("domains"), "{err}");
    }
}
