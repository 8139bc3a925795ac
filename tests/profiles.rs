//! User profiles over real sockets on the embedded store: set, read in batches (unknown ids
//! left out, never-set ones empty), kept across a restart, and every refusal.

mod common;
use common::*;
use tim::protocol::{ErrorCode, UserProfile};

fn profiles(driver: &str) {
    let extra =
        "[limits]\nprofile_text_bytes_max = 32\nprofile_extra_bytes_max = 16\nprofiles_per_request_max = 3\n";
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir, driver, "backend = \"embedded\"", extra);
    let (ann, ann_id) = s.register("ann");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&ann, 3);
    let mine = UserProfile {
        nickname: "Ann ✓".into(),
        avatar_url: "https://tim.example/ann.png".into(),
        gender: 1,
        birthday: 19_900_231 - 100, // 1990-01-31
        area: "Lyon".into(),
        extra: vec![1, 2, 3],
    };
    let saved = a.profile_update(mine.clone()).unwrap();
    assert_eq!((saved.user_id, &saved.profile), (ann_id, &mine));
    assert!(saved.updated_ms > 0);
    let (mut b, _) = s.login(&bob, 3);
    let got = b.profile_get(&[bob_id, 999_999_999, ann_id]).unwrap();
    let seen: Vec<(u64, bool)> = got.iter().map(|e| (e.user_id, e.updated_ms == 0)).collect();
    assert_eq!(seen, [(bob_id, true), (ann_id, false)], "order kept, unknown left out, unset empty");
    assert_eq!(got[0].profile, UserProfile::default());
    assert_eq!(got[1].profile, mine);
    // Refusals.
    let long = "x".repeat(33);
    for (bad, what) in [
        (UserProfile { nickname: long.clone(), ..mine.clone() }, "nickname"),
        (UserProfile { avatar_url: long.clone(), ..mine.clone() }, "avatar_url"),
        (UserProfile { area: long, ..mine.clone() }, "area"),
        (UserProfile { extra: vec![0; 17], ..mine.clone() }, "extra"),
        (UserProfile { gender: 4, ..mine.clone() }, "gender"),
        (UserProfile { birthday: 19_901_301, ..mine.clone() }, "month 13"),
        (UserProfile { birthday: 19_900_100, ..mine.clone() }, "day 0"),
    ] {
        let e = b.profile_update(bad).expect_err(what);
        assert_eq!(e.code(), Some(ErrorCode::InvalidProfile), "{what}");
    }
    for ids in [&[][..], &[1, 2, 3, 4][..]] {
        let e = b.profile_get(ids).expect_err("bad id count");
        assert_eq!(e.code(), Some(ErrorCode::InvalidProfile), "{ids:?}");
    }
    let e = s.client().profile_get(&[ann_id]).expect_err("not logged in");
    assert_eq!(e.code(), Some(ErrorCode::NotLoggedIn));
    // A refused update changed nothing; a restart keeps the profile.
    let dir = s.stop_keep();
    let s = TestServer::start_in(dir, driver, "backend = \"embedded\"", extra);
    let (mut b, _) = s.login(&bob, 3);
    assert_eq!(b.profile_get(&[ann_id]).unwrap()[0].profile, mine);
}

on_both_drivers!(profiles);
