//! Command line: clap definitions and the commands' implementations.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
                  from reaching destinations outside the VPC, with an nftables table of its own, \
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
        /// Print the exact nft JSON transaction (a full sync) instead of nft syntax.
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_GUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colour only on a terminal: bpm and systemd write stderr to files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    for warning in &config.obsolete {
        tracing::warn!("{warning}");
    }
    limit_allocator_retention();
    let status = SharedStatus::new(Status::new(config.enabled, config.reconcile_interval));
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let endpoint = crate::health::Endpoint {
        status: status.clone(),
        metrics: metrics.clone(),
        started: std::time::Instant::now(),
        counters: Some(crate::health::CounterReader::new()),
    };
    runtime()?.block_on(async move {
        let health = tokio::spawn(crate::health::serve(config.health.listen, endpoint));
        let result = crate::reconcile::run(config, status, metrics, shutdown_signal()).await;
        health.abort();
        result
    })
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
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
