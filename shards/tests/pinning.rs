//! Shards are pinned within the CPUs the process may use (as `taskset -c N` restricts them),
//! not to CPUs 0, 1, … regardless.

use std::sync::{Arc, Mutex};

use tim_shards::{start, Driver, RuntimeConfig};

/// The calling thread's allowed CPUs (its affinity mask).
fn my_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn restrict_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

/// With the process restricted to its last allowed CPU (like `taskset -c LAST`), every pinned
/// shard runs on that CPU; none is pinned outside the set.
#[test]
fn shards_pin_within_the_allowed_set() {
    let all = my_cpus();
    assert!(!all.is_empty(), "the allowed CPUs can be read");
    let last = *all.last().unwrap();
    // Shards started from this thread inherit its mask, as they would the process's.
    restrict_to(last);
    assert_eq!(my_cpus(), vec![last]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let cfg = RuntimeConfig {
        shards: 2,
        driver: Driver::Auto,
        pin_cores: true,
        ring_entries: 64,
        mesh_capacity: 8,
        ..Default::default()
    };
    let shards = start::<u32, _, _>(&cfg, move |ctx| {
        let seen = s2.clone();
        async move {
            seen.lock().unwrap().push((ctx.id, my_cpus()));
        }
    })
    .unwrap();
    shards.join().unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, vec![(0, vec![last]), (1, vec![last])], "allowed CPUs: {all:?}");
}
