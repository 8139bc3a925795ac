//! The group messages' wire format, as docs/PROTOCOL.md gives it (5.13, 6.13, 7.3 and the group
//! examples of 5.7, 5.8 and 5.10): the archived size and alignment of every group type, the
//! field offsets its layout table shows, and every example frame encoded byte for byte as the
//! document's hex dump of it — which the test finds in the document itself — and decoded back.
//! Every other group frame the document shows whole (the captured exchange of 11.3) must be a
//! valid archive of the current layout too.

use std::mem::{align_of, offset_of, size_of};

use tim::{
    client::{decode_event, delivery, group_notice, Event},
    envelope::Submit,
    frame::{self, HEADER_BYTES},
    protocol::{
        self, group_action, group_event, kind, ArchivedGroupAction, ArchivedGroupAddMembers,
        ArchivedGroupCreate, ArchivedGroupDecision, ArchivedGroupInfo, ArchivedGroupJoinRequest,
        ArchivedGroupList, ArchivedGroupMember, ArchivedGroupMemberPage, ArchivedGroupMembers,
        ArchivedGroupNotice, ArchivedGroupOk, ArchivedGroupProfile, ArchivedGroupRef,
        ArchivedGroupRequestPage, ArchivedGroupUpdate, ArchivedJoinRequest, ArchivedMyGroups, GroupAction,
        GroupAddMembers, GroupCreate, GroupDecision, GroupInfo, GroupJoinRequest, GroupList, GroupMember,
        GroupMemberPage, GroupMembers, GroupNotice, GroupOk, GroupProfile, GroupRef, GroupRequestPage,
        GroupUpdate, JoinRequest, MyGroups, Stamp, GROUP_ID_MIN,
    },
};

/// The group id of the document's examples.
const G: u64 = GROUP_ID_MIN + 7;
/// The document's example times: 2026-01-01T00:00:00.123Z and a minute later (.000).
const TS: u64 = 1_767_225_600_123;
const MINUTE_LATER: u64 = 1_767_225_660_000;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// Every byte dump in the document's code blocks: a run of lines that start with hex bytes (after
/// an optional `p+N` offset); a line without leading hex bytes ends the run.
fn doc_dumps() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let mut dumps = Vec::new();
    let mut run: Vec<u8> = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        let mut tokens = line.split_whitespace().peekable();
        if tokens.peek().is_some_and(|t| t.starts_with("```")) {
            in_code = !in_code;
            dumps.push(std::mem::take(&mut run));
            continue;
        }
        if !in_code {
            continue;
        }
        if tokens.peek().is_some_and(|t| t.starts_with("p+")) {
            tokens.next();
        }
        let bytes: Vec<u8> =
            tokens.map_while(|t| if t.len() == 2 { u8::from_str_radix(t, 16).ok() } else { None }).collect();
        if bytes.is_empty() {
            dumps.push(std::mem::take(&mut run));
        } else {
            run.extend(bytes);
        }
    }
    dumps.retain(|d| !d.is_empty());
    dumps
}

/// `f` is `want` (hex, any spacing), and the document shows exactly these bytes in one dump.
#[track_caller]
fn check(dumps: &[Vec<u8>], what: &str, f: &[u8], want: &str) {
    let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(hex(f), want, "{what}: encoding");
    assert!(dumps.iter().any(|d| d == f), "{what}: no dump in docs/PROTOCOL.md shows\n{}", hex(f));
}

/// The payload of a whole frame.
fn payload(f: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
    &f[HEADER_BYTES..HEADER_BYTES + len]
}

fn decoded(f: &[u8]) -> Event {
    let k = u16::from_le_bytes([f[4], f[5]]);
    decode_event(k, payload(f)).expect("decodes")
}

fn profile_create() -> GroupProfile {
    GroupProfile {
        name: "tim fans".into(),
        topic: "all about tim".into(),
        avatar_url: String::new(),
        extra: vec![1, 2, 3],
        join_policy: protocol::join_policy::APPROVAL,
        invite_policy: protocol::invite_policy::MANAGERS,
    }
}

fn join_request() -> JoinRequest {
    JoinRequest { user_id: 2, note: "please let me in".into(), ts_ms: TS }
}

/// Sizes, alignments and field offsets of 5.13, 6.13 and 7.3's layout tables.
#[test]
fn group_layouts_match_the_protocol_document() {
    let layouts: [(&str, usize, usize, usize, usize); 19] = [
        ("GroupProfile", size_of::<ArchivedGroupProfile>(), align_of::<ArchivedGroupProfile>(), 36, 4),
        ("GroupCreate", size_of::<ArchivedGroupCreate>(), align_of::<ArchivedGroupCreate>(), 36, 4),
        ("GroupUpdate", size_of::<ArchivedGroupUpdate>(), align_of::<ArchivedGroupUpdate>(), 48, 8),
        ("GroupAction", size_of::<ArchivedGroupAction>(), align_of::<ArchivedGroupAction>(), 40, 8),
        ("GroupRef", size_of::<ArchivedGroupRef>(), align_of::<ArchivedGroupRef>(), 8, 8),
        (
            "GroupAddMembers",
            size_of::<ArchivedGroupAddMembers>(),
            align_of::<ArchivedGroupAddMembers>(),
            16,
            8,
        ),
        ("GroupMembers", size_of::<ArchivedGroupMembers>(), align_of::<ArchivedGroupMembers>(), 24, 8),
        ("MyGroups", size_of::<ArchivedMyGroups>(), align_of::<ArchivedMyGroups>(), 16, 8),
        ("GroupOk", size_of::<ArchivedGroupOk>(), align_of::<ArchivedGroupOk>(), 24, 8),
        ("GroupInfo", size_of::<ArchivedGroupInfo>(), align_of::<ArchivedGroupInfo>(), 80, 8),
        ("GroupMember", size_of::<ArchivedGroupMember>(), align_of::<ArchivedGroupMember>(), 24, 8),
        (
            "GroupMemberPage",
            size_of::<ArchivedGroupMemberPage>(),
            align_of::<ArchivedGroupMemberPage>(),
            24,
            8,
        ),
        ("GroupList", size_of::<ArchivedGroupList>(), align_of::<ArchivedGroupList>(), 12, 4),
        ("JoinRequest", size_of::<ArchivedJoinRequest>(), align_of::<ArchivedJoinRequest>(), 24, 8),
        (
            "GroupRequestPage",
            size_of::<ArchivedGroupRequestPage>(),
            align_of::<ArchivedGroupRequestPage>(),
            16,
            8,
        ),
        (
            "GroupJoinRequest",
            size_of::<ArchivedGroupJoinRequest>(),
            align_of::<ArchivedGroupJoinRequest>(),
            32,
            8,
        ),
        ("GroupDecision", size_of::<ArchivedGroupDecision>(), align_of::<ArchivedGroupDecision>(), 24, 8),
        ("GroupNotice", size_of::<ArchivedGroupNotice>(), align_of::<ArchivedGroupNotice>(), 40, 8),
        ("Stamp", Stamp::BYTES, 8, 48, 8),
    ];
    for (name, size, align, want_size, want_align) in layouts {
        assert_eq!((size, align), (want_size, want_align), "{name}: (size, align)");
    }

    let offsets: &[(&str, usize, usize)] = &[
        ("GroupProfile.topic", offset_of!(ArchivedGroupProfile, topic), 8),
        ("GroupProfile.avatar_url", offset_of!(ArchivedGroupProfile, avatar_url), 16),
        ("GroupProfile.extra", offset_of!(ArchivedGroupProfile, extra), 24),
        ("GroupProfile.join_policy", offset_of!(ArchivedGroupProfile, join_policy), 32),
        ("GroupProfile.invite_policy", offset_of!(ArchivedGroupProfile, invite_policy), 33),
        ("GroupUpdate.profile", offset_of!(ArchivedGroupUpdate, profile), 8),
        ("GroupAction.action", offset_of!(ArchivedGroupAction, action), 8),
        ("GroupAction.user_id", offset_of!(ArchivedGroupAction, user_id), 16),
        ("GroupAction.until_ms", offset_of!(ArchivedGroupAction, until_ms), 24),
        ("GroupAction.note", offset_of!(ArchivedGroupAction, note), 32),
        ("GroupAddMembers.user_ids", offset_of!(ArchivedGroupAddMembers, user_ids), 8),
        ("GroupMembers.after_user", offset_of!(ArchivedGroupMembers, after_user), 8),
        ("GroupMembers.limit", offset_of!(ArchivedGroupMembers, limit), 16),
        ("MyGroups.limit", offset_of!(ArchivedMyGroups, limit), 8),
        ("GroupOk.seq", offset_of!(ArchivedGroupOk, seq), 8),
        ("GroupOk.request_kind", offset_of!(ArchivedGroupOk, request_kind), 16),
        ("GroupOk.action", offset_of!(ArchivedGroupOk, action), 18),
        ("GroupInfo.profile", offset_of!(ArchivedGroupInfo, profile), 8),
        ("GroupInfo.founder", offset_of!(ArchivedGroupInfo, founder), 48),
        ("GroupInfo.members", offset_of!(ArchivedGroupInfo, members), 56),
        ("GroupInfo.muted_all_until_ms", offset_of!(ArchivedGroupInfo, muted_all_until_ms), 64),
        ("GroupInfo.my_role", offset_of!(ArchivedGroupInfo, my_role), 72),
        ("GroupMember.role", offset_of!(ArchivedGroupMember, role), 8),
        ("GroupMember.muted_until_ms", offset_of!(ArchivedGroupMember, muted_until_ms), 16),
        ("GroupMemberPage.members", offset_of!(ArchivedGroupMemberPage, members), 8),
        ("GroupMemberPage.more", offset_of!(ArchivedGroupMemberPage, more), 16),
        ("GroupList.more", offset_of!(ArchivedGroupList, more), 8),
        ("JoinRequest.note", offset_of!(ArchivedJoinRequest, note), 8),
        ("JoinRequest.ts_ms", offset_of!(ArchivedJoinRequest, ts_ms), 16),
        ("GroupRequestPage.requests", offset_of!(ArchivedGroupRequestPage, requests), 8),
        ("GroupJoinRequest.request", offset_of!(ArchivedGroupJoinRequest, request), 8),
        ("GroupDecision.approved", offset_of!(ArchivedGroupDecision, approved), 8),
        ("GroupDecision.by", offset_of!(ArchivedGroupDecision, by), 16),
        ("GroupNotice.actor", offset_of!(ArchivedGroupNotice, actor), 8),
        ("GroupNotice.target", offset_of!(ArchivedGroupNotice, target), 16),
        ("GroupNotice.until_ms", offset_of!(ArchivedGroupNotice, until_ms), 24),
        ("GroupNotice.users", offset_of!(ArchivedGroupNotice, users), 32),
    ];
    for &(name, got, want) in offsets {
        assert_eq!(got, want, "offset of {name}");
    }
}

/// The numbers of 4, 5.13 and 7.3: kinds, conversation kind, group id range, actions, events.
#[test]
fn group_numbers_match_the_protocol_document() {
    let kinds = [
        (kind::GROUP_CREATE, 30),
        (kind::GROUP_UPDATE, 31),
        (kind::GROUP_ACTION, 32),
        (kind::GROUP_GET, 33),
        (kind::GROUP_MEMBERS, 34),
        (kind::MY_GROUPS, 35),
        (kind::GROUP_REQUESTS, 36),
        (kind::GROUP_ADD_MEMBERS, 37),
        (kind::GROUP_OK, 140),
        (kind::GROUP_INFO, 141),
        (kind::GROUP_MEMBER_PAGE, 142),
        (kind::GROUP_LIST, 143),
        (kind::GROUP_REQUEST_PAGE, 144),
        (kind::GROUP_JOIN_REQUEST, 145),
        (kind::GROUP_DECISION, 146),
    ];
    for (k, want) in kinds {
        assert_eq!(k, want, "kind {}", kind::name(k));
    }
    assert_eq!(protocol::conv::GROUP, 2);
    assert_eq!(GROUP_ID_MIN, 0x4000_0000_0000_0000);
    assert!(protocol::is_group_id(0x7fff_ffff_ffff_ffff) && !protocol::is_group_id(1 << 63));
    assert!(!protocol::is_group_id(GROUP_ID_MIN - 1));
    let actions = [
        group_action::JOIN,
        group_action::LEAVE,
        group_action::INVITE,
        group_action::KICK,
        group_action::APPROVE,
        group_action::REJECT,
        group_action::ADD_MANAGER,
        group_action::REMOVE_MANAGER,
        group_action::TRANSFER,
        group_action::MUTE,
        group_action::MUTE_ALL,
        group_action::BLOCK,
        group_action::UNBLOCK,
        group_action::DISSOLVE,
    ];
    assert_eq!(actions, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    let events = [
        group_event::CREATED,
        group_event::JOINED,
        group_event::LEFT,
        group_event::KICKED,
        group_event::ADDED,
        group_event::MANAGER_ADDED,
        group_event::MANAGER_REMOVED,
        group_event::TRANSFERRED,
        group_event::MUTED,
        group_event::MUTED_ALL,
        group_event::PROFILE_CHANGED,
        group_event::BLOCKED,
        group_event::DISSOLVED,
        group_event::UNBLOCKED,
        group_event::MEMBERS_ADDED,
    ];
    assert_eq!(events, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    let roles = [protocol::group_role::MEMBER, protocol::group_role::MANAGER, protocol::group_role::FOUNDER];
    assert_eq!(roles, [0, 1, 2]);
    assert_eq!(tim::roles::group::NOT_A_MEMBER, 255);
    assert_eq!((protocol::join_policy::OPEN, protocol::join_policy::APPROVAL), (0, 1));
    assert_eq!((protocol::invite_policy::MANAGERS, protocol::invite_policy::MEMBERS), (0, 1));
}

/// The client → server examples of 5.7, 5.8, 5.10 and 5.13.
#[test]
fn group_requests_match_the_protocol_document() {
    let d = doc_dumps();
    let f = frame::encode(kind::GROUP_CREATE, &GroupCreate { profile: profile_create() });
    check(
        &d,
        "GroupCreate",
        &f,
        "34 00 00 00 1e 00 00 00
         61 6c 6c 20 61 62 6f 75  74 20 74 69 6d 01 02 03
         74 69 6d 20 66 61 6e 73  8d 00 00 00 e8 ff ff ff
         ff ff ff ff ff ff ff ff  e5 ff ff ff 03 00 00 00
         01 00 00 00 00 00 00 00",
    );
    let profile = GroupProfile {
        name: "tim fans".into(),
        topic: String::new(),
        avatar_url: "https://tim.example/a.png".into(),
        extra: Vec::new(),
        join_policy: protocol::join_policy::OPEN,
        invite_policy: protocol::invite_policy::MEMBERS,
    };
    let f = frame::encode(kind::GROUP_UPDATE, &GroupUpdate { group_id: G, profile });
    check(
        &d,
        "GroupUpdate",
        &f,
        "50 00 00 00 1f 00 00 00
         68 74 74 70 73 3a 2f 2f  74 69 6d 2e 65 78 61 6d
         70 6c 65 2f 61 2e 70 6e  67 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  74 69 6d 20 66 61 6e 73
         ff ff ff ff ff ff ff ff  99 00 00 00 c8 ff ff ff
         d9 ff ff ff 00 00 00 00  00 01 00 00 00 00 00 00",
    );
    let join = GroupAction {
        group_id: G,
        action: group_action::JOIN,
        user_id: 0,
        until_ms: 0,
        note: "please let me in".into(),
    };
    check(
        &d,
        "GroupAction JOIN",
        &frame::encode(kind::GROUP_ACTION, &join),
        "38 00 00 00 20 00 00 00
         70 6c 65 61 73 65 20 6c  65 74 20 6d 65 20 69 6e
         07 00 00 00 00 00 00 40  01 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
         90 00 00 00 d0 ff ff ff",
    );
    let mute = GroupAction {
        group_id: G,
        action: group_action::MUTE,
        user_id: 3,
        until_ms: MINUTE_LATER,
        note: String::new(),
    };
    check(
        &d,
        "GroupAction MUTE",
        &frame::encode(kind::GROUP_ACTION, &mute),
        "28 00 00 00 20 00 00 00
         07 00 00 00 00 00 00 40  0a 00 00 00 00 00 00 00
         03 00 00 00 00 00 00 00  60 92 db 76 9b 01 00 00
         ff ff ff ff ff ff ff ff",
    );
    check(
        &d,
        "GroupGet",
        &frame::encode(kind::GROUP_GET, &GroupRef { group_id: G }),
        "08 00 00 00 21 00 00 00  07 00 00 00 00 00 00 40",
    );
    // GroupRequests carries the same GroupRef; only the kind differs (the text says so).
    assert_eq!(
        hex(&frame::encode(kind::GROUP_REQUESTS, &GroupRef { group_id: G })),
        "08 00 00 00 24 00 00 00 07 00 00 00 00 00 00 40"
    );
    check(
        &d,
        "GroupMembers",
        &frame::encode(kind::GROUP_MEMBERS, &GroupMembers { group_id: G, after_user: 0, limit: 100 }),
        "18 00 00 00 22 00 00 00
         07 00 00 00 00 00 00 40  00 00 00 00 00 00 00 00
         64 00 00 00 00 00 00 00",
    );
    check(
        &d,
        "MyGroups",
        &frame::encode(kind::MY_GROUPS, &MyGroups { after_group: 0, limit: 0 }),
        "10 00 00 00 23 00 00 00
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00",
    );
    let add = GroupAddMembers { group_id: G, user_ids: vec![4, 5] };
    let f = frame::encode(kind::GROUP_ADD_MEMBERS, &add);
    check(
        &d,
        "GroupAddMembers",
        &f,
        "20 00 00 00 25 00 00 00
         04 00 00 00 00 00 00 00  05 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  e8 ff ff ff 02 00 00 00",
    );
    let mut aligned = rkyv::util::AlignedVec::<8>::new();
    aligned.extend_from_slice(payload(&f));
    let a = frame::access::<ArchivedGroupAddMembers>(&aligned).expect("valid");
    let users: Vec<u64> = a.user_ids.iter().map(|u| u.to_native()).collect();
    assert_eq!((a.group_id.to_native(), users), (G, vec![4, 5]));
    let send = protocol::Send {
        conv: protocol::conv::GROUP,
        flags: 0,
        burn_secs: 0,
        to: G,
        client_msg_id: 7,
        body: b"hi all".to_vec(),
    };
    check(
        &d,
        "Send to a group",
        &frame::encode(kind::SEND, &send),
        "28 00 00 00 06 00 00 00
         68 69 20 61 6c 6c 00 00  02 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  07 00 00 00 00 00 00 00
         e0 ff ff ff 06 00 00 00",
    );
    let ack = protocol::DeliveryAck { conv: protocol::conv::GROUP, peer: G, seq: 4 };
    check(
        &d,
        "DeliveryAck of a group",
        &frame::encode(kind::DELIVERY_ACK, &ack),
        "18 00 00 00 07 00 00 00
         02 00 00 00 00 00 00 00  07 00 00 00 00 00 00 40
         04 00 00 00 00 00 00 00",
    );
    let history =
        protocol::History { conv: protocol::conv::GROUP, peer: G, anchor_seq: 0, direction: 0, limit: 50 };
    check(
        &d,
        "History of a group",
        &frame::encode(kind::HISTORY, &history),
        "20 00 00 00 09 00 00 00
         02 00 00 00 00 00 00 00  07 00 00 00 00 00 00 40
         00 00 00 00 00 00 00 00  00 00 00 00 32 00 00 00",
    );
    // What the server reads back from the request archives.
    let p = payload(&frame::encode(kind::GROUP_ACTION, &join)).to_vec();
    let mut aligned = rkyv::util::AlignedVec::<8>::new();
    aligned.extend_from_slice(&p);
    let a = frame::access::<ArchivedGroupAction>(&aligned).expect("valid");
    assert_eq!((a.group_id.to_native(), a.action, a.note.as_str()), (G, 1, "please let me in"));
}

/// The server → client examples of 6.13.
#[test]
fn group_answers_match_the_protocol_document() {
    let d = doc_dumps();
    let ok = GroupOk { group_id: G, seq: 3, request_kind: kind::GROUP_ACTION, action: group_action::JOIN };
    let f = frame::encode(kind::GROUP_OK, &ok);
    check(
        &d,
        "GroupOk",
        &f,
        "18 00 00 00 8c 00 00 00
         07 00 00 00 00 00 00 40  03 00 00 00 00 00 00 00
         20 00 01 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupOk(ok));
    let ok = GroupOk { group_id: G, seq: 5, request_kind: kind::GROUP_ADD_MEMBERS, action: 0 };
    let f = frame::encode(kind::GROUP_OK, &ok);
    check(
        &d,
        "GroupOk of a GroupAddMembers",
        &f,
        "18 00 00 00 8c 00 00 00
         07 00 00 00 00 00 00 40  05 00 00 00 00 00 00 00
         25 00 00 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupOk(ok));

    let info = GroupInfo {
        group_id: G,
        profile: profile_create(),
        founder: 1,
        members: 3,
        muted_all_until_ms: 0,
        my_role: protocol::group_role::MEMBER,
    };
    let f = frame::encode(kind::GROUP_INFO, &info);
    check(
        &d,
        "GroupInfo",
        &f,
        "60 00 00 00 8d 00 00 00
         61 6c 6c 20 61 62 6f 75  74 20 74 69 6d 01 02 03
         07 00 00 00 00 00 00 40  74 69 6d 20 66 61 6e 73
         8d 00 00 00 e0 ff ff ff  ff ff ff ff ff ff ff ff
         dd ff ff ff 03 00 00 00  01 00 00 00 00 00 00 00
         01 00 00 00 00 00 00 00  03 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupInfo(info));

    let page = GroupMemberPage {
        group_id: G,
        members: vec![
            GroupMember { user_id: 1, role: protocol::group_role::FOUNDER, muted_until_ms: 0 },
            GroupMember { user_id: 3, role: protocol::group_role::MEMBER, muted_until_ms: MINUTE_LATER },
        ],
        more: false,
    };
    let f = frame::encode(kind::GROUP_MEMBER_PAGE, &page);
    check(
        &d,
        "GroupMemberPage",
        &f,
        "48 00 00 00 8e 00 00 00
         01 00 00 00 00 00 00 00  02 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00  03 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00  60 92 db 76 9b 01 00 00
         07 00 00 00 00 00 00 40  c8 ff ff ff 02 00 00 00
         00 00 00 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupMemberPage(page));

    let list = GroupList { groups: vec![G, G + 1], more: true };
    let f = frame::encode(kind::GROUP_LIST, &list);
    check(
        &d,
        "GroupList",
        &f,
        "1c 00 00 00 8f 00 00 00
         07 00 00 00 00 00 00 40  08 00 00 00 00 00 00 40
         f0 ff ff ff 02 00 00 00  01 00 00 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupList(list));
    let empty = GroupList { groups: Vec::new(), more: false };
    let f = frame::encode(kind::GROUP_LIST, &empty);
    check(
        &d,
        "empty GroupList",
        &f,
        "0c 00 00 00 8f 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupList(empty));

    let requests = GroupRequestPage { group_id: G, requests: vec![join_request()] };
    let f = frame::encode(kind::GROUP_REQUEST_PAGE, &requests);
    check(
        &d,
        "GroupRequestPage",
        &f,
        "38 00 00 00 90 00 00 00
         70 6c 65 61 73 65 20 6c  65 74 20 6d 65 20 69 6e
         02 00 00 00 00 00 00 00  90 00 00 00 e8 ff ff ff
         7b a8 da 76 9b 01 00 00  07 00 00 00 00 00 00 40
         e0 ff ff ff 01 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupRequestPage(requests));
    let none = GroupRequestPage { group_id: G, requests: Vec::new() };
    let f = frame::encode(kind::GROUP_REQUEST_PAGE, &none);
    check(
        &d,
        "empty GroupRequestPage",
        &f,
        "10 00 00 00 90 00 00 00  07 00 00 00 00 00 00 40  f8 ff ff ff 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupRequestPage(none));

    let push = GroupJoinRequest { group_id: G, request: join_request() };
    let f = frame::encode(kind::GROUP_JOIN_REQUEST, &push);
    check(
        &d,
        "GroupJoinRequest",
        &f,
        "30 00 00 00 91 00 00 00
         70 6c 65 61 73 65 20 6c  65 74 20 6d 65 20 69 6e
         07 00 00 00 00 00 00 40  02 00 00 00 00 00 00 00
         90 00 00 00 e0 ff ff ff  7b a8 da 76 9b 01 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupJoinRequest(push));

    let decision = GroupDecision { group_id: G, approved: true, by: 1 };
    let f = frame::encode(kind::GROUP_DECISION, &decision);
    check(
        &d,
        "GroupDecision",
        &f,
        "18 00 00 00 92 00 00 00
         07 00 00 00 00 00 00 40  01 00 00 00 00 00 00 00
         01 00 00 00 00 00 00 00",
    );
    assert_eq!(decoded(&f), Event::GroupDecision(decision));
}

/// A `Deliver` frame as the server builds it: the stamp written in place before the `Send`
/// archive.
fn deliver(send: &protocol::Send, stamp: Stamp) -> Vec<u8> {
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(send).expect("encodes");
    let mut f = Submit::blank_deliver(&archive);
    stamp.write(&mut f[HEADER_BYTES..]);
    f.to_vec()
}

/// 7.3's group message and notice, as delivered.
#[test]
fn group_deliveries_match_the_protocol_document() {
    let d = doc_dumps();
    let send = protocol::Send {
        conv: protocol::conv::GROUP,
        flags: 0,
        burn_secs: 0,
        to: G,
        client_msg_id: 7,
        body: b"hi all".to_vec(),
    };
    let stamp = Stamp {
        msg_id: 0x0aac_657c_ee00_2002,
        seq: 4,
        ts_ms: TS,
        from: 3,
        to: G,
        conv: protocol::conv::GROUP,
    };
    let f = deliver(&send, stamp);
    check(
        &d,
        "group message Deliver",
        &f,
        "58 00 00 00 6b 00 00 00
         02 20 00 ee 7c 65 ac 0a  04 00 00 00 00 00 00 00
         7b a8 da 76 9b 01 00 00  03 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  02 00 00 00 00 00 00 00
         68 69 20 61 6c 6c 00 00  02 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  07 00 00 00 00 00 00 00
         e0 ff ff ff 06 00 00 00",
    );
    let got = delivery(payload(&f)).expect("decodes");
    assert_eq!((got.stamp, got.client_msg_id, &got.body[..]), (stamp, 7, &b"hi all"[..]));
    assert_eq!(group_notice(&got), None, "a member's message is no notice");

    // A notice: the server's Send (client_msg_id 0) around the GroupNotice archive, from 0.
    let notice =
        GroupNotice { event: group_event::ADDED, actor: 1, target: 2, until_ms: 0, users: Vec::new() };
    let f = notice_deliver(&notice, 0x0aac_657c_ee00_2001, 3);
    check(
        &d,
        "notice Deliver",
        &f,
        "78 00 00 00 6b 00 00 00
         01 20 00 ee 7c 65 ac 0a  03 00 00 00 00 00 00 00
         7b a8 da 76 9b 01 00 00  00 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  02 00 00 00 00 00 00 00
         05 00 00 00 00 00 00 00  01 00 00 00 00 00 00 00
         02 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
         e0 ff ff ff 00 00 00 00  02 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  00 00 00 00 00 00 00 00
         c0 ff ff ff 28 00 00 00",
    );
    let got = delivery(payload(&f)).expect("decodes");
    assert_eq!((got.stamp.from, got.client_msg_id, got.body.len()), (0, 0, 40));
    assert_eq!(group_notice(&got), Some(notice));
    // The notice archive starts at payload offset 48: 8-aligned in a frame, readable in place.
    let body_at = HEADER_BYTES + Stamp::BYTES;
    assert_eq!(&f[body_at..body_at + 40], &got.body[..]);

    // MEMBERS_ADDED: the users added, rising, out-of-line before the notice's root.
    let notice = GroupNotice {
        event: group_event::MEMBERS_ADDED,
        actor: 1,
        target: 0,
        until_ms: 0,
        users: vec![4, 5],
    };
    let f = notice_deliver(&notice, 0x0aac_657c_ee00_2003, 5);
    check(
        &d,
        "MEMBERS_ADDED notice Deliver",
        &f,
        "88 00 00 00 6b 00 00 00
         03 20 00 ee 7c 65 ac 0a  05 00 00 00 00 00 00 00
         7b a8 da 76 9b 01 00 00  00 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  02 00 00 00 00 00 00 00
         04 00 00 00 00 00 00 00  05 00 00 00 00 00 00 00
         0f 00 00 00 00 00 00 00  01 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
         d0 ff ff ff 02 00 00 00  02 00 00 00 00 00 00 00
         07 00 00 00 00 00 00 40  00 00 00 00 00 00 00 00
         b0 ff ff ff 38 00 00 00",
    );
    let got = delivery(payload(&f)).expect("decodes");
    assert_eq!(got.body.len(), 56);
    assert_eq!(group_notice(&got), Some(notice));
}

/// A notice's `Deliver` frame, as the group owner builds it: a `Send` of sender 0 (client_msg_id
/// 0) whose body is the notice's archive, stamped `msg_id` and `seq` at the examples' time.
fn notice_deliver(notice: &GroupNotice, msg_id: u64, seq: u64) -> Vec<u8> {
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(notice).expect("encodes").to_vec();
    let send =
        protocol::Send { conv: protocol::conv::GROUP, flags: 0, burn_secs: 0, to: G, client_msg_id: 0, body };
    let stamp = Stamp { msg_id, seq, ts_ms: TS, from: 0, to: G, conv: protocol::conv::GROUP };
    deliver(&send, stamp)
}

/// An aligned copy of a request's payload, validated as the archive of its kind's type.
fn valid_request(k: u16, p: &[u8]) -> bool {
    fn ok<T>(p: &rkyv::util::AlignedVec<8>) -> bool
    where
        T: rkyv::Portable
            + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>,
    {
        frame::access::<T>(p).is_ok()
    }
    let mut a = rkyv::util::AlignedVec::<8>::new();
    a.extend_from_slice(p);
    match k {
        kind::GROUP_CREATE => ok::<ArchivedGroupCreate>(&a),
        kind::GROUP_UPDATE => ok::<ArchivedGroupUpdate>(&a),
        kind::GROUP_ACTION => ok::<ArchivedGroupAction>(&a),
        kind::GROUP_GET | kind::GROUP_REQUESTS => ok::<ArchivedGroupRef>(&a),
        kind::GROUP_MEMBERS => ok::<ArchivedGroupMembers>(&a),
        kind::MY_GROUPS => ok::<ArchivedMyGroups>(&a),
        kind::GROUP_ADD_MEMBERS => ok::<ArchivedGroupAddMembers>(&a),
        _ => unreachable!("not a group request"),
    }
}

/// Every whole group frame the document shows — the examples above and the frames of the
/// captured exchange (11.3) — is valid in the current layout: group requests (30–37) as their
/// archives, group answers and pushes (140–146) through the client's decoder, and every notice
/// (a `Deliver` or `HistoryMsg` of sender 0 in a group) as a `GroupNotice` whose archive is
/// exactly the notice's body.
#[test]
fn every_group_frame_of_the_document_is_current() {
    let (mut requests, mut answers, mut notices) = (0, 0, 0);
    for d in doc_dumps() {
        if d.len() < HEADER_BYTES {
            continue;
        }
        let len = u32::from_le_bytes(d[..4].try_into().unwrap()) as usize;
        if d.len() != HEADER_BYTES + frame::padded(len) {
            continue; // not one whole frame
        }
        let k = u16::from_le_bytes([d[4], d[5]]);
        let p = payload(&d);
        match k {
            kind::GROUP_CREATE..=kind::GROUP_ADD_MEMBERS => {
                assert!(
                    valid_request(k, p),
                    "a {} in the document is not valid:\n{}",
                    kind::name(k),
                    hex(&d)
                );
                requests += 1;
            }
            kind::GROUP_OK..=kind::GROUP_DECISION => {
                let e = decode_event(k, p);
                assert!(e.is_ok(), "a {} in the document does not decode:\n{}", kind::name(k), hex(&d));
                answers += 1;
            }
            kind::DELIVER | kind::HISTORY_MSG => {
                let got = delivery(p).expect("a Deliver of the document decodes");
                if got.stamp.from != 0 || got.stamp.conv != protocol::conv::GROUP {
                    continue;
                }
                let notice = group_notice(&got);
                assert!(notice.is_some(), "a notice in the document does not decode:\n{}", hex(&d));
                let again = rkyv::to_bytes::<rkyv::rancor::Error>(&notice.unwrap()).expect("encodes");
                assert_eq!(
                    &again[..],
                    &got.body[..],
                    "a notice in the document is not as the server writes it"
                );
                notices += 1;
            }
            _ => {}
        }
    }
    // 5.13's examples and 11.3's requests; 6.13's and 11.3's answers; 7.3's and 11.3's notices.
    assert!(
        requests >= 12 && answers >= 14 && notices >= 5,
        "{requests} requests, {answers} answers, {notices} notices"
    );
}
