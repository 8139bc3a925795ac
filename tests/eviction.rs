//! Bounded conversation state: the per-shard cap evicts the least recently used conversation
//! instead of refusing service, an evicted conversation comes back with its counter (and, with a
//! durable store, its resend dedup), and each sender has its own room in a conversation's dedup.

mod common;
use common::*;
use tim::placement::{conv_shard, direct_key};

const CAP_ONE: &str = "[limits]\nconversations_per_shard_max = 1\n";

/// Registers `alice` and enough peers to find two whose conversations with her live on the same
/// shard (of the test server's 2).
/// Returns alice's name and the two peers' names and ids.
fn alice_and_two_peers_on_one_shard(s: &TestServer) -> (String, (String, u64), (String, u64)) {
    let (alice, alice_id) = s.register("alice");
    let mut by_shard: [Vec<(String, u64)>; 2] = [Vec::new(), Vec::new()];
    loop {
        let (name, id) = s.register("peer");
        let shard = conv_shard(direct_key(alice_id, id), 2);
        by_shard[shard].push((name, id));
        if by_shard[shard].len() == 2 {
            let p2 = by_shard[shard].pop().unwrap();
            return (alice, by_shard[shard].pop().unwrap(), p2);
        }
    }
}

/// With room for one conversation per shard, a second conversation on the shard evicts the first
/// instead of being refused with Busy, and the first, used again, continues its sequence.
#[test]
fn cap_evicts_instead_of_refusing_memory() {
    let s = TestServer::start("io_uring", CAP_ONE);
    let (alice, (p1_name, p1), (_, p2)) = alice_and_two_peers_on_one_shard(&s);
    let (mut a, _) = s.login(&alice, 3);
    assert_eq!(a.send_wait(p1, 1, b"one").unwrap().seq, 1);
    // Served (without a store to reload from, it starts above the evicted conversation's seq).
    a.send_wait(p2, 2, b"two").expect("a second conversation on a full shard is served");
    // p1's conversation was evicted; its numbers keep rising.
    let again = a.send_wait(p1, 3, b"three").unwrap();
    assert!(again.seq > 1, "seq went back to {}", again.seq);
    // And it is delivered as ever.
    let d = {
        let (mut p, _) = s.login(&p1_name, 3);
        p.set_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        a.send_wait(p1, 4, b"four").unwrap();
        p.next_delivery().unwrap()
    };
    assert_eq!(d.body, b"four");
}

/// With the embedded store an evicted conversation is reloaded: its counter continues and a
/// resend of a message sent before the eviction gets the original ack.
#[test]
fn evicted_conversation_reloads_counter_and_dedup_embedded() {
    let s = TestServer::start_with_store("io_uring", "backend = \"embedded\"", CAP_ONE);
    let (alice, (_, p1), (_, p2)) = alice_and_two_peers_on_one_shard(&s);
    let (mut a, _) = s.login(&alice, 3);
    let first = a.send_wait(p1, 1, b"one").unwrap();
    assert_eq!(first.seq, 1);
    assert_eq!(a.send_wait(p2, 2, b"two").unwrap().seq, 1);
    // Back to p1 (evicted by p2's conversation): the resend is recognised from the store...
    let resend = a.send_wait(p1, 1, b"one").unwrap();
    assert!(resend.duplicate, "a resend after the eviction is answered from the reloaded dedup");
    assert_eq!((resend.seq, resend.msg_id), (first.seq, first.msg_id));
    // ...and a new message continues the stored sequence.
    assert_eq!(a.send_wait(p1, 3, b"three").unwrap().seq, 2);
}

/// A peer's sends cannot push my remembered sends out of a conversation's resend dedup.
#[test]
fn peer_cannot_push_my_sends_out_of_dedup() {
    let s = TestServer::start("io_uring", "[limits]\ndedup_per_conversation_max = 4\n");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut a, _) = s.login(&alice, 3);
    let (mut b, _) = s.login(&bob, 3);
    let mine = a.send_wait(bob_id, 1, b"mine").unwrap();
    for i in 1..=20 {
        b.send_wait(alice_id, i, b"flood").unwrap();
    }
    let again = a.send_wait(bob_id, 1, b"mine").unwrap();
    assert!(again.duplicate, "my send was forgotten because of the peer's");
    assert_eq!(again.seq, mine.seq);
}
