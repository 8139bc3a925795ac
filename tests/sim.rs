//! The seeded simulation over a bounded number of seeds (see `tim::sim`).
//!
//! `TIM_SIM_SEEDS=N` runs N seeds (default 1000) of `TIM_SIM_STEPS` steps (default 3000);
//! `TIM_SIM_SEED=S` replays one seed, printing its report; `TIM_SIM_TRACE=N` keeps the last N
//! events for a failure's report, and `TIM_SIM_NOTE_DELIVERIES=1` adds every delivery to them.
//! The cases the roles once got wrong (`tim::sim::Strict`: `ambiguous`, `order`, `create`) are
//! simulated and checked by default; `TIM_SIM_STRICT=none` (or a comma-separated list of names
//! to keep) leaves them out.

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number")))
}

/// Every seed keeps every invariant; a failing seed is printed with the command that replays it.
#[test]
fn seeds_keep_invariants() {
    let steps = env_u64("TIM_SIM_STEPS").unwrap_or(3000) as usize;
    let seeds: Vec<u64> = match env_u64("TIM_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("TIM_SIM_SEEDS").unwrap_or(1000)).collect(),
    };
    let mut total = tim::sim::SimReport::default();
    for &seed in &seeds {
        // A role's own assertion (checked in release builds too) panics: report its seed as well.
        let outcome = std::panic::catch_unwind(|| tim::sim::run(seed, steps)).unwrap_or_else(|_| {
            panic!("seed {seed} panicked\nreplay with: TIM_SIM_SEED={seed} TIM_SIM_STEPS={steps} cargo test -p tim --test sim -- --nocapture")
        });
        match outcome {
            Ok(r) => {
                if seeds.len() == 1 {
                    println!("seed {seed}: {r:?}");
                }
                total.add(&r);
            }
            Err(f) => panic!(
                "{f}\nreplay with: TIM_SIM_SEED={seed} TIM_SIM_STEPS={steps} cargo test -p tim --test sim -- --nocapture"
            ),
        }
    }
    println!("{} seeds: {total:?}", seeds.len());
    // The seeds must reach the paths the invariants are about, or they prove nothing.
    if seeds.len() >= 50 {
        assert!(total.acks > 1000 && total.deliveries > 1000, "{total:?}");
        assert!(total.duplicate_acks > 0 && total.kicks > 0, "{total:?}");
        assert!(total.commit_timeouts > 0 && total.store_failures > 0, "{total:?}");
        assert!(total.evictions > 0, "{total:?}");
        assert!(total.ambiguous_commits > 0 && total.store_duplicates > 0, "{total:?}");
        assert!(total.backlog_full > 0, "{total:?}");
        // Groups: changes stored and refused, creations colliding, messages delivered, groups
        // dropped from memory and loaded again.
        assert!(total.group_notices > 100 && total.group_refusals > 100, "{total:?}");
        assert!(total.group_collisions > 0 && total.group_pushes > 0, "{total:?}");
        assert!(total.group_acks > 100 && total.group_deliveries > 1000, "{total:?}");
        assert!(total.group_stream_deliveries > 0, "{total:?}");
        assert!(total.group_evictions > 0 && total.group_loads > 100, "{total:?}");
    }
}
