//! `--server-pid`: the server process's CPU time (user + system, summed over its threads) from
//! `/proc/PID/stat`, read at the start and at the end of the measured window; and the loadgen's
//! own ([`own_cpu`]), read at the same instants.

use std::time::Duration;

use anyhow::{bail, Context};

/// Reads one process's CPU time. Checked when built, so a bad PID fails before the run.
#[derive(Clone, Debug)]
pub struct ServerCpu {
    pub pid: u32,
    /// Clock ticks per second of `/proc/PID/stat` times (`sysconf(_SC_CLK_TCK)`).
    ticks_per_s: u64,
    /// The process's start time (in ticks since boot), to notice a PID reused by another process.
    start_time: u64,
}

/// The fields of `/proc/PID/stat` the loadgen uses, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatTimes {
    pub utime: u64,
    pub stime: u64,
    pub start_time: u64,
}

impl ServerCpu {
    pub fn open(pid: u32) -> anyhow::Result<ServerCpu> {
        if pid == 0 {
            bail!("--server-pid must be a process id, not 0");
        }
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            bail!("sysconf(_SC_CLK_TCK) failed");
        }
        let t = read_stat(pid).with_context(|| format!("--server-pid {pid}"))?;
        Ok(ServerCpu { pid, ticks_per_s: ticks as u64, start_time: t.start_time })
    }

    /// CPU time the process has used so far (utime + stime of all its threads).
    pub fn read(&self) -> anyhow::Result<Duration> {
        let t = read_stat(self.pid)?;
        if t.start_time != self.start_time {
            bail!("server process {} ended (its PID now belongs to another process)", self.pid);
        }
        let ticks = t.utime + t.stime;
        let nanos = ticks as u128 * 1_000_000_000 / self.ticks_per_s as u128;
        Ok(Duration::from_nanos(nanos as u64))
    }
}

/// This process's CPU time so far (user + system, all threads), to the microsecond.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(us(u.ru_utime) + us(u.ru_stime))
}

fn read_stat(pid: u32) -> anyhow::Result<StatTimes> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text).with_context(|| format!("unexpected contents of {path}: {text:?}"))
}

/// Parse `/proc/PID/stat`: `pid (comm) state ppid ... utime stime ... starttime ...`. The
/// command name may hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<StatTimes> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the comm: field 3 (state) is index 0, so field n is index n - 3.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(StatTimes { utime: field(14)?, stime: field(15)?, start_time: field(22)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A comm with spaces and parentheses does not shift the fields.
    #[test]
    fn stat_line() {
        let line = "4242 (tim (shard 0) x) S 1 4242 4242 0 -1 4194560 1234 0 5 0 \
                    317 42 0 0 20 0 3 0 98765 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 \
                    4096 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat(line), Some(StatTimes { utime: 317, stime: 42, start_time: 98765 }));
        let plain = "7 (tim) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(plain), Some(StatTimes { utime: 5, stime: 6, start_time: 100 }));
        assert_eq!(parse_stat("7 (tim) R 1 7"), None, "too short");
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    /// This process can read itself.
    #[test]
    fn own_process() {
        let me = ServerCpu::open(std::process::id()).unwrap();
        let a = me.read().unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(me.read().unwrap() >= a);
        assert!(ServerCpu::open(u32::MAX).is_err());
        assert!(ServerCpu::open(0).is_err());
    }
}
