//! Command line: clap definitions and the commands' implementations.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::dataplane::{AgentTable, render};
use crate::inventory::{Inventory, KernelReader, KernelView, store};
use crate::policy;
use crate::status::{SharedStatus, Status};

/// Default config location on a plain (non-BOSH) host.
pub const DEFAULT_CONFIG: &str = "/etc/egress-guard/egress-guard.toml";

#[derive(Debug, Parser)]
#[command(
    name = "egress-guard",
    version,
    about = "Keeps app containers on a Cloud Foundry cell from reaching the internet",
    long_about = "Keeps running app and task containers on a Cloud Foundry isolation-segment cell \
                  from reaching destinations outside the VPC, with two nftables tables of its own, \
                  while staging containers keep their internet access."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (as root, on the cell). Rules stay in place when it stops.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the nftables ruleset the agent would install (dry run, no root needed).
    Render {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Metadata store to use instead of the config's `metadata_store`.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Print the tables as `nft -j list` prints them (without handles and counter values)
        /// instead of nft syntax.
        #[arg(long)]
        json: bool,
    },
    /// Summarise a running agent: readiness and every container's verdict.
    /// Exit code 0 when ready, 1 when not ready, 3 when the agent cannot be reached.
    Status {
        /// The agent's health endpoint (`[health] listen`).
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
        /// Print the raw JSON documents.
        #[arg(long)]
        json: bool,
    },
    /// Blocked attempts (rejected, or would be rejected in audit mode) by app, space and org:
    /// the most recent first. Exit code 0, or 3 when the agent cannot be reached.
    Blocked {
        /// Only this app (its guid, `app_id` in silk's metadata).
        #[arg(long)]
        app: Option<String>,
        /// Only this space (guid).
        #[arg(long)]
        space: Option<String>,
        /// Only this org (guid).
        #[arg(long)]
        org: Option<String>,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Explain why a container (by overlay IP or Garden handle) is restricted or exempt.
    /// Exit code 0 when the agent knows it, 1 when not, 3 when the agent cannot be reached.
    Explain {
        /// Container IP or handle (a unique handle prefix is enough).
        container: String,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
        #[arg(long)]
        json: bool,
    },
}

/// Default health endpoint address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9851";

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => with_config(&config, run),
        Command::CheckConfig { config } => with_config(&config, |config| {
            print!("{}", config.to_toml());
            Ok(())
        }),
        Command::Render {
            config,
            store,
            json,
        } => with_config(&config, |config| render(config, store.as_deref(), json)),
        Command::Status { addr, json } => crate::client::status(&addr, json),
        Command::Explain {
            container,
            addr,
            json,
        } => crate::client::explain(&addr, &container, json),
        Command::Blocked {
            app,
            space,
            org,
            addr,
            json,
        } => crate::client::blocked(
            &addr,
            &crate::blocked::Filter {
                app_id: app,
                space_id: space,
                org_id: org,
            },
            json,
        ),
    }
}

fn with_config(path: &Path, command: impl FnOnce(Config) -> anyhow::Result<()>) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("egress-guard: {err}");
            return ExitCode::from(2);
        }
    };
    match command(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egress-guard: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the work is a short pass at a time; blocking reads go to spawn_blocking.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging(config: &Config) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    // `target=level` directives: an env-filter's regular expressions would bring a regex engine,
    // a sixth of the binary, resident in every cell's memory.
    let filter = std::env::var("EGRESS_GUARD_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .or_else(|| config.log.level.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    // Colour only on a terminal: bpm and systemd write stderr to files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log.format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}

/// Longest the agent takes to exit after SIGTERM or SIGINT, whatever it is doing: past this a
/// watchdog ends the process (the rules stay in place either way).
pub const STOP_BOUND: Duration = Duration::from_millis(1500);
/// How long a pass in progress may take to finish after the stop signal before the loop is
/// abandoned (a batch already sent is atomic in the kernel whether or not its answer is read).
const STOP_GRACE: Duration = Duration::from_millis(700);
/// How long the runtime's shutdown waits for blocking tasks (a store read in progress) before
/// leaving them behind; process exit ends them.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(300);

fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    for warning in &config.obsolete {
        tracing::warn!("{warning}");
    }
    limit_allocator_retention();
    // Before the runtime: every thread created later inherits the blocked signals.
    let stop = stop_on_signals()?;
    let mut initial = Status::new(config.enabled, config.reconcile_interval);
    initial.mode = config.mode;
    let status = SharedStatus::new(initial);
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let blocked = crate::blocked::SharedBlocked::new(config.mode);
    let dns = start_dns_filter(&config, &metrics, &blocked);
    let endpoint = crate::health::Endpoint {
        status: status.clone(),
        metrics: metrics.clone(),
        started: std::time::Instant::now(),
        counters: Some(crate::health::CounterReader::new()),
        blocked: blocked.clone(),
        dns,
    };
    let runtime = runtime()?;
    let result = runtime.block_on(async move {
        let health = tokio::spawn(crate::health::serve(config.health.listen, endpoint));
        let agent = crate::reconcile::run(config, status, metrics, blocked, stopped(stop.clone()));
        let result = tokio::select! {
            result = agent => result,
            () = async { stopped(stop).await; tokio::time::sleep(STOP_GRACE).await } => {
                tracing::warn!(grace = ?STOP_GRACE,
                    "the reconcile pass did not finish after the stop signal; abandoning it");
                Ok(())
            }
        };
        health.abort();
        result
    });
    // Dropping a runtime waits for its blocking tasks without a bound; this does not.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// Starts the DNS filter on its own thread when `[dns]` (and enforcement) is enabled; its
/// health for the endpoint. A filter that cannot start leaves the redirect in place (restricted
/// containers get no DNS answers: fail closed) and says so in `/readyz`.
fn start_dns_filter(
    config: &Config,
    metrics: &crate::metrics::SharedMetrics,
    blocked: &crate::blocked::SharedBlocked,
) -> Option<crate::dns::SharedDnsHealth> {
    if !(config.enabled && config.dns.enabled) {
        return None;
    }
    let health = std::sync::Arc::new(crate::dns::DnsHealth::new(config, Some(metrics.clone())));
    // Refused names go to the log and to /blocked.
    let sink = std::sync::Arc::new(crate::dns::Sinks(vec![
        std::sync::Arc::new(crate::dns::LogRefusals::default()),
        std::sync::Arc::new(blocked.clone()),
    ]));
    if let Err(err) = crate::dns::spawn(config, health.clone(), sink) {
        tracing::error!(error = %err, "cannot start the DNS filter's thread");
        health.listening(Err(format!("no thread: {err}")));
    }
    Some(health)
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread started after it) and
/// starts a thread that waits for them: the first one sets the returned flag, and if the
/// process is still there [`STOP_BOUND`] later, the thread ends it. The watchdog lives outside
/// the runtime so that nothing the runtime does (a stuck pass, a blocking task, a runtime
/// thread that never yields) can keep the agent from stopping. Child processes do not inherit
/// the blocked mask: std clears it before `exec`.
fn stop_on_signals() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("cannot block SIGTERM and SIGINT for the signal thread")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = loop {
                match signals.wait() {
                    Ok(signal) => break signal,
                    Err(err) => tracing::warn!(error = %err, "sigwait failed; waiting again"),
                }
            };
            tracing::info!(signal = %signal, "stop signal received; rules stay in place");
            let _ = tx.send(true);
            std::thread::sleep(STOP_BOUND);
            tracing::error!(signal = %signal, bound = ?STOP_BOUND,
                "the agent did not stop in time; exiting now (rules stay in place)");
            // SAFETY: _exit ends the process at once, without running destructors or atexit
            // handlers that a stuck thread could be in the middle of.
            unsafe { nix::libc::_exit(1) }
        })
        .context("cannot start the signal thread")?;
    Ok(rx)
}

/// Resolves once the stop flag is set.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|stopping| *stopping).await.is_err() {
        // The signal thread never drops its sender; should it, only SIGKILL stops the agent.
        tracing::error!("the signal thread is gone; stop the agent with SIGKILL");
        std::future::pending::<()>().await;
    }
}

/// glibc keeps freed memory per thread arena and untrimmed by default; a pass's temporaries
/// (a 3 MB store at 5,000 containers) would otherwise stay resident. One arena and a low trim
/// threshold keep the daemon's RSS near what it actually holds.
fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; called before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

fn render(config: Config, store_path: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let store_path = store_path.unwrap_or(&config.metadata_store);
    let store = store::read_store(store_path)?;
    // Host routes and link names of this network namespace (readable without root); none if
    // unavailable.
    let kernel = runtime()?.block_on(async {
        match KernelReader::connect() {
            Ok(reader) => reader.snapshot(config.overlay_network).await.ok(),
            Err(_) => None,
        }
    });
    let kernel = kernel.unwrap_or_else(|| {
        eprintln!("egress-guard: cannot list host routes; no container shown as exempt");
        KernelView::default()
    });
    // nft prints an exempt element's interface by name when it exists; so does render.
    let links = kernel.links.clone();
    let plan = policy::plan(&config, &Inventory { store, kernel });
    if !config.enabled {
        println!(
            "# enabled = false: the agent removes tables inet {} and inet {}",
            AgentTable::Persistent.name(),
            AgentTable::Owned.name()
        );
        return Ok(());
    }
    let links = &links;
    if json {
        println!("{}", render::to_json(&AgentTable::ALL, &plan.rules, links));
        return Ok(());
    }
    print!(
        "{}",
        render::to_nft_text(&AgentTable::ALL, &plan.rules, links)
    );
    println!(
        "# containers ({} restricted, {} exempt):",
        plan.count(policy::Verdict::Restricted),
        plan.count(policy::Verdict::Exempt)
    );
    for d in &plan.decisions {
        let ip = d.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into());
        let handle = d.handle.as_deref().unwrap_or("-");
        println!("#   {ip:<15} {:<10} {handle}: {}", d.verdict, d.reason);
    }
    Ok(())
}
