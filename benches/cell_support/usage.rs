//! CPU and memory accounting: getrusage for this process (+ its reaped children: the agent
//! used to run nft; it runs no child now, so they add nothing), /proc for the daemon.

use std::time::Duration;

use nix::libc;

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass; RUSAGE_SELF and
    // RUSAGE_CHILDREN are always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU of this process (all threads) plus its terminated, reaped children.
pub fn cpu_self_and_children() -> Duration {
    rusage(libc::RUSAGE_SELF) + rusage(libc::RUSAGE_CHILDREN)
}

/// A point-in-time reading of a process from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// utime + stime + cutime + cstime (the daemon's own CPU; it no longer runs nft children).
    pub cpu: Duration,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size so far, KiB.
    pub hwm_kib: u64,
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100).max(1)
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; None if the process is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3; utime..cstime are 14..17.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = tick(14)? + tick(15)? + tick(16)? + tick(17)?;
    let hz = clock_ticks();
    let cpu =
        Duration::from_secs(ticks / hz) + Duration::from_nanos(ticks % hz * 1_000_000_000 / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}
