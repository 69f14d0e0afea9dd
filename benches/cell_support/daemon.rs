//! The real `egress-guard run` binary inside the scratch cell namespace.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::usage::{ProcSample, proc_sample};

/// The binary under test, built by cargo with the bench profile.
pub const BIN: &str = env!("CARGO_BIN_EXE_egress-guard");

/// `[[rules]]` in the bench's configuration: `EGRESS_GUARD_BENCH_RULES` of them (default 0).
pub fn bench_rules() -> usize {
    std::env::var("EGRESS_GUARD_BENCH_RULES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The agent's configuration for the bench: the shipped defaults (10 s reconcile interval,
/// event-driven otherwise), `warn` logging so log I/O does not count, our store, and
/// [`bench_rules`] rules scoped to the bench's spaces.
pub fn config_toml(store: &Path) -> String {
    let base = format!(
        "enabled = true\n\
         overlay_network = \"10.255.0.0/16\"\n\
         allowed_networks = [\"10.0.0.0/8\"]\n\
         exempt_workloads = [\"staging\"]\n\
         metadata_store = {:?}\n\
         reconcile_interval = \"10s\"\n\
         \n[log]\nlevel = \"warn\"\nformat = \"text\"\n\
         \n[health]\nlisten = \"127.0.0.1:19951\"\n",
        store.display().to_string()
    );
    base + &crate::common::rules_toml(bench_rules())
}

pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    exited: bool,
}

impl Daemon {
    /// Starts the agent in namespace `ns`; `ip netns exec` execs, so the child is the agent.
    pub fn start(ns: &str, dir: &Path, n: usize, store: &Path) -> Daemon {
        Daemon::start_with(ns, dir, n, &config_toml(store))
    }

    /// Starts the agent with the configuration `toml`.
    pub fn start_with(ns: &str, dir: &Path, n: usize, toml: &str) -> Daemon {
        let config = dir.join(format!("daemon-{n}.toml"));
        std::fs::write(&config, toml).expect("write config");
        let log = dir.join(format!("daemon-{n}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log handle");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN, "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn egress-guard run");
        Daemon {
            child,
            log,
            exited: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sample(&mut self) -> ProcSample {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = true;
            panic!(
                "egress-guard exited ({status}); log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        proc_sample(self.pid()).expect("daemon /proc entry")
    }

    /// Polls `cond` every 10 ms until true, panicking after `timeout` or if the agent died.
    pub fn wait(&mut self, timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            self.sample();
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait for exit (the rules stay in place).
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if self.exited {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.exited = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}
