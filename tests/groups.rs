//! Groups (1:N, stored) over real sockets: create, join, invite, approval, kick, leave,
//! managers, transfer, mutes, block list, profile, dissolve; messages sequenced once per group
//! and delivered to every member's sessions on both shards; membership changes as notices in
//! the group's sequence; every refusal with its own code.

mod common;
use std::time::Duration;

use common::*;
use tim::{
    client::{group_notice, Client, ClientError, Delivery, Event},
    protocol::{
        conv, group_action as act, group_event as ev, group_role, invite_policy, join_policy, ErrorCode,
        GroupNotice, GroupProfile,
    },
};

fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>, code: ErrorCode) {
    match r {
        Err(ClientError::Server { name: Some(c), .. }) if c == code => {}
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn profile(name: &str, join: u8, invite: u8) -> GroupProfile {
    GroupProfile {
        name: name.into(),
        topic: "a topic".into(),
        avatar_url: "https://example.com/a.png".into(),
        extra: vec![1, 2, 3],
        join_policy: join,
        invite_policy: invite,
    }
}

/// The next delivery of group `group` (other deliveries and events are an error, pongs and
/// catch-up ends aside).
fn next_group(c: &mut Client, group: u64) -> Delivery {
    loop {
        match c.recv().unwrap() {
            Event::Deliver(d) => {
                assert_eq!((d.stamp.conv, d.stamp.to), (conv::GROUP, group), "{d:?}");
                return d;
            }
            Event::Pong(_) | Event::CatchUpEnd(_) => {}
            other => panic!("expected a group delivery, got {other:?}"),
        }
    }
}

/// The next notice of `group` (messages before it are skipped).
fn next_notice(c: &mut Client, group: u64) -> (u64, GroupNotice) {
    loop {
        let d = next_group(c, group);
        if let Some(n) = group_notice(&d) {
            return (d.stamp.seq, n);
        }
    }
}

/// The next notice of `group` with `event` (anything before it is skipped).
fn notice_of(c: &mut Client, group: u64, event: u8) -> (u64, GroupNotice) {
    loop {
        let (seq, n) = next_notice(c, group);
        if n.event == event {
            return (seq, n);
        }
    }
}

/// Nothing more arrives within a short while.
fn quiet(c: &mut Client) {
    c.set_timeout(Some(Duration::from_millis(300))).unwrap();
    match c.recv() {
        Err(ClientError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("expected nothing, got {other:?}"),
    }
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
}

/// An open group: members on both shards join, every message reaches every member's sessions
/// once (the sending session aside, the sender's other session included), in sequence with the
/// join notices; pages of members and of my groups; leave and kick stop deliveries; dissolve
/// ends it.
fn open_group_lifecycle(driver: &str) {
    let s = TestServer::start(driver, "");
    let (founder_name, founder) = s.register("founder");
    let mut f = s.login_on_shard(&founder_name, 3, 0);
    let group = f.group_create(profile("tim fans", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    assert!(tim::protocol::is_group_id(group));
    let (seq, n) = next_notice(&mut f, group);
    assert_eq!((seq, n.event, n.actor), (1, ev::CREATED, founder));

    let mut members = Vec::new();
    for shard in [0u64, 1, 1] {
        let (name, id) = s.register("member");
        let mut c = s.login_on_shard(&name, 3, shard);
        let ok = c.group_action(group, act::JOIN, 0, 0, "").unwrap();
        let (seq, n) = next_notice(&mut c, group);
        assert_eq!((seq, n.event, n.actor), (ok.seq, ev::JOINED, id));
        // The founder and every earlier member learn it too.
        assert_eq!(next_notice(&mut f, group), (ok.seq, n.clone()));
        for (_, _, m) in members.iter_mut() {
            assert_eq!(next_notice(m, group), (ok.seq, n.clone()));
        }
        members.push((name, id, c));
    }
    // The founder's second session, on the other shard.
    let mut f2 = s.login_on_shard(&founder_name, 4, 1);

    let info = f.group_get(group).unwrap();
    assert_eq!((info.members, info.founder, info.my_role), (4, founder, group_role::FOUNDER));
    assert_eq!(info.profile, profile("tim fans", join_policy::OPEN, invite_policy::MANAGERS));
    assert_eq!(members[0].2.group_get(group).unwrap().my_role, group_role::MEMBER);

    // Messages: one seq each, to everyone but the sending session.
    let ack = f.group_send_wait(group, 1, b"hello group").unwrap();
    assert_eq!(ack.seq, 5);
    for (_, _, m) in members.iter_mut() {
        let d = next_group(m, group);
        assert_eq!((d.stamp.seq, d.stamp.from, &d.body[..]), (5, founder, &b"hello group"[..]));
    }
    let d = next_group(&mut f2, group);
    assert_eq!(d.stamp.seq, 5);
    let from = members[2].1;
    let ack = members[2].2.group_send_wait(group, 7, b"hi all").unwrap();
    assert_eq!(ack.seq, 6);
    assert_eq!(next_group(&mut f, group).stamp.from, from);
    assert_eq!(next_group(&mut members[0].2, group).stamp.seq, 6);
    assert_eq!(next_group(&mut members[1].2, group).stamp.seq, 6);
    // A resend is acked again with the same ids and not delivered twice.
    let again = members[2].2.group_send_wait(group, 7, b"hi all").unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, 6);

    // Pages: members by user id, my groups.
    let page = f.group_members(group, 0, 2).unwrap();
    assert_eq!(page.members.len(), 2);
    assert!(page.more);
    let rest = f.group_members(group, page.members[1].user_id, 0).unwrap();
    assert_eq!(rest.members.len(), 2);
    assert!(!rest.more);
    let mine = members[0].2.my_groups(0, 0).unwrap();
    assert_eq!(mine.groups, vec![group]);

    // A non-member can read the profile, not send or list members.
    let (outsider_name, _) = s.register("outsider");
    let (mut o, _) = s.login(&outsider_name, 3);
    assert_eq!(o.group_get(group).unwrap().my_role, 255);
    refused(o.group_send_wait(group, 1, b"let me in"), ErrorCode::NotMember);
    refused(o.group_members(group, 0, 0), ErrorCode::NotMember);

    // Leave: told (with everyone), then nothing more.
    let left_id = members[1].1;
    let ok = members[1].2.group_action(group, act::LEAVE, 0, 0, "").unwrap();
    let (seq, n) = next_notice(&mut members[1].2, group);
    assert_eq!((seq, n.event, n.actor), (ok.seq, ev::LEFT, left_id));
    assert_eq!(next_notice(&mut f, group).1.event, ev::LEFT);
    // Kick: the kicked member learns it too.
    let kicked = members[2].1;
    let ok = f.group_action(group, act::KICK, kicked, 0, "").unwrap();
    let (seq, n) = notice_of(&mut members[2].2, group, ev::KICKED);
    assert_eq!((seq, n.event, n.target), (ok.seq, ev::KICKED, kicked));
    refused(members[2].2.group_send_wait(group, 8, b"still here?"), ErrorCode::NotMember);
    f.group_send_wait(group, 2, b"after").unwrap();
    quiet(&mut members[1].2);
    quiet(&mut members[2].2);
    assert_eq!(next_notice(&mut members[0].2, group).1.event, ev::LEFT);
    assert_eq!(next_notice(&mut members[0].2, group).1.event, ev::KICKED);
    assert_eq!(&next_group(&mut members[0].2, group).body[..], b"after");
    assert!(members[1].2.my_groups(0, 0).unwrap().groups.is_empty());

    // Dissolve: everyone still in is told; the group refuses everything after.
    let ok = f.group_action(group, act::DISSOLVE, 0, 0, "").unwrap();
    let (seq, n) = next_notice(&mut members[0].2, group);
    assert_eq!((seq, n.event), (ok.seq, ev::DISSOLVED));
    refused(members[0].2.group_send_wait(group, 9, b"anyone?"), ErrorCode::GroupDissolved);
    refused(f.group_get(group), ErrorCode::GroupDissolved);
    refused(members[0].2.group_action(group, act::JOIN, 0, 0, ""), ErrorCode::GroupDissolved);
    assert!(f.my_groups(0, 0).unwrap().groups.is_empty());
    s.assert_serves_others();
}

/// Approval groups: a join is a request the managers see (pushed, and listed); approve adds
/// the requester (told with a decision and the notice), reject tells it no.
fn approval_and_invites(driver: &str) {
    let s = TestServer::start(driver, "");
    let (founder_name, _) = s.register("founder");
    let mut f = s.login_on_shard(&founder_name, 3, 0);
    let group = f.group_create(profile("closed", join_policy::APPROVAL, invite_policy::MEMBERS)).unwrap();
    let (a_name, a) = s.register("asker");
    let mut ac = s.login_on_shard(&a_name, 3, 1);
    let ok = ac.group_action(group, act::JOIN, 0, 0, "please").unwrap();
    assert_eq!(ok.seq, 0, "a request is no notice");
    let push = loop {
        match f.recv().unwrap() {
            Event::GroupJoinRequest(r) => break r,
            Event::Deliver(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((push.group_id, push.request.user_id, push.request.note.as_str()), (group, a, "please"));
    let listed = f.group_requests(group).unwrap();
    assert_eq!(listed.requests.len(), 1);
    refused(ac.group_requests(group), ErrorCode::NotMember);
    refused(ac.group_send_wait(group, 1, b"early"), ErrorCode::NotMember);
    let ok = f.group_action(group, act::APPROVE, a, 0, "").unwrap();
    let decision = loop {
        match ac.recv().unwrap() {
            Event::GroupDecision(d) => break d,
            Event::Deliver(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(decision.approved);
    assert_eq!(ac.group_get(group).unwrap().members, 2);
    assert!(ok.seq > 1);
    refused(f.group_action(group, act::APPROVE, a, 0, ""), ErrorCode::NoJoinRequest);
    assert!(f.group_requests(group).unwrap().requests.is_empty());

    // Reject.
    let (b_name, b) = s.register("rejected");
    let mut bc = s.login_on_shard(&b_name, 3, 0);
    bc.group_action(group, act::JOIN, 0, 0, "me too").unwrap();
    f.group_action(group, act::REJECT, b, 0, "").unwrap();
    let decision = match bc.recv().unwrap() {
        Event::GroupDecision(d) => d,
        other => panic!("{other:?}"),
    };
    assert!(!decision.approved);
    assert!(f.group_requests(group).unwrap().requests.is_empty());
    refused(bc.group_send_wait(group, 1, b"no"), ErrorCode::NotMember);

    // Members may invite here: a plain member adds b.
    let ok = ac.group_action(group, act::INVITE, b, 0, "").unwrap();
    let (seq, n) = notice_of(&mut bc, group, ev::ADDED);
    assert_eq!((seq, n.event, n.actor, n.target), (ok.seq, ev::ADDED, a, b));
    refused(ac.group_action(group, act::INVITE, b, 0, ""), ErrorCode::AlreadyMember);
    refused(ac.group_action(group, act::INVITE, 999_999_999, 0, ""), ErrorCode::UnknownUser);
}

/// Roles: the founder names managers and transfers; a manager acts on plain members only;
/// mutes (one member, or everyone but the managers) stop sends until lifted; blocked users
/// cannot join or be invited; the profile changes with a notice.
fn roles_mutes_blocks(driver: &str) {
    let s = TestServer::start(driver, "");
    let (f_name, founder) = s.register("founder");
    let mut f = s.login_on_shard(&f_name, 3, 0);
    let group = f.group_create(profile("roles", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    let mut users = Vec::new();
    for shard in [1u64, 0, 1] {
        let (name, id) = s.register("u");
        let mut c = s.login_on_shard(&name, 3, shard);
        c.group_action(group, act::JOIN, 0, 0, "").unwrap();
        users.push((id, c));
    }
    let (m_id, p_id, q_id) = (users[0].0, users[1].0, users[2].0);
    refused(users[0].1.group_action(group, act::ADD_MANAGER, p_id, 0, ""), ErrorCode::NotFounder);
    f.group_action(group, act::ADD_MANAGER, m_id, 0, "").unwrap();
    refused(f.group_action(group, act::ADD_MANAGER, m_id, 0, ""), ErrorCode::InvalidGroup);
    // Plain members cannot invite here, kick, or mute.
    refused(users[1].1.group_action(group, act::KICK, q_id, 0, ""), ErrorCode::NotManager);
    refused(users[1].1.group_action(group, act::MUTE, q_id, u64::MAX / 2, ""), ErrorCode::NotManager);
    // A manager cannot act on the founder or another manager.
    refused(users[0].1.group_action(group, act::KICK, founder, 0, ""), ErrorCode::NotManager);
    refused(users[0].1.group_action(group, act::MUTE, founder, u64::MAX / 2, ""), ErrorCode::NotManager);
    // Mute one member.
    let until = tim::shard::now_ms() + 60_000;
    let ok = users[0].1.group_action(group, act::MUTE, p_id, until, "").unwrap();
    let (seq, n) = notice_of(&mut users[1].1, group, ev::MUTED);
    assert_eq!((seq, n.event, n.target, n.until_ms), (ok.seq, ev::MUTED, p_id, until));
    refused(users[1].1.group_send_wait(group, 1, b"muted?"), ErrorCode::Muted);
    users[2].1.group_send_wait(group, 1, b"not me").unwrap();
    users[0].1.group_action(group, act::MUTE, p_id, 0, "").unwrap();
    users[1].1.group_send_wait(group, 2, b"free again").unwrap();
    // Mute everyone but the managers.
    users[0].1.group_action(group, act::MUTE_ALL, 0, until, "").unwrap();
    refused(users[2].1.group_send_wait(group, 2, b"quiet?"), ErrorCode::Muted);
    users[0].1.group_send_wait(group, 1, b"managers speak").unwrap();
    f.group_send_wait(group, 1, b"founder speaks").unwrap();
    assert_eq!(f.group_get(group).unwrap().muted_all_until_ms, until);
    f.group_action(group, act::MUTE_ALL, 0, 0, "").unwrap();
    users[2].1.group_send_wait(group, 3, b"back").unwrap();
    // Block a member: removed, cannot come back until unblocked.
    let ok = users[0].1.group_action(group, act::BLOCK, q_id, 0, "").unwrap();
    let (seq, n) = notice_of(&mut users[2].1, group, ev::BLOCKED);
    assert_eq!((seq, n.event, n.target), (ok.seq, ev::BLOCKED, q_id));
    refused(users[2].1.group_action(group, act::JOIN, 0, 0, ""), ErrorCode::BlockedFromGroup);
    refused(f.group_action(group, act::INVITE, q_id, 0, ""), ErrorCode::BlockedFromGroup);
    users[0].1.group_action(group, act::UNBLOCK, q_id, 0, "").unwrap();
    users[2].1.group_action(group, act::JOIN, 0, 0, "").unwrap();
    // Profile: managers only.
    refused(users[1].1.group_update(group, profile("mine now", 0, 0)), ErrorCode::NotManager);
    users[0].1.group_update(group, profile("renamed", join_policy::OPEN, invite_policy::MEMBERS)).unwrap();
    assert_eq!(users[1].1.group_get(group).unwrap().profile.name, "renamed");
    refused(users[0].1.group_update(group, profile("", 0, 0)), ErrorCode::InvalidGroup);
    refused(users[0].1.group_update(group, profile(&"x".repeat(300), 0, 0)), ErrorCode::InvalidGroup);
    refused(users[0].1.group_update(group, profile("bad policy", 7, 0)), ErrorCode::InvalidGroup);
    // The founder leaves only after a transfer.
    refused(f.group_action(group, act::LEAVE, 0, 0, ""), ErrorCode::FounderMustTransfer);
    refused(users[0].1.group_action(group, act::TRANSFER, p_id, 0, ""), ErrorCode::NotFounder);
    f.group_action(group, act::TRANSFER, m_id, 0, "").unwrap();
    let info = f.group_get(group).unwrap();
    assert_eq!((info.founder, info.my_role), (m_id, group_role::MANAGER));
    f.group_action(group, act::LEAVE, 0, 0, "").unwrap();
    refused(users[1].1.group_action(group, act::DISSOLVE, 0, 0, ""), ErrorCode::NotFounder);
    refused(users[1].1.group_action(group, 99, 0, 0, ""), ErrorCode::InvalidGroup);
    users[0].1.group_action(group, act::DISSOLVE, 0, 0, "").unwrap();
}

/// Caps and ids: full groups, too many groups per user, too many pending requests, unknown
/// groups and ids outside the group range.
fn caps_and_unknown_groups(driver: &str) {
    let s = TestServer::start(
        driver,
        "[limits]\ngroup_members_max = 2\ngroups_per_user_max = 2\ngroup_join_requests_max = 1\n",
    );
    let (f_name, _) = s.register("founder");
    let mut f = s.login_on_shard(&f_name, 3, 0);
    let open = f.group_create(profile("open", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    let closed = f.group_create(profile("closed", join_policy::APPROVAL, invite_policy::MANAGERS)).unwrap();
    refused(f.group_create(profile("third", 0, 0)), ErrorCode::TooManyGroups);
    let (a_name, a) = s.register("a");
    let mut ac = s.login_on_shard(&a_name, 3, 1);
    ac.group_action(open, act::JOIN, 0, 0, "").unwrap();
    refused(ac.group_action(open, act::JOIN, 0, 0, ""), ErrorCode::AlreadyMember);
    let (b_name, _) = s.register("b");
    let mut bc = s.login_on_shard(&b_name, 3, 0);
    refused(bc.group_action(open, act::JOIN, 0, 0, ""), ErrorCode::GroupFull);
    ac.group_action(closed, act::JOIN, 0, 0, "").unwrap();
    refused(bc.group_action(closed, act::JOIN, 0, 0, ""), ErrorCode::TooManyJoinRequests);
    let (_, b) = (bc.group_get(closed).unwrap(), s.register("c").1);
    refused(f.group_action(closed, act::APPROVE, b, 0, ""), ErrorCode::NoJoinRequest);
    let _ = a;
    // Ids: unknown groups, user ids where a group id belongs.
    let unknown = tim::protocol::GROUP_ID_MIN + 12345;
    refused(f.group_get(unknown), ErrorCode::GroupNotFound);
    refused(f.group_send_wait(unknown, 1, b"?"), ErrorCode::GroupNotFound);
    refused(bc.group_action(unknown, act::JOIN, 0, 0, ""), ErrorCode::GroupNotFound);
    refused(f.group_get(42), ErrorCode::GroupNotFound);
    refused(f.group_send_wait(42, 1, b"?"), ErrorCode::GroupNotFound);
    refused(f.history_of(conv::GROUP, unknown, 0, true, 10), ErrorCode::NotMember);
    refused(ac.history_of(conv::GROUP, 42, 0, true, 10), ErrorCode::InvalidConversation);
    s.assert_serves_others();
}

/// Stream messages to a group reach the members' live sessions (not the sending session),
/// stamped with the group seq they follow; a non-member's is refused.
fn group_streams(driver: &str) {
    let s = TestServer::start(driver, "");
    let (f_name, founder) = s.register("founder");
    let mut f = s.login_on_shard(&f_name, 3, 0);
    let group = f.group_create(profile("live", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    let (m_name, _) = s.register("member");
    let mut m = s.login_on_shard(&m_name, 3, 1);
    let joined = m.group_action(group, act::JOIN, 0, 0, "").unwrap();
    notice_of(&mut f, group, ev::JOINED);
    notice_of(&mut m, group, ev::JOINED);
    let ack = f.group_send_wait(group, 1, b"stored").unwrap();
    assert_eq!(ack.seq, joined.seq + 1);
    f.send_frame(
        tim::protocol::kind::STREAM,
        &tim::protocol::Send {
            conv: conv::GROUP,
            flags: 0,
            burn_secs: 0,
            to: group,
            client_msg_id: 2,
            body: b"live".to_vec(),
        },
    )
    .unwrap();
    assert_eq!(&next_group(&mut m, group).body[..], b"stored");
    let d = match m.recv().unwrap() {
        Event::StreamMsg(d) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (d.stamp.msg_id, d.stamp.seq, d.stamp.from, d.stamp.to, &d.body[..]),
        (0, ack.seq, founder, group, &b"live"[..])
    );
    quiet(&mut f);
    let (o_name, _) = s.register("outsider");
    let (mut o, _) = s.login(&o_name, 3);
    o.send_frame(
        tim::protocol::kind::STREAM,
        &tim::protocol::Send {
            conv: conv::GROUP,
            flags: 0,
            burn_secs: 0,
            to: group,
            client_msg_id: 3,
            body: b"x".to_vec(),
        },
    )
    .unwrap();
    match o.recv().unwrap() {
        Event::Error(e) => {
            assert_eq!(
                (e.code, e.request_kind, e.client_msg_id),
                (ErrorCode::NotMember as u16, tim::protocol::kind::STREAM, 3)
            )
        }
        other => panic!("{other:?}"),
    }
    quiet(&mut m);
}

/// With room for one group per shard in memory, groups are dropped and loaded again (from the
/// store) as they are used in turn: nothing is lost, sequences go on.
fn groups_evicted_and_reloaded(driver: &str) {
    let s = TestServer::start(driver, "[limits]\ngroups_per_shard_max = 1\n");
    let (f_name, _) = s.register("founder");
    let mut f = s.login_on_shard(&f_name, 3, 0);
    let (m_name, _) = s.register("member");
    let mut m = s.login_on_shard(&m_name, 3, 1);
    let mut groups = Vec::new();
    for i in 0..4 {
        let g =
            f.group_create(profile(&format!("g{i}"), join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
        m.group_action(g, act::JOIN, 0, 0, "").unwrap();
        groups.push(g);
    }
    for round in 0..3u64 {
        for (i, &g) in groups.iter().enumerate() {
            let ack = f.group_send_wait(g, 10 + round, format!("r{round}").as_bytes()).unwrap();
            assert_eq!(ack.seq, 3 + round, "group {i}");
        }
    }
    let info = m.group_get(groups[0]).unwrap();
    assert_eq!(info.members, 2);
    let mut seen = std::collections::HashMap::new();
    // The member gets its join notice (seq 2) and the three messages of each group, in order.
    while seen.values().map(|v: &Vec<u64>| v.len()).sum::<usize>() < 4 * 4 {
        match m.recv().unwrap() {
            Event::Deliver(d) => seen.entry(d.stamp.to).or_insert_with(Vec::new).push(d.stamp.seq),
            other => panic!("{other:?}"),
        }
    }
    for g in &groups {
        assert_eq!(seen[g], vec![2, 3, 4, 5], "group {g}");
    }
}

/// Bad group requests: archives that do not validate get Malformed (with their kind), group
/// requests before login NotLoggedIn, group ids where user ids belong and the reverse their
/// codes; the session and the server carry on.
fn bad_group_input(driver: &str) {
    use tim::protocol::kind;
    let s = TestServer::start(driver, "");
    let (name, _) = s.register("u");
    let (mut c, _) = s.login(&name, 3);
    let group = c.group_create(profile("target", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    // The creation notice comes by the fan-out, possibly after answers given at once below.
    next_notice(&mut c, group);
    for k in [
        kind::GROUP_CREATE,
        kind::GROUP_UPDATE,
        kind::GROUP_ACTION,
        kind::GROUP_GET,
        kind::GROUP_MEMBERS,
        kind::MY_GROUPS,
        kind::GROUP_REQUESTS,
    ] {
        // Too short for the archive of any group request.
        let mut f = Vec::new();
        let len: u32 = 4;
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&k.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        let mut p = vec![0xffu8; len as usize];
        p.resize(tim::frame::padded(len as usize), 0);
        f.extend_from_slice(&p);
        c.write_raw(&f).unwrap();
        match c.recv().unwrap() {
            Event::Error(e) => {
                assert_eq!((e.code, e.request_kind), (ErrorCode::Malformed as u16, k), "kind {k}")
            }
            other => panic!("kind {k}: {other:?}"),
        }
    }
    // A GroupAction whose note points far outside the payload.
    let a = tim::protocol::GroupAction {
        group_id: group,
        action: act::JOIN,
        user_id: 0,
        until_ms: 0,
        note: "x".repeat(20),
    };
    let mut f = tim::frame::encode(kind::GROUP_ACTION, &a);
    let n = f.len();
    // The note's relative offset sits in the archive's last 8 bytes before the string bytes;
    // corrupt every byte after the fixed fields instead: whatever they say, it must not crash.
    for b in &mut f[8 + 32..n] {
        *b = 0xfe;
    }
    c.write_raw(&f).unwrap();
    match c.recv().unwrap() {
        Event::Error(e) => assert_eq!(e.request_kind, kind::GROUP_ACTION),
        Event::GroupOk(ok) => panic!("a corrupt action was applied: {ok:?}"),
        other => panic!("{other:?}"),
    }
    // A group id in a 1:1 send, a user id in a group send, acks of the wrong kind of id.
    refused(c.send_wait(group, 1, b"x"), ErrorCode::UnknownRecipient);
    refused(c.group_send_wait(7, 2, b"x"), ErrorCode::GroupNotFound);
    c.group_delivery_ack(7, 1).unwrap();
    match c.recv().unwrap() {
        Event::Error(e) => assert_eq!(e.code, ErrorCode::InvalidConversation as u16),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.group_members(group, 0, 0).unwrap().members.len(), 1);
    // Before login.
    let mut anon = s.client();
    anon.send_frame(kind::GROUP_GET, &tim::protocol::GroupRef { group_id: group }).unwrap();
    match anon.recv().unwrap() {
        Event::Error(e) => {
            assert_eq!((e.code, e.request_kind), (ErrorCode::NotLoggedIn as u16, kind::GROUP_GET))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.group_get(group).unwrap().members, 1);
    s.assert_serves_others();
}

/// Many users at once: one MEMBERS_ADDED notice lists those added (members already in are
/// skipped); every refusal has its code.
fn add_members_at_once(driver: &str) {
    let s = TestServer::start(driver, "[limits]\ngroup_add_batch_max = 8\ngroup_members_max = 6\n");
    let (f_name, _) = s.register("founder");
    let mut f = s.login_on_shard(&f_name, 3, 0);
    let group = f.group_create(profile("bulk", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for shard in [0u64, 1, 0, 1] {
        let (name, id) = s.register("m");
        ids.push(id);
        clients.push(s.login_on_shard(&name, 3, shard));
    }
    let add = |c: &mut Client, users: &[u64]| {
        let req = tim::protocol::GroupAddMembers { group_id: group, user_ids: users.to_vec() };
        c.send_frame(tim::protocol::kind::GROUP_ADD_MEMBERS, &req).unwrap();
        loop {
            match c.recv().unwrap() {
                Event::GroupOk(ok) => return Ok(ok),
                Event::Error(e) => return Err(ErrorCode::from_u16(e.code)),
                Event::Deliver(_) => {}
                other => panic!("{other:?}"),
            }
        }
    };
    // A plain member may not; unknown users, empty and too big batches are refused.
    assert_eq!(add(&mut clients[0], &ids[1..2]), Err(Some(ErrorCode::NotMember)));
    assert_eq!(add(&mut f, &[ids[0], 999_999]), Err(Some(ErrorCode::UnknownUser)));
    assert_eq!(add(&mut f, &[]), Err(Some(ErrorCode::InvalidGroup)));
    assert_eq!(add(&mut f, &[ids[0]; 9]), Err(Some(ErrorCode::InvalidGroup)));
    let ok = add(&mut f, &[ids[2], ids[0], ids[1], ids[0]]).unwrap();
    let mut want = vec![ids[0], ids[1], ids[2]];
    want.sort_unstable();
    for c in clients.iter_mut().take(3) {
        let (seq, n) = notice_of(c, group, ev::MEMBERS_ADDED);
        assert_eq!((seq, &n.users), (ok.seq, &want));
    }
    assert_eq!(f.group_get(group).unwrap().members, 4);
    assert_eq!(add(&mut f, &ids[0..3]), Err(Some(ErrorCode::AlreadyMember)));
    f.group_action(group, act::BLOCK, ids[3], 0, "").unwrap();
    assert_eq!(add(&mut f, &[ids[3]]), Err(Some(ErrorCode::BlockedFromGroup)));
    f.group_action(group, act::UNBLOCK, ids[3], 0, "").unwrap();
    let (_, x_id) = s.register("x");
    let (_, y_id) = s.register("y");
    assert_eq!(add(&mut f, &[ids[3], x_id, y_id]), Err(Some(ErrorCode::GroupFull)));
    assert!(add(&mut f, &[ids[3], x_id]).is_ok());
}

/// A message stored before its sender was muted (or removed) is acknowledged again on a resend
/// (with its original ids); a new message gets the refusal.
fn resend_after_mute_gets_original_ack(driver: &str) {
    let s = TestServer::start(driver, "");
    let (f_name, _) = s.register("founder");
    let mut f = s.login_on_shard(&f_name, 3, 0);
    let group = f.group_create(profile("resend", join_policy::OPEN, invite_policy::MANAGERS)).unwrap();
    let (m_name, m) = s.register("m");
    let mut mc = s.login_on_shard(&m_name, 3, 1);
    mc.group_action(group, act::JOIN, 0, 0, "").unwrap();
    let first = mc.group_send_wait(group, 41, b"before the mute").unwrap();
    f.group_action(group, act::MUTE, m, tim::shard::now_ms() + 60_000, "").unwrap();
    let again = mc.group_send_wait(group, 41, b"before the mute").unwrap();
    assert!(again.duplicate);
    assert_eq!((again.msg_id, again.seq), (first.msg_id, first.seq));
    refused(mc.group_send_wait(group, 42, b"new"), ErrorCode::Muted);
    f.group_action(group, act::KICK, m, 0, "").unwrap();
    let again = mc.group_send_wait(group, 41, b"before the mute").unwrap();
    assert!(again.duplicate && again.seq == first.seq);
    refused(mc.group_send_wait(group, 43, b"new"), ErrorCode::NotMember);
}

on_both_drivers!(
    add_members_at_once,
    resend_after_mute_gets_original_ack,
    bad_group_input,
    open_group_lifecycle,
    approval_and_invites,
    roles_mutes_blocks,
    caps_and_unknown_groups,
    group_streams,
    groups_evicted_and_reloaded,
);
