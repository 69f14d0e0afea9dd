//! Running the `nft` binary: apply one JSON transaction, list the agent's table.
//!
//! nft is run as a child process (`nft -j -f -`) rather than through libnftables so that the
//! binary is configurable (BOSH ships its own build) and nft's own error text reaches our error
//! message and log verbatim.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::RejectCounters;
use super::render::{Batch, FAMILY, TABLE};

/// An nft run that takes longer than this is killed and reported: a hung nft must not stall
/// the reconcile loop forever (liveness would then report it).
pub const NFT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft binary {program} not found (set `nft` in the config to its path)")]
    NotFound { program: PathBuf },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} {action} timed out after {NFT_TIMEOUT:?}")]
    Timeout {
        program: PathBuf,
        action: &'static str,
    },
    #[error("{program} {action} failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        action: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{program} {action} printed output that is not JSON: {message}")]
    BadOutput {
        program: PathBuf,
        action: &'static str,
        message: String,
    },
}

/// PIDs of the agent's recent `nft` transactions, so that the nf_tables events they cause
/// (each commit ends with a NEWGEN message naming the committing PID) do not wake the loop
/// as if someone else had changed the ruleset.
#[derive(Debug, Default)]
pub struct OwnWrites {
    recent: Mutex<VecDeque<u32>>,
}

/// How many recent PIDs to remember: far more than transactions in flight at once, far fewer
/// than it takes for the kernel to hand the same PID to another process.
const OWN_PIDS_KEPT: usize = 16;

impl OwnWrites {
    fn record(&self, pid: u32) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == OWN_PIDS_KEPT {
            recent.pop_front();
        }
        recent.push_back(pid);
    }

    /// Whether `pid` ran one of the agent's own transactions.
    pub fn contains(&self, pid: u32) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.contains(&pid)
    }
}

/// The nft command line tool.
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
    own_writes: Arc<OwnWrites>,
}

impl Nft {
    pub fn new(program: impl Into<PathBuf>) -> Nft {
        Nft {
            program: program.into(),
            own_writes: Arc::default(),
        }
    }

    /// The PIDs of this agent's own transactions, for the event watcher.
    pub fn own_writes(&self) -> Arc<OwnWrites> {
        self.own_writes.clone()
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Applies `batch` as one atomic transaction. An empty batch is not sent.
    pub async fn apply(&self, batch: &Batch) -> Result<(), NftError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.run("apply", &["-j", "-f", "-"], Some(batch.to_json()))
            .await
            .map(|_| ())
    }

    /// Lists the agent's table as JSON, or None when it does not exist.
    pub async fn list_table(&self) -> Result<Option<Value>, NftError> {
        match self
            .run("list table", &["-j", "list", "table", FAMILY, TABLE], None)
            .await
        {
            Ok(stdout) => {
                serde_json::from_slice(&stdout)
                    .map(Some)
                    .map_err(|err| NftError::BadOutput {
                        program: self.program.clone(),
                        action: "list table",
                        message: err.to_string(),
                    })
            }
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// The reject counters' current values, or None when the table does not exist.
    pub async fn list_counters(&self) -> Result<Option<RejectCounters>, NftError> {
        let args = ["-j", "list", "counters", "table", FAMILY, TABLE];
        match self.run("list counters", &args, None).await {
            Ok(stdout) => {
                let listing: Value =
                    serde_json::from_slice(&stdout).map_err(|err| NftError::BadOutput {
                        program: self.program.clone(),
                        action: "list counters",
                        message: err.to_string(),
                    })?;
                Ok(Some(super::observe::parse_counters(&listing)))
            }
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    async fn run(
        &self,
        action: &'static str,
        args: &[&str],
        stdin: Option<String>,
    ) -> Result<Vec<u8>, NftError> {
        // Only transactions (input on stdin) change the ruleset and produce a NEWGEN event.
        let record_pid = stdin.is_some();
        let mut command = Command::new(&self.program);
        command
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut attempt = 0;
        let mut child = loop {
            match command.spawn() {
                Ok(child) => break child,
                // ETXTBSY: the binary was just written and another thread's fork still holds
                // the write descriptor until its exec; it clears within milliseconds.
                Err(err) if err.raw_os_error() == Some(nix::libc::ETXTBSY) && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(NftError::NotFound {
                        program: self.program.clone(),
                    });
                }
                Err(source) => {
                    return Err(NftError::Spawn {
                        program: self.program.clone(),
                        source,
                    });
                }
            }
        };
        if record_pid && let Some(pid) = child.id() {
            self.own_writes.record(pid);
        }
        let pipe = child.stdin.take();
        let exchange = async move {
            if let (Some(input), Some(mut pipe)) = (stdin, pipe) {
                // A write error (nft exited early) surfaces as nft's own failure below.
                let _ = pipe.write_all(input.as_bytes()).await;
                drop(pipe);
            }
            child.wait_with_output().await
        };
        // One deadline for writing the batch and for nft's answer: an nft that stops reading
        // must not hang the loop either. On timeout the child is dropped and killed.
        let output = tokio::time::timeout(NFT_TIMEOUT, exchange)
            .await
            .map_err(|_| NftError::Timeout {
                program: self.program.clone(),
                action,
            })?
            .map_err(|source| NftError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(NftError::Failed {
            program: self.program.clone(),
            action,
            status: output.status.to_string(),
            stderr: condense(&stderr),
        })
    }
}

/// nft's error text, on one line and bounded, for logs and health output.
fn condense(stderr: &str) -> String {
    const LIMIT: usize = 2000;
    let joined = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if joined.len() <= LIMIT {
        joined
    } else {
        let mut cut = LIMIT;
        while !joined.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &joined[..cut])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in nft: a shell script, so these tests need no root and no nft.
    fn fake_nft(dir: &Path, script: &str) -> Nft {
        let path = dir.join("nft");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Nft::new(path)
    }

    #[tokio::test]
    async fn missing_binary_is_named() {
        let nft = Nft::new("/nonexistent/nft");
        let err = nft.list_table().await.expect_err("no binary");
        assert!(matches!(err, NftError::NotFound { .. }));
        assert!(err.to_string().contains("/nonexistent/nft"), "{err}");
    }

    #[tokio::test]
    async fn absent_table_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nft = fake_nft(
            dir.path(),
            "echo 'Error: No such file or directory' >&2; exit 1",
        );
        assert_eq!(
            nft.list_table().await.expect("absent is not an error"),
            None
        );
    }

    #[tokio::test]
    async fn nft_error_text_reaches_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nft = fake_nft(
            dir.path(),
            "cat >/dev/null; echo 'Error: Could not process rule: Operation not permitted' >&2; exit 1",
        );
        let batch = crate::dataplane::render::delete_table();
        let err = nft.apply(&batch).await.expect_err("fails");
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
    }

    #[tokio::test]
    async fn apply_sends_the_batch_on_stdin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdin.json");
        let nft = fake_nft(
            dir.path(),
            &format!("cat > {}; echo \"$@\" >> {0}", out.display()),
        );
        let batch = crate::dataplane::render::delete_table();
        nft.apply(&batch).await.expect("applies");
        let written = std::fs::read_to_string(&out).expect("captured");
        assert!(written.starts_with(&batch.to_json()), "{written}");
        assert!(written.trim_end().ends_with("-j -f -"), "{written}");
    }

    #[tokio::test]
    async fn empty_batch_runs_nothing() {
        let nft = Nft::new("/nonexistent/nft");
        nft.apply(&Batch::default()).await.expect("nothing to run");
    }

    #[tokio::test]
    async fn non_json_output_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nft = fake_nft(dir.path(), "echo 'table inet egress_guard {'");
        let err = nft.list_table().await.expect_err("not JSON");
        assert!(matches!(err, NftError::BadOutput { .. }), "{err}");
    }

    #[test]
    fn condense_joins_and_bounds() {
        assert_eq!(
            condense("Error: x\n  rule\n   ^^^\n"),
            "Error: x |   rule |    ^^^"
        );
        assert!(condense(&"é".repeat(5000)).len() <= 2000 + '…'.len_utf8());
    }
}
