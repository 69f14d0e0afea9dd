//! The real `egress-guard` binary, run inside the cell namespace.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("EGRESS_GUARD_BIN") {
            return path;
        }
        // A test or bench executable lives in <target>/<profile>/deps/; cargo builds the
        // package's binary into <target>/<profile>/ before it runs them.
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe
            .parent()
            .and_then(std::path::Path::parent)
            .expect("<target>/<profile>/deps/<test>");
        let path = profile_dir.join("egress-guard");
        assert!(
            path.is_file(),
            "no agent binary at {} (set EGRESS_GUARD_BIN to its path)",
            path.display()
        );
        path.to_string_lossy().into_owned()
    })
}

/// The agent's configuration, as the tests vary it.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub enabled: bool,
    pub reconcile_interval: String,
    pub exempt_workloads: Vec<String>,
    pub allowed_networks: Vec<String>,
    pub health_port: u16,
    /// `mode`: "enforce" (the default) or "audit".
    pub mode: String,
    /// The body of a `[dns]` section (TOML lines), or None for no section (DNS untouched).
    pub dns: Option<String>,
    /// The body of a `[loggregator]` section, or None for no section (no app log lines).
    pub loggregator: Option<String>,
    /// `[[rules]]` entries (TOML, each block starting with `[[rules]]`), appended last.
    pub rules: Option<String>,
    /// Extra environment of the agent process, on top of the test's own (e.g. a `PATH` without
    /// `nft`). Not part of the TOML.
    pub env: Vec<(String, String)>,
}

impl AgentConfig {
    pub fn new(health_port: u16) -> AgentConfig {
        AgentConfig {
            enabled: true,
            reconcile_interval: "1s".into(),
            exempt_workloads: vec!["staging".into()],
            allowed_networks: vec!["10.0.0.0/8".into()],
            health_port,
            mode: "enforce".into(),
            dns: None,
            loggregator: None,
            rules: None,
            env: Vec::new(),
        }
    }

    /// The TOML text for a store at `store`.
    pub fn toml(&self, store: &Path) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "enabled = {}\n\
             overlay_network = \"10.255.0.0/16\"\n\
             allowed_networks = [{}]\n\
             exempt_workloads = [{}]\n\
             metadata_store = {:?}\n\
             reconcile_interval = {:?}\n\
             mode = {:?}\n\
             \n[log]\nlevel = \"debug\"\nformat = \"text\"\n\
             \n[health]\nlisten = \"127.0.0.1:{}\"\n",
            self.enabled,
            list(&self.allowed_networks),
            list(&self.exempt_workloads),
            store.display().to_string(),
            self.reconcile_interval,
            self.mode,
            self.health_port,
        ) + &self
            .dns
            .as_ref()
            .map(|body| format!("\n[dns]\n{body}\n"))
            .unwrap_or_default()
            + &self
                .loggregator
                .as_ref()
                .map(|body| format!("\n[loggregator]\n{body}\n"))
                .unwrap_or_default()
            + &self
                .rules
                .as_ref()
                .map(|rules| format!("\n{rules}\n"))
                .unwrap_or_default()
    }
}

/// `program` resolved on the test process's own PATH (as given if not found there).
fn on_test_path(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// A running (or stopped, or killed) agent process.
pub struct Agent {
    child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
    exited: bool,
}

impl Agent {
    /// Starts `egress-guard run --config <dir>/agent-<n>.toml` in namespace `ns`, logging to a
    /// file in `dir`.
    pub fn start(ns: &str, dir: &Path, n: usize, config: &AgentConfig, store: &Path) -> Agent {
        let config_path = dir.join(format!("agent-{n}.toml"));
        std::fs::write(&config_path, config.toml(store)).expect("write agent config");
        let log = dir.join(format!("agent-{n}.log"));
        let stderr = File::create(&log).expect("create agent log");
        let stdout = stderr.try_clone().expect("clone agent log handle");
        let config_str = config_path.to_str().expect("temp path is UTF-8");
        // `ip netns exec` execs the command without forking, so the child's pid is the agent's.
        // `ip` is found on the test's PATH: a PATH in `config.env` is the agent's, not ours.
        let mut command = Command::new(on_test_path("ip"));
        command.envs(config.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe syscall (prctl). If the test process dies (even by SIGKILL), the
        // kernel kills the agent instead of leaving it running in a deleted namespace.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .args(["netns", "exec", ns, bin(), "run", "--config", config_str])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Signals from the terminal go to the test or demo, which stops the agent itself.
            .process_group(0)
            .spawn()
            .expect("spawn ip netns exec egress-guard run");
        Agent {
            child,
            log,
            config: config_path,
            exited: false,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill -{sig} agent: {e}"));
    }

    /// SIGSTOP: the agent is frozen and reacts to nothing.
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }

    /// SIGTERM and wait (bounded) for exit; returns the exit status text.
    pub fn terminate(&mut self) -> String {
        self.stop_with(Signal::SIGTERM)
    }

    /// Sends `sig` (SIGTERM, SIGINT) and waits (bounded) for exit; returns the exit status.
    pub fn stop_with(&mut self, sig: Signal) -> String {
        self.signal(sig);
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = true;
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        panic!(
            "agent did not exit within 5s of {sig}\n{}",
            self.log_tail(40)
        );
    }

    /// Sends `sig` and waits at most `bound` for the agent to exit: the time it took and the
    /// exit status, or None if it is still running after `bound` (it is then killed).
    pub fn stop_within(&mut self, sig: Signal, bound: Duration) -> Option<(Duration, String)> {
        let sent = std::time::Instant::now();
        self.signal(sig);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = true;
                return Some((sent.elapsed(), status.to_string()));
            }
            if sent.elapsed() > bound {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// None while running; the exit status once it has exited.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = true;
                Some(status.to_string())
            }
            _ => None,
        }
    }

    /// Panics (with the log) if the agent has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!(
                "the agent exited unexpectedly ({status})\n{}",
                self.log_tail(60)
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the agent's log, framed for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- agent log {} (last {} of {} lines) ---\n{}\n--- end agent log ---",
            self.log.display(),
            all.len() - from,
            all.len(),
            all[from..].join("\n")
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // EGT_AGENT_LOG=1 prints the whole log of every agent (with --nocapture).
        // Best effort: stderr may be a closed terminal by now, and nothing may stop the kill.
        if std::env::var_os("EGT_AGENT_LOG").is_some() {
            let _ = crate::netns::eprintln_safe(&self.log_tail(usize::MAX));
        } else if std::thread::panicking() {
            let _ = crate::netns::eprintln_safe(&self.log_tail(80));
        }
        self.kill9();
    }
}
