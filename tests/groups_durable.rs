//! Groups on the durable stores (embedded and PostgreSQL on two servers), over real sockets:
//! offline catch-up and history follow each member's span (from the notice that added it to the
//! one that removed it), groups and sequences survive a restart, and a kill -9 under group
//! traffic loses no acked group message.

mod common;
use std::collections::BTreeMap;

use common::*;
use tim::{
    client::{group_notice, Client, Delivery, Event},
    protocol::{
        conv, group_action as act, group_event as ev, invite_policy, join_policy, ErrorCode, GroupProfile,
    },
};

const FAST_CURSORS: &str = "[limits]\ncursor_flush_ms = 20\n";

fn start(name: &str) -> (TestServer, String) {
    let body = pg::store_body(name);
    (TestServer::start_with_store("io_uring", &body, FAST_CURSORS), body)
}

fn login_device(s: &TestServer, name: &str, device: &str) -> Client {
    let mut c = s.client();
    c.login(name, PASSWORD, 3, device).unwrap();
    c
}

fn profile(name: &str) -> GroupProfile {
    GroupProfile {
        name: name.into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: invite_policy::MANAGERS,
    }
}

/// What a list of group deliveries holds, in order: a notice's event, or a message's body.
fn summary(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| match group_notice(d) {
            Some(n) => format!("notice {}", n.event),
            None => String::from_utf8_lossy(&d.body).into_owned(),
        })
        .collect()
}

/// A device that was offline gets at catch-up exactly the group's messages of its span; history
/// pages stop at the span's ends; a non-member reads nothing.
fn catch_up_and_history_follow_membership(st: &str) {
    let (s, _) = start(st);
    let (f_name, _) = s.register("founder");
    let (a_name, a) = s.register("a");
    let (b_name, b) = s.register("b");
    let (c_name, _) = s.register("c");
    let mut f = login_device(&s, &f_name, "f1");
    f.catch_up().unwrap();
    let group = f.group_create(profile("durable")).unwrap();
    let mut ac = login_device(&s, &a_name, "a-live");
    ac.catch_up().unwrap();
    let joined = ac.group_action(group, act::JOIN, 0, 0, "").unwrap();
    drop(ac);
    let m1 = f.group_send_wait(group, 1, b"m1").unwrap();
    let added = f.group_action(group, act::INVITE, b, 0, "").unwrap();
    let m2 = f.group_send_wait(group, 2, b"m2").unwrap();
    let left = {
        let mut ac = login_device(&s, &a_name, "a-live");
        ac.catch_up().unwrap();
        ac.group_action(group, act::LEAVE, 0, 0, "").unwrap()
    };
    let m3 = f.group_send_wait(group, 3, b"m3").unwrap();
    let seqs = [joined.seq, m1.seq, added.seq, m2.seq, left.seq, m3.seq];
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // A new device of a: from its join to its leave.
    let mut a2 = login_device(&s, &a_name, "a-new");
    let (got, end) = a2.catch_up().unwrap();
    let got: Vec<Delivery> = got.into_iter().filter(|d| d.stamp.to == group).collect();
    assert_eq!(
        summary(&got),
        [
            format!("notice {}", ev::JOINED),
            "m1".into(),
            format!("notice {}", ev::ADDED),
            "m2".into(),
            format!("notice {}", ev::LEFT)
        ],
        "{end:?}"
    );
    let (page, end) = a2.history_of(conv::GROUP, group, 0, true, 0).unwrap();
    assert_eq!(
        page.iter().map(|d| d.stamp.seq).collect::<Vec<_>>(),
        vec![left.seq, m2.seq, added.seq, m1.seq, joined.seq]
    );
    assert!(!end.more);
    let (page, _) = a2.history_of(conv::GROUP, group, 0, false, 2).unwrap();
    assert_eq!(page.iter().map(|d| d.stamp.seq).collect::<Vec<_>>(), vec![joined.seq, m1.seq]);
    let (page, _) = a2.history_of(conv::GROUP, group, left.seq, false, 0).unwrap();
    assert!(page.is_empty(), "nothing after a's leave");
    assert!(a2.my_groups(0, 0).unwrap().groups.is_empty());
    let _ = a;

    // b, invited while offline: from the invitation on.
    let mut bc = login_device(&s, &b_name, "b1");
    let (got, _) = bc.catch_up().unwrap();
    let got: Vec<Delivery> = got.into_iter().filter(|d| d.stamp.to == group).collect();
    assert_eq!(
        summary(&got),
        [format!("notice {}", ev::ADDED), "m2".into(), format!("notice {}", ev::LEFT), "m3".into()]
    );
    assert_eq!(bc.my_groups(0, 0).unwrap().groups, vec![group]);
    // Acknowledged: a second device of b sees it all again, the first device nothing more.
    bc.group_delivery_ack(group, m3.seq).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(bc);
    let mut bc = login_device(&s, &b_name, "b1");
    let (got, _) = bc.catch_up().unwrap();
    assert!(got.iter().all(|d| d.stamp.to != group), "acked group messages come again: {got:?}");

    // c was never a member.
    let mut cc = login_device(&s, &c_name, "c1");
    let (got, _) = cc.catch_up().unwrap();
    assert!(got.is_empty());
    match cc.history_of(conv::GROUP, group, 0, true, 0) {
        Err(tim::client::ClientError::Server { name: Some(ErrorCode::NotMember), .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A restart keeps groups (profile, members, roles, mutes, blocks, join requests) and the
/// group's sequence.
fn restart_keeps_groups(st: &str) {
    let (s, body) = start(st);
    let (f_name, founder) = s.register("founder");
    let (a_name, a) = s.register("a");
    let (b_name, b) = s.register("b");
    let mut f = login_device(&s, &f_name, "f1");
    let group = f.group_create(profile("kept")).unwrap();
    let closed =
        f.group_create(GroupProfile { join_policy: join_policy::APPROVAL, ..profile("closed") }).unwrap();
    let mut ac = login_device(&s, &a_name, "a1");
    ac.group_action(group, act::JOIN, 0, 0, "").unwrap();
    ac.group_action(closed, act::JOIN, 0, 0, "let me in").unwrap();
    f.group_action(group, act::ADD_MANAGER, a, 0, "").unwrap();
    f.group_action(group, act::BLOCK, b, 0, "").unwrap();
    let until = tim::shard::now_ms() + 3_600_000;
    f.group_action(group, act::MUTE_ALL, 0, until, "").unwrap();
    let last = f.group_send_wait(group, 1, b"before").unwrap();
    drop((f, ac));
    let dir = s.stop_keep();
    let s = TestServer::start_in(dir, "io_uring", &body, FAST_CURSORS);
    let mut f = login_device(&s, &f_name, "f1");
    let info = f.group_get(group).unwrap();
    assert_eq!((info.members, info.founder, info.profile.name.as_str()), (2, founder, "kept"));
    assert_eq!(info.muted_all_until_ms, until);
    let page = f.group_members(group, 0, 0).unwrap();
    assert_eq!(
        page.members.iter().map(|m| (m.user_id, m.role)).collect::<Vec<_>>(),
        vec![(founder, 2), (a, 1)]
    );
    let mut bc = login_device(&s, &b_name, "b1");
    match bc.group_action(group, act::JOIN, 0, 0, "") {
        Err(tim::client::ClientError::Server { name: Some(ErrorCode::BlockedFromGroup), .. }) => {}
        other => panic!("{other:?}"),
    }
    let requests = f.group_requests(closed).unwrap();
    assert_eq!(
        requests.requests.iter().map(|r| (r.user_id, r.note.as_str())).collect::<Vec<_>>(),
        vec![(a, "let me in")]
    );
    let again = f.group_send_wait(group, 1, b"before").unwrap();
    assert!(again.duplicate && again.seq == last.seq, "resend dedup survives: {again:?}");
    let next = f.group_send_wait(group, 2, b"after").unwrap();
    assert_eq!(next.seq, last.seq + 1);
    let mut ac = login_device(&s, &a_name, "a1");
    let mine = ac.my_groups(0, 0).unwrap();
    assert_eq!(mine.groups, vec![group]);
}

/// kill -9 while two members send to a group: after the restart every acked message is in the
/// group's history once, and a member that was offline catches up on all of them.
fn crash_under_group_load(st: &str) {
    let (s, body) = start(st);
    let (f_name, _) = s.register("founder");
    let (a_name, _) = s.register("a");
    let (r_name, _) = s.register("reader");
    let mut f = login_device(&s, &f_name, "f1");
    f.catch_up().unwrap();
    let group = f.group_create(profile("crash")).unwrap();
    let mut a = login_device(&s, &a_name, "a1");
    a.catch_up().unwrap();
    a.group_action(group, act::JOIN, 0, 0, "").unwrap();
    {
        let mut r = login_device(&s, &r_name, "r1");
        r.catch_up().unwrap();
        r.group_action(group, act::JOIN, 0, 0, "").unwrap();
    }
    let mut acked: BTreeMap<u64, (u64, u64)> = BTreeMap::new(); // seq -> (sender index, cmid)
    let mut next = [1u64, 1u64];
    for (i, c) in [&mut f, &mut a].into_iter().enumerate() {
        for _ in 0..16 {
            c.send_to(conv::GROUP, group, next[i], &[i as u8]).unwrap();
            next[i] += 1;
        }
    }
    while acked.len() < 300 {
        for (i, c) in [&mut f, &mut a].into_iter().enumerate() {
            c.set_timeout(Some(std::time::Duration::from_millis(5))).unwrap();
            loop {
                match c.recv() {
                    Ok(Event::SendAck(ack)) => {
                        assert!(acked.insert(ack.seq, (i as u64, ack.client_msg_id)).is_none());
                        if acked.len() >= 300 {
                            break;
                        }
                        c.send_to(conv::GROUP, group, next[i], &[i as u8]).unwrap();
                        next[i] += 1;
                    }
                    Ok(Event::Deliver(_)) => {}
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => break,
                }
            }
        }
    }
    let dir = s.crash();
    let s = TestServer::start_in(dir, "io_uring", &body, FAST_CURSORS);
    let mut r = login_device(&s, &r_name, "r1");
    let (got, end) = r.catch_up().unwrap();
    let mut seen: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for d in got.iter().filter(|d| d.stamp.from != 0) {
        let sender = if d.body == [0] { 0 } else { 1 };
        assert!(seen.insert(d.stamp.seq, (sender, d.client_msg_id)).is_none(), "seq {} twice", d.stamp.seq);
    }
    assert!(!end.more || seen.len() >= acked.len(), "{end:?}");
    for (seq, m) in &acked {
        assert_eq!(seen.get(seq), Some(m), "acked group message at seq {seq} lost");
    }
    // The group goes on above every stored seq.
    let mut f = login_device(&s, &f_name, "f1");
    let ack = f.group_send_wait(group, 1_000_000, b"after").unwrap();
    assert!(ack.seq > *seen.keys().max().unwrap());
}

/// GroupAddMembers on a durable store: every user must have an account and room for one more
/// group (asked of the store for all of them at once); the added members are stored.
fn add_members_checks_the_store(st: &str) {
    let body = pg::store_body(st);
    let s = TestServer::start_with_store("io_uring", &body, "[limits]\ngroups_per_user_max = 1\n");
    let (f_name, _) = s.register("founder");
    let mut f = login_device(&s, &f_name, "f1");
    let group = f.group_create(profile("bulk")).unwrap();
    let ids: Vec<u64> = (0..5).map(|_| s.register("m").1).collect();
    let add = |c: &mut Client, users: &[u64]| {
        let req = tim::protocol::GroupAddMembers { group_id: group, user_ids: users.to_vec() };
        c.send_frame(tim::protocol::kind::GROUP_ADD_MEMBERS, &req).unwrap();
        loop {
            match c.recv().unwrap() {
                Event::GroupOk(ok) => return Ok(ok.seq),
                Event::Error(e) => return Err(ErrorCode::from_u16(e.code)),
                _ => {}
            }
        }
    };
    assert_eq!(add(&mut f, &[ids[0], 987_654_321]), Err(Some(ErrorCode::UnknownUser)));
    // ids[4] is in a group already: at its cap of one.
    let (other_name, _) = s.register("other");
    let mut o = login_device(&s, &other_name, "o1");
    let other = o.group_create(profile("other")).unwrap();
    o.group_action(other, act::INVITE, ids[4], 0, "").unwrap();
    assert_eq!(add(&mut f, &ids), Err(Some(ErrorCode::TooManyGroups)));
    assert!(add(&mut f, &ids[..4]).unwrap() > 1);
    assert_eq!(f.group_get(group).unwrap().members, 5);
}

macro_rules! on_durable_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded { $( #[test] fn $name() { super::$name("embedded") } )* }
        mod postgres { $( #[test] fn $name() { super::$name("postgres") } )* }
    };
}

on_durable_stores!(
    add_members_checks_the_store,
    catch_up_and_history_follow_membership,
    restart_keeps_groups,
    crash_under_group_load
);
