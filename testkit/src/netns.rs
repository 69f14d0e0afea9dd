//! Network namespaces that a test run, a bench or the demo owns, and the sweep that removes
//! those of runs that are gone.
//!
//! A namespace is named `<kind>-<owner>-<rest>`, where `<owner>` is `<pid hex>.<start hex>`:
//! the creating process's id and its start time (clock ticks after boot, field 22 of
//! `/proc/<pid>/stat`). A pid alone is not enough, since pids are reused: a namespace belongs
//! to a live run only while a process with that pid *and* that start time exists. The sweep
//! never touches a live run's namespaces. Deleting a namespace first kills every process
//! still inside it (they would keep the namespace alive after its name is gone), then
//! removes its `/run/netns` mount.

use std::sync::{Mutex, OnceLock};

use crate::cmd;

/// `ip netns add/del` are serialised within a process: concurrent ones race on
/// `/run/netns`'s mount propagation setup.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Who made a namespace or a temporary directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// Start time in clock ticks after boot; None in names made before it was recorded.
    pub start: Option<u64>,
}

impl Owner {
    /// This process.
    pub fn me() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start: start_time(pid),
        }
    }

    /// Whether the process that made the namespace still runs.
    pub fn is_alive(self) -> bool {
        match (self.start, start_time(self.pid)) {
            (_, None) => false,
            (Some(recorded), Some(now)) => recorded == now,
            // An old-style name: the pid alone decides.
            (None, Some(_)) => true,
        }
    }

    /// `<pid hex>.<start hex>`, as it appears in names.
    pub fn tag(self) -> String {
        match self.start {
            Some(start) => format!("{:x}.{start:x}", self.pid),
            None => format!("{:x}", self.pid),
        }
    }
}

/// This process's tag, computed once.
pub fn my_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| Owner::me().tag())
}

/// The start time of process `pid` (clock ticks after boot), or None when there is none: no
/// such process, or one that has exited and waits to be reaped (a zombie runs nothing).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after it follow
    // the last ')'. Field 3 is the state; field 22 (starttime) is the 20th after the name.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The owner of a name `<kind>-<owner>-…` of one of `kinds`, or None for any other name.
pub fn owner_of(name: &str, kinds: &[&str]) -> Option<Owner> {
    let mut parts = name.splitn(3, '-');
    let kind = parts.next()?;
    if !kinds.contains(&kind) {
        return None;
    }
    let tag = parts.next()?;
    parts.next()?;
    let (pid, start) = match tag.split_once('.') {
        Some((pid, start)) => (pid, Some(u64::from_str_radix(start, 16).ok()?)),
        None => (tag, None),
    };
    Some(Owner {
        pid: u32::from_str_radix(pid, 16).ok()?,
        start,
    })
}

/// `ip netns add name`; panics on failure.
pub fn add(name: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    cmd::run("ip", &["netns", "add", name]);
}

/// A namespace of this run's own, `egt-<owner>-<what>`, deleted (with whatever runs in it)
/// when dropped, also on panic.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// Creates `egt-<owner>-<what>` after sweeping what runs that are gone left behind.
    pub fn new(what: &str) -> Namespace {
        sweep_stale(&["egt"]);
        let name = format!("egt-{}-{what}", my_tag());
        add(&name);
        Namespace { name }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = delete(&self.name);
    }
}

/// Kills whatever runs inside namespace `name`, then deletes it. Never panics: a failure is
/// printed (cleanup goes on with the next thing) and returned.
pub fn delete(name: &str) -> Result<(), String> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    kill_processes_in(name);
    let out = cmd::try_run("ip", &["netns", "del", name], None);
    if out.status.success() {
        Ok(())
    } else {
        let why = format!(
            "ip netns del {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let _ = eprintln_safe(&format!("warning: {why}"));
        Err(why)
    }
}

/// SIGKILLs every process in namespace `name` and waits (briefly) for them to go.
fn kill_processes_in(name: &str) {
    let pids = |name: &str| -> Vec<i32> {
        let out = cmd::try_run("ip", &["netns", "pids", name], None);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    for _ in 0..50 {
        let inside = pids(name);
        if inside.is_empty() {
            return;
        }
        for pid in inside {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Removes the namespaces (and temporary directories) of `kinds` whose owner is gone; says
/// what it removed on stderr and returns it. Those of live owners are left alone.
pub fn sweep_stale(kinds: &[&str]) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            if owner_of(&name, kinds).is_some_and(|owner| !owner.is_alive()) {
                let _ = eprintln_safe(&format!(
                    "removing namespace {name}, left by a run that is gone"
                ));
                if delete(&name).is_ok() {
                    removed.push(format!("/run/netns/{name}"));
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && owner_of(&name, kinds).is_some_and(|owner| !owner.is_alive()) {
                let _ = eprintln_safe(&format!(
                    "removing directory {}, left by a run that is gone",
                    entry.path().display()
                ));
                if std::fs::remove_dir_all(entry.path()).is_ok() {
                    removed.push(entry.path().display().to_string());
                }
            }
        }
    }
    removed
}

/// Writes a line to stderr, returning the error instead of panicking (a closed terminal or
/// pipe must not stop a cleanup).
pub fn eprintln_safe(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    err.write_all(line.as_bytes())?;
    err.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner() {
        let me = Owner::me();
        assert!(me.start.is_some(), "this process has a start time");
        assert!(me.is_alive());
        let name = format!("egt-{}-3-cell", me.tag());
        assert_eq!(owner_of(&name, &["egt"]), Some(me));
        assert_eq!(owner_of(&name, &["egb"]), None, "another kind");
        assert_eq!(owner_of("egt-zz-1-cell", &["egt"]), None);
        assert_eq!(owner_of("other-1-2", &["egt"]), None);
        // Same pid, another start time: a reused pid, so the owner is gone.
        let reused = Owner {
            pid: me.pid,
            start: me.start.map(|s| s + 1),
        };
        assert!(!reused.is_alive());
        let old_style = owner_of(&format!("egt-{:x}-1-cell", me.pid), &["egt"]).expect("parses");
        assert_eq!(old_style.start, None);
        assert!(old_style.is_alive());
        // A pid that cannot exist (above pid_max's ceiling).
        assert!(
            !Owner {
                pid: 0x7fff_fffe,
                start: Some(1)
            }
            .is_alive()
        );
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        // This process's own stat line parses; a command name with ") (" in it is the case
        // the last-parenthesis rule exists for, checked on a synthetic line.
        assert!(start_time(std::process::id()).is_some());
        let stat = "42 (a) (b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 12345 19";
        let after = &stat[stat.rfind(')').expect("paren") + 1..];
        assert_eq!(after.split_whitespace().nth(19), Some("12345"));
    }
}
