//! Command line: clap definitions and the commands' implementations; `run` hands over to
//! [`crate::daemon`].
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::dataplane::{AgentTable, render};
use crate::inventory::{Inventory, KernelReader, KernelView, store};
use crate::policy;

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
    /// Explain why a container (by overlay IP or Garden handle) is restricted or exempt and,
    /// given a destination, which network or rule lets it through, or why it is rejected.
    /// Exit code 0 when the agent knows it, 1 when not, 2 for a bad destination, 3 when the
    /// agent cannot be reached.
    Explain {
        /// Container IP or handle (a unique handle prefix is enough).
        container: String,
        /// IP[:PORT][/tcp|udp|icmp] (IPv6 with a port: [ADDR]:PORT); a port alone means TCP.
        destination: Option<String>,
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
        Command::Run { config: path } => with_config(&path, |config| {
            init_logging(&config);
            for warning in &config.obsolete {
                tracing::warn!("{warning}");
            }
            crate::daemon::run(config, path.clone())
        }),
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
            destination,
            addr,
            json,
        } => crate::client::explain(&addr, &container, destination.as_deref(), json),
        Command::Blocked {
            app,
            space,
            org,
            addr,
            json,
        } => crate::client::blocked(
            &addr,
            &crate::attribution::Filter {
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

fn render(config: Config, store_path: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let store_path = store_path.unwrap_or(&config.metadata_store);
    let store = store::read_store(store_path)?;
    // Host routes and link names of this network namespace (readable without root); none if
    // unavailable.
    let kernel = crate::daemon::runtime()?.block_on(async {
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
