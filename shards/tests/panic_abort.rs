//! A panic on a shard thread ends the whole process (with `abort_on_panic` installed, as the
//! `tim` binary does), instead of leaving the other shards running without it. The test runs
//! itself again as a child process, which starts the shards and lets one of them panic; the
//! parent checks how the child ended.

use std::{os::unix::process::ExitStatusExt, process::Command, time::Duration};

use tim_shards::{start, Driver, RuntimeConfig};

/// Set in the child's environment: run the shards instead of spawning a child.
const CHILD_ENV: &str = "TIM_SHARDS_PANIC_CHILD";
const PANIC_TEXT: &str = "shard 1 fails on purpose";
const SURVIVED: &str = "child survived the shard's panic";

/// One shard's panic aborts the process (SIGABRT) after the panic is reported, while another
/// shard and the main thread are still running.
#[test]
fn shard_panic_aborts_the_process() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return child();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "shard_panic_aborts_the_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the child ended with {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stderr.contains(PANIC_TEXT), "the panic was reported: {stderr}");
    assert!(stderr.contains("'shard-1'"), "the panicking thread was named: {stderr}");
    assert!(!stdout.contains(SURVIVED));
}

fn child() {
    tim_shards::abort_on_panic();
    let cfg = RuntimeConfig {
        shards: 2,
        driver: Driver::Auto,
        pin_cores: false,
        ring_entries: 64,
        mesh_capacity: 8,
        ..Default::default()
    };
    let _shards = start::<u32, _, _>(&cfg, |ctx| async move {
        if ctx.id == 1 {
            monoio::time::sleep(Duration::from_millis(50)).await;
            panic!("{PANIC_TEXT}");
        }
        loop {
            monoio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Only reached if the panic left the process running: the parent sees exit code 0.
    println!("{SURVIVED}");
    std::process::exit(0);
}
