//! Panics end the process: [`abort_on_panic`] installs a panic hook that reports the panic and
//! then aborts, whichever thread panicked.
//!
//! A panic is a broken invariant. Left to unwind, it would end only its own thread: a shard
//! thread's sockets, sessions, owned partitions and mesh queues would be gone while the other
//! shards kept running and kept sending to it, a half-dead process that looks alive to a
//! supervisor. Aborting makes the failure whole and visible; a supervisor (systemd
//! `Restart=on-failure`) restarts the process, and clients reconnect.
//!
//! Why a hook rather than `panic = "abort"` in the Cargo profiles: cargo builds tests with
//! unwinding whatever the profile says, so the server that the integration tests start would
//! behave differently from the one deployed; the hook is the same in every build, logs through
//! the logger (with the thread's name) before the abort, and can be tested.

use std::sync::Once;

static INSTALLED: Once = Once::new();

/// Install the hook (once per process; later calls do nothing). The previous hook (by default
/// the one that prints "thread '…' panicked at …" and, with `RUST_BACKTRACE`, a backtrace) runs
/// first; then the panic is logged at error level and the process aborts (SIGABRT, so a core
/// dump can be kept where the system keeps them).
pub fn abort_on_panic() {
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>");
            log::error!("thread '{name}' panicked ({info}); aborting the process");
            std::process::abort();
        }));
    });
}
