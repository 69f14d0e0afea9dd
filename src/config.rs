//! Configuration: TOML text -> validated [`Config`].
//!
//! Two stages, as in ripgrep: [`RawConfig`] is exactly what the operator wrote (strict: an
//! unknown key is an error naming the key), and [`Config`] is what the agent runs with, after
//! every value has been checked. Validation touches nothing on the system beyond reading the
//! file, so `check-config` is safe anywhere.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

mod reload;
mod rules;

pub use reload::RELOADED_KEYS;
pub use rules::{Destination, EgressRule, MAX_RULES, Protocol, ports_text};

/// Smallest accepted `reconcile_interval`: below this the periodic pass is busy polling.
pub const MIN_RECONCILE_INTERVAL: Duration = Duration::from_millis(100);
/// Largest accepted `reconcile_interval`: drift must be repaired within a bounded time.
pub const MAX_RECONCILE_INTERVAL: Duration = Duration::from_secs(3600);
/// Accepted range of `dns.max_inflight` (upstream queries at once).
pub const DNS_MAX_INFLIGHT_RANGE: std::ops::RangeInclusive<u64> = 1..=4096;
/// Accepted range of `dns.per_container_tcp_connections`: at least one, at most the
/// listener's whole TCP budget (`dns::server::MAX_TCP_CONNECTIONS`).
pub const DNS_PER_CONTAINER_TCP_RANGE: std::ops::RangeInclusive<u64> = 1..=64;
/// Accepted ranges of `dns.per_container_qps` and `dns.per_container_burst`: queries (UDP
/// datagrams and TCP connection attempts to port 53) one container may send a second, and at
/// once, before the kernel drops the rest.
pub const DNS_PER_CONTAINER_QPS_RANGE: std::ops::RangeInclusive<u64> = 1..=100_000;
pub const DNS_PER_CONTAINER_BURST_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// Accepted range of `dns.answer_ttl_min` and `dns.answer_ttl_max`: a second to a day.
pub const DNS_ANSWER_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(86_400);
/// Accepted range of `dns.upstream_timeout`: long enough for a recursive lookup, short enough
/// that a dead upstream frees its slots quickly.
pub const DNS_UPSTREAM_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(30);

/// Why a configuration was rejected. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// What the rules do with traffic that restricted containers send outside `allowed_networks`
///. Both modes classify containers identically and keep the same tables; only the
/// end of the `overlay_egress` chain differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reject it (TCP reset, ICMP admin-prohibited) and report it as `rejected`.
    #[default]
    Enforce,
    /// Let it continue (to the iptables filter table, as without egress-guard) and report it
    /// as `would_reject`: for rolling out restriction on a segment that already runs apps.
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }

    /// The action a report names for a packet the rules matched in this mode.
    pub fn action(self) -> &'static str {
        match self {
            Mode::Enforce => "rejected",
            Mode::Audit => "would_reject",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validated `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    /// One of trace, debug, info, warn, error.
    pub level: String,
    /// Human-readable text or one JSON object per line.
    pub format: LogFormat,
}

/// Validated `[health]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthConfig {
    /// Address of the read-only HTTP endpoint (health, readiness, status, metrics).
    pub listen: SocketAddr,
}

/// What the DNS filter answers for a name outside `dns.allowed_suffixes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefuseWith {
    /// RCODE 5: the resolver declines (clients do not cache it and may try the next server).
    Refused,
    /// RCODE 3: the name does not exist.
    Nxdomain,
}

/// Validated `[dns]` section: the DNS filter for restricted containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsConfig {
    /// When false (the default) nothing about DNS changes: no redirect rules, no listener.
    pub enabled: bool,
    /// Names restricted containers may resolve: these names and every name below them (label
    /// boundaries, case-insensitive). Lowercase, with the trailing dot, no duplicates.
    pub allowed_suffixes: Vec<String>,
    /// Where allowed queries go (BOSH DNS on the cell).
    pub upstream: SocketAddr,
    /// Where the filter listens; restricted containers' DNS is redirected to its port.
    pub listen: SocketAddr,
    /// Upstream queries in flight at once; an allowed query beyond it gets SERVFAIL.
    pub max_inflight: usize,
    /// How long an upstream query may take before the client gets SERVFAIL.
    #[serde(with = "humantime_serde_compat")]
    pub upstream_timeout: Duration,
    /// TCP connections one container may hold open to the filter at once; more are closed
    /// (and counted), so one container cannot use up the listener's connections.
    pub per_container_tcp_connections: usize,
    /// Each container's DNS rate in the kernel, before conntrack: queries a second and the
    /// burst allowed at once; what is over is dropped and counted.
    pub per_container_qps: u32,
    pub per_container_burst: u32,
    /// The answer for names outside `allowed_suffixes`.
    pub refuse_with: RefuseWith,
    /// How long an address a hostname rule's answer gave stays allowed: the answer's TTL,
    /// raised to at least `answer_ttl_min` (apps that cache answers longer than their TTL,
    /// a JVM for 30 s) and cut to at most `answer_ttl_max` (the container sees that TTL).
    #[serde(with = "humantime_serde_compat")]
    pub answer_ttl_min: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub answer_ttl_max: Duration,
}

/// The configuration the agent runs with. Every field has been validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// When false the agent removes its table and keeps it removed.
    pub enabled: bool,
    /// Source range of app containers (silk's overlay).
    pub overlay_network: Ipv4Net,
    /// Destinations that stay reachable from restricted containers, as written by the operator:
    /// IPv4 and IPv6 CIDRs in one list.
    pub allowed_networks: Vec<IpNet>,
    /// `container_workload` values that are not restricted.
    pub exempt_workloads: BTreeSet<String>,
    /// silk's container metadata store.
    pub metadata_store: PathBuf,
    /// Period of the drift-repairing reconcile pass.
    #[serde(with = "humantime_serde_compat")]
    pub reconcile_interval: Duration,
    // Audit mode and attribution; before the tables, as TOML needs.
    /// `enforce` rejects; `audit` only reports what enforce would reject.
    pub mode: Mode,
    pub log: LogConfig,
    pub health: HealthConfig,
    pub dns: DnsConfig,
    pub loggregator: LoggregatorConfig,
    pub metrics_tls: MetricsTlsConfig,
    /// `[[rules]]`: what restricted containers in each rule's scope may reach beyond
    /// `allowed_networks`, in the order written.
    pub rules: Vec<EgressRule>,
    /// Obsolete keys the file still sets: accepted, ignored, logged at start.
    #[serde(skip)]
    pub obsolete: Vec<String>,
}

impl Config {
    /// The IPv4 entries of `allowed_networks`.
    pub fn allowed_v4(&self) -> Vec<Ipv4Net> {
        self.allowed_networks
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect()
    }

    /// The IPv6 entries of `allowed_networks`.
    pub fn allowed_v6(&self) -> Vec<Ipv6Net> {
        self.allowed_networks
            .iter()
            .filter_map(|n| match n {
                IpNet::V6(n) => Some(*n),
                IpNet::V4(_) => None,
            })
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are literal and valid; `validate` of the raw defaults is tested.
        RawConfig::default()
            .validate()
            .expect("built-in defaults are valid")
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|err| match err {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: PathBuf::from("<text>"),
            message: err.to_string().trim_end().to_string(),
        })?;
        raw.validate()
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot render: {err}\n"))
    }
}

/// Serialises a Duration as humantime text ("10s") so `check-config` prints what operators write.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// The file as written. Strings stay strings until `validate`, so errors can name the key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    enabled: bool,
    overlay_network: String,
    allowed_networks: Vec<String>,
    exempt_workloads: Vec<String>,
    metadata_store: PathBuf,
    reconcile_interval: String,
    /// Obsolete since the agent speaks nf_tables netlink itself: accepted so that an upgrade
    /// with an old configuration file still starts, and ignored.
    nft: Option<toml::Value>,
    log: RawLog,
    health: RawHealth,
    // Audit mode and attribution.
    mode: Mode,
    dns: RawDns,
    loggregator: RawLoggregator,
    metrics_tls: RawMetricsTls,
    rules: Vec<rules::RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: LogFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    enabled: bool,
    allowed_suffixes: Vec<String>,
    upstream: String,
    listen: String,
    max_inflight: u64,
    upstream_timeout: String,
    per_container_tcp_connections: u64,
    per_container_qps: u64,
    per_container_burst: u64,
    refuse_with: RefuseWith,
    answer_ttl_min: String,
    answer_ttl_max: String,
}

impl Default for RawDns {
    fn default() -> Self {
        RawDns {
            enabled: false,
            allowed_suffixes: vec!["apps.internal.".into(), "service.cf.internal.".into()],
            upstream: "169.254.0.2:53".into(),
            listen: "0.0.0.0:9853".into(),
            max_inflight: 256,
            upstream_timeout: "2s".into(),
            per_container_tcp_connections: 8,
            per_container_qps: 200,
            per_container_burst: 400,
            refuse_with: RefuseWith::Refused,
            answer_ttl_min: "30s".into(),
            answer_ttl_max: "5m".into(),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            enabled: true,
            overlay_network: "10.255.0.0/16".into(),
            allowed_networks: vec!["10.0.0.0/8".into()],
            exempt_workloads: vec!["staging".into()],
            metadata_store: "/var/vcap/data/container-metadata/store.json".into(),
            reconcile_interval: "10s".into(),
            nft: None,
            log: RawLog::default(),
            health: RawHealth::default(),
            mode: Mode::Enforce,
            dns: RawDns::default(),
            loggregator: RawLoggregator::default(),
            metrics_tls: RawMetricsTls::default(),
            rules: Vec::new(),
        }
    }
}

/// `[metrics_tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetricsTls {
    enabled: bool,
    listen: String,
    ca_cert: String,
    cert: String,
    key: String,
}

impl Default for RawMetricsTls {
    fn default() -> Self {
        RawMetricsTls {
            enabled: false,
            listen: "127.0.0.1:9852".into(),
            ca_cert: String::new(),
            cert: String::new(),
            key: String::new(),
        }
    }
}

/// Validated `[metrics_tls]`: a second listener serving `/metrics` only, over TLS with client
/// certificates (as other Cloud Foundry jobs offer metrics to prom_scraper). The plain
/// `health.listen` endpoint stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsTlsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// PEM files: the CA of the scrapers' client certificates, and the listener's own.
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RawMetricsTls {
    fn validate(self) -> Result<MetricsTlsConfig, ConfigError> {
        let listen = parse_socket("metrics_tls.listen", &self.listen, "127.0.0.1:9852")?;
        if self.enabled {
            for (key, value) in [
                ("metrics_tls.ca_cert", &self.ca_cert),
                ("metrics_tls.cert", &self.cert),
                ("metrics_tls.key", &self.key),
            ] {
                if value.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        key,
                        "a PEM file is needed when metrics_tls.enabled is true".to_string(),
                    ));
                }
            }
        }
        Ok(MetricsTlsConfig {
            enabled: self.enabled,
            listen,
            ca_cert: self.ca_cert.into(),
            cert: self.cert.into(),
            key: self.key.into(),
        })
    }
}

/// `[loggregator]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLoggregator {
    enabled: bool,
    address: String,
    server_name: String,
    ca_cert: String,
    cert: String,
    key: String,
    lines_per_minute: u64,
}

impl Default for RawLoggregator {
    fn default() -> Self {
        RawLoggregator {
            enabled: false,
            address: "127.0.0.1:3458".into(),
            server_name: "metron".into(),
            ca_cert: String::new(),
            cert: String::new(),
            key: String::new(),
            lines_per_minute: 5,
        }
    }
}

/// Accepted range of `loggregator.lines_per_minute`.
pub const APP_LOG_LINES_PER_MINUTE_RANGE: std::ops::RangeInclusive<u64> = 1..=60;

/// Validated `[loggregator]`: blocked attempts as lines in the app's own log stream, through
/// the cell's Loggregator forwarder agent (v2 ingress, gRPC with mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggregatorConfig {
    /// When false (the default) no app log line is sent.
    pub enabled: bool,
    /// The forwarder agent's v2 ingress.
    pub address: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: String,
    /// PEM files: the CA that signs the agent's certificate, and ours.
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Lines per app and destination a minute; more become one summary line.
    pub lines_per_minute: u32,
}

impl RawLoggregator {
    fn validate(self) -> Result<LoggregatorConfig, ConfigError> {
        let address = parse_socket("loggregator.address", &self.address, "127.0.0.1:3458")?;
        if self.server_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "loggregator.server_name",
                "must name the forwarder agent's certificate (cf-deployment: metron)".to_string(),
            ));
        }
        if self.enabled {
            for (key, value) in [
                ("loggregator.ca_cert", &self.ca_cert),
                ("loggregator.cert", &self.cert),
                ("loggregator.key", &self.key),
            ] {
                if value.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        key,
                        "a PEM file is needed when loggregator.enabled is true".to_string(),
                    ));
                }
            }
        }
        let lines_per_minute = in_range(
            "loggregator.lines_per_minute",
            self.lines_per_minute,
            &APP_LOG_LINES_PER_MINUTE_RANGE,
        )?;
        Ok(LoggregatorConfig {
            enabled: self.enabled,
            address,
            server_name: self.server_name,
            ca_cert: self.ca_cert.into(),
            cert: self.cert.into(),
            key: self.key.into(),
            lines_per_minute,
        })
    }
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            listen: "127.0.0.1:9851".into(),
        }
    }
}

const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let overlay_network = parse_network("overlay_network", &self.overlay_network)?;
        if overlay_network.prefix_len() == 32 {
            return Err(ConfigError::invalid(
                "overlay_network",
                format!("{overlay_network} is a single address, not a container network"),
            ));
        }

        let mut allowed_networks = Vec::with_capacity(self.allowed_networks.len());
        for (i, text) in self.allowed_networks.iter().enumerate() {
            let key = format!("allowed_networks[{i}]");
            let net = parse_any_network(&key, text)?;
            if net.prefix_len() == 0 {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{net} allows every destination, which disables enforcement; \
                         set `enabled = false` instead"
                    ),
                ));
            }
            allowed_networks.push(net);
        }

        let mut exempt_workloads = BTreeSet::new();
        for (i, workload) in self.exempt_workloads.iter().enumerate() {
            let key = format!("exempt_workloads[{i}]");
            if workload.trim().is_empty() || workload.trim() != workload {
                return Err(ConfigError::invalid(
                    key,
                    format!("{workload:?} is not a container_workload value"),
                ));
            }
            exempt_workloads.insert(workload.clone());
        }

        if self.metadata_store.as_os_str().is_empty() {
            return Err(ConfigError::invalid("metadata_store", "must not be empty"));
        }
        if self.metadata_store.file_name().is_none() {
            return Err(ConfigError::invalid(
                "metadata_store",
                format!("{} does not name a file", self.metadata_store.display()),
            ));
        }

        let reconcile_interval =
            humantime::parse_duration(&self.reconcile_interval).map_err(|err| {
                ConfigError::invalid(
                    "reconcile_interval",
                    format!(
                        "{:?} is not a duration ({err}); write e.g. \"10s\" or \"1m\"",
                        self.reconcile_interval
                    ),
                )
            })?;
        if !(MIN_RECONCILE_INTERVAL..=MAX_RECONCILE_INTERVAL).contains(&reconcile_interval) {
            return Err(ConfigError::invalid(
                "reconcile_interval",
                format!(
                    "{} is out of range ({} to {})",
                    self.reconcile_interval,
                    humantime::format_duration(MIN_RECONCILE_INTERVAL),
                    humantime::format_duration(MAX_RECONCILE_INTERVAL)
                ),
            ));
        }

        let level = self.log.level.to_ascii_lowercase();
        if !LOG_LEVELS.contains(&level.as_str()) {
            return Err(ConfigError::invalid(
                "log.level",
                format!(
                    "{:?} is not one of {}",
                    self.log.level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }

        let listen: SocketAddr = self.health.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "health.listen",
                format!(
                    "{:?} is not HOST:PORT with a numeric IP (e.g. \"127.0.0.1:9851\")",
                    self.health.listen
                ),
            )
        })?;

        let dns = self.dns.validate()?;
        let loggregator = self.loggregator.validate()?;
        let metrics_tls = self.metrics_tls.validate()?;
        let rules = rules::validate_rules(self.rules)?;
        rules::check_hostname_rules_have_dns(&rules, &dns)?;

        Ok(Config {
            enabled: self.enabled,
            overlay_network,
            allowed_networks,
            exempt_workloads,
            metadata_store: self.metadata_store,
            reconcile_interval,
            log: LogConfig {
                level,
                format: self.log.format,
            },
            health: HealthConfig { listen },
            mode: self.mode,
            dns,
            loggregator,
            metrics_tls,
            rules,
            obsolete: self
                .nft
                .map(|_| {
                    "`nft` is obsolete and ignored (the agent talks to nf_tables over netlink \
                     and needs no nft binary): delete it from the configuration"
                        .to_string()
                })
                .into_iter()
                .collect(),
        })
    }
}

impl RawDns {
    fn validate(self) -> Result<DnsConfig, ConfigError> {
        let mut allowed_suffixes: Vec<String> = Vec::with_capacity(self.allowed_suffixes.len());
        for (i, text) in self.allowed_suffixes.iter().enumerate() {
            let suffix = dns_suffix(text).map_err(|reason| {
                ConfigError::invalid(format!("dns.allowed_suffixes[{i}]"), reason)
            })?;
            if !allowed_suffixes.contains(&suffix) {
                allowed_suffixes.push(suffix);
            }
        }

        let listen = parse_socket("dns.listen", &self.listen, "0.0.0.0:9853")?;
        match listen.ip() {
            std::net::IpAddr::V4(ip) if ip.is_loopback() => {
                return Err(ConfigError::invalid(
                    "dns.listen",
                    format!(
                        "{listen} is a loopback address: redirected queries arrive on the \
                         address of the container's host interface, so listen on 0.0.0.0 \
                         (or that address)"
                    ),
                ));
            }
            std::net::IpAddr::V4(_) => {}
            std::net::IpAddr::V6(_) => {
                return Err(ConfigError::invalid(
                    "dns.listen",
                    format!("{listen} is IPv6; the redirect is IPv4 (silk's overlay is IPv4)"),
                ));
            }
        }

        let upstream = parse_socket("dns.upstream", &self.upstream, "169.254.0.2:53")?;
        if upstream.ip().is_unspecified() {
            return Err(ConfigError::invalid(
                "dns.upstream",
                format!("{upstream} is not a resolver's address"),
            ));
        }
        let to_itself = upstream.port() == listen.port()
            && (listen.ip().is_unspecified()
                || listen.ip() == upstream.ip()
                || upstream.ip().is_loopback());
        if to_itself {
            return Err(ConfigError::invalid(
                "dns.upstream",
                format!("{upstream} is the filter's own listener ({listen}): queries would loop"),
            ));
        }

        if !DNS_MAX_INFLIGHT_RANGE.contains(&self.max_inflight) {
            return Err(ConfigError::invalid(
                "dns.max_inflight",
                format!(
                    "{} is out of range ({} to {})",
                    self.max_inflight,
                    DNS_MAX_INFLIGHT_RANGE.start(),
                    DNS_MAX_INFLIGHT_RANGE.end()
                ),
            ));
        }

        if !DNS_PER_CONTAINER_TCP_RANGE.contains(&self.per_container_tcp_connections) {
            return Err(ConfigError::invalid(
                "dns.per_container_tcp_connections",
                format!(
                    "{} is out of range ({} to {})",
                    self.per_container_tcp_connections,
                    DNS_PER_CONTAINER_TCP_RANGE.start(),
                    DNS_PER_CONTAINER_TCP_RANGE.end()
                ),
            ));
        }

        let per_container_qps = in_range(
            "dns.per_container_qps",
            self.per_container_qps,
            &DNS_PER_CONTAINER_QPS_RANGE,
        )?;
        let per_container_burst = in_range(
            "dns.per_container_burst",
            self.per_container_burst,
            &DNS_PER_CONTAINER_BURST_RANGE,
        )?;

        let upstream_timeout = humantime::parse_duration(&self.upstream_timeout)
            .ok()
            .filter(|d| DNS_UPSTREAM_TIMEOUT_RANGE.contains(d))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "dns.upstream_timeout",
                    format!(
                        "{:?} is not a duration from {} to {}",
                        self.upstream_timeout,
                        humantime::format_duration(*DNS_UPSTREAM_TIMEOUT_RANGE.start()),
                        humantime::format_duration(*DNS_UPSTREAM_TIMEOUT_RANGE.end())
                    ),
                )
            })?;

        let ttl = |key: &str, text: &str| {
            humantime::parse_duration(text)
                .ok()
                .filter(|d| DNS_ANSWER_TTL_RANGE.contains(d) && d.subsec_nanos() == 0)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        key,
                        format!(
                            "{text:?} is not a whole number of seconds from {} to {}",
                            humantime::format_duration(*DNS_ANSWER_TTL_RANGE.start()),
                            humantime::format_duration(*DNS_ANSWER_TTL_RANGE.end())
                        ),
                    )
                })
        };
        let answer_ttl_min = ttl("dns.answer_ttl_min", &self.answer_ttl_min)?;
        let answer_ttl_max = ttl("dns.answer_ttl_max", &self.answer_ttl_max)?;
        if answer_ttl_min > answer_ttl_max {
            return Err(ConfigError::invalid(
                "dns.answer_ttl_min",
                format!(
                    "{:?} is above dns.answer_ttl_max ({:?})",
                    self.answer_ttl_min, self.answer_ttl_max
                ),
            ));
        }

        Ok(DnsConfig {
            enabled: self.enabled,
            allowed_suffixes,
            upstream,
            listen,
            max_inflight: usize::try_from(self.max_inflight).unwrap_or(usize::MAX),
            upstream_timeout,
            per_container_tcp_connections: usize::try_from(self.per_container_tcp_connections)
                .unwrap_or(usize::MAX),
            per_container_qps,
            per_container_burst,
            refuse_with: self.refuse_with,
            answer_ttl_min,
            answer_ttl_max,
        })
    }
}

/// `value` as a u32 when `range` (within u32) holds it, else an error naming `key`.
fn in_range(
    key: &str,
    value: u64,
    range: &std::ops::RangeInclusive<u64>,
) -> Result<u32, ConfigError> {
    if !range.contains(&value) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{value} is out of range ({} to {})",
                range.start(),
                range.end()
            ),
        ));
    }
    u32::try_from(value).map_err(|_| ConfigError::invalid(key, format!("{value} is too large")))
}

/// A numeric `IP:PORT` with a port other than 0.
fn parse_socket(key: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{text:?} is not IP:PORT with a numeric IP (e.g. \"{example}\")"),
        )
    })?;
    if addr.port() == 0 {
        return Err(ConfigError::invalid(key, format!("{text:?} has port 0")));
    }
    Ok(addr)
}

/// A DNS suffix as the filter matches it: lowercase, with the trailing dot. Letters, digits,
/// `-` and `_` in labels of 1 to 63 characters, 253 characters in all; the root (`.`) and
/// wildcards are refused (a suffix already covers every name below it).
pub fn dns_suffix(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return Err(format!(
            "{text:?} is the root, which would allow every name; set `dns.enabled = false` instead"
        ));
    }
    if name.len() > 253 {
        return Err(format!("{text:?} is longer than a DNS name may be (253)"));
    }
    for label in name.split('.') {
        if label == "*" {
            return Err(format!(
                "{text:?} has a wildcard; write the suffix alone (it covers every name below it)"
            ));
        }
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "{text:?} is not a DNS name (labels of 1 to 63 letters, digits, '-' or '_')"
            ));
        }
    }
    Ok(format!("{}.", name.to_ascii_lowercase()))
}

/// Parses an IPv4 CIDR, refusing host bits and IPv6 with a message that says what to write.
/// An IPv4 or IPv6 CIDR without host bits.
fn parse_any_network(key: &str, text: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = text.trim().parse().map_err(|_| {
        let hint = if text.contains('/') {
            ""
        } else {
            " (write a CIDR with a prefix length, e.g. \"10.0.0.0/8\" or \"fd00::/8\")"
        };
        ConfigError::invalid(key, format!("{text:?} is not an IPv4 or IPv6 CIDR{hint}"))
    })?;
    if net.network() != net.addr() {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{text:?} has host bits set; did you mean \"{}\"?",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

fn parse_network(key: &str, text: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net = text.trim().parse().map_err(|_| {
        let hint = if text.contains(':') {
            " (only IPv4 is supported: silk's overlay is IPv4)"
        } else if !text.contains('/') {
            " (write a CIDR with a prefix length, e.g. \"10.0.0.0/8\")"
        } else {
            ""
        };
        ConfigError::invalid(key, format!("{text:?} is not an IPv4 CIDR{hint}"))
    })?;
    if net.network() != net.addr() {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{text:?} has host bits set; did you mean \"{}\"?",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests;
